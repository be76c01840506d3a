"""Membership changes of a running lab: add an LB node, point the VIP routes at LB nodes."""

from __future__ import annotations

import contextlib

from connpub.datapath import netlink
from connpub.errors import ConnpubError
from connpub.lab import wiring as _topology
from connpub.lab.state import MAX_NODES, Node, load_lab, save_lab
from connpub.paths import BPF_DIR

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
        l4, r4, l6, r6 = _topology._lb_net(j)
        _topology._link(node, "eth0", lab.router, f"l{j}", (l4, l6), (r4, r6))
        netlink.set_tx_checksum(f"l{j}", lab.router.netns, enabled=False)
        fabric = lab.nodes["fabric"]
        _topology._link(node, "fab", fabric, f"l{j}", _topology._fabric_addr("lb", j))
        netlink.set_master(f"l{j}", fabric.netns, "br0")
        _topology._route_lb_node(lab, node)
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
