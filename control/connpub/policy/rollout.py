"""Phased rollout (docs/policy.md): a stable, salted hash of the class key picks the cohort of
classes that get adaptive granularity / predictive leases; shadow mode computes but does not act."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from connpub.config import RolloutConfig
from connpub.datapath.abi import CLASS_KEY_DTYPE

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix(values: np.ndarray) -> np.ndarray:
    z = values + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def class_hash(class_keys: np.ndarray, salt: str) -> np.ndarray:
    """uint64 per class key: splitmix64 chained over the key's five little-endian u32 words,
    seeded with blake2b(salt). Same result on every host and run."""
    keys = np.ascontiguousarray(class_keys)
    if keys.dtype != CLASS_KEY_DTYPE:
        raise TypeError(f"expected CLASS_KEY_DTYPE keys, got {keys.dtype}")
    words = keys.view(np.uint8).reshape(-1, CLASS_KEY_DTYPE.itemsize).view("<u4")
    seed = int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest(), "little")
    state = np.full(len(keys), seed, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for column in range(words.shape[1]):
            state = _splitmix(state ^ words[:, column].astype(np.uint64))
    return state


def in_cohort(class_keys: np.ndarray, cfg: RolloutConfig) -> np.ndarray:
    """True for classes in the adaptive/predictive cohort: hash/2^64 < fraction."""
    uniform = (class_hash(class_keys, cfg.salt) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return uniform < cfg.fraction


@dataclass(frozen=True)
class RolloutDecision:
    effective_levels: np.ndarray  # what to act on (baseline level 0 outside the cohort/shadow)
    proposed_levels: np.ndarray  # what the policy wanted, for reporting
    in_cohort: np.ndarray  # bool per class
    acting: np.ndarray  # bool per class: cohort and not shadow (predictive leases apply too)


def rollout_levels(class_keys: np.ndarray, proposed_levels: np.ndarray,
                   cfg: RolloutConfig) -> RolloutDecision:
    """Levels to act on: the proposal inside the cohort, level 0 elsewhere; in shadow mode level
    0 everywhere while the proposal is still returned for logging."""
    cohort = in_cohort(class_keys, cfg)
    acting = cohort & (not cfg.shadow)
    proposed = np.asarray(proposed_levels, dtype=np.uint8)
    effective = np.where(acting, proposed, 0).astype(np.uint8)
    return RolloutDecision(effective, proposed, cohort, acting)
