"""`connpub lab run`: a workload as real traffic through the lab with both agents running, and
the metrics of docs/simulator.md measured from the real maps, counters and clients.

One run = a fresh lab (clients -> router -> LB -> servers), the XDP programs, an LB agent and a
server agent per server in the given mode, and one load generator per client namespace
(native/loadgen.c via `connpub.traffic.driver`) replaying the same seeded flows. While it runs,
the LB's connection and aggregate-lease tables are sampled to measure stale state (a valid
lease held for a flow the client has already closed) and the live table size. Several modes
run one after the other on identical traffic, each in a fresh lab.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from connpub.agents.common import status_path
from connpub.config import Config, parse_config
from connpub.datapath import lbctl, netlink
from connpub.datapath.clock import datapath_clock
from connpub.datapath.masks import is_v4_mapped, mask_byte_table
from connpub.errors import ConnpubError
from connpub.lab import topology as labmod
from connpub.lab import wiring
from connpub.lab.measure import (  # noqa: F401 - summary_rows, plot, SUMMARY_COLUMNS: lab.run's API
    SAMPLE_EVERY_S,
    SUMMARY_COLUMNS,
    LeaseSampler,
    broken_by_error,
    flow_keys_of,
    peak_concurrent,
    plot,
    server_snapshot,
    spread,
    summary_rows,
)
from connpub.lab.processes import set_session_nice
from connpub.paths import RUN_ROOT
from connpub.traffic import driver, native, workload
from connpub.traffic.driver import PLAN_DTYPE

MODES = ("baseline", "adaptive", "predictive", "full")
UDP_IP_HEADERS = 8 + 20  # PUBLISH travels over IPv4 on the lab's fabric
# client subnets (IPv4 /24, IPv6 /56) per client namespace and family (lab_sources)
SUBNETS_PER_CLIENT = 256


@dataclass
class RunSpec:
    """What to run. Everything else (addresses, ports) comes from the lab."""

    workload: str = "mixed"
    flows: int = 400
    duration_s: float = 40.0
    time_scale: float = 10.0  # workload seconds per wall-clock second
    mode: str = "baseline"
    seed: int = 7
    loss_pct: float = 0.0
    interval_s: float = 0.5
    clients: int = 2
    servers: int = 3
    prefix: str = "cprun"
    # {"lease": {"k": 3.0}, ...} on top of lab_profile(time_scale)
    config_overrides: dict = field(default_factory=dict)
    trace: np.ndarray | None = None  # a FLOW_DTYPE table to replay instead of generating one
    replay: bool = False  # re-enact the trace's flows one by one (lab.replay), not a workload
    vips: int = 1  # VIPs per family (vip_index deals the trace's server addresses onto them)
    # where the server agents write their finished-flow history (kept after the run, appended
    # across modes); None: in the run's folder, removed with it
    history_dir: str | None = None


# The lab's run-length settings: the driver's packet gaps are at most 2 wall seconds, so a flow
# idle for 3 s is over; classes are evaluated every second over a 5 s half-life (a run lasts
# 30 s, not hours). The bandwidth (the driver sends at most 1200 bytes per 0.2 s per flow) and
# frequency thresholds are the defaults: far above what the lab sends, as above the mixed
# workload's.
LAB_RUN_SETTINGS: dict[str, dict] = {
    "lease": {"idle_timeout_s": 3.0},
    "granularity": {"evaluation_interval_s": 1.0, "history_half_life_s": 5.0,
                    "hysteresis_evaluations": 2},
}
# Settings that are flow time: a run replays time_scale workload seconds per wall second, so
# each is its default divided by time_scale (lab_profile), the agents then judge a replayed flow
# as they judge the workload's (a UDP flow idle for udp_idle_s workload seconds is over). The
# model's features stay wall time: only at time_scale 1 does it see the workload's durations.
FLOW_TIME_SETTINGS: dict[str, tuple[str, ...]] = {
    "granularity": ("duration_long_s", "duration_very_long_s", "duration_extreme_long_s"),
    "liveness": ("udp_idle_s", "udp_stream_idle_s"),
}


def lab_profile(time_scale: float) -> dict[str, dict]:
    """The config every agent of a run starts from (before RunSpec.config_overrides): the
    lab's run-length settings, and the flow-time settings' defaults divided by time_scale."""
    defaults = Config()
    profile = {section: dict(values) for section, values in LAB_RUN_SETTINGS.items()}
    for section, names in FLOW_TIME_SETTINGS.items():
        for name in names:
            default = getattr(getattr(defaults, section), name)
            profile.setdefault(section, {})[name] = default / time_scale
    return profile


# ---------------------------------------------------------------------------------------------
# the plan: workload flows -> one driver plan per client namespace


def client_subnets(client_addr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(is IPv4, subnet id) per client address: its /24 (IPv4-mapped) or /56 (IPv6) as one
    integer, the unit the lab deals to a client namespace and keeps whole (lab_sources)."""
    addr = np.ascontiguousarray(client_addr, np.uint8).reshape(-1, 16)
    is_v4 = is_v4_mapped(addr)
    subnet = np.where(is_v4, addr[:, 12:15].astype(np.int64) @ [65536, 256, 1],
                      addr[:, :7].astype(np.int64) @ (256 ** np.arange(6, -1, -1)))
    return is_v4, subnet


def lab_sources(client_addr: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Per flow, the address (U64) the lab sends a trace client's traffic from, in the block of
    its client namespace (`owner`, 0-based: client<owner + 1>, wiring.client_source_nets).
    Each trace client subnet (IPv4 /24, IPv6 /56) a namespace owns becomes one subnet of its
    block, in address order, and each client keeps its host: the IPv4 last byte (0 and 255 as
    1 and 254, the same /25) and the IPv6 interface id. So the lab's clients and subnets are the
    trace's, and so are its aggregates by client address or subnet (docs/policy.md "Masks"),
    while a namespace owns at most SUBNETS_PER_CLIENT subnets per family (more fold onto them)."""
    addr = np.ascontiguousarray(client_addr, np.uint8).reshape(-1, 16)
    owner = np.asarray(owner, np.int64)
    if len(addr) == 0:
        return np.zeros(0, PLAN_DTYPE["source"])
    is_v4, subnet = client_subnets(addr)
    rows = np.stack([is_v4.astype(np.int64), owner, subnet], axis=1)
    keys, subnet_id = np.unique(rows, axis=0, return_inverse=True)
    # keys sort by (family, owner, prefix): a subnet's rank among its namespace's = its subnet
    _, first = np.unique(keys[:, :2], axis=0, return_index=True)
    group = np.searchsorted(first, np.arange(len(keys)), side="right") - 1
    local = (np.arange(len(keys)) - first[group]) % SUBNETS_PER_CLIENT
    local = local[subnet_id.reshape(-1)]
    unique_addr, address_id = np.unique(np.concatenate([addr, owner[:, None].astype(np.uint8),
                                                        local[:, None].astype(np.uint8)], axis=1),
                                        axis=0, return_inverse=True)
    names = []
    for row, v4 in zip(unique_addr, is_v4_mapped(unique_addr[:, :16]).tolist(), strict=True):
        client, index = int(row[16]) + 1, int(row[17])
        block = ipaddress.ip_network(wiring.client_source_nets(client)[0 if v4 else 1])
        packed = bytearray(block.network_address.packed)
        if v4:  # block /16 + subnet + host
            packed[2], packed[3] = index, min(max(int(row[15]), 1), 254)
        else:  # block /48 + subnet: a /56, then the interface id
            packed[6] = index
            packed[8:16] = bytes(row[8:16]) if row[8:16].any() else bytes(7) + b"\x01"
        names.append(str(ipaddress.ip_address(bytes(packed))))
    return np.array(names, PLAN_DTYPE["source"])[address_id.reshape(-1)]


def add_sources(lab: labmod.Lab, plans: dict[str, np.ndarray]) -> None:
    """Every source address of each client namespace's plan, on its eth0 (/32, /128): the
    router routes the namespace's whole block to it (wiring.configure_routing)."""
    for node in lab.clients:
        plan = plans.get(node.name)
        if plan is None or len(plan) == 0:
            continue
        netlink.add_addresses("eth0", node.netns, [
            f"{address}/{128 if ':' in address else 32}"
            for address in np.unique(plan["source"]).tolist()])


def replay_schedule(table: np.ndarray, spec: RunSpec
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """How the drivers replay each workload flow (wall seconds from the run's start): (start,
    duration cut at the run's end, gap between chunks: the flow's mean packet gap clipped to
    [0.2, 2] s, chunk bytes: its mean packet size clipped to [16, 1200])."""
    start_s = (table["start_ns"] - table["start_ns"].min()) / 1e9 / spec.time_scale
    duration = (table["end_ns"] - table["start_ns"]) / 1e9 / spec.time_scale
    duration = np.minimum(duration, np.maximum(spec.duration_s - start_s, 0.0))
    packets = np.maximum(table["packets"].astype(np.float64), 1.0)
    gap = np.clip(duration / np.maximum(packets - 1, 1), 0.2, 2.0)
    chunk = np.clip(table["bytes"] / packets, 16, 1200).astype(np.uint32)
    return start_s, duration, gap, chunk


def replayed_trace(table: np.ndarray, spec: RunSpec) -> np.ndarray:
    """The FLOW_DTYPE trace of what the lab's drivers actually send for `table` (the input of
    a simulation that is to agree with the lab run): flows that start within the run, at
    replay_schedule's times, one chunk every gap up to the flow's end (the driver sends one at
    the start and one at the end), TCP closed by the client (FIN), UDP ending by going idle.
    Addresses and ports stay the workload's (the lab maps them onto its own)."""
    start_s, duration, gap, chunk = replay_schedule(table, spec)
    keep = np.flatnonzero(start_s < spec.duration_s)
    out = table[keep].copy()
    start_ns = np.round(start_s[keep] * 1e9).astype(np.int64)
    duration_ns = np.round(duration[keep] * 1e9).astype(np.int64)
    gap_ns = np.round(gap[keep] * 1e9).astype(np.int64)
    packets = -(-duration_ns // gap_ns) + 1
    out["start_ns"], out["end_ns"] = start_ns, start_ns + duration_ns
    out["packets"] = packets
    out["bytes"] = packets * chunk[keep]
    first_n = np.minimum(packets, workload.FIRST_N)
    out["first_n"] = first_n
    column = np.arange(workload.FIRST_N)[None, :]
    in_sketch = column < first_n[:, None]
    out["first_sizes"] = np.where(in_sketch, chunk[keep][:, None], 0)
    arrival = np.minimum(column * gap_ns[:, None], duration_ns[:, None])
    out["first_iat_ns"] = np.where(in_sketch, np.diff(arrival, axis=1, prepend=0), 0)
    tcp = out["proto"] == workload.PROTO_TCP
    flags = workload.TCP_SYN | workload.TCP_ACK | workload.TCP_PSH
    out["first_tcp_flags"] = np.where(tcp, flags, 0)
    out["tcp_flags"] = np.where(tcp, flags | workload.TCP_FIN, 0)
    return out


def vip_index(table: np.ndarray, vips: int) -> np.ndarray:
    """Per flow, the lab VIP its server address maps to, as an index into the lab's VIPs of
    the flow's family (Lab.vips4 or Lab.vips6): per family, the server addresses ranked by
    flows (ties by address) and dealt round-robin. The mixed workload's 4 VIPs per family
    become 4 lab VIPs each with `vips` = 4, as the simulator has them."""
    addr = np.ascontiguousarray(table["vip_addr"], np.uint8).reshape(-1, 16)
    is_v4 = is_v4_mapped(addr)
    _, first, inverse, counts = np.unique(addr.view("V16").ravel(), return_index=True,
                                          return_inverse=True, return_counts=True)
    family = is_v4[first]
    order = np.lexsort((-counts, family))  # IPv6 first, then most flows first
    rank = np.empty(order.size, np.int64)
    rank[order] = np.arange(order.size) - np.searchsorted(family[order], family[order])
    return rank[inverse.ravel()] % vips


def balanced_owner(group: np.ndarray, owners: int) -> np.ndarray:
    """Per row, an owner in 0..owners-1: every group to one owner, the largest groups first,
    each to the owner with the fewest rows so far (one client subnet can carry a third of a
    workload's flows: a hash would give one client twice the other's connections)."""
    groups, inverse, counts = np.unique(group, return_inverse=True, return_counts=True)
    load = np.zeros(owners, np.int64)
    owner = np.zeros(groups.size, np.int64)
    for index in np.argsort(-counts, kind="stable"):
        owner[index] = int(np.argmin(load))
        load[owner[index]] += counts[index]
    return owner[inverse.ravel()]


def build_plans(table: np.ndarray, lab: labmod.Lab, spec: RunSpec) -> dict[str, np.ndarray]:
    """Map each workload flow onto the lab: its client subnet picks a client namespace
    (balanced_owner), which sends it from the client's address in its block (lab_sources: the
    trace's subnets and hosts kept); its server address picks one of the lab's VIPs of its
    family (vip_index); times are the workload's divided by time_scale and offset to the run's
    start."""
    names = [node.name for node in lab.clients]
    is_v4, subnet = client_subnets(table["client_addr"])
    client_index = balanced_owner(subnet, len(names))
    source = lab_sources(table["client_addr"], client_index)
    lab_vip = vip_index(table, lab.vip_count)
    vip = np.where(is_v4, np.array(lab.vips4)[lab_vip], np.array(lab.vips6)[lab_vip])

    start_s, duration, gap, chunk = replay_schedule(table, spec)
    tcp_ports, udp_ports = labmod.service_ports(lab, 6), labmod.service_ports(lab, 17)
    port = table["vip_port"].astype(np.int64)
    known = np.where(table["proto"] == 6, np.isin(port, tcp_ports), np.isin(port, udp_ports))
    port = np.where(known, port, np.where(table["proto"] == 6, lab.tcp_port, lab.udp_port))

    plans = {}
    for index, name in enumerate(names):
        mine = np.flatnonzero((client_index == index) & (start_s < spec.duration_s))
        plan = np.zeros(len(mine), PLAN_DTYPE)
        plan["flow_id"] = table["flow_id"][mine]
        plan["start_s"] = start_s[mine]
        plan["duration_s"] = duration[mine]
        plan["proto"] = table["proto"][mine]
        plan["vip"] = vip[mine]
        plan["port"] = port[mine]
        plan["source"] = source[mine]
        plan["chunk_bytes"] = chunk[mine]
        plan["gap_s"] = gap[mine]
        plans[name] = plan
    return plans


# The drivers' plans by RunSpec.replay: a workload (build_plans), or a trace re-enacted flow by
# flow, which connpub.lab.replay registers when imported (it builds on this module; a lookup
# here instead of an import keeps the two out of an import circle).
PLAN_BUILDERS: dict[bool, Callable[[np.ndarray, labmod.Lab, RunSpec], dict[str, np.ndarray]]] = {
    False: build_plans}


# ---------------------------------------------------------------------------------------------
# agents


def config_sections(spec: RunSpec) -> dict[str, dict]:
    """The policy part of every agent's config in a run (the simulator takes the same)."""
    sections: dict[str, dict] = {
        "publish": {"interval_s": spec.interval_s, "mode": spec.mode},
        "rollout": {"fraction": 1.0},
    }
    for overrides in (lab_profile(spec.time_scale), spec.config_overrides):
        for section, values in overrides.items():
            sections.setdefault(section, {}).update(values)
    return sections


def write_config(folder: Path, spec: RunSpec, node_id: int, lb_addresses: list[str],
                 key_file: Path) -> Path:
    """The TOML of one agent: the mode and publish interval of the run, lab addresses, overrides."""
    sections = config_sections(spec)
    sections["security"] = {"key_file": str(key_file)}
    # metrics stay on, on the default port: every agent has a namespace of its own
    sections["agent"] = {"server_id": node_id, "lb_addresses": lb_addresses,
                         "history_path": str(Path(spec.history_dir or folder)
                                             / f"history-{node_id}")}
    path = folder / f"{spec.mode}-{node_id}.toml"
    path.write_text(toml_text(sections))
    return path


def toml_text(sections: dict[str, dict]) -> str:
    """A TOML file of flat sections ({section: {key: value}}; values as JSON literals, which
    TOML reads the same for numbers, strings, booleans and lists of them)."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{name} = {json.dumps(value)}" for name, value in values.items())
    return "\n".join(lines) + "\n"


@dataclass
class Agents:
    folder: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    status_files: list[Path] = field(default_factory=list)

    def start(self, role: str, config: Path, iface: str, netns: str, node_id: int) -> None:
        log = self.folder / f"{role}-{node_id}.log"
        with open(log, "ab") as log_file:
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "connpub.cli", "agent", role, "--config", str(config),
                 "--iface", iface, "--netns", netns],
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                # the system under test at the traffic's priority: a session each, like the
                # load generator and echo servers, or the 5 traffic autogroups at nice -5 get
                # ~3x the CPU of each agent's and its lease renewals starve (docs/lab.md)
                preexec_fn=functools.partial(set_session_nice, native.LAB_NICE)))
        self.status_files.append(status_path(role, iface, netns))

    def statuses(self) -> list[dict]:
        found = []
        for proc in self.procs:
            if proc.poll() is not None:
                raise ConnpubError(f"an agent exited with status {proc.returncode}: see the logs "
                                   f"in {self.folder}")
        for path in self.status_files:
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                found.append({})
        return found

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(s.get("updated_unix", 0) > 0 for s in self.statuses()):
                return
            time.sleep(0.1)
        raise ConnpubError(f"agents not ready after {timeout_s:.0f} s: see {self.folder}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for path in self.status_files:
            path.unlink(missing_ok=True)


@dataclass
class TickTimes:
    """The agents' job durations (`last_tick_seconds` gauges), sampled during a run: per
    role/job the largest and the mean sample, and how often a job overran the publish cycle."""

    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, statuses: list[dict]) -> None:
        for status in statuses:
            for key, value in status.get("gauges", {}).items():
                if key.startswith("last_tick_seconds"):
                    job = key.split("job=", 1)[-1].rstrip("}")
                    self.samples.setdefault(f"{status.get('role')}/{job}", []).append(value)

    def summary(self) -> dict[str, dict[str, float]]:
        return {name: {"max": max(values), "mean": sum(values) / len(values),
                       "samples": len(values)}
                for name, values in sorted(self.samples.items())}


def agent_totals(statuses: list[dict]) -> dict[str, dict[str, float]]:
    """Every counter of the agents (`totals` of their status files), summed per role: what
    explains a run's lease misses (socket drops, rejected packets, flows finished by reason)."""
    totals: dict[str, dict[str, float]] = {}
    for status in statuses:
        role = totals.setdefault(str(status.get("role")), {})
        counts = dict(status.get("totals", {}))
        tcpstate = status.get("tcpstate") or {}
        counts.update({f"tcpstate_{k}": v for k, v in tcpstate.get("stats", {}).items()})
        for key, value in counts.items():
            role[key] = role.get(key, 0) + value
    return {role: dict(sorted(values.items())) for role, values in sorted(totals.items())}


def counter(statuses: list[dict], name: str, role: str, **labels: str) -> float:
    """Sum of one counter over the agents of a role, over every label set matching `labels`."""
    total = 0.0
    for status in statuses:
        if status.get("role") != role:
            continue
        for key, value in status.get("totals", {}).items():
            base = key.split("{", 1)[0]
            if base == name and all(f"{k}={v}" in key for k, v in labels.items()):
                total += value
    return total


# ---------------------------------------------------------------------------------------------
# one run


def run(spec: RunSpec, progress: Callable[[float, dict], None] | None = None) -> dict:
    """One mode on a fresh lab; returns its metrics. The lab is removed afterwards."""
    if spec.mode not in MODES:
        raise ConnpubError(f"unknown mode {spec.mode!r}: expected one of {', '.join(MODES)}")
    folder = RUN_ROOT / f"labrun-{spec.prefix}"
    folder.mkdir(parents=True, exist_ok=True)
    labmod.write_run_pid(folder)  # `lab down --all` leaves a live run's folder alone
    if spec.history_dir:
        Path(spec.history_dir).mkdir(parents=True, exist_ok=True)
    key_file = folder / "key"
    key_file.write_text(secrets.token_hex(32) + "\n")
    key_file.chmod(0o600)
    table = spec.trace if spec.trace is not None else workload.generate(
        spec.workload, spec.flows, spec.seed, window_s=spec.duration_s * spec.time_scale)
    agents = Agents(folder)
    labmod.down(spec.prefix)
    finished = False
    try:
        metrics = _run_in_lab(spec, folder, key_file, table, agents, progress)
        finished = True
        return metrics
    except (ConnpubError, OSError) as err:
        if agents.procs and lab_removed(spec.prefix):
            raise ConnpubError(f"the lab {spec.prefix} was removed during the run (`connpub lab "
                               "down`?): run stopped") from err
        raise
    finally:
        agents.stop()
        labmod.down(spec.prefix)
        if finished:  # on failure the logs stay there for the error message's "see ..."
            shutil.rmtree(folder, ignore_errors=True)


def lab_removed(prefix: str, wait_s: float = 10.0) -> bool:
    """The run's lab is gone (its state file or its namespaces): someone ran `lab down`. A
    `lab down` kills the lab's processes before it deletes the namespaces and the state, so a
    run that failed because of it looks for up to wait_s."""
    deadline = time.monotonic() + wait_s
    while True:
        if not labmod.state_path(prefix).exists() or not netlink.list_netns(f"{prefix}-"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _run_in_lab(spec: RunSpec, folder: Path, key_file: Path, table: np.ndarray, agents: Agents,
                progress: Callable[[float, dict], None] | None) -> dict:
    lab = labmod.up(spec.prefix, clients=spec.clients, lbs=1, servers=spec.servers,
                    vips=spec.vips)
    lease = spec.config_overrides.get("lease", {})
    linger_s = lease.get("k", 3.0) * spec.interval_s
    attached = labmod.attach_datapath(lab, "redirect",
                                      {"initial_lease_s": lease.get("initial_s", 3.0),
                                       "close_linger_s": linger_s})
    lb_pin = Path(attached["lb"][0]["pin_dir"])
    if spec.replay not in PLAN_BUILDERS:
        raise ConnpubError("RunSpec(replay=True) needs connpub.lab.replay (import it first)")
    plans = PLAN_BUILDERS[spec.replay](table, lab, spec)
    add_sources(lab, plans)
    if spec.loss_pct:
        for server in lab.servers:  # the publishing path: server fab -> LB fab
            labmod.impair(spec.prefix, server.name, "fab", loss_pct=spec.loss_pct)
    lb_fabric = lab.lb_fabric("lb1").ip4
    lb_node = lab.lbs[0]
    agents.start("lb", write_config(folder, spec, 1, [], key_file), "eth0", lb_node.netns, 1)
    for server_id, server in enumerate(lab.servers, start=1):
        agents.start("server", write_config(folder, spec, server_id, [lb_fabric], key_file),
                     "fab", server.netns, server_id)
    agents.wait_ready()
    misses_before = lbctl.lease_misses(lb_pin)
    problems: list[str] = []
    run_cfg = parse_config(config_sections(spec), problems)
    sampler = LeaseSampler(lb_pin, byte_table=mask_byte_table(run_cfg.masks.specs))
    start_at = time.monotonic() + 1.0
    drivers = {}
    for name, plan in plans.items():
        plan_path, out_path = folder / f"plan-{name}.bin", folder / f"out-{name}.bin"
        driver.write_plan(plan, plan_path)
        out_path.unlink(missing_ok=True)
        drivers[name] = (subprocess.Popen(
            driver.command(plan_path, out_path, start_at),
            stdout=subprocess.DEVNULL,
            stderr=open(folder / f"driver-{name}.log", "wb"),  # noqa: SIM115
            start_new_session=True,  # its own autogroup, whose nice it sets (LAB_NICE)
            preexec_fn=labmod._enter_in_child(lab.nodes[name].netns)), out_path)
    series = []
    ticks = TickTimes()
    snapshot: dict = {}
    clock = datapath_clock()
    while any(proc.poll() is None for proc, _ in drivers.values()):
        time.sleep(SAMPLE_EVERY_S)
        live = sampler.sample(clock.now_ns())
        if not snapshot and time.monotonic() - start_at >= spec.duration_s / 2:
            snapshot = server_snapshot(attached["server"][0], clock.now_ns())
        statuses = agents.statuses()
        ticks.add(statuses)
        point = {"t_s": round(time.monotonic() - start_at, 3),
                 "publish_bytes": counter(statuses, "publish_bytes", "server",
                                          direction="sent"),
                 "publish_packets": counter(statuses, "publish_packets", "server",
                                            direction="sent"),
                 "lease_misses": lbctl.lease_misses(lb_pin) - misses_before,
                 "valid_leases": live}
        series.append(point)
        if progress:
            progress(min(1.0, point["t_s"] / spec.duration_s), point)
    ended_at = time.monotonic()
    results = []
    for name, (proc, out_path) in drivers.items():
        if proc.returncode != 0 or not out_path.exists():
            raise ConnpubError(f"the driver of {name} failed: see {folder}/driver-{name}.log")
        results.extend(driver.flows(driver.read_results(out_path), plans[name]))
    # keep sampling until no closed flow holds a lease (bounded by the longest lease)
    closed_keys = flow_keys_of(results, plans)
    closed_at = np.array([int((start_at + r["ended_s"]) * 1e9) for r in results], np.int64)
    mono_to_dp = clock.now_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    closed_at = closed_at + mono_to_dp
    started_at = np.array([int((start_at + r["started_s"]) * 1e9) for r in results],
                          np.int64) + mono_to_dp
    linger_deadline = ended_at + 30.0
    while time.monotonic() < linger_deadline:
        sampler.sample(clock.now_ns())
        if not sampler.any_valid(closed_keys):
            break
        time.sleep(SAMPLE_EVERY_S)
    statuses = agents.statuses()
    counted_s = time.monotonic() - start_at  # the counters below include the linger sampling
    classes = {f"{v['vip']}:{v['port']}/{v['proto']}": {"level": v["level"],
                                                       "lease_misses": v["lease_misses"],
                                                       "new_flows": v["new_flows"]}
               for v in lbctl.list_vips(lb_pin) if v["new_flows"]}
    wall_s = max(ended_at - start_at, 1e-9)
    sent_bytes = counter(statuses, "publish_bytes", "server", direction="sent")
    sent_packets = counter(statuses, "publish_packets", "server", direction="sent")
    metrics = {
        "mode": spec.mode,
        "workload": spec.workload,
        "flows": len(results),
        "broken_connections": sum(not r["ok"] for r in results),
        "broken_by_error": broken_by_error(results),
        "wall_s": round(wall_s, 2),
        # the publish counters cover (start, start + counted_s]: wall_s of traffic, then the
        # sampling until no closed flow holds a lease (a simulation to compare runs that long)
        "counted_s": round(counted_s, 2),
        "publish_packets_per_s": sent_packets / wall_s,
        "publish_bytes_per_s": (sent_bytes + sent_packets * UDP_IP_HEADERS) / wall_s,
        "publish_entries_per_s": counter(statuses, "publish_entries", "server",
                                         direction="sent") / wall_s,
        "lb_map_writes_per_s": counter(statuses, "map_writes", "lb") / wall_s,
        "lease_misses": lbctl.lease_misses(lb_pin) - misses_before,
        "stale_flow_seconds": sampler.stale_flow_seconds(closed_keys, closed_at, started_at),
        "peak_valid_leases": sampler.peak_valid,
        "peak_lb_entries": sampler.peak_entries,
        "servers": spread(results),
        "tick_s": ticks.summary(),
        "agent_totals": agent_totals(statuses),
        "peak_concurrent_connections": peak_concurrent(results),
        # the load generator's view: its slowest echo and connect, UDP datagrams sent again
        "echo_rtt_max_s": round(max((r["rtt_max_s"] for r in results), default=0.0), 3),
        "open_max_s": round(max((r["open_s"] for r in results), default=0.0), 3),
        "udp_resent": sum(r["resent"] for r in results),
        "snapshot": snapshot,
        "classes": classes,
        "loss_pct": spec.loss_pct,
        "series": series,
    }
    return metrics


def run_modes(spec: RunSpec, modes: list[str],
              progress: Callable[[str, float, dict], None] | None = None) -> dict[str, dict]:
    """The same workload (same seed) in each mode, one fresh lab each."""
    out = {}
    for mode in modes:
        mode_spec = RunSpec(**{**asdict(spec), "mode": mode})
        out[mode] = run(mode_spec, (lambda f, p, m=mode: progress(m, f, p)) if progress else None)
    return out


__all__ = ["RunSpec", "run", "run_modes", "summary_rows", "plot"]
