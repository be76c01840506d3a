"""The numpy mirrors in connpub.datapath.abi match the tables bcc loads: sizes and field offsets."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from connpub.datapath.abi import MAP_LAYOUTS
from datapath_fixtures import scratch

pytestmark = pytest.mark.root


def assert_same_layout(ctype, dtype: np.dtype, where: str) -> None:
    assert ctypes.sizeof(ctype) == dtype.itemsize, f"{where}: size"
    if dtype.names is None:
        return
    c_fields = {name: getattr(ctype, name).offset for name, *_ in ctype._fields_}
    for name in dtype.names:
        if name.startswith("pad"):
            continue
        assert name in c_fields, f"{where}: C struct has no field {name}"
        assert c_fields[name] == dtype.fields[name][1], f"{where}.{name}: offset"
        sub = dtype.fields[name][0]
        if sub.names:
            c_sub = dict((n, t) for n, t, *_ in ctype._fields_)[name]
            assert_same_layout(c_sub, sub, f"{where}.{name}")


@pytest.mark.parametrize("role", ["server", "lb", "tcpstate"])
def test_mirrors_match_loaded_tables(role):
    with scratch(role) as prog:
        for name, (key_dtype, value_dtype) in MAP_LAYOUTS[role].items():
            table = prog.program.table(name.encode())
            assert_same_layout(table.Key, key_dtype, f"{role}.{name}.key")
            leaf = table.Leaf
            if issubclass(leaf, ctypes.Array):  # per-CPU maps: bcc's leaf is value[ncpus]
                leaf = leaf._type_
            assert_same_layout(leaf, value_dtype, f"{role}.{name}.value")
