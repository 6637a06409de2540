"""
The image server (``twistd dit4c-imageserver``): stores saved instance
images, content-addressed by SHA-256, and asks the portal about every
request it receives (docs/protocols.md sections 8.4 and 12).

- :mod:`~dit4c.imageserver.storage`: where the bytes live
  (:class:`~dit4c.imageserver.storage.IImageStorage`, a directory by
  default); :mod:`~dit4c.imageserver.s3`: an S3-compatible object store
  (``--storage s3``, the ``s3`` extra);
- :mod:`~dit4c.imageserver.portal`: the question to the portal;
- :mod:`~dit4c.imageserver.web`: the HTTP side (the resource and site), over
  :mod:`~dit4c.imageserver.server` (what every connection shares: the
  limits, the credentials, the routes) and
  :mod:`~dit4c.imageserver.uploads` (each request: an upload streamed to
  storage chunk by chunk, asked about before its body is read);
- :mod:`~dit4c.imageserver.errors`: what a client is refused with, and the
  object store's failure;
- :mod:`~dit4c.imageserver.metrics`: the Prometheus figures (``--metrics``),
  counted where each request's end is decided;
- :mod:`~dit4c.imageserver.service` and :mod:`~dit4c.imageserver.tap`: the
  twistd plugin.
"""
