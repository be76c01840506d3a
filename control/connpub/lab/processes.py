"""Processes inside lab namespaces: spawn, run, and wait for a listening service."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path

from connpub.datapath import netlink
from connpub.errors import ConnpubError
from connpub.lab.state import log_dir


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def _enter_in_child(netns: str):
    from pyroute2 import netns as pr_netns

    netlink._require_netns(netns)
    return lambda: pr_netns.setns(netns, flags=0, fork=False)


def set_session_nice(nice: int) -> None:
    """This process's nice, and its session's autogroup's (with kernel.sched_autogroup_enabled
    a nice only counts inside its session): as native/echod.c's set_nice. Failures are
    ignored (no autogroups, or not root)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as autogroup:
        autogroup.write(str(nice))


def spawn_in_netns(netns: str, argv: list[str], log_path: Path) -> int:
    """Start argv inside netns (own session, output to log_path); returns its pid."""
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True, env=_child_env(), preexec_fn=_enter_in_child(netns))
    return proc.pid


def run_in_netns(netns: str, argv: list[str], timeout_s: float | None = None
                 ) -> subprocess.CompletedProcess:
    """Run argv inside netns to completion, capturing text output."""
    return subprocess.run(argv, capture_output=True, text=True, env=_child_env(),
                          preexec_fn=_enter_in_child(netns), timeout=timeout_s)


def wait_tcp_listening(netns: str, host: str, port: int, deadline: float) -> None:
    """Poll until a TCP connect to host:port inside netns succeeds, or raise at the deadline."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with netlink.entered(netns):
            sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(0.5)
            sock.connect((host, port))
            return
        except OSError as err:
            if time.monotonic() > deadline:
                raise ConnpubError(f"nothing listens on {host}:{port} in netns {netns}: "
                                   f"see {log_dir(netns.split('-')[0])} ({err})") from err
            time.sleep(0.05)
        finally:
            sock.close()


# ---------------------------------------------------------------------------------------------
