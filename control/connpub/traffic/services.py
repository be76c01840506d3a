"""A small TCP client load tool against the lab's echo servers (`connpub lab load`), and a UDP
query. The echo servers themselves are native/echod.c (connpub.traffic.native), the workload
load generator native/loadgen.c (connpub.traffic.driver).

Protocol: a TCP server first sends one line `connpub-echo <server name>\\n`, then echoes every
byte it receives. A UDP server answers each datagram with `<server name>\\n` + the datagram.

    python -m connpub.traffic.services load --vip 10.200.0.1 --connections 20 \
        --bytes 1000 --hold 1 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import socket
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

BANNER = b"connpub-echo "


# ---------------------------------------------------------------------------------------------
# load tool


@dataclass
class ConnResult:
    """Outcome of one client connection."""

    index: int
    ok: bool
    server: str | None
    bytes_sent: int
    bytes_echoed: int
    duration_s: float
    error: str | None = None
    source: str | None = None  # the client address it was opened from (None: the default)


def payload_for(index: int, size: int) -> bytes:
    """Deterministic, connection-specific payload of `size` bytes."""
    seed = hashlib.sha256(f"connpub-{index}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


async def _one_connection(index: int, vip: str, port: int, size: int, hold_s: float,
                          keepalive_s: float, timeout_s: float,
                          source: str | None = None) -> ConnResult:
    started = time.monotonic()
    sent = echoed = 0
    server = None
    writer = None
    local = (source, 0) if source else None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(vip, port, local_addr=local), timeout_s)
        banner = await asyncio.wait_for(reader.readline(), timeout_s)
        if not banner.startswith(BANNER):
            raise ValueError(f"unexpected banner {banner[:40]!r}")
        server = banner[len(BANNER):].strip().decode()

        async def exchange(data: bytes) -> None:
            nonlocal sent, echoed
            writer.write(data)
            await writer.drain()
            sent += len(data)
            got = await asyncio.wait_for(reader.readexactly(len(data)), timeout_s)
            if got != data:
                raise ValueError(f"echo mismatch after {echoed} bytes")
            echoed += len(got)

        await exchange(payload_for(index, size))
        hold_end = time.monotonic() + hold_s
        while (remaining := hold_end - time.monotonic()) > 0:
            await asyncio.sleep(min(remaining, keepalive_s) if keepalive_s > 0 else remaining)
            if keepalive_s > 0 and hold_end - time.monotonic() > 0:
                await exchange(b"k")
        return ConnResult(index, True, server, sent, echoed, time.monotonic() - started,
                          source=source)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as err:
        return ConnResult(index, False, server, sent, echoed, time.monotonic() - started,
                          f"{type(err).__name__}: {err}", source)
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def load(vip: str, port: int, connections: int, size: int, hold_s: float,
               keepalive_s: float = 0.0, timeout_s: float = 5.0,
               sources: list[str] | None = None) -> dict:
    """Open `connections` concurrent TCP connections to vip:port (connection i from
    sources[i % len(sources)] when given: several client addresses of one host); a report
    dict."""
    started = time.monotonic()
    results = await asyncio.gather(*(
        _one_connection(i, vip, port, size, hold_s, keepalive_s, timeout_s,
                        sources[i % len(sources)] if sources else None)
        for i in range(connections)))
    servers = Counter(r.server for r in results if r.ok)
    return {
        "vip": vip, "port": port, "connections": connections,
        "ok": sum(r.ok for r in results), "failed": sum(not r.ok for r in results),
        "bytes_sent": sum(r.bytes_sent for r in results),
        "bytes_echoed": sum(r.bytes_echoed for r in results),
        "servers": dict(sorted(servers.items())),
        "duration_s": round(time.monotonic() - started, 3),
        "results": [asdict(r) for r in results],
    }


def udp_query(vip: str, port: int, payload: bytes, timeout_s: float = 2.0) -> tuple[str, bytes]:
    """Send one datagram, return (server name, echoed payload)."""
    family = socket.AF_INET6 if ":" in vip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout_s)
        sock.sendto(payload, (vip, port))
        data, _ = sock.recvfrom(65536)
    name, _, echoed = data.partition(b"\n")
    return name.decode(), echoed


# ---------------------------------------------------------------------------------------------
# entry point


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m connpub.traffic.services", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    load_p = sub.add_parser("load", help="open N TCP connections to the VIP, check echoes")
    load_p.add_argument("--vip", required=True)
    load_p.add_argument("--port", type=int, default=80)
    load_p.add_argument("--connections", type=int, default=10)
    load_p.add_argument("--bytes", type=int, default=1000)
    load_p.add_argument("--hold", type=float, default=0.0, help="seconds to keep each open")
    load_p.add_argument("--keepalive", type=float, default=0.0,
                        help="while holding, send one byte every this many seconds (0 = never)")
    load_p.add_argument("--timeout", type=float, default=5.0)
    load_p.add_argument("--source", action="append",
                        help="client address to connect from (repeat: round robin)")
    load_p.add_argument("--json", action="store_true", help="full per-connection report")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.bytes < 0 or args.hold < 0:
        parser.error("--connections must be >= 1, --bytes and --hold >= 0")
    report = asyncio.run(load(args.vip, args.port, args.connections, args.bytes, args.hold,
                              args.keepalive, args.timeout, args.source))
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['ok']}/{report['connections']} ok, {report['bytes_echoed']} bytes echoed, "
              f"servers {report['servers']}, {report['duration_s']} s")
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
