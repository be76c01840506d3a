"""The lab's stale-state measure (connpub.lab.measure.LeaseSampler), on samples made by hand: a
closed flow's own lease and an aggregate's own entry that covers no open flow both count, as in
the simulator (docs/simulator.md). No maps, no root."""

from __future__ import annotations

import ipaddress

import numpy as np
from connpub.datapath import lbctl
from connpub.datapath.abi import FLOW_KEY_DTYPE
from connpub.datapath.masks import apply_masks
from connpub.lab.measure import SAMPLE_EVERY_S, LeaseSampler

S = 1_000_000_000


def _keys(*flows: tuple[str, int]) -> np.ndarray:
    keys = np.zeros(len(flows), FLOW_KEY_DTYPE)
    for row, (client, port) in enumerate(flows):
        keys["client_addr"][row] = np.frombuffer(
            bytes(10) + b"\xff\xff" + ipaddress.ip_address(client).packed, np.uint8)
        keys["vip_addr"][row] = np.frombuffer(
            bytes(10) + b"\xff\xff" + ipaddress.ip_address("10.200.0.1").packed, np.uint8)
        keys["client_port"][row], keys["vip_port"][row], keys["proto"][row] = port, 80, 6
    return keys


def test_an_aggregate_counts_stale_while_it_covers_no_open_flow():
    flows = _keys(("198.18.7.10", 1000), ("198.18.7.10", 1001), ("198.18.9.10", 1002))
    started = np.array([0, 0, 0]) * S
    closed = np.array([10, 20, 2]) * S
    level2 = lbctl.agg_lease_keys(2, apply_masks(flows[:1], 2))  # covers the first two
    level3 = lbctl.agg_lease_keys(3, apply_masks(flows[2:], 3))  # covers the third
    sampler = LeaseSampler(pin_dir=None)
    # the third flow holds its own lease at 5 s, three seconds after its close
    conns_valid = [np.array([False, False, True]), np.zeros(3, bool), np.zeros(3, bool)]
    for now_s, own, valid in zip((5, 15, 25), (np.concatenate([level2, level3]), level2,
                                               level2), conns_valid, strict=True):
        sampler.times_ns.append(now_s * S)
        sampler.keys.append(flows)
        sampler.valid.append(valid)
        sampler.own.append(own)
    # 5 s: the third flow's lease + the level-3 aggregate; 15 s: none (the second flow is
    # open); 25 s: the level-2 aggregate
    assert sampler.stale_flow_seconds(flows, closed, started) == 3 * SAMPLE_EVERY_S
    assert sampler.stale_flow_seconds(flows, closed) == 1 * SAMPLE_EVERY_S
    assert sampler.any_valid(flows[:1])
