"""The C load generator (native/loadgen.c) and echo server (native/echod.c): the schedule it
follows, the plan and result files, every outcome against local servers, and a lab run of
thousands of concurrent connections with exact echoes."""

from __future__ import annotations

import errno
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
from connpub.config import Config, parse_config
from connpub.datapath.masks import is_v4_mapped
from connpub.errors import ConnpubError
from connpub.lab import run as labrun
from connpub.lab import topology as lab_mod
from connpub.lab.measure import peak_concurrent
from connpub.traffic import driver, native, workload


def _plan(n: int, **columns) -> np.ndarray:
    plan = np.zeros(n, driver.PLAN_DTYPE)
    plan["flow_id"] = np.arange(n)
    plan["vip"] = plan["source"] = "127.0.0.1"
    plan["proto"], plan["port"], plan["chunk_bytes"], plan["gap_s"] = 6, 80, 100, 0.2
    for name, value in columns.items():
        plan[name] = value
    return plan


# ---------------------------------------------------------------------------------------------
# schedule, plan and result files (no network)


def test_schedule_every_gap_until_the_end_or_exact_replay_exchanges(tmp_path):
    plan = _plan(4, start_s=[0.0, 0.1, 1.0, 2.0], duration_s=[0.5, 0.0, 1.0, 3.0])
    plan["chunks"][2:] = [3, 4]  # replayed flows: exact exchanges, head gaps, then even
    plan["head_n"][2:] = [2, 1]
    plan["head_gaps_s"][2, :2] = [0.0, 0.1]
    plan["linger_s"][2:] = [0.0, 1.5]
    got = {flow_id: (times, close) for flow_id, times, close in driver.schedule(plan, tmp_path)}
    # chunks 0: at once, then every 0.2 s; the last one at the flow's end
    assert got[0][0] == pytest.approx([0.0, 0.2, 0.4, 0.5]) and got[0][1] == pytest.approx(0.5)
    assert got[1][0] == pytest.approx([0.1]) and got[1][1] == pytest.approx(0.1)
    # head gaps 0 and 0.1 s, the third spread evenly over the remaining 0.9 s -> at the end
    assert got[2][0] == pytest.approx([1.0, 1.1, 2.0]) and got[2][1] == pytest.approx(2.0)
    # one head exchange, three spread over 3 s (1 s each), then 1.5 s of silence
    assert got[3][0] == pytest.approx([2.0, 3.0, 4.0, 5.0]) and got[3][1] == pytest.approx(6.5)


def test_native_plan_packs_addresses_and_refuses_bad_ones():
    plan = _plan(2, vip=["10.200.0.1", "fd00:200::1"], source=["10.100.1.10", "fd00:100:1::a"],
                 proto=[6, 17], port=[80, 53])
    rows = driver.native_plan(plan)
    assert rows.dtype.itemsize == 152  # struct plan_rec in native/loadgen.c
    assert list(rows["family"]) == [4, 6]
    assert bytes(rows["dst"][0]) == b"\0" * 10 + b"\xff\xff" + bytes([10, 200, 0, 1])
    assert bytes(rows["src"][1]) == socket.inet_pton(socket.AF_INET6, "fd00:100:1::a")
    assert list(rows["proto"]) == [6, 17] and list(rows["port"]) == [80, 53]
    with pytest.raises(ConnpubError, match="different families"):
        driver.native_plan(_plan(1, vip="fd00:200::1"))
    with pytest.raises(ConnpubError, match="not an IP address"):
        driver.native_plan(_plan(1, vip="nowhere"))
    with pytest.raises(ConnpubError, match="proto must be"):
        driver.native_plan(_plan(1, proto=1))


def _results_file(path, records: np.ndarray, magic=driver.RESULT_MAGIC):
    header = np.array([(magic, driver.RESULT_DTYPE.itemsize, records.size)], driver.HEADER_DTYPE)
    path.write_bytes(header.tobytes() + records.tobytes())


def test_results_parse_into_flows_with_error_classes(tmp_path):
    plan = _plan(4, proto=[6, 6, 17, 6])
    records = np.zeros(4, driver.RESULT_DTYPE)
    records["flow_id"] = plan["flow_id"]
    records["ok"] = [1, 0, 0, 0]
    records["err"] = [0, errno.ECONNRESET, errno.ETIMEDOUT, -2]
    records["stage"] = [0, 3, 3, 3]
    records["server"] = [b"srv2", b"srv1", b"", b"srv3"]
    records["bytes_echoed"], records["chunks"], records["local_port"] = [300, 0, 0, 0], 3, 4242
    records["resent"][2] = 4
    _results_file(tmp_path / "r.bin", records)
    flows = driver.flows(driver.read_results(tmp_path / "r.bin"), plan)
    assert [f["error"] for f in flows] == [
        None, "ConnectionResetError: exchange: ECONNRESET", "TimeoutError: exchange: ETIMEDOUT",
        "EchoMismatch: exchange: an echoed byte differs from the one sent"]
    assert flows[0] | {"started_s": 0} == {
        "flow_id": 0, "proto": 6, "ok": True, "server": "srv2", "started_s": 0,
        "ended_s": 0.0, "chunks": 3, "bytes_echoed": 300, "local_port": 4242, "error": None,
        "open_s": 0.0, "rtt_max_s": 0.0, "resent": 0}
    assert flows[2]["server"] is None and flows[2]["proto"] == 17 and flows[2]["resent"] == 4
    with pytest.raises(ConnpubError, match="do not match"):
        driver.flows(driver.read_results(tmp_path / "r.bin"), plan[:3])
    _results_file(tmp_path / "bad.bin", records, magic=b"XXXXXXXX")
    with pytest.raises(ConnpubError, match="not a load generator result"):
        driver.read_results(tmp_path / "bad.bin")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "r.bin").read_bytes()[:-5])
    with pytest.raises(ConnpubError, match="not a load generator result"):
        driver.read_results(tmp_path / "cut.bin")


def _client(address: str) -> np.ndarray:
    import ipaddress

    ip = ipaddress.ip_address(address)
    mapped = ip.packed if ip.version == 6 else bytes(10) + b"\xff\xff" + ip.packed
    return np.frombuffer(mapped, np.uint8)


def test_lab_sources_keep_the_traces_client_subnets_and_hosts():
    """A trace's clients reach the lab with their subnets and hosts: one /24 (/56) of the
    trace is one subnet of its namespace's block, a host keeps its last byte (IPv6: interface
    id), so the /25 halves and client addresses the aggregates are made of stay the trace's."""
    trace = ["198.18.7.10", "198.18.7.200", "198.18.9.10", "203.0.113.0", "198.18.7.10",
             "2001:db8:0:500::1:2", "2001:db8:0:5ff::9", "2001:db8:0:600::1:2", "198.18.7.10"]
    owner = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1])
    got = labrun.lab_sources(np.stack([_client(a) for a in trace]), owner).tolist()
    assert got == ["100.65.0.10", "100.65.0.200", "100.65.1.10", "100.65.2.1", "100.65.0.10",
                   "fd00:300:1::1:2", "fd00:300:1::9", "fd00:300:1:100::1:2",
                   "100.66.0.10"]
    assert labrun.lab_sources(np.zeros((0, 16), np.uint8), np.zeros(0, np.int64)).size == 0


def test_workload_vips_become_lab_vips_one_each_per_family():
    """The mixed workload's 4 VIPs per family reach a 4-VIP lab as 4 lab VIPs of the same
    family, one each (the simulator's VIPs, so its classes and backends per VIP): a flow's
    plan VIP follows its workload VIP, and the busiest workload VIP gets the family's first."""
    table = workload.generate("mixed", 2000, seed=7)
    lab = lab_mod.plan("cptest", clients=2, lbs=1, servers=3, vips=4)
    plans = labrun.build_plans(table, lab, labrun.RunSpec(duration_s=1e6))
    plan = np.concatenate(list(plans.values()))
    order = np.argsort(table["flow_id"])
    rows = order[np.searchsorted(table["flow_id"], plan["flow_id"], sorter=order)]
    workload_vip = [bytes(v) for v in table["vip_addr"][rows]]
    pairs = set(zip(workload_vip, plan["vip"].tolist(), strict=True))
    assert len(pairs) == 8 and len({lab_vip for _, lab_vip in pairs}) == 8
    assert {lab_vip for _, lab_vip in pairs} == set(lab.vips4 + lab.vips6)
    for lab_vip in lab.vips4:  # IPv4 workload VIPs onto IPv4 lab VIPs only
        assert all(is_v4_mapped(np.frombuffer(w, np.uint8))[0] for w, v in pairs if v == lab_vip)
    busiest4 = max((w for w, _ in pairs if is_v4_mapped(np.frombuffer(w, np.uint8))[0]),
                   key=workload_vip.count)
    assert dict(pairs)[busiest4] == lab.vips4[0]


def test_lab_profile_divides_flow_time_by_the_time_scale_and_overrides_win():
    """At 10x time a UDP flow idle for 3 wall seconds is idle for the default 30 workload
    seconds, and the duration thresholds are the defaults / 10; run-length settings do not
    scale; a RunSpec override wins over the profile."""
    defaults = Config()
    for scale in (1.0, 3.0, 10.0):
        sections = labrun.config_sections(labrun.RunSpec(time_scale=scale))
        cfg = parse_config(sections, problems := [])
        assert problems == []
        assert cfg.liveness.udp_idle_s == defaults.liveness.udp_idle_s / scale
        assert cfg.liveness.udp_stream_idle_s == defaults.liveness.udp_stream_idle_s / scale
        assert cfg.granularity.duration_long_s == defaults.granularity.duration_long_s / scale
        assert (cfg.granularity.duration_extreme_long_s
                == defaults.granularity.duration_extreme_long_s / scale)
        assert cfg.lease.idle_timeout_s == 3.0 and cfg.granularity.evaluation_interval_s == 1.0
    spec = labrun.RunSpec(time_scale=10.0, config_overrides={"liveness": {"udp_idle_s": 7.0}})
    assert labrun.config_sections(spec)["liveness"] == {"udp_idle_s": 7.0,
                                                         "udp_stream_idle_s": 12.0}


# ---------------------------------------------------------------------------------------------
# every outcome against local servers (loopback, no root needed)


def _free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _misbehaving_server(reply) -> tuple[int, socket.socket]:
    """A TCP server that sends the banner, then answers the first chunk with reply(chunk)
    (None: close)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"connpub-echo bad\n")
            data = conn.recv(65536)
            answer = reply(data)
            if answer is not None:
                conn.sendall(answer)
                conn.recv(65536)  # until the client closes

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], listener


@pytest.fixture
def echod():
    tcp, udp = _free_port(), _free_port(socket.SOCK_DGRAM)
    proc = subprocess.Popen([str(native.binary("echod")), "--name", "local", "--tcp-port",
                             str(tcp), "--udp-port", str(udp), "--udp-bind", "127.0.0.1"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", tcp), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, "echod did not start"
            time.sleep(0.05)
    try:
        yield tcp, udp
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        assert "stopped" in proc.stderr.read()


def test_every_outcome_is_told_apart(echod, tmp_path):
    tcp, udp = echod
    short_port, short = _misbehaving_server(lambda data: None)
    wrong_port, wrong = _misbehaving_server(lambda data: b"x" * len(data))
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # UDP that never answers
    silent.bind(("127.0.0.1", 0))
    refused = _free_port()
    ports = [tcp, tcp, udp, short_port, wrong_port, silent.getsockname()[1], refused]
    plan = _plan(7, port=ports, proto=[6, 6, 17, 6, 6, 17, 6], duration_s=0.5,
                 chunk_bytes=[70000, 100, 1200, 100, 100, 100, 100])
    plan["chunks"][1], plan["head_n"][1] = 3, 3  # exactly 3 exchanges, back to back
    try:
        flows = driver.run(plan, tmp_path, timeout_s=2.5, wait_s=30)
    finally:
        for sock in (short, wrong, silent):
            sock.close()
    by_id = {f["flow_id"]: f for f in flows}
    # 70 kB chunks (more than one send), one at once then every 0.2 s: 4 exchanges
    assert (by_id[0]["ok"], by_id[0]["chunks"], by_id[0]["bytes_echoed"]) == (True, 4, 280000)
    assert (by_id[1]["ok"], by_id[1]["chunks"], by_id[1]["bytes_echoed"]) == (True, 3, 300)
    assert (by_id[2]["ok"], by_id[2]["chunks"], by_id[2]["bytes_echoed"]) == (True, 4, 4800)
    assert {by_id[i]["server"] for i in range(3)} == {"local"}
    assert by_id[3]["error"].startswith("IncompleteReadError: exchange")
    assert by_id[4]["error"].startswith("EchoMismatch: exchange")
    # resent after 1 s and 2 s, then the 2.5 s timeout
    assert by_id[5]["error"] == "TimeoutError: exchange: ETIMEDOUT" and by_id[5]["resent"] == 2
    assert by_id[6]["error"] == "ConnectionRefusedError: connect: ECONNREFUSED"
    assert [f["ok"] for f in flows] == [True, True, True, False, False, False, False]
    assert all(f["local_port"] > 0 for f in flows[:6])


# ---------------------------------------------------------------------------------------------
# the lab: thousands of concurrent connections, every byte echoed


@pytest.fixture
def scale_lab(unique_prefix):
    try:
        lab = lab_mod.up(unique_prefix, clients=1, lbs=1, servers=1)
        yield lab
    finally:
        lab_mod.down(unique_prefix)


@pytest.mark.root
def test_lab_holds_thousands_of_connections_with_exact_echoes(scale_lab, tmp_path):
    """6000 TCP connections and 2000 UDP sockets open at once (starts spread over 1 s, each
    lasting 3 s), 4 exchanges each: every flow ok, every byte echoed, all open together."""
    lab = scale_lab
    tcp, udp = 6000, 2000
    n = tcp + udp
    rng = np.random.default_rng(5)
    ipv6 = np.arange(n) % 4 == 3
    plan = _plan(n, start_s=np.sort(rng.uniform(0, 1.0, n)), duration_s=3.0,
                 proto=np.where(np.arange(n) < tcp, 6, 17), chunks=4, head_n=1,
                 chunk_bytes=rng.integers(16, 1200, n))
    plan["port"] = np.where(plan["proto"] == 6, lab.tcp_port, lab.udp_port)
    plan["vip"] = np.where(ipv6, lab.vip6, lab.vip4)
    # 24 client hosts of one /24 and 24 of one /56, as a trace's clients reach the lab
    clients = np.zeros((n, 16), np.uint8)
    clients[:, 10:12] = 0xFF
    clients[:, 12:15] = (198, 18, 7)
    clients[~ipv6, 15] = 10 + np.arange(int((~ipv6).sum())) % 24
    clients[ipv6] = 0
    clients[ipv6, :2] = (0x20, 0x01)
    clients[ipv6, 15] = 10 + np.arange(int(ipv6.sum())) % 24
    plan["source"] = labrun.lab_sources(clients, np.zeros(n, np.int64))
    assert len(np.unique(plan["source"])) == 48
    labrun.add_sources(lab, {lab.clients[0].name: plan})
    flows = driver.run(plan, tmp_path, lab_mod._enter_in_child(lab.clients[0].netns),
                       wait_s=120)
    broken = [f["error"] for f in flows if not f["ok"]]
    assert broken == []
    assert [f["chunks"] for f in flows] == [4] * n
    assert [f["bytes_echoed"] for f in flows] == list(4 * plan["chunk_bytes"].astype(int))
    assert {f["server"] for f in flows} == {lab.servers[0].name}
    assert peak_concurrent(flows) == n
