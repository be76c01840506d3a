"""Faults with live traffic, issue 7 part 6: map pressure. Both programs are built with small
tables (LB `MAX_CONNS` 256, server `MAX_FLOWS` 128); 230 long connections (a byte every
0.2 s) hold leases while a burst of 1500 short connections overfills both tables. Measured:
nothing crashes, the LRU evicts (counted as `midstream_new` at the LB when an evicted live
connection comes back at level 0, `held_hit` after the level change, and as extra `new_flow`s at
the servers), the LB agent moves the class to coarser levels because of the pressure (its own
policy would keep level 0 here), and no connection, long or short, breaks or misses a lease
(issue 15 item 12). docs/reliability.md "Map pressure"."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid

import numpy as np
import pytest
from agent_lab_helpers import agent_lab, finish_load, wait_for
from connpub import paths
from connpub.agents.server import open_server_map
from connpub.datapath.abi import STAT_NAMES

pytestmark = pytest.mark.root

MAX_CONNS = 256
MAX_FLOWS = 128
LONG = 230
BURST = 1500


KERNEL_COUNTERS = ("TcpExtListenOverflows", "TcpExtListenDrops", "TcpExtTCPBacklogDrop",
                   "TcpExtTCPSynRetrans", "TcpRetransSegs", "IpInDiscards", "IpOutDiscards",
                   "TcpExtTCPTimeouts", "TcpExtTCPReqQFullDrop", "TcpExtTCPReqQFullDoCookies")


def kernel_counters(netns: str) -> dict[str, int]:
    """The TCP/IP counters of one namespace (nstat -az: absolute values)."""
    out = subprocess.run(["ip", "netns", "exec", netns, "nstat", "-az"], capture_output=True,
                         text=True, check=True).stdout
    values = {}
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[0] in KERNEL_COUNTERS:
            values[parts[0]] = int(parts[1])
    return values


def link_drops(netns: str) -> dict[str, int]:
    """rx/tx dropped per interface of one namespace."""
    links = json.loads(subprocess.run(["ip", "-n", netns, "-s", "-j", "link"],
                                      capture_output=True, text=True, check=True).stdout)
    drops = {link["ifname"]: link["stats64"]["rx"]["dropped"] + link["stats64"]["tx"]["dropped"]
             for link in links if link.get("stats64")}
    for link in links:  # veth XDP counters: a full peer ring drops redirected frames here
        stats = subprocess.run(["ip", "netns", "exec", netns, "ethtool", "-S", link["ifname"]],
                               capture_output=True, text=True).stdout
        for line in stats.splitlines():
            name, _, value = line.strip().partition(": ")
            if ("drops" in name or "errors" in name) and value.isdigit():
                drops[f"{link['ifname']}.{name}"] = int(value)
    return drops


def server_stats(netns: str) -> dict[str, int]:
    with open_server_map(paths.pin_dir("fab", netns), "stats") as stats:
        totals = stats.items()[1].sum(axis=1)
    return {name: int(totals[i]) for i, name in enumerate(STAT_NAMES["server"])}


@pytest.fixture
def env(tmp_path):
    prefix = "fp" + uuid.uuid4().hex[:5]
    # the class's own statistics never ask for a coarser level (duration thresholds out of
    # reach): any level > 0 below comes from the map pressure. The pressure thresholds sit
    # below the defaults because the kernel's LRU evicts before the table is full: it refills
    # a CPU's free list by evicting a batch of entries, so the 256-entry table held 129-230 of
    # the 230 live connections at a time (docs/reliability.md "Map pressure")
    overrides = {"granularity": {"duration_long_s": 1000.0, "duration_very_long_s": 2000.0,
                                 "duration_extreme_long_s": 3000.0,
                                 "map_pressure": [0.25, 0.45, 0.95]},
                 # the default initial lease: 230 connections opened at once wait for their
                 # first publish longer than the lab's 1 s on a loaded host, a lease miss that
                 # is not this test's subject (docs/reliability.md "Restarts and upgrades")
                 "lease": {"initial_s": 3.0}}
    with agent_lab(prefix, tmp_path, servers=2, interval_s=0.5, k=3.0, connections=LONG,
                   lb_defines={"MAX_CONNS": MAX_CONNS},
                   server_defines={"MAX_FLOWS": MAX_FLOWS}, overrides=overrides) as lab_env:
        yield lab_env


def test_tables_past_capacity_evict_count_coarsen_and_keep_long_connections(env):
    from connpub.datapath import lbctl  # noqa: PLC0415

    env.start_all("adaptive")
    lb_agent = env.agents[0]
    with lbctl.open_map(env.lb_pin, "conns") as conns:
        assert conns.max_entries == MAX_CONNS
    levels_seen: list[int] = []
    occupancy_seen: list[float] = []

    # (s since the long load started, lease_miss / new level)
    misses_seen: list[tuple[float, int]] = []
    level_changes: list[tuple[float, int]] = []
    started = time.monotonic()

    def sample() -> dict:
        misses = lbctl.read_stats(env.lb_pin)["lease_miss"]
        if not misses_seen or misses != misses_seen[-1][1]:
            misses_seen.append((round(time.monotonic() - started, 2), misses))
        status = lb_agent.status()
        (cls,) = status.get("classes", {}).values() or [{"effective": 0}]
        levels_seen.append(int(cls["effective"]))
        if levels_seen[-1] != (levels_seen[:-1] or [0])[-1]:
            level_changes.append((round(time.monotonic() - started, 2), levels_seen[-1]))
        occupancy_seen.append(float(status.get("conn_occupancy", 0.0)))
        return status

    long_load = env.load(14.0, keepalive_s=0.2, timeout_s=5.0)
    started = time.monotonic()
    try:
        # leased: a connection entry or, once the pressure raised the level, an aggregate's
        # member (the class's active count is both)
        wait_for(lambda: int(next(iter(sample().get("classes", {}).values()),
                                  {}).get("active", 0)) >= LONG,
                 "the long connections leased", 15, 0.1)
        wait_for(lambda: sample() and levels_seen[-1] >= 2, "pressure level 2", 30, 0.1)
        level_before_burst = levels_seen[-1]
        burst = env.load(0.0, keepalive_s=0.0, connections=BURST, timeout_s=10.0)
        done = threading.Event()

        def sampler() -> None:  # the report is read below: its pipe must not fill up
            while not done.wait(0.1):
                sample()

        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        try:
            burst_report = finish_load(burst, 60)
            report = finish_load(long_load, 60)
        finally:
            done.set()
            thread.join(timeout=5)
    finally:
        if long_load.poll() is None:
            long_load.kill()
    stats = lbctl.read_stats(env.lb_pin)
    servers = [server_stats(s.netns) for s in env.lab.servers]
    kernel = {node.name: {k: v for k, v in kernel_counters(node.netns).items() if v}
              for node in env.lab.nodes.values()}
    drops = {node.name: {k: v for k, v in link_drops(node.netns).items() if v}
             for node in env.lab.nodes.values()}
    with lbctl.open_map(env.lb_pin, "conns") as conns:
        table_now = len(conns.keys())
    for server in env.lab.servers:
        with open_server_map(paths.pin_dir("fab", server.netns), "flows") as flows:
            assert len(flows.keys()) <= MAX_FLOWS
    alive = [a.proc.poll() is None for a in env.agents]
    summary = {"level_before_burst": level_before_burst, "max_level": max(levels_seen),
               "max_occupancy": max(occupancy_seen), "lb_new_flow": stats["new_flow"],
               "lb_midstream_new": stats["midstream_new"], "lb_lease_miss": stats["lease_miss"],
               "lb_insert_failed": stats["conn_insert_failed"], "lb_table": table_now,
               "lb_held_hit": stats["held_hit"], "lb_held_dropped": stats["held_dropped"],
               "lb_transition_flow": stats["transition_flow"], "lb_agg_member": stats["agg_member"],
               "lb_agg_insert": stats["agg_insert"], "lb_agg_miss": stats["agg_miss"],
               "lb_agg_hit": stats["agg_hit"], "lb_syn_reuse": stats["syn_reuse"],
               "lb_backend_gone": stats["backend_gone"],
               "lease_miss_at_s": misses_seen[-8:],
               "level_changes_at_s": level_changes[:6],
               "server_new_flow": [s["new_flow"] for s in servers],
               "server_table_full": [s["table_full"] for s in servers],
               "lb_drops": {name: stats[name] for name in ("no_backend", "too_big",
                                                           "encap_failed")},
               "burst_ok": burst_report["ok"], "long_ok": report["ok"],
               "burst_errors": sorted({str(r["error"])[:60] for r in burst_report["results"]
                                       if not r["ok"]})[:4]}
    print(f"\nmap pressure: {summary}\nkernel: {kernel}\nlink drops: {drops}")
    assert all(alive)
    errors = [r["error"] for r in report["results"] if not r["ok"]][:3]
    # every connection, long and short, completes: a long connection whose entry the LRU
    # evicts after the class left level 0 is kept on its backend by its held copy (held_hit),
    # not sent to the aggregate's backend, which would reset it; the copy exists before the
    # first eviction that can follow the level change (the class holds its flows from the
    # first sign of pressure on) and its lease follows every publish (docs/lb.md "Held flows")
    assert (report["ok"], report["failed"]) == (LONG, 0), errors
    assert (burst_report["ok"], burst_report["failed"]) == (BURST, 0), summary["burst_errors"]
    assert all(stats[name] == 0 for name in ("no_backend", "too_big", "encap_failed"))
    assert stats["conn_insert_failed"] == 0
    assert stats["lease_miss"] == 0, summary["lease_miss_at_s"]
    assert table_now <= MAX_CONNS
    assert level_before_burst >= 2
    # the burst joined the class's aggregate (no connection entry each): every one of its
    # connections sent at least its SYN and the 100 bytes there
    assert stats["agg_member"] >= 2 * BURST
    assert np.isfinite(max(occupancy_seen))
