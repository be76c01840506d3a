"""The lab's state: the Lab/Node/Iface dataclasses, its constants, and the state file."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from connpub.errors import ConnpubError
from connpub.paths import RUN_ROOT

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


EXTRA_TCP_PORTS = (443, 873, 8443)
EXTRA_UDP_PORTS = (443, 5004, 5006)


def service_ports(lab: Lab, proto: int) -> list[int]:
    """Every port the lab's echo servers listen on for proto (6 or 17), the main one first."""
    if proto == 6:
        return [lab.tcp_port, *(p for p in EXTRA_TCP_PORTS if p != lab.tcp_port)]
    return [lab.udp_port, *(p for p in EXTRA_UDP_PORTS if p != lab.udp_port)]
