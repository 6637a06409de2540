"""
The pod helper (``twistd dit4c-helper-pod``): all of an instance's helpers
in one process, the listener, the auth helper and the storage helper, as
the ``process`` runtime runs them (docs/protocols.md 9.3). Each tunnel
stream goes straight to the auth proxy in the same process.
"""
