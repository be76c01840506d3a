"""Auto-tuning with the simulator (connpub.sim.tune, `connpub tune`)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner
from connpub.cli import main
from connpub.config import Config, check_config, load_config
from connpub.sim import SimOptions, simulate
from connpub.sim.tune import (
    SEARCH_SPACE,
    TuneResult,
    _candidate,
    _vector,
    tune,
    tuned_config,
    tuned_toml,
)
from connpub.traffic import workload
from connpub.traffic.trace import write_trace


@pytest.fixture(scope="module")
def small_trace() -> np.ndarray:
    return workload.generate("mixed", 2000, seed=4, window_s=90.0)


def test_tune_writes_a_valid_config_without_more_misses(small_trace, tmp_path):
    options = SimOptions(seed=1)
    result = tune(small_trace, Config(), budget=4, seed=1, options=options)
    assert len(result.trials) == 5
    assert result.best.score <= result.start.score
    path = tmp_path / "tuned.toml"
    path.write_text(tuned_toml(result, Config(), "small"))
    cfg, problems = check_config(path, check_key_file=False)
    assert problems == []
    assert cfg.publish.mode == ("full" if result.best.feasible else "baseline")
    assert cfg.rollout == Config().rollout  # the cohort settings are the user's, not tuned
    everyone = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, fraction=1.0))
    results = simulate(small_trace, ["baseline", "full"], everyone, options=options)
    assert results["full"]["lease_miss_packets"] <= results["baseline"]["lease_miss_packets"]
    if result.best.feasible:
        assert results["full"]["lease_miss_packets"] == 0
        assert results["full"]["stale_flow_seconds"] <= results["baseline"]["stale_flow_seconds"]
        assert results["full"]["publish_bytes_per_s"] == pytest.approx(result.best.score)


def test_tune_is_deterministic(small_trace):
    first = tune(small_trace, Config(), budget=2, seed=5)
    second = tune(small_trace, Config(), budget=2, seed=5)
    assert [t.row() for t in first.trials] == [t.row() for t in second.trials]
    assert first.best.config == second.best.config


def test_candidates_are_clipped_and_ordered():
    point = _vector(Config())
    point[:] = 100.0  # far beyond every upper bound
    cfg = _candidate(Config(), point)
    assert cfg is not None
    gran = cfg.granularity
    assert gran.bandwidth_very_low <= gran.bandwidth_low <= gran.bandwidth_medium
    for section, name, low, high in SEARCH_SPACE:
        assert low <= getattr(getattr(cfg, section), name) <= high * 1.001


def test_cli_tune_writes_out_file(small_trace, tmp_path):
    trace_path = tmp_path / "t.parquet"
    write_trace(small_trace, trace_path)
    out = tmp_path / "tuned.toml"
    result = CliRunner().invoke(main, ["tune", "--trace", str(trace_path), "--budget", "2",
                                       "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["trials"] == 3
    assert data["out"] == str(out)
    load_config(out)  # raises on any problem
    check = CliRunner().invoke(main, ["config", "check", "--no-key-check", str(out)])
    assert check.exit_code == 0, check.output


def test_cli_tune_rejects_zero_budget(small_trace, tmp_path):
    result = CliRunner().invoke(main, ["tune", "--flows", "100", "--budget", "0"])
    assert result.exit_code == 2


def test_infeasible_search_writes_the_input_config(small_trace):
    result = tune(small_trace, Config(), budget=1, seed=3)
    start = dataclasses.replace(result.start, feasible=False, score=float("inf"))
    nothing = TuneResult(best=start, start=start, baseline=result.baseline, trials=[start])
    original = Config()
    assert tuned_config(nothing, original) == original
    assert "No candidate was feasible" in tuned_toml(nothing, original, "small")
    assert nothing.summary()["reduction_vs_baseline"] > 0
