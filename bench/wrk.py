"""What wrk (the closed-loop HTTP load generator) printed, as figures."""

from __future__ import annotations

import re
from typing import Any

_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def _wrkMs(text: str) -> float | None:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    return float(m.group(1)) * _WRK_UNITS[m.group(2)] if m else None


def parse(out: str) -> dict[str, Any]:
    """
    The figures of ``wrk --latency``'s output: ``rps``, ``p50_ms`` ...
    ``p99_ms``, ``requests``, ``bytes_per_response`` and ``errors``
    (socket errors and non-2xx/3xx answers); empty if it has none.
    """
    res: dict[str, Any] = {}
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if not m:
        return res
    res["rps"] = float(m.group(1))
    for q in ("50", "75", "90", "99"):
        mm = re.search(rf"^\s*{q}%\s+(\S+)", out, re.M)
        res[f"p{q}_ms"] = _wrkMs(mm.group(1)) if mm else None
    mm = re.search(r"(\d+) requests in ([\d.]+)(\w+), ([\d.]+)(\w+) read", out)
    if mm:
        res["requests"] = int(mm.group(1))
        res["bytes_per_response"] = float(mm.group(4)) * _SIZE_UNITS.get(mm.group(5), 1) / max(1, int(mm.group(1)))
    errors = 0
    mm = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    if mm:
        errors += int(mm.group(1))
    mm = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if mm:
        errors += sum(int(x) for x in mm.groups())
    res["errors"] = errors
    return res
