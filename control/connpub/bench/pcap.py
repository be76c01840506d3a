"""`connpub bench pcap`: from-pcap throughput on a large capture built from real ones.

The capture is the classic little-endian Ethernet pcaps of a folder (the ndpi captures), each
rebased to start at 0 and laid `copies` times one `span_s` apart, so it holds many overlapping
real conversations. The figure is records/s of the whole import (read, decode, flows).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from connpub.errors import ConnpubError
from connpub.traffic.pcap import DLT_EN10MB, read_packets
from connpub.traffic.trace import import_pcap

GLOBAL_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 1 << 18, DLT_EN10MB)


def _records(path: Path, span_s: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(record bytes, offsets of each record's ts_sec) of a usable source, else None."""
    blob = path.read_bytes()
    if len(blob) < 24 or struct.unpack_from("<IHHiIII", blob)[::6] != (0xA1B2C3D4, DLT_EN10MB):
        return None
    body = np.frombuffer(blob, np.uint8, offset=24)
    offsets, off = [], 0
    while off + 16 <= body.size:
        caplen = int.from_bytes(body[off + 8 : off + 12].tobytes(), "little")
        if off + 16 + caplen > body.size:
            break
        offsets.append(off)
        off += 16 + caplen
    if not offsets:
        return None
    offs = np.asarray(offsets, np.int64)
    secs = body[offs[:, None] + np.arange(4)].copy().view("<u4")[:, 0]
    if int(secs.max()) - int(secs.min()) >= span_s:
        return None
    return body[:off].copy(), offs


def build_capture(sources: Path, out: Path, copies: int, span_s: int = 3600,
                  say: Callable[[str], None] = print) -> int:
    """Write the replicated capture; returns its record count."""
    parts = [r for r in (_records(p, span_s) for p in sorted(sources.glob("*.pcap")))
             if r is not None]
    if not parts:
        raise ConnpubError(f"{sources}: no little-endian Ethernet .pcap files to build from")
    say(f"{len(parts)} source captures x {copies} copies -> {out}")
    records = 0
    with out.open("wb") as handle:
        handle.write(GLOBAL_HEADER)
        for copy in range(copies):
            for body, offs in parts:
                chunk = body.copy()
                at = offs[:, None] + np.arange(4)
                secs = chunk[at].copy().view("<u4")[:, 0].astype(np.int64)
                rebased = (secs - secs.min() + copy * span_s).astype("<u4")
                chunk[at] = rebased.view(np.uint8).reshape(-1, 4)
                handle.write(chunk.tobytes())
                records += offs.size
    return records


def bench_from_pcap(sources: Path, work: Path, copies: int,
                    say: Callable[[str], None] = print) -> dict:
    """Build the capture in `work`, then time the reader alone and the whole import."""
    capture = work / "replicated.pcap"
    records = build_capture(sources, capture, copies, say=say)
    size = capture.stat().st_size
    read_packets(capture)  # page cache warm, as for any second read of a capture
    say(f"timing read_packets + flows on {records} records")
    started = time.perf_counter()
    packets, _ = read_packets(capture)
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    flows, stats = import_pcap(capture)
    total_s = time.perf_counter() - started
    capture.unlink()
    return {
        "records": records,
        "capture_bytes": size,
        "tcp_udp_packets": int(packets["ts_ns"].size),
        "flows": int(flows.size),
        "read_s": round(read_s, 3),
        "import_s": round(total_s, 3),
        "read_packets_per_s": round(records / read_s),
        "from_pcap_packets_per_s": round(records / total_s),
        "multicast_dropped": stats.multicast,
        "reordered": stats.reordered,
    }


def default_sources() -> Path:
    """The shared ndpi captures next to the repository (../shared/traces/ndpi)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "traces" / "ndpi"
        if candidate.is_dir():
            return candidate
    raise ConnpubError("no ../shared/traces/ndpi next to the repository; pass --sources DIR")
