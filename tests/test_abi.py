"""The C headers under bpf/ are the source of the ABI: their enums and flag / tunable #defines
are parsed here (regular expressions over the header text) and every Python mirror in
connpub.datapath.abi (and the modules that re-export them) must have the same names, order and
values. Struct sizes and offsets are checked against the tables bcc loads in
tests/test_structs.py. No root needed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from connpub.datapath import abi, lbctl, maglev, masks
from connpub.paths import BPF_DIR
from connpub.sim import engine
from connpub.traffic import workload

COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)


def header_text(*relative: str) -> str:
    return "\n".join(COMMENT.sub("", (BPF_DIR / r).read_text()) for r in relative)


def parse_enum(text: str, name: str) -> dict[str, int]:
    """Members of `enum name { ... };` with their values (C rules: implicit = previous + 1,
    `= OTHER` refers to an earlier member)."""
    match = re.search(rf"enum\s+{name}\s*\{{(.*?)\}};", text, re.S)
    assert match, f"enum {name} not found"
    values: dict[str, int] = {}
    nxt = 0
    for item in (part.strip() for part in match.group(1).split(",")):
        if not item:
            continue
        member, _, expr = (s.strip() for s in item.partition("="))
        if expr:
            nxt = values[expr] if expr in values else int(expr, 0)
        values[member] = nxt
        nxt += 1
    return values


def parse_defines(text: str) -> dict[str, str]:
    return dict(re.findall(r"^\s*#define\s+([A-Z_][A-Z0-9_]*)\s+(\S+)", text, re.M))


def define_int(defines: dict[str, str], name: str) -> int:
    return int(defines[name].rstrip("ULul"), 0)


def stat_names(enum: dict[str, int]) -> tuple[tuple[str, ...], int]:
    """(names in enum order without the STAT_ prefix, lower case, markers left out; the
    outcome count)."""
    markers = {"STAT_OUTCOME_COUNT", "STAT_COUNT", "TSTAT_COUNT"}
    members = sorted((v, k) for k, v in enum.items() if k not in markers)
    assert [v for v, _ in members] == list(range(len(members))), "enum values not dense"
    prefix = re.compile(r"^T?STAT_")
    names = tuple(prefix.sub("", k).lower() for _, k in members)
    return names, enum.get("STAT_OUTCOME_COUNT", len(names))


@pytest.mark.parametrize("role, header, enum, names, outcomes", [
    ("lb", "lb/lb_structs.h", "lb_stat", abi.LB_STATS, abi.LB_OUTCOMES),
    ("server", "server/server_structs.h", "server_stat", abi.SERVER_STATS, abi.SERVER_OUTCOMES),
    ("tcpstate", "tcpstate/tcpstate_structs.h", "tcpstate_stat", abi.TCPSTATE_STATS, None),
])
def test_stat_names_are_the_c_enums(role, header, enum, names, outcomes):
    c_names, c_outcomes = stat_names(parse_enum(header_text(header), enum))
    assert names == c_names
    assert abi.STAT_NAMES[role] == c_names
    if outcomes is not None:
        assert outcomes == c_outcomes
    assert abi.LB_STATS[: abi.LB_OUTCOMES] == abi.LB_OUTCOME_NAMES
    assert abi.SERVER_STATS[: abi.SERVER_OUTCOMES] == abi.SERVER_OUTCOME_NAMES


def test_levels_are_the_c_enum():
    levels = parse_enum(header_text("include/flow.h"), "granularity_level")
    assert levels == {"LEVEL_FLOW": 0, "LEVEL_SESSION": 1, "LEVEL_APPLICATION": 2,
                      "LEVEL_SUBNET": 3, "LEVEL_COUNT": 4}
    assert (abi.LEVEL_FLOW, abi.LEVEL_SESSION, abi.LEVEL_APPLICATION, abi.LEVEL_SUBNET,
            abi.LEVEL_COUNT) == (0, 1, 2, 3, 4)
    assert masks.LEVEL_COUNT == abi.LEVEL_COUNT and masks.MASK_SLOTS == 2 * abi.LEVEL_COUNT


def test_flags_and_tunables_are_the_c_defines():
    lb = parse_defines(header_text("lb/lb_structs.h", "lb/lb_consts.h"))
    for name in ("VIP_F_HASH_CLIENT_ONLY", "BACKEND_F_PRESENT", "BACKEND_F_DRAINING",
                 "CONN_F_CLIENT_CLOSED", "AGG_OWN_ENTRY", "MAX_CONNS"):
        assert getattr(abi, name) == define_int(lb, name), name
    # the re-exports are the same objects
    assert lbctl.CONN_F_CLIENT_CLOSED == abi.CONN_F_CLIENT_CLOSED
    assert lbctl.BACKEND_F_PRESENT == abi.BACKEND_F_PRESENT
    assert lbctl.AGG_OWN_ENTRY == abi.AGG_OWN_ENTRY
    assert maglev.VIP_F_HASH_CLIENT_ONLY == abi.VIP_F_HASH_CLIENT_ONLY
    assert define_int(lb, "FLOW_HASH_SEED") == maglev.FLOW_HASH_SEED
    assert define_int(lb, "MAGLEV_SIZE") == maglev.DEFAULT_SIZE
    assert define_int(lb, "MAX_CONNS") == engine.LB_MAX_CONNS
    server = parse_defines(header_text("server/server_consts.h"))
    assert abi.SKETCH_PACKETS == define_int(server, "SKETCH_PACKETS") == workload.FIRST_N
    flow = parse_defines(header_text("include/flow.h"))
    assert flow["MASK_SLOTS"] == "(LEVEL_COUNT"  # (LEVEL_COUNT * 2): as masks.MASK_SLOTS


def test_no_hand_swapped_byte_order_constants():
    """Network-order constants are written bpf_htons(HOST_VALUE), not pre-swapped."""
    for path in Path(BPF_DIR).rglob("*.[ch]"):
        text = COMMENT.sub("", path.read_text())
        assert not re.search(r"#define\s+\w+_BE\s+0x", text), path
