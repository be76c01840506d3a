"""The operator's configuration of an LB attachment (VIPs, backends, settings) saved in the run
folder, so that a detach followed by a new attach brings it back: saved by every `connpub lb`
change and by `connpub detach`, restored by `connpub attach --role lb` (docs/operations.md).
Connections and leases are not saved: the servers republish them (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from connpub import paths
from connpub.datapath import lbctl, netlink
from connpub.datapath.abi import U32_DTYPE

SAVED_DIR = "lbconfig"
SETTINGS = ("lb_addr4", "lb_addr6", "src_mac", "gateway_mac", "mtu", "initial_lease_s",
            "close_linger_s")
NO_MAC = "00:00:00:00:00:00"


def saved_path(iface: str, netns: str | None) -> Path:
    """/run/connpub/lbconfig/<netns or root>/<iface>.json"""
    return paths.RUN_ROOT / SAVED_DIR / (netns or "root") / f"{iface}.json"


def _redirect_iface(pin_dir: Path, netns: str | None) -> str:
    """The interface the program redirects to ('' = XDP_TX), by the devmap's ifindex."""
    with lbctl.open_map(pin_dir, "tx_port") as tx_port:
        ifindex = tx_port.lookup(np.array(0, U32_DTYPE))
    if ifindex is None or int(ifindex) == 0:
        return ""
    for name in netlink.list_interfaces(netns):
        if netlink.ifindex(name, netns) == int(ifindex):
            return name
    return ""


def snapshot(pin_dir: Path, netns: str | None) -> dict:
    """VIPs, backends and settings of an attached LB program, as plain data."""
    pin_dir = Path(pin_dir)
    config = lbctl.config_dict(lbctl.read_config(pin_dir))
    settings = {name: config[name] for name in SETTINGS}
    settings["redirect_iface"] = _redirect_iface(pin_dir, netns) \
        if config["forward"] == "redirect" else ""
    vips = [{"address": row["vip"], "port": row["port"], "proto": row["proto"],
             "service": row["service"], "flags": row["flags"], "level": row["level"]}
            for row in lbctl.list_vips(pin_dir)]
    backends = [{"id": row["id"], "address": row["address"], "services": row["services"],
                 "mac": None if row["mac"] == NO_MAC else row["mac"],
                 "draining": row["draining"]}
                for row in lbctl.list_backends(pin_dir)]
    return {"settings": settings, "vips": vips, "backends": backends}


def save(iface: str, netns: str | None) -> Path:
    """Write the attachment's configuration (atomically) to saved_path."""
    pin_dir = paths.pin_dir(iface, netns)
    target = saved_path(iface, netns)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(snapshot(pin_dir, netns), indent=1))
    tmp.replace(target)
    return target


def restore(iface: str, netns: str | None) -> dict | None:
    """Apply the saved configuration to a freshly attached LB program (settings, backends,
    draining, VIPs); None when nothing was saved for this interface."""
    source = saved_path(iface, netns)
    if not source.exists():
        return None
    saved = json.loads(source.read_text())
    pin_dir = paths.pin_dir(iface, netns)
    settings = dict(saved["settings"])
    redirect = settings.pop("redirect_iface", "")
    if redirect and netlink.interface_exists(redirect, netns):
        settings["redirect_iface"] = redirect
    lbctl.set_config(pin_dir, netns=netns, **settings)
    for backend in saved["backends"]:
        lbctl.add_backend(pin_dir, backend["id"], backend["address"], backend["services"],
                          backend["mac"])
        if backend["draining"]:
            lbctl.drain_backend(pin_dir, backend["id"], True)
    for vip in saved["vips"]:
        lbctl.add_vip(pin_dir, vip["address"], vip["port"], vip["proto"], vip["service"],
                      vip["flags"], vip["level"])
    return saved


def forget_netns(names: list[str]) -> None:
    """Drop what was saved for attachments in these namespaces (they are gone: `lab down`)."""
    for name in names:
        shutil.rmtree(paths.RUN_ROOT / SAVED_DIR / name, ignore_errors=True)
    folder = paths.RUN_ROOT / SAVED_DIR
    if folder.exists() and not any(folder.iterdir()):
        folder.rmdir()
