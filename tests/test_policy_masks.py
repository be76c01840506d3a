"""Aggregation masks: default bytes per level/family, vectorised apply and fit checks."""

from __future__ import annotations

import ipaddress

import numpy as np
from connpub.datapath.abi import FLOW_KEY_DTYPE
from connpub.datapath.masks import (
    DEFAULT_MASK_SPECS,
    MaskSpec,
    apply_masks,
    is_ipv6_key,
    is_v4_mapped,
    keys_fit_masks,
    mask_byte_table,
    mask_is_coarser,
    mask_table,
)


def make_key(client: str, vip: str, client_port: int, vip_port: int, proto: int = 6):
    def packed(text: str) -> bytes:
        address = ipaddress.ip_address(text)
        if address.version == 4:
            address = ipaddress.IPv6Address(f"::ffff:{text}")
        return address.packed

    key = np.zeros(1, FLOW_KEY_DTYPE)
    key["client_addr"][0] = list(packed(client))
    key["vip_addr"][0] = list(packed(vip))
    key["client_port"], key["vip_port"], key["proto"] = client_port, vip_port, proto
    return key


def addr(key, field: str) -> str:
    address = ipaddress.IPv6Address(bytes(key[field][0]))
    return str(address.ipv4_mapped or address)


def test_default_mask_bytes():
    table = mask_byte_table()
    assert table.shape == (8, 40)
    v4_level3 = table[3 * 2 + 0]
    assert v4_level3[:15].tolist() == [0xFF] * 15 and v4_level3[15] == 0x80  # ::ffff: + /25
    assert v4_level3[16:32].tolist() == [0xFF] * 16
    assert v4_level3[32:36].tolist() == [0, 0, 0, 0] and v4_level3[36] == 0xFF
    v6_level3 = table[3 * 2 + 1]
    assert v6_level3[:7].tolist() == [0xFF] * 7 and v6_level3[7:16].tolist() == [0] * 9  # /56
    assert table[0].tolist() == [0xFF] * 37 + [0, 0, 0]  # level 0 v4: all but pad
    assert table[1 * 2][32:34].tolist() == [0, 0] and table[1 * 2][34:36].tolist() == [0xFF] * 2
    assert mask_table().dtype == FLOW_KEY_DTYPE and mask_table().shape == (8,)


def test_apply_masks_per_level_v4_and_v6():
    keys = np.concatenate([make_key("192.0.2.77", "198.51.100.10", 40000, 443),
                           make_key("2001:db8:aa:bbcc::1", "2001:db8::80", 50000, 80)],
                          dtype=FLOW_KEY_DTYPE)
    assert is_ipv6_key(keys).tolist() == [False, True]
    level3 = apply_masks(keys, 3)
    assert addr(level3[:1], "client_addr") == "192.0.2.0"
    assert addr(level3[1:], "client_addr") == "2001:db8:aa:bb00::"
    assert addr(level3[:1], "vip_addr") == "198.51.100.10"
    assert level3["client_port"].tolist() == [0, 0] and level3["vip_port"].tolist() == [0, 0]
    assert level3["proto"].tolist() == [6, 6]
    level1 = apply_masks(keys, np.array([1, 1]))
    assert level1["client_port"].tolist() == [0, 0]
    assert level1["vip_port"].tolist() == [443, 80]
    assert apply_masks(keys, 0).tobytes() == keys.tobytes()
    mixed = apply_masks(keys, np.array([2, 0]))
    assert mixed["vip_port"].tolist() == [0, 80]


def test_is_v4_mapped_needs_all_twelve_prefix_bytes():
    addrs = [ipaddress.ip_address(a).packed for a in ("::ffff:10.0.0.1", "::1", "fd00::ffff:a00:1",
                                                       "1::ffff:10.0.0.1")]
    rows = np.frombuffer(b"".join(addrs), np.uint8).reshape(-1, 16)
    assert is_v4_mapped(rows).tolist() == [True, False, False, False]
    assert is_v4_mapped(rows[0]).tolist() == [True]  # one address


def test_keys_fit_masks():
    keys = make_key("192.0.2.77", "198.51.100.10", 40000, 443)
    assert keys_fit_masks(keys, 0).tolist() == [True]
    assert keys_fit_masks(keys, 3).tolist() == [False]
    assert keys_fit_masks(apply_masks(keys, 3), 3).tolist() == [True]
    keys["pad"][0, 1] = 1
    assert keys_fit_masks(keys, 0).tolist() == [False]


def test_configured_masks_and_nesting():
    specs = (*DEFAULT_MASK_SPECS[:3], MaskSpec(False, False, 16, 48, False))
    masked = apply_masks(make_key("192.0.2.77", "198.51.100.10", 1, 2), 3, mask_byte_table(specs))
    assert addr(masked, "client_addr") == "192.0.0.0"
    assert bytes(masked["vip_addr"][0]) == bytes(16)
    assert mask_is_coarser(DEFAULT_MASK_SPECS[2], DEFAULT_MASK_SPECS[3])
    assert not mask_is_coarser(DEFAULT_MASK_SPECS[3], DEFAULT_MASK_SPECS[2])
