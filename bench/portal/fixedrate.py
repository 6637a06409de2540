#!/usr/bin/env python3
"""Open-loop fixed-rate HTTP client with extra request headers.

``bench/loadgen.py`` takes no request headers beyond ``Host``, and the
portal's pages need a session cookie or an API token. This wraps loadgen's
``run()`` (the same timerfd-clocked, coordinated-omission-free generator the
tunnel benchmark uses) and adds ``--header`` lines to its request:

    python bench/portal/fixedrate.py --port 8000 --path / \\
        --header 'Cookie: dit4c_session=...' --rate 100 --duration 10

Prints loadgen's JSON object (``host_header`` is reported without the extra
headers, so secrets do not end up in results).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import loadgen  # noqa: E402  (bench/loadgen.py)


def main(argv: list[str] | None = None) -> int:
    p = loadgen.arguments(__doc__)
    p.set_defaults(path="/", rate=100.0, connections=16)
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="extra header (repeatable)",
    )
    args = p.parse_args(argv)
    for h in args.header:
        name, sep, _ = h.partition(":")
        if not sep or not name.strip() or "\r" in h or "\n" in h:
            p.error(f"--header must be 'Name: value' on one line, not {h!r}")
    host = args.host_header or f"{args.host}:{args.port}"
    # loadgen writes "Host: {host_header}\r\n" into its request: the extra
    # header lines ride along after it.
    args.host_header = "\r\n".join([host, *args.header])
    res = loadgen.run(args)
    res["host_header"] = host
    res["extra_headers"] = [h.partition(":")[0].strip() for h in args.header]
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
