"""The simulator's parallel path (connpub.sim.parallel, docs/simulator.md "Scale") gives
exactly the serial path's metrics: shards by (VIP, protocol) run in worker processes and add up
to the run of one process over all flows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from connpub.config import MODES
from connpub.sim import ModelPredictor, SimOptions, condition_trace, prepare, simulate_flows
from connpub.sim.engine import SERIES, ModeRun
from connpub.sim.parallel import shard_rows, simulate_parallel
from connpub.traffic import workload
from connpub.traffic.workload import NS_PER_S
from test_sim import ALL_COHORT, PERMISSIVE  # every class in the cohort; aggregating levels

# the defaults without the spread bound (which couples every VIP of a service: no shards)
UNBOUND = dataclasses.replace(ALL_COHORT, granularity=dataclasses.replace(
    ALL_COHORT.granularity, max_spread=1000.0))


@pytest.fixture(scope="module")
def trace() -> np.ndarray:
    return condition_trace(workload.generate("mixed", 6000, seed=3, window_s=180.0),
                           ALL_COHORT)[0]


def _same(serial: dict, parallel: dict) -> None:
    """Every metric and every per-step series equal (sim_seconds is a wall time)."""
    assert serial.keys() == parallel.keys()
    for mode in serial:
        a, b = dict(serial[mode]), dict(parallel[mode])
        for name in ("sim_seconds", "parallel"):
            a.pop(name, None)
            b.pop(name, None)
        series_a, series_b = a.pop("series"), b.pop("series")
        assert a == b, mode
        assert series_a.keys() == series_b.keys()
        for name in series_a:
            np.testing.assert_array_equal(series_a[name], series_b[name], err_msg=name)


@pytest.mark.parametrize("cfg", [ALL_COHORT, UNBOUND, PERMISSIVE],
                         ids=["defaults", "unbound", "aggregating"])
def test_sharded_run_equals_serial_run(trace, cfg):
    # defaults: the spread bound (max_spread below the servers) couples every VIP, decided
    # over all shards at every evaluation (sim.parallel._Coordinator)
    serial = simulate_flows(prepare(trace, cfg), MODES, cfg)
    # the model built in the workers (defaults) or inherited from this process (aggregating)
    predictor = ModelPredictor() if cfg is PERMISSIVE else None
    parallel = simulate_parallel(trace, MODES, cfg, predictor=predictor, workers=2, shards=5)
    assert {r["parallel"]["shards"] for r in parallel.values()} == {5}
    _same(serial, parallel)
    # the run exercised what couples shards: packets shared by VIPs, predictions, levels
    assert serial["full"]["model"]["predictions"] > 1000
    assert serial["full"]["publish_packets_per_s"] > 0
    if cfg is ALL_COHORT:  # the bound refined classes (without it, this trace is all level 3;
        # 0.038 of the flow-steps at level 2 with the /25 subnet level, 0.05+ with a /24)
        assert serial["adaptive"]["level_share"][2] > 0.02
    if cfg is PERMISSIVE:
        assert serial["full"]["totals"]["aggregate_entries"] > 0
        assert serial["adaptive"]["totals"]["directive_writes"] > 0


def test_shards_are_whole_vip_protocol_groups(trace):
    shards = shard_rows(trace, ALL_COHORT, SimOptions(), 3)  # spread bound included
    assert len(shards) == 3
    rows = np.concatenate(shards)
    np.testing.assert_array_equal(np.sort(rows), np.arange(trace.size))
    group = [bytes(v) + bytes([p]) for v, p in zip(trace["vip_addr"], trace["proto"],
                                                  strict=True)]
    owner = {}
    for index, shard in enumerate(shards):
        assert (np.diff(shard) > 0).all()  # start order kept inside a shard
        for row in shard:
            assert owner.setdefault(group[row], index) == index
    # with loss the draws follow one run's packets: a mode is never split
    assert len(shard_rows(trace, ALL_COHORT, SimOptions(loss=0.1), 3)) == 1


def test_loss_runs_modes_whole_and_equal(trace):
    options = SimOptions(loss=0.2, seed=5)
    serial = simulate_flows(prepare(trace, ALL_COHORT), ["baseline", "full"], ALL_COHORT,
                            options)
    parallel = simulate_parallel(trace, ["baseline", "full"], ALL_COHORT, options, workers=2)
    assert parallel["full"]["parallel"]["shards"] == 1
    assert serial["full"]["totals"]["lost_packets"] > 0
    _same(serial, parallel)


def test_map_pressure_across_shards_is_decided_over_all_shards(trace):
    # a table so small that the shards' summed occupancy forces levels a shard alone would not
    options = SimOptions(lb_capacity=400)
    serial = simulate_flows(prepare(trace, PERMISSIVE), ["adaptive"], PERMISSIVE, options)
    parallel = simulate_parallel(trace, ["adaptive"], PERMISSIVE, options, workers=2, shards=4)
    assert parallel["adaptive"]["parallel"]["shards"] == 4
    _same(serial, parallel)
    # the shards alone would have decided otherwise: the pressure levels of 1/4 the table
    alone = simulate_flows(prepare(trace, PERMISSIVE), ["adaptive"], PERMISSIVE,
                           dataclasses.replace(options, lb_capacity=100))
    assert alone["adaptive"]["level_share"] != serial["adaptive"]["level_share"]


@pytest.mark.parametrize("cfg", [ALL_COHORT, PERMISSIVE], ids=["defaults", "aggregating"])
def test_parked_members_give_the_reference_run(trace, cfg, monkeypatch):
    """The fast path parks ended aggregate members out of the per-step arrays (ModeRun.
    park_ended_members, docs/simulator.md "Scale"); the reference keeps them in `active`:
    every metric and per-step series must be equal, and flows must actually have been
    parked (else the test proves nothing)."""
    flows = prepare(trace, cfg)
    predictor = ModelPredictor()
    fast = simulate_flows(flows, MODES, cfg, predictor=predictor)
    monkeypatch.setattr(ModeRun, "park_ended_members", False)
    reference = simulate_flows(flows, MODES, cfg, predictor=predictor)
    _same(reference, fast)
    monkeypatch.undo()
    run = ModeRun(flows, cfg, "full", SimOptions(), predictor)
    series = {name: np.zeros(200) for name in SERIES}
    for tick in range(200):
        run.step(tick * NS_PER_S, series, tick)
    assert run.parked_flows > 100
    assert fast["full"]["totals"]["member_flows"] > 1000
