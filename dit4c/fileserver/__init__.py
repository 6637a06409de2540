"""
The file server (``twistd dit4c-fileserver``): each person's persistent
storage, served over SFTP (SSH) to the storage helpers of their instances
(docs/protocols.md section 13).

- :mod:`dit4c.fileserver.jail`: a person's directory, every path resolved
  inside it through file descriptors, symbolic links never followed out;
- :mod:`dit4c.fileserver.sftp`: the SFTP server over a jail;
- :mod:`dit4c.fileserver.access`: who may connect: the instance's key as the
  portal publishes it, and the portal's answer about whose storage it is;
- :mod:`dit4c.fileserver.server`: the SSH server (limits, idle timeout);
- :mod:`dit4c.fileserver.metrics`: its Prometheus figures (``--metrics``);
- :mod:`dit4c.fileserver.errors`: a refusal, a portal that could not be asked,
  a path out of the jail;
- :mod:`dit4c.fileserver.tap`: the twistd plugin.
"""
