"""TCP socket state from the kernel (connpub.datapath.tcpstate): the pure decoding, then the
tracepoint program and the sock_diag seed with real sockets in a namespace."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from connpub.datapath import loader, netlink, tcpstate
from connpub.datapath.abi import FLOW_KEY_DTYPE, SOCK_STATE_DTYPE
from connpub.datapath.clock import datapath_clock
from connpub.datapath.tcpstate import (
    SOCKET_CLOSED,
    SOCKET_OPEN,
    SOCKET_UNKNOWN,
    TCP_CLOSE,
    TCP_CLOSE_WAIT,
    TCP_ESTABLISHED,
    TCP_FIN_WAIT1,
)
from datapath_fixtures import mapped

PORT = 7411


def key(client: str, cport: int, vip: str, vport: int, proto: int = 6) -> np.ndarray:
    k = np.zeros(1, FLOW_KEY_DTYPE)
    k["client_addr"] = np.frombuffer(mapped(client), np.uint8)
    k["vip_addr"] = np.frombuffer(mapped(vip), np.uint8)
    k["client_port"], k["vip_port"], k["proto"] = cport, vport, proto
    return k


# ---------------------------------------------------------------------------------------------
# pure


def diag_rows(rows) -> np.ndarray:
    """netlink.DIAG_SOCKET_DTYPE rows from (family, local, local port, remote, remote port)."""
    out = np.zeros(len(rows), netlink.DIAG_SOCKET_DTYPE)
    for i, (family, local, lport, remote, rport) in enumerate(rows):
        out[i]["family"], out[i]["state"] = family, TCP_ESTABLISHED
        out[i]["sport"], out[i]["dport"] = lport, rport
        for field, addr in (("src", local), ("dst", remote)):
            packed = socket.inet_pton(family, addr)
            out[i][field][:len(packed)] = np.frombuffer(packed, np.uint8)
    return out


def test_socket_keys_orient_like_the_server_program():
    rows = diag_rows([(socket.AF_INET, "10.0.0.5", 80, "192.0.2.7", 40001),
                      (socket.AF_INET6, "2001:db8::1", 443, "2001:db8::9", 50000),
                      (socket.AF_INET6, "::ffff:10.0.0.5", 80, "::ffff:192.0.2.8", 40002)])
    keys = tcpstate.socket_keys(rows)
    assert keys[0] == key("192.0.2.7", 40001, "10.0.0.5", 80)[0]
    assert keys[1] == key("2001:db8::9", 50000, "2001:db8::1", 443)[0]
    # a dual-stack socket's mapped addresses give the IPv4 key
    assert keys[2] == key("192.0.2.8", 40002, "10.0.0.5", 80)[0]
    assert keys.view(np.uint8).reshape(3, 40)[0, 36] == 6
    assert len(tcpstate.socket_keys(diag_rows([]))) == 0


def test_close_kind():
    assert tcpstate.close_kind(TCP_FIN_WAIT1 - 1, TCP_ESTABLISHED) == "open"
    assert tcpstate.close_kind(TCP_ESTABLISHED, TCP_FIN_WAIT1) == "server"
    assert tcpstate.close_kind(TCP_ESTABLISHED, TCP_CLOSE_WAIT) == "client"
    assert tcpstate.close_kind(TCP_ESTABLISHED, TCP_CLOSE) == "reset"
    assert tcpstate.close_kind(TCP_CLOSE_WAIT, 9) == "other"


def test_flow_sockets_joins_tcp_flows_only():
    sockets = np.concatenate([key("192.0.2.1", 1000, "10.0.0.5", 80),
                              key("192.0.2.2", 1000, "10.0.0.5", 80)])
    values = np.zeros(2, SOCK_STATE_DTYPE)
    values["state"] = [TCP_ESTABLISHED, TCP_FIN_WAIT1]
    values["changed_ns"] = [5, 77]
    flows = np.concatenate([key("192.0.2.2", 1000, "10.0.0.5", 80),
                            key("192.0.2.3", 1000, "10.0.0.5", 80),
                            key("192.0.2.1", 1000, "10.0.0.5", 80),
                            key("192.0.2.1", 1000, "10.0.0.5", 80, proto=17)])
    flows["pad"][0] = 9  # pad bytes never matter
    view = tcpstate.flow_sockets(flows, sockets, values)
    assert view.state.tolist() == [SOCKET_CLOSED, SOCKET_UNKNOWN, SOCKET_OPEN, SOCKET_UNKNOWN]
    assert view.changed_ns.tolist() == [77, 0, 5, 0]
    assert view.authoritative
    empty = tcpstate.flow_sockets(flows, sockets[:0], values[:0])
    assert empty.state.tolist() == [0, 0, 0, 0]
    assert not tcpstate.FlowSockets.unknown(3).authoritative


def test_reconcile_inserts_missing_and_closes_vanished():
    a, b, c = (key("192.0.2.1", p, "10.0.0.5", 80) for p in (1, 2, 3))
    table = np.concatenate([a, b, c])
    values = np.zeros(3, SOCK_STATE_DTYPE)
    values["state"] = [TCP_ESTABLISHED, TCP_ESTABLISHED, TCP_CLOSE]
    d = key("192.0.2.1", 4, "10.0.0.5", 80)
    dump = np.concatenate([a, d, c])  # b vanished; c was closed and stays closed
    insert, gone = tcpstate.reconcile(table, values, dump)
    assert insert.tobytes() == d.tobytes()
    assert gone.tobytes() == b.tobytes()


def test_records_to_forget():
    values = np.zeros(3, SOCK_STATE_DTYPE)
    values["state"] = [TCP_ESTABLISHED, TCP_CLOSE, TCP_FIN_WAIT1]
    values["changed_ns"] = [0, 0, 900]
    assert tcpstate.records_to_forget(values, 1000, 500).tolist() == [1]


# ---------------------------------------------------------------------------------------------
# kernel


@pytest.fixture
def netns_lo(unique_prefix):
    name = f"{unique_prefix}tcp"
    netlink.create_netns(name)
    pin_dir = loader.scratch_pin_dir(f"tcpstate-{unique_prefix}")
    try:
        netlink.set_link_up("lo", name)
        yield name, pin_dir
    finally:
        loader.remove_pins(pin_dir)
        netlink.delete_netns(name)


def listen_in(netns: str, port: int) -> socket.socket:
    with netlink.entered(netns):
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(64)
    return server


def connect_in(netns: str, port: int) -> socket.socket:
    with netlink.entered(netns):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.connect(("127.0.0.1", port))
    return client


def server_key(client: socket.socket) -> np.ndarray:
    return key("127.0.0.1", client.getsockname()[1], "127.0.0.1", PORT)


def state_of(watcher: tcpstate.TcpStateWatcher, k: np.ndarray, deadline_s: float = 5.0,
             want: int | None = None):
    """The record of key k (polling until its state is `want`, if given)."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = watcher.table.lookup(k[0])
        if want is None or (value is not None and int(value["state"]) == want):
            return value
        if time.monotonic() > deadline:
            return value
        time.sleep(0.01)


@pytest.mark.root
def test_tracepoint_records_open_and_every_kind_of_close(netns_lo):
    netns, pin_dir = netns_lo
    clock = datapath_clock()
    server = listen_in(netns, PORT)
    seeded = connect_in(netns, PORT)  # open before the watcher starts: found by the seed
    accepted_seeded, _ = server.accept()
    watcher = tcpstate.TcpStateWatcher(pin_dir, netns, clock.now_ns)
    try:
        # the seed found the server side (and the client side, its own key) of the connection
        assert watcher.seed_result["sockets"] == 2
        assert watcher.seed_result["inserted"] == 2
        assert int(state_of(watcher, server_key(seeded))["state"]) == TCP_ESTABLISHED

        by_server, by_client, by_reset = (connect_in(netns, PORT) for _ in range(3))
        accepted = [server.accept()[0] for _ in range(3)]
        keys = [server_key(c) for c in (by_server, by_client, by_reset)]
        for k in keys:
            assert int(state_of(watcher, k, want=TCP_ESTABLISHED)["state"]) == TCP_ESTABLISHED
        before = clock.now_ns()
        accepted[0].close()  # the server closes first: FIN_WAIT1
        by_client.close()  # the client's FIN: CLOSE_WAIT on the server side
        by_reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        by_reset.close()  # RST: the server side goes straight to CLOSE
        kinds = []
        for k, want in zip(keys, (TCP_FIN_WAIT1, TCP_CLOSE_WAIT, TCP_CLOSE), strict=True):
            value = state_of(watcher, k, want=want)
            assert int(value["state"]) == want
            assert int(value["old_state"]) == TCP_ESTABLISHED
            assert int(value["changed_ns"]) >= before - clock.ns_per_jiffy
            kinds.append(tcpstate.close_kind(int(value["old_state"]), int(value["state"])))
        assert kinds == ["server", "client", "reset"]
        stats = watcher.stats()
        # 3 new connections: 2 sockets each became ESTABLISHED (client and server side)
        assert stats["established"] == 6
        assert stats["map_full"] == 0
        # the connection seeded at start is still open
        assert int(state_of(watcher, server_key(seeded))["state"]) == TCP_ESTABLISHED
        for sock in (*accepted[1:], by_server):
            sock.close()
    finally:
        watcher.detach()
        for sock in (server, seeded, accepted_seeded):
            sock.close()


@pytest.mark.root
def test_sockets_of_other_namespaces_are_ignored(netns_lo, unique_prefix):
    netns, pin_dir = netns_lo
    other = f"{unique_prefix}oth"
    netlink.create_netns(other)
    watcher = None
    try:
        netlink.set_link_up("lo", other)
        watcher = tcpstate.TcpStateWatcher(pin_dir, netns, datapath_clock().now_ns)
        server = listen_in(other, PORT)
        client = connect_in(other, PORT)
        accepted, _ = server.accept()
        deadline = time.monotonic() + 5
        while watcher.stats()["other_netns"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watcher.stats()["other_netns"] >= 2
        assert watcher.read()[0].size == 0
        for sock in (accepted, client, server):
            sock.close()
    finally:
        if watcher is not None:
            watcher.detach()
        netlink.delete_netns(other)


@pytest.mark.root
def test_reload_keeps_the_table_and_reseed_closes_what_vanished(netns_lo):
    netns, pin_dir = netns_lo
    clock = datapath_clock()
    server = listen_in(netns, PORT)
    first = tcpstate.TcpStateWatcher(pin_dir, netns, clock.now_ns)
    kept = connect_in(netns, PORT)
    kept_server, _ = server.accept()
    k = server_key(kept)
    recorded = state_of(first, k, want=TCP_ESTABLISHED)
    assert int(recorded["state"]) == TCP_ESTABLISHED
    # a record that no socket backs (as if its close happened while nothing recorded)
    ghost = key("127.0.0.1", 1, "127.0.0.1", PORT)
    first.table.update(ghost[0], tcpstate.state_values(1, TCP_ESTABLISHED, 1)[0])
    first.close()  # the agent goes away; its link stays pinned and keeps recording
    closed_meanwhile = connect_in(netns, PORT)
    closed_server, _ = server.accept()
    k2 = server_key(closed_meanwhile)
    closed_server.close()
    second = tcpstate.TcpStateWatcher(pin_dir, netns, clock.now_ns, reuse=False)  # reload
    third = None
    try:
        assert not second.reused and second.program is not None
        # the pinned table kept the first load's record (same timestamp: not re-seeded)
        assert int(second.table.lookup(k[0])["changed_ns"]) == int(recorded["changed_ns"])
        assert int(state_of(second, k2, want=TCP_FIN_WAIT1)["state"]) == TCP_FIN_WAIT1
        assert second.seed_result["closed_while_down"] == 1
        assert int(second.table.lookup(ghost[0])["state"]) == TCP_CLOSE
        assert (pin_dir / tcpstate.LINK_PIN).exists()
        # a restart of the same build (the agent after kill -9) reuses the running program:
        # no compile, only a seed
        second.close()
        third = tcpstate.TcpStateWatcher(pin_dir, netns, clock.now_ns)
        assert third.reused and third.program is None
        assert third.seed_result["inserted"] == 0 and third.seed_result["closed_while_down"] == 0
        closed_later = connect_in(netns, PORT)
        closed_later_server, _ = server.accept()
        closed_later_server.close()
        assert int(state_of(third, server_key(closed_later), want=TCP_FIN_WAIT1)["state"]) \
            == TCP_FIN_WAIT1  # the reused link records
        closed_later.close()
    finally:
        (third or second).detach()
        for sock in (kept, kept_server, closed_meanwhile, server):
            sock.close()


def test_key_join_matches_arrays_join():
    from connpub.arrays import join

    rng = np.random.default_rng(5)
    table = np.zeros(5000, FLOW_KEY_DTYPE)
    table.view(np.uint8).reshape(5000, 40)[:, :37] = rng.integers(0, 256, (5000, 37))
    queries = np.concatenate([table[rng.permutation(5000)[:3000]],
                              np.zeros(100, FLOW_KEY_DTYPE)]).astype(FLOW_KEY_DTYPE)
    queries["client_port"][-1] = 7  # absent
    found, row = tcpstate.key_join(table, queries)
    want_found, want_row = join(table, queries)
    assert found.tolist() == want_found.tolist() and int(found.sum()) == 3000
    assert (row[found] == want_row[want_found]).all()
    assert table[row[found]].tobytes() == queries[found].tobytes()
    # a key twice in the table (equal hashes): the exact join decides
    doubled = np.concatenate([table, table[:1]]).astype(FLOW_KEY_DTYPE)
    found, row = tcpstate.key_join(doubled, queries)
    assert int(found.sum()) == 3000
    assert doubled[row[found]].tobytes() == queries[found].tobytes()


def test_stamped_sockets_reads_current_stamps_and_lists_the_rest():
    from connpub.datapath.abi import FLOW_VALUE_DTYPE

    flows = np.concatenate([key("192.0.2.1", p, "10.0.0.5", 80) for p in range(1, 6)]
                           + [key("192.0.2.1", 6, "10.0.0.5", 53, proto=17)])
    values = np.zeros(6, FLOW_VALUE_DTYPE)
    values["first_seen_ns"] = [0, 0, 0, 0, 9_500, 0]
    # open (this epoch), closed (this epoch), stamped by an older epoch, never stamped,
    # never stamped but young (its handshake), UDP
    values["sock_state"] = [TCP_ESTABLISHED, TCP_CLOSE_WAIT, TCP_ESTABLISHED, 0, 0, 0]
    values["sock_epoch"] = [3, 3, 2, 0, 0, 0]
    values["sock_changed_ns"] = [100, 200, 300, 0, 0, 0]
    view, rows = tcpstate.stamped_sockets(flows, values, epoch=3, now_ns=10_000, young_ns=1_000)
    assert view.state.tolist() == [SOCKET_OPEN, SOCKET_CLOSED, SOCKET_UNKNOWN, SOCKET_UNKNOWN,
                                   SOCKET_UNKNOWN, SOCKET_UNKNOWN]
    assert view.changed_ns.tolist() == [100, 200, 0, 0, 0, 0]
    assert rows.tolist() == [2, 3]
    records = np.zeros(1, SOCK_STATE_DTYPE)
    records["state"], records["changed_ns"] = TCP_FIN_WAIT1, 250
    merged = tcpstate.merge_lookups(view, rows, np.array([True, False]), records)
    assert merged.state.tolist() == [SOCKET_OPEN, SOCKET_CLOSED, SOCKET_CLOSED, SOCKET_UNKNOWN,
                                     SOCKET_UNKNOWN, SOCKET_UNKNOWN]
    assert merged.changed_ns.tolist() == [100, 200, 250, 0, 0, 0]
    # epoch 0 (no watcher epoch yet) trusts no stamp
    _, rows = tcpstate.stamped_sockets(flows, values, epoch=0, now_ns=10_000, young_ns=1_000)
    assert rows.tolist() == [0, 1, 2, 3]


@pytest.mark.root
def test_tracepoint_stamps_the_server_flow_entry_and_epochs_follow_gaps(netns_lo):
    """With a server flow table pinned next to it, the program stamps the connection's flow
    entry (state, time, epoch) and counts a connection without one; a restart or an in-place
    reload keeps the epoch, a load after a pause (detach) raises it."""
    from connpub.datapath.abi import FLOW_VALUE_DTYPE
    from connpub.datapath.maps import PinnedMap

    netns, pin_dir = netns_lo
    clock = datapath_clock()
    loader.compile_program("server", pin_dir, {"MAX_FLOWS": 1024}).close()
    server = listen_in(netns, PORT)
    first = tcpstate.TcpStateWatcher(pin_dir, netns, clock.now_ns)
    watchers = [first]
    client_port = 40123
    k = key("127.0.0.1", client_port, "127.0.0.1", PORT)
    with PinnedMap(pin_dir / "flows", FLOW_KEY_DTYPE, FLOW_VALUE_DTYPE) as flows:
        try:
            assert first.stamps_flows and first.epoch == 1
            flows.update(k[0], np.zeros(1, FLOW_VALUE_DTYPE)[0])  # as XDP's first packet does
            with netlink.entered(netns):
                client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            client.bind(("127.0.0.1", client_port))
            client.connect(("127.0.0.1", PORT))
            accepted, _ = server.accept()
            deadline = time.monotonic() + 5
            while int(flows.lookup(k[0])["sock_state"]) != TCP_ESTABLISHED:
                assert time.monotonic() < deadline, "the flow entry was never stamped"
                time.sleep(0.01)
            value = flows.lookup(k[0])
            record = first.table.lookup(k[0])
            assert int(value["sock_epoch"]) == 1
            assert int(value["sock_changed_ns"]) == int(record["changed_ns"])
            stats = first.stats()
            # the server side was stamped; the client side (its own key) has no flow entry
            assert stats["flow_stamped"] == 1 and stats["no_flow"] == 1
            accepted.close()  # the server closes: FIN_WAIT1 on its side
            while int(flows.lookup(k[0])["sock_state"]) != TCP_FIN_WAIT1:
                assert time.monotonic() < deadline, "the close was never stamped"
                time.sleep(0.01)
            client.close()
            # restart of the same build, then an in-place reload: recording never paused
            first.close()
            watchers.append(tcpstate.TcpStateWatcher(pin_dir, netns, clock.now_ns))
            assert watchers[-1].reused and watchers[-1].epoch == 1
            watchers[-1].close()
            watchers.append(tcpstate.TcpStateWatcher(pin_dir, netns, clock.now_ns,
                                                     reuse=False))
            assert not watchers[-1].reused and watchers[-1].epoch == 1
            # a pause: stamps written before it are no longer trusted
            watchers[-1].detach()
            watchers.append(tcpstate.TcpStateWatcher(pin_dir, netns, clock.now_ns))
            assert not watchers[-1].reused and watchers[-1].epoch == 2
        finally:
            watchers[-1].detach()
            server.close()
