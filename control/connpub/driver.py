"""Drive a workload as real TCP/UDP connections from one client namespace, on a schedule.

Run by `connpub lab run` inside a client namespace:

    python -m connpub.driver --plan plan.npz --out results.json

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
import resource
import socket
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

BANNER = b"connpub-echo "

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


async def _tcp_flow(row: np.void, t0: float, timeout_s: float) -> FlowResult:
    flow_id, started = int(row["flow_id"]), time.monotonic() - t0
    server, chunks, echoed, local_port, writer = None, 0, 0, 0, None
    end_at = t0 + float(row["start_s"]) + float(row["duration_s"])
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                str(row["vip"]), int(row["port"]), local_addr=(str(row["source"]), 0)
            ),
            timeout_s,
        )
        local_port = writer.get_extra_info("sockname")[1]
        banner = await asyncio.wait_for(reader.readline(), timeout_s)
        if not banner.startswith(BANNER):
            raise ValueError(f"unexpected banner {banner[:40]!r}")
        server = banner[len(BANNER) :].strip().decode()
        while True:
            data = _payload(flow_id, chunks, int(row["chunk_bytes"]))
            writer.write(data)
            await writer.drain()
            got = await asyncio.wait_for(reader.readexactly(len(data)), timeout_s)
            if got != data:
                raise ValueError(f"echo mismatch in chunk {chunks}")
            chunks += 1
            echoed += len(got)
            wait = min(float(row["gap_s"]), end_at - time.monotonic())
            if wait <= 0:
                break
            await asyncio.sleep(wait)
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), timeout_s)
        writer = None
        return FlowResult(
            flow_id, 6, True, server, started, time.monotonic() - t0, chunks, echoed, local_port
        )
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as err:
        return FlowResult(
            flow_id,
            6,
            False,
            server,
            started,
            time.monotonic() - t0,
            chunks,
            echoed,
            local_port,
            f"{type(err).__name__}: {err}",
        )
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)


class _UdpClient(asyncio.DatagramProtocol):
    def __init__(self):
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.replies.put_nowait(data)


async def _udp_flow(row: np.void, t0: float, timeout_s: float) -> FlowResult:
    flow_id, started = int(row["flow_id"]), time.monotonic() - t0
    server, chunks, echoed, local_port, transport = None, 0, 0, 0, None
    end_at = t0 + float(row["start_s"]) + float(row["duration_s"])
    loop = asyncio.get_running_loop()
    try:
        vip = str(row["vip"])
        family = socket.AF_INET6 if ":" in vip else socket.AF_INET
        transport, proto = await loop.create_datagram_endpoint(
            _UdpClient, local_addr=(str(row["source"]), 0), family=family
        )
        local_port = transport.get_extra_info("sockname")[1]
        while True:
            data = _payload(flow_id, chunks, int(row["chunk_bytes"]))
            transport.sendto(data, (vip, int(row["port"])))
            reply = await asyncio.wait_for(proto.replies.get(), timeout_s)
            name, _, got = reply.partition(b"\n")
            if got != data:
                raise ValueError(f"echo mismatch in datagram {chunks}")
            server = name.decode()
            chunks += 1
            echoed += len(got)
            wait = min(float(row["gap_s"]), end_at - time.monotonic())
            if wait <= 0:
                break
            await asyncio.sleep(wait)
        return FlowResult(
            flow_id, 17, True, server, started, time.monotonic() - t0, chunks, echoed, local_port
        )
    except (TimeoutError, OSError, ValueError) as err:
        return FlowResult(
            flow_id,
            17,
            False,
            server,
            started,
            time.monotonic() - t0,
            chunks,
            echoed,
            local_port,
            f"{type(err).__name__}: {err}",
        )
    finally:
        if transport is not None:
            transport.close()


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
        flow = _tcp_flow if int(row["proto"]) == 6 else _udp_flow
        tasks.append(asyncio.create_task(flow(row, t0, timeout_s)))
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
        prog="python -m connpub.driver",
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
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = asyncio.run(drive(plan, args.timeout, args.start_at))
    report = {"summary": summarise(results), "flows": [asdict(r) for r in results]}
    with open(args.out, "w") as out:
        json.dump(report, out)
    print(json.dumps(report["summary"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
