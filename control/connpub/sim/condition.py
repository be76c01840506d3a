"""Make any flow trace simulable before the engine sees it (docs/simulator.md, "Input repair"):
repair what can be repaired, say what was repaired, and cut idle time out of the clock.

Real traces are messy: a capture merged from taps gives flows stamped end-before-start, an
importer keeps epoch times, a capture spans years with a few flows in each. The engine steps
every publish interval from 0 to the last start, so such a trace is either refused or costs
one step (and one row of every per-step series) per idle second. Pure numpy, no per-flow
Python.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from connpub.config import Config
from connpub.traffic.workload import FIRST_N, NS_PER_S


@dataclass
class Conditioning:
    """What condition_trace changed (all zero: the trace went through untouched)."""

    swapped_start_end: int = 0  # flows ending before they started: the two times swapped
    rebased_by_s: float = 0.0  # the trace started this late (epoch times, > keep_idle_s): to 0
    first_n_clamped: int = 0  # first-packet counts above FIRST_N or above the packet count
    flow_ids_renumbered: int = 0  # 1 when flow ids were not unique
    idle_gaps_cut: int = 0  # stretches with no flow alive, each shortened to keep_idle_s
    idle_removed_s: float = 0.0  # simulated seconds those cuts removed
    keep_idle_s: float = 0.0

    def repaired(self) -> dict:
        """The non-zero repairs (what the CLI prints)."""
        return {k: v for k, v in asdict(self).items() if v and k != "keep_idle_s"}


def keep_idle_s(cfg: Config) -> float:
    """Silence long enough that every lease, aggregate and server entry has drained: the
    server's longest idle limit (TCP timeout, UDP horizons) + the longest lease + two publish
    cycles."""
    live = cfg.liveness
    longest_idle_s = max([cfg.lease.idle_timeout_s, live.udp_idle_s, live.udp_stream_idle_s]
                         + [seconds for _, seconds in live.udp_service_idle_s])
    return longest_idle_s + cfg.lease.max_s + 2 * cfg.publish.interval_s


def condition_trace(trace: np.ndarray, cfg: Config, compress_idle: bool = True,
                    copy: bool = True) -> tuple[np.ndarray, Conditioning]:
    """A simulable copy of a FLOW_DTYPE trace, sorted by start, and what was done to it.
    copy=False: repair a trace already sorted by start in place (no second copy of a large
    trace; the caller gives it up)."""
    report = Conditioning(keep_idle_s=keep_idle_s(cfg))
    if not copy and not (np.diff(trace["start_ns"]) < 0).any():
        out = trace
    else:
        out = trace[np.argsort(trace["start_ns"], kind="stable")]  # a copy
    if out.size == 0:
        return out, report
    backwards = out["end_ns"] < out["start_ns"]
    report.swapped_start_end = int(np.count_nonzero(backwards))
    if report.swapped_start_end:
        start = np.minimum(out["start_ns"], out["end_ns"])
        out["end_ns"] = np.maximum(out["start_ns"], out["end_ns"])
        out["start_ns"] = start
        out = out[np.argsort(out["start_ns"], kind="stable")]
    origin = int(out["start_ns"][0])
    if origin < 0 or origin > round(report.keep_idle_s * NS_PER_S):  # epoch or silent start
        report.rebased_by_s = origin / NS_PER_S
        out["start_ns"] -= origin
        out["end_ns"] -= origin
    limit = np.minimum(out["packets"], FIRST_N).astype(out["first_n"].dtype)
    over = out["first_n"] > limit
    report.first_n_clamped = int(np.count_nonzero(over))
    out["first_n"] = np.where(over, limit, out["first_n"])
    ids = out["flow_id"]
    if not (np.diff(ids) > 0).all() and np.unique(ids).size != out.size:  # (ascending: unique)
        report.flow_ids_renumbered = 1
        out["flow_id"] = np.arange(1, out.size + 1, dtype=np.uint64)
    if compress_idle:
        _cut_idle(out, report)
    return out, report


def _cut_idle(out: np.ndarray, report: Conditioning) -> None:
    """Shorten every stretch with no flow alive to report.keep_idle_s (in place)."""
    keep_ns = round(report.keep_idle_s * NS_PER_S)
    alive_until = np.maximum.accumulate(out["end_ns"])
    gap = out["start_ns"][1:] - alive_until[:-1]  # silence before flow i+1
    cut = np.maximum(gap - keep_ns, 0)
    if not cut.any():
        return
    shift = np.concatenate([[0], np.cumsum(cut)])
    out["start_ns"] -= shift
    out["end_ns"] -= shift
    report.idle_gaps_cut = int(np.count_nonzero(cut))
    report.idle_removed_s = float(shift[-1] / NS_PER_S)
