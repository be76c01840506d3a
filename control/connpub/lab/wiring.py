"""The lab's wiring (docs/lab.md): the addressing plan, namespaces, veth links and routes of a
planned Lab; shared by the topology (up) and membership changes (add an LB node)."""

from __future__ import annotations

from connpub.datapath import netlink
from connpub.lab.state import ADVMSS4, ADVMSS6, MTU, Iface, Lab, Node

# Connection scale (docs/lab.md, "Scale"): accept bursts of connects without dropping SYNs.
SERVER_SYSCTLS = {"net.core.somaxconn": 8192, "net.ipv4.tcp_max_syn_backlog": 16384}
CLIENT_SYSCTLS = {"net.ipv4.ip_local_port_range": "1024 65535"}

# addressing plan (identical in every lab: namespaces keep labs apart)


def _client_net(i: int) -> tuple[str, str, str, str]:
    """(client v4, router v4, client v6, router v6) on the client<i> link."""
    return (f"10.100.{i}.2/24", f"10.100.{i}.1/24",
            f"fd00:100:{i}::2/64", f"fd00:100:{i}::1/64")


def client_source_nets(i: int) -> tuple[str, str]:
    """(IPv4, IPv6) block client<i> sends a trace's client addresses from (lab.run.lab_sources):
    256 subnets each, a client /24 (IPv4) or /56 (IPv6) of the trace per subnet."""
    return f"100.{64 + i}.0.0/16", f"fd00:300:{i:x}::/48"


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
    # router: each client's source block -> that client
    for i, client in enumerate(lab.clients, start=1):
        eth0 = client.ifaces["eth0"]
        for block, via in zip(client_source_nets(i), (eth0.ip4, eth0.ip6), strict=True):
            netlink.add_route(router.netns, block, via=via)
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
