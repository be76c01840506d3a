"""The server agent's pure selection: which flows and aggregates are published, which are
finished, which get a CLOSED entry, what a DIRECTIVE changes. Arrays in, arrays out, time
passed in. Liveness itself (kernel socket truth, idle horizons): connpub.policy.liveness.
docs/agents.md."""

from __future__ import annotations

import numpy as np

from connpub.arrays import join
from connpub.arrays import void_view as _void
from connpub.config import Config
from connpub.datapath.abi import CLASS_KEY_DTYPE, PUBLISH_ENTRY_DTYPE
from connpub.datapath.lbmaps import class_keys_of
from connpub.datapath.masks import LEVEL_COUNT
from connpub.policy.lease import NS_PER_S, baseline_lease_ns
from connpub.policy.liveness import (  # noqa: F401 - re-exported for the agent and tests
    FlowTimes,
    aggregate_idle_limit_ns,
    aggregates_with_live,
    flow_states,
    idle_ns,
)
from connpub.policy.renewal import closed_wanted

PROTO_UDP = 17
MODES_AGGREGATING = ("adaptive", "full")


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


def _aggregate_live(agg_keys: np.ndarray, agg_values: np.ndarray, now_ns: int,
                    times: FlowTimes, with_live: np.ndarray | None) -> np.ndarray:
    quiet = idle_ns(agg_values["last_seen_ns"], now_ns) <= aggregate_idle_limit_ns(agg_keys,
                                                                                   times)
    return quiet if with_live is None else quiet | with_live


def aggregates_to_publish(agg_keys: np.ndarray, agg_values: np.ndarray, now_ns: int,
                          times: FlowTimes, listen_port: int,
                          with_live: np.ndarray | None = None) -> np.ndarray:
    """Indices of the aggregates (folded over CPUs) published: levels 1-3, with active member
    flows and either activity within their idle limit (UDP: the longest UDP horizon; a UDP
    aggregate never counts down) or a live member (`with_live`: an idle open TCP connection)."""
    level = agg_keys["level"]
    masked = agg_keys["masked"]
    live = (agg_values["active_flows"] > 0) & _aggregate_live(agg_keys, agg_values, now_ns,
                                                              times, with_live)
    ok = (level >= 1) & (level < LEVEL_COUNT) & ~own_traffic(masked, listen_port)
    return np.flatnonzero(live & ok)


def stale_aggregates(agg_keys: np.ndarray, agg_values: np.ndarray, now_ns: int,
                     times: FlowTimes, with_live: np.ndarray | None = None) -> np.ndarray:
    """Indices of aggregates to delete: none with a live member, and no active flow and quiet
    for the linger time, or quiet past their idle limit (their member flows are finished)."""
    idle = idle_ns(agg_values["last_seen_ns"], now_ns)
    stale = (((agg_values["active_flows"] <= 0) & (idle > times.linger_ns))
             | (idle > aggregate_idle_limit_ns(agg_keys, times)))
    if with_live is not None:
        stale &= ~with_live
    return np.flatnonzero(stale)


def closed_in_adaptive(keys: np.ndarray, values: np.ndarray, finished: np.ndarray,
                       now_ns: int, cfg: Config) -> np.ndarray:
    """Adaptive mode (no planner): the finished flows that get a CLOSED entry, by the one CLOSED
    rule (policy.renewal.closed_wanted). A flow's own lease here is the baseline one, renewed
    at the previous cycle like every live flow's, so only the aggregated ones (level > 0) that
    ended by going idle (UDP, TCP without FIN/RST) qualify: their aggregate's renewals would
    keep them alive. A flow that ended with the client's FIN/RST (`closed`) gets none: the LB
    saw that packet too and no aggregate covers it any more."""
    candidates = np.flatnonzero(finished & (values["closed"] == 0))
    renewed_last_cycle_ns = now_ns - round(cfg.publish.interval_s * NS_PER_S)
    held_expiry_ns = np.full(candidates.size, renewed_last_cycle_ns + baseline_lease_ns(cfg))
    cohort = ~own_traffic(keys[candidates], cfg.agent.listen_port)
    send = closed_wanted(now_ns, held_expiry_ns, values["level"][candidates] > 0, cohort, cfg)
    return candidates[send]


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


NEVER_NS = np.iinfo(np.int64).min // 2  # "changed long ago"


def flow_class_levels(keys: np.ndarray, class_keys: np.ndarray, class_levels: np.ndarray,
                      default_level: int = 0, changed_ns: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(level, when it last changed) of each flow's class in class_levels (its keys and
    levels, changed_ns per key: default long ago; a class without an entry has the default
    level, set long ago)."""
    current = np.full(len(keys), default_level, np.int64)
    since = np.full(len(keys), NEVER_NS, np.int64)
    found, rows = join(np.asarray(class_keys, CLASS_KEY_DTYPE), class_keys_of(keys))
    if found.any():
        current[found] = np.asarray(class_levels).reshape(-1)[rows[found]]
        if changed_ns is not None:
            since[found] = np.asarray(changed_ns, np.int64).reshape(-1)[rows[found]]
    return current, since


def level_changes(current_keys: np.ndarray, current_levels: np.ndarray, class_keys: np.ndarray,
                  levels: np.ndarray, default_level: int = 0) -> np.ndarray:
    """True where a directive changes a class's level (a class without an entry in
    class_levels has the default level)."""
    current = np.full(len(class_keys), default_level, np.uint8)
    found, rows = join(current_keys, class_keys)
    if found.any():
        current[found] = np.asarray(current_levels).reshape(-1)[rows[found]]
    return current != np.asarray(levels, np.uint8)


