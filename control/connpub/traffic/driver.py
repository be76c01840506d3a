"""Drive a workload as real TCP/UDP connections from one client namespace, on a schedule.

Run by `connpub lab run` inside a client namespace:

    python -m connpub.traffic.driver --plan plan.npz --out results.json

The plan (numpy .npz, see PLAN_DTYPE) gives per flow its start offset, duration, protocol, VIP,
port, local source address, chunk size and the gap between chunks. Each TCP flow connects,
reads the echo server's banner (which names the server), then sends a chunk and checks its echo
every `gap_s` until its duration is over, and closes. A UDP flow does the same with datagrams
from one socket (one 5-tuple). A flow is *broken* when a connect, an echo or a close fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from connpub.traffic.services import raise_open_files, run_event_loop
from connpub.traffic.workload import FIRST_N

BANNER = b"connpub-echo "
HEAD_GAPS = FIRST_N  # first packets of a flow whose gaps a replay keeps
TIMER_SLACK_S = 0.002  # uvloop's timers fire up to a millisecond early: not one more chunk

PLAN_DTYPE = np.dtype(
    [
        ("flow_id", "<u8"),
        ("start_s", "<f8"),  # offset from the run's start
        ("duration_s", "<f8"),
        ("proto", "u1"),  # 6 or 17
        ("vip", "U64"),
        ("port", "<u2"),
        ("source", "U64"),  # local address to bind
        ("chunk_bytes", "<u4"),
        ("gap_s", "<f8"),  # between chunks
        # replay of a real flow (chunks > 0): exactly `chunks` exchanges, the first head_n after
        # head_gaps_s[k] each, the rest evenly up to the flow's end; then linger_s of silence
        # before the close (a flow that went idle instead of closing). chunks 0: every gap_s.
        ("chunks", "<u4"),
        ("head_n", "u1"),
        ("head_gaps_s", "<f8", (HEAD_GAPS,)),
        ("linger_s", "<f8"),
    ]
)


@dataclass
class FlowResult:
    flow_id: int
    proto: int
    ok: bool
    server: str | None
    started_s: float  # offsets from the run's start, as the client saw them
    ended_s: float
    chunks: int
    bytes_echoed: int
    local_port: int
    error: str | None = None


def _payload(flow_id: int, chunk: int, size: int) -> bytes:
    seed = f"{flow_id}:{chunk}:".encode()
    return (seed * (size // len(seed) + 1))[:size]


class _TcpChannel:
    """One TCP connection to the echo server: the banner names the server; echoes stream back."""

    proto = 6

    async def open(self, row: np.void, timeout_s: float) -> tuple[int, str]:
        # asyncio.timeout, not wait_for: no extra task per operation (CPU at 10k+ connections)
        async with asyncio.timeout(timeout_s):
            self.reader, self.writer = await asyncio.open_connection(
                str(row["vip"]), int(row["port"]), local_addr=(str(row["source"]), 0))
        async with asyncio.timeout(timeout_s):
            banner = await self.reader.readline()
        if not banner.startswith(BANNER):
            raise ValueError(f"unexpected banner {banner[:40]!r}")
        return self.writer.get_extra_info("sockname")[1], banner[len(BANNER) :].strip().decode()

    async def exchange(self, data: bytes, timeout_s: float) -> tuple[bytes, str | None]:
        self.writer.write(data)
        await self.writer.drain()
        async with asyncio.timeout(timeout_s):
            return await self.reader.readexactly(len(data)), None

    async def close(self, timeout_s: float) -> None:
        self.writer.close()
        async with asyncio.timeout(timeout_s):
            await self.writer.wait_closed()


class _UdpClient(asyncio.DatagramProtocol):
    def __init__(self):
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.replies.put_nowait(data)


class _UdpChannel:
    """Datagrams from one socket (one 5-tuple); each reply names the server, then echoes."""

    proto = 17

    async def open(self, row: np.void, timeout_s: float) -> tuple[int, str | None]:
        self.vip = (str(row["vip"]), int(row["port"]))
        family = socket.AF_INET6 if ":" in self.vip[0] else socket.AF_INET
        self.transport, self.client = await asyncio.get_running_loop().create_datagram_endpoint(
            _UdpClient, local_addr=(str(row["source"]), 0), family=family
        )
        return self.transport.get_extra_info("sockname")[1], None

    async def exchange(self, data: bytes, timeout_s: float) -> tuple[bytes, str | None]:
        self.transport.sendto(data, self.vip)
        async with asyncio.timeout(timeout_s):
            reply = await self.client.replies.get()
        name, _, echoed = reply.partition(b"\n")
        return echoed, name.decode()

    async def close(self, timeout_s: float) -> None:
        self.transport.close()


def _next_wait(row: np.void, done: int, end_at: float) -> float | None:
    """Seconds to wait before exchange `done` (None: no more exchanges)."""
    chunks = int(row["chunks"])
    if chunks == 0:  # until the flow's end, every gap_s
        wait = min(float(row["gap_s"]), end_at - time.monotonic())
        return wait if wait > TIMER_SLACK_S else None
    if done >= chunks:
        return None
    if done < int(row["head_n"]):
        return float(row["head_gaps_s"][done])
    return max(end_at - time.monotonic(), 0.0) / (chunks - done)


async def _flow(row: np.void, t0: float, timeout_s: float) -> FlowResult:
    """Open, send a chunk and check its echo every gap_s until the flow's end, close."""
    channel = _TcpChannel() if int(row["proto"]) == 6 else _UdpChannel()
    flow_id, started = int(row["flow_id"]), time.monotonic() - t0
    server, chunks, echoed, local_port, opened = None, 0, 0, 0, False
    end_at = t0 + float(row["start_s"]) + float(row["duration_s"])
    error = None
    try:
        local_port, server = await channel.open(row, timeout_s)
        opened = True
        wait: float | None = 0.0 if int(row["chunks"]) == 0 else _next_wait(row, 0, end_at)
        while wait is not None:
            if wait > 0:
                await asyncio.sleep(wait)
            data = _payload(flow_id, chunks, int(row["chunk_bytes"]))
            got, named = await channel.exchange(data, timeout_s)
            if got != data:
                raise ValueError(f"echo mismatch in chunk {chunks}")
            server = named or server
            chunks += 1
            echoed += len(got)
            wait = _next_wait(row, chunks, end_at)
        rest = end_at - time.monotonic() + float(row["linger_s"])
        if int(row["chunks"]) and rest > 0:
            await asyncio.sleep(rest)
        opened = False
        await channel.close(timeout_s)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as err:
        error = f"{type(err).__name__}: {err}"
    finally:
        if opened:
            with contextlib.suppress(OSError, TimeoutError):
                await channel.close(1.0)
    return FlowResult(
        flow_id,
        channel.proto,
        error is None,
        server,
        started,
        time.monotonic() - t0,
        chunks,
        echoed,
        local_port,
        error,
    )


async def drive(
    plan: np.ndarray, timeout_s: float = 5.0, t0: float | None = None
) -> list[FlowResult]:
    """Start every flow of the plan at its offset from t0 (default now); wait for all."""
    t0 = time.monotonic() if t0 is None else t0
    order = np.argsort(plan["start_s"], kind="stable")
    tasks = []
    for index in order:
        row = plan[index]
        delay = t0 + float(row["start_s"]) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_flow(row, t0, timeout_s)))
    return list(await asyncio.gather(*tasks))


def summarise(results: list[FlowResult]) -> dict:
    servers: dict[str, int] = {}
    for result in results:
        if result.ok and result.server:
            servers[result.server] = servers.get(result.server, 0) + 1
    return {
        "flows": len(results),
        "ok": sum(r.ok for r in results),
        "broken": sum(not r.ok for r in results),
        "bytes_echoed": sum(r.bytes_echoed for r in results),
        "servers": dict(sorted(servers.items())),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m connpub.traffic.driver",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--plan", required=True, help=".npz with an array 'plan' of PLAN_DTYPE")
    parser.add_argument("--out", required=True, help="JSON report to write")
    parser.add_argument("--timeout", type=float, default=5.0, help="per connect/echo, seconds")
    parser.add_argument(
        "--start-at",
        type=float,
        default=None,
        help="CLOCK_MONOTONIC second to treat as offset 0 (default: now)",
    )
    args = parser.parse_args(argv)
    plan = np.load(args.plan)["plan"]
    if plan.dtype != PLAN_DTYPE:
        parser.error(f"plan has dtype {plan.dtype}, expected {PLAN_DTYPE}")
    raise_open_files()
    results = run_event_loop(drive(plan, args.timeout, args.start_at))
    report = {"summary": summarise(results), "flows": [asdict(r) for r in results]}
    with open(args.out, "w") as out:
        json.dump(report, out)
    print(json.dumps(report["summary"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
