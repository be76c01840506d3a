"""LB-node aggregate affinity (bpf/lb/lb.c pick_in_aggregate, docs/lb.md "Aggregates"): fixture
packets through BPF_PROG_TEST_RUN at class levels 1-3 -- one backend and one entry per aggregate,
level changes, lease misses, draining and removal -- and the LB agent's aggregate lease writes."""

from __future__ import annotations

import numpy as np
import pytest
from connpub.datapath import lbctl, maglev
from connpub.datapath.abi import FLOW_KEY_DTYPE, LB_AGG_LEASE_DTYPE
from connpub.datapath.clock import datapath_clock
from connpub.datapath.masks import apply_masks
from scapy.layers.inet import IP
from test_lb_xdp import (  # the module-scoped program and the packet helpers
    BACKENDS,
    MAGLEV_SIZE,
    VIP4,
    clean,  # noqa: F401 - fixture
    encapsulated,
    flow_key_of,
    lb,  # noqa: F401 - fixture
    run,
    tcp4,
    udp4,
)

pytestmark = pytest.mark.root

S = 10**9
CLIENT = "10.100.7.9"


@pytest.fixture
def at_level(clean):  # noqa: F811
    """The v4 TCP and UDP VIPs at a level (set by the test), back at 0 afterwards."""
    keys = np.concatenate([lbctl.vip_key(VIP4, 80, "tcp"), lbctl.vip_key(VIP4, 53, "udp")])

    def set_level(level: int) -> None:
        lbctl.set_vip_levels(clean.pin_dir, keys, level)

    yield set_level
    set_level(0)


def aggregate_backend(lb, packet, level: int) -> int:  # noqa: F811
    """The backend Maglev gives the packet's aggregate (its tuple masked at `level`)."""
    table = lbctl.maglev_table(lb.pin_dir, 0)
    masked = apply_masks(flow_key_of(packet), level)
    return int(table[maglev.slots_of(masked, MAGLEV_SIZE)[0]])


def disagreeing_client(lb, third_octets: range, levels: tuple[int, int] = (2, 3),  # noqa: F811
                       dport: int = 80) -> tuple[str, int, int]:
    """(a client address in 10.100.<third_octets>.0/24 whose aggregates at the two levels (to
    VIP port dport) are on different backends, the first level's backend, the second's)."""
    finer, coarser = levels
    client = next(f"10.100.{i}.{j}" for i in third_octets for j in range(1, 250)
                  if aggregate_backend(lb, tcp4(src=f"10.100.{i}.{j}", dport=dport), finer)
                  != aggregate_backend(lb, tcp4(src=f"10.100.{i}.{j}", dport=dport), coarser))
    return client, aggregate_backend(lb, tcp4(src=client, dport=dport), finer), \
        aggregate_backend(lb, tcp4(src=client, dport=dport), coarser)


def level3_member_then_level2_member(lb, at_level, client: str, sport: int) -> None:  # noqa: F811
    """At level 3 a member (client port sport) makes the client's level-3 aggregate, made 2 s
    older; at level 2 a member (sport + 1) makes its level-2 aggregate, disagreeing, so it gets
    a transition flow entry."""
    at_level(3)
    assert run(lb, tcp4(src=client, sport=sport)).stats["agg_insert"] == 1
    make_older(lb, 3, tcp4(src=client), 2)
    at_level(2)
    newer = run(lb, tcp4(src=client, sport=sport + 1))
    assert newer.stats["agg_insert"] == 1 and newer.stats["transition_flow"] == 1


def write_own_entry(lb, level: int, masked, backend_id: int, expiry_ns: int,  # noqa: F811
                    created_ns: int = 0) -> None:
    """Set an aggregate's own entry directly (e.g. expired, on a given backend, made then)."""
    value = np.zeros(1, LB_AGG_LEASE_DTYPE)
    value["backend_id"], value["lease_expiry_ns"], value["flow_count"] = backend_id, expiry_ns, 1
    value["created_ns"] = created_ns
    with lbctl.open_map(lb.pin_dir, "agg_leases") as table:
        table.update(lbctl.agg_lease_keys(level, masked), value)


def make_older(lb, level: int, packet, seconds: int) -> None:  # noqa: F811
    """Move the creation time of the packet's aggregate at `level` back (the datapath clock is
    jiffies: entries made in one test share a creation time)."""
    key = lbctl.agg_lease_keys(level, apply_masks(flow_key_of(packet), level))
    with lbctl.open_map(lb.pin_dir, "agg_leases") as table:
        value = np.array(table.lookup(key[0])).reshape(1)
        value["created_ns"] -= seconds * S
        table.update(key, value)


def own_entries(lb):  # noqa: F811
    keys, values = lbctl.read_agg_leases(lb.pin_dir)
    return lbctl.own_aggregates(keys, values)


def vip_row(lb, port=80):  # noqa: F811
    return next(v for v in lbctl.list_vips(lb.pin_dir) if v["vip"] == VIP4 and v["port"] == port)


def test_members_of_one_aggregate_get_one_backend_and_one_entry(clean, at_level):  # noqa: F811
    at_level(2)
    before = vip_row(clean)
    backend = aggregate_backend(clean, tcp4(src=CLIENT), 2)
    first = run(clean, tcp4(src=CLIENT, sport=50000))
    assert first.stats == {"forwarded": 1, "new_flow": 1, "agg_insert": 1,
                           "bytes": len(tcp4()[IP])}
    assert first.data == encapsulated(tcp4(src=CLIENT, sport=50000), backend)
    for sport in range(50001, 50020):  # 19 more member flows: SYN, then a data packet each
        syn = run(clean, tcp4(src=CLIENT, sport=sport))
        assert syn.stats == {"forwarded": 1, "agg_hit": 1, "agg_member": 1,
                             "bytes": len(tcp4()[IP])}
        assert syn.data == encapsulated(tcp4(src=CLIENT, sport=sport), backend)
        data = run(clean, tcp4(src=CLIENT, sport=sport, flags="A"))
        assert data.stats == {"forwarded": 1, "agg_hit": 1, "agg_member": 1,
                              "bytes": len(tcp4()[IP])}
    keys, values = lbctl.read_agg_leases(clean.pin_dir)
    assert len(keys) == 1 and int(keys["backend_id"][0]) == lbctl.AGG_OWN_ENTRY
    assert int(keys["agg"]["level"][0]) == 2
    assert keys["agg"]["masked"][0] == apply_masks(flow_key_of(tcp4(src=CLIENT)), 2)[0]
    assert int(values["backend_id"][0]) == backend and int(values["flow_count"][0]) == 20
    assert int(values["lease_expiry_ns"][0]) - int(values["created_ns"][0]) >= 3 * S
    assert len(lbctl.read_conns(clean.pin_dir)[0]) == 0  # no flow entry for any member
    after = vip_row(clean)
    assert after["agg_inserts"] - before["agg_inserts"] == 1
    assert after["agg_hits"] - before["agg_hits"] == 38
    assert after["new_flows"] - before["new_flows"] == 1
    # another client is another aggregate: a second entry
    run(clean, tcp4(src="10.100.7.10", sport=50000))
    assert len(own_entries(clean)[0]) == 2


def test_level_3_aggregates_a_client_subnet_and_udp(clean, at_level):  # noqa: F811
    at_level(3)
    backend = aggregate_backend(clean, tcp4(src="10.100.9.1"), 3)
    for host in range(1, 11):
        got = run(clean, tcp4(src=f"10.100.9.{host}", sport=51000 + host))
        assert got.data == encapsulated(tcp4(src=f"10.100.9.{host}", sport=51000 + host),
                                        backend)
    udp_backend = aggregate_backend(clean, udp4(src="10.100.9.1"), 3)
    for host in range(1, 4):
        got = run(clean, udp4(src=f"10.100.9.{host}", sport=52000 + host))
        assert got.data == encapsulated(udp4(src=f"10.100.9.{host}", sport=52000 + host),
                                        udp_backend)
    keys, values = own_entries(clean)
    assert len(keys) == 2 and sorted(values["flow_count"].tolist()) == [1, 10]


def test_level_change_keeps_existing_flows_on_their_backend(clean, at_level):  # noqa: F811
    """Flows created at level 0 keep their connection entry and backend when the class goes to
    level 2; new flows of the same client join the aggregate (its own backend); once the old
    flows' leases run out, the server's aggregate publish covers them on their backend."""
    pin_dir = clean.pin_dir
    aggregate_on = aggregate_backend(clean, tcp4(src=CLIENT), 2)
    table = lbctl.maglev_table(pin_dir, 0)
    sports = [p for p in range(53000, 53200)
              if int(table[maglev.slots_of(flow_key_of(tcp4(src=CLIENT, sport=p)),
                                           MAGLEV_SIZE)[0]]) != aggregate_on][:3]
    old = {p: run(clean, tcp4(src=CLIENT, sport=p)) for p in sports}
    assert all(o.stats["new_flow"] == 1 for o in old.values())
    held_by = {p: int(v) for p, v in zip(
        sports, table[maglev.slots_of(np.concatenate(
            [flow_key_of(tcp4(src=CLIENT, sport=p)) for p in sports]), MAGLEV_SIZE)],
        strict=True)}
    at_level(2)
    new = run(clean, tcp4(src=CLIENT, sport=53500))
    assert new.stats["agg_insert"] == 1
    assert new.data == encapsulated(tcp4(src=CLIENT, sport=53500), aggregate_on)
    for p in sports:
        got = run(clean, tcp4(src=CLIENT, sport=p, flags="A"))
        assert got.stats["lease_hit"] == 1
        assert got.data == encapsulated(tcp4(src=CLIENT, sport=p, flags="A"), held_by[p])
    # the old flows' own leases run out; their server publishes its level-2 aggregate
    keys = np.concatenate([flow_key_of(tcp4(src=CLIENT, sport=p)) for p in sports]).astype(
        FLOW_KEY_DTYPE)
    lbctl.apply_flow_leases(pin_dir, keys, [held_by[p] for p in sports], 1, allow_shorten=True)
    publisher = held_by[sports[0]]
    now = datapath_clock().now_ns()
    masked = apply_masks(keys[:1], 2)
    result = lbctl.apply_aggregate_leases(pin_dir, lbctl.agg_lease_keys(2, masked, publisher),
                                          now + 30 * S, flow_counts=1, now_ns=now)
    assert result == {"written": 1, "unchanged": 0, "created": 1, "covers": 1}
    got = run(clean, tcp4(src=CLIENT, sport=sports[0], flags="A"))
    assert got.stats["agg_hit"] == 1 and "lease_miss" not in got.stats
    assert got.data == encapsulated(tcp4(src=CLIENT, sport=sports[0], flags="A"), publisher)
    # the aggregate's own entry still names its backend: new members keep going there
    own_keys, own = own_entries(clean)
    assert len(own_keys) == 1 and int(own["backend_id"][0]) == aggregate_on
    # a flow held by a backend with no cover entry and no lease: a lease miss, joins the aggregate
    uncovered = [p for p in sports if held_by[p] != publisher]
    if uncovered:
        got = run(clean, tcp4(src=CLIENT, sport=uncovered[0], flags="A"))
        assert got.stats["lease_miss"] == 1
        assert got.data == encapsulated(tcp4(src=CLIENT, sport=uncovered[0], flags="A"),
                                        aggregate_on)


def test_members_keep_their_backend_when_the_class_goes_back_to_level_0(clean, at_level):  # noqa: F811
    at_level(2)
    backend = aggregate_backend(clean, tcp4(src=CLIENT), 2)
    run(clean, tcp4(src=CLIENT, sport=54000))
    at_level(0)
    data = run(clean, tcp4(src=CLIENT, sport=54000, flags="A"))
    assert data.stats == {"forwarded": 1, "agg_hit": 1, "agg_member": 1,
                          "bytes": len(tcp4()[IP])}
    assert data.data == encapsulated(tcp4(src=CLIENT, sport=54000, flags="A"), backend)
    fresh = run(clean, tcp4(src=CLIENT, sport=54001))  # a new connection at level 0: a flow entry
    assert fresh.stats["new_flow"] == 1 and "agg_insert" not in fresh.stats
    assert len(lbctl.read_conns(clean.pin_dir)[0]) == 1


def test_a_new_member_that_only_the_oldest_earlier_aggregate_agrees_with_gets_an_entry(
        clean, at_level):  # noqa: F811
    """Class 3 -> 2 -> 1 with both earlier aggregates valid: a new level-1 member on the level-3
    aggregate's backend, but not the level-2 one's, gets a connection entry. Without it, once
    the level-3 aggregate expires (its members ended), the level-2 aggregate is the oldest and
    takes the flow's packets (seen in the lab: ConnectionResetError, 0 lease misses)."""
    flow = tcp4(src=CLIENT, sport=47000)
    on1 = aggregate_backend(clean, flow, 1)
    elsewhere = next(b for b in (1, 2, 3) if b != on1)
    now = datapath_clock().now_ns()
    at_level(3)
    at_level(2)
    at_level(1)
    for level, backend_id, age_s in ((3, on1, 10), (2, elsewhere, 5)):  # level 3 the oldest
        write_own_entry(clean, level, apply_masks(flow_key_of(flow), level), backend_id,
                        now + 60 * S, created_ns=now - age_s * S)
    syn = run(clean, flow)
    assert syn.stats["transition_flow"] == 1
    assert syn.data == encapsulated(flow, on1)
    write_own_entry(clean, 3, apply_masks(flow_key_of(flow), 3), on1, now - S)
    ack = tcp4(src=CLIENT, sport=47000, flags="A")
    got = run(clean, ack)
    assert got.stats["lease_hit"] == 1
    assert got.data == encapsulated(ack, on1)


def test_expired_aggregate_and_non_syn_counts_a_lease_miss(clean, at_level):  # noqa: F811
    at_level(2)
    pin_dir = clean.pin_dir
    packet = tcp4(src=CLIENT, sport=55000, flags="A")
    masked = apply_masks(flow_key_of(packet), 2)
    backend = aggregate_backend(clean, packet, 2)
    lbctl.apply_aggregate_leases(pin_dir, lbctl.agg_lease_keys(2, masked, backend), 5,
                                 now_ns=1)  # expired long ago
    before = vip_row(clean)
    got = run(clean, packet)
    assert got.stats == {"forwarded": 1, "lease_miss": 1, "agg_miss": 1, "new_flow": 1,
                         "agg_insert": 1, "bytes": len(packet[IP])}
    assert got.data == encapsulated(packet, backend)
    assert vip_row(clean)["lease_misses"] - before["lease_misses"] == 1
    # a SYN on an expired aggregate is a new member: no miss
    lbctl.apply_aggregate_leases(pin_dir, lbctl.agg_lease_keys(2, masked, backend), 5,
                                 allow_shorten=True, now_ns=1)
    got = run(clean, tcp4(src=CLIENT, sport=55001))
    assert "lease_miss" not in got.stats and got.stats["agg_insert"] == 1
    # UDP cannot tell a new flow: a miss only when the re-pick moves the aggregate
    udp = udp4(src=CLIENT, sport=55002)
    udp_masked = apply_masks(flow_key_of(udp), 2)
    udp_on = aggregate_backend(clean, udp, 2)
    moved_from = next(b for b in BACKENDS if b != udp_on)
    for held_by, misses in ((udp_on, 0), (moved_from, 1)):
        write_own_entry(clean, 2, udp_masked, held_by, 5)
        got = run(clean, udp)
        assert got.stats.get("lease_miss", 0) == misses and got.stats["agg_insert"] == 1
        assert got.data == encapsulated(udp, udp_on)


def test_draining_moves_no_live_aggregate_and_new_ones_avoid_it(clean, at_level):  # noqa: F811
    at_level(2)
    pin_dir = clean.pin_dir
    drained = aggregate_backend(clean, tcp4(src=CLIENT), 2)
    run(clean, tcp4(src=CLIENT, sport=56000))
    lbctl.drain_backend(pin_dir, drained)
    try:
        member = run(clean, tcp4(src=CLIENT, sport=56001))
        assert member.stats["agg_hit"] == 1
        assert member.data == encapsulated(tcp4(src=CLIENT, sport=56001), drained)
        # an aggregate that Maglev used to give the draining backend: placed elsewhere now
        other = next(f"10.100.{i}.{j}" for i in range(40, 60) for j in range(1, 250)
                     if aggregate_backend(clean, tcp4(src=f"10.100.{i}.{j}"), 2) != drained)
        got = run(clean, tcp4(src=other, sport=56002))
        assert got.stats["agg_insert"] == 1
        assert got.data != encapsulated(tcp4(src=other, sport=56002), drained)
        # its entry expires: the member's re-pick avoids the draining backend
        masked = apply_masks(flow_key_of(tcp4(src=CLIENT)), 2)
        lbctl.apply_aggregate_leases(pin_dir, lbctl.agg_lease_keys(2, masked, drained), 5,
                                     allow_shorten=True, now_ns=1)
        got = run(clean, tcp4(src=CLIENT, sport=56003))
        assert got.stats["agg_insert"] == 1
        _, values = own_entries(clean)
        assert drained not in values["backend_id"].tolist()
        assert got.data == encapsulated(tcp4(src=CLIENT, sport=56003),
                                        aggregate_backend(clean, tcp4(src=CLIENT), 2))
    finally:
        lbctl.drain_backend(pin_dir, drained, draining=False)


def test_removal_moves_only_the_removed_backends_aggregates(clean, at_level):  # noqa: F811
    at_level(2)
    pin_dir = clean.pin_dir
    clients = [f"10.100.{i}.{j}" for i in range(60, 62) for j in range(1, 100)]
    placed = {c: aggregate_backend(clean, tcp4(src=c), 2) for c in clients}
    for c in clients:
        run(clean, tcp4(src=c, sport=57000))
    # their servers' publishes: leased well past the test (a loaded machine is slow)
    keys = np.concatenate([flow_key_of(tcp4(src=c)) for c in clients]).astype(FLOW_KEY_DTYPE)
    lbctl.apply_aggregate_leases(pin_dir, lbctl.agg_lease_keys(2, apply_masks(keys, 2),
                                                               [placed[c] for c in clients]),
                                 datapath_clock().now_ns() + 120 * S)
    removed = 3
    lbctl.del_backend(pin_dir, removed)
    try:
        for c in clients:
            got = run(clean, tcp4(src=c, sport=57001))
            if placed[c] == removed:
                assert got.stats["backend_gone"] == 1 and got.stats["agg_insert"] == 1
                assert got.data == encapsulated(tcp4(src=c, sport=57001),
                                                aggregate_backend(clean, tcp4(src=c), 2))
            else:  # even where the rebuilt Maglev table now points elsewhere
                assert got.stats["agg_hit"] == 1, c
                assert got.data == encapsulated(tcp4(src=c, sport=57001), placed[c])
        assert any(placed[c] == removed for c in clients)
    finally:
        lbctl.add_backend(pin_dir, removed, BACKENDS[removed][0], services=(0,))


def test_aggregate_publishes_take_the_own_entry_or_a_cover(clean):  # noqa: F811
    pin_dir = clean.pin_dir
    now = datapath_clock().now_ns()
    key = flow_key_of(tcp4(src=CLIENT))
    masked = apply_masks(key, 2)
    result = lbctl.apply_aggregate_leases(pin_dir, lbctl.agg_lease_keys(2, masked, 1),
                                          now + 10 * S, flow_counts=4, now_ns=now)
    assert result == {"written": 1, "unchanged": 0, "created": 1, "covers": 0}
    keys, values = lbctl.read_agg_leases(pin_dir)
    assert len(keys) == 1 and int(keys["backend_id"][0]) == 0
    assert (int(values["backend_id"][0]), int(values["flow_count"][0])) == (1, 4)
    assert int(values["vip_index"][0]) == vip_row(clean)["vip_index"]
    assert int(values["lease_expiry_ns"][0]) == now + 10 * S
    # the same server again: only grows
    result = lbctl.apply_aggregate_leases(pin_dir, lbctl.agg_lease_keys(2, masked, 1),
                                          now + 5 * S, flow_counts=4, now_ns=now)
    assert result["unchanged"] == 1
    # another server while the entry is valid: a cover entry for its flows
    result = lbctl.apply_aggregate_leases(pin_dir, lbctl.agg_lease_keys(2, masked, 3),
                                          now + 7 * S, flow_counts=2, now_ns=now)
    assert result == {"written": 1, "unchanged": 0, "created": 1, "covers": 1}
    keys, values = lbctl.read_agg_leases(pin_dir)
    assert sorted(keys["backend_id"].tolist()) == [0, 3]
    # a CLOSED publish (create=False) of an unknown aggregate writes nothing
    other = apply_masks(flow_key_of(tcp4(src="10.100.7.200")), 2)
    assert lbctl.apply_aggregate_leases(pin_dir, lbctl.agg_lease_keys(2, other, 1), now,
                                        allow_shorten=True, create=False,
                                        now_ns=now)["written"] == 0
    # once the own entry expired, the next publisher takes it over
    result = lbctl.apply_aggregate_leases(pin_dir, lbctl.agg_lease_keys(2, masked, 1),
                                          now - 1, allow_shorten=True, now_ns=now)
    result = lbctl.apply_aggregate_leases(pin_dir, lbctl.agg_lease_keys(2, masked, 3),
                                          now + 9 * S, now_ns=now)
    assert result["covers"] == 0
    _, own = own_entries(clean)
    assert int(own["backend_id"][0]) == 3 and int(own["created_ns"][0]) == now
    # a CLOSED aggregate (cap): lowered to the given expiry, never raised
    capped = lbctl.apply_aggregate_leases(pin_dir, lbctl.agg_lease_keys(2, masked, 3),
                                          now + 4 * S, cap=True, create=False, now_ns=now)
    assert capped["written"] == 1
    assert int(own_entries(clean)[1]["lease_expiry_ns"][0]) == now + 4 * S
    assert lbctl.apply_aggregate_leases(pin_dir, lbctl.agg_lease_keys(2, masked, 3),
                                        now + 6 * S, cap=True, create=False,
                                        now_ns=now)["written"] == 0
    assert lbctl.purge_expired_aggregates(pin_dir, now + 8 * S) == 2  # the cover (7 s), own
    with pytest.raises(lbctl.ConnpubError, match="publishing backend"):
        lbctl.apply_aggregate_leases(pin_dir, lbctl.agg_lease_keys(2, masked), 5)


def test_after_a_level_change_old_and_new_members_each_keep_their_backend(clean, at_level):  # noqa: F811
    """Class 2 -> 3: the level-2 aggregate's members keep their backend (their non-SYN packets
    try the earlier level first); a new member whose level-3 aggregate is elsewhere gets a flow
    entry (transition_flow), so neither is misrouted; once the level-2 entries are gone,
    retire_other_levels stops the extra lookups."""
    pin_dir = clean.pin_dir
    client, on2, on3 = disagreeing_client(clean, range(70, 90))
    at_level(2)
    run(clean, tcp4(src=client, sport=58000))
    at_level(3)
    assert vip_row(clean)["other_levels"] == [2]
    new = run(clean, tcp4(src=client, sport=58001))
    assert new.stats["agg_insert"] == 1 and new.stats["transition_flow"] == 1
    assert new.data == encapsulated(tcp4(src=client, sport=58001), on3)
    keys, conns = lbctl.read_conns(pin_dir)
    assert len(keys) == 1 and int(conns["backend_id"][0]) == on3 and int(conns["level"][0]) == 3
    old = run(clean, tcp4(src=client, sport=58000, flags="A"))
    assert old.stats["agg_member"] == 1
    assert old.data == encapsulated(tcp4(src=client, sport=58000, flags="A"), on2)
    again = run(clean, tcp4(src=client, sport=58001, flags="A"))
    assert again.stats["lease_hit"] == 1
    assert again.data == encapsulated(tcp4(src=client, sport=58001, flags="A"), on3)
    # a member of the same subnet whose level-2 aggregate agrees with the level-3 one: no entry
    agreeing = next((f"10.100.{client.split('.')[2]}.{j}" for j in range(1, 250)
                     if aggregate_backend(clean, tcp4(src=f"10.100.{client.split('.')[2]}.{j}"),
                                          2) == on3), None)
    if agreeing is not None:
        got = run(clean, tcp4(src=agreeing, sport=58002))
        assert "transition_flow" not in got.stats
    # the level-2 entries expire: the bit goes, non-SYN packets look at level 3 only
    now = datapath_clock().now_ns()
    assert lbctl.retire_other_levels(pin_dir, now) == 1  # the UDP VIP's: it has no aggregate
    assert vip_row(clean)["other_levels"] == [2]  # the TCP VIP's level-2 entry is valid
    masked2 = apply_masks(flow_key_of(tcp4(src=client)), 2)
    write_own_entry(clean, 2, masked2, on2, 5)
    assert lbctl.retire_other_levels(pin_dir, now) == 1
    assert vip_row(clean)["other_levels"] == []
    late = run(clean, tcp4(src=client, sport=58000, flags="A"))
    assert late.stats["agg_hit"] == 1
    assert late.data == encapsulated(tcp4(src=client, sport=58000, flags="A"), on3)


def test_after_two_level_changes_an_old_member_follows_the_oldest_aggregate(clean, at_level):  # noqa: F811
    """Class 3 -> 2 -> 1: a level-3 member's tuple matches a valid level-3 and a valid level-2
    aggregate on another backend. The oldest is its own: every level-2 member that disagreed
    with the level-3 aggregate got a connection entry. (Tried level 2 first, the lab's old
    members were sent to the level-2 aggregate's server and reset: 999 of 100k flows.)"""
    client, on2, on3 = disagreeing_client(clean, range(110, 130))
    level3_member_then_level2_member(clean, at_level, client, 58100)
    at_level(1)
    assert vip_row(clean)["other_levels"] == [2, 3]
    old = tcp4(src=client, sport=58100, flags="A")
    got = run(clean, old)
    assert got.stats["agg_member"] == 1 and got.data == encapsulated(old, on3)
    second = tcp4(src=client, sport=58101, flags="A")
    got = run(clean, second)
    assert got.stats["lease_hit"] == 1 and got.data == encapsulated(second, on2)


def test_back_at_its_first_level_an_old_member_keeps_its_own_aggregate(clean, at_level):  # noqa: F811
    """Class 3 -> 2 -> 3 (the spread bound refined it, then allowed 3 again): a level-3 member
    matches the current level-3 aggregate and a valid level-2 one on another backend made in
    between. The level-3 one is older, so it is the member's (tried level 2 first, the lab reset
    92 of 100k flows, all of a VIP that went back to level 3)."""
    client, on2, on3 = disagreeing_client(clean, range(130, 150))
    level3_member_then_level2_member(clean, at_level, client, 58200)
    at_level(3)
    assert vip_row(clean)["other_levels"] == [2]
    old = tcp4(src=client, sport=58200, flags="A")
    got = run(clean, old)
    assert got.stats["agg_hit"] == 1 and got.data == encapsulated(old, on3)
    joined = run(clean, tcp4(src=client, sport=58202))  # a new member: the level-3 aggregate
    assert "transition_flow" not in joined.stats
    later = tcp4(src=client, sport=58202, flags="A")
    assert run(clean, later).data == encapsulated(later, on3)
    second = tcp4(src=client, sport=58201, flags="A")
    got = run(clean, second)
    assert got.stats["lease_hit"] == 1 and got.data == encapsulated(second, on2)


def test_a_shared_aggregate_keeps_another_ports_members_through_its_level_change(clean):  # noqa: F811
    """Levels 2-3 drop the VIP port: ports 80 and 8443 of one VIP share their aggregates, and
    the entry's vip_index is the class that made it (80). When 8443 goes 3 -> 2, its members
    on the shared level-3 aggregate keep their backend: retire_other_levels keeps 8443's bit
    while that entry is valid (it matched on vip_index and cleared it, and the next packet of
    each member was re-picked at level 2 onto another server: the lab's resets at 100k flows)."""
    pin_dir = clean.pin_dir
    lbctl.add_vip(pin_dir, VIP4, 8443, "tcp", service=0)
    both = np.concatenate([lbctl.vip_key(VIP4, 80, "tcp"), lbctl.vip_key(VIP4, 8443, "tcp")])
    try:
        client, _, on3 = disagreeing_client(clean, range(90, 110))
        lbctl.set_vip_levels(pin_dir, both, 3)
        made = run(clean, tcp4(src=client, sport=59000, dport=80))
        assert made.stats["agg_insert"] == 1
        member = run(clean, tcp4(src=client, sport=59001, dport=8443))
        assert member.stats["agg_hit"] == 1 and "agg_insert" not in member.stats
        lbctl.set_vip_levels(pin_dir, both[1:], 2)
        assert vip_row(clean, 8443)["other_levels"] == [3]
        assert lbctl.retire_other_levels(pin_dir, datapath_clock().now_ns()) == 0
        assert vip_row(clean, 8443)["other_levels"] == [3]
        data = tcp4(src=client, sport=59001, dport=8443, flags="A")
        got = run(clean, data)
        assert got.stats["agg_member"] == 1 and "agg_insert" not in got.stats
        assert got.data == encapsulated(data, on3)
        # the shared entry gone: the bit goes too
        masked3 = apply_masks(flow_key_of(tcp4(src=client)), 3)
        write_own_entry(clean, 3, masked3, on3, 5)
        assert lbctl.retire_other_levels(pin_dir, datapath_clock().now_ns()) == 1
        assert vip_row(clean, 8443)["other_levels"] == []
    finally:
        lbctl.set_vip_levels(pin_dir, both, 0)
        lbctl.del_vip(pin_dir, VIP4, 8443, "tcp")


def test_a_new_member_that_a_sibling_ports_older_aggregate_disagrees_with_gets_an_entry(
        clean):  # noqa: F811
    """Levels 2-3 drop the VIP port, so port 80's level-2 aggregate also covers port 8443's
    tuples. A new level-1 member of 8443 on another backend than that older aggregate gets a
    connection entry although 8443 was never at level 2 (no bit in other_levels yet): once 8443
    passes through level 2 the bit is set, and the older level-2 aggregate would take the
    flow's packets (seen in the lab, 800 flows, full: ConnectionResetError, 0 lease misses)."""
    pin_dir = clean.pin_dir
    lbctl.add_vip(pin_dir, VIP4, 8443, "tcp", service=0)
    port80, port8443 = lbctl.vip_key(VIP4, 80, "tcp"), lbctl.vip_key(VIP4, 8443, "tcp")
    try:
        # level 2 drops the VIP port: the 8443 tuple's level-2 aggregate is port 80's too
        client, on1, on2 = disagreeing_client(clean, range(110, 130), levels=(1, 2), dport=8443)
        lbctl.set_vip_levels(pin_dir, port80, 2)
        assert run(clean, tcp4(src=client, sport=59100, dport=80)).stats["agg_insert"] == 1
        make_older(clean, 2, tcp4(src=client), 5)
        lbctl.set_vip_levels(pin_dir, port8443, 1)
        assert vip_row(clean, 8443)["other_levels"] == []
        syn = run(clean, tcp4(src=client, sport=59101, dport=8443))
        assert syn.stats["agg_insert"] == 1 and syn.stats["transition_flow"] == 1
        assert syn.data == encapsulated(tcp4(src=client, sport=59101, dport=8443), on1)
        for level in (2, 1):  # 8443 passes through level 2: its bit is set
            lbctl.set_vip_levels(pin_dir, port8443, level)
        assert vip_row(clean, 8443)["other_levels"] == [2]
        ack = tcp4(src=client, sport=59101, dport=8443, flags="A")
        got = run(clean, ack)
        assert got.stats["lease_hit"] == 1
        assert got.data == encapsulated(ack, on1) != encapsulated(ack, on2)
    finally:
        lbctl.set_vip_levels(pin_dir, np.concatenate([port80, port8443]), 0)
        lbctl.del_vip(pin_dir, VIP4, 8443, "tcp")


def test_an_evicted_flow_from_before_a_level_change_keeps_its_backend(clean, at_level):  # noqa: F811
    """docs/lb.md "Held flows" (issue 15 item 12): a level-0 flow whose connection entry the LRU
    evicts after its class went to level 2 would be placed by its aggregate (another backend,
    which resets it). Its held copy (the agent's `hold_flows`) keeps it on its backend
    (`held_hit`); a SYN reusing the tuple is a new connection: the copy goes (`held_dropped`)
    and it joins the aggregate. A transition flow is held by the datapath itself. With no held
    flow left `retire_held` clears the VIP's holds_flows and misses stop looking there."""
    pin_dir = clean.pin_dir
    table = lbctl.maglev_table(pin_dir, 0)

    def full_backend(packet) -> int:
        return int(table[maglev.slots_of(flow_key_of(packet), MAGLEV_SIZE)[0]])

    sport = next(p for p in range(42000, 43000)
                 if full_backend(tcp4(src=CLIENT, sport=p))
                 != aggregate_backend(clean, tcp4(src=CLIENT), 2))
    flow = tcp4(src=CLIENT, sport=sport)
    own, member = full_backend(flow), aggregate_backend(clean, flow, 2)
    assert run(clean, flow).data == encapsulated(flow, own)  # level 0: its own entry
    at_level(2)
    assert vip_row(clean)["other_levels"] == []
    keys, conns = lbctl.read_conns(pin_dir)
    assert lbctl.hold_flows(pin_dir, keys, conns) == 1
    assert lbctl.hold_flows(pin_dir, keys, conns) == 0  # an equal copy is not rewritten
    with lbctl.open_map(pin_dir, "conns") as table_map:
        table_map.clear()  # the LRU evicted it
    ack = tcp4(src=CLIENT, sport=sport, flags="A")
    got = run(clean, ack)
    assert got.stats == {"forwarded": 1, "held_hit": 1, "lease_hit": 1,
                         "bytes": len(ack[IP])}
    assert got.data == encapsulated(ack, own)
    # the same without the copy: the aggregate places it on the other backend
    held_keys, _ = lbctl.read_held(pin_dir)
    assert lbctl.release_held(pin_dir, held_keys) == 1
    lost = run(clean, ack)
    assert lost.stats["midstream_new"] == 1 and lost.stats["agg_insert"] == 1
    assert "held_hit" not in lost.stats
    assert lost.data == encapsulated(ack, member)
    # a SYN reusing a held tuple: a new connection, a member of the aggregate
    assert lbctl.hold_flows(pin_dir, keys, conns) == 1
    again = run(clean, flow)
    assert again.stats["held_dropped"] == 1 and "held_hit" not in again.stats
    assert again.data == encapsulated(flow, member)
    assert len(lbctl.read_held(pin_dir)[0]) == 0
    assert lbctl.retire_held(pin_dir) >= 1  # no held flow, no earlier aggregate level
    with lbctl.open_map(pin_dir, "vips") as vip_map:
        _, values = vip_map.items()
    assert (values["holds_flows"] == 0).all()
    lbctl.hold_flows(pin_dir, keys, conns)
    with lbctl.open_map(pin_dir, "conns") as table_map:
        table_map.clear()
    assert run(clean, ack).data == encapsulated(ack, member)  # not looked up any more


def test_a_transition_flow_is_held_by_the_datapath(clean, at_level):  # noqa: F811
    """Class 2 -> 3 with a client whose aggregates disagree: the new member's flow entry (the
    only thing that tells it from the level-2 members) is copied into `held` at once, so an
    eviction does not send it to the level-2 aggregate's backend."""
    pin_dir = clean.pin_dir
    client, _, on3 = disagreeing_client(clean, range(70, 90))
    at_level(2)
    run(clean, tcp4(src=client, sport=58000))
    at_level(3)
    new = run(clean, tcp4(src=client, sport=58001))
    assert new.stats["transition_flow"] == 1
    held_keys, held = lbctl.read_held(pin_dir)
    assert len(held_keys) == 1 and int(held["backend_id"][0]) == on3
    with lbctl.open_map(pin_dir, "conns") as table_map:
        table_map.clear()  # the LRU evicted it
    ack = tcp4(src=client, sport=58001, flags="A")
    got = run(clean, ack)
    assert got.stats["held_hit"] == 1
    assert got.data == encapsulated(ack, on3)


def test_before_a_level_change_the_datapath_holds_every_entry_it_makes(clean, at_level):  # noqa: F811
    """`set_vip_holds` (the agent, from the first map pressure on and before a class with
    connections changes level): from then on each connection entry the datapath makes is
    copied into `held`, so a flow evicted around the level change is still known; at level 0
    nothing else changes."""
    pin_dir = clean.pin_dir
    assert lbctl.set_vip_holds(pin_dir, lbctl.vip_key(VIP4, 80, "tcp")) == 1
    assert lbctl.set_vip_holds(pin_dir, lbctl.vip_key(VIP4, 80, "tcp")) == 0
    flow = tcp4(src=CLIENT, sport=44000)
    first = run(clean, flow)
    assert first.stats == {"forwarded": 1, "new_flow": 1, "bytes": len(flow[IP])}
    keys, conns = lbctl.read_conns(pin_dir)
    held_keys, held = lbctl.read_held(pin_dir)
    assert len(keys) == len(held_keys) == 1
    assert held_keys.tobytes() == keys.tobytes() and held.tobytes() == conns.tobytes()
    conn = conns[0]
    with lbctl.open_map(pin_dir, "conns") as table_map:
        table_map.clear()  # the LRU evicted it
    at_level(2)
    ack = tcp4(src=CLIENT, sport=44000, flags="A")
    got = run(clean, ack)
    assert got.stats == {"forwarded": 1, "held_hit": 1, "lease_hit": 1, "bytes": len(ack[IP])}
    assert got.data == encapsulated(ack, int(conn["backend_id"]))


def test_a_publish_renews_the_held_copy_with_the_connection_entry(clean, at_level):  # noqa: F811
    """docs/lb.md "Held flows": while a class holds its flows, every PUBLISH lease written to
    `conns` is written to the flow's held copy too (`apply_flow_leases`), so the copy of an
    evicted entry never lags behind it (a copy renewed only every evaluation expired between
    publishes and counted lease misses, issue 15 item 12); a flow published after its entry
    was evicted gets a copy; a copy on another backend is left alone."""
    pin_dir = clean.pin_dir
    lbctl.set_vip_holds(pin_dir, lbctl.vip_key(VIP4, 80, "tcp"))
    flow = tcp4(src=CLIENT, sport=45000)
    run(clean, flow)
    keys, conns = lbctl.read_conns(pin_dir)
    own = int(conns["backend_id"][0])
    other = next(b for b in (1, 2, 3) if b != own)
    now = datapath_clock().now_ns()
    result = lbctl.apply_flow_leases(pin_dir, keys, own, now + 9 * S, now_ns=now)
    assert (result["written"], result["held"]) == (1, 1)
    _, held = lbctl.read_held(pin_dir)
    assert held.tobytes() == lbctl.read_conns(pin_dir)[1].tobytes()
    assert int(held["lease_expiry_ns"][0]) == now + 9 * S
    with lbctl.open_map(pin_dir, "conns") as table_map:
        table_map.clear()  # the LRU evicted it
    result = lbctl.apply_flow_leases(pin_dir, keys, own, now + 12 * S, now_ns=now)
    assert (result["created"], result["held"]) == (1, 1)
    _, held = lbctl.read_held(pin_dir)
    assert int(held["lease_expiry_ns"][0]) == now + 12 * S
    assert int(held["created_ns"][0]) == int(conns["created_ns"][0])  # the copy's own start
    # nothing new: nothing written
    assert lbctl.apply_flow_leases(pin_dir, keys, own, now + 12 * S, now_ns=now)["held"] == 0
    with lbctl.open_map(pin_dir, "conns") as table_map:
        table_map.clear()
    # another server publishing the tuple: its conns entry is re-made, the held copy stays
    assert lbctl.apply_flow_leases(pin_dir, keys, other, now + 20 * S, now_ns=now)["held"] == 0
    _, held = lbctl.read_held(pin_dir)
    assert int(held["backend_id"][0]) == own and int(held["lease_expiry_ns"][0]) == now + 12 * S
    with lbctl.open_map(pin_dir, "conns") as table_map:
        table_map.clear()
    at_level(2)
    ack = tcp4(src=CLIENT, sport=45000, flags="A")
    got = run(clean, ack)
    assert got.stats == {"forwarded": 1, "held_hit": 1, "lease_hit": 1, "bytes": len(ack[IP])}
    assert got.data == encapsulated(ack, own)


def test_a_syn_of_a_leased_flow_keeps_its_backend_after_a_level_change(clean, at_level):  # noqa: F811
    """A SYN looks its tuple up in the connection table before it joins an aggregate: a
    retransmitted SYN of a flow placed at level 0 (or a SYN reusing a leased tuple) stays on that
    flow's backend when the class is at level 2 and its aggregate names another, and is not
    counted as a member; its ACK follows. (Katran skips this lookup for SYNs because its SYN path
    rewrites the entry; a member SYN writes none, docs/lb.md "Cost".)"""
    aggregate_on = aggregate_backend(clean, tcp4(src=CLIENT), 2)
    table = lbctl.maglev_table(clean.pin_dir, 0)
    sport, placed_on = next(
        (p, b) for p in range(53000, 53200)
        if (b := int(table[maglev.slots_of(flow_key_of(tcp4(src=CLIENT, sport=p)),
                                           MAGLEV_SIZE)[0]])) != aggregate_on)
    first = run(clean, tcp4(src=CLIENT, sport=sport))
    assert first.stats["new_flow"] == 1
    assert first.data == encapsulated(tcp4(src=CLIENT, sport=sport), placed_on)
    at_level(2)
    member = run(clean, tcp4(src=CLIENT, sport=sport + 1000))
    assert member.stats["agg_insert"] == 1
    assert member.data == encapsulated(tcp4(src=CLIENT, sport=sport + 1000), aggregate_on)
    again = run(clean, tcp4(src=CLIENT, sport=sport))
    assert again.stats == {"forwarded": 1, "lease_hit": 1, "bytes": again.stats["bytes"]}
    assert again.data == encapsulated(tcp4(src=CLIENT, sport=sport), placed_on)
    ack = run(clean, tcp4(src=CLIENT, sport=sport, flags="A"))
    assert ack.stats["lease_hit"] == 1
    assert ack.data == encapsulated(tcp4(src=CLIENT, sport=sport, flags="A"), placed_on)
    _, own = own_entries(clean)
    assert own["flow_count"].tolist() == [1]
