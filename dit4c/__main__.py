"""``python -m dit4c``: the same as the ``dit4c`` command."""

from dit4c.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
