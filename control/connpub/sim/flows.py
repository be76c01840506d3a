"""Static per-flow tables of a simulation, computed once from a trace: keys, traffic classes,
backends, aggregate slots, packet arrivals and the model's inputs (client priors by the
server agent's own index, model.observations.ClientPriorIndex) (docs/simulator.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from connpub.config import Config
from connpub.datapath import maglev
from connpub.datapath.abi import CLASS_KEY_DTYPE, FLOW_KEY_DTYPE
from connpub.datapath.masks import LEVEL_COUNT, apply_masks, mask_byte_table
from connpub.errors import ConnpubError
from connpub.model.features import ClientHistory, compute_features, is_ipv4_mapped
from connpub.model.observations import ClientPriorIndex
from connpub.policy.liveness import FlowTimes, idle_limit_ns
from connpub.traffic.workload import FIRST_N, NS_PER_S, PROTO_TCP, TCP_FIN, TCP_RST

NO_ARRIVAL = np.iinfo(np.int64).max
MIN_REMAINING_S = 1e-3


def flow_keys(trace: np.ndarray) -> np.ndarray:
    """FLOW_KEY_DTYPE keys (ports in network order, as the datapath sees them) of a trace."""
    keys = np.zeros(trace.size, FLOW_KEY_DTYPE)
    keys["client_addr"] = trace["client_addr"]
    keys["vip_addr"] = trace["vip_addr"]
    keys["client_port"] = trace["client_port"]
    keys["vip_port"] = trace["vip_port"]
    keys["proto"] = trace["proto"]
    return keys


def group_ids(columns: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense id (0..groups-1) of every row of a (n, w) uint64 matrix; equal rows share an id,
    ids in the lexicographic order of the rows (column 0 first). Column by column: each
    column's dense codes (a 1-D sort) joined into one mixed-radix code, re-densified before
    it could overflow (a lexsort of the whole matrix is several times slower)."""
    n = columns.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), 0
    code = np.zeros(n, np.int64)
    groups = 1
    for column in range(columns.shape[1]):
        values, inverse = np.unique(columns[:, column], return_inverse=True)
        if groups * values.size >= 2**62:
            _, code = np.unique(code, return_inverse=True)
            code = code.reshape(-1).astype(np.int64)
            groups = int(code.max()) + 1
        code = code * values.size + inverse.reshape(-1)
        groups *= values.size
    values, ids = np.unique(code, return_inverse=True)
    return ids.reshape(-1).astype(np.int64), int(values.size)


def class_words(rows: np.ndarray) -> np.ndarray:
    """(n, 3) uint64 words of the traffic class (VIP address, VIP port, proto) of trace rows or
    CLASS_KEY_DTYPE keys: group_ids over them numbers the classes (SimFlows.class_id)."""
    words = np.zeros((rows.size, 3), np.uint64)
    words[:, :2] = np.ascontiguousarray(rows["vip_addr"]).view("<u8").reshape(rows.size, 2)
    words[:, 2] = rows["vip_port"].astype(np.uint64) * 256 + rows["proto"]
    return words


@dataclass
class SimFlows:
    """Everything about the flows that does not change while simulating."""

    trace: np.ndarray
    keys: np.ndarray  # FLOW_KEY_DTYPE
    start_ns: np.ndarray
    end_ns: np.ndarray
    server_close_ns: np.ndarray  # when the server agent knows the flow is over
    client_closed: np.ndarray  # bool: TCP ending with the client's FIN/RST, which the LB sees
    class_id: np.ndarray  # int64 row into class_keys
    class_keys: np.ndarray  # CLASS_KEY_DTYPE, one per traffic class (VIP, port, proto)
    backend_id: np.ndarray  # uint32, 1..servers (the LB's Maglev pick over the 5-tuple)
    slots: np.ndarray  # (LEVEL_COUNT, n) int64: lease slot of the flow at each level
    slot_count: int  # n flow slots + aggregate slots of levels 1..3
    # by the level S the flow's class had at its first packet (docs/lb.md "Aggregates"): its
    # backend, Maglev over the tuple masked at S (S = 0: backend_id), and its lease slot at
    # each level L, (level L, masked tuple, that backend); slots_by_start[0] = slots
    backend_by_start: np.ndarray  # (LEVEL_COUNT, n) uint32
    slots_by_start: np.ndarray  # (LEVEL_COUNT S, LEVEL_COUNT L, n) int64
    sketch_ns: np.ndarray  # (n, FIRST_N) absolute times of the first packets (NO_ARRIVAL unused)
    sketch_end_ns: np.ndarray
    regular_packets: np.ndarray  # packets after the first ones, spread evenly up to end_ns
    byte_rate: np.ndarray  # bytes/s over the flow's life
    priors: ClientPriorIndex  # the server agent's client-prior index over the trace's flows
    may_idle: np.ndarray  # bool: a gap between two packets exceeds the flow's idle limit
    idle_limit_ns: np.ndarray  # int64: how long the server lets the flow be quiet
    #                            (policy.liveness.idle_limit_ns: UDP horizons, TCP timeout)

    @property
    def n(self) -> int:
        return int(self.start_ns.size)

    @property
    def classes(self) -> int:
        return int(self.class_keys.size)

    def next_arrival_ns(self, flows: np.ndarray, after_ns: np.ndarray) -> np.ndarray:
        """Time of each flow's first packet at or after `after_ns` (NO_ARRIVAL if none): the
        first-packet sketch times, then the remaining packets evenly spaced up to the last
        packet (FIN/last datagram) at end_ns."""
        after = np.asarray(after_ns, np.int64)
        end = self.end_ns[flows]
        sketch = self.sketch_ns[flows]
        sketch_next = np.where(sketch >= after[:, None], sketch, NO_ARRIVAL).min(axis=1)
        start = self.sketch_end_ns[flows]
        count = self.regular_packets[flows]
        gap = np.where(count > 0, (end - start) / np.maximum(count, 1), np.inf)
        with np.errstate(invalid="ignore"):
            index = np.maximum(np.ceil((after - start) / gap), 1.0)
        regular_ok = (count > 0) & (index <= count)
        regular = np.where(regular_ok, start + index * gap, 0.0)
        regular = np.minimum(np.ceil(regular), end).astype(np.int64)
        regular_next = np.where(regular_ok, regular, NO_ARRIVAL)
        end_next = np.where(end >= after, end, NO_ARRIVAL)
        return np.minimum(np.minimum(sketch_next, regular_next), end_next)

    def last_arrival_ns(self, flows: np.ndarray, at_ns: int) -> np.ndarray:
        """Time of each flow's latest packet at or before `at_ns` (the server's last_seen;
        the flows must have started by then): the inverse of next_arrival_ns."""
        at = np.int64(at_ns)
        end = self.end_ns[flows]
        sketch = self.sketch_ns[flows]
        last = np.where(sketch <= at, sketch, self.start_ns[flows][:, None]).max(axis=1)
        start = self.sketch_end_ns[flows]
        count = self.regular_packets[flows]
        gap = np.where(count > 0, (end - start) / np.maximum(count, 1), 1.0)
        gap = np.maximum(gap, 1e-9)
        index = np.clip(np.floor((at - start) / gap), 0.0, count)
        regular = np.minimum(np.ceil(start + index * gap), end)
        index = np.where(regular > at, index - 1, index)
        regular = np.minimum(np.ceil(start + index * gap), end).astype(np.int64)
        last = np.where((count > 0) & (index >= 1), np.maximum(last, regular), last)
        return np.where(end <= at, end, np.minimum(last, at))

    def features(self, flows: np.ndarray, now_ns: int) -> np.ndarray:
        """Model features of `flows` at now_ns, from what the server datapath has recorded by
        then (bytes/packets interpolated between the first packets and the end, as training)."""
        rec = self.trace[flows]
        age_s = (now_ns - self.start_ns[flows]) / NS_PER_S
        sketch_s = (self.sketch_end_ns[flows] - self.start_ns[flows]) / NS_PER_S
        duration_s = (self.end_ns[flows] - self.start_ns[flows]) / NS_PER_S
        fraction = np.clip((age_s - sketch_s) / np.maximum(duration_s - sketch_s, 1e-9), 0, 1)
        first_n = rec["first_n"].astype(np.float64)
        sizes = rec["first_sizes"].astype(np.float64)
        iat = rec["first_iat_ns"].astype(np.float64)
        first_bytes = sizes.sum(axis=1)
        prior_count, prior_mean = self.priors.lookup(rec["client_addr"],
                                                     np.full(flows.size, now_ns))
        obs = {
            "age_s": age_s, "proto": rec["proto"], "vip_port": rec["vip_port"],
            "first_n": rec["first_n"], "first_size_sum": first_bytes,
            "first_size_sumsq": (sizes * sizes).sum(axis=1), "first_size_max": sizes.max(axis=1),
            "first_iat_sum_ns": iat.sum(axis=1), "first_iat_max_ns": iat.max(axis=1),
            "first_tcp_flags": rec["first_tcp_flags"],
            "bytes": first_bytes + (rec["bytes"] - first_bytes) * fraction,
            "packets": first_n + (rec["packets"] - first_n) * fraction,
            "client_prior_count": prior_count, "client_prior_log_duration": prior_mean,
            "client_ipv6": ~is_ipv4_mapped(rec["client_addr"]),
        }
        return compute_features(obs)


def client_priors(trace: np.ndarray) -> ClientPriorIndex:
    """The server agent's client-prior index over a trace's flows (their ends and durations)."""
    start = trace["start_ns"].astype(np.int64)
    end = trace["end_ns"].astype(np.int64)
    return ClientPriorIndex.from_client_history(ClientHistory(
        trace["client_addr"], end, np.log(np.maximum((end - start) / NS_PER_S, MIN_REMAINING_S))))


def prepare(trace: np.ndarray, cfg: Config, servers: int = 4,
            hash_client_only: bool = False, priors: ClientPriorIndex | None = None) -> SimFlows:
    """Precompute the static tables of a FLOW_DTYPE trace (any order; sorted here by start).
    priors: the client-prior index to use (default: over this trace; sim.parallel passes the
    whole trace's to each shard, since a client's history spans VIPs)."""
    if trace.size == 0:
        raise ConnpubError("the trace has no flows; generate one with `connpub trace generate`")
    if servers < 1:
        raise ConnpubError(f"servers must be >= 1, got {servers}")
    if (trace["end_ns"] < trace["start_ns"]).any():
        raise ConnpubError("the trace has flows ending before they start; regenerate it")
    if (np.diff(trace["start_ns"]) < 0).any():
        trace = trace[np.argsort(trace["start_ns"], kind="stable")]
    n = trace.size
    keys = flow_keys(trace)
    start = trace["start_ns"].astype(np.int64)
    end = trace["end_ns"].astype(np.int64)
    # a TCP flow ending with the client's FIN/RST: the server stops renewing it at that packet
    # and the LB marks it closed there. Kernel truth ([liveness] tcp = "kernel", the server
    # agent's tracepoint table): every TCP flow's socket closes at its end (the trace has no
    # other end for it), the server knows at once, and no quiet gap ends it before; UDP (and
    # TCP by packets) is over for the server only after its idle limit (policy.liveness)
    tcp = trace["proto"] == PROTO_TCP
    client_closed = tcp & ((trace["tcp_flags"] & (TCP_FIN | TCP_RST)) != 0)
    times = FlowTimes.from_config(cfg)
    idle_ns = idle_limit_ns(trace, trace, times)
    kernel_tcp = tcp & times.tcp_kernel
    server_close = np.where(client_closed | kernel_tcp, end, end + idle_ns)

    class_keys_all = np.zeros(n, CLASS_KEY_DTYPE)
    class_keys_all["vip_addr"] = trace["vip_addr"]
    class_keys_all["vip_port"] = trace["vip_port"]
    class_keys_all["proto"] = trace["proto"]
    class_id, classes = group_ids(class_words(trace))
    first_of_class = np.zeros(classes, np.int64)
    first_of_class[class_id[::-1]] = np.arange(n)[::-1]
    class_keys = class_keys_all[first_of_class]

    table = maglev.build_table([f"server{i + 1}" for i in range(servers)])
    flags = maglev.VIP_F_HASH_CLIENT_ONLY if hash_client_only else 0
    byte_table = mask_byte_table(cfg.masks.specs)
    # per level: the dense rank of each flow's masked tuple (its 5 words), kept instead of the
    # words (memory: 8 bytes a flow and level instead of 40)
    masked_rank = np.empty((LEVEL_COUNT, n), np.int64)
    backend_by_start = np.empty((LEVEL_COUNT, n), np.uint32)
    for level in range(LEVEL_COUNT):
        masked = keys if level == 0 else apply_masks(keys, level, byte_table)
        words = np.ascontiguousarray(masked).view(np.uint8).reshape(n, 40).view("<u8")
        if level > 0:
            masked_rank[level] = group_ids(words)[0]
        # the LB's Maglev pick: over the tuple at level 0, over the masked tuple at 1-3
        backend_by_start[level] = (table[maglev.slots_of(masked, vip_flags=flags)] + 1
                                   ).astype(np.uint32)
        del masked, words
    backend_id = backend_by_start[0].copy()

    # a slot per (level, masked tuple, backend) over every start level's backend, numbered in
    # the order of (masked tuple words, backend): the rank joined with the backend keeps it
    slots_by_start = np.empty((LEVEL_COUNT, LEVEL_COUNT, n), np.int64)
    slots_by_start[:, 0] = np.arange(n)
    offset = n
    radix = np.int64(servers + 1)
    for level in range(1, LEVEL_COUNT):
        joined = masked_rank[level][None, :] * radix + backend_by_start.astype(np.int64)
        values, ids = np.unique(joined.reshape(-1), return_inverse=True)
        slots_by_start[:, level] = ids.reshape(LEVEL_COUNT, n) + offset
        offset += values.size
        del joined, values, ids
    del masked_rank
    slots = slots_by_start[0].copy()

    first_n = trace["first_n"].astype(np.int64)
    iat = trace["first_iat_ns"].astype(np.int64)
    sketch = start[:, None] + np.cumsum(iat, axis=1)
    sketch = np.where(np.arange(FIRST_N)[None, :] < first_n[:, None], sketch, NO_ARRIVAL)
    sketch = np.minimum(sketch, end[:, None])
    sketch_end = np.minimum(start + iat.sum(axis=1), end)
    regular = np.maximum(trace["packets"].astype(np.int64) - first_n, 0)
    duration_s = np.maximum((end - start) / NS_PER_S, 1e-3)
    # the longest silence of each flow under the arrival model of next_arrival_ns: between
    # first packets, or between the evenly spread later ones (or up to the last packet)
    sketch_gap = np.where(np.arange(FIRST_N)[None, :] < first_n[:, None], iat, 0).max(axis=1)
    regular_gap = np.where(regular > 0, -(-(end - sketch_end) // np.maximum(regular, 1)),
                           end - sketch_end)
    may_idle = (np.maximum(sketch_gap, regular_gap) + 1 >= idle_ns) & ~kernel_tcp

    if priors is None:
        priors = client_priors(trace)
    return SimFlows(
        trace=trace, keys=keys, start_ns=start, end_ns=end, server_close_ns=server_close,
        client_closed=client_closed,
        class_id=class_id, class_keys=class_keys, backend_id=backend_id, slots=slots,
        slot_count=offset, backend_by_start=backend_by_start, slots_by_start=slots_by_start,
        sketch_ns=sketch, sketch_end_ns=sketch_end, regular_packets=regular,
        byte_rate=trace["bytes"].astype(np.float64) / duration_s, priors=priors, may_idle=may_idle,
        idle_limit_ns=idle_ns,
    )
