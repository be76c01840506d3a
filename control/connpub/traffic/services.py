"""Lab services: asyncio TCP/UDP echo servers that name themselves, and a TCP client load tool.

Protocol: a TCP server first sends one line `connpub-echo <server name>\\n`, then echoes every
byte it receives. A UDP server answers each datagram with `<server name>\\n` + the datagram.

    python -m connpub.traffic.services serve --name srv1 --tcp-port 80 --udp-port 53
    python -m connpub.traffic.services load --vip 10.200.0.1 --connections 20 \
        --bytes 1000 --hold 1 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import signal
import socket
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

BANNER = b"connpub-echo "
LISTEN_BACKLOG = 8192  # a burst of thousands of connects (the kernel caps it at somaxconn)


def raise_open_files() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (one descriptor per connection); returns it."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def run_event_loop(main):
    """asyncio.run(main) on uvloop when installed (about 2x the connections per core)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


# ---------------------------------------------------------------------------------------------
# servers


class _UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, name: bytes):
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        assert self.transport is not None
        self.transport.sendto(self.name + b"\n" + data, addr)


async def _tcp_echo(name: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    try:
        writer.write(BANNER + name + b"\n")
        await writer.drain()
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def serve(name: str, tcp_ports: list[int], udp_ports: list[int],
                udp_bind: list[str] | None = None) -> None:
    """Run the TCP echo server on every address and UDP on udp_bind (default all) until SIGTERM.

    Bind UDP to the VIPs: an unbound UDP reply takes the route's source address, and a DSR
    reply must come from the VIP the client sent to.
    """
    loop = asyncio.get_running_loop()
    name_bytes = name.encode()
    servers = [
        await asyncio.start_server(lambda r, w: _tcp_echo(name_bytes, r, w), host=None,
                                   port=port, reuse_address=True, backlog=LISTEN_BACKLOG)
        for port in tcp_ports
    ]
    transports = []
    for address in udp_bind or ["::"]:
        for udp_port in udp_ports:
            sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET,
                                 socket.SOCK_DGRAM)
            if address == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((address, udp_port))
            transport, _ = await loop.create_datagram_endpoint(lambda: _UdpEcho(name_bytes),
                                                               sock=sock)
            transports.append(transport)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"{name}: echo on tcp/{tcp_ports} udp/{udp_ports}", file=sys.stderr, flush=True)
    await stop.wait()
    for server in servers:
        server.close()
        await server.wait_closed()
    for transport in transports:
        transport.close()


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
    serve_p = sub.add_parser("serve", help="run the TCP+UDP echo servers")
    serve_p.add_argument("--name", required=True)
    serve_p.add_argument("--tcp-port", type=int, action="append",
                         help="TCP port to echo on (repeat; default 80)")
    serve_p.add_argument("--udp-port", type=int, action="append",
                         help="UDP port to echo on (repeat; default 53)")
    serve_p.add_argument("--udp-bind", action="append",
                         help="address to bind UDP to (repeat; default all addresses)")
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
    if args.command == "serve":
        raise_open_files()
        run_event_loop(serve(args.name, args.tcp_port or [80], args.udp_port or [53],
                             args.udp_bind))
        return 0
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
