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
import sys
import time

from connpub.datapath import netlink
from connpub.errors import ConnpubError
from connpub.lab.processes import (  # noqa: F401 (re-exported)
    _child_env,
    _enter_in_child,
    run_in_netns,
    spawn_in_netns,
    wait_tcp_listening,
)
from connpub.lab.state import (  # noqa: F401 (re-exported: the lab's model lives there)
    ADVMSS4,
    ADVMSS6,
    DEFAULT_PREFIX,
    MAX_NODES,
    MAX_VIPS,
    MTU,
    TCP_PORT,
    UDP_PORT,
    VIP4,
    VIP6,
    Iface,
    Lab,
    Node,
    _check_prefix,
    load_lab,
    log_dir,
    save_lab,
    state_path,
)
from connpub.lab.teardown import (  # noqa: F401 (re-exported)
    _alive,
    _kill,
    all_prefixes,
    down,
    pids_in_netns,
)
from connpub.paths import BPF_DIR

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
        for key, value in CLIENT_SYSCTLS.items():
            netlink.sysctl_set(client.netns, key, value)
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
        for key, value in SERVER_SYSCTLS.items():  # tens of thousands of connections
            netlink.sysctl_set(server.netns, key, value)
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


# Connection scale (docs/lab.md, "Scale"): accept bursts of connects without dropping SYNs.
SERVER_SYSCTLS = {"net.core.somaxconn": 8192, "net.ipv4.tcp_max_syn_backlog": 16384}
CLIENT_SYSCTLS = {"net.ipv4.ip_local_port_range": "1024 65535"}

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


# Re-exported so `from connpub.lab import topology as labmod; labmod.impair(...)` keeps working;
# these modules import this one.
from connpub.lab.attach import attach_datapath  # noqa: E402,F401
from connpub.lab.impair import impair  # noqa: E402,F401
from connpub.lab.membership import add_lb, set_vip_next_hops  # noqa: E402,F401
