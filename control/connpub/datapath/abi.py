"""The one ABI module: Python mirrors of the C structs, enums and flag #defines of bpf/ (the C
headers are the source) and of the wire format, as numpy dtypes and constants.
tests/test_abi.py parses the enums and #defines from the headers and checks every name and
value here; tests/test_structs.py checks the dtypes' sizes and offsets against the tables bcc
loads."""

from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------------------------------------
# flow key (bpf/include/flow.h: struct flow_key, 40 bytes; ports in network order)
# ---------------------------------------------------------------------------------------------

FLOW_KEY_DTYPE = np.dtype(
    [
        ("client_addr", "u1", 16),
        ("vip_addr", "u1", 16),
        ("client_port", ">u2"),
        ("vip_port", ">u2"),
        ("proto", "u1"),
        ("pad", "u1", 3),
    ]
)
assert FLOW_KEY_DTYPE.itemsize == 40

# ---------------------------------------------------------------------------------------------
# server-node maps (bpf/server/server_structs.h); host byte order except the tuple's ports.
# tests/test_structs.py checks every size and offset against the tables bcc loads.
# ---------------------------------------------------------------------------------------------

SKETCH_PACKETS = 8  # SKETCH_PACKETS of bpf/server/server_consts.h

# enum granularity_level (bpf/include/flow.h)
LEVEL_FLOW, LEVEL_SESSION, LEVEL_APPLICATION, LEVEL_SUBNET = 0, 1, 2, 3
LEVEL_COUNT = 4

FLOW_VALUE_DTYPE = np.dtype(
    [
        ("packets", "<u8"),
        ("bytes", "<u8"),
        ("first_seen_ns", "<u8"),
        ("last_seen_ns", "<u8"),
        ("class_gen", "<u4"),
        ("tcp_flags", "u1"),
        ("level", "u1"),
        ("closed", "u1"),
        ("sketch_count", "u1"),
        ("sketch_size", "<u2", SKETCH_PACKETS),
        ("sketch_gap_us", "<u4", SKETCH_PACKETS),
        ("sketch_last_ktime", "<u8"),
        ("sock_changed_ns", "<u8"),
        ("sock_epoch", "<u4"),
        ("sock_state", "u1"),
        ("sock_pad", "u1", 3),
    ]
)

AGG_KEY_DTYPE = np.dtype([("masked", FLOW_KEY_DTYPE), ("level", "u1"), ("pad", "u1", 3)])

AGG_VALUE_DTYPE = np.dtype(
    [
        ("packets", "<u8"),
        ("bytes", "<u8"),
        ("last_seen_ns", "<u8"),
        ("active_flows", "<i8"),
        ("total_flows", "<u8"),
    ]
)

SERVER_CONFIG_DTYPE = np.dtype([("levels_gen", "<u4"), ("default_level", "u1"), ("pad", "u1", 3)])

# enum server_stat, in order. The first SERVER_OUTCOMES are outcomes: one per packet.
SERVER_STATS = (
    "tracked",
    "non_ip",
    "truncated",
    "malformed",
    "fragment",
    "unsupported",
    "table_full",
    "new_flow",
    "flow_closed",
    "flow_reopened",
    "level_changed",
    "bytes",
)
SERVER_OUTCOMES = 7  # STAT_OUTCOME_COUNT of enum server_stat
SERVER_OUTCOME_NAMES = SERVER_STATS[:SERVER_OUTCOMES]

CLASS_LEVEL_DTYPE = np.dtype("u1")
U32_DTYPE = np.dtype("<u4")
U64_DTYPE = np.dtype("<u8")

# ---------------------------------------------------------------------------------------------
# wire format (docs/protocol.md; owned by connpub.protocol.wire). Packed, big-endian, no implicit
# padding: every reserved byte is explicit and must be zero on the wire.
# ---------------------------------------------------------------------------------------------

# struct class_key of bpf/include/flow.h (20 bytes), also the key of a DIRECTIVE entry.
CLASS_KEY_DTYPE = np.dtype(
    [("vip_addr", "u1", 16), ("vip_port", ">u2"), ("proto", "u1"), ("pad", "u1")]
)
assert CLASS_KEY_DTYPE.itemsize == 20

# Common header of PUBLISH, DIRECTIVE and RESYNC-REQUEST packets (32 bytes).
WIRE_HEADER_DTYPE = np.dtype(
    [
        ("magic", ">u4"),
        ("version", "u1"),
        ("type", "u1"),
        ("reserved", ">u2"),
        ("sender_id", ">u4"),
        ("sequence", ">u8"),
        ("timestamp_ns", ">u8"),
        ("entry_count", ">u2"),
        ("reserved2", ">u2"),
    ]
)
assert WIRE_HEADER_DTYPE.itemsize == 32

# One PUBLISH entry (72 bytes).
PUBLISH_ENTRY_DTYPE = np.dtype(
    [
        ("level", "u1"),
        ("flags", "u1"),
        ("confidence", ">u2"),  # Q0.16 fixed point: confidence = value / 65535
        ("backend_id", ">u4"),
        ("key", FLOW_KEY_DTYPE),  # flow_key ANDed with the mask of (level, family)
        ("flow_count", ">u4"),
        ("bytes", ">u8"),
        ("last_activity_age_ms", ">u4"),  # header timestamp minus last activity, in ms
        ("predicted_remaining_ms", ">u4"),  # lease asked for; 0 = no prediction (baseline k*T)
        ("reserved", ">u4"),
    ]
)
assert PUBLISH_ENTRY_DTYPE.itemsize == 72

# One DIRECTIVE entry (24 bytes): traffic class -> granularity level.
DIRECTIVE_ENTRY_DTYPE = np.dtype(
    [("class_key", CLASS_KEY_DTYPE), ("level", "u1"), ("reserved", "u1", 3)]
)
assert DIRECTIVE_ENTRY_DTYPE.itemsize == 24


# ---------------------------------------------------------------------------------------------
# LB-node maps (bpf/lb/lb_structs.h); host byte order except the tuple's ports and lb_addr4.
# tests/test_lb_xdp.py checks every size and offset against the tables bcc loads.
# ---------------------------------------------------------------------------------------------

# struct vip_meta: value of `vips` (key: CLASS_KEY_DTYPE, the VIP is a traffic class).
LB_VIP_META_DTYPE = np.dtype(
    [("service_id", "<u4"), ("vip_index", "<u4"), ("flags", "<u4"), ("level", "u1"),
     ("other_levels", "u1"), ("holds_flows", "u1"), ("pad", "u1")]
)

# struct backend: value of `backends` (key: backend id, u32; id 0 is never used).
LB_BACKEND_DTYPE = np.dtype(
    [("addr", "u1", 16), ("mac", "u1", 6), ("is_v6", "u1"), ("flags", "u1"), ("services", "<u8")]
)

# struct conn_value: value of `conns` (key: FLOW_KEY_DTYPE).
LB_CONN_DTYPE = np.dtype(
    [("lease_expiry_ns", "<u8"), ("created_ns", "<u8"), ("backend_id", "<u4"), ("level", "u1"),
     ("flags", "u1"), ("vip_index", "<u2")]
)

# struct agg_lease_key: key of `agg_leases`; backend_id 0 (AGG_OWN_ENTRY) = the aggregate's own
# entry, else the cover entry of that backend's flows (docs/lb.md "Aggregates").
LB_AGG_LEASE_KEY_DTYPE = np.dtype([("agg", AGG_KEY_DTYPE), ("backend_id", "<u4")])

# struct agg_lease: value of `agg_leases`.
LB_AGG_LEASE_DTYPE = np.dtype(
    [("lease_expiry_ns", "<u8"), ("created_ns", "<u8"), ("backend_id", "<u4"),
     ("flow_count", "<u4"), ("vip_index", "<u2"), ("pad", "u1", 6)]
)

# struct lb_config: value of `config` [0].
LB_CONFIG_DTYPE = np.dtype(
    [
        ("lb_addr6", "u1", 16),
        ("lb_addr4", "u1", 4),  # network order, as on the wire
        ("mtu", "<u4"),
        ("initial_lease_ns", "<u8"),
        ("src_mac", "u1", 6),
        ("gateway_mac", "u1", 6),
        ("use_redirect", "u1"),
        ("pad", "u1", 3),
        ("close_linger_ns", "<u8"),
    ]
)

# struct lb_stats: value of `vip_stats` (key: vip_index) and `backend_stats` (key: backend id).
LB_STATS_DTYPE = np.dtype(
    [("packets", "<u8"), ("bytes", "<u8"), ("new_flows", "<u8"), ("lease_hits", "<u8"),
     ("agg_hits", "<u8"), ("lease_misses", "<u8"), ("agg_inserts", "<u8")]
)

# enum lb_stat, in order. The first LB_OUTCOMES are outcomes: one per packet.
LB_STATS = (
    "forwarded",
    "not_vip",
    "non_ip",
    "truncated",
    "malformed",
    "fragment",
    "unsupported",
    "tunnelled",
    "no_backend",
    "too_big",
    "encap_failed",
    "no_config",
    "new_flow",
    "lease_hit",
    "agg_hit",
    "lease_miss",
    "syn_reuse",
    "midstream_new",
    "backend_gone",
    "conn_insert_failed",
    "client_closed",
    "bytes",
    "agg_insert",
    "agg_member",
    "agg_miss",
    "transition_flow",
    "held_hit",
    "held_dropped",
)
LB_OUTCOMES = 12  # STAT_OUTCOME_COUNT of enum lb_stat
LB_OUTCOME_NAMES = LB_STATS[:LB_OUTCOMES]

# flag and marker #defines of bpf/lb/lb_structs.h and its tunables of bpf/lb/lb_consts.h
VIP_F_HASH_CLIENT_ONLY = 0x1  # struct vip_meta flags: Maglev hash over the client address only
BACKEND_F_PRESENT = 0x1  # struct backend flags: the slot holds a backend
BACKEND_F_DRAINING = 0x2  # no new flows; flows holding a lease stay
CONN_F_CLIENT_CLOSED = 0x01  # struct conn_value flags: the client sent FIN/RST
AGG_OWN_ENTRY = 0  # agg_lease_key.backend_id of an aggregate's own entry (else a cover entry)
MAX_CONNS = 1_048_576  # default size of the LB connection table

# ---------------------------------------------------------------------------------------------
# TCP socket-state program (bpf/tcpstate/tcpstate_structs.h); key: FLOW_KEY_DTYPE
# ---------------------------------------------------------------------------------------------

# struct sock_state: value of `tcp_sockets`.
SOCK_STATE_DTYPE = np.dtype(
    [("changed_ns", "<u8"), ("state", "u1"), ("old_state", "u1"), ("pad", "u1", 6)]
)

# enum tcpstate_stat, in order.
TCPSTATE_STATS = (
    "events",
    "other_netns",
    "established",
    "left_established",
    "ignored",
    "map_full",
    "flow_stamped",
    "no_flow",
)

# ---------------------------------------------------------------------------------------------
# registry: how to decode every pinned map, per role (used by `connpub maps` and the agents)
# ---------------------------------------------------------------------------------------------

MAP_LAYOUTS: dict[str, dict[str, tuple[np.dtype, np.dtype]]] = {
    "server": {
        "flows": (FLOW_KEY_DTYPE, FLOW_VALUE_DTYPE),
        "aggregates": (AGG_KEY_DTYPE, AGG_VALUE_DTYPE),
        "class_levels": (CLASS_KEY_DTYPE, CLASS_LEVEL_DTYPE),
        "masks": (U32_DTYPE, FLOW_KEY_DTYPE),
        "config": (U32_DTYPE, SERVER_CONFIG_DTYPE),
        "stats": (U32_DTYPE, U64_DTYPE),
    },
    "lb": {
        "vips": (CLASS_KEY_DTYPE, LB_VIP_META_DTYPE),
        "vip_filter": (U32_DTYPE, U32_DTYPE),
        "maglev": (U32_DTYPE, U32_DTYPE),
        "maglev_bank": (U32_DTYPE, U32_DTYPE),
        "backends": (U32_DTYPE, LB_BACKEND_DTYPE),
        "conns": (FLOW_KEY_DTYPE, LB_CONN_DTYPE),
        "held": (FLOW_KEY_DTYPE, LB_CONN_DTYPE),
        "agg_leases": (LB_AGG_LEASE_KEY_DTYPE, LB_AGG_LEASE_DTYPE),
        "masks": (U32_DTYPE, FLOW_KEY_DTYPE),
        "config": (U32_DTYPE, LB_CONFIG_DTYPE),
        "vip_stats": (U32_DTYPE, LB_STATS_DTYPE),
        "backend_stats": (U32_DTYPE, LB_STATS_DTYPE),
        "stats": (U32_DTYPE, U64_DTYPE),
    },
    "tcpstate": {
        "tcp_sockets": (FLOW_KEY_DTYPE, SOCK_STATE_DTYPE),
        "tcpstate_stats": (U32_DTYPE, U64_DTYPE),
        "tcpstate_epoch": (U32_DTYPE, U32_DTYPE),
    },
}

# Names of the entries of each role's per-CPU `stats` array, in enum order.
STAT_NAMES: dict[str, tuple[str, ...]] = {"server": SERVER_STATS, "lb": LB_STATS,
                                          "tcpstate": TCPSTATE_STATS}
