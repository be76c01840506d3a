"""Issue 5 in the lab: predictive mode on real traffic has no lease miss and publishes fewer
entries than the baseline on the same workload; the history the server agents wrote trains and
evaluates a model."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from connpub.lab import run as labrun

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # a prefix of its own (as conftest.unique_prefix): parallel sessions run this test too
    spec = labrun.RunSpec(workload="mixed", flows=600, duration_s=20.0, time_scale=5.0,
                          prefix="p" + uuid.uuid4().hex[:5], seed=11,
                          history_dir=str(tmp_path_factory.mktemp("labhistory")))
    return labrun.run_modes(spec, ["baseline", "predictive"]), spec


def test_predictive_has_no_miss_and_fewer_entries_than_baseline(runs):
    results, _ = runs
    base, pred = results["baseline"], results["predictive"]
    print({m: {k: round(v, 1) for k, v in r.items() if k in labrun.SUMMARY_COLUMNS}
           for m, r in results.items()})
    assert base["flows"] == pred["flows"] > 500
    assert base["broken_connections"] == pred["broken_connections"] == 0
    assert base["lease_misses"] == pred["lease_misses"] == 0
    assert pred["publish_entries_per_s"] < base["publish_entries_per_s"]
    assert pred["lb_map_writes_per_s"] < base["lb_map_writes_per_s"]
    for result in (base, pred):  # the agents' own counters come with the run's figures
        totals = result["agent_totals"]
        assert totals["lb"].get("lease_misses", 0) == 0
        assert totals["lb"]["publish_packets{direction=received}"] > 0
        assert totals["server"]["flows_finished{reason=closed}"] > 0
        assert totals["server"]["tcpstate_map_full"] == 0


def test_model_trains_and_evaluates_on_the_lab_history(runs, tmp_path):
    _, spec = runs
    assert not Path(f"/run/connpub/labrun-{spec.prefix}").exists()  # the run cleaned up
    history = sorted(Path(spec.history_dir).glob("history-*"))
    assert history, "the server agents wrote no history"
    model = tmp_path / "lab.onnx"
    cli = [sys.executable, "-m", "connpub.cli", "model"]
    train = subprocess.run([*cli, "train", "--history", str(history[0].parent / "history-1"),
                            "--out", str(model)], capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    evaluate = subprocess.run([*cli, "eval", "--history", str(history[0].parent / "history-2"),
                               "--model", str(model), "--json"], capture_output=True, text=True,
                              timeout=300)
    assert evaluate.returncode == 0, evaluate.stderr
    report = json.loads(evaluate.stdout)
    print(report)
    for name in ("mae", "baseline_mae", "baseline_own_mae", "age_only_mae", "coverage"):
        assert name in report and report[name] >= 0
    assert report["rows"] == sum(band["rows"] for band in report["by_age"].values())
