"""The pinned maps of an LB-node attachment (bpf/lb/lb_maps.h) as numpy tables, their flags and
the writers' lock; shared by connpub.datapath.lbctl (VIPs, backends, config) and
connpub.datapath.lbleases (the LB agent's lease writes and reads)."""

from __future__ import annotations

import contextlib
import fcntl
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
