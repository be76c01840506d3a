"""A namespace lab with the XDP programs attached and both agents run as real processes: what
tests/test_agent_lab.py and tests/test_faults_*.py share.

`agent_lab(prefix, folder, ...)` builds the lab (clients -> router -> LB node(s) with the LB
program -> servers with the server program), writes a key file and yields an `AgentLab`, whose
`start(...)` runs `connpub agent lb|server` in a node's namespace with a generated config.
Everything (agents, programs, namespaces) is removed on exit, also when the test fails."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from connpub import paths
from connpub.agents import lb as lbagent
from connpub.agents.common import status_path
from connpub.datapath import lbctl, loader
from connpub.datapath.clock import datapath_clock
from connpub.lab import topology as labmod
from connpub.lab.run import toml_text

CLIENT_IP = "10.100.1.2"


def wait_for(predicate, what: str, timeout_s: float = 10.0, step_s: float = 0.05):
    """Poll predicate until it returns something truthy (returned) or fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}: last {value!r}")


@dataclass
class AgentProc:
    role: str
    node: str
    netns: str
    iface: str
    proc: subprocess.Popen

    @property
    def status_file(self) -> Path:
        return status_path(self.role, self.iface, self.netns)

    def status(self) -> dict:
        try:
            return json.loads(self.status_file.read_text())
        except (OSError, json.JSONDecodeError):
            return {}


@dataclass
class AgentLab:
    """The lab plus the agents started in it. Config: `interval_s`, `k`, `overrides`
    ({section: {key: value}} on top of the defaults below), `lb_addresses` (where servers
    publish; default: every LB node's fabric address)."""

    prefix: str
    lab: labmod.Lab
    lb_pin: Path  # lb1's pin folder
    folder: Path
    key_file: Path
    interval_s: float = 0.2
    k: float = 3.0
    connections: int = 20
    overrides: dict = field(default_factory=dict)
    role_overrides: dict = field(default_factory=dict)  # {"lb"|"server": {section: {...}}}
    lb_addresses: list[str] | None = None
    agents: list[AgentProc] = field(default_factory=list)

    @property
    def lb_netns(self) -> str:
        return self.lab.nodes["lb1"].netns

    @property
    def procs(self) -> list[subprocess.Popen]:
        return [agent.proc for agent in self.agents]

    def lb_pin_of(self, node: str) -> Path:
        return paths.pin_dir("eth0", self.lab.nodes[node].netns)

    def sections(self, mode: str, node_id: int, metrics_port: int = 0,
                 role: str = "") -> dict[str, dict]:
        addresses = self.lb_addresses or [lb.ifaces["fab"].ip4 for lb in self.lab.lbs]
        sections: dict[str, dict] = {
            "publish": {"interval_s": self.interval_s, "mode": mode},
            "lease": {"k": self.k, "min_s": 0.1, "initial_s": 1.0, "idle_timeout_s": 10.0},
            "granularity": {"evaluation_interval_s": 0.5, "duration_long_s": 1.0,
                            "duration_very_long_s": 100.0, "duration_extreme_long_s": 200.0,
                            "history_half_life_s": 0.5, "hysteresis_evaluations": 2,
                            # these tests follow connections from their level-0 entries
                            # (a class coarsening from 0; the default starts new classes at
                            # 3), all from one client: no spread bound (docs/policy.md)
                            "initial_level": 0, "max_spread": 1000.0},
            "rollout": {"fraction": 1.0},
            "security": {"key_file": str(self.key_file)},
            "agent": {"server_id": node_id, "lb_addresses": addresses,
                      "metrics_port": metrics_port,
                      "history_path": str(self.folder / f"history-{node_id}")},
        }
        for overrides in (self.overrides, self.role_overrides.get(role, {})):
            for section, values in overrides.items():
                sections.setdefault(section, {}).update(values)
        return sections

    def config(self, mode: str, node_id: int, metrics_port: int = 0, role: str = "") -> Path:
        path = self.folder / f"{role}{mode}-{node_id}.toml"
        path.write_text(toml_text(self.sections(mode, node_id, metrics_port, role)))
        return path

    def start(self, role: str, mode: str, node_id: int, netns: str, iface: str,
              metrics_port: int = 0, node: str = "") -> subprocess.Popen:
        config = self.config(mode, node_id, metrics_port, role)
        with open(self.folder / f"{role}-{node_id}-{mode}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "connpub.cli", "agent", role, "--config", str(config),
                 "--iface", iface, "--netns", netns],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.agents.append(AgentProc(role, node, netns, iface, proc))
        return proc

    def start_lb(self, mode: str, node: str = "lb1", metrics_port: int = 0) -> AgentProc:
        node_id = int(node.removeprefix("lb"))
        self.start("lb", mode, node_id, self.lab.nodes[node].netns, "eth0", metrics_port, node)
        return self.agents[-1]

    def start_server(self, mode: str, k: int) -> AgentProc:
        server = self.lab.nodes[f"srv{k}"]
        self.start("server", mode, k, server.netns, "fab", node=server.name)
        return self.agents[-1]

    def start_all(self, mode: str, servers: bool = True, metrics_port: int = 0) -> None:
        self.start_lb(mode, "lb1", metrics_port)
        if servers:
            for k in range(1, len(self.lab.servers) + 1):
                self.start_server(mode, k)
        wait_for(lambda: all(s.get("updated_unix", 0) > 0 for s in self.statuses(servers)),
                 "agent status files", 30)

    def kill9(self, agent: AgentProc) -> None:
        """SIGKILL, as a crash: no cleanup code of the agent runs."""
        os.kill(agent.proc.pid, signal.SIGKILL)
        agent.proc.wait(timeout=10)
        self.agents.remove(agent)

    def stop_all(self) -> None:
        for agent in self.agents:
            if agent.proc.poll() is None:
                agent.proc.terminate()
        for agent in self.agents:
            try:
                agent.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                agent.proc.kill()
                agent.proc.wait(timeout=5)
        self.agents.clear()
        for node in self.lab.lbs:
            status_path("lb", "eth0", node.netns).unlink(missing_ok=True)
        for node in self.lab.servers:
            status_path("server", "fab", node.netns).unlink(missing_ok=True)

    def status_files(self, servers: bool) -> list[Path]:
        files = [status_path("lb", "eth0", self.lb_netns)]
        if servers:
            files += [status_path("server", "fab", s.netns) for s in self.lab.servers]
        return files

    def statuses(self, servers: bool = True) -> list[dict]:
        """[lb1's status, srv1's, srv2's, ...] (empty dicts for missing files); fails when an
        agent process died."""
        found = []
        for path in self.status_files(servers):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                found.append({})
        for proc in self.procs:
            assert proc.poll() is None, f"an agent exited with {proc.returncode}: " \
                f"see {self.folder}"
        return found

    def load(self, hold_s: float, keepalive_s: float = 0.1, connections: int | None = None,
             client: str = "client1", timeout_s: float = 5.0) -> subprocess.Popen:
        """TCP echo load from a client namespace (`connpub.traffic.services load --json`): each
        connection sends 100 bytes, then a byte every keepalive_s while held."""
        return subprocess.Popen(
            [sys.executable, "-m", "connpub.traffic.services", "load", "--vip", self.lab.vip4,
             "--port", str(self.lab.tcp_port), "--connections",
             str(connections or self.connections), "--bytes", "100", "--hold", str(hold_s),
             "--keepalive", str(keepalive_s), "--timeout", str(timeout_s), "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=labmod._child_env(), preexec_fn=labmod._enter_in_child(
                self.lab.nodes[client].netns))

    def client_leases(self, since_ns: int, node: str = "lb1") -> tuple[int, int]:
        """(connections of the client created since since_ns at LB `node`, how many hold a
        valid lease there)."""
        pin = self.lb_pin_of(node)
        keys, conns = lbctl.read_conns(pin)
        agg_keys, agg_expiry = lbctl.read_agg_leases(pin)
        client = lbctl.address_bytes(CLIENT_IP)[0]
        mine = (keys["client_addr"] == client).all(axis=1) & (conns["created_ns"] >= since_ns)
        valid = lbagent.valid_leases(keys[mine], conns[mine], agg_keys, agg_expiry,
                                     datapath_clock().now_ns())
        return int(mine.sum()), int(valid.sum())

    def client_published(self, since_ns: int, node: str = "lb1") -> int:
        """How many of the client's connections created since since_ns hold a lease a publish
        set (expiry past creation + `[lease] initial_s`), not only the LB's initial lease of a
        new flow: a crash before a flow's first publish leaves it the initial lease alone."""
        keys, conns = lbctl.read_conns(self.lb_pin_of(node))
        client = lbctl.address_bytes(CLIENT_IP)[0]
        mine = (keys["client_addr"] == client).all(axis=1) & (conns["created_ns"] >= since_ns)
        initial_ns = round(self.sections("baseline", 0)["lease"]["initial_s"] * 1e9)
        published = conns["lease_expiry_ns"][mine].astype(np.int64) > (
            conns["created_ns"][mine].astype(np.int64) + initial_ns)
        return int(published.sum())


def finish_load(proc: subprocess.Popen, timeout_s: float) -> dict:
    """The load tool's JSON report (kills it on timeout)."""
    try:
        output, errors = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    if not output:
        raise AssertionError(f"the load tool printed nothing: {errors[-2000:]}")
    return json.loads(output)


def setup_lb(lab: labmod.Lab, node: str, backend_ids: list[int] | None = None,
             defines: dict | None = None) -> Path:
    """Attach the LB program on `node`'s eth0 (redirect out of fab), the TCP VIP (service 0)
    and the backends `backend_ids` (server k = backend k; default all)."""
    netns = lab.nodes[node].netns
    loader.attach("lb", "eth0", netns, "native", defines=defines)
    pin = paths.pin_dir("eth0", netns)
    lbctl.init_lb_maps(pin, iface="fab", netns=netns, redirect_iface="fab")
    lbctl.add_vip(pin, lab.vip4, lab.tcp_port, "tcp", service=0)
    backends = lab.backends()
    for k in backend_ids or range(1, len(backends) + 1):
        backend = backends[k - 1]
        lbctl.add_backend(pin, k, backend["ipv4"], services=(0,), mac=backend["mac"])
    return pin


@contextlib.contextmanager
def agent_lab(prefix: str, folder: Path, *, servers: int = 2, lbs: int = 1,
              backend_ids: list[int] | None = None, server_defines: dict | None = None,
              lb_defines: dict | None = None, **settings) -> Iterator[AgentLab]:
    """A lab with programs attached (see the module doc); settings go to AgentLab."""
    key_file = folder / "key"
    key_file.write_text(bytes(range(32)).hex())
    key_file.chmod(0o600)
    env = None
    try:
        lab = labmod.up(prefix, clients=1, lbs=lbs, servers=servers)
        pin = None
        for lb in lab.lbs:
            lb_pin = setup_lb(lab, lb.name, backend_ids, lb_defines)
            pin = pin or lb_pin
        for server in lab.servers:
            loader.attach("server", "fab", server.netns, "native", defines=server_defines)
        env = AgentLab(prefix, lab, pin, folder, key_file, **settings)
        yield env
    finally:
        if env is not None:
            env.stop_all()
        detach_all(prefix)
        labmod.down(prefix)


def detach_all(prefix: str) -> None:
    """Detach every program attached in the lab's namespaces (pins and records too)."""
    for attachment in loader.list_attachments():
        if attachment.netns and attachment.netns.startswith(f"{prefix}-"):
            with contextlib.suppress(Exception):
                loader.detach(attachment.iface, attachment.netns)
