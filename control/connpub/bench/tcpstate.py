"""Seeding benchmark of the TCP socket-state watcher (`connpub bench control`): a scratch
network namespace with `sockets` ESTABLISHED TCP sockets (connections over its loopback, both
ends inside), then the time to load the tracepoint program and seed its table from a sock_diag
dump, and the time of a re-seed (an agent restart: every record present). The sockets are
held by forked processes: RLIMIT_NOFILE (20 000 here) cannot be raised without
CAP_SYS_RESOURCE, so each holds what its own limit allows."""

from __future__ import annotations

import os
import resource
import socket
import time
from collections.abc import Callable

from connpub.datapath import loader, netlink
from connpub.datapath.clock import datapath_clock
from connpub.datapath.tcpstate import TcpStateWatcher

FD_HEADROOM = 512  # descriptors a holder process keeps free for itself
BATCH = 1_000


def _hold_connections(netns: str, port: int, connections: int, ready_fd: int,
                      release_fd: int) -> None:
    """In a forked child: a listener on 127.0.0.1:port in netns and `connections` connections
    to it (2 sockets each, both ends held); report on ready_fd, hold until release_fd closes."""
    held = []
    try:
        with netlink.entered(netns):
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", port))
            listener.listen(BATCH)
        made = 0
        while made < connections:
            batch = min(BATCH, connections - made)
            with netlink.entered(netns):
                clients = [socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                           for _ in range(batch)]
            for client in clients:
                client.connect(("127.0.0.1", port))
            held += clients
            held += [listener.accept()[0] for _ in range(batch)]
            made += batch
        os.write(ready_fd, b"1")
        os.read(release_fd, 1)  # returns when the parent closes its end
    except BaseException:
        os.write(ready_fd, b"0")
    finally:
        os._exit(0)


def _open_connections(netns: str, connections: int, say: Callable[[str], None]
                      ) -> list[tuple[int, int]]:
    """Fork holders (each within this process's RLIMIT_NOFILE, which an unprivileged-for-
    CAP_SYS_RESOURCE root cannot raise) until `connections` connections are open; returns
    (pid, release fd) per holder."""
    per_holder = max((resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FD_HEADROOM) // 2, 1)
    holders: list[tuple[int, int]] = []
    made = 0
    while made < connections:
        count = min(per_holder, connections - made)
        ready_r, ready_w = os.pipe()
        release_r, release_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            os.close(release_w)
            for _, earlier in holders:  # else an earlier holder never sees its release
                os.close(earlier)
            _hold_connections(netns, 7600 + len(holders), count, ready_w, release_r)
        os.close(ready_w)
        os.close(release_r)
        holders.append((pid, release_w))
        ok = os.read(ready_r, 1)
        os.close(ready_r)
        if ok != b"1":
            raise RuntimeError(f"a socket holder failed after {made} connections")
        made += count
        say(f"  {made}/{connections} connections open ({len(holders)} holder processes)")
    return holders


def _release(holders: list[tuple[int, int]]) -> None:
    for pid, release_fd in holders:
        os.close(release_fd)
        os.waitpid(pid, 0)


def bench_tcpstate_seed(sockets: int = 100_000,
                        say: Callable[[str], None] = lambda _text: None) -> dict:
    """Load + seed seconds of a TcpStateWatcher on a namespace with `sockets` ESTABLISHED
    sockets (sockets // 2 connections, held by forked processes)."""
    loader.check_privileges()
    connections = max(sockets // 2, 1)
    netns = f"cpbench{os.getpid()}"
    pin_dir = loader.scratch_pin_dir("bench-tcpstate")
    holders: list[tuple[int, int]] = []
    watcher = None
    netlink.create_netns(netns)
    try:
        netlink.set_link_up("lo", netns)
        started = time.monotonic()
        holders = _open_connections(netns, connections, say)
        open_s = time.monotonic() - started
        say(f"  loading the tracepoint program and seeding from sock_diag ({2 * connections} "
            "sockets)")
        watcher = TcpStateWatcher(pin_dir, netns, datapath_clock().now_ns,
                                  max_sockets=2 * connections + 1024, reuse=False)
        first = dict(watcher.seed_result)
        again = watcher.seed()  # as after a restart: every socket already recorded
        records = len(watcher.read()[0])
        return {"sockets": 2 * connections, "connections": connections,
                "holder_processes": len(holders), "open_connections_s": round(open_s, 2),
                "load_s": round(watcher.load_s - first["seed_s"], 4),
                "first_seed": first, "reseed": again, "records": records,
                "first_seed_s": first["seed_s"], "first_dump_s": first["dump_s"],
                "reseed_s": again["seed_s"],
                "seed_sockets_per_s": round(first["sockets"] / max(first["seed_s"], 1e-9))}
    finally:
        if watcher is not None:
            watcher.detach()
        _release(holders)
        loader.remove_pins(pin_dir)
        netlink.delete_netns(netns)
