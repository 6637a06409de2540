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

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import loadgen  # noqa: E402  (bench/loadgen.py)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host-header", default=None, help="Host header (default: --host:--port)")
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="extra header (repeatable)",
    )
    p.add_argument("--path", default="/")
    p.add_argument("--rate", type=float, default=100.0, help="requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--timeout", type=float, default=5.0, help="drain time after the last send")
    p.add_argument("--no-timerfd", action="store_true", help="clock sends with epoll timeouts")
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
