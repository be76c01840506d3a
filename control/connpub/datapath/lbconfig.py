"""The LB program's settings: the config singleton (outer sources, MACs, MTU, initial lease,
close linger, XDP_TX or XDP_REDIRECT) and the attach-time set-up of masks and config
(bpf/lb/lb_structs.h struct lb_config). Re-exported by connpub.datapath.lbctl."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import numpy as np

from connpub import paths
from connpub.datapath import masks, netlink
from connpub.datapath.abi import LB_CONFIG_DTYPE, U32_DTYPE
from connpub.datapath.lbmaps import address_bytes, mac_bytes, mac_text, open_map
from connpub.errors import ConnpubError

DEFAULT_INITIAL_LEASE_S = 3.0
DEFAULT_CLOSE_LINGER_S = 3.0  # lease left after the client's FIN/RST (k*T of the defaults)
DEFAULT_MTU = 1500


def read_config(pin_dir: Path) -> np.ndarray:
    with open_map(pin_dir, "config") as cfg_map:
        return cfg_map.lookup(np.array(0, U32_DTYPE))


def config_dict(cfg: np.ndarray) -> dict:
    return {
        "lb_addr4": str(ipaddress.IPv4Address(bytes(cfg["lb_addr4"]))),
        "lb_addr6": str(ipaddress.IPv6Address(bytes(cfg["lb_addr6"]))),
        "mtu": int(cfg["mtu"]),
        "initial_lease_s": int(cfg["initial_lease_ns"]) / 1e9,
        "close_linger_s": int(cfg["close_linger_ns"]) / 1e9,
        "src_mac": mac_text(cfg["src_mac"]),
        "gateway_mac": mac_text(cfg["gateway_mac"]),
        "forward": "redirect" if int(cfg["use_redirect"]) else "tx",
    }


def set_config(pin_dir: Path, *, lb_addr4: str | None = None, lb_addr6: str | None = None,
               src_mac: str | None = None, gateway_mac: str | None = None, mtu: int | None = None,
               initial_lease_s: float | None = None, close_linger_s: float | None = None,
               redirect_iface: str | None = None,
               netns: str | None = None) -> dict:
    """Change some settings of the LB program; the others keep their value. redirect_iface:
    forward with XDP_REDIRECT out of that interface (in `netns`); its MAC and addresses become
    the source MAC and outer sources unless given. '' = back to XDP_TX."""
    cfg = np.asarray(read_config(pin_dir)).reshape(1).copy()
    if redirect_iface:
        src_mac = src_mac if src_mac is not None else netlink.mac_address(redirect_iface, netns)
        if lb_addr4 is None:
            lb_addr4 = _first_address(redirect_iface, netns, 4)
        if lb_addr6 is None:
            lb_addr6 = _first_address(redirect_iface, netns, 6)
    if lb_addr4 is not None:
        addr, is_v6 = address_bytes(lb_addr4)
        if is_v6:
            raise ConnpubError(f"--lb-addr4 {lb_addr4} is not an IPv4 address")
        cfg["lb_addr4"] = addr[12:]
    if lb_addr6 is not None:
        addr, is_v6 = address_bytes(lb_addr6)
        if not is_v6:
            raise ConnpubError(f"--lb-addr6 {lb_addr6} is not an IPv6 address")
        cfg["lb_addr6"] = addr
    if src_mac is not None:
        cfg["src_mac"] = mac_bytes(src_mac)
    if gateway_mac is not None:
        cfg["gateway_mac"] = mac_bytes(gateway_mac)
    if mtu is not None:
        if not 68 <= mtu <= 65535:
            raise ConnpubError(f"bad MTU {mtu}: use 68..65535")
        cfg["mtu"] = mtu
    if initial_lease_s is not None:
        if not 0 < initial_lease_s <= 86400:
            raise ConnpubError(f"bad initial lease {initial_lease_s}s: use (0, 86400]")
        cfg["initial_lease_ns"] = int(initial_lease_s * 1e9)
    if close_linger_s is not None:
        if not 0 < close_linger_s <= 3600:
            raise ConnpubError(f"bad close linger {close_linger_s}s: use (0, 3600]")
        cfg["close_linger_ns"] = int(close_linger_s * 1e9)
    if redirect_iface is not None:
        if redirect_iface:
            ifindex = netlink.ifindex(redirect_iface, netns)
            # a devmap resolves the ifindex in the writer's netns: write it from inside netns
            with netlink.entered(netns), open_map(pin_dir, "tx_port") as tx_port:
                tx_port.update(np.array(0, U32_DTYPE), np.array(ifindex, U32_DTYPE))
            cfg["use_redirect"] = 1
        else:
            cfg["use_redirect"] = 0
    with open_map(pin_dir, "config") as cfg_map:
        cfg_map.update(np.array(0, U32_DTYPE), cfg)
    return config_dict(cfg[0])


def _first_address(iface: str, netns: str | None, version: int) -> str | None:
    for cidr in netlink.addresses(iface, netns):
        ip = ipaddress.ip_interface(cidr).ip
        if ip.version == version and not ip.is_link_local:
            return str(ip)
    return None


def init_lb_maps(pin_dir: Path, iface: str | None = None, netns: str | None = None,
                 mask_rows: np.ndarray | None = None, **settings) -> dict:
    """Attach-time set-up: the masks and the config singleton. Without explicit settings the
    outer source addresses and source MAC are those of `iface` (in `netns`; by default the
    interface of the attachment whose pin folder this is), the MTU 1500 and the initial lease
    3 s; `settings` are set_config's keywords. Returns the config."""
    pin_dir = Path(pin_dir)
    if iface is None and pin_dir.parent.parent == paths.PIN_ROOT and \
            pin_dir.parent.name != "scratch":
        # an attachment's folder is PIN_ROOT/<netns or root>/<iface>: take the interface from it
        iface = pin_dir.name
        netns = None if pin_dir.parent.name == "root" else pin_dir.parent.name
    rows = masks.mask_table() if mask_rows is None else mask_rows
    with open_map(pin_dir, "masks") as mask_map:
        mask_map.update_batch(np.arange(len(rows), dtype=U32_DTYPE), rows)
    defaults: dict = {"mtu": DEFAULT_MTU, "initial_lease_s": DEFAULT_INITIAL_LEASE_S,
                      "close_linger_s": DEFAULT_CLOSE_LINGER_S}
    if iface is not None:
        defaults["src_mac"] = netlink.mac_address(iface, netns)
        defaults["lb_addr4"] = _first_address(iface, netns, 4)
        defaults["lb_addr6"] = _first_address(iface, netns, 6)
    defaults.update(settings)
    with open_map(pin_dir, "config") as cfg_map:
        cfg_map.update(np.array(0, U32_DTYPE), np.zeros(1, LB_CONFIG_DTYPE))
    return set_config(pin_dir, netns=netns, **defaults)


__all__ = ["config_dict", "init_lb_maps", "read_config", "set_config"]
