"""All netlink use of connpub via pyroute2: netns, links, addresses, routes, sysctls, XDP, tc."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from pyroute2 import IPRoute, NetlinkError
from pyroute2 import netns as pr_netns
from pyroute2.netlink.rtnl.ifinfmsg import (
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_SKB_MODE,
    XDP_FLAGS_UPDATE_IF_NOEXIST,
)

from connpub.errors import ConnpubError

log = logging.getLogger(__name__)

NETNS_RUN_DIR = Path("/var/run/netns")
_ENTER_LOCK = threading.RLock()
XdpMode = Literal["auto", "native", "generic"]
_MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
# IFLA_XDP_ATTACHED values -> our mode names
_ATTACHED_MODE = {1: "native", 2: "generic", 3: "offload", 4: "multi"}


# ---------------------------------------------------------------------------------------------
# namespaces


def _where(netns: str | None) -> str:
    return f"netns {netns}" if netns else "the root netns"


def list_netns(prefix: str = "") -> list[str]:
    """Names of the named network namespaces (as `ip netns` sees them) starting with prefix."""
    try:
        names = pr_netns.listnetns()
    except FileNotFoundError:
        return []
    return sorted(name for name in names if name.startswith(prefix))


def netns_exists(name: str) -> bool:
    """True when a named network namespace `name` exists."""
    return (NETNS_RUN_DIR / name).exists()


def _require_netns(netns: str | None) -> None:
    if netns is not None and not netns_exists(netns):
        raise ConnpubError(f"no netns {netns}: create it first (e.g. `connpub lab up`)")


def create_netns(name: str) -> None:
    """Create a named network namespace with loopback up; refuses if it already exists."""
    if netns_exists(name):
        raise ConnpubError(f"netns {name} already exists: remove it first (`connpub lab down`)")
    pr_netns.create(name)
    with ipr_in(name) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def delete_netns(name: str) -> bool:
    """Delete a named network namespace (its veth ends go with it); False when it did not exist."""
    if not netns_exists(name):
        return False
    pr_netns.remove(name)
    return True


@contextlib.contextmanager
def ipr_in(netns: str | None) -> Iterator[IPRoute]:
    """An IPRoute socket in `netns` (None = root netns); the netns must exist."""
    _require_netns(netns)
    with IPRoute(netns=netns) if netns else IPRoute() as ipr:
        yield ipr


@contextlib.contextmanager
def entered(netns: str | None) -> Iterator[None]:
    """Run the body with the calling thread inside `netns` (pushns/popns); None = stay put.

    Use it when the kernel must resolve a file descriptor of this process (XDP/tc prog fds)
    or when a socket must be created inside the namespace. pyroute2 keeps one saved-netns
    stack per process, so bodies are serialised across threads (re-entrant in one thread).
    """
    if netns is None:
        yield
        return
    _require_netns(netns)
    with _ENTER_LOCK:
        pr_netns.pushns(netns)
        try:
            yield
        finally:
            pr_netns.popns()


# ---------------------------------------------------------------------------------------------
# links


def _link_msg(ipr: IPRoute, iface: str, netns: str | None):
    found = ipr.link("get", ifname=iface) if ipr.link_lookup(ifname=iface) else []
    if not found:
        raise ConnpubError(f"no interface {iface} in {_where(netns)}: check `connpub lab status`")
    return found[0]


def ifindex(iface: str, netns: str | None) -> int:
    """Interface index of `iface` inside `netns` (None = root netns)."""
    with ipr_in(netns) as ipr:
        return int(_link_msg(ipr, iface, netns)["index"])


def interface_exists(iface: str, netns: str | None) -> bool:
    """True when `iface` exists in `netns` (which must exist)."""
    with ipr_in(netns) as ipr:
        return bool(ipr.link_lookup(ifname=iface))


def list_interfaces(netns: str | None) -> list[str]:
    """Names of every interface in `netns`."""
    with ipr_in(netns) as ipr:
        return sorted(link.get_attr("IFLA_IFNAME") for link in ipr.link("dump"))


def mac_address(iface: str, netns: str | None) -> str:
    """MAC address of `iface` as 'aa:bb:cc:dd:ee:ff'."""
    with ipr_in(netns) as ipr:
        return str(_link_msg(ipr, iface, netns).get_attr("IFLA_ADDRESS"))


def create_veth(name: str, netns: str | None, peer: str, peer_netns: str | None,
                mtu: int = 1500) -> None:
    """Create veth pair name (in netns) <-> peer (in peer_netns), both up, with the given MTU.

    The pair is created inside `netns` with its peer placed straight into `peer_netns`, so
    nothing ever appears in the root netns and a deleted netns takes its ends with it.
    """
    _require_netns(peer_netns)
    for ifname in (name, peer):
        if len(ifname) > 15:
            raise ConnpubError(f"interface name {ifname} is longer than 15 characters: shorten it")
    peer_spec: dict = {"ifname": peer, "mtu": mtu}
    if peer_netns != netns:
        peer_spec["net_ns_fd"] = peer_netns if peer_netns else "/proc/1/ns/net"
    with ipr_in(netns) as ipr:
        try:
            ipr.link("add", ifname=name, kind="veth", mtu=mtu, peer=peer_spec)
        except NetlinkError as err:
            raise ConnpubError(f"cannot create veth {name}/{peer} in {_where(netns)}: "
                               f"{os.strerror(err.code)}") from err
    set_link_up(name, netns)
    set_link_up(peer, peer_netns)


def create_bridge(name: str, netns: str | None) -> None:
    """Create a Linux bridge `name` in netns, up, without STP (so ports forward at once)."""
    with ipr_in(netns) as ipr:
        ipr.link("add", ifname=name, kind="bridge", br_stp_state=0, br_forward_delay=0)
        ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")


def set_master(iface: str, netns: str | None, master: str) -> None:
    """Enslave `iface` to the bridge `master` (same netns)."""
    with ipr_in(netns) as ipr:
        master_index = int(_link_msg(ipr, master, netns)["index"])
        ipr.link("set", index=int(_link_msg(ipr, iface, netns)["index"]), master=master_index)


def set_link_up(iface: str, netns: str | None, mtu: int | None = None) -> None:
    """Bring `iface` up (and set its MTU when given)."""
    with ipr_in(netns) as ipr:
        index = int(_link_msg(ipr, iface, netns)["index"])
        if mtu is not None:
            ipr.link("set", index=index, mtu=mtu)
        ipr.link("set", index=index, state="up")


def set_tx_checksum(iface: str, netns: str | None, enabled: bool) -> None:
    """Turn TX checksum offload of iface on/off (`ethtool -K iface tx off`).

    Off on a veth that feeds a native XDP program which forwards frames: a veth hands over
    CHECKSUM_PARTIAL skbs whose L4 checksum is only the pseudo-header sum, and XDP_TX /
    XDP_REDIRECT turn them into frames without that state, so the receiver drops them.
    """
    from pyroute2.ethtool import Ethtool

    with entered(netns):
        ethtool = Ethtool()
        try:
            features = ethtool.get_features(iface)
            for name in ("tx-checksum-ip-generic", "tx-checksum-ipv4", "tx-checksum-ipv6"):
                if name in features.features:
                    features.features[name].enable = enabled
            ethtool.set_features(iface, features)
        finally:
            ethtool.close()


def delete_link(iface: str, netns: str | None) -> bool:
    """Delete `iface` (a veth takes its peer with it); False when it did not exist."""
    if netns is not None and not netns_exists(netns):
        return False
    with ipr_in(netns) as ipr:
        found = ipr.link_lookup(ifname=iface)
        if not found:
            return False
        ipr.link("del", index=found[0])
        return True


# ---------------------------------------------------------------------------------------------
# addresses, routes, neighbours, sysctls


def add_address(iface: str, netns: str | None, cidr: str) -> None:
    """Add address `cidr` (e.g. '10.0.0.1/24', 'fd00::1/64') to iface; IPv6 without DAD."""
    add_addresses(iface, netns, [cidr])


def add_addresses(iface: str, netns: str | None, cidrs: list[str]) -> None:
    """Add every address of `cidrs` to iface over one netlink socket; IPv6 without DAD."""
    with ipr_in(netns) as ipr:
        index = int(_link_msg(ipr, iface, netns)["index"])
        for cidr in cidrs:
            network = ipaddress.ip_interface(cidr)
            extra = {}
            if network.version == 6:
                extra["flags"] = 0x80  # IFA_F_NODAD: usable at once, no tentative state
            ipr.addr("add", index=index, address=str(network.ip),
                     prefixlen=network.network.prefixlen, **extra)


def addresses(iface: str, netns: str | None) -> list[str]:
    """Global addresses of iface as CIDR strings."""
    with ipr_in(netns) as ipr:
        index = int(_link_msg(ipr, iface, netns)["index"])
        result = []
        for msg in ipr.addr("dump", index=index):
            if msg["scope"] != 0:
                continue
            result.append(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
        return result


def add_route(netns: str | None, dst: str, via: str | list[str] | None = None,
              dev: str | None = None, onlink: bool = False, advmss: int | None = None,
              replace: bool = False) -> None:
    """Add a route to `dst` (CIDR or 'default') via a gateway, several (ECMP) or out of `dev`.

    advmss sets the MSS TCP advertises for connections using the route (room for IPIP).
    replace: replace an existing route to dst in one request (e.g. new ECMP next hops).
    """
    if dst == "default":
        dst = "::/0" if via and ":" in (via[0] if isinstance(via, list) else via) else "0.0.0.0/0"
    network = ipaddress.ip_network(dst, strict=False)
    with ipr_in(netns) as ipr:
        spec: dict = {"dst": str(network.network_address), "dst_len": network.prefixlen}
        if network.version == 6:
            spec["family"] = 10
        if dev is not None:
            spec["oif"] = int(_link_msg(ipr, dev, netns)["index"])
        if isinstance(via, list) and len(via) > 1:
            spec["multipath"] = [{"gateway": gw} for gw in via]
        elif via:
            spec["gateway"] = via[0] if isinstance(via, list) else via
        if onlink:
            spec["flags"] = 4  # RTNH_F_ONLINK
        if advmss is not None:
            spec["metrics"] = {"advmss": advmss}
        try:
            ipr.route("replace" if replace else "add", **spec)
        except NetlinkError as err:
            raise ConnpubError(f"cannot add route {dst} via {via} in {_where(netns)}: "
                               f"{os.strerror(err.code)}") from err


def routes(netns: str | None, family: int = 2) -> list[dict]:
    """Main-table unicast routes as dicts {dst, gateway, oif, multipath}."""
    with ipr_in(netns) as ipr:
        result = []
        for msg in ipr.route("dump", family=family, table=254):
            dst = msg.get_attr("RTA_DST")
            entry = {
                "dst": f"{dst}/{msg['dst_len']}" if dst else "default",
                "gateway": msg.get_attr("RTA_GATEWAY"),
                "oif": msg.get_attr("RTA_OIF"),
            }
            multipath = msg.get_attr("RTA_MULTIPATH")
            if multipath:
                entry["multipath"] = [hop.get_attr("RTA_GATEWAY") for hop in multipath]
            result.append(entry)
        return result


def add_neighbour(iface: str, netns: str | None, address: str, mac: str) -> None:
    """Add a permanent neighbour entry (address -> mac) on iface."""
    family = 10 if ipaddress.ip_address(address).version == 6 else 2
    with ipr_in(netns) as ipr:
        index = int(_link_msg(ipr, iface, netns)["index"])
        ipr.neigh("replace", dst=address, lladdr=mac, ifindex=index, state=0x80, family=family)


def sysctl_set(netns: str | None, key: str, value: str | int) -> None:
    """Write a net.* sysctl inside `netns` (e.g. 'net.ipv4.ip_forward', 1) via /proc/sys."""
    if not key.startswith("net."):
        raise ConnpubError(f"sysctl {key} is not per-netns: only net.* keys can be set here")
    path = Path("/proc/sys") / key.replace(".", "/")
    with entered(netns):
        try:
            path.write_text(f"{value}\n")
        except FileNotFoundError as err:
            raise ConnpubError(f"no sysctl {key} in {_where(netns)}: check the key") from err


def sysctl_get(netns: str | None, key: str) -> str:
    """Read a net.* sysctl inside `netns`."""
    with entered(netns):
        return (Path("/proc/sys") / key.replace(".", "/")).read_text().strip()


# ---------------------------------------------------------------------------------------------
# XDP


def _xdp_state(iface: str, netns: str | None) -> tuple[int | None, str | None]:
    with ipr_in(netns) as ipr:
        xdp = _link_msg(ipr, iface, netns).get_attr("IFLA_XDP")
    if xdp is None:
        return None, None
    attached = xdp.get_attr("IFLA_XDP_ATTACHED")
    names = {"xdp": 1, "xdpgeneric": 2, "xdpoffload": 3, "xdpmulti": 4}
    mode_number = names.get(attached, attached)
    if not mode_number:
        return None, None
    prog_id = xdp.get_attr("IFLA_XDP_PROG_ID")
    if prog_id is None:
        prog_id = xdp.get_attr("IFLA_XDP_DRV_PROG_ID") or xdp.get_attr("IFLA_XDP_SKB_PROG_ID")
    return (int(prog_id) if prog_id else None), _ATTACHED_MODE.get(int(mode_number), "unknown")


def xdp_prog_id(iface: str, netns: str | None) -> int | None:
    """Kernel id of the XDP program attached to iface, or None."""
    return _xdp_state(iface, netns)[0]


def xdp_mode(iface: str, netns: str | None) -> str | None:
    """'native', 'generic', ... for the attached XDP program, or None."""
    return _xdp_state(iface, netns)[1]


def _set_xdp(iface: str, netns: str | None, prog_fd: int, flags: int) -> None:
    # The prog fd is resolved by the kernel in the sender's fd table: enter the netns in this
    # very thread and use an in-process netlink socket (no forked netns proxy).
    with entered(netns), IPRoute() as ipr:
        index = ipr.link_lookup(ifname=iface)
        if not index:
            raise ConnpubError(f"no interface {iface} in {_where(netns)}: check the name")
        ipr.link("set", index=index[0],
                 xdp={"attrs": [("IFLA_XDP_FD", prog_fd), ("IFLA_XDP_FLAGS", flags)]})


def attach_xdp(iface: str, netns: str | None, prog_fd: int, mode: XdpMode = "auto",
               replace: bool = False) -> str:
    """Attach the XDP program `prog_fd` (an fd of this process) to iface; returns the mode used.

    auto tries native first, then generic. Refuses when a program is already attached, unless
    `replace`: then the attached program (which must be there) is swapped for the new one in
    one netlink request, in the mode it is attached in — the kernel exchanges the program
    pointer atomically, so no packet goes without a program.
    """
    if mode not in ("auto", "native", "generic"):
        raise ConnpubError(f"unknown XDP mode {mode}: use auto, native or generic")
    if replace:
        current, current_mode = _xdp_state(iface, netns)
        if current is None or current_mode not in _MODE_FLAGS:
            raise ConnpubError(f"no XDP program attached to {iface} in {_where(netns)} to "
                               "replace: attach without --replace")
        try:
            _set_xdp(iface, netns, prog_fd, _MODE_FLAGS[current_mode])
        except NetlinkError as err:
            raise ConnpubError(f"cannot replace the XDP program on {iface} in {_where(netns)}: "
                               f"{os.strerror(err.code)}") from err
        return current_mode
    current = xdp_prog_id(iface, netns)
    if current is not None:
        raise ConnpubError(
            f"an XDP program (id {current}) is already attached to {iface} in {_where(netns)}: "
            "detach it first (`connpub detach`)")
    tries = ["native", "generic"] if mode == "auto" else [mode]
    last_error: NetlinkError | None = None
    for attempt in tries:
        try:
            _set_xdp(iface, netns, prog_fd, _MODE_FLAGS[attempt] | XDP_FLAGS_UPDATE_IF_NOEXIST)
        except NetlinkError as err:
            if err.code == errno.EBUSY or err.code == errno.EEXIST:
                raise ConnpubError(
                    f"an XDP program is already attached to {iface} in {_where(netns)}: "
                    "detach it first (`connpub detach`)") from err
            log.debug("XDP %s attach on %s failed: %s", attempt, iface, err)
            last_error = err
            continue
        return attempt
    assert last_error is not None
    raise ConnpubError(f"cannot attach XDP to {iface} in {_where(netns)} in mode {mode}: "
                       f"{os.strerror(last_error.code)}")


def detach_xdp(iface: str, netns: str | None) -> bool:
    """Detach whatever XDP program is on iface; False when none was attached."""
    prog_id, mode = _xdp_state(iface, netns)
    if prog_id is None:
        return False
    flags = _MODE_FLAGS.get(mode or "", 0)
    _set_xdp(iface, netns, -1, flags)
    return True


# ---------------------------------------------------------------------------------------------
# tc: clsact bpf filters (lab decapsulation and loss) and netem

_CLSACT_PARENT = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}


def attach_tc(iface: str, netns: str | None, prog_fd: int, name: str,
              direction: Literal["ingress", "egress"] = "ingress") -> None:
    """Attach a SCHED_CLS program (fd of this process) as a direct-action clsact filter."""
    if direction not in _CLSACT_PARENT:
        raise ConnpubError(f"unknown tc direction {direction}: use ingress or egress")
    with entered(netns), IPRoute() as ipr:
        index = ipr.link_lookup(ifname=iface)
        if not index:
            raise ConnpubError(f"no interface {iface} in {_where(netns)}: check the name")
        with contextlib.suppress(NetlinkError):  # EEXIST: clsact already there
            ipr.tc("add", "clsact", index[0])
        ipr.tc("add-filter", "bpf", index[0], ":1", fd=prog_fd, name=name,
               parent=_CLSACT_PARENT[direction], classid=1, direct_action=True)


def tc_filters(iface: str, netns: str | None,
               direction: Literal["ingress", "egress"] = "ingress") -> list[str]:
    """Names of the bpf programs attached as clsact filters on iface in that direction."""
    with ipr_in(netns) as ipr:
        index = int(_link_msg(ipr, iface, netns)["index"])
        names = []
        for msg in ipr.get_filters(index=index, parent=_CLSACT_PARENT[direction]):
            options = msg.get_attr("TCA_OPTIONS")
            name = options.get_attr("TCA_BPF_NAME") if options is not None else None
            if name:
                names.append(str(name))
        return names


def detach_tc_filters(iface: str, netns: str | None,
                      direction: Literal["ingress", "egress"] = "egress") -> bool:
    """Remove every clsact filter of iface in one direction; False when there was none."""
    if not tc_filters(iface, netns, direction):
        return False
    with ipr_in(netns) as ipr:
        index = int(_link_msg(ipr, iface, netns)["index"])
        ipr.tc("del-filter", index=index, parent=_CLSACT_PARENT[direction])
        return True


def detach_tc(iface: str, netns: str | None) -> bool:
    """Remove the clsact qdisc of iface (and with it every clsact filter); False if none."""
    with ipr_in(netns) as ipr:
        index = int(_link_msg(ipr, iface, netns)["index"])
        try:
            ipr.tc("del", "clsact", index)
        except NetlinkError as err:
            if err.code in (errno.ENOENT, errno.EINVAL):
                return False
            raise
        return True


def set_netem(iface: str, netns: str | None, delay_ms: float = 0.0, loss_pct: float = 0.0) -> None:
    """Replace the root qdisc of iface with netem (delay, loss); ConnpubError if the kernel has
    no sch_netem (CONFIG_NET_SCH_NETEM)."""
    with ipr_in(netns) as ipr:
        index = int(_link_msg(ipr, iface, netns)["index"])
        try:
            ipr.tc("replace", "netem", index, handle="1:", delay=int(delay_ms * 1000),
                   loss=loss_pct)
        except NetlinkError as err:
            if err.code == errno.ENOENT:
                raise ConnpubError("this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM is not "
                                   "set): use a kernel with netem for delay") from err
            raise ConnpubError(f"cannot set netem on {iface} in {_where(netns)}: "
                               f"{os.strerror(err.code)}") from err


def clear_root_qdisc(iface: str, netns: str | None) -> bool:
    """Remove a root qdisc (netem) from iface; False when there was none."""
    with ipr_in(netns) as ipr:
        index = int(_link_msg(ipr, iface, netns)["index"])
        try:
            ipr.tc("del", index=index, handle="1:", root=True)
        except NetlinkError as err:
            if err.code in (errno.ENOENT, errno.EINVAL):
                return False
            raise
        return True


# ---------------------------------------------------------------------------------------------
# sockets (sock_diag)

TCP_ESTABLISHED = 1


def netns_inode(netns: str | None) -> int:
    """Inode number of `netns`'s namespace file (what the kernel calls `net->ns.inum`); None =
    the namespace of the calling thread."""
    if netns is None:
        return os.stat("/proc/thread-self/ns/net").st_ino
    _require_netns(netns)
    return os.stat(NETNS_RUN_DIR / netns).st_ino


# struct inet_diag_msg up to idiag_dst (include/uapi/linux/inet_diag.h): 40 bytes after the
# 16-byte nlmsghdr; ports and addresses in network order
DIAG_SOCKET_DTYPE = np.dtype([("family", "u1"), ("state", "u1"), ("timer", "u1"),
                              ("retrans", "u1"), ("sport", ">u2"), ("dport", ">u2"),
                              ("src", "u1", 16), ("dst", "u1", 16)])
_NLMSG_HDR = struct.Struct("=IHHII")
_INET_DIAG_REQ_V2 = struct.Struct("=BBBxI4x32sIQ")  # 56 bytes: struct inet_diag_req_v2
_SOCK_DIAG_BY_FAMILY, _NLMSG_ERROR, _NLMSG_DONE = 20, 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NETLINK_SOCK_DIAG = 4


def established_tcp_sockets(netns: str | None) -> np.ndarray:
    """Every ESTABLISHED TCP socket in `netns` (None = the caller's), IPv4 and IPv6, from a
    sock_diag dump: DIAG_SOCKET_DTYPE rows (src = local end, dst = remote end; an IPv4 socket's
    address in the first 4 bytes; an IPv6 socket accepting IPv4 has IPv4-mapped addresses).
    The replies are sliced with numpy: pyroute2's DiagSocket decodes ~2 600 sockets/s here,
    far too slow for a restart with 100k connections (docs/agents.md, "Liveness")."""
    import socket  # noqa: PLC0415

    with entered(netns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG)
    rows: list[bytes] = []
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        for sequence, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            request = _INET_DIAG_REQ_V2.pack(family, socket.IPPROTO_TCP, 0,
                                             1 << TCP_ESTABLISHED, b"", 0, 0)
            header = _NLMSG_HDR.pack(_NLMSG_HDR.size + len(request), _SOCK_DIAG_BY_FAMILY,
                                     _NLM_F_REQUEST | _NLM_F_DUMP, sequence, 0)
            sock.send(header + request)
            done = False
            while not done:
                data = sock.recv(1 << 20)
                offset = 0
                while offset + _NLMSG_HDR.size <= len(data):
                    length, kind, _, seq, _ = _NLMSG_HDR.unpack_from(data, offset)
                    if length < _NLMSG_HDR.size:
                        break
                    if kind == _NLMSG_DONE and seq == sequence:
                        done = True
                    elif kind == _NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, offset + _NLMSG_HDR.size)[0]
                        if code:
                            raise OSError(code, os.strerror(code))
                    elif kind == _SOCK_DIAG_BY_FAMILY and seq == sequence:
                        start = offset + _NLMSG_HDR.size
                        rows.append(data[start:start + DIAG_SOCKET_DTYPE.itemsize])
                    offset += (length + 3) & ~3
    except OSError as err:
        raise ConnpubError(f"cannot dump the TCP sockets of {_where(netns)} (sock_diag): "
                           f"{err.strerror}") from err
    finally:
        sock.close()
    found = np.frombuffer(b"".join(rows), DIAG_SOCKET_DTYPE)
    return found[found["state"] == TCP_ESTABLISHED]
