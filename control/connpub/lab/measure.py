"""What a lab run measures from the real maps (docs/lab.md): which connections hold a valid
lease at each sample (the datapath's coverage rule, policy.coverage via the LB agent's
valid_leases), stale flow-seconds after the clients closed, and a few decoded rows of a server's
tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from connpub.agents.lb_plan import valid_leases
from connpub.arrays import void_view as _void
from connpub.datapath import lbctl
from connpub.datapath.abi import FLOW_KEY_DTYPE
from connpub.datapath.maps import fold_cpus
from connpub.datapath.masks import apply_masks
from connpub.datapath.pinned import open_pinned
from connpub.display import entry_rows
from connpub.paths import pin_dir
from connpub.traffic.driver import native_plan

SAMPLE_EVERY_S = 0.25


# ---------------------------------------------------------------------------------------------
# stale state and table size, sampled from the LB maps


@dataclass
class LeaseSampler:
    """Samples the LB's connection and aggregate-lease tables: which connections hold a valid
    lease (own, or their aggregate's) at each sample time."""

    pin_dir: Path
    times_ns: list[int] = field(default_factory=list)
    keys: list[np.ndarray] = field(default_factory=list)
    valid: list[np.ndarray] = field(default_factory=list)
    own: list[np.ndarray] = field(default_factory=list)  # valid own aggregate entries
    peak_valid: int = 0
    peak_entries: int = 0
    byte_table: np.ndarray | None = None  # masks of the run's config (None: default masks)

    def sample(self, now_ns: int) -> int:
        keys, conns = lbctl.read_conns(self.pin_dir)
        agg_keys, agg_values = lbctl.read_agg_leases(self.pin_dir)
        # the datapath's coverage rule (policy.coverage, via the LB agent's reader)
        valid = valid_leases(keys, conns, agg_keys, agg_values, now_ns, self.byte_table)
        own_keys, _ = lbctl.own_aggregates(agg_keys, agg_values, now_ns)
        self.times_ns.append(now_ns)
        self.keys.append(keys)
        self.valid.append(valid)
        self.own.append(own_keys)
        self.peak_valid = max(self.peak_valid, int(valid.sum()) + len(own_keys))
        self.peak_entries = max(self.peak_entries, len(keys) + len(agg_keys))
        return int(valid.sum())

    def stale_flow_seconds(self, closed_keys: np.ndarray, closed_at_ns: np.ndarray,
                           started_at_ns: np.ndarray | None = None) -> float:
        """Sampled seconds of state the LB kept for closed connections: each closed flow while
        it still held a valid lease of its own after closing, and (given the flows' starts)
        each valid own aggregate entry while no flow it covers was open, as the simulator
        counts them (docs/simulator.md)."""
        if not self.times_ns or len(closed_keys) == 0:
            return 0.0
        order = np.argsort(_void(closed_keys))
        sorted_closed = _void(closed_keys)[order]
        closed_sorted_at = closed_at_ns[order]
        stale = 0
        for now_ns, keys, valid, own in zip(self.times_ns, self.keys, self.valid, self.own,
                                            strict=True):
            if valid.any():
                held = _void(keys[valid])
                position = np.minimum(np.searchsorted(sorted_closed, held),
                                      len(sorted_closed) - 1)
                match = sorted_closed[position] == held
                stale += int(np.count_nonzero(match & (closed_sorted_at[position] < now_ns)))
            if started_at_ns is not None and len(own):
                stale += self._idle_aggregates(own, closed_keys, started_at_ns, closed_at_ns,
                                               now_ns)
        return stale * SAMPLE_EVERY_S

    def _idle_aggregates(self, own: np.ndarray, flow_keys: np.ndarray, started_at_ns: np.ndarray,
                         closed_at_ns: np.ndarray, now_ns: int) -> int:
        """How many own aggregate entries cover no flow open at now_ns."""
        open_keys = flow_keys[(started_at_ns <= now_ns) & (closed_at_ns > now_ns)]
        idle = 0
        for level in np.unique(own["agg"]["level"]).tolist():
            tuples = own["agg"]["masked"][own["agg"]["level"] == level]
            covered = _void(apply_masks(open_keys, level, self.byte_table))
            idle += int(np.count_nonzero(~np.isin(_void(tuples), covered)))
        return idle

    def any_valid(self, keys: np.ndarray) -> bool:
        """Whether the last sample still had state for closed flows: a valid lease of one of
        `keys`, or any valid own aggregate entry (sampled once every flow is closed)."""
        if not self.valid:
            return False
        if len(self.own[-1]):
            return True
        held = _void(self.keys[-1][self.valid[-1]])
        return bool(np.isin(held, _void(keys)).any())


def flow_keys_of(results: list[dict], plans: dict[str, np.ndarray]) -> np.ndarray:
    """The LB-side FLOW_KEY_DTYPE tuple of every driver result (source, local port, vip)."""
    rows = np.concatenate([native_plan(plan) for plan in plans.values()])
    ids = np.array([r["flow_id"] for r in results], np.uint64)
    order = np.argsort(rows["flow_id"])
    index = order[np.searchsorted(rows["flow_id"], ids, sorter=order)]
    if np.any(rows["flow_id"][index] != ids):
        raise ValueError("a driver result names a flow no plan has")
    keys = np.zeros(len(results), FLOW_KEY_DTYPE)
    keys["client_addr"] = rows["src"][index]
    keys["vip_addr"] = rows["dst"][index]
    keys["client_port"] = [r["local_port"] for r in results]
    keys["vip_port"] = rows["port"][index]
    keys["proto"] = rows["proto"][index]
    return keys


def server_snapshot(server: dict, now_ns: int, rows: int = 8) -> dict:
    """A few decoded rows of one server's flow and aggregate tables, and their sizes."""
    folder = pin_dir(server["iface"], server["netns"])
    out: dict = {"server": server["node"]}
    for name in ("flows", "aggregates"):
        with open_pinned(folder, "server", name) as table:
            keys, values = table.items()
        values = fold_cpus(values)
        order = np.argsort(-values["bytes"].astype(np.int64), kind="stable")[:rows]
        shown = entry_rows(keys[order], values[order], now_ns)
        for row in shown:  # the sketch columns are for the model, not for people
            for column in [c for c in row if c.startswith("sketch") or c == "class_gen"]:
                del row[column]
        out[name] = {"entries": len(keys), "rows": shown}
    return out


def broken_by_error(results: list[dict]) -> dict[str, int]:
    """Broken connections per error class and stage (`TimeoutError: connect`: a starved client
    or a lost SYN; `ConnectionResetError: exchange`: a packet reached a server that does not
    hold the connection)."""
    counts: dict[str, int] = {}
    for result in results:
        if not result["ok"]:
            kind = ": ".join((result.get("error") or "unknown").split(": ")[:2])
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def peak_concurrent(results: list[dict]) -> int:
    """Most connections the clients held open at once (from each flow's start and end)."""
    if not results:
        return 0
    starts = np.array([r["started_s"] for r in results])
    ends = np.array([r["ended_s"] for r in results])
    times = np.concatenate([starts, ends])
    steps = np.concatenate([np.ones(starts.size, np.int64), -np.ones(ends.size, np.int64)])
    order = np.lexsort((steps, times))  # at equal times an end before a start
    return int(np.cumsum(steps[order]).max())


def spread(results: list[dict]) -> dict[str, int]:
    spread: dict[str, int] = {}
    for result in results:
        if result["ok"] and result["server"]:
            spread[result["server"]] = spread.get(result["server"], 0) + 1
    return dict(sorted(spread.items()))


SUMMARY_COLUMNS = ("publish_packets_per_s", "publish_bytes_per_s", "publish_entries_per_s",
                   "lb_map_writes_per_s", "lease_misses", "broken_connections",
                   "stale_flow_seconds", "peak_valid_leases", "flows")


def summary_rows(results: dict[str, dict]) -> list[dict]:
    """One row per metric, one column per mode (the side-by-side table)."""
    rows = []
    for column in SUMMARY_COLUMNS:
        row = {"metric": column}
        for mode, metrics in results.items():
            value = metrics[column]
            row[mode] = f"{value:.1f}" if isinstance(value, float) else str(value)
        rows.append(row)
    return rows


def plot(results: dict[str, dict], out: Path) -> None:
    """Publish bytes/s, lease misses and valid leases over time, per mode (one PNG)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for mode, metrics in results.items():
        series = metrics["series"]
        if len(series) < 2:
            continue
        t = np.array([p["t_s"] for p in series])
        sent = np.array([p["publish_bytes"] for p in series])
        # over one-second windows: samples (every SAMPLE_EVERY_S) and publish cycles beat
        window = max(1, round(1.0 / SAMPLE_EVERY_S))
        if len(t) > window:
            rate = (sent[window:] - sent[:-window]) / np.maximum(t[window:] - t[:-window], 1e-9)
            axes[0].plot(t[window:], rate, label=mode)
        axes[1].plot(t, [p["lease_misses"] for p in series], label=mode)
        axes[2].plot(t, [p["valid_leases"] for p in series], label=mode)
    axes[0].set_ylabel("publish bytes/s")
    axes[1].set_ylabel("lease misses")
    axes[2].set_ylabel("valid LB leases")
    axes[2].set_xlabel("seconds")
    for axis in axes:
        axis.legend()
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
