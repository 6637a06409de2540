"""
Harnesses of this project's own tests: what they need to run DIT4C's parts
for real (processes, sockets, a browser, podman images) and to wait for
what those parts do. Nothing here is part of DIT4C; the public test
doubles, for people who build on DIT4C, are in :mod:`dit4c.testing`.

``tests/`` is on ``sys.path`` while pytest runs (``tests/conftest.py`` is
the rootdir's conftest, imported in pytest's default ``prepend`` mode), so
a test imports these as ``from support.waiting import eventually``; a
script outside pytest (``bench/``, a child process) puts ``tests/`` on its
path first.

- :mod:`support.backend`: a small web tool that streams, sinks, reports
  headers and echoes WebSocket messages (``backendSite``, ``startBackend``).
- :mod:`support.routing`: a signing key (``Signing``), a routing server and
  listeners in the test's process (``startRouting``).
- :mod:`support.waiting`: ``eventually`` (a condition with a deadline) and
  ``deferLater``.
- :mod:`support.sockets`: raw clients (``RawClient``, ``rawRequest``) and
  ``refusedPort``.
- :mod:`support.tls`: ``makeCertificate``.
- :mod:`support.processes`: ``Process`` (a ``twistd -n`` child and the
  ports it announced), ``TWISTD``, ``announcedPort``.
- :mod:`support.portal`: ``RecordingCommands``, the portal's commands
  recorded instead of sent.
- :mod:`support.browser`: Chromium through Selenium (``startBrowser``).
- :mod:`support.nextpath`: values of ``next`` and a browser as their judge.
- :mod:`support.podman`: busybox images and stand-in helpers for the
  podman runtime.
- :mod:`support.metrics`: a server's Prometheus figures, scraped and
  parsed (``scrape``, ``samples``, ``Figures``).
- :mod:`support.ordering`: the order a parallel run hands tests to its
  workers in (``spread``).
"""
