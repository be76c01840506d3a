"""Faults, issue 7 part 7: hostile publishing. The real LB agent (`LbAgent.handle`, the code
path of the running agent) on a scratch-loaded LB program: forged tags, replays, leases beyond
the maximum, a server renewing flows another server holds, floods, the per-sender entry
quota — each rejected or refused, counted, and unable to keep a lease alive. And the agents
refuse a key file that group/others can read. docs/reliability.md."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from connpub.agents.common import AgentSocket
from connpub.agents.lb import LbAgent, join
from connpub.config import load_config
from connpub.datapath import lbctl, loader
from connpub.datapath.abi import PUBLISH_ENTRY_DTYPE
from connpub.lab.run import toml_text
from connpub.protocol.wire import Encoder

pytestmark = pytest.mark.root

VIP = "10.200.0.1"
CLIENT = "10.100.1.2"
INTERVAL_S = 0.5
K = 3.0
MAX_LEASE_S = 30.0
QUOTA = 200.0  # entries/s per sender


def write_config(folder, key_file, **security) -> object:
    path = folder / "lb.toml"
    path.write_text(toml_text({
        "publish": {"interval_s": INTERVAL_S},
        "lease": {"k": K, "min_s": 0.1, "max_s": MAX_LEASE_S, "initial_s": 1.0},
        "security": {"key_file": str(key_file), "per_sender_entry_quota": QUOTA, **security},
        "agent": {"server_id": 9, "listen_address": "127.0.0.1", "listen_port": 7390,
                  "metrics_port": 0},
    }))
    return path


@pytest.fixture
def lb(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(bytes(range(32)).hex())
    key_file.chmod(0o600)
    cfg = load_config(write_config(tmp_path, key_file))
    pin_dir = loader.scratch_pin_dir("faultsec")
    program = loader.compile_program("lb", pin_dir)
    sock = AgentSocket("127.0.0.1", 0)
    agent = None
    try:
        lbctl.init_lb_maps(pin_dir, lb_addr4="10.103.0.1", src_mac="02:00:00:00:00:01",
                           gateway_mac="02:00:00:00:00:02")
        lbctl.add_vip(pin_dir, VIP, 80, "tcp", service=0)
        for backend in (1, 2):
            lbctl.add_backend(pin_dir, backend, f"10.103.0.{100 + backend}", services=(0,),
                              mac=f"02:00:00:00:01:0{backend}")
        agent = LbAgent(cfg, pin_dir, key=bytes(range(32)), agent_socket=sock)
        yield agent
    finally:
        if agent is not None:  # its ticks (housekeeping) write a status file
            agent.status_file.unlink(missing_ok=True)
        sock.close()
        program.close()
        loader.remove_pins(pin_dir)


def flow_entries(ports, backend: int, level: int = 0, lease_ms: int = 0) -> np.ndarray:
    entries = np.zeros(len(ports), PUBLISH_ENTRY_DTYPE)
    entries["level"] = level
    entries["backend_id"] = backend
    entries["flow_count"] = 1
    entries["key"]["client_addr"] = lbctl.address_bytes(CLIENT)[0]
    entries["key"]["vip_addr"] = lbctl.address_bytes(VIP)[0]
    entries["key"]["client_port"] = 0 if level else np.asarray(ports)
    entries["key"]["vip_port"] = 80 if level < 2 else 0
    entries["key"]["proto"] = 6
    entries["predicted_remaining_ms"] = lease_ms
    return entries


def send(agent: LbAgent, packets: list[bytes]) -> None:
    agent.handle([(packet, ("127.0.0.1", 7390)) for packet in packets])


def conns_of(agent: LbAgent, ports) -> np.ndarray:
    keys, conns = lbctl.read_conns(agent.pin_dir)
    wanted = np.ascontiguousarray(flow_entries(ports, 1)["key"]).astype(keys.dtype)
    found, rows = join(keys, wanted)
    assert found.all()
    return conns[rows]


def totals(agent: LbAgent) -> dict:
    return agent.metrics.totals


def test_server_cannot_renew_or_steal_flows_another_server_holds(lb):
    key = lb.key
    server1, server2 = Encoder(1, key, 1400), Encoder(2, key, 1400)
    now = lb.clock.now_ns()
    ports = [1000, 1001, 1002]
    send(lb, server1.publish(flow_entries(ports, 1), now))
    before = conns_of(lb, ports)
    assert (before["backend_id"] == 1).all()
    # server 2 publishes the same flows under its own (correct) id, asking for the longest lease
    # and also an aggregate covering them
    time.sleep(0.05)
    send(lb, server2.publish(flow_entries(ports, 2, lease_ms=int(MAX_LEASE_S * 1000)), now))
    send(lb, server2.publish(flow_entries([0], 2, level=1, lease_ms=int(MAX_LEASE_S * 1000)),
                             now))
    after = conns_of(lb, ports)
    assert (after["backend_id"] == 1).all()
    assert (after["lease_expiry_ns"] == before["lease_expiry_ns"]).all()
    assert totals(lb)["entries_ignored{reason=other_backend}"] == len(ports)
    # the aggregate lease is keyed by backend 2: it cannot keep backend 1's flows alive
    keys, conns = lbctl.read_conns(lb.pin_dir)
    agg_keys, agg_expiry = lbctl.read_agg_leases(lb.pin_dir)
    from connpub.agents.lb import valid_leases  # noqa: PLC0415

    later = int(before["lease_expiry_ns"].max()) + 1
    assert not valid_leases(keys, conns, agg_keys, agg_expiry, later).any()


def test_replayed_packets_cannot_keep_a_lease_alive(lb):
    encoder = Encoder(1, lb.key, 1400)
    now = lb.clock.now_ns()
    (packet,) = encoder.publish(flow_entries([2000], 1), now)
    send(lb, [packet])
    expiry = int(conns_of(lb, [2000])["lease_expiry_ns"][0])
    for _ in range(20):
        time.sleep(0.01)
        send(lb, [packet])
    assert int(conns_of(lb, [2000])["lease_expiry_ns"][0]) == expiry
    assert lb.decoder.counts["replay"] == 20
    # an older sequence from the same sender (outside the window) is refused as well
    old = Encoder(1, lb.key, 1400, first_sequence=encoder.next_sequence - 1000)
    send(lb, old.publish(flow_entries([2000], 1), now))
    assert lb.decoder.counts["replay"] == 21
    assert int(conns_of(lb, [2000])["lease_expiry_ns"][0]) == expiry


def test_lease_at_the_maximum_accepted_beyond_rejected(lb):
    encoder = Encoder(1, lb.key, 1400)
    now = lb.clock.now_ns()
    max_ms = int(MAX_LEASE_S * 1000)
    send(lb, encoder.publish(flow_entries([3000], 1, lease_ms=max_ms + 1), now))
    assert lb.decoder.counts["lease_too_long"] == 1
    assert len(lbctl.read_conns(lb.pin_dir)[0]) == 0
    applied_at = lb.clock.now_ns()
    send(lb, encoder.publish(flow_entries([3000], 1, lease_ms=max_ms), now))
    expiry = int(conns_of(lb, [3000])["lease_expiry_ns"][0])
    assert applied_at + max_ms * 1_000_000 <= expiry <= lb.clock.now_ns() + max_ms * 1_000_000


def test_flood_of_forged_packets_is_counted_and_changes_nothing(lb):
    rng = np.random.default_rng(7)
    encoder = Encoder(1, lb.key, 1400)
    forger = Encoder(1, bytes(32), 1400)  # right format, wrong key
    now = lb.clock.now_ns()
    entries = flow_entries(np.arange(4000, 4018), 1)
    template = forger.publish(entries, now)[0]
    flood = []
    for _ in range(20_000):
        packet = bytearray(template)
        packet[-16:] = rng.bytes(16)
        flood.append(bytes(packet))
    started = time.perf_counter()
    send(lb, flood)
    elapsed = time.perf_counter() - started
    print(f"\nflood: 20000 forged 18-entry packets rejected in {elapsed:.2f}s "
          f"({20_000 / elapsed:.0f} packets/s)")
    assert lb.decoder.counts["bad_tag"] == 20_000
    assert totals(lb)["rejected{reason=bad_tag}"] == 20_000
    assert len(lbctl.read_conns(lb.pin_dir)[0]) == 0
    # the flood burnt no sequence and no quota: the honest sender's next packet is applied
    send(lb, encoder.publish(entries, now))
    assert lb.decoder.counts["accepted"] == 1
    assert len(lbctl.read_conns(lb.pin_dir)[0]) == 18


def test_per_sender_entry_quota_is_enforced(lb):
    now = lb.clock.now_ns()
    greedy, honest = Encoder(1, lb.key, 1400), Encoder(2, lb.key, 1400)
    burst = greedy.publish(flow_entries(np.arange(5000, 5000 + 18 * 30), 1), now)
    assert len(burst) == 30
    send(lb, burst)
    accepted = lb.decoder.counts["accepted"]
    # a bucket of QUOTA entries (one second of burst): 11 packets of 18 entries fit in 200
    assert accepted == int(QUOTA) // 18
    assert lb.decoder.counts["quota"] == 30 - accepted
    assert len(lbctl.read_conns(lb.pin_dir)[0]) == accepted * 18
    # another sender has its own bucket
    send(lb, honest.publish(flow_entries(np.arange(6000, 6018), 2), now))
    assert lb.decoder.counts["accepted"] == accepted + 1


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_agents_refuse_a_key_file_others_can_read(tmp_path, mode):
    key_file = tmp_path / "key"
    key_file.write_text(bytes(range(32)).hex())
    key_file.chmod(mode)
    config = write_config(tmp_path, key_file)
    env = {**os.environ, "PYTHONPATH": str(loader.paths.Path(loader.__file__).parents[1])}
    for role in ("lb", "server"):
        result = subprocess.run(
            [sys.executable, "-m", "connpub.cli", "agent", role, "--config", str(config),
             "--iface", "eth0"], capture_output=True, text=True, timeout=60, env=env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1 and str(key_file) in lines[0], lines
        assert "chmod 600" in lines[0] or "0600" in lines[0] or "600" in lines[0], lines
