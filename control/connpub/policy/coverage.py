"""The coverage rule: is a connection the LB holds covered by a lease now (docs/policy.md,
"Coverage"). The datapath is the truth: this is bpf/lb/lb.c (leased_backend,
aggregate_keeps_alive) for arrays of connections, used by the LB agent, the lab's lease
sampler and the simulator.

A connection is covered at `now` when its own lease has not expired (now < lease_expiry_ns),
or, if the client has not sent FIN/RST (CONN_F_CLIENT_CLOSED), when a valid aggregate lease of
its 5-tuple masked at any level 1-3 exists for its backend. The datapath tries the flow's own
level, then its VIP's current level, then the other levels, and the level that hits becomes the
connection's level (`covering_level`). Time is always passed in."""

from __future__ import annotations

import numpy as np

from connpub.datapath.masks import LEVEL_COUNT

NO_LEVEL = -1  # covering_level: no aggregate level covers the connection
AGGREGATE_LEVELS = tuple(range(1, LEVEL_COUNT))


def aggregate_held_until(agg_expiry_ns: np.ndarray, client_closed: np.ndarray) -> np.ndarray:
    """Per connection, until when an aggregate lease keeps it alive: the latest expiry over the
    levels 1-3 (columns 1.. of `agg_expiry_ns`, shape (n, LEVEL_COUNT); column 0 unused, 0 where
    no aggregate lease exists), 0 for connections whose client closed."""
    agg = np.asarray(agg_expiry_ns, np.int64)
    if agg.ndim != 2 or agg.shape[1] != LEVEL_COUNT:
        raise ValueError(f"agg_expiry_ns must have shape (n, {LEVEL_COUNT}), got {agg.shape}")
    # column by column: a reduction along a 3-wide axis is far slower in numpy
    latest = agg[:, 1]
    for level in range(2, LEVEL_COUNT):
        latest = np.maximum(latest, agg[:, level])
    return np.where(np.asarray(client_closed, bool), 0, latest)


def held_until(own_expiry_ns: np.ndarray, client_closed: np.ndarray,
               agg_expiry_ns: np.ndarray) -> np.ndarray:
    """Per connection, until when the LB forwards it on a lease (own or aggregate): the
    verdict of `covered` is `now < held_until` for every now (no lease is renewed meanwhile)."""
    own = np.asarray(own_expiry_ns, np.int64)
    return np.maximum(own, aggregate_held_until(agg_expiry_ns, client_closed))


def covered(own_expiry_ns: np.ndarray, client_closed: np.ndarray, agg_expiry_ns: np.ndarray,
            now_ns: int) -> np.ndarray:
    """True for connections the LB datapath forwards on a lease at now_ns (no lease miss)."""
    return held_until(own_expiry_ns, client_closed, agg_expiry_ns) > np.int64(now_ns)


def covering_level(own_level: np.ndarray, vip_level: np.ndarray, client_closed: np.ndarray,
                   agg_expiry_ns: np.ndarray, now_ns: int) -> np.ndarray:
    """The aggregate level whose lease keeps each connection alive in the datapath's search
    order (own level, VIP level, then 1, 2, 3), NO_LEVEL when none does (or the client closed).
    The datapath stores this level in the connection on a hit."""
    agg = np.asarray(agg_expiry_ns, np.int64)
    n = agg.shape[0]
    valid = agg > np.int64(now_ns)
    valid[:, 0] = False
    out = np.full(n, NO_LEVEL, np.int64)
    rows = np.arange(n)
    for candidate in (np.asarray(own_level, np.int64), np.asarray(vip_level, np.int64),
                      *(np.full(n, level, np.int64) for level in AGGREGATE_LEVELS)):
        usable = (out == NO_LEVEL) & (candidate > 0) & (candidate < LEVEL_COUNT)
        hit = usable & valid[rows, np.clip(candidate, 0, LEVEL_COUNT - 1)]
        out[hit] = candidate[hit]
    out[np.asarray(client_closed, bool)] = NO_LEVEL
    return out
