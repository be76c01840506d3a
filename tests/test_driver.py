"""The workload driver against the lab's echo servers: real TCP and UDP flows on a schedule."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from connpub.lab import topology as lab_mod
from connpub.traffic.driver import PLAN_DTYPE

pytestmark = pytest.mark.root


@pytest.fixture
def small_lab(unique_prefix):
    try:
        yield lab_mod.up(unique_prefix, clients=1, lbs=1, servers=1)
    finally:
        lab_mod.down(unique_prefix)


def test_driver_runs_tcp_and_udp_flows_on_schedule(small_lab, tmp_path):
    client = small_lab.clients[0]
    source = client.ifaces["eth0"].ip4
    plan = np.zeros(5, dtype=PLAN_DTYPE)
    plan["flow_id"] = np.arange(5)
    plan["start_s"] = [0.0, 0.1, 0.2, 0.3, 0.4]
    plan["duration_s"] = [0.5, 0.0, 1.0, 0.3, 0.6]
    plan["proto"] = [6, 6, 6, 17, 17]
    plan["vip"] = small_lab.vip4
    plan["port"] = [80, 443, 8443, 53, 5004]
    plan["source"] = source
    plan["chunk_bytes"] = [1000, 20, 3000, 100, 200]
    plan["gap_s"] = 0.2
    plan_path, out_path = tmp_path / "plan.npz", tmp_path / "out.json"
    np.savez(plan_path, plan=plan)
    proc = lab_mod.run_in_netns(
        client.netns,
        [sys.executable, "-m", "connpub.traffic.driver", "--plan", str(plan_path),
         "--out", str(out_path)],
        timeout_s=60,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out_path.read_text())
    assert report["summary"]["ok"] == 5 and report["summary"]["broken"] == 0
    flows = {f["flow_id"]: f for f in report["flows"]}
    server = small_lab.servers[0].name
    assert {f["server"] for f in flows.values()} == {server}
    # chunks: one at start, then one per 0.2 s gap until the duration is over
    assert [flows[i]["chunks"] for i in range(5)] == [4, 1, 6, 3, 4]
    assert flows[0]["bytes_echoed"] == 4 * 1000 and flows[2]["bytes_echoed"] == 6 * 3000
    for i in range(5):
        assert flows[i]["started_s"] == pytest.approx(plan["start_s"][i], abs=0.15)
        assert flows[i]["ended_s"] - flows[i]["started_s"] >= plan["duration_s"][i] - 0.01
