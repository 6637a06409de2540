# JupyterLab behind DIT4C's auth helper (images/jupyterlab/Containerfile).
c = get_config()  # noqa: F821
# The pod's loopback: only the auth helper reaches it.
c.ServerApp.ip = "127.0.0.1"
c.ServerApp.port = 8888
c.ServerApp.open_browser = False
c.ServerApp.root_dir = "/home/researcher"
# The auth helper decides who gets in: JupyterLab's own token would ask again.
c.IdentityProvider.token = ""
c.ServerApp.password = ""
# Requests carry the instance's host name (<instance>.<domain>), not localhost.
c.ServerApp.allow_remote_access = True
# Kernels talk to the server on the pod's loopback (TCP: IRkernel knows no
# other transport); the pod's firewall lets nothing from outside reach them.
