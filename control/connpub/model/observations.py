"""Flow-table rows as the model's inputs (docs/model.md, "Predictive mode"): the first-packet
sketch as sums, the client-prior index (the client's finished flows before now) and model
features of FLOW_KEY_DTYPE keys / FLOW_VALUE_DTYPE rows; also a flow table of a trace at a time
(tests, bench)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from connpub.datapath.abi import FLOW_KEY_DTYPE, FLOW_VALUE_DTYPE, SKETCH_PACKETS
from connpub.errors import ConnpubError
from connpub.model.features import ClientHistory, compute_features, is_ipv4_mapped

NS_PER_S = 1_000_000_000


def sketch_summary(values: np.ndarray) -> dict[str, np.ndarray]:
    """The first-packet sketch of FLOW_VALUE_DTYPE rows as the model's sums: first_n, size
    sum / sum of squares / max (inner IP lengths), gap sum / max in ns (gap i is the time since
    packet i-1; entry 0 is not a gap). Same mapping as the agent's finished-flow history."""
    count = np.minimum(values["sketch_count"], SKETCH_PACKETS)
    column = np.arange(SKETCH_PACKETS, dtype=np.uint8)
    in_sketch = column[None, :] < count[:, None]
    sizes = values["sketch_size"] * in_sketch  # uint16
    gaps_us = values["sketch_gap_us"] * (in_sketch & (column[None, :] >= 1))  # uint32
    sizes64 = sizes.astype(np.int64)
    return {
        "first_n": count.astype(np.int64),
        "first_size_sum": sizes.sum(axis=1, dtype=np.int64),
        "first_size_sumsq": np.einsum("ij,ij->i", sizes64, sizes64),
        "first_size_max": sizes.max(axis=1, initial=0).astype(np.int64),
        "first_iat_sum_ns": gaps_us.sum(axis=1, dtype=np.int64) * 1000,
        "first_iat_max_ns": gaps_us.max(axis=1, initial=0).astype(np.int64) * 1000,
    }


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hash_words(words: np.ndarray) -> np.ndarray:
    """(n, w) uint64 -> (n,) uint64, chained splitmix64 over the columns."""
    state = np.zeros(words.shape[0], np.uint64)
    for column in range(words.shape[1]):
        state = _mix64(state ^ words[:, column])
    return state


@dataclass
class ClientPriorIndex:
    """ClientHistory prepared once for many lookups: per client (a 64-bit hash of its 16-byte
    address), its flows' end times sorted, with cumulative log durations. `lookup` answers a
    batch with two `searchsorted` (no sort per call), same results as ClientHistory.lookup."""

    client_hash: np.ndarray  # sorted unique client hashes
    client_start: np.ndarray  # first position of each client in `composite`
    composite: np.ndarray  # client rank * span + (end - t_min) // unit, sorted
    cumulative: np.ndarray  # cumulative log duration in `composite` order, leading 0
    t_min: int
    unit: int
    span: int
    records: int

    @classmethod
    def from_client_history(cls, history: ClientHistory) -> ClientPriorIndex:
        n = int(history.end_ns.size)
        if n == 0:
            empty = np.zeros(0, np.int64)
            return cls(np.zeros(0, np.uint64), empty, empty, np.zeros(1), 0, 1, 1, 0)
        hashes = _address_hash(history.client_addr)
        client_hash, rank = np.unique(hashes, return_inverse=True)
        rank = rank.reshape(-1).astype(np.int64)
        end = history.end_ns.astype(np.int64)
        t_min, t_max = int(end.min()), int(end.max())
        # room for the client rank times the time span in int63; a query time is clipped into
        # [t_min - unit, t_max] so it never leaves its client's segment
        unit = max(1, -(-(t_max - t_min + 2) * (client_hash.size + 1) // (2**62)))
        span = (t_max - t_min) // unit + 3
        order = np.lexsort((end, rank))
        composite = rank[order] * span + (end[order] - t_min) // unit + 1
        cumulative = np.concatenate([[0.0], np.cumsum(history.log_duration_s[order])])
        client_start = np.searchsorted(composite, np.arange(client_hash.size) * span)
        return cls(client_hash, client_start, composite, cumulative, t_min, unit, span, n)

    @classmethod
    def from_history(cls, records: np.ndarray) -> ClientPriorIndex:
        """From HISTORY_DTYPE records (times on CLOCK_MONOTONIC, as the agent writes them)."""
        return cls.from_client_history(ClientHistory.from_history(records))

    def lookup(self, client_addr: np.ndarray, now_ns) -> tuple[np.ndarray, np.ndarray]:
        """Per query: (flows of the client that ended at or before now, their mean log
        duration in s; 0 when none)."""
        hashes = _address_hash(client_addr)
        m = hashes.size
        count = np.zeros(m, np.int64)
        mean = np.zeros(m)
        if self.records == 0 or m == 0:
            return count, mean
        rank = np.minimum(np.searchsorted(self.client_hash, hashes), self.client_hash.size - 1)
        known = self.client_hash[rank] == hashes
        if not known.any():
            return count, mean
        rank = rank[known].astype(np.int64)
        if np.ndim(now_ns) == 0 and self.client_hash.size <= rank.size:
            # one time for the whole table (the agent's tick): answer once per client
            # (sorted needles: cache friendly), then gather
            per_count, per_mean = self._at(np.arange(self.client_hash.size, dtype=np.int64),
                                           np.int64(now_ns))
            count[known], mean[known] = per_count[rank], per_mean[rank]
            return count, mean
        now = np.broadcast_to(np.asarray(now_ns, np.int64), (m,))[known]
        count[known], mean[known] = self._at(rank, now)
        return count, mean

    def _at(self, rank: np.ndarray, now) -> tuple[np.ndarray, np.ndarray]:
        """(count, mean log duration) of clients `rank` at time(s) `now`."""
        offset = (np.clip(now, self.t_min - self.unit, None) - self.t_min) // self.unit + 1
        offset = np.minimum(offset, self.span - 1)
        pos = np.searchsorted(self.composite, rank * self.span + offset, side="right")
        first = self.client_start[rank]
        count = pos - first
        total = self.cumulative[pos] - self.cumulative[first]
        return count, np.divide(total, count, out=np.zeros(count.size), where=count > 0)


def _address_hash(addrs: np.ndarray) -> np.ndarray:
    words = np.ascontiguousarray(addrs, dtype=np.uint8).reshape(-1, 16).view(np.uint64)
    return hash_words(words)


def flow_observations(keys: np.ndarray, values: np.ndarray, now_ns: int,
                      client_priors: ClientPriorIndex | None = None,
                      clock_offset_ns: int = 0) -> dict[str, np.ndarray]:
    """compute_features inputs (features.OBSERVATION_FIELDS) of flow-table rows at now_ns
    (datapath clock): age = now - first_seen, bytes/packets so far, the sketch as sums, TCP
    flags seen so far, the client's finished flows before now (the history is on
    CLOCK_MONOTONIC: now + clock_offset_ns)."""
    if len(keys) != len(values):
        raise ConnpubError(f"{len(keys)} keys but {len(values)} values")
    age_ns = np.maximum(np.int64(now_ns) - values["first_seen_ns"].astype(np.int64), 0)
    obs: dict[str, np.ndarray] = {
        "age_s": age_ns / NS_PER_S,
        "proto": keys["proto"],
        "vip_port": keys["vip_port"].astype(np.int64),  # network order in the key
        "first_tcp_flags": values["tcp_flags"],
        "bytes": values["bytes"],
        "packets": values["packets"],
        "client_ipv6": ~is_ipv4_mapped(keys["client_addr"]),
    }
    obs.update(sketch_summary(values))
    if client_priors is not None:
        prior_count, prior_mean = client_priors.lookup(keys["client_addr"],
                                                       np.int64(now_ns + clock_offset_ns))
    else:
        prior_count, prior_mean = np.zeros(len(keys), np.int64), np.zeros(len(keys))
    obs["client_prior_count"], obs["client_prior_log_duration"] = prior_count, prior_mean
    return obs


def flow_features(keys: np.ndarray, values: np.ndarray, now_ns: int,
                  client_priors: ClientPriorIndex | None = None,
                  clock_offset_ns: int = 0) -> np.ndarray:
    """(n, N_FEATURES) float32 model features of FLOW_KEY_DTYPE keys / FLOW_VALUE_DTYPE rows."""
    return compute_features(flow_observations(keys, values, now_ns, client_priors,
                                              clock_offset_ns))


def table_snapshot(trace: np.ndarray, now_ns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, values, rows of `trace`) of the flows of a FLOW_DTYPE trace alive at now_ns, as
    the server's flow table would hold them (snapshot_rows at one time).
    Closed flows (end <= now) are not included. For tests and bench."""
    alive = np.flatnonzero((trace["start_ns"] <= now_ns) & (trace["end_ns"] > now_ns))
    keys, values = snapshot_rows(trace[alive], np.full(alive.size, now_ns, np.int64))
    return keys, values, alive


def snapshot_rows(flows: np.ndarray, now_ns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FLOW_KEY_DTYPE keys, FLOW_VALUE_DTYPE values) of each flow at its own time now_ns[i],
    as the server's flow table holds it then: the sketch packets that arrived by now, the
    bytes/packets after the sketch spread evenly up to the end, last seen = the latest of those
    arrivals, TCP flags = those of the first packets. A flow without a sketch (first_n = 0,
    flow logs) has all its packets spread evenly from its start."""
    n = flows.size
    now = np.asarray(now_ns, np.int64).reshape(-1)
    if now.size == 1 and n != 1:
        now = np.full(n, now[0], np.int64)
    keys = np.zeros(n, FLOW_KEY_DTYPE)
    for name in ("client_addr", "vip_addr", "client_port", "vip_port", "proto"):
        keys[name] = flows[name]
    values = np.zeros(n, FLOW_VALUE_DTYPE)
    start = flows["start_ns"].astype(np.int64)
    arrival = start[:, None] + np.cumsum(flows["first_iat_ns"].astype(np.int64), axis=1)
    in_sketch = (np.arange(SKETCH_PACKETS)[None, :] < flows["first_n"][:, None].astype(np.int64))
    arrived = in_sketch & (arrival <= now[:, None])
    sketched = arrived.sum(axis=1)
    values["sketch_count"] = sketched
    values["sketch_size"] = np.where(arrived, flows["first_sizes"], 0)
    values["sketch_gap_us"] = np.where(arrived, flows["first_iat_ns"] // 1000, 0)
    sketch_bytes = np.where(arrived, flows["first_sizes"], 0).astype(np.float64).sum(axis=1)
    sketch_end = np.where(in_sketch, arrival, start[:, None]).max(axis=1)
    complete = sketched >= flows["first_n"].astype(np.int64)
    end = flows["end_ns"].astype(np.int64)
    fraction = np.where(complete, np.clip((now - sketch_end) / np.maximum(end - sketch_end, 1),
                                          0.0, 1.0), 0.0)
    rest_packets = np.maximum(flows["packets"].astype(np.int64) - flows["first_n"], 0)
    rest_bytes = np.maximum(flows["bytes"].astype(np.float64)
                            - flows["first_sizes"].astype(np.float64).sum(axis=1), 0.0)
    later = np.floor(rest_packets * fraction).astype(np.int64)
    no_sketch = flows["first_n"] == 0
    later = np.where(no_sketch, np.maximum(later, 1), later)  # a logged flow has its 1st packet
    values["packets"] = sketched + later
    values["bytes"] = np.round(sketch_bytes + rest_bytes * np.where(
        rest_packets > 0, np.minimum(later / np.maximum(rest_packets, 1), 1.0), 0.0)
    ).astype(np.uint64)
    gap = (end - sketch_end) / np.maximum(rest_packets, 1)
    last_regular = sketch_end + np.round(later * gap).astype(np.int64)
    last_sketch = np.where(arrived, arrival, start[:, None]).max(axis=1)
    values["last_seen_ns"] = np.where(later > 0, np.minimum(last_regular, now), last_sketch)
    values["first_seen_ns"] = start
    values["tcp_flags"] = flows["first_tcp_flags"]
    return keys, values
