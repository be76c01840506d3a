"""Liveness (connpub.policy.liveness): kernel socket truth for TCP, idle horizons for UDP, the
[liveness] config checks; and the server agent on real sockets (root)."""

from __future__ import annotations

import socket
import time
import tomllib
import uuid

import numpy as np
import pytest
from connpub.config import (
    AgentConfig,
    Config,
    LeaseConfig,
    LivenessConfig,
    PublishConfig,
    parse_config,
)
from connpub.datapath.abi import AGG_KEY_DTYPE, FLOW_KEY_DTYPE, FLOW_VALUE_DTYPE
from connpub.datapath.masks import apply_masks, mask_byte_table
from connpub.datapath.tcpstate import SOCKET_CLOSED, SOCKET_OPEN, SOCKET_UNKNOWN, FlowSockets
from connpub.policy import liveness as lv

S = 1_000_000_000
NOW = 10_000 * S
CFG = Config(liveness=LivenessConfig(udp_service_idle_s=((5060, 600.0),)))
TIMES = lv.FlowTimes.from_config(CFG)  # T = 1 s, k = 3: linger 3 s; TCP fallback 60 s


def keys_of(protos, vip_ports=None) -> np.ndarray:
    keys = np.zeros(len(protos), FLOW_KEY_DTYPE)
    keys["client_addr"][:, 10:12] = 0xFF
    keys["client_addr"][:, 12:] = (192, 0, 2, 1)
    keys["vip_addr"][:, 10:12] = 0xFF
    keys["vip_addr"][:, 12:] = (10, 0, 0, 5)
    keys["client_port"] = 40000 + np.arange(len(protos))
    keys["vip_port"] = vip_ports if vip_ports is not None else 80
    keys["proto"] = protos
    return keys


def values_of(n: int, idle_s, age_s=1000.0, packets=10, closed=0) -> np.ndarray:
    values = np.zeros(n, FLOW_VALUE_DTYPE)
    values["first_seen_ns"] = NOW - np.round(np.asarray(age_s, float) * S).astype(np.int64)
    values["last_seen_ns"] = NOW - np.round(np.asarray(idle_s, float) * S).astype(np.int64)
    values["packets"] = packets
    values["closed"] = closed
    return values


def test_defaults_are_conntracks():
    assert TIMES.udp_single_ns == 30 * S  # nf_conntrack_udp_timeout
    assert TIMES.udp_stream_ns == 120 * S  # nf_conntrack_udp_timeout_stream
    assert TIMES.idle_timeout_ns == 60 * S and TIMES.linger_ns == 3 * S
    assert TIMES.tcp_kernel and TIMES.handshake_ns == 3 * S
    assert TIMES.udp_max_ns == 600 * S


def test_udp_idle_horizons_single_stream_and_per_service():
    keys = keys_of([17] * 6, vip_ports=[53, 53, 53, 53, 5060, 5060])
    values = values_of(6, idle_s=[29, 31, 119, 121, 599, 601], packets=[1, 1, 2, 2, 1, 1])
    limit = lv.idle_limit_ns(keys, values, TIMES)
    assert (limit // S).tolist() == [30, 30, 120, 120, 600, 600]
    live, finished = lv.flow_states(keys, values, NOW, TIMES)
    assert live.tolist() == [True, False, True, False, True, False]
    assert finished.tolist() == [False, True, False, True, False, True]


def test_open_tcp_socket_is_live_however_long_it_is_quiet():
    keys = keys_of([6, 6])
    values = values_of(2, idle_s=[5 * 3600, 0.1])
    sockets = FlowSockets(np.array([SOCKET_OPEN, SOCKET_OPEN], np.uint8),
                          np.array([NOW - 5 * 3600 * S, NOW], np.int64))
    live, finished = lv.flow_states(keys, values, NOW, TIMES, sockets)
    assert live.tolist() == [True, True] and finished.tolist() == [False, False]
    # the same quiet flow by packets: over at the 60 s idle timeout
    packets = lv.FlowTimes(TIMES.idle_timeout_ns, TIMES.linger_ns)
    live, finished = lv.flow_states(keys, values, NOW, packets, sockets)
    assert live.tolist() == [False, True] and finished.tolist() == [True, False]


def test_closed_socket_stops_renewal_at_once_and_finishes_after_the_linger():
    keys = keys_of([6, 6, 6, 6])
    # closed 1 s ago (last packet 10 s ago), 4 s ago, 4 s ago but a late ACK 1 s ago,
    # and a close with the client's FIN seen by XDP
    values = values_of(4, idle_s=[10, 10, 1, 0.5], closed=[0, 0, 0, 1])
    sockets = FlowSockets(np.full(4, SOCKET_CLOSED, np.uint8),
                          NOW - np.array([1, 4, 4, 0.5]).astype(np.int64) * S)
    sockets.changed_ns[3] = NOW - S // 2
    live, finished = lv.flow_states(keys, values, NOW, TIMES, sockets)
    assert live.tolist() == [False, False, False, False]
    assert finished.tolist() == [False, True, False, False]


def test_tcp_flow_without_a_socket_record():
    keys = keys_of([6, 6, 6, 17])
    values = values_of(4, idle_s=[0.1, 0.1, 5, 0.1], age_s=[1, 100, 100, 100])
    none = FlowSockets(np.full(4, SOCKET_UNKNOWN, np.uint8), np.zeros(4, np.int64))
    live, finished = lv.flow_states(keys, values, NOW, TIMES, none)
    # young: packets decide (handshake); old: no socket = closed at its last packet
    # (finished once quiet for the linger); UDP is never judged by sockets
    assert live.tolist() == [True, False, False, True]
    assert finished.tolist() == [False, False, True, False]
    # before the table is authoritative (a full socket table): packets decide
    not_seeded = FlowSockets(none.state, none.changed_ns, authoritative=False)
    live, finished = lv.flow_states(keys, values, NOW, TIMES, not_seeded)
    assert live.tolist() == [True, True, True, True]
    assert finished.tolist() == [False, False, False, False]


def test_aggregates_with_live_members_and_their_idle_limits():
    keys = keys_of([6, 6, 17])
    values = values_of(3, idle_s=[900, 900, 1])
    values["level"] = [1, 1, 0]
    table = mask_byte_table(CFG.masks.specs)
    agg = np.zeros(3, AGG_KEY_DTYPE)
    agg["masked"] = apply_masks(keys, 1, table)
    agg["masked"]["client_addr"][2, 15] = 99  # an aggregate without members
    agg["level"] = 1
    agg["pad"] = 7  # pad bytes never matter
    live = np.array([False, True, True])
    assert lv.aggregates_with_live(agg, keys, values, live, table).tolist() == [True, True,
                                                                                 False]
    assert not lv.aggregates_with_live(agg, keys, values, np.zeros(3, bool), table).any()
    agg["masked"]["proto"] = [6, 17, 17]
    assert (lv.aggregate_idle_limit_ns(agg, TIMES) // S).tolist() == [60, 600, 600]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[liveness]\ntcp = 'socket'\n",
         "[liveness] tcp: 'socket' is not one of kernel, packets"),
        ("[liveness]\nudp_idle_s = 200\n",
         "[liveness] udp_idle_s=200 must be <= udp_stream_idle_s=120"),
        ("[liveness]\nudp_service_idle_s = [[70000, 30]]\n",
         "[liveness] udp_service_idle_s: port 70000 is out of range (1..65535)"),
        ("[liveness]\nudp_service_idle_s = [[53, 30], [53, 40]]\n",
         "[liveness] udp_service_idle_s: port 53 is given twice"),
        ("[liveness]\nudp_service_idle_s = [[53, 0]]\n",
         "[liveness] udp_service_idle_s: 0 s for port 53 is out of range (must be > 0 and "
         "<= 86400)"),
        ("[liveness]\nudp_service_idle_s = [53, 30]\n",
         "[liveness] udp_service_idle_s: wrong type, expected an array of [port, seconds] "
         "pairs, got array [53, 30]"),
    ],
)
def test_liveness_config_problems(text, expected):
    problems: list[str] = []
    parse_config(tomllib.loads(text), problems)
    assert problems == [expected]


def test_liveness_config_parses():
    problems: list[str] = []
    cfg = parse_config(tomllib.loads("[liveness]\ntcp = 'packets'\n"
                                      "udp_service_idle_s = [[5004, 300], [53, 5.5]]\n"),
                       problems)
    assert problems == []
    assert cfg.liveness.tcp == "packets"
    assert cfg.liveness.service_ports() == ([53, 5004], [5.5, 300.0])


# ---------------------------------------------------------------------------------------------
# the server agent on real sockets


@pytest.mark.root
def test_agent_renews_an_idle_open_connection_and_stops_within_a_tick_of_its_close(
        unique_prefix, tmp_path):
    """Real TCP connections in a namespace, their flows written into a scratch server table
    as XDP would have them (quiet for 10x the UDP horizon): the agent publishes the open one
    every tick, and after the server closes one it is no longer published from the next tick
    on, and is finished once the linger has passed."""
    from connpub.agents.common import AgentSocket, remove_statuses_of_netns
    from connpub.agents.server import ServerAgent
    from connpub.datapath import loader, netlink
    from connpub.datapath.clock import datapath_clock
    from connpub.protocol.wire import Decoder, PacketType, accepted_entries
    from datapath_fixtures import scratch
    from test_tcpstate import connect_in, listen_in, state_of

    netns = f"{unique_prefix}lv"
    netlink.create_netns(netns)
    clock = datapath_clock()
    receiver = AgentSocket("127.0.0.1", 0)
    key = bytes(range(32))
    agent = server = None
    sockets: list[socket.socket] = []
    try:
        netlink.set_link_up("lo", netns)
        server = listen_in(netns, 7412)
        clients = [connect_in(netns, 7412) for _ in range(2)]
        sockets += clients + [server.accept()[0] for _ in clients]
        with scratch("server") as prog:
            loader.init_server_maps(prog.pin_dir)
            cfg = Config(publish=PublishConfig(interval_s=0.2, mode="baseline"),
                         lease=LeaseConfig(min_s=0.1, initial_s=1.0),
                         agent=AgentConfig(server_id=3, lb_addresses=("127.0.0.1",),
                                           listen_port=receiver.sock.getsockname()[1],
                                           metrics_port=0, history_path=""))
            agent = ServerAgent(cfg, prog.pin_dir, key=key, netns=netns,
                                iface=f"t{uuid.uuid4().hex[:6]}",
                                agent_socket=AgentSocket("127.0.0.1", 0), clock=clock)
            assert agent.tcp_watcher.seed_result["inserted"] == 4  # both ends of both
            flow_keys = np.zeros(2, FLOW_KEY_DTYPE)
            for i, client in enumerate(clients):
                flow_keys[i] = keys_of([6])[0]
                flow_keys["client_addr"][i, 12:] = (127, 0, 0, 1)
                flow_keys["vip_addr"][i, 12:] = (127, 0, 0, 1)
                flow_keys["client_port"][i] = client.getsockname()[1]
                flow_keys["vip_port"][i] = 7412
            now = clock.now_ns()
            quiet_ns = 10 * round(cfg.liveness.udp_stream_idle_s * S)
            values = np.zeros(2, FLOW_VALUE_DTYPE)
            values["packets"], values["bytes"] = 5, 500
            values["first_seen_ns"] = now - quiet_ns - S
            values["last_seen_ns"] = now - quiet_ns
            with prog.open("flows") as flows:
                flows.update_batch(flow_keys, values)
            decoder = Decoder(key, max_lease_ms=300_000)

            def published() -> list[int]:
                receiver.drain()
                agent.tick()
                got, deadline = [], time.monotonic() + 5
                while not got and time.monotonic() < deadline:
                    got += receiver.drain()
                results = decoder.decode_batch([data for data, _ in got])
                entries = accepted_entries(results, PacketType.PUBLISH)
                return sorted(entries["key"]["client_port"].tolist())

            ports = sorted(flow_keys["client_port"].tolist())
            for _ in range(3):
                assert published() == ports
            sockets[2].close()  # the server closes the first connection (FIN_WAIT1)
            k = flow_keys[:1].copy()
            assert state_of(agent.tcp_watcher, k, want=4)["state"] == 4
            assert published() == [int(flow_keys["client_port"][1])]
            assert agent.last_cycle["finished"] == 0  # lingering
            deadline = time.monotonic() + 10
            while agent.last_cycle["finished"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
                agent.tick()
            assert agent.last_cycle["finished"] == 1
            with prog.open("flows") as flows:
                left = flows.keys()
            assert left["client_port"].tolist() == [int(flow_keys["client_port"][1])]
            agent.close()
            agent.tcp_watcher.detach()
            agent = None
    finally:
        if agent is not None:
            agent.close()
        for sock in sockets + ([server] if server else []):
            sock.close()
        receiver.close()
        remove_statuses_of_netns([netns])  # the status file its ticks wrote
        netlink.delete_netns(netns)
