"""Tearing a lab down: its namespaces, the processes in them, pins, state and logs."""

from __future__ import annotations

import contextlib
import json
import os
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
    _remove_attachments(names)
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


def all_prefixes() -> list[str]:
    """Prefixes of every lab found by state file or by a '<prefix>-router' netns."""
    found = {path.name[4:-5] for path in RUN_ROOT.glob("lab-*.json")}
    found.update(name[: -len("-router")] for name in netlink.list_netns()
                 if name.endswith("-router"))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
