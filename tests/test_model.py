"""Quantile model: quality vs baseline, ONNX round trip, refusal of bad files, promotion guard."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from connpub.cli import main
from connpub.errors import ConnpubError
from connpub.model import quantile as m
from connpub.model.features import FEATURE_NAMES, FEATURE_VERSION, N_FEATURES
from connpub.model.samples import sample_history
from connpub.traffic import workload as wl
from connpub.traffic.trace import HISTORY_DTYPE, history_from_flows, write_history
from onnx import TensorProto, helper

SMALL = replace(m.TrainConfig(), max_iter=30)


def known_law_history(n: int, seed: int) -> np.ndarray:
    """One service; log duration = -1 + 3 * (mean first-packet size - 100) / 900 + N(0, 0.5)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(n, HISTORY_DTYPE)
    size = rng.uniform(100, 1000, n)
    duration_s = np.exp(-1 + 3 * (size - 100) / 900 + 0.5 * rng.standard_normal(n))
    out["client_addr"] = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    out["vip_addr"][:, 10:] = (0xFF, 0xFF, 203, 0, 113, 10)
    out["vip_port"], out["proto"], out["client_port"] = 443, 6, rng.integers(32768, 61000, n)
    out["first_seen_ns"] = np.sort(rng.integers(0, 3600 * 10**9, n))
    out["duration_ns"] = np.rint(duration_s * 1e9).astype(np.int64)
    out["last_seen_ns"] = out["first_seen_ns"] + out["duration_ns"]
    out["first_n"] = 8
    out["first_size_sum"] = np.rint(8 * size)
    out["first_size_sumsq"] = np.rint(8 * size * size)
    out["first_size_max"] = np.rint(size)
    out["first_iat_sum_ns"] = 7_000_000
    out["first_iat_max_ns"] = 1_000_000
    out["packets"] = 8 + np.rint(5 * duration_s)
    out["bytes"] = out["first_size_sum"] + 100 * (out["packets"] - 8)
    out["first_tcp_flags"] = out["tcp_flags"] = 0x1A
    return out


@pytest.fixture(scope="module")
def mixed_model(tmp_path_factory):
    history = history_from_flows(wl.generate("mixed", 30_000, seed=21))
    fitted = m.train(history, seed=0, config=SMALL)
    path = m.export_onnx(fitted, tmp_path_factory.mktemp("model") / "mixed.onnx", created="t0")
    return fitted, path


def test_known_law_beats_service_median_with_80_percent_coverage(tmp_path):
    fitted = m.train(known_law_history(15_000, seed=1), seed=0, config=SMALL)
    predictor = m.Predictor(m.export_onnx(fitted, tmp_path / "law.onnx"))
    metrics = m.evaluate(known_law_history(8_000, seed=2), predictor)
    assert metrics["baseline_source"] == "training"
    assert metrics["mae"] < 0.7 * metrics["baseline_mae"]  # remaining at decision ages: noisier
    assert abs(metrics["coverage"] - 0.8) < 0.05


def test_mixed_workload_beats_baseline(mixed_model):
    _, path = mixed_model
    heldout = history_from_flows(wl.generate("mixed", 10_000, seed=22))
    metrics = m.evaluate(heldout, m.Predictor(path))
    assert metrics["mae"] < 0.85 * metrics["baseline_mae"]
    assert metrics["mae"] < metrics["age_only_mae"]
    assert 0.75 < metrics["coverage"] < 0.85  # conformal offsets from held-back flows
    assert 7_000 < metrics["flows"] < 9_000  # ~20% end before their first tick: not decided
    for group in ("by_protocol", "by_age", "by_duration"):
        assert sum(part["rows"] for part in metrics[group].values()) == metrics["rows"]


def test_onnx_matches_sklearn(mixed_model):
    fitted, path = mixed_model
    samples = sample_history(history_from_flows(wl.generate("mixed", 5_000, seed=23)))
    onnx_out = m.Predictor(path).predict_raw(samples.features)
    sklearn_out = fitted.predict_log(samples.features)
    assert onnx_out.shape == (samples.features.shape[0], 3)
    assert np.abs(onnx_out - sklearn_out).max() < 1e-4


def test_predict_gives_ordered_seconds(mixed_model):
    _, path = mixed_model
    samples = sample_history(history_from_flows(wl.generate("mixed", 2_000, seed=24)))
    p10, p50, p90 = m.Predictor(path).predict(samples.features)
    assert p10.shape == p50.shape == p90.shape == (samples.features.shape[0],)
    assert (p10 <= p50).all() and (p50 <= p90).all() and (p10 > 0).all()
    empty = m.Predictor(path).predict(np.zeros((0, N_FEATURES), np.float32))
    assert all(part.size == 0 for part in empty)
    with pytest.raises(ConnpubError, match="want \\(n, 19\\)"):
        m.Predictor(path).predict(np.zeros((3, 5), np.float32))


def test_training_is_deterministic():
    history = history_from_flows(wl.generate("mixed", 5_000, seed=25))
    config = replace(SMALL, max_iter=8)
    first = m.build_onnx(m.train(history, seed=4, config=config), created="t")
    again = m.build_onnx(m.train(history, seed=4, config=config), created="t")
    assert first.SerializeToString() == again.SerializeToString()


def test_metadata_is_complete(mixed_model):
    _, path = mixed_model
    info = m.model_info(path)
    assert info["feature_names"] == list(FEATURE_NAMES)
    assert info["quantiles"] == [0.1, 0.5, 0.9]
    assert info["feature_version"] == "2" and info["format_version"] == "1"
    assert 20_000 < info["training"]["flows"] < 30_000 and info["created"] == "t0"
    assert info["training"]["calibration"] == "held-back flows"
    assert info["training"]["baseline"]["ports"]["tcp/443"] < 5.0
    assert int(info["trees"]) == SMALL.max_iter + 2 * SMALL.correction_iter


def test_default_model_ships_and_loads():
    path = m.default_model_path()
    assert path.is_file() and path.stat().st_size < 2 * 1024 * 1024
    predictor = m.Predictor()
    assert predictor.metadata["created"] == "2026-12-04T00:00:00Z"
    training = json.loads(predictor.metadata["training"])
    assert {"ndpi", "zeek", "argus", "generator"} <= set(training["sources"])
    assert training["calibration"] == "cross-source" and "calibration" in predictor.metadata
    samples = sample_history(history_from_flows(wl.generate("mixed", 3_000, seed=26)))
    metrics = m.evaluate_samples(samples, predictor)
    assert metrics["mae"] < metrics["age_only_mae"]


def test_batched_inference_equals_row_by_row(mixed_model):
    """Batch inference (the agent's path; throughput is `connpub bench control`) gives the same
    quantiles as small batches, ordered p10 <= p50 <= p90."""
    _, path = mixed_model
    predictor = m.Predictor(path)
    rows = np.random.default_rng(0).normal(0, 3, (20_000, N_FEATURES)).astype(np.float32)
    p10, p50, p90 = predictor.predict(rows)
    parts = [predictor.predict(rows[i:i + 1000]) for i in range(0, len(rows), 1000)]
    for q, whole in enumerate((p10, p50, p90)):
        np.testing.assert_allclose(np.concatenate([part[q] for part in parts]), whole, rtol=1e-5)
    assert (p10 <= p50).all() and (p50 <= p90).all()


def _with_metadata(path, out, **changes):
    model = onnx.load_model(str(path))
    for entry in model.metadata_props:
        key = entry.key.removeprefix(m.META_PREFIX)
        if key in changes:
            entry.value = changes[key]
    onnx.save_model(model, str(out))
    return out


def _identity_model(out, n_features: int, output_name: str):
    graph = helper.make_graph(
        [helper.make_node("Identity", [m.INPUT_NAME], [output_name])], "bad",
        [helper.make_tensor_value_info(m.INPUT_NAME, TensorProto.FLOAT, [None, n_features])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [None, n_features])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {"format_version": "1", "feature_version": str(FEATURE_VERSION),
            "quantiles": "[0.1, 0.5, 0.9]",
            "feature_names": json.dumps(list(FEATURE_NAMES))}
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = m.META_PREFIX + key, value
    onnx.save_model(model, str(out))
    return out


def test_broken_or_mismatched_files_refused(mixed_model, tmp_path):
    _, path = mixed_model
    with pytest.raises(ConnpubError, match="no such model file"):
        m.Predictor(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ConnpubError, match="not an ONNX model|format"):
        m.Predictor(junk)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ConnpubError):
        m.Predictor(truncated)
    with pytest.raises(ConnpubError, match="feature version '99'"):
        m.Predictor(_with_metadata(path, tmp_path / "v99.onnx", feature_version="99"))
    with pytest.raises(ConnpubError, match="feature names differ"):
        m.Predictor(_with_metadata(path, tmp_path / "names.onnx", feature_names='["x"]'))
    with pytest.raises(ConnpubError, match="quantiles"):
        m.Predictor(_with_metadata(path, tmp_path / "q.onnx", quantiles="[0.5]"))
    with pytest.raises(ConnpubError, match="takes 5 features"):
        m.Predictor(_identity_model(tmp_path / "narrow.onnx", 5, m.OUTPUT_NAME))
    with pytest.raises(ConnpubError, match="model outputs"):
        m.Predictor(_identity_model(tmp_path / "outputs.onnx", N_FEATURES, "other"))


def test_should_promote():
    current = {"mae": 1.5, "coverage": 0.78}
    assert m.should_promote({"mae": 1.4, "coverage": 0.79}, current)
    assert m.should_promote({"mae": 1.4, "coverage": 0.77}, current)
    assert not m.should_promote({"mae": 1.5, "coverage": 0.80}, current)
    assert not m.should_promote({"mae": 1.2, "coverage": 0.70}, current)
    assert not m.should_promote({"mae": 1.2, "coverage": 0.86}, current)
    assert m.should_promote({"mae": 1.2, "coverage": 0.70}, current,
                            coverage_tolerance=0.1)
    with pytest.raises(ConnpubError, match="mae"):
        m.should_promote({"coverage": 0.8}, current)


def test_cli_model_commands(tmp_path):
    runner = CliRunner()
    hist = tmp_path / "hist.parquet"
    result = runner.invoke(main, ["model", "generate-history", "--workload", "mixed", "--flows",
                                  "4000", "--seed", "3", "--out", str(hist), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["flows"] == 4000
    out = tmp_path / "model.onnx"
    result = runner.invoke(main, ["model", "train", "--history", str(hist), "--out", str(out),
                                  "--seed", "1", "--max-iter", "5", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["trees"] == 5 + 2 * m.TrainConfig().correction_iter
    result = runner.invoke(main, ["model", "eval", "--history", str(hist), "--model", str(out),
                                  "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert 3000 < metrics["flows"] <= 4000 and 0 <= metrics["coverage"] <= 1
    assert metrics["baseline_source"] == "training" and metrics["age_only_mae"] > 0
    result = runner.invoke(main, ["model", "info", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["trainer"]["seed"] == 1
    result = runner.invoke(main, ["model", "info", "default"])
    assert result.exit_code == 0, result.output
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"junk")
    result = runner.invoke(main, ["model", "info", str(junk)])
    assert result.exit_code == 2
    assert "connpub: error:" in result.output


def test_cli_train_refuses_tiny_history(tmp_path):
    hist = tmp_path / "tiny.parquet"
    write_history(history_from_flows(wl.generate("mixed", 20, seed=1)), hist)
    result = CliRunner().invoke(main, ["model", "train", "--history", str(hist), "--out",
                                       str(tmp_path / "x.onnx")])
    assert result.exit_code == 2
    assert "training rows" in result.output
