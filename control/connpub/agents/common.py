"""What both agents share: the UDP socket, the tick loop, the JSON status file."""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from connpub import paths
from connpub.datapath.maps import BATCH_ENTRIES
from connpub.errors import ConnpubError

log = logging.getLogger(__name__)

UDP_GSO_SEGMENT = 103  # UDP_SEGMENT (linux/udp.h): kernel splits one send into datagrams
UDP_GSO_MAX_BYTES = 65000  # one GSO send stays below the 64 KiB IP limit
UDP_GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS
RECV_BUFFER_BYTES = 32 << 20
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # <asm-generic/socket.h>; not in Python's socket module
MAX_DATAGRAM = 65535
SO_RXQ_OVFL = 40  # asm-generic/socket.h: each datagram carries the socket's drop count
STATUS_DIR_NAME = "agents"


def status_path(role: str, iface: str | None, netns: str | None) -> Path:
    """/run/connpub/agents/<role>-<netns or root>-<iface or any>.json"""
    return paths.RUN_ROOT / STATUS_DIR_NAME / f"{role}-{netns or 'root'}-{iface or 'any'}.json"


def write_status(path: Path, status: dict) -> None:
    """Atomically replace the status file (write a temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(status, indent=1, sort_keys=True))
    tmp.replace(path)


def read_statuses() -> list[dict]:
    """Every agent status file (for `connpub status`), with `alive` = its pid still runs a
    connpub agent (a dead pid, or one reused by another program, is not alive)."""
    folder = paths.RUN_ROOT / STATUS_DIR_NAME
    found = []
    for path in sorted(folder.glob("*.json")) if folder.exists() else []:
        try:
            status = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        status["alive"] = agent_alive(int(status.get("pid", 0)))
        status["file"] = str(path)
        found.append(status)
    return found


def agent_alive(pid: int) -> bool:
    """pid runs and is a `connpub agent` process."""
    if pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"agent" in cmdline and any(b"connpub" in part for part in cmdline)


def agents_using(iface: str, netns: str | None) -> list[dict]:
    """The live agents whose status file names this attachment."""
    return [status for status in read_statuses()
            if status["alive"] and status.get("iface") == iface
            and (status.get("netns") or None) == (netns or None)]


def stop_agent(pid: int, timeout_s: float = 15.0) -> None:
    """SIGTERM an agent and wait (polling) until it has exited."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not agent_alive(pid) or _zombie(pid):
            return
        time.sleep(0.05)
    raise ConnpubError(f"agent pid {pid} did not stop within {timeout_s:.0f} s of SIGTERM")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def remove_status(path: Path) -> None:
    path.unlink(missing_ok=True)


def remove_statuses_of_netns(names: list[str], prefix: str | None = None) -> int:
    """Remove the status files of agents that ran in these namespaces, or in any namespace
    named '<prefix>-*' (`lab down`: the namespaces may be gone already)."""
    removed = 0
    wanted = set(names)
    for status in read_statuses():
        netns = status.get("netns") or ""
        if netns in wanted or (prefix and netns.startswith(f"{prefix}-")):
            Path(status["file"]).unlink(missing_ok=True)
            removed += 1
    return removed


def family_of(address: str) -> int:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError as err:
        raise ConnpubError(f"bad IP address {address!r} in the agent config") from err
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def sender_ip(sender: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A datagram sender's address (scope dropped; IPv4 seen on a dual-stack socket as
    ::ffff:a.b.c.d given back as IPv4); None when it is no address."""
    try:
        ip = ipaddress.ip_address(sender.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class SourceFilter:
    """Which senders an agent verifies datagrams from: `allowed(ip)` decides, verdicts are
    cached per sender (at most 65 536, so a spoofing flood cannot grow the cache forever).
    `keep(datagrams)` drops the others before any HMAC is computed and counts them in the
    agents' `source_filtered` metric (docs/agents.md)."""

    CACHE_LIMIT = 65536

    def __init__(self, allowed: Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool]
                 ) -> None:
        self._allowed = allowed
        self.verdicts: dict[str, bool] = {}

    def reset(self) -> None:
        """Forget the verdicts (the allowed set changed)."""
        self.verdicts = {}

    def allowed(self, sender: str) -> bool:
        verdict = self.verdicts.get(sender)
        if verdict is None:
            ip = sender_ip(sender)
            verdict = ip is not None and bool(self._allowed(ip))
            if len(self.verdicts) < self.CACHE_LIMIT:
                self.verdicts[sender] = verdict
        return verdict

    def keep(self, datagrams: list[tuple[bytes, tuple]], metrics) -> list[tuple[bytes, tuple]]:
        """The datagrams from allowed senders; the others are counted in `source_filtered`."""
        allowed = self.allowed
        kept = [datagram for datagram in datagrams if allowed(datagram[1][0])]
        metrics.inc("source_filtered", len(datagrams) - len(kept))
        return kept


def prefix_filter(prefixes: Iterable[str]) -> Callable[[object], bool] | None:
    """allowed(ip) for `[agent] allowed_sources` prefixes; None when there are none."""
    networks = [ipaddress.ip_network(p, strict=False) for p in prefixes]
    if not networks:
        return None
    return lambda ip: any(ip in network for network in networks)


class AgentSocket:
    """One non-blocking UDP socket, dual-stack when bound to an IPv6 or wildcard address:
    receives in bulk (`drain`) and sends lists of equal-sized datagrams with UDP GSO (one
    syscall per ~64 KiB) where the kernel allows it."""

    def __init__(self, address: str, port: int) -> None:
        wildcard = address in ("", "0.0.0.0", "::")
        family = socket.AF_INET6 if wildcard else family_of(address)
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if wildcard else 1)
            for forced, option in ((SO_RCVBUFFORCE, socket.SO_RCVBUF),
                                   (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
                # FORCE (root, CAP_NET_ADMIN) goes past net.core.rmem_max/wmem_max, which
                # only the host's root netns can raise: a baseline publish burst overflowed
                # the 4 MiB default in the lab (docs/lab.md, "Scale")
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, forced, RECV_BUFFER_BYTES)
                except PermissionError:
                    self.sock.setsockopt(socket.SOL_SOCKET, option, RECV_BUFFER_BYTES)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
            self.sock.bind(("::" if wildcard else address, port))
        except OSError as err:
            self.sock.close()
            raise ConnpubError(f"cannot bind UDP {address}:{port}: {err.strerror}; is another "
                               "agent running there? change [agent] listen_port") from err
        self.sock.setblocking(False)
        self.dual_stack = family == socket.AF_INET6
        self.gso = True
        self.bytes_sent = 0
        self.packets_sent = 0
        self.kernel_drops = 0  # datagrams the kernel dropped on the full receive buffer (total)
        self._drops_taken = 0

    def take_kernel_drops(self) -> int:
        """Kernel drops since the previous call (SO_RXQ_OVFL, as the last datagram reported)."""
        new = self.kernel_drops - self._drops_taken
        self._drops_taken = self.kernel_drops
        return max(new, 0)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def destination(self, address: str, port: int) -> tuple:
        """sendto() address for this socket: IPv4 peers as ::ffff:a.b.c.d on a v6 socket."""
        if self.dual_stack and family_of(address) == socket.AF_INET:
            return (f"::ffff:{address}", port)
        return (address, port)

    def drain(self, limit: int = 1_000_000) -> list[tuple[bytes, tuple]]:
        """Every datagram waiting on the socket (up to `limit`), with its sender address."""
        got = []
        recvmsg = self.sock.recvmsg
        space = socket.CMSG_SPACE(4)
        ancillary = []
        while len(got) < limit:
            try:
                data, ancillary, _, sender = recvmsg(MAX_DATAGRAM, space)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:  # an ICMP error for an earlier send
                continue
            got.append((data, sender))
        for level, kind, value in ancillary:  # the last datagram's count is the newest
            if level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(value) >= 4:
                self.kernel_drops = int.from_bytes(value[:4], "little")
        return got

    def send(self, packets: list[bytes], destination: tuple) -> int:
        """Send every packet to destination; returns how many went out (a full socket buffer or
        an unreachable peer drops the rest, as UDP does)."""
        if not packets:
            return 0
        sent = self._send_gso(packets, destination) if self.gso and len(packets) > 1 else None
        if sent is None:
            sent = 0
            for packet in packets:
                if self._send_one(packet, destination):
                    sent += 1
        return sent

    def _send_one(self, packet: bytes, destination: tuple) -> bool:
        try:
            self.sock.sendto(packet, destination)
        except (BlockingIOError, ConnectionRefusedError, OSError) as err:
            log.debug("send to %s failed: %s", destination, err)
            return False
        self.packets_sent += 1
        self.bytes_sent += len(packet)
        return True

    def _send_gso(self, packets: list[bytes], destination: tuple) -> int | None:
        """Runs of equal-sized packets go out as GSO super-datagrams. None: GSO unavailable."""
        sent = 0
        index = 0
        count = len(packets)
        while index < count:
            size = len(packets[index])
            per_send = max(1, min(UDP_GSO_MAX_SEGMENTS, UDP_GSO_MAX_BYTES // size))
            end = index + 1
            while end < count and end - index < per_send and len(packets[end]) == size:
                end += 1
            if end - index == 1:
                sent += self._send_one(packets[index], destination)
                index = end
                continue
            payload = b"".join(packets[index:end])
            cmsg = [(socket.SOL_UDP, UDP_GSO_SEGMENT, size.to_bytes(2, "little"))]
            try:
                self.sock.sendmsg([payload], cmsg, 0, destination)
            except OSError as err:
                if sent == 0 and err.errno in (22, 95, 5):  # EINVAL, EOPNOTSUPP, EIO: no GSO
                    self.gso = False
                    return None
                log.debug("GSO send to %s failed: %s", destination, err)
                index = end
                continue
            self.packets_sent += end - index
            self.bytes_sent += len(payload)
            sent += end - index
            index = end
        return sent


    def send_batch(self, batch, destination: tuple) -> int:
        """Send a connpub.protocol.batch.PacketBatch: full rows in GSO runs straight from the
        buffer (no per-packet bytes objects), the last (shorter) packet on its own."""
        count = batch.count
        if count == 0:
            return 0
        full_rows = count if batch.last_len == batch.row_len else count - 1
        flat = memoryview(batch.buffer).cast("B")
        sent = 0
        next_row = 0  # first row not handed to the kernel yet
        if self.gso and full_rows > 1:
            per_send = max(1, min(UDP_GSO_MAX_SEGMENTS, UDP_GSO_MAX_BYTES // batch.row_len))
            cmsg = [(socket.SOL_UDP, UDP_GSO_SEGMENT, batch.row_len.to_bytes(2, "little"))]
            while next_row < full_rows:
                end = min(next_row + per_send, full_rows)
                chunk = flat[next_row * batch.row_len : end * batch.row_len]
                try:
                    self.sock.sendmsg([chunk], cmsg if end - next_row > 1 else [], 0,
                                      destination)
                except OSError as err:
                    if next_row == 0 and err.errno in (22, 95, 5):  # no GSO here
                        self.gso = False
                        break
                    log.debug("GSO send to %s failed: %s", destination, err)
                else:
                    sent += end - next_row
                    self.packets_sent += end - next_row
                    self.bytes_sent += len(chunk)
                next_row = end
        for index in range(next_row, count):
            length = batch.last_len if index == count - 1 else batch.row_len
            start = index * batch.row_len
            sent += self._send_one(flat[start : start + length], destination)
        return sent


class TableReader:
    """Batched reads of a whole (non-per-CPU) pinned map into buffers kept from one read to
    the next: no allocation, no page faults, no copy. The arrays returned by `read` are views,
    valid until the next `read`."""

    def __init__(self, pinned) -> None:
        from connpub.datapath import libbpf  # noqa: PLC0415

        if pinned.percpu:
            raise ValueError("TableReader reads plain maps; use PinnedMap.items for per-CPU")
        self.pinned = pinned
        self.libbpf = libbpf
        self.keys = np.zeros(pinned.max_entries, pinned.key_dtype)
        self.values = np.zeros(pinned.max_entries, pinned.value_dtype)
        for buffer in (self.keys, self.values):  # fault the pages in now, not in a cycle
            buffer.view(np.uint8)[::4096] = 0
        token_size = max(pinned.key_dtype.itemsize, 8)
        self._in = np.zeros(token_size, np.uint8)
        self._out = np.zeros(token_size, np.uint8)

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        import ctypes  # noqa: PLC0415

        lib = self.libbpf
        fd = self.pinned.fd
        cap = len(self.keys)
        key_size, value_size = self.keys.dtype.itemsize, self.values.dtype.itemsize
        key_base, value_base = self.keys.ctypes.data, self.values.ctypes.data
        opts = lib.BpfMapBatchOpts(sz=ctypes.sizeof(lib.BpfMapBatchOpts))
        filled = 0
        first = True
        while filled < cap:
            count = ctypes.c_uint32(min(BATCH_ENTRIES, cap - filled))
            ret = lib.LIB.bpf_map_lookup_batch(
                fd, None if first else self._in.ctypes.data, self._out.ctypes.data,
                key_base + filled * key_size, value_base + filled * value_size,
                ctypes.byref(count), ctypes.byref(opts))
            filled += count.value
            if ret == -errno.ENOENT or (ret == -errno.ENOSPC and count.value == 0):
                break
            lib.check(ret, f"batched lookup in {self.pinned.name}")
            self._in[:] = self._out
            first = False
        return self.keys[:filled], self.values[:filled]


class StopFlag:
    """Set by SIGTERM/SIGINT (or by a caller, e.g. a test) to end the loop after this turn."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.event.set())

    def set(self) -> None:
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


def run_loop(agent_socket: AgentSocket, on_packets: Callable[[list[tuple[bytes, tuple]]], None],
             ticks: Iterable[tuple[float, Callable[[], None]]], stop: StopFlag,
             max_wait_s: float = 0.5) -> None:
    """Serve the socket and the periodic jobs until `stop` is set.

    ticks: (period_s, job) pairs. A job runs every period_s on CLOCK_MONOTONIC; a job that
    overruns its period is not queued up (the next run is scheduled from the time it finished,
    so one slow cycle never causes a burst). Waiting datagrams are drained in one go and handed
    to on_packets as one batch."""
    schedule = [[time.monotonic(), period, job] for period, job in ticks]
    selector = selectors.DefaultSelector()
    selector.register(agent_socket.sock, selectors.EVENT_READ)
    try:
        while not stop.is_set():
            now = time.monotonic()
            for slot in schedule:
                if now >= slot[0]:
                    _guarded(slot[2])
                    finished = time.monotonic()
                    slot[0] = max(slot[0] + slot[1], finished)
            next_due = min(slot[0] for slot in schedule) if schedule else now + max_wait_s
            timeout = min(max(next_due - time.monotonic(), 0.0), max_wait_s)
            if selector.select(timeout):
                batch = agent_socket.drain()
                if batch:
                    _guarded(on_packets, batch)
    finally:
        selector.close()


def _guarded(job: Callable, *args) -> None:
    """A failing cycle (a map operation refused, a full table) is logged with its traceback
    and the agent goes on with the next one: a daemon must not die of one bad turn."""
    try:
        job(*args)
    except (OSError, ConnpubError, ValueError):
        log.exception("agent job %s failed; continuing", getattr(job, "__name__", job))
