"""``twistd dit4c-dev``: the whole of DIT4C in one process on loopback."""
