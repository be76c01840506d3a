"""The held-out floor bounds of the shipped recipe (connpub.model.train_default --floor)."""

from __future__ import annotations

import numpy as np
import pytest
from connpub.model import train_default as td
from connpub.model.features import N_FEATURES
from connpub.model.samples import Samples, sample_flows
from connpub.traffic import workload as wl


def _samples(truth, ports, protos, features=None) -> Samples:
    n = len(truth)
    return Samples(np.zeros((n, N_FEATURES), np.float32) if features is None else features,
                   np.asarray(truth, np.float64), np.asarray(ports), np.asarray(protos),
                   np.ones(n), np.arange(n))


def test_port_shift_moves_each_service_by_its_median_residual():
    # TCP/80 residuals 1, 2, 3 -> shift 2 -> -1, 0, 1; UDP/53 residuals 0, 4 -> 2 -> -2, 2
    samples = _samples([1.0, 2.0, 3.0, 0.0, 4.0], [80, 80, 80, 53, 53], [6, 6, 6, 17, 17])
    assert td.port_shift_mae(samples, np.zeros(5)) == pytest.approx(6.0 / 5.0, abs=1e-12)
    # same port, other protocol: another service, so its own shift
    samples = _samples([1.0, 3.0, 5.0, 9.0], [80, 80, 80, 80], [6, 6, 17, 17])
    assert td.port_shift_mae(samples, np.zeros(4)) == pytest.approx(1.5, abs=1e-12)


def test_in_network_cv_learns_a_law_of_the_features_and_not_noise():
    rng = np.random.default_rng(3)
    n = 2000
    features = rng.uniform(0.0, 5.0, (n, N_FEATURES)).astype(np.float32)
    law = _samples(2.0 * features[:, 0].astype(np.float64), np.full(n, 443), np.full(n, 6),
                   features)
    noise = _samples(rng.normal(0.0, 2.0, n), np.full(n, 443), np.full(n, 6), features)
    assert td.in_network_cv_mae(law) < 0.1  # |truth - median| of the law itself is 2.5
    # pure noise: no better than its own median (E|N(0, 2)| = 1.60)
    assert td.in_network_cv_mae(noise) > 1.5


def test_floor_report_keys_and_exact_target():
    flows = {"a": wl.generate("mixed", 600, seed=1), "b": wl.generate("realfit", 600, seed=2),
             "generator": wl.generate("realfit", 600, seed=3)}
    samples = {name: sample_flows(table) for name, table in flows.items()}
    report = td.floor_report(flows, samples)
    assert sorted(report) == ["a", "b"]
    for row in report.values():
        assert row["target_mae"] == pytest.approx(0.7 * row["baseline_mae"], rel=1e-12)
        assert sorted(row["mae_by_training_sample_seed"]) == ["0", "1", "2", "3"]
        assert row["mae_by_training_sample_seed"]["0"] == row["mae"]
        assert len(set(row["mae_by_training_sample_seed"].values())) > 1  # other rows, other fit
        assert row["in_network_cv_mae"] > 0.0
        # a per-service median shift never raises the service's sum of |residual| (shift 0)
        assert 0.0 < row["port_shift_oracle_mae"] <= row["mae"]
    assert report["a"]["rows"] == samples["a"].log_remaining_s.size
