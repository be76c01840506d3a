"""Feature matrix shape/dtype/finite values, client history lookup, history sampling."""

from __future__ import annotations

import numpy as np
import pytest
from connpub.errors import ConnpubError
from connpub.model.features import (
    FEATURE_NAMES,
    FEATURE_VERSION,
    MIN_REMAINING_S,
    N_FEATURES,
    OBSERVATION_FIELDS,
    ClientHistory,
    compute_features,
    is_ipv4_mapped,
)
from connpub.model.samples import sample_history
from connpub.traffic import workload as wl
from connpub.traffic.trace import history_from_flows
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def history() -> np.ndarray:
    return history_from_flows(wl.generate("mixed", 20_000, seed=2))


def test_feature_list_is_stable():
    assert FEATURE_VERSION == 2
    assert N_FEATURES == len(FEATURE_NAMES) == 19
    assert FEATURE_NAMES[-1] == "sketch_missing"
    assert len(set(FEATURE_NAMES)) == N_FEATURES
    assert FEATURE_NAMES[0] == "log_age_s"


def test_samples_have_features_and_targets(history):
    samples = sample_history(history)
    rows = samples.features.shape[0]
    assert samples.features.shape == (rows, N_FEATURES)
    assert samples.features.dtype == np.float32
    assert np.isfinite(samples.features).all()
    duration = history["duration_ns"][samples.flow_index] / 1e9
    # every flow alive at its first tick (age U(0, 1 s)) is decided, short ones included
    assert np.unique(samples.flow_index).size == np.unique(
        samples.flow_index[samples.age_s < 1.0]).size
    assert (samples.age_s < duration).all()
    assert np.array_equal(samples.duration_s, duration)
    expected = np.log(np.maximum(duration - samples.age_s, MIN_REMAINING_S))
    assert np.allclose(samples.log_remaining_s, expected)
    column = FEATURE_NAMES.index("log_age_s")
    assert np.allclose(samples.features[:, column], np.log1p(samples.age_s), rtol=1e-6)
    assert (samples.features[:, FEATURE_NAMES.index("sketch_missing")] == 0).all()


def _observations(n: int, rng: np.random.Generator) -> dict:
    return {
        "age_s": rng.exponential(10, n), "proto": rng.choice([6, 17], n),
        "vip_port": rng.integers(1, 65536, n), "first_n": rng.integers(0, 9, n),
        "first_size_sum": rng.integers(0, 12000, n), "first_size_sumsq": rng.integers(0, 2**34, n),
        "first_size_max": rng.integers(0, 1500, n), "first_iat_sum_ns": rng.integers(0, 2**40, n),
        "first_iat_max_ns": rng.integers(0, 2**40, n), "first_tcp_flags": rng.integers(0, 256, n),
        "bytes": rng.integers(0, 2**50, n), "packets": rng.integers(0, 2**40, n),
        "client_prior_count": rng.integers(0, 100, n),
        "client_prior_log_duration": rng.normal(0, 3, n), "client_ipv6": rng.random(n) < 0.2,
    }


def test_degenerate_observations_stay_finite():
    zeros = {name: np.zeros(4) for name in OBSERVATION_FIELDS}
    features = compute_features(zeros)
    assert features.shape == (4, N_FEATURES) and np.isfinite(features).all()
    obs = _observations(1000, np.random.default_rng(0))
    obs["client_prior_log_duration"][obs["client_prior_count"] == 0] = np.nan
    features = compute_features(obs)
    assert np.isfinite(features).all()
    prior = FEATURE_NAMES.index("client_prior_log_duration")
    assert (features[obs["client_prior_count"] == 0, prior] == 0).all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 50))
def test_random_observations_give_finite_float32(seed, n):
    features = compute_features(_observations(n, np.random.default_rng(seed)))
    assert features.dtype == np.float32 and features.shape == (n, N_FEATURES)
    assert np.isfinite(features).all()


def test_bad_observations_refused():
    obs = _observations(5, np.random.default_rng(1))
    del obs["bytes"]
    with pytest.raises(ConnpubError, match="lack bytes"):
        compute_features(obs)
    obs = _observations(5, np.random.default_rng(1))
    obs["packets"] = obs["packets"][:3]
    with pytest.raises(ConnpubError, match="'packets' has shape"):
        compute_features(obs)


def test_client_history_matches_brute_force():
    rng = np.random.default_rng(3)
    n, m = 400, 300
    pool = rng.integers(0, 256, (7, 16), dtype=np.uint8)
    hist_addr = pool[rng.integers(0, 7, n)]
    end_ns = rng.integers(0, 10**12, n)
    log_dur = rng.normal(0, 2, n)
    query_addr = pool[rng.integers(0, 7, m)]
    query_addr[:10] = rng.integers(0, 256, (10, 16), dtype=np.uint8)  # unseen clients
    now_ns = rng.integers(0, 10**12, m)
    now_ns[10:20] = end_ns[:10]  # ties count as finished
    count, mean = ClientHistory(hist_addr, end_ns, log_dur).lookup(query_addr, now_ns)
    for i in range(m):
        mine = (hist_addr == query_addr[i]).all(axis=1) & (end_ns <= now_ns[i])
        assert count[i] == mine.sum()
        assert mean[i] == pytest.approx(log_dur[mine].mean() if mine.any() else 0.0)


def test_client_history_empty():
    empty = ClientHistory(np.zeros((0, 16), np.uint8), np.zeros(0, np.int64), np.zeros(0))
    count, mean = empty.lookup(np.zeros((3, 16), np.uint8), np.zeros(3, np.int64))
    assert count.tolist() == [0, 0, 0] and mean.tolist() == [0.0, 0.0, 0.0]


def test_ipv4_mapped_detection():
    addrs = np.zeros((3, 16), np.uint8)
    addrs[0, 10:12] = 0xFF
    addrs[1, :2] = (0x20, 0x01)
    addrs[2, 10:12] = 0xFF
    addrs[2, 0] = 1
    assert is_ipv4_mapped(addrs).tolist() == [True, False, False]


def test_empty_history_refused():
    with pytest.raises(ConnpubError, match="history is empty"):
        sample_history(history_from_flows(wl.generate("mixed", 10, seed=1))[:0])


def _reference_features(obs: dict) -> np.ndarray:
    """The feature definition written plainly: each column in float64, cast to float32,
    NaN/inf replaced (what compute_features computed before it wrote rows directly)."""
    f = {name: np.asarray(obs[name], np.float64) for name in OBSERVATION_FIELDS}
    age = np.maximum(f["age_s"], 0.0)
    count = np.maximum(f["first_n"], 1.0)
    mean = f["first_size_sum"] / count
    flags = np.asarray(obs["first_tcp_flags"]).astype(np.int64)
    rate_age = np.maximum(age, 1e-3)
    columns = [
        np.log1p(age), (np.asarray(obs["proto"]) == 17).astype(np.float64), f["vip_port"],
        f["first_n"], mean, np.sqrt(np.maximum(f["first_size_sumsq"] / count - mean**2, 0.0)),
        f["first_size_max"],
        np.log1p(f["first_iat_sum_ns"] / np.maximum(f["first_n"] - 1.0, 1.0) / 1e6),
        np.log1p(f["first_iat_max_ns"] / 1e6), ((flags & 0x02) != 0).astype(np.float64),
        ((flags & 0x08) != 0).astype(np.float64), np.log1p(f["bytes"]), np.log1p(f["packets"]),
        np.log1p(f["bytes"] / rate_age), np.log1p(f["packets"] / rate_age),
        np.log1p(np.maximum(f["client_prior_count"], 0.0)),
        np.where(f["client_prior_count"] > 0, f["client_prior_log_duration"], 0.0),
        f["client_ipv6"], (f["first_n"] <= 0).astype(np.float64)]
    out = np.stack(columns, axis=1).astype(np.float32)
    return np.nan_to_num(out, nan=0.0, posinf=3.0e38, neginf=-3.0e38)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_features_equal_the_plain_definition_bit_for_bit(seed):
    obs = _observations(20_000, np.random.default_rng(seed))
    obs["age_s"][:50] = [0.0, -1.0, 1e-12, 1e300, np.inf] * 10
    obs["client_prior_log_duration"][:7] = np.nan
    got = compute_features(obs)
    assert got.flags["C_CONTIGUOUS"] and got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), _reference_features(obs).view(np.uint32))
