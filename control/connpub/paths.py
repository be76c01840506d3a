"""Where connpub keeps things on the host: bpffs pins, run-time state, the bpf/ and native/
sources."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

BPFFS = Path(os.environ.get("CONNPUB_BPFFS", "/sys/fs/bpf"))
PIN_ROOT = BPFFS / "connpub"
RUN_ROOT = Path(os.environ.get("CONNPUB_RUN_DIR", "/run/connpub"))
REPO_ROOT = Path(__file__).resolve().parents[2]
BPF_DIR = Path(os.environ.get("CONNPUB_BPF_DIR", REPO_ROOT / "bpf"))
NATIVE_DIR = REPO_ROOT / "native"  # the lab's C load generator and echo server (traffic.native)


def attachment_name(iface: str, netns: str | None) -> str:
    """Stable name of one attachment: '<netns or root>/<iface>'."""
    return f"{netns or 'root'}/{iface}"


def pin_dir(iface: str, netns: str | None) -> Path:
    """bpffs folder holding every map (and the program) of one attachment."""
    return PIN_ROOT / (netns or "root") / iface


def build_record(pin_dir: str | Path) -> Path:
    """Run-time file recording which build of the TCP-state program is pinned under pin_dir
    (datapath.tcpstate writes it; the loader removes it with the pins)."""
    name = hashlib.sha256(str(pin_dir).encode()).hexdigest()[:16]
    return RUN_ROOT / "tcpstate" / f"{name}.json"
