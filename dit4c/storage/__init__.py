"""
The storage helper (``twistd dit4c-helper-storage``): mounts the instance
owner's storage from the file server with sshfs (docs/protocols.md 13).
"""
