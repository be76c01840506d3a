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
    EXTRA_TCP_PORTS,
    EXTRA_UDP_PORTS,
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
    service_ports,
    state_path,
)
from connpub.lab.teardown import (  # noqa: F401 (re-exported)
    _alive,
    _kill,
    all_prefixes,
    down,
    pids_in_netns,
    run_alive,
    write_run_pid,
)
from connpub.lab.wiring import (  # noqa: F401 (re-exported)
    CLIENT_SYSCTLS,
    SERVER_SYSCTLS,
    _client_net,
    _fabric_addr,
    _gw,
    _iface,
    _lb_net,
    _link,
    _route_lb_node,
    _server_net,
    configure_routing,
    create_links,
    create_namespaces,
)
from connpub.paths import BPF_DIR
from connpub.traffic import native


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


def start_services(lab: Lab) -> None:
    directory = log_dir(lab.prefix)
    directory.mkdir(parents=True, exist_ok=True)
    echod = str(native.binary("echod"))  # native/echod.c: one epoll thread per server
    for server in lab.servers:
        lab.pids[server.name] = spawn_in_netns(
            server.netns,
            [echod, "--name", server.name, "--nice", str(native.LAB_NICE),
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
