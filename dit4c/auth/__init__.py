"""
The auth helper (``twistd dit4c-helper-auth``): a reverse proxy in front of
an instance's tool that lets through only the people the portal allows
(docs/protocols.md section 10).
"""
