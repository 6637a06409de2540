"""
``python -m dit4c.tools.static --socket PATH --directory DIR``: a directory
as a static web site (files as they are, a listing for a directory without
``index.html``), DIT4C's own so that it listens on the Unix socket the
compute node gives it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from twisted.internet import reactor
from twisted.web.server import Site
from twisted.web.static import File

from dit4c.tools.serve import addListenOptions, serve


def site(directory: Path) -> Site:
    # A file of a type not known by its name is sent as bytes, never as a page.
    root = File(str(directory), defaultType="application/octet-stream")
    root.indexNames = ["index.html", "index.htm"]
    return Site(root)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dit4c.tools.static", description=__doc__.split("\n\n")[0])
    addListenOptions(parser)
    parser.add_argument("--directory", type=Path, default=Path("."), help="The directory to serve.")
    options = parser.parse_args(argv)
    serve(reactor, options, site(options.directory), "static site")


if __name__ == "__main__":
    main()
