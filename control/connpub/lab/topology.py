"""The network lab: clients -> router -> LB node(s) -> fabric -> servers (DSR), in netns.

Topology (names carry the prefix P, default "cp"):

    P-client<i> eth0 --- c<i> P-router l<j> --- eth0 P-lb<j>  fab --- l<j> \\
                                   s<k> --- eth0 P-srv<k> fab --- s<k>  P-fabric (bridge br0)

Clients reach the VIPs through the router, which routes them to the LB node(s) (ECMP when
several). Without an XDP LB program, an LB node routes VIP packets to the first server over the
fabric. With one, it encapsulates (IPIP/IP6IP6) towards a server's fabric address and sends it
out `fab` (XDP_REDIRECT) or back to the router (XDP_TX). Servers own the VIPs on loopback, strip
tunnel headers with a tc ingress program on `fab` and `eth0` (this kernel has no ipip/ip6tnl
driver) and answer the client directly through the router (direct server return).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from connpub.datapath import netlink
from connpub.errors import ConnpubError
from connpub.paths import BPF_DIR, PIN_ROOT, RUN_ROOT

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "cp"
VIP4 = "10.200.0.1"
VIP6 = "fd00:200::1"
TCP_PORT = 80
UDP_PORT = 53
MTU = 1500
# TCP MSS the servers advertise: 1500 - outer IPv6 (40) - inner IPv4 (20) - TCP (20), and for
# IPv6 clients 1500 - 40 - 40 - 20, so tunnelled client->server segments still fit the MTU.
ADVMSS4 = 1420
ADVMSS6 = 1400
MAX_NODES = 50
MAX_VIPS = 200  # VIPs 10.200.0.1..N and fd00:200::1..N (`lab replay --vips N`)


@dataclass
class Iface:
    """One interface of the lab: where it lives, its addresses and its veth peer."""

    name: str
    netns: str
    mac: str
    ifindex: int
    peer_netns: str
    peer_name: str
    ipv4: str | None = None  # CIDR
    ipv6: str | None = None  # CIDR

    @property
    def ip4(self) -> str | None:
        return self.ipv4.split("/")[0] if self.ipv4 else None

    @property
    def ip6(self) -> str | None:
        return self.ipv6.split("/")[0] if self.ipv6 else None


@dataclass
class Node:
    """A namespace of the lab: role is client, router, lb, server or fabric."""

    name: str
    role: str
    netns: str
    ifaces: dict[str, Iface] = field(default_factory=dict)


@dataclass
class Lab:
    """Everything `lab up` built; saved as JSON in the state file."""

    prefix: str
    nodes: dict[str, Node]
    vip4: str = VIP4
    vip6: str = VIP6
    vip_count: int = 1  # VIPs per family: vip4/vip6 first, then the next addresses
    tcp_port: int = TCP_PORT
    udp_port: int = UDP_PORT
    pids: dict[str, int] = field(default_factory=dict)
    created_unix: float = 0.0
    impairments: dict[str, dict] = field(default_factory=dict)  # "node/iface" -> settings
    datapath: dict = field(default_factory=dict)  # what attach_datapath() attached

    @property
    def vips4(self) -> list[str]:
        """Every IPv4 VIP of the lab, vip4 first."""
        base = self.vip4.rsplit(".", 1)
        return [f"{base[0]}.{int(base[1]) + i}" for i in range(self.vip_count)]

    @property
    def vips6(self) -> list[str]:
        """Every IPv6 VIP of the lab, vip6 first."""
        base = self.vip6.rsplit(":", 1)
        return [f"{base[0]}:{int(base[1], 16) + i:x}" for i in range(self.vip_count)]

    def vip_routes(self) -> list[tuple[str, int]]:
        """(prefix, family) of every VIP route: /32 and /128 per VIP."""
        return [(f"{v}/32", 4) for v in self.vips4] + [(f"{v}/128", 6) for v in self.vips6]

    def _role(self, role: str) -> list[Node]:
        return [node for node in self.nodes.values() if node.role == role]

    @property
    def clients(self) -> list[Node]:
        return self._role("client")

    @property
    def lbs(self) -> list[Node]:
        return self._role("lb")

    @property
    def servers(self) -> list[Node]:
        return self._role("server")

    @property
    def router(self) -> Node:
        return self.nodes["router"]

    def lb_ingress(self, lb: str = "lb1") -> Iface:
        """Interface of an LB node where client->VIP packets arrive (attach the LB XDP here)."""
        return self.nodes[lb].ifaces["eth0"]

    def lb_fabric(self, lb: str = "lb1") -> Iface:
        """Interface of an LB node facing the servers (XDP_REDIRECT target)."""
        return self.nodes[lb].ifaces["fab"]

    def lb_gateway_mac(self, lb: str = "lb1") -> str:
        """MAC of the router port facing an LB node (destination MAC for XDP_TX)."""
        ingress = self.lb_ingress(lb)
        return self.router.ifaces[ingress.peer_name].mac

    def backends(self) -> list[dict]:
        """Servers as the LB sees them.

        ipv4/ipv6/mac: the server's fabric interface (tunnel destination and next-hop MAC when
        the LB sends out its `fab` interface, XDP_REDIRECT); routed_ipv4/routed_ipv6: the
        server's router-facing address (tunnel destination when the LB sends back to the
        router with XDP_TX and the router forwards).
        """
        return [
            {"name": node.name, "netns": node.netns, "ipv4": node.ifaces["fab"].ip4,
             "ipv6": node.ifaces["fab"].ip6, "mac": node.ifaces["fab"].mac,
             "routed_ipv4": node.ifaces["eth0"].ip4, "routed_ipv6": node.ifaces["eth0"].ip6}
            for node in self.servers
        ]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Lab:
        nodes = {
            name: Node(name=raw["name"], role=raw["role"], netns=raw["netns"],
                       ifaces={k: Iface(**v) for k, v in raw["ifaces"].items()})
            for name, raw in data["nodes"].items()
        }
        return cls(**{**data, "nodes": nodes})


def state_path(prefix: str) -> Path:
    return RUN_ROOT / f"lab-{prefix}.json"


def log_dir(prefix: str) -> Path:
    return RUN_ROOT / f"lab-{prefix}"


def _check_prefix(prefix: str) -> None:
    if not prefix or len(prefix) > 8 or not prefix.replace("-", "").isalnum():
        raise ConnpubError(f"bad lab prefix {prefix!r}: use 1-8 letters/digits (e.g. cp)")


def load_lab(prefix: str = DEFAULT_PREFIX) -> Lab:
    """The lab recorded by `lab up --prefix prefix`."""
    path = state_path(prefix)
    if not path.exists():
        raise ConnpubError(f"no lab {prefix} (no {path}): run `connpub lab up --prefix {prefix}`")
    return Lab.from_json(json.loads(path.read_text()))


def save_lab(lab: Lab) -> None:
    path = state_path(lab.prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(lab.to_json(), indent=1))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# addressing plan (identical in every lab: namespaces keep labs apart)


def _client_net(i: int) -> tuple[str, str, str, str]:
    """(client v4, router v4, client v6, router v6) on the client<i> link."""
    return (f"10.100.{i}.2/24", f"10.100.{i}.1/24",
            f"fd00:100:{i}::2/64", f"fd00:100:{i}::1/64")


def _lb_net(j: int) -> tuple[str, str, str, str]:
    return (f"10.101.{j}.2/24", f"10.101.{j}.1/24",
            f"fd00:101:{j}::2/64", f"fd00:101:{j}::1/64")


def _server_net(k: int) -> tuple[str, str, str, str]:
    return (f"10.102.{k}.2/24", f"10.102.{k}.1/24",
            f"fd00:102:{k}::2/64", f"fd00:102:{k}::1/64")


def _fabric_addr(role: str, n: int) -> tuple[str, str]:
    host = n if role == "lb" else 100 + n
    return f"10.103.0.{host}/24", f"fd00:103::{host}/64"


# ---------------------------------------------------------------------------------------------
# building


def _iface(netns: str, name: str, peer_netns: str, peer_name: str, v4: str | None,
           v6: str | None) -> Iface:
    for cidr in (v4, v6):
        if cidr:
            netlink.add_address(name, netns, cidr)
    return Iface(name=name, netns=netns, mac=netlink.mac_address(name, netns),
                 ifindex=netlink.ifindex(name, netns), peer_netns=peer_netns,
                 peer_name=peer_name, ipv4=v4, ipv6=v6)


def _link(a: Node, a_name: str, b: Node, b_name: str, a_addrs=(None, None),
          b_addrs=(None, None)) -> None:
    netlink.create_veth(a_name, a.netns, b_name, b.netns, mtu=MTU)
    a.ifaces[a_name] = _iface(a.netns, a_name, b.netns, b_name, *a_addrs)
    b.ifaces[b_name] = _iface(b.netns, b_name, a.netns, a_name, *b_addrs)


def create_namespaces(lab: Lab) -> None:
    for node in lab.nodes.values():
        netlink.create_netns(node.netns)
        # no duplicate address detection: link-local addresses usable at once (ND works)
        for key in ("all", "default"):
            netlink.sysctl_set(node.netns, f"net.ipv6.conf.{key}.accept_dad", 0)


def create_links(lab: Lab) -> None:
    router = lab.router
    fabric = lab.nodes["fabric"]
    netlink.create_bridge("br0", fabric.netns)
    for i, client in enumerate(lab.clients, start=1):
        c4, r4, c6, r6 = _client_net(i)
        _link(client, "eth0", router, f"c{i}", (c4, c6), (r4, r6))
    for j, lb in enumerate(lab.lbs, start=1):
        l4, r4, l6, r6 = _lb_net(j)
        _link(lb, "eth0", router, f"l{j}", (l4, l6), (r4, r6))
        # finished checksums on frames entering the LB: its XDP program may forward them
        netlink.set_tx_checksum(f"l{j}", router.netns, enabled=False)
        _link(lb, "fab", fabric, f"l{j}", _fabric_addr("lb", j))
        netlink.set_master(f"l{j}", fabric.netns, "br0")
    for k, server in enumerate(lab.servers, start=1):
        s4, r4, s6, r6 = _server_net(k)
        _link(server, "eth0", router, f"s{k}", (s4, s6), (r4, r6))
        _link(server, "fab", fabric, f"s{k}", _fabric_addr("server", k))
        netlink.set_master(f"s{k}", fabric.netns, "br0")


def _gw(iface: Iface) -> tuple[str, str]:
    """(v4, v6) gateway = the peer's addresses on this link."""
    assert iface.ipv4 and iface.ipv6
    return iface.ipv4, iface.ipv6


def configure_routing(lab: Lab) -> None:
    router = lab.router
    for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
        netlink.sysctl_set(router.netns, key, 1)
    for client in lab.clients:
        peer = router.ifaces[client.ifaces["eth0"].peer_name]
        netlink.add_route(client.netns, "default", via=peer.ip4)
        netlink.add_route(client.netns, "default", via=peer.ip6)
    # router: VIPs -> LB node(s), ECMP across them
    lb_hops = [lb.ifaces["eth0"] for lb in lab.lbs]
    for route, family in lab.vip_routes():
        netlink.add_route(router.netns, route,
                          via=[h.ip4 if family == 4 else h.ip6 for h in lb_hops])
    if len(lb_hops) > 1:
        netlink.sysctl_set(router.netns, "net.ipv4.fib_multipath_hash_policy", 1)
        netlink.sysctl_set(router.netns, "net.ipv6.fib_multipath_hash_policy", 1)
    for lb in lab.lbs:
        _route_lb_node(lab, lb)
    for server in lab.servers:
        peer = router.ifaces[server.ifaces["eth0"].peer_name]
        for route, _ in lab.vip_routes():
            netlink.add_address("lo", server.netns, route)
        for key in ("all", "default", "eth0", "fab", "lo"):
            netlink.sysctl_set(server.netns, f"net.ipv4.conf.{key}.rp_filter", 0)
        # DSR: replies go straight to the router, never back through an LB
        netlink.add_route(server.netns, "default", via=peer.ip4, advmss=ADVMSS4)
        netlink.add_route(server.netns, "default", via=peer.ip6, advmss=ADVMSS6)


def _route_lb_node(lab: Lab, lb: Node) -> None:
    first_server = lab.servers[0].ifaces["fab"]
    peer = lab.router.ifaces[lb.ifaces["eth0"].peer_name]
    for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
        netlink.sysctl_set(lb.netns, key, 1)
    for key in ("all", "default", "eth0", "fab"):
        netlink.sysctl_set(lb.netns, f"net.ipv4.conf.{key}.rp_filter", 0)
    netlink.add_route(lb.netns, "default", via=peer.ip4)
    netlink.add_route(lb.netns, "default", via=peer.ip6)
    # without an XDP LB program: plain routing of VIP packets to the first server
    for route, family in lab.vip_routes():
        netlink.add_route(lb.netns, route,
                          via=first_server.ip4 if family == 4 else first_server.ip6)


def install_bpf_helpers(lab: Lab) -> None:
    """tc decap on every server interface; XDP_PASS on the router/fabric peers of LB links."""
    from bcc import BPF  # imported here: compiling costs ~1 s and only `lab up` needs it

    source = (BPF_DIR / "lab" / "decap.c").read_text()
    bpf = BPF(text=source)
    decap = bpf.load_func("lab_decap", BPF.SCHED_CLS)
    xdp_pass = bpf.load_func("lab_xdp_pass", BPF.XDP)
    for server in lab.servers:
        for name in ("eth0", "fab"):
            netlink.attach_tc(name, server.netns, decap.fd, "lab_decap", "ingress")
    # A native XDP_TX/XDP_REDIRECT into a veth is dropped unless the receiving peer runs XDP
    # (docs/lab.md): give the peers of both LB interfaces a pass-through program.
    for lb in lab.lbs:
        for name in ("eth0", "fab"):
            iface = lb.ifaces[name]
            netlink.attach_xdp(iface.peer_name, iface.peer_netns, xdp_pass.fd, "native")


# Extra service ports, so the workload generator's application classes are distinct traffic
# classes in the lab too (connpub.traffic.workload.APP_CLASSES).
EXTRA_TCP_PORTS = (443, 873, 8443)
EXTRA_UDP_PORTS = (443, 5004, 5006)


def service_ports(lab: Lab, proto: int) -> list[int]:
    """Every port the lab's echo servers listen on for proto (6 or 17), the main one first."""
    if proto == 6:
        return [lab.tcp_port, *(p for p in EXTRA_TCP_PORTS if p != lab.tcp_port)]
    return [lab.udp_port, *(p for p in EXTRA_UDP_PORTS if p != lab.udp_port)]


def start_services(lab: Lab) -> None:
    directory = log_dir(lab.prefix)
    directory.mkdir(parents=True, exist_ok=True)
    for server in lab.servers:
        lab.pids[server.name] = spawn_in_netns(
            server.netns,
            [sys.executable, "-m", "connpub.traffic.services", "serve", "--name", server.name,
             *[arg for port in service_ports(lab, 6) for arg in ("--tcp-port", str(port))],
             *[arg for port in service_ports(lab, 17) for arg in ("--udp-port", str(port))],
             *[arg for vip in lab.vips4 + lab.vips6 for arg in ("--udp-bind", vip)]],
            directory / f"{server.name}.log")
    deadline = time.monotonic() + 10
    for server in lab.servers:
        wait_tcp_listening(server.netns, lab.vip4, lab.tcp_port, deadline)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def _enter_in_child(netns: str):
    from pyroute2 import netns as pr_netns

    netlink._require_netns(netns)
    return lambda: pr_netns.setns(netns, flags=0, fork=False)


def spawn_in_netns(netns: str, argv: list[str], log_path: Path) -> int:
    """Start argv inside netns (own session, output to log_path); returns its pid."""
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True, env=_child_env(), preexec_fn=_enter_in_child(netns))
    return proc.pid


def run_in_netns(netns: str, argv: list[str], timeout_s: float | None = None
                 ) -> subprocess.CompletedProcess:
    """Run argv inside netns to completion, capturing text output."""
    return subprocess.run(argv, capture_output=True, text=True, env=_child_env(),
                          preexec_fn=_enter_in_child(netns), timeout=timeout_s)


def wait_tcp_listening(netns: str, host: str, port: int, deadline: float) -> None:
    """Poll until a TCP connect to host:port inside netns succeeds, or raise at the deadline."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with netlink.entered(netns):
            sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(0.5)
            sock.connect((host, port))
            return
        except OSError as err:
            if time.monotonic() > deadline:
                raise ConnpubError(f"nothing listens on {host}:{port} in netns {netns}: "
                                   f"see {log_dir(netns.split('-')[0])} ({err})") from err
            time.sleep(0.05)
        finally:
            sock.close()


# ---------------------------------------------------------------------------------------------
# membership changes of a running lab


def add_lb(prefix: str) -> Node:
    """Add an LB node (the next lb<j>) to a running lab: namespace, links to the router and the
    fabric, routing, and the pass-through XDP programs on its peers (as `up` builds them). The
    router does not send it anything until `set_vip_next_hops` names it. All or nothing."""
    lab = load_lab(prefix)
    j = len(lab.lbs) + 1
    node = Node(f"lb{j}", "lb", f"{prefix}-lb{j}")
    if node.name in lab.nodes or netlink.netns_exists(node.netns) or j > MAX_NODES:
        raise ConnpubError(f"cannot add {node.name} to lab {prefix}: it exists or the lab is full")
    try:
        netlink.create_netns(node.netns)
        for key in ("all", "default"):
            netlink.sysctl_set(node.netns, f"net.ipv6.conf.{key}.accept_dad", 0)
        l4, r4, l6, r6 = _lb_net(j)
        _link(node, "eth0", lab.router, f"l{j}", (l4, l6), (r4, r6))
        netlink.set_tx_checksum(f"l{j}", lab.router.netns, enabled=False)
        fabric = lab.nodes["fabric"]
        _link(node, "fab", fabric, f"l{j}", _fabric_addr("lb", j))
        netlink.set_master(f"l{j}", fabric.netns, "br0")
        _route_lb_node(lab, node)
        _xdp_pass_on_peers([node])
    except BaseException:
        with contextlib.suppress(Exception):
            netlink.delete_netns(node.netns)  # its veth ends (and their peers) go with it
        raise
    lab.nodes[node.name] = node
    save_lab(lab)
    return node


def set_vip_next_hops(prefix: str, lb_names: list[str]) -> None:
    """Point the router's VIP routes at these LB nodes (ECMP with L4 hashing when several),
    each route replaced in one netlink request: an LB node joins or leaves the data path."""
    lab = load_lab(prefix)
    if not lb_names or any(lab.nodes.get(n) is None or lab.nodes[n].role != "lb"
                           for n in lb_names):
        raise ConnpubError(f"bad LB list {lb_names}: name LB nodes of lab {prefix} (lb1, ...)")
    hops = [lab.nodes[name].ifaces["eth0"] for name in lb_names]
    if len(hops) > 1:
        netlink.sysctl_set(lab.router.netns, "net.ipv4.fib_multipath_hash_policy", 1)
        netlink.sysctl_set(lab.router.netns, "net.ipv6.fib_multipath_hash_policy", 1)
    for route, family in lab.vip_routes():
        netlink.add_route(lab.router.netns, route,
                          via=[h.ip4 if family == 4 else h.ip6 for h in hops], replace=True)


def _xdp_pass_on_peers(lbs: list[Node]) -> None:
    from bcc import BPF  # noqa: PLC0415

    bpf = BPF(text=(BPF_DIR / "lab" / "decap.c").read_text())
    xdp_pass = bpf.load_func("lab_xdp_pass", BPF.XDP)
    for lb in lbs:
        for name in ("eth0", "fab"):
            iface = lb.ifaces[name]
            netlink.attach_xdp(iface.peer_name, iface.peer_netns, xdp_pass.fd, "native")


STEPS = (create_namespaces, create_links, configure_routing, install_bpf_helpers, start_services)


def plan(prefix: str, clients: int, lbs: int, servers: int, vips: int = 1) -> Lab:
    """The Lab that `up` would build (names only; nothing touched)."""
    _check_prefix(prefix)
    if not 1 <= vips <= MAX_VIPS:
        raise ConnpubError(f"--vips {vips} out of range: use 1..{MAX_VIPS}")
    for what, count in (("clients", clients), ("lbs", lbs), ("servers", servers)):
        if not 1 <= count <= MAX_NODES:
            raise ConnpubError(f"--{what} {count} out of range: use 1..{MAX_NODES}")
    nodes = {"router": Node("router", "router", f"{prefix}-router"),
             "fabric": Node("fabric", "fabric", f"{prefix}-fabric")}
    for role, count, stem in (("client", clients, "client"), ("lb", lbs, "lb"),
                              ("server", servers, "srv")):
        for n in range(1, count + 1):
            nodes[f"{stem}{n}"] = Node(f"{stem}{n}", role, f"{prefix}-{stem}{n}")
    return Lab(prefix=prefix, nodes=nodes, vip_count=vips)


def up(prefix: str = DEFAULT_PREFIX, clients: int = 1, lbs: int = 1, servers: int = 2,
       rollback: bool = True, progress=None, vips: int = 1) -> Lab:
    """Build the lab; on failure remove what was built (unless rollback=False) and re-raise."""
    lab = plan(prefix, clients, lbs, servers, vips)
    existing = netlink.list_netns(f"{prefix}-")
    if existing or state_path(prefix).exists():
        raise ConnpubError(f"lab {prefix} already exists ({', '.join(existing) or 'state file'}): "
                           f"run `connpub lab down --prefix {prefix}` first")
    lab.created_unix = time.time()
    try:
        for step in STEPS:
            if progress:
                progress(step.__name__)
            step(lab)
        save_lab(lab)
    except BaseException:
        if rollback:
            with contextlib.suppress(Exception):
                down(prefix)
        raise
    return lab


# ---------------------------------------------------------------------------------------------
# impairments (loss / delay on one interface, egress)


def impair(prefix: str, node: str, iface: str, loss_pct: float = 0.0,
           delay_ms: float = 0.0) -> dict:
    """Set egress loss/delay on one lab interface (0/0 clears); returns what was applied.

    Uses netem when the kernel has it; otherwise loss alone is done by a tc egress BPF program
    (bpf/lab/loss.c) and delay is refused.
    """
    lab = load_lab(prefix)
    if node not in lab.nodes or iface not in lab.nodes[node].ifaces:
        raise ConnpubError(f"no interface {node}/{iface} in lab {prefix}: see `connpub lab status`")
    if not 0 <= loss_pct <= 100 or delay_ms < 0:
        raise ConnpubError(f"bad impairment loss={loss_pct}% delay={delay_ms}ms: "
                           "loss must be 0..100, delay >= 0")
    netns = lab.nodes[node].netns
    netlink.clear_root_qdisc(iface, netns)
    netlink.detach_tc_filters(iface, netns, "egress")
    applied = {"loss_pct": loss_pct, "delay_ms": delay_ms, "method": "none"}
    if loss_pct or delay_ms:
        try:
            netlink.set_netem(iface, netns, delay_ms=delay_ms, loss_pct=loss_pct)
            applied["method"] = "netem"
        except ConnpubError:
            if delay_ms:
                raise
            from bcc import BPF

            bpf = BPF(src_file=str(BPF_DIR / "lab" / "loss.c").encode())
            threshold = min(int(loss_pct / 100 * 2**32), 2**32 - 1)
            table = bpf["lab_loss_threshold"]
            table[table.Key(0)] = table.Leaf(threshold)
            program = bpf.load_func("lab_loss", BPF.SCHED_CLS)
            netlink.attach_tc(iface, netns, program.fd, "lab_loss", "egress")
            applied["method"] = "bpf-loss"
    key = f"{node}/{iface}"
    if applied["method"] == "none":
        lab.impairments.pop(key, None)
    else:
        lab.impairments[key] = applied
    save_lab(lab)
    return applied


# ---------------------------------------------------------------------------------------------
# tearing down


def _netns_inode(name: str) -> int | None:
    try:
        return os.stat(netlink.NETNS_RUN_DIR / name).st_ino
    except FileNotFoundError:
        return None


def pids_in_netns(names: list[str]) -> list[int]:
    """Pids of processes whose network namespace is one of the named ones."""
    inodes = {ino for ino in map(_netns_inode, names) if ino is not None}
    if not inodes:
        return []
    self_pid = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == self_pid:
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                pids.append(int(entry))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return pids


def _kill(pids: list[int], timeout_s: float = 3.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _alive(pid)]
        if alive:
            time.sleep(0.02)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    # reap our own children so they do not linger as zombies
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def down(prefix: str = DEFAULT_PREFIX) -> dict:
    """Remove every namespace named '<prefix>-*', the processes in them, state and logs.

    Works from the namespace list, not only the state file, so a lab that crashed half-way
    through `up` is removed too. Returns what was removed.
    """
    _check_prefix(prefix)
    names = netlink.list_netns(f"{prefix}-")
    pids = set(pids_in_netns(names))
    with contextlib.suppress(ConnpubError, json.JSONDecodeError, TypeError, KeyError):
        pids.update(pid for pid in load_lab(prefix).pids.values() if _is_lab_process(pid, names))
    _kill(sorted(pids))
    for name in names:
        netlink.delete_netns(name)
    _remove_attachments(names)
    from connpub.agents.common import remove_statuses_of_netns  # noqa: PLC0415
    from connpub.datapath.lbsaved import forget_netns  # noqa: PLC0415

    remove_statuses_of_netns(names, prefix)
    forget_netns(names)
    state = state_path(prefix)
    with contextlib.suppress(FileNotFoundError):
        state.unlink()
    shutil.rmtree(log_dir(prefix), ignore_errors=True)
    return {"prefix": prefix, "netns": names, "pids": sorted(pids)}


def _remove_attachments(names: list[str]) -> None:
    """Pins and attachment records of the XDP programs that lived in these namespaces (the
    programs went with their interfaces)."""
    for name in names:
        shutil.rmtree(PIN_ROOT / name, ignore_errors=True)
        shutil.rmtree(RUN_ROOT / "attachments" / name, ignore_errors=True)
    for folder in (PIN_ROOT, RUN_ROOT / "attachments"):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def _is_lab_process(pid: int, names: list[str]) -> bool:
    """A recorded pid is only killed if it still runs the lab services (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    return b"connpub.traffic.services" in cmdline


def all_prefixes() -> list[str]:
    """Prefixes of every lab found by state file or by a '<prefix>-router' netns."""
    found = {path.name[4:-5] for path in RUN_ROOT.glob("lab-*.json")}
    found.update(name[: -len("-router")] for name in netlink.list_netns()
                 if name.endswith("-router"))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# status


def status(prefix: str) -> dict:
    """What the state file says and whether it is still true (netns present, services alive)."""
    lab = load_lab(prefix)
    present = set(netlink.list_netns(f"{prefix}-"))
    nodes = []
    for node in lab.nodes.values():
        nodes.append({
            "name": node.name, "role": node.role, "netns": node.netns,
            "present": node.netns in present,
            "ifaces": {name: {"ipv4": i.ipv4, "ipv6": i.ipv6, "mac": i.mac, "ifindex": i.ifindex,
                              "peer": f"{i.peer_netns}/{i.peer_name}"}
                       for name, i in node.ifaces.items()},
            "pid": lab.pids.get(node.name),
            "service_alive": _alive(lab.pids[node.name]) if node.name in lab.pids else None,
        })
    return {"prefix": prefix, "vip4": lab.vip4, "vip6": lab.vip6, "tcp_port": lab.tcp_port,
            "udp_port": lab.udp_port, "nodes": nodes, "backends": lab.backends(),
            "impairments": lab.impairments}


# ---------------------------------------------------------------------------------------------
# the datapath: LB program on every LB node, server program on every server


def attach_datapath(lab: Lab, forward: str = "redirect", lb_settings: dict | None = None) -> dict:
    """Attach the LB program on each LB node's ingress and the server program where the
    encapsulated packets arrive; configure backends (server k = backend id k) and every VIP
    service port. forward: "redirect" (LB -> fabric, XDP_REDIRECT) or "tx" (back to the
    router, XDP_TX). Returns (and records in the lab state) what was attached."""
    from connpub import paths  # noqa: PLC0415 - bcc only where needed
    from connpub.datapath import lbctl, loader

    if forward not in ("redirect", "tx"):
        raise ConnpubError(f"forward must be redirect or tx, not {forward!r}")
    attached: dict = {"forward": forward, "lb": [], "server": []}
    server_iface = "fab" if forward == "redirect" else "eth0"
    for server in lab.servers:
        iface = server.ifaces[server_iface]
        loader.attach("server", iface.name, server.netns, "native")
        attached["server"].append({"node": server.name, "netns": server.netns,
                                   "iface": iface.name})
    for lb in lab.lbs:
        ingress = lab.lb_ingress(lb.name)
        loader.attach("lb", ingress.name, ingress.netns, "native")
        pin_dir = paths.pin_dir(ingress.name, ingress.netns)
        lbctl.init_lb_maps(pin_dir, **(lb_settings or {}))
        if forward == "redirect":
            lbctl.set_config(pin_dir, redirect_iface=lab.lb_fabric(lb.name).name,
                             netns=ingress.netns)
        else:
            lbctl.set_config(pin_dir, gateway_mac=lab.lb_gateway_mac(lb.name))
        for backend_id, backend in enumerate(lab.backends(), start=1):
            if forward == "redirect":
                lbctl.add_backend(pin_dir, backend_id, backend["ipv4"], mac=backend["mac"])
            else:
                lbctl.add_backend(pin_dir, backend_id, backend["routed_ipv4"])
        for vip in lab.vips4 + lab.vips6:
            for port in service_ports(lab, 6):
                lbctl.add_vip(pin_dir, vip, port, "tcp")
            for port in service_ports(lab, 17):
                lbctl.add_vip(pin_dir, vip, port, "udp")
        attached["lb"].append({"node": lb.name, "netns": ingress.netns, "iface": ingress.name,
                               "pin_dir": str(pin_dir)})
    lab.datapath = attached
    save_lab(lab)
    return attached
