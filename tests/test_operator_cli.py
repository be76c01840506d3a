"""What an operator meets first (issue 15), on a real LB attachment in a namespace, through the
real CLI process: `maps dump` columns, filters and plain lines; `detach` refusing someone
else's program, nothing attached, or an attachment an agent uses, and restoring the LB
configuration on re-attach; `status` as non-root; agent status files; one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from connpub import paths
from connpub.agents.common import status_path
from connpub.datapath import lbctl, loader, netlink
from connpub.datapath.abi import FLOW_KEY_DTYPE, LB_CONN_DTYPE, STAT_NAMES
from connpub.datapath.clock import datapath_clock
from connpub.datapath.maps import PinnedMap
from connpub.lab.run import toml_text

pytestmark = pytest.mark.root

DEFINES = ("MAGLEV_SIZE=251", "MAX_SERVICES=4", "MAX_BACKENDS=16", "MAX_CONNS=4096")
LB_ADDR, PEER_ADDR = "10.91.0.1", "10.91.0.2"
VIP = "10.200.0.1"
BACKENDS = {1: ("10.103.0.101", "02:00:00:00:01:01"), 2: ("10.103.0.102", None)}


def connpub(*args: str, check: bool = True, user: str | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "connpub.cli", *args]
    if user:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, (args, proc.stderr)
    return proc


def one_error_line(proc: subprocess.CompletedProcess, needle: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def veth(unique_prefix):
    netns, iface, peer = f"{unique_prefix}n", f"{unique_prefix}a", f"{unique_prefix}b"
    try:
        netlink.create_netns(netns)
        netlink.create_veth(iface, netns, peer, netns)
        netlink.add_address(iface, netns, f"{LB_ADDR}/24")
        netlink.add_address(peer, netns, f"{PEER_ADDR}/24")
        yield {"netns": netns, "iface": iface, "peer": peer,
               "where": ("--iface", iface, "--netns", netns)}
    finally:
        if netlink.netns_exists(netns):
            connpub("detach", "--iface", iface, "--netns", netns, "--force", "--stop-agent",
                    check=False)
        netlink.delete_netns(netns)
        loader.remove_pins(paths.pin_dir(iface, netns))
        from connpub.datapath.lbsaved import forget_netns  # noqa: PLC0415

        forget_netns([netns])


def attach_lb(veth) -> None:
    defines = [arg for d in DEFINES for arg in ("--define", d)]
    connpub("attach", "--role", "lb", *veth["where"], *defines)


def configure(veth) -> None:
    where = veth["where"]
    for backend_id, (address, mac) in BACKENDS.items():
        connpub("lb", "backend", "add", str(backend_id), address, *(["--mac", mac] if mac else []),
                *where)
    connpub("lb", "vip", "add", VIP, "80", "tcp", *where)
    connpub("lb", "vip", "add", "fd00:200::1", "8443", "tcp", "--client-affinity", *where)
    connpub("lb", "backend", "drain", "2", *where)
    connpub("lb", "config", "set", "--gateway-mac", "02:00:00:00:00:fe", "--mtu", "1400",
            "--initial-lease-s", "7", *where)


def lines_of(proc: subprocess.CompletedProcess) -> tuple[list[str], list[list[str]]]:
    """(header, cells per line) of `--output lines`: cells are separated by 2+ spaces."""
    import re  # noqa: PLC0415

    rows = [re.split(r"\s{2,}", line.strip()) for line in proc.stdout.strip().splitlines()]
    return rows[0], rows[1:]


def write_conns(veth, now_ns: int) -> None:
    """Three connections: lease ahead, lease past, no lease yet."""
    keys = np.zeros(3, FLOW_KEY_DTYPE)
    keys["client_addr"] = lbctl.address_bytes("10.100.1.2")[0]
    keys["client_addr"][2] = lbctl.address_bytes("10.100.1.3")[0]
    keys["vip_addr"] = lbctl.address_bytes(VIP)[0]
    keys["client_port"] = [40001, 40002, 40003]
    keys["vip_port"] = 80
    keys["proto"] = 6
    values = np.zeros(3, LB_CONN_DTYPE)
    values["lease_expiry_ns"] = [now_ns + 50 * 10**9, now_ns - 50 * 10**9, 0]
    values["created_ns"] = now_ns - 10**9
    values["backend_id"] = [1, 1, 2]
    with PinnedMap(paths.pin_dir(veth["iface"], veth["netns"]) / "conns", FLOW_KEY_DTYPE,
                   LB_CONN_DTYPE) as conns:
        conns.update_batch(keys, values)


def test_maps_dump_columns_filters_and_lines(veth):
    attach_lb(veth)
    configure(veth)
    where = veth["where"]
    write_conns(veth, datapath_clock().now_ns())
    header, rows = lines_of(connpub("maps", "dump", "conns", *where, "--output", "lines"))
    assert header == ["proto", "client", "vip", "lease_expiry_in_s", "created_ago_s",
                      "backend_id", "level", "flags", "vip_index"]
    assert len(rows) == 3 and all(len(row) == len(header) for row in rows), rows
    lease = {row[1]: row[3] for row in rows}
    assert 45 < float(lease["10.100.1.2:40001"]) <= 50
    assert -55 < float(lease["10.100.1.2:40002"]) <= -50
    assert lease["10.100.1.3:40003"] == "-"  # no lease: a filled cell, not an empty one
    # the table has the same columns and every cell filled
    table = connpub("maps", "dump", "conns", *where, "--output", "table").stdout
    assert "lease_expiry_in_s" in table and " ago" not in table and " in " not in table
    # filters
    _, rows = lines_of(connpub("maps", "dump", "conns", *where, "--client", "10.100.1.3",
                               "--output", "lines"))
    assert [row[1] for row in rows] == ["10.100.1.3:40003"]
    _, rows = lines_of(connpub("maps", "dump", "conns", *where, "--backend", "1",
                               "--output", "lines"))
    assert sorted(row[1] for row in rows) == ["10.100.1.2:40001", "10.100.1.2:40002"]
    _, rows = lines_of(connpub("maps", "dump", "conns", *where, "--vip", f"{VIP}:81",
                               "--output", "lines"))
    assert rows == [["(empty)"]]
    # config: addresses, MACs, durations
    dumped = json.loads(connpub("maps", "dump", "config", *where, "--json").stdout)["rows"][0]
    assert dumped["lb_addr4"] == LB_ADDR and dumped["gateway_mac"] == "02:00:00:00:00:fe"
    header, rows = lines_of(connpub("maps", "dump", "config", *where, "--output", "lines"))
    config = dict(zip(header, rows[0], strict=True))
    assert config["lb_addr4"] == LB_ADDR
    assert config["gateway_mac"] == "02:00:00:00:00:fe"
    assert config["initial_lease_s"] == "7.000" and config["mtu"] == "1400"
    # stats by counter name
    header, rows = lines_of(connpub("maps", "dump", "stats", *where, "--output", "lines"))
    assert header == ["counter", "value"]
    assert [row[0] for row in rows] == list(STAT_NAMES["lb"])
    # an empty map: the header and "(empty)", no blank lines
    empty = connpub("maps", "dump", "agg_leases", *where).stdout
    assert empty.strip().splitlines()[-1] == "(empty)" and "\n\n" not in empty
    # Maglev: every slot of backend 1, one line each, decoded into service/bank/slot
    pin_dir = paths.pin_dir(veth["iface"], veth["netns"])
    with lbctl.open_map(pin_dir, "maglev") as table_map:
        expected = int((table_map.items()[1] == 1).sum())
    header, rows = lines_of(connpub("maps", "dump", "maglev", *where, "--limit", "0",
                                    "--backend", "1", "--output", "lines"))
    assert header == ["service", "bank", "slot", "backend_id"]
    assert len(rows) == expected > 0 and {row[3] for row in rows} == {"1"}
    # compact per-service views
    services = json.loads(connpub("lb", "list", *where, "--json").stdout)
    assert [s["service"] for s in services] == [0]
    assert services[0]["vips"] == [f"{VIP}:80/tcp", "[fd00:200::1]:8443/tcp"]
    assert services[0]["backends"] == [1]  # 2 drains: out of the table
    maglev = json.loads(connpub("lb", "maglev", "list", *where, "--json").stdout)
    assert maglev == [{"service": 0, "size": 251, "active_bank": maglev[0]["active_bank"],
                       "slots": {"1": 251}}]


def test_detach_refuses_what_connpub_did_not_attach(veth):
    where = veth["where"]
    one_error_line(connpub("detach", *where, check=False), "nothing attached")
    scratch = loader.scratch_pin_dir("foreign")
    program = loader.compile_program("empty", scratch)
    try:
        netlink.attach_xdp(veth["iface"], veth["netns"], program.prog_fd, "generic")
        foreign_id = netlink.xdp_prog_id(veth["iface"], veth["netns"])
        one_error_line(connpub("detach", *where, check=False), "not connpub's")
        assert netlink.xdp_prog_id(veth["iface"], veth["netns"]) == foreign_id
        connpub("detach", *where, "--force")
        assert netlink.xdp_prog_id(veth["iface"], veth["netns"]) is None
    finally:
        program.close()
        loader.remove_pins(scratch)


def agent_config(tmp_path, port: int) -> str:
    key_file = tmp_path / "key"
    key_file.write_text(os.urandom(32).hex())
    key_file.chmod(0o600)
    config = tmp_path / "lb.toml"
    config.write_text(toml_text({
        "security": {"key_file": str(key_file)},
        "agent": {"server_id": 1, "listen_address": LB_ADDR, "listen_port": port,
                  "metrics_port": 0},
    }))
    return str(config)


def start_agent(config: str, veth) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "connpub.cli", "agent", "lb", "--config",
                             config, *veth["where"]], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_status(path, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            time.sleep(0.05)
    raise AssertionError(f"no status file {path} after {timeout_s}s")


def test_detach_under_agent_refuses_then_stops_it_and_reattach_restores(veth, tmp_path):
    attach_lb(veth)
    configure(veth)
    where = veth["where"]
    before = {what: json.loads(connpub("lb", *what, *where, "--json").stdout)
              for what in (("vip", "list"), ("backend", "list"), ("config", "show"))}
    config = agent_config(tmp_path, 7391)
    agent = start_agent(config, veth)
    status_file = status_path("lb", veth["iface"], veth["netns"])
    try:
        status = wait_status(status_file)
        assert status["pid"] == agent.pid
        # a second agent on the same attachment: one line, before any "listening"
        second = connpub("agent", "lb", "--config", config, *where, check=False)
        one_error_line(second, f"already runs on {veth['netns']}/{veth['iface']}")
        one_error_line(connpub("detach", *where, check=False), f"lb agent pid {agent.pid}")
        assert netlink.xdp_prog_id(veth["iface"], veth["netns"]) is not None
        after_settings = json.loads(connpub("lb", "config", "show", *where, "--json").stdout)
        connpub("detach", *where, "--stop-agent")
        assert agent.wait(timeout=20) == 0
        assert "Traceback" not in agent.stderr.read()
        assert not status_file.exists()  # removed on SIGTERM
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert netlink.xdp_prog_id(veth["iface"], veth["netns"]) is None
    attach_lb(veth)
    after = {what: json.loads(connpub("lb", *what, *where, "--json").stdout)
             for what in (("vip", "list"), ("backend", "list"), ("config", "show"))}

    def config_of(rows):
        return [{k: v for k, v in row.items() if k in ("vip", "port", "proto", "service", "flags",
                                                       "level", "id", "address", "mac",
                                                       "draining", "services")} for row in rows]

    assert config_of(after[("vip", "list")]) == config_of(before[("vip", "list")])
    assert config_of(after[("backend", "list")]) == config_of(before[("backend", "list")])
    # the agent's own settings (initial lease, close linger) are the last ones, kept as well
    assert after[("config", "show")] == after_settings
    assert after_settings["gateway_mac"] == "02:00:00:00:00:fe" and after_settings["mtu"] == 1400


def test_status_as_non_root_is_one_line(veth):
    proc = connpub("status", check=False, user="nobody")
    one_error_line(proc, "needs root")


def test_status_files_dead_or_reused_pid_not_alive_and_lab_down_removes_them(unique_prefix):
    from connpub.lab import topology as labmod  # noqa: PLC0415

    netns = f"{unique_prefix}-lb1"
    reused = status_path("lb", "eth0", netns)
    reused.parent.mkdir(parents=True, exist_ok=True)
    # a pid that runs, but is no agent (pytest itself): not alive
    reused.write_text(json.dumps({"role": "lb", "pid": os.getpid(), "iface": "eth0",
                                  "netns": netns}))
    try:
        statuses = json.loads(connpub("status", "--json").stdout)["agents"]
        mine = [row for row in statuses if row["agent"] == f"lb {netns}/eth0"]
        assert [row["alive"] for row in mine] == [False]
        labmod.down(unique_prefix)
        assert not reused.exists()
    finally:
        reused.unlink(missing_ok=True)


def test_one_line_errors_exit_2(veth, tmp_path):
    where = veth["where"]
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[publish]\ninterval = 1\n")
    cases = [
        (("attach",), "Missing option '--role'"),
        (("attach", "--role", "nope", *where), "'nope' is not one of"),
        (("lab", "load", "--connections", "-3"), "-3 is not in the range"),
        (("config", "check", str(bad_config), "--no-key-check"), "did you mean 'interval_s'"),
        (("attach", "--role", "server", *where, "--define", "MAX_FLOWS=abc"),
         "bad define MAX_FLOWS='abc'"),
        (("lab", "run", "--workload", "nosuch"), "'nosuch' is not one of"),
        (("nosuchcommand",), "No such command"),
    ]
    for args, needle in cases:
        proc = connpub(*args, check=False)
        one_error_line(proc, needle)
        if args[0] == "config":
            assert proc.stdout == ""
    # nothing half-applied: the bad define compiled nothing, attached nothing
    assert netlink.xdp_prog_id(veth["iface"], veth["netns"]) is None
    assert not paths.pin_dir(veth["iface"], veth["netns"]).exists()
