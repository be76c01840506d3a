"""Liveness from the server's kernel on the namespace lab, with both agents as processes
(issue 12): a TCP connection quiet for 5x the UDP horizon keeps its lease and survives a
backend being added (Maglev would move it); a connection closed by the server (FIN, RST) or
the client (FIN, RST) loses its LB lease within one cycle + the linger; a server agent killed
with SIGKILL and restarted rebuilds its state from sock_diag without a lease lapse.

The servers' TCP endpoint here is the test's own echo listener (VIP:TEST_PORT in each server
namespace), so the test can close a connection from the server side."""

from __future__ import annotations

import socket
import struct
import threading
import time
import uuid

import numpy as np
import pytest
from agent_lab_helpers import CLIENT_IP, AgentLab, agent_lab, wait_for
from connpub.agents import lb as lbagent
from connpub.datapath import lbctl, maglev, netlink
from connpub.datapath.abi import FLOW_KEY_DTYPE
from connpub.datapath.clock import datapath_clock

pytestmark = pytest.mark.root

INTERVAL_S = 0.25
K = 16.0  # lease and linger k*T = 4 s: a restarted agent (0.6-2.3 s here, loaded) publishes first
LINGER_S = K * INTERVAL_S
UDP_HORIZON_S = 2.0
QUIET_S = 5 * UDP_HORIZON_S
# what packets alone would allow a quiet TCP flow (tcp = "packets"): its lease would end by
# 4 + k*T = 8 s of quiet, inside QUIET_S, and a server-side close would keep it that long
TCP_IDLE_TIMEOUT_S = 4.0
TEST_PORT = 8099
# a close is seen at the next cycle, the lease then runs out within the linger; slack: the
# LB's own cycle and the polling on a loaded machine
CLOSE_BOUND_S = INTERVAL_S + LINGER_S + 0.5
RST_LINGER = struct.pack("ii", 1, 0)


class EchoServers:
    """A TCP echo listener on VIP:TEST_PORT in every server namespace (one thread each, one
    thread per connection); `close(client_port, reset)` has the connection's thread close its
    server side (a socket closed under a thread blocked in recv() would stay open)."""

    def __init__(self, env: AgentLab) -> None:
        self.conns: dict[int, str] = {}
        self.close_requests: dict[int, tuple[bool, threading.Event]] = {}
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.listeners = []
        for server in env.lab.servers:
            with netlink.entered(server.netns):
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((env.lab.vip4, TEST_PORT))
            listener.listen(128)
            self.listeners.append(listener)
            threading.Thread(target=self._accept, args=(server.name, listener),
                             daemon=True).start()

    def _accept(self, name: str, listener: socket.socket) -> None:
        while True:
            try:
                conn, (_, port) = listener.accept()
            except OSError:
                return
            with self.lock:
                self.conns[port] = name
            threading.Thread(target=self._echo, args=(conn, port), daemon=True).start()

    def _echo(self, conn: socket.socket, port: int) -> None:
        conn.settimeout(0.02)
        try:
            while not self.stopping.is_set():
                request = self.close_requests.get(port)
                if request is not None:
                    if request[0]:
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_LINGER)
                    conn.close()
                    request[1].set()
                    return
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                conn.sendall(data)
        except OSError:
            pass
        conn.close()

    def server_of(self, client_port: int) -> str:
        return wait_for(lambda: self.conns.get(client_port), "the accept", 5)

    def close(self, client_port: int, reset: bool = False) -> None:
        done = threading.Event()
        self.close_requests[client_port] = (reset, done)
        assert done.wait(5), "the server side did not close"

    def stop(self) -> None:
        self.stopping.set()
        for listener in self.listeners:
            listener.close()


def connect(env: AgentLab) -> socket.socket:
    with netlink.entered(env.lab.nodes["client1"].netns):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect((env.lab.vip4, TEST_PORT))
    return client


def echo(client: socket.socket, payload: bytes) -> bytes:
    client.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = client.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def conn_key(env: AgentLab, client: socket.socket) -> np.ndarray:
    key = np.zeros(1, FLOW_KEY_DTYPE)
    key["client_addr"] = lbctl.address_bytes(CLIENT_IP)[0]
    key["vip_addr"] = lbctl.address_bytes(env.lab.vip4)[0]
    key["client_port"] = client.getsockname()[1]
    key["vip_port"] = TEST_PORT
    key["proto"] = 6
    return key


def leased(env: AgentLab, keys: np.ndarray) -> np.ndarray:
    """Per key: the LB holds a valid lease for it (own or an aggregate's)."""
    table_keys, conns = lbctl.read_conns(env.lb_pin)
    agg_keys, agg_expiry = lbctl.read_agg_leases(env.lb_pin)
    found, rows = lbagent.join(table_keys, keys)
    out = np.zeros(len(keys), bool)
    if found.any():
        out[found] = lbagent.valid_leases(table_keys[rows[found]], conns[rows[found]],
                                          agg_keys, agg_expiry, datapath_clock().now_ns())
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    prefix = "lv" + uuid.uuid4().hex[:5]
    overrides = {"lease": {"idle_timeout_s": TCP_IDLE_TIMEOUT_S},
                 "liveness": {"udp_idle_s": UDP_HORIZON_S, "udp_stream_idle_s": UDP_HORIZON_S}}
    with agent_lab(prefix, tmp_path_factory.mktemp("liveness"), servers=2, backend_ids=[1],
                   interval_s=INTERVAL_S, k=K, overrides=overrides) as lab_env:
        lbctl.add_vip(lab_env.lb_pin, lab_env.lab.vip4, TEST_PORT, "tcp", service=0)
        servers = EchoServers(lab_env)
        lab_env.echo = servers
        try:
            yield lab_env
        finally:
            servers.stop()


@pytest.fixture
def agents(env):
    try:
        env.start_all("baseline")
        yield env
    finally:
        env.stop_all()


def watch_leases(env: AgentLab, keys: np.ndarray, seconds: float) -> int:
    """The fewest of `keys` holding a valid lease, sampled every 50 ms for `seconds`."""
    low = len(keys)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        low = min(low, int(leased(env, keys).sum()))
        time.sleep(0.05)
    return low


def test_quiet_connection_keeps_its_lease_and_survives_a_new_backend(agents):
    env = agents
    misses = lbctl.lease_misses(env.lb_pin)
    clients = [connect(env) for _ in range(12)]
    try:
        for i, client in enumerate(clients):
            assert echo(client, bytes([i]) * 100) == bytes([i]) * 100
        keys = np.concatenate([conn_key(env, c) for c in clients]).astype(FLOW_KEY_DTYPE)
        assert {env.echo.server_of(c.getsockname()[1]) for c in clients} == {"srv1"}
        wait_for(lambda: leased(env, keys).all(), "every connection leased", 5)
        # quiet for 5x the UDP horizon (and past the packets-only TCP idle timeout)
        low = watch_leases(env, keys, QUIET_S)
        backend = env.lab.backends()[1]
        lbctl.add_backend(env.lb_pin, 2, backend["ipv4"], services=(0,), mac=backend["mac"])
        table = lbctl.maglev_table(env.lb_pin, 0)
        would_move = int((table[maglev.slots_of(keys, len(table))] == 2).sum())
        echoed = [echo(c, b"resumed" * 20) for c in clients]
        assert low == len(clients)
        assert would_move > 0  # Maglev sends these to srv2 now: only their lease keeps them
        assert echoed == [b"resumed" * 20] * len(clients)
        assert lbctl.lease_misses(env.lb_pin) - misses == 0
        print(f"\nquiet {QUIET_S:.0f}s (UDP horizon {UDP_HORIZON_S:.0f}s): {len(clients)}/"
              f"{len(clients)} leased throughout, {would_move} would move by Maglev, "
              "all echoed, 0 lease misses")
    finally:
        for client in clients:
            client.close()
        lbctl.del_backend(env.lb_pin, 2)


@pytest.mark.parametrize(("mode", "how"), [
    ("baseline", "server_fin"), ("baseline", "server_rst"), ("baseline", "client_fin"),
    ("baseline", "client_rst"),
    # model leases outlive the close: the LB cannot see a server-side close, the agent's
    # CLOSED entry (sent when the flow is finished, after the linger) ends the lease
    ("predictive", "server_fin"), ("predictive", "server_rst")])
def test_closed_connection_released_within_a_cycle_and_the_linger(env, mode, how):
    env.start_all(mode)
    client = connect(env)
    try:
        assert echo(client, b"x" * 100) == b"x" * 100
        key = conn_key(env, client)
        port = client.getsockname()[1]
        env.echo.server_of(port)
        wait_for(lambda: leased(env, key).all(), "the connection leased", 5)
        assert watch_leases(env, key, 1.0) == 1  # quiet for a second, leased
        closed_at = time.monotonic()
        if how.startswith("server"):
            env.echo.close(port, reset=how == "server_rst")
        else:
            if how == "client_rst":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_LINGER)
            client.close()
        wait_for(lambda: not leased(env, key).any(), "the lease to end", 10, 0.02)
        released_s = time.monotonic() - closed_at
        print(f"\n{mode} {how}: LB lease ended {released_s:.2f}s after the close "
              f"(bound one cycle + linger + slack = {CLOSE_BOUND_S:.2f}s)")
        assert released_s <= CLOSE_BOUND_S
    finally:
        client.close()
        env.stop_all()


def test_server_agent_sigkill_restart_rebuilds_from_the_kernel(agents):
    """SIGKILL the agent of srv1 while its connections are quiet, close one from the server
    while it is down: the restarted agent finds the same tracepoint program still recording
    (no compile), re-seeds from sock_diag, renews the open connections before their leases
    lapse and releases the one closed meanwhile."""
    env = agents
    misses = lbctl.lease_misses(env.lb_pin)
    clients = [connect(env) for _ in range(6)]
    try:
        for client in clients:
            assert echo(client, b"y" * 50) == b"y" * 50
        keys = np.concatenate([conn_key(env, c) for c in clients]).astype(FLOW_KEY_DTYPE)
        wait_for(lambda: leased(env, keys).all(), "every connection leased", 5)
        assert watch_leases(env, keys, UDP_HORIZON_S) == len(clients)
        victim = next(a for a in env.agents if a.node == "srv1")
        env.kill9(victim)
        killed_at = time.monotonic()
        env.echo.close(clients[0].getsockname()[1])  # closed while no agent runs
        restarted = env.start_server("baseline", 1)
        status = wait_for(lambda: restarted.status() if restarted.status().get("pid")
                          == restarted.proc.pid and restarted.status().get("cycles", 0) >= 1
                          else None, "the restarted agent's first cycle", 10, 0.01)
        recovered_s = time.monotonic() - killed_at
        tcp = status["tcpstate"]
        assert tcp["reused"] is True  # the pinned link kept recording: no compile
        assert tcp["seed"]["sockets"] >= len(clients) - 1
        low = watch_leases(env, keys[1:], UDP_HORIZON_S)
        wait_for(lambda: not leased(env, keys[:1]).any(), "the closed one released",
                 CLOSE_BOUND_S + 2, 0.02)
        echoed = [echo(c, b"after") for c in clients[1:]]
        print(f"\nserver agent SIGKILL -> first cycle of the new agent {recovered_s:.2f}s "
              f"(lease k*T = {LINGER_S:.1f}s; tcpstate reused, seed "
              f"{tcp['seed']['seed_s'] * 1000:.1f} ms for {tcp['seed']['sockets']} sockets)")
        assert recovered_s < LINGER_S - INTERVAL_S
        assert low == len(clients) - 1
        assert echoed == [b"after"] * (len(clients) - 1)
        assert lbctl.lease_misses(env.lb_pin) - misses == 0
    finally:
        for client in clients:
            client.close()
