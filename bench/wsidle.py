#!/usr/bin/env python3
"""Open N WebSocket connections, echo one message on each, then hold them idle.

asyncio raw sockets with a hand-written HTTP Upgrade handshake and frame
codec (no WebSocket library, so the client stays small at 10,000 sockets).

Protocol with the parent (the benchmark harness): once every connection has
been tried, prints one JSON line ``{"opened": n, "failed": f, ...}`` on stdout,
then holds the open ones until a line (or EOF) arrives on stdin, closes them
all and exits.

    python bench/wsidle.py --port 8080 -n 1000 --host-header bench1.localhost

One client address reaches one server address and port from about 28,000
ephemeral ports (``net.ipv4.ip_local_port_range``); ``--source 127.0.0.2``
binds each connection to another loopback address first, so that several
clients together hold more than that through one server port.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import resource
import socket
import struct
import sys
import time

from plumbing import raiseNofile  # bench/plumbing.py

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: Linux's IP_BIND_ADDRESS_NO_PORT (not in the socket module): a bind to port 0
#: leaves the port to connect(), which then needs only the whole 4-tuple unique.
IP_BIND_ADDRESS_NO_PORT = 24


def raiseHardNofile(want: int) -> tuple[int, int, str]:
    """
    Raise this process's RLIMIT_NOFILE (hard and soft) to at least ``want``,
    as a site does for a server that holds that many sockets (systemd's
    ``LimitNOFILE=``, limits.conf's ``nofile``); children inherit it. Only a
    privileged process can raise its hard limit, and never above
    ``fs.nr_open``. The soft and hard limits now, and what was done.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    how = "unchanged"
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                ceiling = int(f.read())
        except (OSError, ValueError):
            ceiling = want
        target = min(want, ceiling)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            how = f"hard limit raised from {hard} to {target}"
        except (OSError, ValueError) as e:
            how = f"hard limit {hard} kept (raising it needs privilege: {e})"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard, how


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A masked, final frame (clients must mask)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    mask = await reader.readexactly(4) if b1 & 0x80 else b""
    data = await reader.readexactly(n)
    if mask:
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    return b0 & 0x0F, data


async def open_one(
    args: argparse.Namespace, i: int
) -> tuple[asyncio.StreamWriter, asyncio.StreamReader]:
    if args.source:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((args.source, 0))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (args.host, args.port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
    else:
        reader, writer = await asyncio.open_connection(args.host, args.port)
    key = base64.b64encode(os.urandom(16))
    writer.write(
        b"GET " + args.path.encode() + b" HTTP/1.1\r\n"
        b"Host: " + (args.host_header or args.host).encode() + b"\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise ConnectionError(f"handshake answered {status[:60]!r}")
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        if accept.lower() not in head.lower():
            raise ConnectionError("bad Sec-WebSocket-Accept")
        msg = b"hello %d" % i
        writer.write(client_frame(msg))
        opcode, data = await read_frame(reader)
        if opcode != 1 or data != msg:
            raise ConnectionError(f"echo mismatch (opcode {opcode})")
    except BaseException:
        writer.transport.abort()
        raise
    return writer, reader


async def amain(args: argparse.Namespace) -> int:
    held: list[tuple[asyncio.StreamWriter, asyncio.StreamReader]] = []
    failures: dict[str, int] = {}
    sem = asyncio.Semaphore(args.concurrency)
    t0 = time.monotonic()

    async def worker(i: int) -> None:
        if args.rate:
            # paced: connection i starts no earlier than i / rate seconds in
            await asyncio.sleep(max(0.0, t0 + i / args.rate - time.monotonic()))
        async with sem:
            try:
                held.append(await asyncio.wait_for(open_one(args, i), args.timeout))
            except Exception as e:  # noqa: BLE001 - every failure is counted by kind
                kind = type(e).__name__
                if isinstance(e, ConnectionError) and str(e):
                    kind += ": " + str(e)[:60]
                failures[kind] = failures.get(kind, 0) + 1

    await asyncio.gather(*(worker(i) for i in range(args.n)))
    elapsed = time.monotonic() - t0
    print(
        json.dumps(
            {
                "requested": args.n,
                "opened": len(held),
                "failed": sum(failures.values()),
                "failures": failures,
                "seconds": round(elapsed, 3),
            }
        ),
        flush=True,
    )
    loop = asyncio.get_running_loop()
    if args.hold is not None:
        await asyncio.sleep(args.hold)
    else:
        await loop.run_in_executor(None, sys.stdin.readline)
    for writer, _reader in held:
        writer.transport.abort()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--source", default=None, help="local address to connect from (e.g. 127.0.0.2)")
    p.add_argument("--host-header", default=None)
    p.add_argument("--path", default="/")
    p.add_argument("-n", type=int, default=1000, help="connections")
    p.add_argument("--concurrency", type=int, default=100, help="handshakes in flight")
    p.add_argument("--rate", type=float, default=None, help="connections started per second (default: as fast as they open)")
    p.add_argument("--timeout", type=float, default=30.0, help="per connection")
    p.add_argument("--hold", type=float, default=None, help="hold seconds instead of stdin")
    args = p.parse_args()
    raiseNofile()
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
