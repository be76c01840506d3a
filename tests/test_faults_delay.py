"""Faults with live traffic, issue 7 part 5 (delay): every PUBLISH packet reaches the LB 200 ms
late. This kernel has no netem, so the servers publish to a UDP relay in the LB's namespace
(tests/delay_relay.py, on an extra fabric address) that forwards each datagram 200 ms later.
With T = 0.5 s and k = 3 a lease outlives a renewal delay of up to 2T; 200 ms costs nothing:
no lease miss, no broken connection. docs/reliability.md."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
from agent_lab_helpers import agent_lab, finish_load, wait_for
from connpub.datapath import lbctl, netlink
from connpub.datapath.clock import datapath_clock
from connpub.lab import topology as labmod

pytestmark = pytest.mark.root

RELAY_IP = "10.103.0.201"
LB_FABRIC_IP = "10.103.0.1"
DELAY_MS = 200
CONNECTIONS = 100
HOLD_S = 8.0


def test_publish_delayed_200ms_no_miss(tmp_path):
    prefix = "fd" + uuid.uuid4().hex[:5]
    relay_pid = None
    with agent_lab(prefix, tmp_path, servers=2, interval_s=0.5, k=3.0, connections=CONNECTIONS,
                   lb_addresses=[RELAY_IP],
                   # the relay, in the LB's netns, is the only sender the LB sees (its datagrams
                   # come from the LB's own fabric address): allow it (docs/config.md
                   # allowed_sources; the default, the backends' addresses, drops them)
                   role_overrides={"lb": {"agent": {"listen_address": LB_FABRIC_IP,
                                                    "allowed_sources": [f"{LB_FABRIC_IP}/32"]}}}
                   ) as env:
        try:
            netlink.add_address("fab", env.lb_netns, f"{RELAY_IP}/24")
            relay_log = tmp_path / "relay.log"
            relay_pid = labmod.spawn_in_netns(
                env.lb_netns, [sys.executable, str(Path(__file__).with_name("delay_relay.py")),
                               "--listen", f"{RELAY_IP}:7390", "--to", f"{LB_FABRIC_IP}:7390",
                               "--delay-ms", str(DELAY_MS)], relay_log)
            wait_for(lambda: "ready" in relay_log.read_text(), "the relay", 10)
            env.start_all("baseline")
            misses = lbctl.lease_misses(env.lb_pin)
            since_ns = datapath_clock().now_ns()
            load = env.load(HOLD_S)
            started = time.monotonic()
            wait_for(lambda: env.client_leases(since_ns) == (CONNECTIONS, CONNECTIONS),
                     "every connection leased through the delayed path", 10)
            lowest = CONNECTIONS
            while load.poll() is None and time.monotonic() - started < HOLD_S - 1:
                lowest = min(lowest, env.client_leases(since_ns)[1])
                time.sleep(0.1)  # sampling period
            report = finish_load(load, HOLD_S + 30)
            missed = lbctl.lease_misses(env.lb_pin) - misses
            received = env.statuses()[0]["totals"].get("publish_packets{direction=received}", 0)
        finally:
            if relay_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(relay_pid, signal.SIGTERM)
    print(f"\ndelay {DELAY_MS} ms: {report['ok']}/{CONNECTIONS} ok, lowest valid leases "
          f"{lowest}, LB received {received} publish packets via the relay")
    assert (report["ok"], report["failed"]) == (CONNECTIONS, 0)
    assert missed == 0
    assert lowest == CONNECTIONS
    assert received > 0
