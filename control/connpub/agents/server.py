"""The server agent: every publish interval it reads the server program's flow and aggregate
tables in batches, publishes live flows (and, in adaptive mode, one entry per aggregate) to the
LB agents, removes finished flows into a Parquet history, and applies the LB's DIRECTIVEs to the
class_levels map. docs/agents.md."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from connpub import paths
from connpub.agents.common import (
    AgentSocket,
    StopFlag,
    TableReader,
    run_loop,
    status_path,
    write_status,
)
from connpub.agents.metrics import AgentMetrics
from connpub.arrays import join
from connpub.arrays import void_view as _void
from connpub.config import Config
from connpub.datapath.abi import (
    CLASS_KEY_DTYPE,
    CLASS_LEVEL_DTYPE,
    FLOW_KEY_DTYPE,
    PUBLISH_ENTRY_DTYPE,
    SERVER_CONFIG_DTYPE,
    U32_DTYPE,
)
from connpub.datapath.clock import DatapathClock, datapath_clock
from connpub.datapath.maps import PinnedMap, fold_cpus
from connpub.datapath.masks import LEVEL_COUNT
from connpub.datapath.pinned import open_pinned
from connpub.errors import ConnpubError
from connpub.policy.lease import lease_repeats
from connpub.protocol.batch import encode_publish_batch
from connpub.protocol.wire import (
    FLAG_CLOSED,
    FLAG_RENEW,
    FLAG_RESYNC,
    Decoder,
    Encoder,
    PacketType,
    accepted_entries,
    load_key,
)

log = logging.getLogger(__name__)

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000
U32_MAX = 2**32 - 1
PROTO_UDP = 17
MODES_AGGREGATING = ("adaptive", "full")
MODES_PREDICTIVE = ("predictive", "full")  # leases from the model (connpub.model.predictive)
HISTORY_FLUSH_RECORDS = 50_000
HISTORY_FLUSH_S = 60.0
_KEY_SLICE = slice(8, 48)  # bytes of the flow key inside a PUBLISH entry

# A lease hook gives, per published flow, (predicted_remaining_ms uint32, confidence uint16 Q0.16).
# 0 ms = "no prediction": the LB applies its baseline lease k*T. Arguments: flow keys
# (FLOW_KEY_DTYPE), flow values (FLOW_VALUE_DTYPE) and now (datapath ns).
LeaseHook = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def no_prediction(keys: np.ndarray, values: np.ndarray, now_ns: int) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """The baseline/adaptive lease hook: no prediction for any flow (the LB leases k*T)."""
    return np.zeros(len(keys), np.uint32), np.zeros(len(keys), np.uint16)


# ---------------------------------------------------------------------------------------------
# pure selection (arrays in, arrays out; time passed in)


@dataclass(frozen=True)
class FlowTimes:
    """When a flow stops being renewed and when it leaves the table (datapath ns)."""

    idle_timeout_ns: int  # a flow without packets for longer is over (UDP, lost FIN)
    linger_ns: int  # a closed flow (FIN/RST seen) stays in the table this long after its last
    #                 packet, so late ACKs of the closing handshake find it instead of
    #                 starting a new flow; it is never renewed meanwhile

    @classmethod
    def from_config(cls, cfg: Config) -> FlowTimes:
        baseline_lease_s = cfg.lease.k * cfg.publish.interval_s
        return cls(round(cfg.lease.idle_timeout_s * NS_PER_S), round(baseline_lease_s * NS_PER_S))


def idle_ns(last_seen_ns: np.ndarray, now_ns: int) -> np.ndarray:
    """now - last_seen, never negative (the datapath clock runs in jiffies)."""
    return np.maximum(np.int64(now_ns) - last_seen_ns.astype(np.int64), 0)


def flow_states(values: np.ndarray, now_ns: int, times: FlowTimes) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """(live, finished) per flow. live: no FIN/RST and not idle -> renewed. finished: closed
    and lingered, or idle past the timeout -> removed from the table (into the history)."""
    idle = idle_ns(values["last_seen_ns"], now_ns)
    closed = values["closed"] != 0
    live = ~closed & (idle <= times.idle_timeout_ns)
    finished = (closed & (idle > times.linger_ns)) | (~closed & (idle > times.idle_timeout_ns))
    return live, finished


def own_traffic(keys: np.ndarray, listen_port: int) -> np.ndarray:
    """Flows that are the agents' own UDP packets (LB -> this agent): never published."""
    return (keys["proto"] == PROTO_UDP) & (keys["vip_port"] == listen_port)


def flows_to_publish(values: np.ndarray, live: np.ndarray, mode: str) -> np.ndarray:
    """Indices of the flows published as level-0 entries: every live flow (baseline,
    predictive), or the live flows the datapath keeps at level 0 (adaptive, full: the others
    are covered by their aggregate's entry)."""
    if mode in MODES_AGGREGATING:
        return np.flatnonzero(live & (values["level"] == 0))
    return np.flatnonzero(live)


def aggregates_to_publish(agg_keys: np.ndarray, agg_values: np.ndarray, now_ns: int,
                          times: FlowTimes, listen_port: int) -> np.ndarray:
    """Indices of the aggregates (folded over CPUs) published: levels 1-3, with active member
    flows and activity within the idle timeout (a UDP aggregate never counts down)."""
    idle = idle_ns(agg_values["last_seen_ns"], now_ns)
    level = agg_keys["level"]
    masked = agg_keys["masked"]
    live = (agg_values["active_flows"] > 0) & (idle <= times.idle_timeout_ns)
    ok = (level >= 1) & (level < LEVEL_COUNT) & ~own_traffic(masked, listen_port)
    return np.flatnonzero(live & ok)


def stale_aggregates(agg_values: np.ndarray, now_ns: int, times: FlowTimes) -> np.ndarray:
    """Indices of aggregates to delete: no active flow and quiet for the linger time, or quiet
    past the idle timeout (their member flows are finished as well)."""
    idle = idle_ns(agg_values["last_seen_ns"], now_ns)
    return np.flatnonzero(((agg_values["active_flows"] <= 0) & (idle > times.linger_ns))
                          | (idle > times.idle_timeout_ns))


def closed_in_adaptive(keys: np.ndarray, values: np.ndarray, finished: np.ndarray,
                       listen_port: int) -> np.ndarray:
    """Adaptive mode (no planner): the finished flows that get a CLOSED entry, the ones the
    datapath had aggregated (level > 0) and that ended by going idle (UDP, TCP without FIN/RST):
    the LB would otherwise keep them alive for as long as their aggregate is renewed (a flow's
    own lease is the baseline one, it runs out). A flow that ended with the client's FIN/RST
    (`closed`) gets none: the LB saw that packet too and no aggregate covers it any more."""
    return np.flatnonzero(finished & (values["level"] > 0) & (values["closed"] == 0)
                          & ~own_traffic(keys, listen_port))


class ClosedRepeats:
    """CLOSED entries already sent, published again in each of the next `repeats` cycles
    (policy.lease.lease_repeats: a lost CLOSED would leave the flow held by its lease or
    aggregate). A repeat is dropped when the same tuple is live again (a reused port)."""

    def __init__(self, repeats: int) -> None:
        self.repeats = repeats
        self.entries = np.zeros(0, PUBLISH_ENTRY_DTYPE)
        self.left = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.entries)

    def cycle(self, sent_now: np.ndarray, live_keys: np.ndarray) -> np.ndarray:
        """The repeats to send this cycle, minus those whose tuple is among `live_keys` (the
        live flows first seen since the oldest pending entry was sent); then remember
        `sent_now` (this cycle's new CLOSED entries) for the next cycles."""
        due, left = self.entries, self.left
        if len(due) and len(live_keys):
            pending_keys = np.ascontiguousarray(due["key"]).copy()
            pending_keys["pad"] = 0
            live = np.ascontiguousarray(live_keys).copy()
            live["pad"] = 0
            reused = np.isin(_void(pending_keys), _void(live))
            due, left = due[~reused], left[~reused]
        if self.repeats > 0:
            keep = left > 1
            self.entries = np.concatenate([due[keep], sent_now], dtype=PUBLISH_ENTRY_DTYPE)
            self.left = np.concatenate([left[keep] - 1,
                                        np.full(len(sent_now), self.repeats, np.int64)])
        return due


def build_entries(count: int, *, levels, keys_raw: np.ndarray, backend_id: int, flow_count,
                  byte_count, last_seen_ns: np.ndarray, now_ns: int, lease_ms=0, confidence=0,
                  flags=0) -> np.ndarray:
    """PUBLISH_ENTRY_DTYPE entries. keys_raw: (count, 40) uint8 flow keys (already masked)."""
    entries = np.zeros(count, PUBLISH_ENTRY_DTYPE)
    if count == 0:
        return entries
    entries.view(np.uint8).reshape(count, PUBLISH_ENTRY_DTYPE.itemsize)[:, _KEY_SLICE] = keys_raw
    entries["key"]["pad"] = 0
    entries["level"] = levels
    entries["flags"] = flags
    entries["confidence"] = confidence
    entries["backend_id"] = backend_id
    entries["flow_count"] = np.clip(flow_count, 0, U32_MAX)
    entries["bytes"] = byte_count
    entries["last_activity_age_ms"] = np.minimum(idle_ns(last_seen_ns, now_ns) // NS_PER_MS,
                                                 U32_MAX)
    entries["predicted_remaining_ms"] = lease_ms
    return entries


def key_bytes(keys: np.ndarray) -> np.ndarray:
    """(n, 40) uint8 view of FLOW_KEY_DTYPE keys."""
    keys = np.ascontiguousarray(keys)
    return keys.view(np.uint8).reshape(len(keys), FLOW_KEY_DTYPE.itemsize)


def flow_entries(keys: np.ndarray, values: np.ndarray, index: np.ndarray, backend_id: int,
                 now_ns: int, lease_hook: LeaseHook, previous_cycle_ns: int | None,
                 extra_flags: int = 0) -> np.ndarray:
    """Level-0 entries of the flows at `index`. RENEW marks flows seen by an earlier cycle.
    When every flow is published (baseline) the columns are used without gathering."""
    every = len(index) == len(keys)

    def pick(column: np.ndarray) -> np.ndarray:
        return column if every else column[index]

    if lease_hook is no_prediction:
        lease_ms, confidence = 0, 0
    else:
        lease_ms, confidence = lease_hook(keys[index], values[index], now_ns)
    flags: np.ndarray | int = extra_flags
    if previous_cycle_ns is not None:
        seen_before = pick(values["first_seen_ns"]).astype(np.int64) < previous_cycle_ns
        flags = np.where(seen_before, extra_flags | FLAG_RENEW, extra_flags).astype(np.uint8)
    raw = key_bytes(keys)
    return build_entries(len(index), levels=0, keys_raw=raw if every else raw[index],
                         backend_id=backend_id, flow_count=1, byte_count=pick(values["bytes"]),
                         last_seen_ns=pick(values["last_seen_ns"]), now_ns=now_ns,
                         lease_ms=lease_ms, confidence=confidence, flags=flags)


def aggregate_entries(agg_keys: np.ndarray, agg_values: np.ndarray, index: np.ndarray,
                      backend_id: int, now_ns: int, lease_ms=0, confidence=0) -> np.ndarray:
    sel_keys, sel_values = agg_keys[index], agg_values[index]
    return build_entries(len(index), levels=sel_keys["level"],
                         keys_raw=key_bytes(sel_keys["masked"]), backend_id=backend_id,
                         flow_count=sel_values["active_flows"], byte_count=sel_values["bytes"],
                         last_seen_ns=sel_values["last_seen_ns"], now_ns=now_ns,
                         lease_ms=lease_ms, confidence=confidence, flags=FLAG_RENEW)


def history_records(keys: np.ndarray, values: np.ndarray, clock_offset_ns: int,
                    server_id: int) -> np.ndarray:
    """HISTORY_DTYPE records (connpub.traffic.trace) of finished flows; times on CLOCK_MONOTONIC.
    first_tcp_flags is the OR over the whole flow: the datapath keeps no separate
    first-packets OR."""
    from connpub.traffic.trace import HISTORY_DTYPE  # noqa: PLC0415 - pyarrow only when recording

    n = len(keys)
    out = np.zeros(n, HISTORY_DTYPE)
    if n == 0:
        return out
    out["client_addr"] = keys["client_addr"]
    out["vip_addr"] = keys["vip_addr"]
    out["client_port"] = keys["client_port"]
    out["vip_port"] = keys["vip_port"]
    out["proto"] = keys["proto"]
    first = values["first_seen_ns"].astype(np.int64) + clock_offset_ns
    last = values["last_seen_ns"].astype(np.int64) + clock_offset_ns
    out["first_seen_ns"], out["last_seen_ns"] = first, last
    out["duration_ns"] = np.maximum(last - first, 0)
    out["packets"], out["bytes"] = values["packets"], values["bytes"]
    sketched = np.minimum(values["sketch_count"], values["sketch_size"].shape[1]).astype(np.int64)
    column = np.arange(values["sketch_size"].shape[1])
    in_sketch = column[None, :] < sketched[:, None]
    sizes = np.where(in_sketch, values["sketch_size"], 0).astype(np.uint64)
    gaps = np.where(in_sketch & (column[None, :] >= 1), values["sketch_gap_us"],
                    0).astype(np.uint64) * np.uint64(1000)
    out["first_n"] = sketched
    out["first_size_sum"] = sizes.sum(axis=1)
    out["first_size_sumsq"] = (sizes * sizes).sum(axis=1)
    out["first_size_max"] = sizes.max(axis=1)
    out["first_iat_sum_ns"] = gaps.sum(axis=1)
    out["first_iat_max_ns"] = gaps.max(axis=1)
    out["first_tcp_flags"] = values["tcp_flags"]
    out["tcp_flags"] = values["tcp_flags"]
    out["closed"] = values["closed"] != 0
    out["server_id"] = server_id
    return out


def directive_levels(entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class keys, levels) of DIRECTIVE entries; for a class named twice the last one wins."""
    class_keys = np.ascontiguousarray(entries["class_key"]).astype(CLASS_KEY_DTYPE)
    levels = np.asarray(entries["level"], np.uint8)
    if len(class_keys) == 0:
        return class_keys, levels
    reversed_void = _void(class_keys)[::-1]
    _, first_of_reversed = np.unique(reversed_void, return_index=True)
    keep = np.sort(len(class_keys) - 1 - first_of_reversed)
    return class_keys[keep], levels[keep]


def level_changes(current_keys: np.ndarray, current_levels: np.ndarray, class_keys: np.ndarray,
                  levels: np.ndarray, default_level: int = 0) -> np.ndarray:
    """True where a directive changes a class's level (a class without an entry in
    class_levels has the default level)."""
    current = np.full(len(class_keys), default_level, np.uint8)
    found, rows = join(current_keys, class_keys)
    if found.any():
        current[found] = np.asarray(current_levels).reshape(-1)[rows[found]]
    return current != np.asarray(levels, np.uint8)


# ---------------------------------------------------------------------------------------------
# the agent


def open_server_map(pin_dir: Path, name: str) -> PinnedMap:
    return open_pinned(pin_dir, "server", name)


def bump_levels_gen(config_map: PinnedMap) -> int:
    """Make every flow re-read its class level on its next packet; returns the new generation."""
    zero = np.array(0, U32_DTYPE)
    current = config_map.lookup(zero)
    cfg = np.zeros(1, SERVER_CONFIG_DTYPE)
    if current is not None:
        cfg[0] = current
    cfg["levels_gen"] = (int(cfg["levels_gen"][0]) + 1) & U32_MAX
    config_map.update(zero, cfg)
    return int(cfg["levels_gen"][0])


class ServerAgent:
    """One server's agent. `tick()` is one publish cycle, `handle(datagrams)` the receive path;
    `run()` drives both until stopped."""

    planner = None  # connpub.model.predictive.PredictivePlanner in predictive / full mode

    def __init__(self, cfg: Config, pin_dir: Path, *, key: bytes | None = None,
                 lease_hook: LeaseHook | None = None, iface: str | None = None,
                 netns: str | None = None, agent_socket: AgentSocket | None = None,
                 clock: DatapathClock | None = None, history_path: str | None = None,
                 planner=None) -> None:
        self.cfg = cfg
        self.pin_dir = Path(pin_dir)
        self.server_id = cfg.agent.server_id
        self.mode = cfg.publish.mode
        self.key = key if key is not None else load_key(cfg.security.key_file)
        self.history_path = history_path if history_path is not None else cfg.agent.history_path
        self.clock = clock or datapath_clock()
        # predictive / full: the model plans leases and renewals (a bad model file stops the
        # start here, before anything is opened)
        self.planner = planner
        if self.planner is None and self.mode in MODES_PREDICTIVE:
            from connpub.model.calibration import CoverageTracker  # noqa: PLC0415
            from connpub.model.predictive import (  # noqa: PLC0415 - onnxruntime only when used
                ModelManager,
                PredictivePlanner,
                RetrainConfig,
            )

            models = ModelManager(cfg.model.path or None, history_path=self.history_path or None,
                                  retrain=RetrainConfig.from_config(cfg))
            self.planner = PredictivePlanner(cfg, models, self.clock.offset_ns,
                                             coverage=CoverageTracker())
        self.flows = open_server_map(self.pin_dir, "flows")
        self.flow_reader = TableReader(self.flows)
        self.aggregates = open_server_map(self.pin_dir, "aggregates")
        self.class_levels = open_server_map(self.pin_dir, "class_levels")
        self.config_map = open_server_map(self.pin_dir, "config")
        self.times = FlowTimes.from_config(cfg)
        self.lease_hook = lease_hook or self.planner or no_prediction
        self.encoder = Encoder(self.server_id, self.key, cfg.publish.mtu,
                               ip_version=6 if any(":" in a for a in cfg.agent.lb_addresses)
                               or ":" in cfg.agent.listen_address else 4)
        self.decoder = Decoder.from_config(cfg, self.key, (PacketType.DIRECTIVE,
                                                           PacketType.RESYNC_REQUEST))
        self.socket = agent_socket or AgentSocket(cfg.agent.listen_address,
                                                  cfg.agent.listen_port)
        self.lb_destinations = [self.socket.destination(a, cfg.agent.listen_port)
                                for a in cfg.agent.lb_addresses]
        self.metrics = AgentMetrics("server")
        self.status_file = status_path("server", iface, netns)
        self.iface, self.netns = iface, netns
        self._history: list[np.ndarray] = []
        self._history_count = 0
        self._history_flushed_at = time.monotonic()
        self.previous_cycle_ns: int | None = None
        self.closed_repeats = ClosedRepeats(lease_repeats(cfg))
        self.cycles = 0
        self.last_cycle: dict = {}
        self.started_unix = time.time()
        self._rng = random.Random()

    # -- publishing -----------------------------------------------------------------------

    def read_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Flows (views of the reader's buffers: valid until the next read) and, when
        aggregating, the aggregates folded over CPUs."""
        keys, values = self.flow_reader.read()
        if self.mode in MODES_AGGREGATING:
            agg_keys, agg_per_cpu = self.aggregates.items()
            agg_values = fold_cpus(agg_per_cpu)
        else:
            agg_keys = np.zeros(0, self.aggregates.key_dtype)
            agg_values = np.zeros(0, self.aggregates.value_dtype)
        return keys, values, agg_keys, agg_values

    def build_cycle(self, keys, values, agg_keys, agg_values, now_ns: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(entries to publish, indices of finished flows, indices of stale aggregates)."""
        live, finished = flow_states(values, now_ns, self.times)
        live &= ~own_traffic(keys, self.cfg.agent.listen_port)
        index = flows_to_publish(values, live, self.mode)
        plan = None
        lease_hook = self.lease_hook
        if self.planner is not None:
            # only the flows the plan renews now, with its leases; then one CLOSED entry for
            # flows finished now by the idle timeout while the LB still holds a long lease
            # (none after a FIN/RST: the LB saw it; a closed flow is never renewed again)
            plan = self.planner.plan(keys, values, now_ns, live, finished)
            index = index[plan.publish[index]]

            def lease_hook(_keys, _values, _now, plan=plan, index=index):
                return plan.lease_ms[index], plan.confidence[index]

        entries = flow_entries(keys, values, index, self.server_id, now_ns, lease_hook,
                               self.previous_cycle_ns)
        # CLOSED: predictive/full as the plan says; adaptive for aggregated flows; each one is
        # repeated in the next lease_repeats cycles
        if plan is not None:
            closed_index = np.flatnonzero(plan.closed)
        elif self.mode in MODES_AGGREGATING:
            closed_index = closed_in_adaptive(keys, values, finished,
                                              self.cfg.agent.listen_port)
        else:
            closed_index = np.zeros(0, np.int64)
        closed = flow_entries(keys, values, closed_index, self.server_id, now_ns,
                              no_prediction, None, FLAG_CLOSED)
        # a reused tuple can only be a flow first seen since the oldest pending CLOSED
        window_ns = (self.closed_repeats.repeats + 1) * round(self.cfg.publish.interval_s
                                                             * NS_PER_S)
        recent = live & (values["first_seen_ns"].astype(np.int64) >= now_ns - window_ns)
        repeats = self.closed_repeats.cycle(closed, keys[recent])
        if len(closed) or len(repeats):
            entries = np.concatenate([entries, closed, repeats], dtype=PUBLISH_ENTRY_DTYPE)
        stale = np.zeros(0, np.int64)
        if self.mode in MODES_AGGREGATING and len(agg_keys):
            agg_index = aggregates_to_publish(agg_keys, agg_values, now_ns, self.times,
                                              self.cfg.agent.listen_port)
            agg_lease_ms, agg_confidence = 0, 0
            if plan is not None and len(agg_index):
                agg_plan = self.planner.aggregate_plan(agg_keys[agg_index], keys, values, plan,
                                                       now_ns)
                agg_index = agg_index[agg_plan.publish]
                agg_lease_ms = agg_plan.lease_ms[agg_plan.publish]
                agg_confidence = agg_plan.confidence[agg_plan.publish]
            if len(agg_index):
                entries = np.concatenate(
                    [entries, aggregate_entries(agg_keys, agg_values, agg_index,
                                                self.server_id, now_ns, agg_lease_ms,
                                                agg_confidence)],
                    dtype=PUBLISH_ENTRY_DTYPE)
            stale = stale_aggregates(agg_values, now_ns, self.times)
        return entries, np.flatnonzero(finished), stale

    def send_publish(self, entries: np.ndarray, now_ns: int,
                     destinations: list[tuple] | None = None) -> int:
        """Encode and send; returns the packets sent. send_to one_random: each packet to one LB
        drawn at random; all: every packet to every LB. `destinations`: only those (resync)."""
        batch = encode_publish_batch(entries, self.encoder, now_ns)
        targets = self.lb_destinations if destinations is None else destinations
        if batch.count == 0 or not targets:
            return 0
        sent = wire_bytes = 0
        if self.cfg.publish.send_to == "all" or len(targets) == 1 or destinations is not None:
            for target in targets:
                sent += self.socket.send_batch(batch, target)
                wire_bytes += batch.wire_bytes
        else:
            picks = np.asarray([self._rng.randrange(len(targets)) for _ in range(batch.count)])
            for slot, target in enumerate(targets):
                rows = np.flatnonzero(picks == slot)
                if len(rows):
                    part = batch.select(rows)
                    sent += self.socket.send_batch(part, target)
                    wire_bytes += part.wire_bytes
        self.metrics.inc("publish_packets", sent, direction="sent")
        self.metrics.inc("publish_bytes", wire_bytes, direction="sent")
        self._count_entries(entries, "sent")
        return sent

    def _count_entries(self, entries: np.ndarray, direction: str) -> None:
        counts = np.bincount(entries["level"], minlength=LEVEL_COUNT)
        for level, count in enumerate(counts[:LEVEL_COUNT].tolist()):
            self.metrics.inc("publish_entries", count, direction=direction, level=str(level))

    def tick(self) -> dict:
        """One publish cycle: read, decide, send, clean up. Returns what it did."""
        started = time.perf_counter()
        keys, values, agg_keys, agg_values = self.read_tables()
        read_s = time.perf_counter() - started
        now_ns = self.clock.now_ns()
        entries, finished, stale = self.build_cycle(keys, values, agg_keys, agg_values, now_ns)
        build_s = time.perf_counter() - started - read_s
        sent = self.send_publish(entries, now_ns)
        send_s = time.perf_counter() - started - read_s - build_s
        if len(finished):
            self.finish_flows(keys[finished], values[finished])
        if len(stale):
            deleted = self.aggregates.delete_batch(agg_keys[stale])
            self.metrics.inc("map_writes", deleted, map="aggregates")
        self.previous_cycle_ns = now_ns
        self.cycles += 1
        self.maybe_flush_history()
        elapsed = time.perf_counter() - started
        self.metrics.observe("tick_seconds", elapsed, job="publish")
        self.metrics.set("tracked", len(keys), table="flows")
        self.metrics.set("tracked", len(agg_keys), table="aggregates")
        self.last_cycle = {"flows": len(keys), "aggregates": len(agg_keys),
                           "entries": len(entries), "packets": sent,
                           "finished": len(finished), "stale_aggregates": len(stale),
                           "read_s": round(read_s, 6), "build_s": round(build_s, 6),
                           "encode_send_s": round(send_s, 6), "cycle_s": round(elapsed, 6)}
        self.write_status()
        return self.last_cycle

    def finish_flows(self, keys: np.ndarray, values: np.ndarray) -> None:
        deleted = self.flows.delete_batch(keys)
        self.metrics.inc("map_writes", deleted, map="flows")
        closed = values["closed"] != 0
        self.metrics.inc("flows_finished", int(closed.sum()), reason="closed")
        self.metrics.inc("flows_finished", int((~closed).sum()), reason="idle")
        mine = ~own_traffic(keys, self.cfg.agent.listen_port)
        if self.history_path and mine.any():
            self._history.append(history_records(keys[mine], values[mine],
                                                 self.clock.offset_ns, self.server_id))
            self._history_count += int(mine.sum())

    def maybe_flush_history(self, force: bool = False) -> None:
        if not self._history:
            return
        due = time.monotonic() - self._history_flushed_at >= HISTORY_FLUSH_S
        if not (force or due or self._history_count >= HISTORY_FLUSH_RECORDS):
            return
        from connpub.traffic.trace import HISTORY_DTYPE, append_history  # noqa: PLC0415

        records = np.concatenate(self._history, dtype=HISTORY_DTYPE)
        try:
            append_history(records, self.history_path)
        except OSError as err:
            log.warning("cannot append to the history %s: %s", self.history_path, err)
            return
        finally:
            self._history, self._history_count = [], 0
            self._history_flushed_at = time.monotonic()
        self.metrics.inc("history_records", len(records))

    # -- receiving ------------------------------------------------------------------------

    def handle(self, datagrams: list[tuple[bytes, tuple]]) -> None:
        """Verify a batch of received datagrams; apply DIRECTIVEs, answer RESYNC-REQUESTs."""
        results = self.decoder.decode_batch([data for data, _ in datagrams])
        for result in results:
            if result.reason is not None:
                self.metrics.inc("rejected", reason=result.reason.value)
        directives = accepted_entries(results, PacketType.DIRECTIVE)
        received = sum(r.packet_type == PacketType.DIRECTIVE for r in results if r.accepted)
        self.metrics.inc("directives", received, direction="received")
        self.metrics.inc("directive_entries", len(directives), direction="received")
        if len(directives):
            self.apply_directives(directives)
        for result, (_, address) in zip(results, datagrams, strict=True):
            if result.accepted and result.packet_type == PacketType.RESYNC_REQUEST:
                self.metrics.inc("resync_requests", direction="received")
                self.resync(address)

    def apply_directives(self, entries: np.ndarray) -> int:
        """Write the directive's levels into class_levels (only the ones that change), then
        bump levels_gen so flows re-read their level. Returns the classes changed."""
        class_keys, levels = directive_levels(entries)
        current_keys, current_levels = self.class_levels.items()
        cfg_value = self.config_map.lookup(np.array(0, U32_DTYPE))
        default_level = int(cfg_value["default_level"]) if cfg_value is not None else 0
        changed = level_changes(current_keys, current_levels, class_keys, levels, default_level)
        if not changed.any():
            return 0
        try:
            written = self.class_levels.update_batch(
                class_keys[changed], levels[changed].astype(CLASS_LEVEL_DTYPE))
        except OSError as err:
            log.warning("cannot write class levels: %s", err)
            self.metrics.inc("entries_ignored", int(changed.sum()), reason="class_map_full")
            return 0
        bump_levels_gen(self.config_map)
        self.metrics.inc("map_writes", written, map="class_levels")
        self.metrics.inc("map_writes", 1, map="config")
        return written

    def resync(self, address: tuple) -> int:
        """Answer a RESYNC-REQUEST: every live flow at level 0, flag RESYNC, to the asker."""
        keys, values = self.flow_reader.read()
        now_ns = self.clock.now_ns()
        live, _ = flow_states(values, now_ns, self.times)
        index = np.flatnonzero(live & ~own_traffic(keys, self.cfg.agent.listen_port))
        entries = flow_entries(keys, values, index, self.server_id, now_ns, self.lease_hook,
                               None, FLAG_RESYNC)
        destination = self.socket.destination(address[0].removeprefix("::ffff:"),
                                              self.cfg.agent.listen_port)
        sent = self.send_publish(entries, now_ns, [destination])
        self.metrics.inc("resync_requests", direction="answered")
        return sent

    # -- status and loop ------------------------------------------------------------------

    def status(self) -> dict:
        return {"role": "server", "pid": os.getpid(), "server_id": self.server_id,
                "mode": self.mode, "iface": self.iface, "netns": self.netns,
                "pin_dir": str(self.pin_dir), "started_unix": self.started_unix,
                "updated_unix": time.time(), "cycles": self.cycles,
                "lb_addresses": list(self.cfg.agent.lb_addresses),
                "metrics_port": self.metrics.port, "last_cycle": self.last_cycle,
                "decoder": dict(self.decoder.counts),
                "totals": self.metrics.totals, "gauges": self.metrics.gauges,
                "predictive": self.planner.status() if self.planner is not None else None}

    def write_status(self) -> None:
        try:
            write_status(self.status_file, self.status())
        except OSError as err:
            log.warning("cannot write %s: %s", self.status_file, err)

    def _model_manager(self):
        return getattr(self.planner, "models", None) if self.planner is not None else None

    def run(self, stop: StopFlag) -> None:
        self.metrics.serve(self.cfg.agent.metrics_port)
        models = self._model_manager()
        if hasattr(models, "start"):
            models.start()  # background retraining + client priors from the history
        try:
            run_loop(self.socket, self.handle, [(self.cfg.publish.interval_s, self.tick)], stop)
        finally:
            self.maybe_flush_history(force=True)
            self.write_status()

    def close(self) -> None:
        models = self._model_manager()
        if hasattr(models, "stop"):
            models.stop()
        for pinned in (self.flows, self.aggregates, self.class_levels, self.config_map):
            pinned.close()
        self.socket.close()


def server_pin_dir(iface: str | None, netns: str | None) -> Path:
    if not iface:
        raise ConnpubError("--iface is required: the interface the server program is attached "
                           "to (see `connpub status`)")
    return paths.pin_dir(iface, netns)
