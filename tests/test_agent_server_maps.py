"""The server agent on a real (scratch-loaded) server program's pinned maps: one publish cycle
read with batched syscalls, finished flows deleted into the history, directives written to
class_levels with a levels_gen bump, a resync answer."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
from connpub.agents.common import AgentSocket
from connpub.agents.server import ServerAgent
from connpub.config import AgentConfig, Config, LeaseConfig, LivenessConfig, PublishConfig
from connpub.datapath import loader
from connpub.datapath.abi import (
    AGG_KEY_DTYPE,
    AGG_VALUE_DTYPE,
    CLASS_LEVEL_DTYPE,
    DIRECTIVE_ENTRY_DTYPE,
    U32_DTYPE,
)
from connpub.datapath.clock import datapath_clock
from connpub.datapath.lbmaps import class_keys_of
from connpub.protocol.wire import (
    FLAG_RESYNC,
    Decoder,
    Encoder,
    PacketType,
    accepted_entries,
)
from connpub.traffic.trace import read_history
from datapath_fixtures import scratch
from test_agent_units import KEY, aggregates, class_keys, flow_keys, flow_values

pytestmark = pytest.mark.root
S = 1_000_000_000


@pytest.fixture(scope="module")
def program():
    with scratch("server") as prog:
        loader.init_server_maps(prog.pin_dir)
        yield prog


@pytest.fixture
def setup(program, tmp_path):
    program.clear("flows", "aggregates", "class_levels")
    receiver = AgentSocket("127.0.0.1", 0)
    agents = []

    def make(mode: str) -> ServerAgent:
        cfg = Config(publish=PublishConfig(interval_s=1.0, mode=mode),
                     lease=LeaseConfig(idle_timeout_s=10.0),
                     liveness=LivenessConfig(tcp="packets"),  # synthetic flows: no sockets
                     agent=AgentConfig(server_id=4, lb_addresses=("127.0.0.1",),
                                       listen_port=receiver.sock.getsockname()[1],
                                       metrics_port=0, history_path=str(tmp_path / "h")))
        agent = ServerAgent(cfg, program.pin_dir, key=KEY, iface=f"t{uuid.uuid4().hex[:6]}",
                            agent_socket=AgentSocket("127.0.0.1", 0))
        agents.append(agent)
        return agent

    try:
        yield program, receiver, make, tmp_path
    finally:
        for agent in agents:
            agent.status_file.unlink(missing_ok=True)
            agent.close()
        receiver.close()


def received(receiver: AgentSocket, packets: int) -> list:
    got = []
    deadline = time.monotonic() + 5
    while len(got) < packets and time.monotonic() < deadline:
        got += receiver.drain()
    return got


def test_cycle_publishes_live_flows_and_retires_finished_ones(setup):
    prog, receiver, make, tmp_path = setup
    agent = make("baseline")
    now = datapath_clock().now_ns()
    keys, values = flow_keys(6), flow_values(6)
    values["first_seen_ns"] = now - 20 * S
    values["last_seen_ns"] = [now, now, now, now - 4 * S, now - 11 * S, now]
    values["closed"] = [0, 0, 0, 1, 0, 1]  # 3: closed + lingered; 4: idle; 5: closed, recent
    with prog.open("flows") as flows:
        flows.update_batch(keys, values)
    cycle = agent.tick()
    assert (cycle["flows"], cycle["entries"], cycle["finished"], cycle["packets"]) == \
        (6, 3, 2, 1)
    ((packet, _),) = received(receiver, 1)
    decoded = Decoder(KEY, max_lease_ms=300_000).decode(packet)
    assert decoded.accepted and decoded.sender_id == 4
    assert sorted(decoded.entries["key"]["client_port"].tolist()) == [40000, 40001, 40002]
    assert decoded.entries["backend_id"].tolist() == [4, 4, 4]
    remaining, _ = prog.entries("flows")
    assert sorted(remaining["client_port"].tolist()) == [40000, 40001, 40002, 40005]
    agent.maybe_flush_history(force=True)
    history = read_history(tmp_path / "h")
    assert sorted(history["client_port"].tolist()) == [40003, 40004]
    assert sorted(history["closed"].tolist()) == [False, True]
    assert agent.metrics.totals["flows_finished{reason=closed}"] == 1
    assert agent.metrics.totals["flows_finished{reason=idle}"] == 1
    assert agent.metrics.totals["publish_entries{direction=sent,level=0}"] == 3


def test_adaptive_cycle_publishes_aggregates_and_level0_flows(setup):
    prog, receiver, make, _ = setup
    agent = make("adaptive")
    now = datapath_clock().now_ns()
    keys, values = flow_keys(3), flow_values(3)
    values["last_seen_ns"] = now
    values["level"] = [0, 1, 1]
    agg_keys, agg_values = aggregates(2)
    agg_values["last_seen_ns"] = now
    agg_values["active_flows"] = [1, 0]  # the second: no member left, recent: kept, silent
    with prog.open("flows") as flows:
        flows.update_batch(keys, values)
    with prog.open("aggregates") as aggs:
        aggs.update_batch(agg_keys, agg_values)  # the same value on every CPU
        ncpus = aggs.ncpus
    # the class is at level 1, as the directive that put the members there said (a member
    # whose class is at another level would be published as a flow of its own)
    with prog.open("class_levels") as levels:
        levels.update_batch(class_keys_of(keys[:1]), np.array([1], CLASS_LEVEL_DTYPE))
    cycle = agent.tick()
    assert (cycle["entries"], cycle["aggregates"], cycle["stale_aggregates"]) == (2, 2, 0)
    ((packet, _),) = received(receiver, 1)
    entries = Decoder(KEY, max_lease_ms=300_000).decode(packet).entries
    assert entries["level"].tolist() == [0, 1]
    assert entries["key"][1].tobytes() == agg_keys["masked"][0].tobytes()
    assert entries["flow_count"].tolist() == [1, ncpus]


def test_directives_write_class_levels_once_and_bump_the_generation(setup):
    prog, _, make, _ = setup
    agent = make("adaptive")
    lb = Encoder(9, KEY, 1400)
    directive = np.zeros(2, DIRECTIVE_ENTRY_DTYPE)
    directive["class_key"] = class_keys(2)
    directive["level"] = [2, 0]

    def generation() -> int:
        with prog.open("config") as config:
            return int(config.lookup(np.array(0, U32_DTYPE))["levels_gen"])

    before = generation()
    agent.handle([(p, ("127.0.0.1", 1)) for p in lb.directive(directive, 1)])
    levels_keys, levels = prog.entries("class_levels")
    assert levels_keys.tobytes() == class_keys(1).tobytes() and levels.tolist() == [2]
    assert generation() == before + 1
    agent.handle([(p, ("127.0.0.1", 1)) for p in lb.directive(directive, 2)])  # no change
    assert generation() == before + 1
    forged = Encoder(9, bytes(32), 1400).directive(directive[:1].copy(), 3)
    directive["level"] = [3, 3]
    agent.handle([(p, ("127.0.0.1", 1)) for p in forged])
    assert prog.entries("class_levels")[1].tolist() == [2]
    assert agent.metrics.totals["rejected{reason=bad_tag}"] == 1
    assert agent.metrics.totals["directives{direction=received}"] == 2


def test_resync_request_gets_every_live_flow_at_level0(setup):
    prog, receiver, make, _ = setup
    agent = make("adaptive")
    now = datapath_clock().now_ns()
    keys, values = flow_keys(30), flow_values(30)
    values["last_seen_ns"] = now
    values["level"] = 1  # aggregated, yet a resync names every flow
    with prog.open("flows") as flows:
        flows.update_batch(keys, values)
    request = Encoder(9, KEY, 1400).resync_request(now)
    agent.handle([(request, ("127.0.0.1", receiver.sock.getsockname()[1]))])
    got = received(receiver, 2)
    results = Decoder(KEY, max_lease_ms=300_000).decode_batch([p for p, _ in got])
    entries = accepted_entries(results, PacketType.PUBLISH)
    assert len(entries) == 30 and set(entries["level"].tolist()) == {0}
    assert set(entries["flags"].tolist()) == {FLAG_RESYNC}
    assert agent.metrics.totals["resync_requests{direction=answered}"] == 1


def test_struct_of_aggregates_matches(setup):
    prog, *_ = setup
    with prog.open("aggregates") as aggs:
        assert (aggs.key_dtype, aggs.value_dtype) == (AGG_KEY_DTYPE, AGG_VALUE_DTYPE)


def test_cli_errors_are_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    key_file = tmp_path / "key"
    key_file.write_text(KEY.hex())
    key_file.chmod(0o600)
    good = tmp_path / "good.toml"
    good.write_text(f'[security]\nkey_file = "{key_file}"\n[agent]\nlb_addresses = ["127.0.0.1"]\n')
    no_lbs = tmp_path / "no_lbs.toml"
    no_lbs.write_text(f'[security]\nkey_file = "{key_file}"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text("[publish]\ninterval_s = -1\n")
    cases = [
        (("server", "--config", str(bad), "--iface", "x0"), "interval_s: -1.0 is out of range"),
        (("server", "--config", str(good), "--iface", "nope0"), "nothing attached on root/nope0"),
        (("lb", "--config", str(good), "--iface", "x0", "--netns", "no-such-ns"), "no netns"),
        (("server", "--config", str(no_lbs), "--iface", "x0"), "lb_addresses is empty"),
    ]
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-m", "connpub.cli", "agent", *args],
                              capture_output=True, text=True, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (args, lines)


def test_bench_control_runs_small():
    from connpub.bench.control import bench_control

    result = bench_control(flows=20_000)
    assert result["codec"]["entries"] == 20_000 and result["codec"]["packets"] == 1112
    assert (result["lb_apply"]["created"], result["lb_apply"]["extended"]) == (20_000, 20_000)
    cycle = result["server_cycle"]
    assert (cycle["flows"], cycle["entries"], cycle["packets"]) == (20_000, 20_000, 1112)
    assert cycle["cycle_s"] > cycle["read_s"] > 0
