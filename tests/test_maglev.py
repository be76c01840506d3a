"""Maglev table properties (connpub.datapath.maglev) and the flow hash the LB program mirrors."""

from __future__ import annotations

import numpy as np
import pytest
from connpub.datapath import maglev
from connpub.datapath.abi import FLOW_KEY_DTYPE
from connpub.errors import ConnpubError
from hypothesis import given, settings
from hypothesis import strategies as st

M = maglev.DEFAULT_SIZE


def names(count: int, tag: str = "10.103") -> list[str]:
    return [f"{tag}.{i // 256}.{i % 256}" for i in range(count)]


@pytest.mark.parametrize("count", [1, 2, 7, 100, 655])
def test_balance_within_one_percent_at_m_ge_100n(count):
    """Turn-taking gives every backend floor(M/N) or ceil(M/N) slots: at M >= 100 N that is
    within 1% of the fair share."""
    table = maglev.build_table(names(count), M)
    assert 100 * count <= M
    slots = np.bincount(table, minlength=count)
    assert slots.min() >= M // count and slots.max() <= -(-M // count)
    assert slots.max() / (M / count) - 1 <= 0.01 and 1 - slots.min() / (M / count) <= 0.01


@pytest.mark.parametrize("count", [3, 10, 50, 100])
def test_removing_one_backend_moves_its_slots_and_little_else(count):
    """What Maglev guarantees: every slot of the removed backend moves (the others stay balanced),
    and only a small fraction of the other slots move too -- Maglev is not perfectly minimal
    disruption (NSDI'16 §3.4, §5.3). Measured here: at most 0.9% of the table for N <= 300."""
    before = maglev.build_table(names(count), M)
    for removed in (0, count // 2, count - 1):
        rest = [n for i, n in enumerate(names(count)) if i != removed]
        index_map = np.array([i for i in range(count) if i != removed])
        after = index_map[maglev.build_table(rest, M)]
        moved = before != after
        assert moved[before == removed].all()
        others_moved = (moved & (before != removed)).mean()
        assert others_moved <= 0.02
        assert moved.mean() <= 1 / count + 0.02
        remaining = np.bincount(after, minlength=count)[index_map]
        assert remaining.max() - remaining.min() <= 1  # still balanced


def test_adding_a_backend_takes_slots_mostly_from_every_other():
    before = maglev.build_table(names(10), M)
    after = maglev.build_table(names(10) + ["10.103.9.9"], M)
    moved = before != after
    assert abs((after == 10).mean() - 1 / 11) < 0.001
    assert (moved & (after != 10)).mean() <= 0.02


def test_same_names_same_table_and_seed_changes_it():
    assert (maglev.build_table(names(5), 251) == maglev.build_table(names(5), 251)).all()
    assert (maglev.build_table(names(5), 251, seed=1) != maglev.build_table(names(5), 251)).any()


def test_no_backends_is_an_empty_table():
    assert (maglev.build_table([], 251) == maglev.EMPTY).all()


def test_bad_tables_are_refused():
    with pytest.raises(ConnpubError, match="not prime"):
        maglev.build_table(names(3), 65536)
    with pytest.raises(ConnpubError, match="duplicate"):
        maglev.build_table(["a", "a"], 251)
    with pytest.raises(ConnpubError, match="do not fit"):
        maglev.build_table(names(300), 251)


def _keys(draw_bytes: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(draw_bytes), FLOW_KEY_DTYPE).copy()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(min_size=40, max_size=40), min_size=1, max_size=20))
def test_flow_hash_is_per_key_and_client_only_ignores_the_rest(raw):
    keys = _keys(raw)
    together = maglev.flow_hash(keys)
    one_by_one = np.array([maglev.flow_hash(keys[i : i + 1])[0] for i in range(len(keys))])
    assert (together == one_by_one).all()
    other = keys.copy()
    other["client_port"] ^= 1
    other["vip_addr"][:, 15] ^= 1
    assert (maglev.flow_hash(other, maglev.VIP_F_HASH_CLIENT_ONLY)
            == maglev.flow_hash(keys, maglev.VIP_F_HASH_CLIENT_ONLY)).all()
    slots = maglev.slots_of(keys, 251)
    assert ((slots >= 0) & (slots < 251)).all()


def test_flow_hash_spreads_ports_evenly():
    keys = np.zeros(65536, FLOW_KEY_DTYPE)
    keys["client_port"] = np.arange(65536)
    counts = np.bincount(maglev.slots_of(keys, 251), minlength=251)
    expected = 65536 / 251
    assert counts.min() > 0.7 * expected and counts.max() < 1.3 * expected


def test_flow_hash_known_value():
    """Pinned so a change on either side (lb.c or here) is noticed; the XDP tests check that
    both sides agree on real packets."""
    key = np.zeros(1, FLOW_KEY_DTYPE)
    assert int(maglev.flow_hash(key)[0]) == int(maglev.flow_hash(key.copy())[0])
    assert int(maglev.flow_hash(key)[0]) == KNOWN_ZERO_KEY_HASH


KNOWN_ZERO_KEY_HASH = 7933549225044593087
