"""Rendering of map entries and tables (issue 15 item 1, no root): column names fixed by the
field, every cell filled, times as signed seconds, addresses and MACs as text; tables show every
column any row has (`connpub status` with a server and an LB attachment)."""

from __future__ import annotations

import io

import numpy as np
from connpub.datapath.abi import FLOW_KEY_DTYPE, LB_CONFIG_DTYPE, LB_CONN_DTYPE
from connpub.display import entry_columns, print_lines, print_table

NOW_NS = 5_000 * 10**9


def conns(expiry_ns: list[int]) -> tuple[np.ndarray, np.ndarray]:
    keys = np.zeros(len(expiry_ns), FLOW_KEY_DTYPE)
    keys["client_addr"][:, 10:12] = 0xFF
    keys["client_addr"][:, 12:] = [10, 0, 0, 7]
    keys["client_port"] = np.arange(len(expiry_ns)) + 1000
    keys["vip_addr"][:, :2] = [0xFD, 0x00]
    keys["vip_addr"][:, 15] = 1
    keys["vip_port"] = 8443
    keys["proto"] = 6
    values = np.zeros(len(expiry_ns), LB_CONN_DTYPE)
    values["lease_expiry_ns"] = expiry_ns
    values["created_ns"] = NOW_NS - 2 * 10**9
    return keys, values


def test_lease_column_is_signed_and_named_by_the_field_not_the_first_row():
    for order in ([NOW_NS - 10**9, NOW_NS + 3 * 10**9, 0], [NOW_NS + 3 * 10**9, 0,
                                                            NOW_NS - 10**9]):
        columns = entry_columns(*conns(order), NOW_NS)
        assert list(columns) == ["proto", "client", "vip", "lease_expiry_in_s", "created_ago_s",
                                 "backend_id", "level", "flags", "vip_index"]
        by_expiry = dict(zip(order, columns["lease_expiry_in_s"], strict=True))
        assert by_expiry == {NOW_NS - 10**9: "-1.000", NOW_NS + 3 * 10**9: "3.000", 0: "-"}
        assert columns["vip"][0] == "[fd00::1]:8443" and columns["client"][0] == "10.0.0.7:1000"


def test_config_addresses_macs_durations():
    cfg = np.zeros(1, LB_CONFIG_DTYPE)
    cfg["lb_addr4"] = [10, 103, 0, 1]
    cfg["lb_addr6"][0, :2] = [0xFD, 0x00]
    cfg["src_mac"] = [2, 0, 0, 0, 0, 0xAB]
    cfg["initial_lease_ns"] = 3 * 10**9
    columns = entry_columns(np.zeros(1, [("index", "<u4")]), cfg, NOW_NS)
    assert columns["lb_addr4"] == ["10.103.0.1"] and columns["lb_addr6"] == ["fd00::"]
    assert columns["src_mac"] == ["02:00:00:00:00:ab"]
    assert columns["initial_lease_s"] == ["3.000"] and columns["close_linger_s"] == ["-"]


def test_lines_one_per_entry_and_empty():
    out = io.StringIO()
    print_lines(entry_columns(*conns([NOW_NS + 10**9] * 4), NOW_NS), out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and lines[0].split()[3] == "lease_expiry_in_s"
    assert all(len(line.split()) == 9 for line in lines)
    out = io.StringIO()
    print_lines(entry_columns(*conns([]), NOW_NS), out)
    assert out.getvalue().splitlines()[1:] == ["(empty)"]


def test_table_has_every_column_of_any_row(capsys):
    print_table("connpub attachments", [{"attachment": "ns/lb0", "role": "lb", "forwarded": 3},
                                        {"attachment": "ns/srv0", "role": "server",
                                         "tracked": 42}])
    out = capsys.readouterr().out
    assert "tracked" in out and "42" in out and "forwarded" in out
    print_table("nothing", [])
    assert capsys.readouterr().out.splitlines() == ["nothing", "(empty)"]
