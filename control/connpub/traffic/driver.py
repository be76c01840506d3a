"""Drive a workload as real TCP/UDP connections from one client namespace, on a schedule: the
plan and result formats of the C load generator (native/loadgen.c) and how to run it.

`connpub lab run` builds one plan per client namespace (PLAN_DTYPE: per flow its start offset,
duration, protocol, VIP, port, local source address, chunk size and the gap between chunks, or
a replay's exact exchanges), writes it as the generator's binary plan (write_plan), starts
`connpub-loadgen` inside the namespace (launch) and reads its per-flow outcome (read_results,
flows). Each TCP flow connects, reads the echo server's banner (which names the server), then
sends a chunk and checks every byte of its echo on the plan's schedule, and closes; a UDP flow
does the same with datagrams from one socket (one 5-tuple). A flow is *broken* when a connect,
the banner, an echo or a close fails (refused, RST, a short or wrong echo, or no answer within
the timeout).
"""

from __future__ import annotations

import errno
import ipaddress
import subprocess
from pathlib import Path

import numpy as np

from connpub.errors import ConnpubError
from connpub.traffic import native
from connpub.traffic.workload import FIRST_N

HEAD_GAPS = FIRST_N  # first packets of a flow whose gaps a replay keeps

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

# native/loadgen.c's records (packed, little-endian), after a 16-byte header
HEADER_DTYPE = np.dtype([("magic", "S8"), ("record_size", "<u4"), ("count", "<u4")])
PLAN_MAGIC, RESULT_MAGIC = b"CPLGPLN1", b"CPLGRES1"
NATIVE_PLAN_DTYPE = np.dtype([
    ("flow_id", "<u8"), ("start_s", "<f8"), ("duration_s", "<f8"), ("gap_s", "<f8"),
    ("linger_s", "<f8"), ("head_gaps_s", "<f8", (HEAD_GAPS,)), ("dst", "u1", (16,)),
    ("src", "u1", (16,)), ("chunk_bytes", "<u4"), ("chunks", "<u4"), ("port", "<u2"),
    ("proto", "u1"), ("head_n", "u1"), ("family", "u1"), ("pad", "u1", (3,))])
RESULT_DTYPE = np.dtype([
    ("flow_id", "<u8"), ("started_s", "<f8"), ("ended_s", "<f8"), ("bytes_echoed", "<u8"),
    ("chunks", "<u4"), ("err", "<i4"), ("local_port", "<u2"), ("ok", "u1"), ("stage", "u1"),
    ("server", "S16"), ("open_s", "<f4"), ("rtt_max_s", "<f4"),
    ("resent", "<u4")])
STAGES = ("", "connect", "banner", "exchange", "close")
# err < 0: the generator's own findings (an errno otherwise; ETIMEDOUT for its timeout)
ERRORS = {-1: ("IncompleteReadError", "the peer closed before the echo was complete"),
          -2: ("EchoMismatch", "an echoed byte differs from the one sent"),
          -3: ("BadBanner", "not the echo server's banner"),
          -4: ("Stopped", "the generator was stopped before the flow ended")}


def _packed(addresses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(16-byte IPv6 or IPv4-mapped form, family 4/6) of every address (parsed once each)."""
    unique, inverse = np.unique(addresses.astype(str), return_inverse=True)
    raw = np.zeros((unique.size, 16), np.uint8)
    family = np.zeros(unique.size, np.uint8)
    for index, text in enumerate(unique):
        try:
            address = ipaddress.ip_address(text)
        except ValueError as err:
            raise ConnpubError(f"plan: {text!r} is not an IP address") from err
        packed = address.packed if address.version == 6 else \
            b"\0" * 10 + b"\xff\xff" + address.packed
        raw[index] = np.frombuffer(packed, np.uint8)
        family[index] = address.version
    return raw[inverse.ravel()], family[inverse.ravel()]


def native_plan(plan: np.ndarray) -> np.ndarray:
    """The generator's records of a PLAN_DTYPE plan (same order)."""
    out = np.zeros(plan.size, NATIVE_PLAN_DTYPE)
    for name in ("flow_id", "start_s", "duration_s", "gap_s", "linger_s", "head_gaps_s",
                 "chunk_bytes", "chunks", "port", "proto", "head_n"):
        out[name] = plan[name]
    out["dst"], dst_family = _packed(plan["vip"])
    out["src"], out["family"] = _packed(plan["source"])
    if np.any(dst_family != out["family"]):
        raise ConnpubError("plan: a flow's source and VIP are of different families")
    if not np.isin(plan["proto"], (6, 17)).all():
        raise ConnpubError("plan: proto must be 6 (TCP) or 17 (UDP)")
    return out


def write_plan(plan: np.ndarray, path: Path) -> None:
    header = np.array([(PLAN_MAGIC, NATIVE_PLAN_DTYPE.itemsize, plan.size)], HEADER_DTYPE)
    path.write_bytes(header.tobytes() + native_plan(plan).tobytes())


def read_results(path: Path) -> np.ndarray:
    """The RESULT_DTYPE records the generator wrote (one per flow, in plan order)."""
    data = path.read_bytes()
    if len(data) < HEADER_DTYPE.itemsize:
        raise ConnpubError(f"{path}: not a load generator result (too short)")
    header = np.frombuffer(data[:HEADER_DTYPE.itemsize], HEADER_DTYPE)[0]
    expected = HEADER_DTYPE.itemsize + int(header["count"]) * RESULT_DTYPE.itemsize
    if (header["magic"] != RESULT_MAGIC or header["record_size"] != RESULT_DTYPE.itemsize
            or len(data) != expected):
        raise ConnpubError(f"{path}: not a load generator result (magic, record size or length)")
    return np.frombuffer(data[HEADER_DTYPE.itemsize:], RESULT_DTYPE)


def error_text(err: int, stage: int) -> str | None:
    """`<error class>: <stage>: <detail>` of one result (None when it is ok); the class is
    Python's for an errno (ConnectionResetError, TimeoutError, ...)."""
    if err == 0:
        return None
    where = STAGES[stage] if stage < len(STAGES) else f"stage {stage}"
    if err < 0:
        kind, detail = ERRORS.get(err, ("UnknownError", f"code {err}"))
    else:
        found = OSError(err, "")
        kind, detail = type(found).__name__, errno.errorcode.get(err, str(err))
    return f"{kind}: {where}: {detail}"


def flows(results: np.ndarray, plan: np.ndarray) -> list[dict]:
    """One dict per flow (flow_id, proto, ok, server, started_s, ended_s, chunks, bytes_echoed,
    local_port, error, open_s: connect + banner, rtt_max_s: its slowest echo, resent: UDP
    datagrams sent again): what connpub.lab.measure reads."""
    if results.size != plan.size or np.any(results["flow_id"] != plan["flow_id"]):
        raise ConnpubError("load generator results do not match the plan's flows")
    servers = [s.decode() or None for s in results["server"].tolist()]
    out = []
    for index, row in enumerate(results.tolist()):
        flow_id, started, ended, echoed, chunks, err, port, ok, stage, _, open_s, rtt, resent = row
        out.append({"flow_id": flow_id, "proto": int(plan["proto"][index]), "ok": bool(ok),
                    "server": servers[index], "started_s": started, "ended_s": ended,
                    "chunks": chunks, "bytes_echoed": echoed, "local_port": port,
                    "error": error_text(err, stage), "open_s": open_s, "rtt_max_s": rtt,
                    "resent": resent})
    return out


def command(plan_path: Path, out_path: Path, start_at: float | None = None,
            timeout_s: float = 5.0) -> list[str]:
    argv = [str(native.binary("loadgen")), "--plan", str(plan_path), "--out", str(out_path),
            "--timeout", f"{timeout_s:g}", "--nice", str(native.LAB_NICE)]
    return argv + (["--start-at", f"{start_at:.6f}"] if start_at is not None else [])


def schedule(plan: np.ndarray, folder: Path) -> list[tuple[int, list[float], float]]:
    """The generator's exchange times without network (exchanges taking no time): per flow
    (flow_id, exchange offsets, close offset), in seconds from the run's start."""
    plan_path = folder / "schedule-plan.bin"
    write_plan(plan, plan_path)
    proc = subprocess.run([str(native.binary("loadgen")), "--plan", str(plan_path),
                           "--schedule"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConnpubError(f"connpub-loadgen --schedule failed: {proc.stderr.strip()}")
    out = []
    for line in proc.stdout.splitlines():
        head, _, close = line.partition(" close ")
        flow_id, *times = head.split()
        out.append((int(flow_id), [float(t) for t in times], float(close)))
    return out


def run(plan: np.ndarray, folder: Path, preexec_fn=None, timeout_s: float = 5.0,
        wait_s: float | None = None) -> list[dict]:
    """Write the plan, run the generator to completion (inside a netns with preexec_fn), read
    its results (a failed run: one-line ConnpubError naming its stderr)."""
    plan_path, out_path = folder / "plan.bin", folder / "results.bin"
    write_plan(plan, plan_path)
    proc = subprocess.run(command(plan_path, out_path, timeout_s=timeout_s),
                          capture_output=True, text=True, preexec_fn=preexec_fn, timeout=wait_s)
    if proc.returncode != 0 or not out_path.exists():
        raise ConnpubError(f"connpub-loadgen exited {proc.returncode}: {proc.stderr.strip()}")
    return flows(read_results(out_path), plan)

