"""Decision samples: every flow the agent decides, at its decision ages and sketch states,
through the agent's own flow-table -> features path."""

from __future__ import annotations

import numpy as np
import pytest
from connpub.errors import ConnpubError
from connpub.model import predictive as pr
from connpub.model.features import FEATURE_NAMES
from connpub.model.samples import decision_ages_s, sample_flows, snapshot_rows
from connpub.traffic import workload as wl

S = 1_000_000_000
COL = {name: i for i, name in enumerate(FEATURE_NAMES)}


def one_flow(duration_s: float, gaps_s: float = 0.2, first_n: int = 8, packets: int = 40):
    """A TCP flow to port 443 whose first packets come gaps_s apart."""
    flows = np.zeros(1, wl.FLOW_DTYPE)
    flows["client_addr"] = wl.ipv4_mapped(10, 0, 0, 1)
    flows["vip_addr"] = wl.ipv4_mapped(10, 0, 0, 2)
    flows["client_port"], flows["vip_port"], flows["proto"] = 40000, 443, 6
    flows["start_ns"] = 5 * S
    flows["end_ns"] = 5 * S + round(duration_s * S)
    flows["first_n"], flows["packets"] = first_n, packets
    flows["first_sizes"][0, :first_n] = 100 + 10 * np.arange(first_n)
    flows["first_iat_ns"][0, 1:first_n] = round(gaps_s * S)
    flows["bytes"] = int(flows["first_sizes"].sum()) + 100 * (packets - first_n)
    flows["first_tcp_flags"] = wl.TCP_SYN
    return flows


def test_decision_schedule():
    duration = np.array([0.0, 0.5, 3.0, 100.0, 1e9])
    rows, ages = decision_ages_s(duration, 1.0, seed=3)
    first = np.random.default_rng(3).uniform(0, 1, 5)
    for flow in range(5):
        mine = np.sort(ages[rows == flow])
        expected = first[flow] + (2.0 ** np.arange(17) - 1.0)
        expected = expected[expected < duration[flow]]
        assert np.allclose(mine, expected), flow
    assert (rows == 0).sum() == 0  # ended before its first tick: never decided
    with pytest.raises(ConnpubError, match="positive"):
        decision_ages_s(duration, 0.0, seed=0)


def test_partial_sketch_at_the_first_tick():
    flows = one_flow(60.0)
    keys, values = snapshot_rows(flows, np.array([5 * S + round(0.5 * S)]))
    assert values["sketch_count"][0] == 3  # packets at 0, 0.2, 0.4 s
    assert values["packets"][0] == 3 and values["bytes"][0] == 100 + 110 + 120
    assert values["sketch_size"][0].tolist() == [100, 110, 120, 0, 0, 0, 0, 0]
    assert values["sketch_gap_us"][0].tolist() == [0, 200_000, 200_000, 0, 0, 0, 0, 0]
    samples = sample_flows(flows, priors_from_flows=False, seed=1)
    first_age = samples.age_s.min()
    first = samples.features[np.argmin(samples.age_s)]
    assert first[COL["first_n"]] == min(8, 1 + int(first_age / 0.2))
    assert first[COL["sketch_missing"]] == 0
    later = samples.features[samples.age_s > 2.0]
    assert (later[:, COL["first_n"]] == 8).all()


def test_flows_shorter_than_their_sketch_are_sampled():
    short = one_flow(0.9, gaps_s=0.5, first_n=2, packets=2)  # 2 packets over 0.5 s
    samples = sample_flows(short, priors_from_flows=False, seed=0)
    first_tick = np.random.default_rng(0).uniform(0, 1, 1)[0]
    assert first_tick < 0.9
    assert samples.age_s.tolist() == [pytest.approx(first_tick)]
    assert samples.features[0, COL["first_n"]] == (2 if first_tick >= 0.5 else 1)
    assert samples.log_remaining_s[0] == pytest.approx(np.log(0.9 - first_tick))


def test_flows_without_sketch_are_marked():
    logged = one_flow(30.0, first_n=0, packets=30)
    logged["first_sizes"], logged["first_iat_ns"], logged["bytes"] = 0, 0, 3000
    samples = sample_flows(logged, priors_from_flows=False)
    assert (samples.features[:, COL["sketch_missing"]] == 1).all()
    assert (samples.features[:, COL["first_n"]] == 0).all()
    packets = np.expm1(samples.features[:, COL["log_packets"]].astype(np.float64))
    assert (packets >= 1).all() and np.all(np.diff(packets[np.argsort(samples.age_s)]) >= 0)


def test_samples_are_what_the_agent_computes():
    flows = wl.generate("mixed", 400, seed=9)
    samples = sample_flows(flows, priors_from_flows=False, seed=2)
    for i in (0, 17, 123, samples.age_s.size - 1):
        flow = flows[samples.flow_index[i]: samples.flow_index[i] + 1]
        now = int(flow["start_ns"][0]) + round(samples.age_s[i] * S)
        keys, values, alive = pr.table_snapshot(flow, now)
        assert alive.tolist() == [0]
        agent = pr.flow_features(keys, values, now)
        assert np.allclose(agent[0], samples.features[i], rtol=1e-6), i
