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


def established_ports(netns: str, vip_hex: str, port: int) -> set[int]:
    """Local ports of ESTABLISHED TCP connections to vip:port in netns (/proc/net/tcp)."""
    out = labmod.run_in_netns(netns, ["cat", "/proc/net/tcp"], timeout_s=10).stdout
    ports = set()
    for line in out.splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if state == "01" and remote == f"{vip_hex}:{port:04X}":
            ports.add(int(local.split(":")[1], 16))
    return ports


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
        vip_hex = "".join(f"{int(b):02X}" for b in reversed(lab.vip4.split(".")))
        deadline = time.monotonic() + 20
        live: set[int] = set()
        while time.monotonic() < deadline:
            live = established_ports(client.netns, vip_hex, 80)
            if len(live) == CONNECTIONS:
                break
            time.sleep(0.1)
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
