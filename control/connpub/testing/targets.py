"""The fuzzed programs as targets (docs/fuzzing.md): the server and LB programs on scratch pins,
what each must do with a batch of frames (verdicts, bytes, counters, tables) by the reference
parser."""

from __future__ import annotations

import ipaddress
from collections import Counter

import numpy as np

from connpub.datapath import lbctl, loader
from connpub.datapath.abi import (
    AGG_KEY_DTYPE,
    AGG_VALUE_DTYPE,
    CLASS_KEY_DTYPE,
    CLASS_LEVEL_DTYPE,
    FLOW_KEY_DTYPE,
    FLOW_VALUE_DTYPE,
    LB_STATS,
)
from connpub.datapath.maps import PinnedMap
from connpub.datapath.masks import mask_byte_table
from connpub.datapath.pinned import stat_totals
from connpub.testing.reference import (
    IPPROTO_IPIP,
    IPPROTO_IPV6,
    LB_OUTCOME_NAMES,
    SERVER_OUTCOME_NAMES,
    STRIDE,
    V4,
    V4_MAPPED,
    V4_NO_BACKEND,
    V6,
    VERDICT_NAMES,
    VIP_SERVICES,
    XDP_DROP,
    XDP_PASS,
    XDP_TX,
    Parsed,
)
from connpub.testing.report import MAX_EXAMPLES, FuzzReport


def _key_set(keys: np.ndarray) -> set[bytes]:
    raw = np.ascontiguousarray(keys).tobytes()
    size = FLOW_KEY_DTYPE.itemsize
    return {raw[i : i + size] for i in range(0, len(raw), size)}


def _stat_totals(pin_dir, names: tuple[str, ...]) -> np.ndarray:
    role = "lb" if names is LB_STATS else "server"
    return stat_totals(pin_dir, role)[: len(names)]


def _frame(rows: np.ndarray, lengths: np.ndarray, index: int) -> bytes:
    return rows[index, : lengths[index]].tobytes()


def _unchanged(rows, lengths, out, out_lengths) -> np.ndarray:
    """Per frame: the program's output is the input, byte for byte."""
    inside = np.arange(STRIDE)[None, :] < lengths[:, None]
    return ~((out[:, :STRIDE] != rows) & inside).any(axis=1) & (out_lengths == lengths)


# ---------------------------------------------------------------------------------------------
# targets: one per XDP program
# ---------------------------------------------------------------------------------------------


class ServerTarget:
    """The server program: every frame XDP_PASS and unchanged; a flow entry exactly for the
    frames the reference tracks; aggregates' active counts never negative and equal to the
    open flows at levels 1-3; outcome counters equal to the reference's outcomes."""

    role = "server"
    outcome_names = SERVER_OUTCOME_NAMES
    defines = {"MAX_FLOWS": 262144, "MAX_AGGREGATES": 262144}

    def __init__(self, pin_dir, rng: np.random.Generator) -> None:
        self.pin_dir = pin_dir
        self.rng = rng
        loader.init_server_maps(pin_dir)
        self.flows = PinnedMap(pin_dir / "flows", FLOW_KEY_DTYPE, FLOW_VALUE_DTYPE)
        self.aggregates = PinnedMap(pin_dir / "aggregates", AGG_KEY_DTYPE, AGG_VALUE_DTYPE)
        self.classes = PinnedMap(pin_dir / "class_levels", CLASS_KEY_DTYPE, CLASS_LEVEL_DTYPE)
        self.known: set[bytes] = set()
        self.families: dict[bytes, int] = {}  # flow key -> 1 seen from IPv4, 2 IPv6, 3 both
        self.reported: set[bytes] = set()

    def collided_reported(self, keys: np.ndarray) -> np.ndarray:
        """Per key: already reported as an IPv4/IPv6 collision (then marked reported)."""
        rows = _rows_bytes(keys)
        seen = np.array([row in self.reported for row in rows], bool)
        self.reported.update(row for row, family in zip(rows, keys, strict=True)
                             if self.families.get(row, 1) == 3)
        return seen

    def close(self) -> None:
        for pinned in (self.flows, self.aggregates, self.classes):
            pinned.close()

    def before_batch(self, batch_index: int, epoch_batches: int) -> None:
        """New class levels every batch (live flows move between aggregates); both tables
        emptied together every epoch (keeps them far from full)."""
        if batch_index % epoch_batches == 0:
            self.flows.clear()
            self.aggregates.clear()
            self.known = set()
            self.families = {}
            self.reported = set()
        keys = np.zeros(len(VIP_SERVICES), CLASS_KEY_DTYPE)
        for index, (vip, port, proto) in enumerate(VIP_SERVICES):
            keys[index]["vip_addr"] = np.frombuffer(_mapped(vip), np.uint8)
            keys[index]["vip_port"], keys[index]["proto"] = port, proto
        levels = self.rng.integers(0, 4, len(keys)).astype(np.uint8)
        self.classes.update_batch(keys, levels)
        loader.init_server_maps(self.pin_dir, default_level=int(self.rng.integers(0, 4)))

    def check(self, report: FuzzReport, parsed: list[Parsed], outcomes: list[str], rows, lengths,
              verdicts, out, out_lengths) -> None:
        bad_verdict = np.flatnonzero(verdicts != XDP_PASS)
        for index in bad_verdict[:MAX_EXAMPLES].tolist():
            report.fail("verdict", f"{VERDICT_NAMES[verdicts[index]]} instead of XDP_PASS",
                        _frame(rows, lengths, index))
        report.fail_many("verdict", len(bad_verdict) - MAX_EXAMPLES)
        changed = np.flatnonzero(~_unchanged(rows, lengths, out, out_lengths))
        for index in changed[:MAX_EXAMPLES].tolist():
            report.fail("packet_changed", "output differs from input", _frame(rows, lengths, index))
        report.fail_many("packet_changed", len(changed) - MAX_EXAMPLES)

        keys, values = self.flows.items()
        table = _key_set(keys)
        expected = {p.key for p in parsed if p.outcome == "tracked"}
        for key in expected - table:
            report.fail("tracked_flow_missing", f"no flow entry for key {key.hex()}")
        for key in table - self.known - expected:
            report.fail("unexpected_flow", f"flow entry {key.hex()} for no tracked frame")
        self.known = table
        report.flows_checked += len(table)

        agg_keys, agg_values = self.aggregates.items()
        active = agg_values["active_flows"].sum(axis=1)
        for index in np.flatnonzero(active < 0)[:MAX_EXAMPLES].tolist():
            report.fail("active_flows_negative",
                        f"aggregate {agg_keys[index].tobytes().hex()} active {int(active[index])}")
        is_open = (values["level"] != 0) & (values["closed"] == 0)
        if int(active.sum()) != int(is_open.sum()):
            report.fail("active_flows_total_mismatch",
                        f"aggregates count {int(active.sum())} active flows, the flow table "
                        f"has {int(is_open.sum())} open flows at levels 1-3")
        for item in parsed:
            if item.outcome == "tracked":
                self.families[item.key] = self.families.get(item.key, 0) | (1 << item.is_v6)
        family = np.array([self.families.get(key, 1) for key in _rows_bytes(keys)], np.int64)
        collided = family == 3
        for index in np.flatnonzero(collided & ~self.collided_reported(keys))[:MAX_EXAMPLES]:
            report.fail("ipv4_ipv6_same_flow_key",
                        f"flow {keys[index].tobytes().hex()} was tracked from IPv4 and IPv6 "
                        "frames (IPv4-mapped IPv6 addresses): its aggregates use both masks")
        # exact count per aggregate, leaving out the aggregates a collided flow touches
        expected_active = _open_flows_per_aggregate(keys[is_open & ~collided],
                                                     values["level"][is_open & ~collided],
                                                     family[is_open & ~collided] == 2)
        skip: set[bytes] = set()  # every aggregate a collided flow may have moved through
        for level in (1, 2, 3):
            for v6 in (False, True):
                count = int(collided.sum())
                skip |= set(_open_flows_per_aggregate(keys[collided], np.full(count, level),
                                                      np.full(count, v6)))
        counted = dict(zip(_rows_bytes(agg_keys), active.tolist(), strict=True))
        for agg_key in (set(expected_active) | set(counted)) - skip:
            want, got = expected_active.get(agg_key, 0), counted.get(agg_key, 0)
            if want != got:
                report.fail("active_flows_per_aggregate_mismatch",
                            f"aggregate {agg_key.hex()}: active {got}, open flows {want}")
        report.aggregates_checked += len(agg_keys)

    def classify(self, parsed: Parsed) -> str:
        return parsed.outcome

    def classify_batch(self, parsed: list[Parsed]) -> list[str]:
        return [item.outcome for item in parsed]


def _rows_bytes(records: np.ndarray) -> list[bytes]:
    raw = np.ascontiguousarray(records).tobytes()
    size = records.dtype.itemsize
    return [raw[i : i + size] for i in range(0, len(raw), size)]


def _open_flows_per_aggregate(keys: np.ndarray, levels: np.ndarray, is_v6: np.ndarray) -> Counter:
    """agg_key bytes -> open flows it must count: the flow key ANDed with the default mask of
    (level, family of the frames that made the flow)."""
    raw = np.ascontiguousarray(keys).view(np.uint8).reshape(len(keys), FLOW_KEY_DTYPE.itemsize)
    is_v6 = is_v6.astype(np.int64)
    masked = raw & mask_byte_table()[levels.astype(np.int64) * 2 + is_v6]
    agg = np.zeros((len(keys), AGG_KEY_DTYPE.itemsize), np.uint8)
    agg[:, : FLOW_KEY_DTYPE.itemsize] = masked
    agg[:, FLOW_KEY_DTYPE.itemsize] = levels
    return Counter(_rows_bytes(agg.view(AGG_KEY_DTYPE).reshape(-1)))


def _mapped(address: str) -> bytes:
    ip = ipaddress.ip_address(address)
    return ip.packed if ip.version == 6 else V4_MAPPED + ip.packed




LB_MAC, LB_GATEWAY_MAC = "02:00:00:00:00:01", "02:00:00:00:00:fe"
LB_ADDR4, LB_ADDR6 = "10.103.0.1", "fd00:103::1"
LB_MTU = 1500
# backend id -> (address, next-hop MAC, service); service 1 (V4_NO_BACKEND) has no backend
LB_BACKENDS = {1: ("10.103.0.101", "02:00:00:00:01:01", 0), 2: ("fd00:103::66", None, 2)}
LB_VIPS = ((V4, 80, "tcp", 0), (V4, 53, "udp", 0), (V6, 80, "tcp", 2), (V6, 53, "udp", 2),
           (V4_NO_BACKEND, 80, "tcp", 1))
LB_DROP_OUTCOMES = ("no_backend", "too_big", "encap_failed")


class LbTarget:
    """The LB program: XDP_TX exactly for the frames the reference forwards (VIP, not
    tunnelled, whole inner packet present, a backend, fits the MTU) with a byte-exact
    encapsulation; XDP_DROP for no backend / too big; XDP_PASS with the frame unchanged for
    everything else; a connection entry for every forwarded tuple and none for other frames."""

    role = "lb"
    outcome_names = LB_OUTCOME_NAMES
    defines = {"MAGLEV_SIZE": 251, "MAX_CONNS": 262144, "MAX_SERVICES": 4, "MAX_BACKENDS": 16}

    def __init__(self, pin_dir, rng: np.random.Generator) -> None:
        self.pin_dir, self.rng, self.lbctl = pin_dir, rng, lbctl
        lbctl.init_lb_maps(pin_dir, lb_addr4=LB_ADDR4, lb_addr6=LB_ADDR6, src_mac=LB_MAC,
                           gateway_mac=LB_GATEWAY_MAC, mtu=LB_MTU, initial_lease_s=3600.0)
        for backend_id, (address, mac, service) in LB_BACKENDS.items():
            lbctl.add_backend(pin_dir, backend_id, address, services=(service,), mac=mac)
        service_backend = {service: backend_id
                           for backend_id, (_, _, service) in LB_BACKENDS.items()}
        self.vips: dict[bytes, int | None] = {}  # class key bytes -> backend id or None
        for vip, port, proto, service in LB_VIPS:
            lbctl.add_vip(pin_dir, vip, port, proto, service=service)
            key = _mapped(vip) + port.to_bytes(2, "big") + bytes((lbctl.PROTOCOLS[proto],))
            self.vips[key] = service_backend.get(service)
        with lbctl.open_map(pin_dir, "vip_filter") as vip_filter:
            _, counts = vip_filter.items()
            self.filter_bits = vip_filter.max_entries.bit_length() - 1
        self.filter_counts = np.asarray(counts).reshape(-1)
        self.backend_addr = {backend_id: lbctl.address_bytes(address)[0].tobytes()
                             for backend_id, (address, _, _) in LB_BACKENDS.items()}
        self.backend_mac = {backend_id: bytes.fromhex((mac or LB_GATEWAY_MAC).replace(":", ""))
                            for backend_id, (_, mac, _) in LB_BACKENDS.items()}
        self.known: set[bytes] = set()

    def close(self) -> None:
        pass

    def before_batch(self, batch_index: int, epoch_batches: int) -> None:
        """Every epoch: empty the connection table; odd epochs use a 1 ms initial lease (flows
        are re-picked on their next packet: lease-miss and SYN-reuse paths), even ones 1 h."""
        if batch_index % epoch_batches:
            return
        with self.lbctl.open_map(self.pin_dir, "conns") as conns:
            conns.clear()
        self.known = set()
        odd = (batch_index // epoch_batches) % 2
        self.lbctl.set_config(self.pin_dir, initial_lease_s=0.001 if odd else 3600.0)

    def _maybe_vip(self, class_keys: list[bytes]) -> np.ndarray:
        """The VIP pre-filter's answer (vip_filter slot holds a VIP) for each class key."""
        if not class_keys:
            return np.zeros(0, bool)
        keys = np.frombuffer(b"".join(key + b"\0" for key in class_keys), CLASS_KEY_DTYPE)
        return self.filter_counts[self.lbctl.vip_filter_slots(keys, self.filter_bits)] > 0

    def classify(self, parsed: Parsed) -> str:
        return self.classify_batch([parsed])[0]

    def classify_batch(self, parsed: list[Parsed]) -> list[str]:
        """The LB outcome of every frame: its parse outcome, then (in the program's order)
        tunnelled, not_vip (pre-filter), truncated (inner packet incomplete), not_vip (VIP
        table), no_backend, too_big, forwarded."""
        candidates = [i for i, p in enumerate(parsed) if p.outcome == "tracked"
                      and not p.encapsulated]
        maybe = self._maybe_vip([parsed[i].key[16:32] + parsed[i].key[34:37]
                                 for i in candidates])
        outcomes = [p.outcome if p.outcome != "tracked" else "tunnelled" for p in parsed]
        for index, is_maybe in zip(candidates, maybe.tolist(), strict=True):
            outcomes[index] = self._vip_outcome(parsed[index]) if is_maybe else "not_vip"
        return outcomes

    def _vip_outcome(self, parsed: Parsed) -> str:
        class_key = parsed.key[16:32] + parsed.key[34:37]
        if parsed.l3_offset + parsed.l3_len > parsed.frame_len:
            return "truncated"
        if class_key not in self.vips:
            return "not_vip"
        backend_id = self.vips[class_key]
        if backend_id is None:
            return "no_backend"
        outer_len = 40 if ":" in LB_BACKENDS[backend_id][0] else 20
        if parsed.l3_len + outer_len > LB_MTU:
            return "too_big"
        return "forwarded"

    def expected_verdict(self, outcome: str) -> int:
        if outcome == "forwarded":
            return XDP_TX
        return XDP_DROP if outcome in LB_DROP_OUTCOMES else XDP_PASS

    def check(self, report: FuzzReport, parsed: list[Parsed], outcomes: list[str], rows, lengths,
              verdicts, out, out_lengths) -> None:
        expected = np.array([self.expected_verdict(o) for o in outcomes], np.int64)
        wrong = np.flatnonzero(verdicts != expected)
        for index in wrong[:MAX_EXAMPLES].tolist():
            got = int(verdicts[index])
            report.fail("verdict", f"{VERDICT_NAMES[got] if 0 <= got < 5 else got}, reference "
                        f"{outcomes[index]} ({VERDICT_NAMES[expected[index]]})",
                        _frame(rows, lengths, index))
        report.fail_many("verdict", len(wrong) - MAX_EXAMPLES)
        passed = np.flatnonzero((verdicts == XDP_PASS) & (expected == XDP_PASS))
        same = _unchanged(rows[passed], lengths[passed], out[passed], out_lengths[passed])
        for index in passed[~same][:MAX_EXAMPLES].tolist():
            report.fail("packet_changed", "XDP_PASS frame changed", _frame(rows, lengths, index))
        report.fail_many("packet_changed", int((~same).sum()) - MAX_EXAMPLES)
        for index in np.flatnonzero((verdicts == XDP_TX) & (expected == XDP_TX)).tolist():
            problem = self._encapsulation_problem(parsed[index], rows[index], int(lengths[index]),
                                                  out[index], int(out_lengths[index]))
            if problem:
                report.fail("bad_encapsulation", problem, _frame(rows, lengths, index))

        with self.lbctl.open_map(self.pin_dir, "conns") as conns:
            table = _key_set(conns.keys())
        forwarded = {p.key for p, o in zip(parsed, outcomes, strict=True) if o == "forwarded"}
        allowed = forwarded | {p.key for p, o in zip(parsed, outcomes, strict=True)
                               if o == "too_big"}  # picked before the MTU check: documented
        for key in forwarded - table:
            report.fail("forwarded_flow_missing", f"no connection entry for {key.hex()}")
        for key in table - self.known - allowed:
            report.fail("unexpected_connection", f"connection entry {key.hex()} for no VIP frame")
        self.known = table
        report.flows_checked += len(table)

    def _encapsulation_problem(self, parsed: Parsed, row, length: int, out_row,
                               out_length: int) -> str | None:
        class_key = parsed.key[16:32] + parsed.key[34:37]
        backend_id = self.vips[class_key]
        outer_v6 = ":" in LB_BACKENDS[backend_id][0]
        outer_len = 40 if outer_v6 else 20
        want_len = length - parsed.l3_offset + 14 + outer_len
        if out_length != want_len:
            return f"output {out_length} bytes, expected {want_len}"
        frame = out_row[:out_length].tobytes()
        inner = row[parsed.l3_offset : length].tobytes()
        if frame[14 + outer_len :] != inner:
            return "inner packet changed"
        if frame[:6] != self.backend_mac[backend_id] or frame[6:12] != bytes.fromhex(
                LB_MAC.replace(":", "")):
            return "wrong Ethernet addresses"
        inner_proto = IPPROTO_IPV6 if parsed.is_v6 else IPPROTO_IPIP
        outer = frame[14 : 14 + outer_len]
        if outer_v6:
            fields = (frame[12:14] == b"\x86\xdd", outer[0] >> 4 == 6,
                      int.from_bytes(outer[4:6], "big") == parsed.l3_len,
                      outer[6] == inner_proto, outer[24:40] == self.backend_addr[backend_id])
        else:
            fields = (frame[12:14] == b"\x08\x00", outer[0] == 0x45,
                      int.from_bytes(outer[2:4], "big") == parsed.l3_len + 20,
                      outer[9] == inner_proto, outer[16:20] == self.backend_addr[backend_id][12:],
                      _ipv4_checksum(outer) == 0)
        names = ("ethertype", "version", "length", "protocol", "destination", "checksum")
        bad = [name for name, ok in zip(names, fields, strict=False) if not ok]
        return f"outer header wrong: {', '.join(bad)}" if bad else None


def _ipv4_checksum(header: bytes) -> int:
    words = np.frombuffer(header, ">u2").astype(np.int64)
    total = int(words.sum())
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total) & 0xFFFF


