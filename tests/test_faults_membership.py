"""Faults with live traffic, issue 7 part 4: LB membership and backend changes under 500 live
TCP connections. The connections start with backends {1, 2} at lb1; then backend 3 joins lb1
(its Maglev table changes under the live flows), a second LB node joins with backends
{1, 2, 3} (a Maglev pick there would send a third of the flows to srv3, which holds none of
them), learns the live connections from one resync publish, and takes half the flows (router
ECMP); then lb1 leaves (the router sends everything to lb2 and lb1's agent stops), and backend 1
is drained at lb2. Target: no broken connection, no lease miss. docs/reliability.md."""

from __future__ import annotations

import time
import uuid

import pytest
from agent_lab_helpers import agent_lab, finish_load, setup_lb, wait_for
from connpub.datapath import lbctl
from connpub.lab import topology as labmod

pytestmark = pytest.mark.root

CONNECTIONS = 500
HOLD_S = 16.0
INTERVAL_S = 0.5
K = 3.0


@pytest.fixture
def env(tmp_path):
    prefix = "fm" + uuid.uuid4().hex[:5]
    with agent_lab(prefix, tmp_path, servers=3, backend_ids=[1, 2], interval_s=INTERVAL_S,
                   k=K, connections=CONNECTIONS,
                   lb_addresses=["10.103.0.1", "10.103.0.2"],
                   overrides={"publish": {"send_to": "all"}}) as lab_env:
        yield lab_env


def _stats(pin) -> dict:
    stats = lbctl.read_stats(pin)
    return {name: stats[name] for name in ("lease_miss", "midstream_new", "new_flow",
                                           "lease_hit", "agg_hit", "backend_gone")}


def test_lb_join_leave_backend_add_drain_500_connections(env):
    env.start_all("baseline")
    lb1 = env.lb_pin
    srv3 = env.lab.backends()[2]
    load = env.load(HOLD_S, keepalive_s=0.25, timeout_s=5.0)
    timeline = {}
    started = time.monotonic()
    try:
        wait_for(lambda: env.client_leases(0) == (CONNECTIONS, CONNECTIONS),
                 "500 connections leased at lb1", 20, 0.2)
        timeline["leased"] = time.monotonic() - started
        # 1. backend 3 joins lb1: its Maglev table moves ~1/3 of the slots to srv3
        lbctl.add_backend(lb1, 3, srv3["ipv4"], services=(0,), mac=srv3["mac"])
        # 2. lb2 joins with backends {1, 2, 3}; its agent asks every server for a resync
        labmod.add_lb(env.prefix)
        env.lab = labmod.load_lab(env.prefix)
        lb2 = setup_lb(env.lab, "lb2", [1, 2, 3])
        timeline["lb2_attached"] = time.monotonic() - started
        env.start_lb("baseline", "lb2")
        wait_for(lambda: env.client_leases(0, "lb2") == (CONNECTIONS, CONNECTIONS),
                 "lb2 learning every live connection from the resync", 10, 0.05)
        timeline["lb2_synced"] = time.monotonic() - started
        keys1, conns1 = lbctl.read_conns(lb1)
        keys2, conns2 = lbctl.read_conns(lb2)
        from connpub.agents.lb import join  # noqa: PLC0415

        found, rows = join(keys1, keys2)
        assert found.all()
        assert (conns1["backend_id"][rows] == conns2["backend_id"]).all()
        assert set(conns2["backend_id"].tolist()) == {1, 2}
        # 3. the router spreads the VIP over lb1 and lb2 (ECMP, L4 hash)
        labmod.set_vip_next_hops(env.prefix, ["lb1", "lb2"])
        time.sleep(2.0)  # traffic flows through both for a while (not a synchronisation)
        assert _stats(lb2)["lease_hit"] > 0
        # 4. lb1 leaves: everything to lb2, lb1's agent stops
        labmod.set_vip_next_hops(env.prefix, ["lb2"])
        lb1_agent = next(a for a in env.agents if a.node == "lb1")
        lb1_agent.proc.terminate()
        lb1_agent.proc.wait(timeout=10)
        env.agents.remove(lb1_agent)
        timeline["lb1_left"] = time.monotonic() - started
        time.sleep(2.0)
        # 5. backend 1 drains at lb2: its flows keep going while srv1 renews their leases
        lbctl.drain_backend(lb2, 1)
        timeline["drained"] = time.monotonic() - started
        report = finish_load(load, HOLD_S + 60)
    finally:
        if load.poll() is None:
            load.kill()
    errors = [r["error"] for r in report["results"] if not r["ok"]][:3]
    stats1, stats2 = _stats(lb1), _stats(lb2)
    print(f"\nmembership: {report['ok']}/{CONNECTIONS} ok, servers {report['servers']}, "
          f"timeline {({k: round(v, 2) for k, v in timeline.items()})}, lb1 {stats1}, "
          f"lb2 {stats2}")
    assert (report["ok"], report["failed"]) == (CONNECTIONS, 0), errors
    assert stats1["lease_miss"] == 0 and stats2["lease_miss"] == 0
    assert stats2["midstream_new"] == 0  # every mid-flow packet at lb2 found its connection
    assert "srv3" not in report["servers"]
