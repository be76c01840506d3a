"""Fleet-scale training: Parquet histories of several servers -> Dask + LightGBM -> the same
one-node connpub model file (onnxmltools conversion merged into one ensemble)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from connpub.cli import main
from connpub.errors import ConnpubError
from connpub.model import fleet
from connpub.model.features import N_FEATURES
from connpub.model.quantile import Predictor, TrainConfig, evaluate, package_onnx
from connpub.traffic import workload as wl
from connpub.traffic.trace import history_from_flows, write_history


def test_merged_ensemble_matches_the_boosters(tmp_path):
    import lightgbm as lgb

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, N_FEATURES)).astype(np.float32)
    y = 2 * x[:, 0] + np.abs(x[:, 1]) * rng.normal(size=4000)
    params = {"n_estimators": 12, "num_leaves": 8, "verbose": -1, "random_state": 0}
    median = lgb.LGBMRegressor(objective="quantile", alpha=0.5, **params).fit(x, y)
    residual = y - median.predict(x)
    lower = lgb.LGBMRegressor(objective="quantile", alpha=0.1, **params).fit(x, residual)
    upper = lgb.LGBMRegressor(objective="quantile", alpha=0.9, **params).fit(x, residual)
    node, trees = fleet.merge_ensembles(*(fleet._tree_attributes(m.booster_)
                                          for m in (median, lower, upper)))
    assert trees == 36
    path = tmp_path / "merged.onnx"
    import onnx

    onnx.save_model(package_onnx(node, trees, {}, {}, None, "t"), str(path))
    out = Predictor(path).predict_raw(x[:500])
    m, lo, hi = (est.predict(x[:500]) for est in (median, lower, upper))
    assert np.abs(out - np.stack([m + lo, m, m + hi], axis=1)).max() < 1e-4


@pytest.fixture(scope="module")
def histories(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fleet")
    for server in range(3):
        flows = wl.generate("mixed", 6_000, seed=40 + server)
        write_history(history_from_flows(flows, server_id=server + 1),
                      folder / f"server-{server}.parquet")
    return folder


def test_fleet_training_through_dask(histories, tmp_path):
    out = tmp_path / "fleet.onnx"
    result = CliRunner().invoke(main, ["model", "train-fleet", str(histories / "*.parquet"),
                                       "--out", str(out), "--workers", "2", "--max-iter", "20",
                                       "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["files"] == 3 and summary["trees"] == 20 + 2 * TrainConfig().correction_iter
    assert summary["fit_rows"] + summary["calibration_rows"] == summary["rows"]
    predictor = Predictor(out)
    training = json.loads(predictor.metadata["training"])
    assert training["engine"] == "lightgbm.dask" and "calibration" in predictor.metadata
    metrics = evaluate(history_from_flows(wl.generate("mixed", 4_000, seed=49)), predictor)
    assert metrics["mae"] < 0.85 * metrics["baseline_mae"]
    assert metrics["mae"] < metrics["age_only_mae"]
    assert 0.7 < metrics["coverage"] < 0.9


def test_fleet_input_errors(tmp_path):
    with pytest.raises(ConnpubError, match="no Parquet history files"):
        fleet.history_files(str(tmp_path / "*.parquet"))
    result = CliRunner().invoke(main, ["model", "train-fleet", str(tmp_path), "--out",
                                       str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "no Parquet history files" in result.output
    assert not (tmp_path / "x.onnx").exists()
