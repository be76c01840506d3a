"""Issue 3's lab acceptance: real TCP through the LB program to three servers (DSR)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from connpub import paths
from connpub.datapath import lbctl, netlink
from connpub.lab import topology as labmod

pytestmark = pytest.mark.root

CONNECTIONS = 200


def established_sockets(netns: str, vip_hex: str, port: int) -> set[tuple[str, int]]:
    """(local address hex, local port) of ESTABLISHED TCP connections to vip:port in netns
    (/proc/net/tcp)."""
    out = labmod.run_in_netns(netns, ["cat", "/proc/net/tcp"], timeout_s=10).stdout
    sockets = set()
    for line in out.splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if state == "01" and remote == f"{vip_hex}:{port:04X}":
            address, local_port = local.split(":")
            sockets.add((address, int(local_port, 16)))
    return sockets


def wait_established(netns: str, vip: str, port: int, count: int,
                     timeout_s: float) -> set[tuple[str, int]]:
    """Poll (deadline) until `count` connections to vip:port are ESTABLISHED in netns; returns
    the last set seen."""
    vip_hex = "".join(f"{int(b):02X}" for b in reversed(vip.split(".")))
    deadline = time.monotonic() + timeout_s
    live: set[tuple[str, int]] = set()
    while time.monotonic() < deadline:
        live = established_sockets(netns, vip_hex, port)
        if len(live) == count:
            break
        time.sleep(0.1)
    return live


def test_200_connections_spread_over_3_servers_and_conn_table_is_exactly_live(unique_prefix):
    try:
        lab = labmod.up(unique_prefix, clients=1, lbs=1, servers=3)
        # no agents here: the initial lease must outlive the connections (else every one would
        # rightly count a lease miss after initial_lease_s)
        attached = labmod.attach_datapath(lab, "redirect", {"initial_lease_s": 60.0})
        pin_dir = attached["lb"][0]["pin_dir"]
        client = lab.clients[0]
        proc = subprocess.Popen(
            [sys.executable, "-m", "connpub.traffic.services", "load", "--vip", lab.vip4,
             "--port", "80",
             "--connections", str(CONNECTIONS), "--bytes", "3000", "--hold", "6",
             "--keepalive", "1", "--timeout", "10", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=labmod._enter_in_child(client.netns))
        live = {port for _, port in wait_established(client.netns, lab.vip4, 80, CONNECTIONS, 20)}
        assert len(live) == CONNECTIONS
        keys, values = lbctl.read_conns(paths.Path(pin_dir))
        table_ports = {int(p) for p in keys["client_port"]}
        assert len(keys) == CONNECTIONS and table_ports == live
        assert set(values["backend_id"].tolist()) == {1, 2, 3}
        out, err = proc.communicate(timeout=60)
        report = json.loads(out)
        failures = [r["error"] for r in report["results"] if not r["ok"]][:5]
        assert report["failed"] == 0, (report["ok"], failures)
        assert report["bytes_echoed"] == report["bytes_sent"]
        shares = {name: count / CONNECTIONS for name, count in report["servers"].items()}
        assert set(shares) == {"srv1", "srv2", "srv3"}
        assert all(0.20 <= share <= 0.47 for share in shares.values()), shares
        stats = lbctl.read_stats(paths.Path(pin_dir))
        assert stats["lease_miss"] == 0 and stats["new_flow"] == CONNECTIONS
    finally:
        labmod.down(unique_prefix)
    assert not netlink.list_netns(f"{unique_prefix}-")
    assert not (paths.PIN_ROOT / f"{unique_prefix}-lb1").exists()


AGG_CLIENTS = 20
AGG_CONNECTIONS = 500


def test_500_connections_from_20_clients_at_level_2_keep_one_lb_entry_per_client(unique_prefix):
    """Aggregate affinity (docs/lb.md "Aggregates"): the VIP at level 2 (client + VIP), 500
    real TCP connections from 20 client addresses: the LB keeps one aggregate entry per client
    and no flow entry, each client's connections all land on its aggregate's server, every byte
    is echoed and no lease is missed."""
    try:
        lab = labmod.up(unique_prefix, clients=1, lbs=1, servers=3)
        # no agents: the initial lease must outlive the connections
        attached = labmod.attach_datapath(lab, "redirect", {"initial_lease_s": 60.0})
        pin_dir = paths.Path(attached["lb"][0]["pin_dir"])
        client = lab.clients[0]
        sources = [f"10.100.1.{10 + i}" for i in range(AGG_CLIENTS)]
        for address in sources:
            netlink.add_address("eth0", client.netns, f"{address}/24")
        assert lbctl.set_vip_levels(pin_dir, lbctl.vip_key(lab.vip4, 80, "tcp"), 2) == 1
        command = [sys.executable, "-m", "connpub.traffic.services", "load", "--vip", lab.vip4,
                   "--port", "80", "--connections", str(AGG_CONNECTIONS), "--bytes", "3000",
                   "--hold", "8", "--keepalive", "1", "--timeout", "20", "--json"]
        for address in sources:
            command += ["--source", address]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=labmod._enter_in_child(client.netns))
        live = wait_established(client.netns, lab.vip4, 80, AGG_CONNECTIONS, 40)
        assert len(live) == AGG_CONNECTIONS
        conn_keys, _ = lbctl.read_conns(pin_dir)
        agg_keys, agg_values = lbctl.read_agg_leases(pin_dir)
        own_keys, own = lbctl.own_aggregates(agg_keys, agg_values)
        level0_flows = len(conn_keys)
        assert level0_flows == 0
        assert len(agg_keys) + level0_flows <= AGG_CLIENTS + 5 + level0_flows
        assert len(own_keys) == AGG_CLIENTS and (own_keys["agg"]["level"] == 2).all()
        assert int(own["flow_count"].sum()) == AGG_CONNECTIONS
        out, err = proc.communicate(timeout=90)
        report = json.loads(out)
        failures = [r["error"] for r in report["results"] if not r["ok"]][:5]
        assert report["failed"] == 0, (report["ok"], failures, err[-500:])
        assert report["ok"] == AGG_CONNECTIONS
        assert report["bytes_echoed"] == report["bytes_sent"] > 0
        by_client: dict[str, set[str]] = {}
        for result in report["results"]:
            by_client.setdefault(result["source"], set()).add(result["server"])
        assert len(by_client) == AGG_CLIENTS
        assert all(len(servers) == 1 for servers in by_client.values()), by_client
        assert len({next(iter(s)) for s in by_client.values()}) >= 2  # spread over servers
        stats = lbctl.read_stats(pin_dir)
        assert stats["lease_miss"] == 0 and stats["midstream_new"] == 0
        assert stats["agg_insert"] == AGG_CLIENTS and stats["new_flow"] == AGG_CLIENTS
        assert stats["transition_flow"] == 0 and stats["conn_insert_failed"] == 0
    finally:
        labmod.down(unique_prefix)
    assert not netlink.list_netns(f"{unique_prefix}-")
    assert not (paths.PIN_ROOT / f"{unique_prefix}-lb1").exists()
