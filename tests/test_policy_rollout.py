"""Phased rollout: stable salted cohort by class hash, fraction, shadow mode."""

from __future__ import annotations

import numpy as np
from connpub.config import RolloutConfig
from connpub.datapath.abi import CLASS_KEY_DTYPE
from connpub.policy.rollout import class_hash, in_cohort, rollout_levels


def classes(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keys = np.zeros(count, CLASS_KEY_DTYPE)
    keys["vip_addr"] = rng.integers(0, 256, (count, 16), dtype=np.uint8)
    keys["vip_port"] = rng.integers(0, 65536, count)
    keys["proto"] = 6
    return keys


def test_hash_is_stable_and_salted():
    key = np.zeros(1, CLASS_KEY_DTYPE)
    key["vip_port"], key["proto"] = 443, 6
    first = class_hash(key, "connpub")
    assert first.tolist() == class_hash(key.copy(), "connpub").tolist()
    assert first.tolist() == [int(first[0])] and first.dtype == np.uint64
    assert class_hash(key, "other").tolist() != first.tolist()
    many = classes(1000)
    assert class_hash(many, "s")[5] == class_hash(many[5:6], "s")[0]  # row-independent


def test_fraction_is_respected_and_cohorts_nest():
    keys = classes(20_000)
    small = in_cohort(keys, RolloutConfig(fraction=0.1, salt="a"))
    large = in_cohort(keys, RolloutConfig(fraction=0.3, salt="a"))
    assert 0.09 < small.mean() < 0.11 and 0.28 < large.mean() < 0.32
    assert not (small & ~large).any()  # growing the fraction only adds classes
    assert not in_cohort(keys, RolloutConfig(fraction=0.0)).any()
    assert in_cohort(keys, RolloutConfig(fraction=1.0)).all()


def test_rollout_levels_and_shadow():
    keys = classes(1000, seed=3)
    proposed = np.full(1000, 2, np.uint8)
    live = rollout_levels(keys, proposed, RolloutConfig(fraction=0.5, salt="x"))
    assert (live.effective_levels[live.in_cohort] == 2).all()
    assert (live.effective_levels[~live.in_cohort] == 0).all()
    assert (live.acting == live.in_cohort).all()
    shadow = rollout_levels(keys, proposed, RolloutConfig(fraction=0.5, salt="x", shadow=True))
    assert (shadow.effective_levels == 0).all() and not shadow.acting.any()
    assert (shadow.in_cohort == live.in_cohort).all() and (shadow.proposed_levels == 2).all()
