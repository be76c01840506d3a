"""The server agent: every publish interval it reads the server program's flow and aggregate
tables in batches, publishes live flows (and, in adaptive mode, one entry per aggregate) to the
LB agents, removes finished flows into a Parquet history, and applies the LB's DIRECTIVEs to the
class_levels map. Which TCP connections are open comes from the kernel (datapath.tcpstate).
Pure parts: server_select (selection), server_entries (entries, history), policy.liveness.
docs/agents.md."""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from pathlib import Path

import numpy as np

from connpub import paths
from connpub.agents.common import (
    AgentSocket,
    SourceFilter,
    StopFlag,
    TableReader,
    prefix_filter,
    run_loop,
    sender_ip,
    status_path,
    write_status,
)
from connpub.agents.metrics import AgentMetrics
from connpub.agents.server_entries import (  # noqa: F401 - re-exported (tests, bench)
    NS_PER_MS,
    U32_MAX,
    LeaseHook,
    aggregate_entries,
    build_entries,
    flow_entries,
    history_records,
    key_bytes,
    no_prediction,
)
from connpub.agents.server_select import (  # noqa: F401 - re-exported (tests, bench)
    MODES_AGGREGATING,
    NEVER_NS,
    PROTO_UDP,
    ClosedRepeats,
    FlowTimes,
    aggregates_to_publish,
    aggregates_with_live,
    closed_in_adaptive,
    directive_levels,
    flow_class_levels,
    flow_states,
    flows_to_publish,
    idle_ns,
    level_changes,
    own_traffic,
    stale_aggregates,
)
from connpub.config import Config
from connpub.datapath.abi import (
    CLASS_LEVEL_DTYPE,
    FLOW_KEY_DTYPE,
    PUBLISH_ENTRY_DTYPE,
    SERVER_CONFIG_DTYPE,
    U32_DTYPE,
)
from connpub.datapath.clock import DatapathClock, datapath_clock
from connpub.datapath.maps import PinnedMap, fold_cpus
from connpub.datapath.masks import LEVEL_COUNT, mask_byte_table
from connpub.datapath.pinned import open_pinned
from connpub.datapath.tcpstate import (
    FlowSockets,
    key_join,
    merge_lookups,
    records_to_forget,
    socket_table_keys,
    stamped_sockets,
)
from connpub.errors import ConnpubError
from connpub.policy.granularity import leaves_aggregate
from connpub.policy.lease import lease_repeats
from connpub.protocol.batch import encode_publish_batch
from connpub.protocol.wire import (
    FLAG_CLOSED,
    FLAG_RESYNC,
    Decoder,
    Encoder,
    PacketType,
    accepted_entries,
    load_key,
)

log = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000
MODES_PREDICTIVE = ("predictive", "full")  # leases from the model (connpub.model.predictive)
HISTORY_FLUSH_RECORDS = 50_000
HISTORY_FLUSH_S = 60.0
# TCP flows without a current socket stamp: looked up one syscall each up to this many (~2 us
# each), more are joined with one batched read of the socket table
SOCKET_LOOKUPS_MAX = 20_000
# closed socket records are forgotten (and an incomplete table re-seeded) this often
SOCKET_SWEEP_NS = 10 * NS_PER_S


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

    @functools.cached_property
    def byte_table(self) -> np.ndarray:
        """The masks as bytes (datapath.masks.mask_byte_table), to find aggregates' members."""
        return mask_byte_table(self.cfg.masks.specs)

    def __init__(self, cfg: Config, pin_dir: Path, *, key: bytes | None = None,
                 lease_hook: LeaseHook | None = None, iface: str | None = None,
                 netns: str | None = None, agent_socket: AgentSocket | None = None,
                 clock: DatapathClock | None = None, history_path: str | None = None,
                 planner=None, tcp_watcher=None) -> None:
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
        # [liveness] tcp = "kernel": which TCP connections are open, from the kernel
        # (datapath.tcpstate; loads the tracepoint program and seeds it from sock_diag)
        self.tcp_watcher = tcp_watcher
        if self.tcp_watcher is None and cfg.liveness.tcp == "kernel":
            from connpub.datapath.tcpstate import TcpStateWatcher  # noqa: PLC0415 - bcc

            self.tcp_watcher = TcpStateWatcher(self.pin_dir, netns, self.clock.now_ns)
        self._sockets_map_full = 0
        self._sockets_complete = True  # every open socket has a record (seeded, never full)
        self._sockets_swept_ns = 0
        self.socket_reader = (TableReader(self.tcp_watcher.table)
                              if self.tcp_watcher is not None else None)
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
        # DIRECTIVE / RESYNC-REQUEST come from the LB nodes: other senders cost no HMAC
        lb_ips = frozenset(sender_ip(a) for a in cfg.agent.lb_addresses)
        self.sources = SourceFilter(prefix_filter(cfg.agent.allowed_sources)
                                    or lb_ips.__contains__)
        self.metrics = AgentMetrics("server")
        self.status_file = status_path("server", iface, netns)
        self.iface, self.netns = iface, netns
        self._history: list[np.ndarray] = []
        self._history_count = 0
        self._history_flushed_at = time.monotonic()
        self.previous_cycle_ns: int | None = None
        self.closed_repeats = ClosedRepeats(lease_repeats(cfg))
        self.left_closed: set[bytes] = set()  # aggregates left by their members, CLOSED sent
        self.level_changed_ns: dict[bytes, int] = {}  # class key -> when its level changed
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

    def read_sockets(self, keys: np.ndarray, values: np.ndarray,
                     now_ns: int) -> FlowSockets | None:
        """The kernel's view of each flow's socket (None without a watcher). The tracepoint
        stamps each connection's flow entry, so the view mostly comes with the flows; only
        TCP flows past their handshake without a stamp of the current recording epoch are
        looked up in the socket table (one syscall each up to SOCKET_LOOKUPS_MAX, else one
        batched read joined with them). A full socket table makes the view non-authoritative
        (flows without a record fall back to packets instead of counting as closed) until a
        sweep re-seeds it completely. docs/agents.md, "Liveness"."""
        watcher = self.tcp_watcher
        if watcher is None:
            return None
        map_full = watcher.stats()["map_full"]
        if map_full != self._sockets_map_full:
            log.warning("the TCP socket table is full (%d failed updates): sockets without a "
                        "record are judged by packets", map_full)
            self.metrics.inc("tcp_socket_table_full", map_full - self._sockets_map_full)
            self._sockets_map_full = map_full
            self._sockets_complete = False
        if now_ns - self._sockets_swept_ns >= SOCKET_SWEEP_NS:
            self.sweep_sockets(now_ns)
        view, rows = stamped_sockets(keys, values, watcher.epoch, now_ns,
                                     self.times.handshake_ns)
        if len(rows) > SOCKET_LOOKUPS_MAX:
            sock_keys, sock_values = (self.socket_reader or watcher).read()
            found, at = key_join(np.asarray(sock_keys, FLOW_KEY_DTYPE),
                                 socket_table_keys(keys[rows]))
            view = merge_lookups(view, rows, found, sock_values[at[found]])
        elif len(rows):
            found, records = watcher.table.lookup_many(socket_table_keys(keys[rows]))
            view = merge_lookups(view, rows, found, records[found])
        self.metrics.inc("tcp_socket_lookups", len(rows))
        return FlowSockets(view.state, view.changed_ns, self._sockets_complete)

    def sweep_sockets(self, now_ns: int) -> None:
        """Every SOCKET_SWEEP_NS: forget closed socket records older than linger + 2T (their
        flows are finished by then), re-seed an incomplete table, count the records."""
        watcher = self.tcp_watcher
        self._sockets_swept_ns = now_ns
        sock_keys, sock_values = (self.socket_reader or watcher).read()
        keep_ns = self.times.linger_ns + 2 * round(self.cfg.publish.interval_s * NS_PER_S)
        forget = records_to_forget(sock_values, now_ns, keep_ns)
        if len(forget):
            self.metrics.inc("map_writes", watcher.forget(sock_keys[forget]), map="tcp_sockets")
        self.metrics.set("tracked", len(sock_keys) - len(forget), table="tcp_sockets")
        if not self._sockets_complete:  # the table was full: try to fill in what it lacks
            before = watcher.stats()["map_full"]
            seeded = watcher.seed()
            self._sockets_map_full = watcher.stats()["map_full"]
            self._sockets_complete = (seeded["inserted"] == seeded["missing"]
                                      and self._sockets_map_full == before)

    def read_class_levels(self) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
        """(class keys, levels, default level, when each changed) of class_levels
        (build_cycle's class_levels; a change this agent did not apply: long ago)."""
        class_keys, levels = self.class_levels.items()
        cfg_value = self.config_map.lookup(np.array(0, U32_DTYPE))
        default_level = int(cfg_value["default_level"]) if cfg_value is not None else 0
        changed = np.array([self.level_changed_ns.get(key.tobytes(), NEVER_NS)
                            for key in np.ascontiguousarray(class_keys)], np.int64)
        return class_keys, levels, default_level, changed

    def build_cycle(self, keys, values, agg_keys, agg_values, now_ns: int,
                    sockets: FlowSockets | None = None,
                    class_levels: tuple | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(entries to publish, indices of finished flows, indices of stale aggregates).
        sockets: the kernel's view of each flow (read_sockets), None = packets decide.
        class_levels: (class keys, levels, default level[, when each changed]) of the
        class_levels map; with it a member whose class has left its level (for
        `retire_after_s`) is published as a flow of its own from now on
        and its aggregate gets one CLOSED entry (policy.granularity.leaves_aggregate; the
        datapath keeps it in the aggregate, the LB agent creates its connection entry)."""
        live, finished = flow_states(keys, values, now_ns, self.times, sockets)
        live &= ~own_traffic(keys, self.cfg.agent.listen_port)
        in_aggregate = values
        retired = np.zeros(len(keys), bool)
        if class_levels is not None and self.mode in MODES_AGGREGATING and len(keys):
            level, changed_ns = flow_class_levels(keys, *class_levels)
            retired = leaves_aggregate(values["level"], level, changed_ns, now_ns,
                                       self.cfg.granularity)
            if retired.any():
                values = values.copy()
                values["level"][retired] = 0
        index = flows_to_publish(values, live, self.mode)
        plan = None
        lease_hook = self.lease_hook
        if self.planner is not None:
            # only the flows the plan renews now, with its leases; then one CLOSED entry for
            # flows finished now by the idle timeout while the LB still holds a long lease
            # (none after a FIN/RST: the LB saw it; a closed flow is never renewed again)
            plan = self.planner.plan(keys, values, now_ns, live, finished,
                                     aggregated=in_aggregate["level"] > 0)
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
            closed_index = closed_in_adaptive(keys, in_aggregate, finished, now_ns, self.cfg)
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
            # an aggregate with a live member (e.g. an idle open TCP connection) stays
            with_live = aggregates_with_live(agg_keys, keys, values, live, self.byte_table)
            agg_index = aggregates_to_publish(agg_keys, agg_values, now_ns, self.times,
                                              self.cfg.agent.listen_port, with_live)
            # aggregates whose live members all left them: no more renewals, one CLOSED each
            # (kept in the map: the datapath still counts their members' packets there)
            left = np.zeros(len(agg_keys), bool)
            if retired.any():
                left = aggregates_with_live(agg_keys, keys, in_aggregate, live & retired,
                                            self.byte_table) & ~with_live
                agg_index = agg_index[~left[agg_index]]
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
            stale = stale_aggregates(agg_keys, agg_values, now_ns, self.times, with_live)
            left_keys = [key.tobytes() for key in np.ascontiguousarray(agg_keys[left])]
            sent = getattr(self, "left_closed", set())  # CLOSED already sent for these
            closing = np.flatnonzero(left)[np.array([k not in sent for k in left_keys], bool)]
            self.left_closed = set(left_keys)
            ended = np.union1d(stale, closing)
            if plan is not None and len(ended):
                # its model lease may outlast its members by minutes: the LB caps it at
                # now + close_linger (docs/lb.md "Aggregates"); once, as it is deleted here
                # (or as its members leave it)
                entries = np.concatenate(
                    [entries, aggregate_entries(agg_keys, agg_values, ended, self.server_id,
                                                now_ns, flags=FLAG_CLOSED)],
                    dtype=PUBLISH_ENTRY_DTYPE)
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
        sockets = self.read_sockets(keys, values, now_ns)
        entries, finished, stale = self.build_cycle(keys, values, agg_keys, agg_values, now_ns,
                                                    sockets, self.read_class_levels())
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
        coverage = getattr(self.planner, "coverage", None)
        if coverage is not None:  # the online coverage tracker, per traffic class
            self.metrics.set_coverage(coverage.classes())
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

    def receive(self, datagrams: list[tuple[bytes, tuple]]) -> None:
        """The socket's datagrams: senders that are no LB node ([agent] lb_addresses, or the
        allowed_sources prefixes) are dropped (and counted) before any HMAC is computed, as
        the LB agent does; the rest go to `handle`. Kernel drops are counted here too."""
        kept = self.sources.keep(datagrams, self.metrics)
        self.metrics.inc("socket_drops", self.socket.take_kernel_drops())
        if kept:
            self.handle(kept)

    def handle(self, datagrams: list[tuple[bytes, tuple]]) -> None:
        """Verify a batch of received datagrams; apply DIRECTIVEs, answer RESYNC-REQUESTs."""
        checks_before = self.decoder.tag_checks
        results = self.decoder.decode_batch([data for data, _ in datagrams])
        self.metrics.inc("tag_checks", self.decoder.tag_checks - checks_before)
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
        now_ns = self.clock.now_ns()  # members of the left level retire retire_after_s later
        for key in np.ascontiguousarray(class_keys[changed]):
            self.level_changed_ns[key.tobytes()] = now_ns
        self.metrics.inc("map_writes", written, map="class_levels")
        self.metrics.inc("map_writes", 1, map="config")
        return written

    def resync(self, address: tuple) -> int:
        """Answer a RESYNC-REQUEST: every live flow at level 0, flag RESYNC, to the asker."""
        keys, values = self.flow_reader.read()
        now_ns = self.clock.now_ns()
        sockets = self.read_sockets(keys, values, now_ns)
        live, _ = flow_states(keys, values, now_ns, self.times, sockets)
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
                "predictive": self.planner.status() if self.planner is not None else None,
                "tcpstate": self._tcpstate_status()}

    def _tcpstate_status(self) -> dict | None:
        if self.tcp_watcher is None:
            return None
        return {"netns_inode": self.tcp_watcher.netns_inode, "reused": self.tcp_watcher.reused,
                "seed": self.tcp_watcher.seed_result,
                "load_s": round(self.tcp_watcher.load_s, 3), "stats": self.tcp_watcher.stats()}

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
            run_loop(self.socket, self.receive, [(self.cfg.publish.interval_s, self.tick)], stop)
        finally:
            self.maybe_flush_history(force=True)
            self.write_status()

    def close(self) -> None:
        models = self._model_manager()
        if hasattr(models, "stop"):
            models.stop()
        for pinned in (self.flows, self.aggregates, self.class_levels, self.config_map):
            pinned.close()
        if self.tcp_watcher is not None:
            self.tcp_watcher.close()  # its tracepoint link stays pinned: it keeps recording
        self.socket.close()


def server_pin_dir(iface: str | None, netns: str | None) -> Path:
    if not iface:
        raise ConnpubError("--iface is required: the interface the server program is attached "
                           "to (see `connpub status`)")
    return paths.pin_dir(iface, netns)
