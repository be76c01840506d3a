"""TCP connection state from the server's kernel (docs/agents.md, "Liveness").

bpf/tcpstate/tcpstate.c, on the raw tracepoint `sock:inet_sock_set_state` (the tracepoint bcc's
tcplife uses), records every TCP socket of one network namespace that becomes or stops being
ESTABLISHED in the pinned hash `tcp_sockets` (flow key as the server program sees the
connection -> latest state and when it changed). A sock_diag dump of the namespace
(`netlink.established_tcp_sockets`) seeds the table when the watcher starts, so a restarted
agent knows every open connection at once. The tracepoint link is pinned next to the table:
it keeps recording while the agent is down and a new load replaces it without a gap."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from connpub import paths
from connpub.arrays import join
from connpub.datapath.abi import FLOW_KEY_DTYPE, SOCK_STATE_DTYPE

log = logging.getLogger(__name__)

TRACEPOINT = b"inet_sock_set_state"
LINK_PIN = "tcpstate_link"
PROTO_TCP = 6

# include/net/tcp_states.h
TCP_ESTABLISHED = 1
TCP_FIN_WAIT1 = 4
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8
TCP_STATE_NAMES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1",
                   5: "FIN_WAIT2", 6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK",
                   10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV", 13: "BOUND_INACTIVE"}

# offsets the program reads from struct sock / struct net (bpf/tcpstate/tcpstate_consts.h)
KERNEL_OFFSETS = {
    "OFF_SK_DADDR": "sock.__sk_common.skc_daddr",
    "OFF_SK_RCV_SADDR": "sock.__sk_common.skc_rcv_saddr",
    "OFF_SK_DPORT": "sock.__sk_common.skc_dport",
    "OFF_INET_SPORT": "inet_sock.inet_sport",
    "OFF_SK_FAMILY": "sock.__sk_common.skc_family",
    "OFF_SK_NET": "sock.__sk_common.skc_net.net",
    "OFF_SK_V6_DADDR": "sock.__sk_common.skc_v6_daddr",
    "OFF_SK_V6_RCV_SADDR": "sock.__sk_common.skc_v6_rcv_saddr",
    "OFF_SK_PROTOCOL": "sock.sk_protocol",
    "OFF_NET_NS_INUM": "net.ns.inum",
}

# per flow of the server's table: what the kernel says about its socket
SOCKET_UNKNOWN = 0  # no record (not a TCP flow, or no socket seen yet / any more)
SOCKET_OPEN = 1  # ESTABLISHED
SOCKET_CLOSED = 2  # left ESTABLISHED (closed by either end or reset) at changed_ns


# ---------------------------------------------------------------------------------------------
# pure decoding


def socket_keys(rows: np.ndarray) -> np.ndarray:
    """FLOW_KEY_DTYPE keys of sock_diag rows (netlink.DIAG_SOCKET_DTYPE: src = local end,
    dst = remote end): client = the remote end, vip = the local end, proto TCP; IPv4 stored
    IPv4-mapped, as bpf/include/flow.h."""
    keys = np.zeros(len(rows), FLOW_KEY_DTYPE)
    if len(rows) == 0:
        return keys
    v4 = rows["family"] == socket.AF_INET
    for out, field in (("client_addr", "dst"), ("vip_addr", "src")):
        addr = np.array(rows[field])
        mapped = np.zeros_like(addr)
        mapped[:, 10:12] = 0xFF
        mapped[:, 12:] = addr[:, :4]
        keys[out] = np.where(v4[:, None], mapped, addr)
    keys["client_port"] = rows["dport"]
    keys["vip_port"] = rows["sport"]
    keys["proto"] = PROTO_TCP
    return keys


def close_kind(old_state: int, state: int) -> str:
    """How a connection left ESTABLISHED: "open" (it did not), "server" (FIN_WAIT1: the server
    closed first), "client" (CLOSE_WAIT: the client's FIN), "reset" (CLOSE: an RST either
    way), else "other"."""
    if state == TCP_ESTABLISHED:
        return "open"
    if old_state != TCP_ESTABLISHED:
        return "other"
    return {TCP_FIN_WAIT1: "server", TCP_CLOSE_WAIT: "client", TCP_CLOSE: "reset"}.get(
        int(state), "other")


@dataclass(frozen=True)
class FlowSockets:
    """Per row of the server's flow table: SOCKET_* state and when it last changed (datapath
    ns; 0 when unknown). `authoritative`: the watcher has seeded, so a TCP flow with no record
    has no open socket."""

    state: np.ndarray  # uint8
    changed_ns: np.ndarray  # int64
    authoritative: bool = True

    @classmethod
    def unknown(cls, count: int) -> FlowSockets:
        return cls(np.zeros(count, np.uint8), np.zeros(count, np.int64), False)


def socket_table_keys(flow_keys: np.ndarray) -> np.ndarray:
    """Flow-table keys as the socket table holds them: a copy with the pad bytes zeroed."""
    keys = np.array(flow_keys, FLOW_KEY_DTYPE)
    keys["pad"] = 0
    return keys


def flow_sockets(flow_keys: np.ndarray, socket_keys_: np.ndarray,
                 socket_values: np.ndarray) -> FlowSockets:
    """The kernel's view of each flow: join the flow table's keys with the socket table."""
    n = len(flow_keys)
    state = np.zeros(n, np.uint8)
    changed = np.zeros(n, np.int64)
    if n == 0 or len(socket_keys_) == 0:
        return FlowSockets(state, changed)
    flows = socket_table_keys(flow_keys)
    found, row = key_join(np.asarray(socket_keys_, FLOW_KEY_DTYPE), flows)
    found &= flows["proto"] == PROTO_TCP
    hit = socket_values[row[found]]
    state[found] = np.where(hit["state"] == TCP_ESTABLISHED, SOCKET_OPEN, SOCKET_CLOSED)
    changed[found] = hit["changed_ns"].astype(np.int64)
    return FlowSockets(state, changed)


def stamped_sockets(flow_keys: np.ndarray, flow_values: np.ndarray, epoch: int,
                    now_ns: int, young_ns: int) -> tuple[FlowSockets, np.ndarray]:
    """The kernel's view of each flow from the stamps the tracepoint writes into the flow
    table (FLOW_VALUE_DTYPE sock_*), and the rows whose view must come from the socket table:
    TCP flows without a stamp of this recording epoch (their socket predates the epoch, or the
    entry was re-created after an eviction) that are older than young_ns (a younger one is
    still in its handshake: packets decide). Returns (view, rows to look up)."""
    tcp = flow_keys["proto"] == PROTO_TCP
    stamp = flow_values["sock_state"]
    stamped = tcp & (stamp != 0) & (flow_values["sock_epoch"] == epoch) & (epoch != 0)
    state = np.where(stamped, np.where(stamp == TCP_ESTABLISHED, SOCKET_OPEN, SOCKET_CLOSED),
                     SOCKET_UNKNOWN).astype(np.uint8)
    changed = np.where(stamped, flow_values["sock_changed_ns"], 0).astype(np.int64)
    age = np.int64(now_ns) - flow_values["first_seen_ns"].astype(np.int64)
    lookup = np.flatnonzero(tcp & ~stamped & (age > young_ns))
    return FlowSockets(state, changed), lookup


def merge_lookups(view: FlowSockets, rows: np.ndarray, found: np.ndarray,
                  records: np.ndarray) -> FlowSockets:
    """view with rows[found] set from their socket-table records (SOCK_STATE_DTYPE, one per
    found row, in order)."""
    state, changed = view.state.copy(), view.changed_ns.copy()
    hit = rows[found]
    state[hit] = np.where(records["state"] == TCP_ESTABLISHED, SOCKET_OPEN, SOCKET_CLOSED)
    changed[hit] = records["changed_ns"].astype(np.int64)
    return FlowSockets(state, changed, view.authoritative)


_MIX = tuple(np.uint64(m) for m in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F,
                                     0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                                     0xFF51AFD7ED558CCD))


def _key_words(keys: np.ndarray) -> np.ndarray:
    """(n, 5) uint64 words of FLOW_KEY_DTYPE keys (pad bytes included)."""
    keys = np.ascontiguousarray(keys)
    return keys.view(np.uint8).reshape(len(keys), FLOW_KEY_DTYPE.itemsize).view("<u8")


def _key_hash(words: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = np.zeros(len(words), np.uint64)
        for i in range(words.shape[1]):
            h = (h ^ (words[:, i] * _MIX[i])) * _MIX[(i + 1) % len(_MIX)]
            h ^= h >> np.uint64(29)
    return h


def key_join(table_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found, row of table_keys) per key, as connpub.arrays.join, for FLOW_KEY_DTYPE keys:
    both sides sorted by a 64-bit hash, so the search runs on sorted uint64 instead of random
    40-byte records (1M flows x 1M sockets: the agent's cycle spent 1.5 s in the record
    search); every hash match is checked word by word; equal hashes in the table (a
    collision) fall back to arrays.join."""
    if len(table_keys) == 0 or len(keys) == 0:
        return np.zeros(len(keys), bool), np.zeros(len(keys), np.int64)
    table_words, words = _key_words(table_keys), _key_words(keys)
    table_hash, query_hash = _key_hash(table_words), _key_hash(words)
    table_order = np.argsort(table_hash)
    sorted_table = table_hash[table_order]
    if (sorted_table[1:] == sorted_table[:-1]).any():
        return join(table_keys, keys)
    query_order = np.argsort(query_hash)
    sorted_query = query_hash[query_order]
    position = np.minimum(np.searchsorted(sorted_table, sorted_query), len(sorted_table) - 1)
    hit = sorted_table[position] == sorted_query
    candidate, query = table_order[position[hit]], query_order[hit]
    same = (table_words[candidate] == words[query]).all(axis=1)
    found = np.zeros(len(keys), bool)
    row = np.zeros(len(keys), np.int64)
    found[query[same]] = True
    row[query[same]] = candidate[same]
    return found, row


def reconcile(table_keys: np.ndarray, table_values: np.ndarray,
              established: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Seeding: (keys to insert as ESTABLISHED: in the dump, not in the table; keys to mark
    closed: ESTABLISHED in a table snapshot taken before the dump but absent from it, i.e.
    closed while no program was recording)."""
    table_keys = np.asarray(table_keys, FLOW_KEY_DTYPE)
    established = np.asarray(established, FLOW_KEY_DTYPE)
    in_table, _ = join(table_keys, established)
    open_rows = table_values["state"] == TCP_ESTABLISHED
    in_dump, _ = join(established, table_keys)
    return established[~in_table], table_keys[open_rows & ~in_dump]


def records_to_forget(values: np.ndarray, now_ns: int, keep_ns: int) -> np.ndarray:
    """Indices of closed records older than keep_ns (their flows are finished by then)."""
    age = np.int64(now_ns) - values["changed_ns"].astype(np.int64)
    return np.flatnonzero((values["state"] != TCP_ESTABLISHED) & (age > keep_ns))


def state_values(count: int, state: int, changed_ns: int, old_state: int = 0) -> np.ndarray:
    values = np.zeros(count, SOCK_STATE_DTYPE)
    values["state"] = state
    values["old_state"] = old_state
    values["changed_ns"] = changed_ns
    return values


# ---------------------------------------------------------------------------------------------
# the watcher


def build_id(defines: dict, flows_map_id: int = 0) -> str:
    """Digest of the program's sources, defines and the flow table it stamps (its map id):
    equal = the same program."""
    from connpub import paths  # noqa: PLC0415

    digest = hashlib.sha256(json.dumps([sorted(defines.items()), flows_map_id]).encode())
    for path in sorted((paths.BPF_DIR / "tcpstate").glob("*")) + [
            paths.BPF_DIR / "include" / name for name in ("flow.h", "clock.h")] + [
            paths.BPF_DIR / "server" / name for name in ("server_structs.h",
                                                          "server_consts.h")]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _build_file(pin_dir: Path) -> Path:
    return paths.build_record(pin_dir)


def _record(pin_dir: Path) -> dict:
    try:
        record = json.loads(_build_file(pin_dir).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def recorded_build(pin_dir: Path) -> str | None:
    """The build id recorded when the program pinned under pin_dir was loaded."""
    return _record(pin_dir).get("build")


def forget_build(pin_dir: Path) -> None:
    """Remove the build record of pin_dir (its pins are gone)."""
    _build_file(Path(pin_dir)).unlink(missing_ok=True)


def record_build(pin_dir: Path, build: str, flows_map_id: int = 0) -> None:
    path = _build_file(pin_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pin_dir": str(pin_dir), "build": build,
                                "flows_map_id": flows_map_id}))


def flow_table_defines(pin_dir: Path) -> tuple[dict[str, int], int]:
    """(defines that make the program stamp the server's pinned flow table, its map id); none
    and 0 when no server program has pinned one under pin_dir."""
    from connpub.datapath import libbpf  # noqa: PLC0415

    path = Path(pin_dir) / "flows"
    if not path.exists():
        return {}, 0
    fd = libbpf.obj_get(str(path))
    try:
        info = libbpf.map_info(fd)
    finally:
        os.close(fd)
    return ({"STAMP_FLOWS": 1, "MAX_FLOWS": int(info.max_entries),
             "FLOWS_MAP_FLAGS": int(info.map_flags)}, int(info.id))


class TcpStateWatcher:
    """Loads bpf/tcpstate/tcpstate.c for `netns` (None = the caller's namespace), pins its
    table and tracepoint link under pin_dir (reusing a pinned table: its records survive a
    reload), then seeds the table from sock_diag. `read()` returns the table; `forget()`
    deletes records; `close()` releases this process's handles (the link stays pinned: use
    `detach()` to stop recording)."""

    def __init__(self, pin_dir: Path, netns: str | None, now_ns, *,
                 max_sockets: int | None = None, reuse: bool = True) -> None:
        from connpub.datapath import libbpf, netlink  # noqa: PLC0415
        from connpub.datapath.pinned import open_pinned  # noqa: PLC0415

        self.pin_dir = Path(pin_dir)
        self.netns = netns
        self.now_ns = now_ns
        self.netns_inode = netlink.netns_inode(netns)
        defines: dict[str, int | str] = {"NETNS_INO": self.netns_inode,
                                         **libbpf.kernel_member_offsets(KERNEL_OFFSETS)}
        if max_sockets is not None:
            defines["MAX_SOCKETS"] = int(max_sockets)
        stamp_defines, flows_map_id = flow_table_defines(self.pin_dir)
        defines.update(stamp_defines)
        self.stamps_flows = bool(stamp_defines)
        started = time.monotonic()
        self.program = None
        build = build_id(defines, flows_map_id)
        link_pin = self.pin_dir / LINK_PIN
        previous = _record(self.pin_dir)
        # a restarted agent (kill -9 included) finds the same build still recording: it only
        # re-seeds; a new build (or reuse=False) is loaded and replaces the old link
        self.reused = (reuse and link_pin.exists() and (self.pin_dir / "tcp_sockets").exists()
                       and previous.get("build") == build)
        # stamps stay trustworthy while some load of ours recorded into this flow table without
        # a pause: a new build replaces the old link before unpinning it
        gapless = (link_pin.exists() and flows_map_id != 0
                   and previous.get("flows_map_id") == flows_map_id)
        if not self.reused:
            self._load(defines, link_pin)
            record_build(self.pin_dir, build, flows_map_id)
        try:
            self.table = open_pinned(self.pin_dir, "tcpstate", "tcp_sockets")
            self.epoch = self._advance_epoch(keep=self.reused or gapless)
        except Exception:
            self.close()
            raise
        self.load_s = time.monotonic() - started
        self.seed_result = self.seed()

    def _advance_epoch(self, keep: bool) -> int:
        """The recording epoch stamps carry (tcpstate_epoch[0], >= 1): kept when recording was
        continuous, else raised so that stamps written before the pause are not trusted
        (sockets may have closed meanwhile; the seed corrects the socket table, not them)."""
        from connpub.datapath.pinned import open_pinned  # noqa: PLC0415

        zero = np.array(0, "<u4")
        with open_pinned(self.pin_dir, "tcpstate", "tcpstate_epoch") as epochs:
            current = int(epochs.lookup(zero))
            if keep and current >= 1:
                return current
            epochs.update(zero, np.array(current + 1, "<u4"))
            return current + 1

    def _load(self, defines: dict, link_pin: Path) -> None:
        from connpub.datapath import libbpf, loader  # noqa: PLC0415

        self.program = loader.compile_program("tcpstate", self.pin_dir, defines)
        try:
            func = loader.PROGRAMS["tcpstate"][1].encode()
            self.program.bpf.attach_raw_tracepoint(tp=TRACEPOINT, fn_name=func)
            link_fd = self.program.bpf.raw_tracepoint_fds[TRACEPOINT]
            if link_pin.exists():  # the previous load's link: ours records already
                link_pin.unlink()
            libbpf.obj_pin(link_fd, str(link_pin))
        except Exception:
            self.program.close()
            self.program = None
            raise

    def seed(self) -> dict:
        """Make the table agree with a sock_diag dump: insert the ESTABLISHED sockets it lacks
        (never over a record the tracepoint wrote meanwhile), mark closed the ESTABLISHED
        records without a socket (closed while nothing recorded). Returns counts and seconds."""
        from connpub.datapath import netlink  # noqa: PLC0415

        started = time.monotonic()
        keys, values = self.table.items()
        rows = netlink.established_tcp_sockets(self.netns)
        dumped_s = time.monotonic() - started
        established = socket_keys(rows)
        insert, gone = reconcile(keys, values, established)
        now = int(self.now_ns())
        inserted = self.table.insert_batch(insert, state_values(len(insert), TCP_ESTABLISHED,
                                                                now)) if len(insert) else 0
        if len(gone):
            self.table.update_batch(gone, state_values(len(gone), TCP_CLOSE, now,
                                                       TCP_ESTABLISHED))
        result = {"sockets": len(rows), "missing": len(insert), "inserted": inserted,
                  "closed_while_down": len(gone),
                  "dump_s": round(dumped_s, 6), "seed_s": round(time.monotonic() - started, 6)}
        log.info("tcpstate seeded from sock_diag: %s", result)
        return result

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        return self.table.items()

    def forget(self, keys: np.ndarray) -> int:
        return self.table.delete_batch(keys) if len(keys) else 0

    def stats(self) -> dict[str, int]:
        """The program's counters (abi.TCPSTATE_STATS), summed over CPUs."""
        from connpub.datapath.pinned import read_stats  # noqa: PLC0415

        return read_stats(self.pin_dir, "tcpstate")

    def close(self) -> None:
        if getattr(self, "table", None) is not None:
            self.table.close()
        if self.program is not None:
            self.program.close()

    def detach(self) -> None:
        """Stop recording: unpin the link (the table stays pinned)."""
        link_pin = self.pin_dir / LINK_PIN
        if link_pin.exists():
            link_pin.unlink()
        forget_build(self.pin_dir)
        self.close()
