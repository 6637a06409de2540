#!/usr/bin/env python3
"""Open-loop HTTP/1.1 load generator with coordinated-omission-free latencies.

Sends ``GET PATH`` at a fixed rate over a pool of keep-alive connections and
measures every request's latency from the time it was *scheduled*, not the
time it was finally sent: a stall anywhere (server, proxy or this process)
shows up in the latencies of every request that should have gone out during
it.

Raw non-blocking sockets and one epoll loop; no HTTP library. Sends are
clocked by a Linux timerfd (armed through ctypes) so they leave on time to
well under a millisecond, where an epoll timeout alone only has 1 ms
resolution. A connection carries one request at a time (no pipelining); a
request that comes due while every connection is busy waits in a queue, and
that wait counts in its latency.

Prints one JSON object (or a short text summary with ``--text``)::

    python bench/loadgen.py --port 8080 --rate 1000 --duration 10
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import math
import os
import select
import socket
import sys
import time
from collections import deque

from plumbing import raiseNofile  # bench/plumbing.py

CLOCK_MONOTONIC = 1
TFD_TIMER_ABSTIME = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = 0o2000000


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _timespec(ns: int) -> _Timespec:
    return _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)


class PeriodicTimer:
    """A timerfd that fires every ``interval_ns`` from the absolute
    CLOCK_MONOTONIC time ``start_ns`` (the clock of ``time.monotonic_ns``)."""

    def __init__(self, start_ns: int, interval_ns: int) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fd = libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, "timerfd_create: " + os.strerror(err))
        spec = _Itimerspec(_timespec(interval_ns), _timespec(start_ns))
        if libc.timerfd_settime(fd, TFD_TIMER_ABSTIME, ctypes.byref(spec), None) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, "timerfd_settime: " + os.strerror(err))
        self.fd = fd

    def drain(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


class ProtocolError(Exception):
    pass


def parse_response(buf: bytearray) -> tuple[int, int, bool] | None:
    """Return (bytes consumed, status, connection-close) for one complete
    response at the start of ``buf``, or None if it is not complete yet."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > 65536:
            raise ProtocolError("response head too large")
        return None
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = head[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ProtocolError(f"bad status line {head[0][:80]!r}")
    status = int(parts[1])
    length = None
    chunked = False
    close = parts[0] == "HTTP/1.0"
    for line in head[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        value = value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value:
            chunked = True
        elif name == "connection":
            if "close" in value:
                close = True
            elif "keep-alive" in value:
                close = False
    pos = end + 4
    if status in (204, 304) or 100 <= status < 200:
        return pos, status, close
    if chunked:
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            pos = eol + 2
            if size == 0:
                # trailers end with an empty line
                t_end = buf.find(b"\r\n\r\n", pos - 2)
                if t_end < 0:
                    return None
                return t_end + 4, status, close
            if len(buf) < pos + size + 2:
                return None
            pos += size + 2
    if length is None:
        raise ProtocolError("response without Content-Length (read-until-close unsupported)")
    if len(buf) < pos + length:
        return None
    return pos + length, status, close


class Conn:
    __slots__ = ("sock", "fd", "buf", "sched", "sent")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = bytearray()
        self.sched: int | None = None
        self.sent = 0


def percentile(sorted_values: list[int], q: float) -> float | None:
    if not sorted_values:
        return None
    idx = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[idx] / 1e6  # ns -> ms


def summarize(values: list[int]) -> dict[str, float | None]:
    values.sort()
    out: dict[str, float | None] = {}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)):
        out[name] = percentile(values, q)
    out["max"] = values[-1] / 1e6 if values else None
    out["mean"] = (sum(values) / len(values) / 1e6) if values else None
    return out


def run(args: argparse.Namespace) -> dict:
    raiseNofile()
    request = (
        f"GET {args.path} HTTP/1.1\r\nHost: {args.host_header or args.host}\r\n"
        "User-Agent: dit4c-bench-loadgen\r\nAccept: */*\r\n\r\n"
    ).encode("ascii")
    ep = select.epoll()
    conns: dict[int, Conn] = {}
    errors: dict[str, int] = {}

    def note_error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    def connect() -> Conn:
        sock = socket.create_connection((args.host, args.port), timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        c = Conn(sock)
        conns[c.fd] = c
        ep.register(c.fd, select.EPOLLIN)
        return c

    def drop(c: Conn) -> None:
        conns.pop(c.fd, None)
        try:
            ep.unregister(c.fd)
        except OSError:
            pass
        c.sock.close()

    idle: deque[Conn] = deque(connect() for _ in range(args.connections))
    pending: deque[int] = deque()  # scheduled times of requests waiting for a connection
    latencies: list[int] = []  # from scheduled time
    service: list[int] = []  # from the moment the request was written
    lags: list[int] = []  # write time - scheduled time
    statuses: dict[str, int] = {}

    interval = max(1, round(1e9 / args.rate))
    total = int(round((args.warmup + args.duration) * args.rate))
    start = time.monotonic_ns() + 50_000_000
    measure_from = start + int(args.warmup * 1e9)
    last_sched = start + (total - 1) * interval
    drain_deadline = last_sched + int(args.timeout * 1e9)
    outstanding = 0

    timer: PeriodicTimer | None = None
    if not args.no_timerfd:
        try:
            timer = PeriodicTimer(start, interval)
            ep.register(timer.fd, select.EPOLLIN)
        except (OSError, AttributeError) as e:
            print(f"loadgen: timerfd unavailable ({e}); using epoll timeouts", file=sys.stderr)
            timer = None

    def send(c: Conn, sched: int) -> None:
        nonlocal outstanding
        c.sched = sched
        c.sent = time.monotonic_ns()
        try:
            n = c.sock.send(request)
            if n != len(request):
                raise BlockingIOError("short write")
        except OSError as e:
            note_error("send:" + type(e).__name__)
            c.sched = None
            replace(c)
            return
        outstanding += 1
        if sched >= measure_from:
            lags.append(c.sent - sched)

    def release(c: Conn) -> None:
        """``c`` has no request in flight: give it the oldest waiting request."""
        if pending:
            send(c, pending.popleft())
        else:
            idle.append(c)

    def replace(c: Conn) -> None:
        drop(c)
        try:
            nc = connect()
        except OSError as e:
            note_error("connect:" + type(e).__name__)
            return
        release(nc)

    dispatched = 0
    while True:
        now = time.monotonic_ns()
        while dispatched < total and start + dispatched * interval <= now:
            sched = start + dispatched * interval
            dispatched += 1
            if idle:
                send(idle.popleft(), sched)
            else:
                pending.append(sched)
        if dispatched >= total:
            if timer is not None:
                ep.unregister(timer.fd)
                timer.close()
                timer = None
            if outstanding == 0 and not pending:
                break
            if now >= drain_deadline:
                break
            timeout = (drain_deadline - now) / 1e9
        elif timer is not None:
            timeout = -1
        else:
            timeout = max(0.0, (start + dispatched * interval - now) / 1e9)
        for fd, _ev in ep.poll(timeout):
            if timer is not None and fd == timer.fd:
                timer.drain()
                continue
            c = conns.get(fd)
            if c is None:
                continue
            try:
                data = c.sock.recv(262144)
            except BlockingIOError:
                continue
            except OSError as e:
                data = b""
                note_error("recv:" + type(e).__name__)
            if not data:
                if c.sched is not None:
                    outstanding -= 1
                    note_error("closed-mid-request")
                    c.sched = None
                else:
                    try:
                        idle.remove(c)
                    except ValueError:
                        pass
                replace(c)
                continue
            c.buf += data
            while c.sched is not None:
                try:
                    parsed = parse_response(c.buf)
                except (ProtocolError, ValueError) as e:
                    note_error("protocol:" + str(e)[:60])
                    outstanding -= 1
                    c.sched = None
                    replace(c)
                    break
                if parsed is None:
                    break
                done = time.monotonic_ns()
                used, status, close = parsed
                del c.buf[:used]
                outstanding -= 1
                sched, c.sched = c.sched, None
                if sched >= measure_from:
                    key = str(status)
                    statuses[key] = statuses.get(key, 0) + 1
                    latencies.append(done - sched)
                    service.append(done - c.sent)
                if close:
                    replace(c)
                else:
                    release(c)
    unanswered = outstanding + len(pending)
    for c in list(conns.values()):
        drop(c)
    measured = total - int(round(args.warmup * args.rate))
    return {
        "target": f"{args.host}:{args.port}",
        "host_header": args.host_header or args.host,
        "path": args.path,
        "rate": args.rate,
        "duration": args.duration,
        "warmup": args.warmup,
        "connections": args.connections,
        "timer": "timerfd" if not args.no_timerfd else "epoll-timeout",
        "scheduled": measured,
        "completed": len(latencies),
        "unanswered": unanswered,
        "errors": errors,
        "statuses": statuses,
        "achieved_rate": len(latencies) / args.duration if args.duration else None,
        "latency_ms": summarize(latencies),
        "service_ms": summarize(service),
        "send_lag_ms": summarize(lags),
    }


def arguments(description: str | None) -> argparse.ArgumentParser:
    """The options of :func:`run`, for this command and for the ones that wrap it."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host-header", default=None, help="Host header (default: --host)")
    p.add_argument("--path", default="/small")
    p.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--timeout", type=float, default=5.0, help="drain time after the last send")
    p.add_argument("--no-timerfd", action="store_true", help="clock sends with epoll timeouts")
    return p


def main(argv: list[str] | None = None) -> int:
    p = arguments(__doc__)
    p.add_argument("--text", action="store_true", help="print a text summary, not JSON")
    args = p.parse_args(argv)
    res = run(args)
    if args.text:
        lat = res["latency_ms"]
        print(
            f"{res['completed']}/{res['scheduled']} ok at {res['achieved_rate']:.1f} req/s; "
            f"unanswered {res['unanswered']}; errors {res['errors']}"
        )
        for name in ("p50", "p90", "p99", "p999", "max"):
            v = lat[name]
            print(f"  {name:5} {v:.3f} ms" if v is not None else f"  {name:5} -")
        print(f"  send lag p99 {res['send_lag_ms']['p99']} ms")
    else:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
