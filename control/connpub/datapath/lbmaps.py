"""The pinned maps of an LB-node attachment (bpf/lb/lb_maps.h) as numpy tables, their flags, the
writers' lock and the address / MAC / protocol / VIP key codecs; shared by
connpub.datapath.lbctl (VIPs, backends), lbconfig (settings) and lbleases (the LB agent's lease
writes and reads)."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from connpub.datapath.abi import (  # noqa: F401 - the flags, re-exported for lbctl users
    AGG_OWN_ENTRY,
    BACKEND_F_DRAINING,
    BACKEND_F_PRESENT,
    CLASS_KEY_DTYPE,
    CONN_F_CLIENT_CLOSED,
    FLOW_KEY_DTYPE,
    MAP_LAYOUTS,
    U32_DTYPE,
)
from connpub.datapath.maps import PinnedMap
from connpub.datapath.pinned import open_pinned
from connpub.errors import ConnpubError

PROTOCOLS = {"tcp": 6, "udp": 17}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}

# abi.MAP_LAYOUTS['lb'] plus the devmap, left out there: devmaps cannot be read in batches
LAYOUTS = {**MAP_LAYOUTS["lb"], "tx_port": (U32_DTYPE, U32_DTYPE)}


def open_map(pin_dir: Path, name: str) -> PinnedMap:
    """A pinned map of an LB attachment, with the dtypes of LAYOUTS (datapath.pinned)."""
    return open_pinned(pin_dir, "lb", name, LAYOUTS)


@contextlib.contextmanager
def locked(pin_dir: Path) -> Iterator[None]:
    """Serialise writers of one attachment (CLI and LB agent): flock on the pin folder."""
    fd = os.open(pin_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_holds_flows(pin_dir: Path, keys: np.ndarray, values: np.ndarray,
                      rows: np.ndarray) -> int:
    """Set holds_flows of these rows of read_vips' (keys, values) where it is not set yet (the
    caller holds `locked`). Returns how many VIPs it set."""
    rows = rows[values["holds_flows"][rows] == 0]
    if len(rows):
        values["holds_flows"][rows] = 1
        with open_map(pin_dir, "vips") as vip_map:
            vip_map.update_batch(keys[rows], values[rows])
    return len(rows)


def read_vips(pin_dir: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(class keys, LB_VIP_META_DTYPE values, capacity) of the VIP table."""
    with open_map(pin_dir, "vips") as vip_map:
        keys, values = vip_map.items()
        return keys, values, vip_map.max_entries


def class_keys_of(flow_keys: np.ndarray) -> np.ndarray:
    """The traffic class (vip, vip port, proto) of each flow key."""
    flow_keys = np.asarray(flow_keys, FLOW_KEY_DTYPE).reshape(-1)
    classes = np.zeros(len(flow_keys), CLASS_KEY_DTYPE)
    for name in ("vip_addr", "vip_port", "proto"):
        classes[name] = flow_keys[name]
    return classes


def address_bytes(address: str) -> tuple[np.ndarray, bool]:
    """16 bytes (IPv4 as ::ffff:a.b.c.d, as in struct flow_key) and is_v6."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError as err:
        raise ConnpubError(f"bad IP address {address!r}: use e.g. 10.200.0.1 or fd00::1") from err
    if ip.version == 4:
        return np.frombuffer(ipaddress.IPv6Address(f"::ffff:{ip}").packed, np.uint8).copy(), False
    return np.frombuffer(ip.packed, np.uint8).copy(), True


def address_text(addr16: np.ndarray) -> str:
    ip = ipaddress.IPv6Address(bytes(np.asarray(addr16, np.uint8)))
    return str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ip)


def mac_bytes(mac: str | None) -> np.ndarray:
    if not mac:
        return np.zeros(6, np.uint8)
    parts = mac.split(":")
    try:
        if len(parts) != 6:
            raise ValueError
        return np.array([int(p, 16) for p in parts], np.uint8)
    except ValueError as err:
        raise ConnpubError(f"bad MAC address {mac!r}: use aa:bb:cc:dd:ee:ff") from err


def mac_text(mac: np.ndarray) -> str:
    return ":".join(f"{int(b):02x}" for b in mac)


def protocol_number(proto: str | int) -> int:
    if isinstance(proto, int) or str(proto).isdigit():
        number = int(proto)
        if number in PROTOCOL_NAMES:
            return number
    elif str(proto).lower() in PROTOCOLS:
        return PROTOCOLS[str(proto).lower()]
    raise ConnpubError(f"bad protocol {proto!r}: use tcp or udp")


def vip_key(address: str, port: int, proto: str | int) -> np.ndarray:
    """The CLASS_KEY_DTYPE key of a VIP (address, port, protocol)."""
    if not 0 < int(port) < 65536:
        raise ConnpubError(f"bad port {port}: use 1..65535")
    key = np.zeros(1, CLASS_KEY_DTYPE)
    key["vip_addr"] = address_bytes(address)[0]
    key["vip_port"] = int(port)
    key["proto"] = protocol_number(proto)
    return key
