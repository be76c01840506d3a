"""Tearing a lab down: its namespaces, the processes in them, pins, state and logs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

from connpub.datapath import netlink
from connpub.errors import ConnpubError
from connpub.lab.state import DEFAULT_PREFIX, _check_prefix, load_lab, log_dir, state_path
from connpub.paths import PIN_ROOT, RUN_ROOT

# tearing down


def _netns_inode(name: str) -> int | None:
    try:
        return os.stat(netlink.NETNS_RUN_DIR / name).st_ino
    except FileNotFoundError:
        return None


def pids_in_netns(names: list[str]) -> list[int]:
    """Pids of processes whose network namespace is one of the named ones."""
    inodes = {ino for ino in map(_netns_inode, names) if ino is not None}
    if not inodes:
        return []
    self_pid = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == self_pid:
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                pids.append(int(entry))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return pids


def _kill(pids: list[int], timeout_s: float = 3.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _alive(pid)]
        if alive:
            time.sleep(0.02)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    # reap our own children so they do not linger as zombies
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def down(prefix: str = DEFAULT_PREFIX) -> dict:
    """Remove every namespace named '<prefix>-*', the processes in them, state and logs.

    Works from the namespace list, not only the state file, so a lab that crashed half-way
    through `up` is removed too. Returns what was removed.
    """
    _check_prefix(prefix)
    names = netlink.list_netns(f"{prefix}-")
    pids = set(pids_in_netns(names))
    with contextlib.suppress(ConnpubError, json.JSONDecodeError, TypeError, KeyError):
        pids.update(pid for pid in load_lab(prefix).pids.values() if _is_lab_process(pid, names))
    _kill(sorted(pids))
    for name in names:
        netlink.delete_netns(name)
    _remove_attachments(names + [n for n in leftover_nodes() if node_prefix(n) == prefix])
    run_folder = RUN_ROOT / f"labrun-{prefix}"
    if run_folder.is_dir() and not run_alive(run_folder):
        shutil.rmtree(run_folder, ignore_errors=True)
    from connpub.agents.common import remove_statuses_of_netns  # noqa: PLC0415
    from connpub.datapath.lbsaved import forget_netns  # noqa: PLC0415

    remove_statuses_of_netns(names, prefix)
    forget_netns(names)
    state = state_path(prefix)
    with contextlib.suppress(FileNotFoundError):
        state.unlink()
    shutil.rmtree(log_dir(prefix), ignore_errors=True)
    return {"prefix": prefix, "netns": names, "pids": sorted(pids)}


def _remove_attachments(names: list[str]) -> None:
    """Pins and attachment records of the XDP programs that lived in these namespaces (the
    programs went with their interfaces)."""
    for name in names:
        shutil.rmtree(PIN_ROOT / name, ignore_errors=True)
        shutil.rmtree(RUN_ROOT / "attachments" / name, ignore_errors=True)
    for folder in (PIN_ROOT, RUN_ROOT / "attachments"):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def _is_lab_process(pid: int, names: list[str]) -> bool:
    """A recorded pid is only killed if it still runs the lab services (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    return b"connpub-echod" in cmdline  # the echo server (connpub.traffic.native)


# a lab node's namespace: '<prefix>-<node>' (topology.plan)
_NODE = re.compile(r"^(?P<prefix>[A-Za-z0-9-]{1,8})-(router|fabric|client\d+|lb\d+|srv\d+)$")
# `lab run` writes its pid and start time here (run_alive); older versions wrote none
RUN_PID_FILE = "pid"
LEGACY_RUN_IDLE_S = 300.0


def node_prefix(name: str) -> str | None:
    """The lab prefix of a node namespace name, None if it is not one."""
    match = _NODE.match(name)
    return match["prefix"] if match else None


def leftover_nodes() -> list[str]:
    """Lab node names with pins (under the pin root) or attachment records (RUN_ROOT /
    attachments) whose namespace no longer exists: the remains of a lab deleted by hand or of a
    crashed run. A namespace that exists keeps its pins and records."""
    present = set(netlink.list_netns())
    names = set()
    for folder in (PIN_ROOT, RUN_ROOT / "attachments"):
        with contextlib.suppress(OSError):
            names.update(entry.name for entry in folder.iterdir() if entry.is_dir())
    return sorted(n for n in names if node_prefix(n) and n not in present)


def process_start(pid: int) -> int | None:
    """The start time of a running (not zombie) process in clock ticks since boot, or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def write_run_pid(folder: Path) -> None:
    """Mark a `lab run` folder as this process's (run_alive)."""
    pid = os.getpid()
    (folder / RUN_PID_FILE).write_text(f"{pid} {process_start(pid)}\n")


def run_alive(folder: Path, now: float | None = None) -> bool:
    """True while the `lab run` that owns a RUN_ROOT/labrun-<prefix> folder may still run: its
    recorded process (same pid and start time) is alive, or, for a folder without a pid file
    (older versions), its lab's namespaces exist or a file in it changed in the last
    LEGACY_RUN_IDLE_S seconds."""
    try:
        pid, start = (int(v) for v in (folder / RUN_PID_FILE).read_text().split())
    except FileNotFoundError:
        prefix = folder.name[len("labrun-"):]
        if netlink.list_netns(f"{prefix}-"):
            return True
        newest = max((p.stat().st_mtime for p in [folder, *folder.iterdir()]), default=0.0)
        return (time.time() if now is None else now) - newest < LEGACY_RUN_IDLE_S
    except (OSError, ValueError):
        return False  # an unreadable pid file: nothing to wait for
    return process_start(pid) == start


def all_prefixes() -> list[str]:
    """Prefixes of every lab found by state file, by a '<prefix>-router' netns, or by remains
    of one that is gone: a `lab run` folder whose process ended, pins or attachment records of
    node namespaces that no longer exist."""
    found = {path.name[4:-5] for path in RUN_ROOT.glob("lab-*.json")}
    found.update(name[: -len("-router")] for name in netlink.list_netns()
                 if name.endswith("-router"))
    found.update(path.name[len("labrun-"):] for path in RUN_ROOT.glob("labrun-*")
                 if path.is_dir() and not run_alive(path))
    found.update(p for p in map(node_prefix, leftover_nodes()) if p)
    return sorted(p for p in found if _valid_prefix(p))


def _valid_prefix(prefix: str) -> bool:
    try:
        _check_prefix(prefix)
    except ConnpubError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
