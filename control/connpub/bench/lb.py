"""ns/packet of the LB-node program under BPF_PROG_TEST_RUN: flow-table hit with the table
pre-filled, new flow (Maglev + insert), non-VIP, and at a level-2 VIP (docs/lb.md
"Aggregates") aggregate hit, aggregate-member new flow and new aggregate (Maglev over the
masked tuple + insert), beside an empty program on the same packet.

The LB program rewrites the packet and BPF_PROG_TEST_RUN with repeat reuses one buffer, so the
rewriting runs go through a wrapper (bpf/lb/lb_bench.c) that undoes the previous iteration's
encapsulation and tail-calls the program. The wrapper's own cost is measured by tail-calling an
empty program instead, and subtracted, round by round: each figure is the median of interleaved
rounds (docs/lb.md "Cost"). Every run checks the verdict counters: all `repeat` iterations must
have been forwarded (and hit, or been new flows / members / aggregates as the case says)."""

from __future__ import annotations

import ctypes
import ipaddress
import logging
from pathlib import Path

import numpy as np
from scapy.layers.inet import IP, TCP, Ether
from scapy.packet import Raw

from connpub import paths
from connpub.datapath import lbctl, lbleases, loader, testrun
from connpub.datapath.abi import FLOW_KEY_DTYPE, LB_CONN_DTYPE
from connpub.errors import ConnpubError

log = logging.getLogger(__name__)

VIP = "10.200.0.1"
AGG_VIP = "10.200.0.3"  # the same service at level 2 (client + VIP): every flow is a member
AGG_LEVEL = 2
CLIENT = "10.100.1.2"  # AGG_MEMBER_CLIENT_BASE of bpf/lb/lb_bench.c
AGG_MEMBER_CLIENTS = 16  # clients (aggregates) xdp_bench_new_member's SYNs are members of
# (n * COLD_STRIDE) % count: a prime, so every prefilled flow in turn, in an order unrelated to
# memory
COLD_STRIDE = 2_654_435_761
BACKEND_COUNT = 10
LB_MAC, GW_MAC = "02:00:00:00:00:01", "02:00:00:00:00:fe"
PAYLOAD = 64  # bytes of TCP payload in the benchmark packet
FAR_FUTURE_NS = 1 << 62


def bench_packet(flags: str, dst: str = VIP, src: str = CLIENT) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:aa", dst=LB_MAC) / IP(src=src, dst=dst)
                 / TCP(sport=40000, dport=80, flags=flags) / Raw(bytes(PAYLOAD)))


def _conn_table_size(entries: int) -> int:
    return 1 << max(16, int(entries - 1).bit_length())


PREFILL_CLIENT_BASE = 0xAC100000  # 172.16.0.0, PREFILL_CLIENT_BASE of bpf/lb/lb_bench.c


def _prefill(pin_dir: Path, count: int, rng: np.random.Generator) -> None:
    """`count` IPv4 flows to the VIP, leased far ahead: client 172.16.0.0 + i, the benchmark
    packet's ports (xdp_bench_prefilled cycles through them)."""
    keys = np.zeros(count, FLOW_KEY_DTYPE)
    keys["client_addr"][:, 10:12] = 0xFF
    clients = (PREFILL_CLIENT_BASE + np.arange(count)).astype(">u4")
    keys["client_addr"][:, 12:16] = clients.view(np.uint8).reshape(-1, 4)
    keys["vip_addr"][:, 10:12] = 0xFF
    keys["vip_addr"][:, 12:16] = np.frombuffer(bytes(map(int, VIP.split("."))), np.uint8)
    keys["client_port"] = 40000
    keys["vip_port"] = 80
    keys["proto"] = 6
    values = np.zeros(count, LB_CONN_DTYPE)
    values["lease_expiry_ns"] = FAR_FUTURE_NS
    values["backend_id"] = rng.integers(1, BACKEND_COUNT + 1, count)
    with lbctl.open_map(pin_dir, "conns") as conns:
        conns.update_batch(keys, values)


class _Bench:
    """The LB program and the wrappers compiled into one object with scratch pins."""

    def __init__(self, conn_entries: int):
        from connpub.datapath.clock import datapath_clock  # noqa: PLC0415 - calibrates once

        bcc = loader.import_bcc()
        loader.check_headers()
        self.pin_dir = loader.scratch_pin_dir("benchlb")
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        defines = {"MAX_CONNS": conn_entries,
                   "NS_PER_JIFFY": f"{datapath_clock().ns_per_jiffy}ULL"}
        source = "\n".join((paths.BPF_DIR / "lb" / name).read_text()
                           for name in ("lb.c", "lb_bench.c"))
        try:
            self.bpf = bcc.BPF(text=source, cflags=loader.cflags_for("lb", self.pin_dir, defines))
            self.fds = {name: self.bpf.load_func(name, bcc.BPF.XDP).fd for name in (
                "xdp_lb", "xdp_bench_restore", "xdp_bench_new_flow", "xdp_bench_new_member",
                "xdp_bench_prefilled", "xdp_bench_empty")}
        except Exception as err:
            loader.remove_pins(self.pin_dir)
            raise ConnpubError(f"cannot load the LB benchmark: {str(err).splitlines()[0]}") \
                from err

    def close(self) -> None:
        self.bpf.cleanup()
        loader.remove_pins(self.pin_dir)

    def target(self, name: str) -> None:
        self.bpf[b"bench_next"][ctypes.c_int(0)] = ctypes.c_int(self.fds[name])

    def set_prefilled(self, count: int, stride: int) -> None:
        self.bpf[b"bench_prefilled"][ctypes.c_int(0)] = ctypes.c_uint32(count)
        self.bpf[b"bench_prefilled"][ctypes.c_int(1)] = ctypes.c_uint32(stride)

    def set_eth(self, packet: bytes) -> None:
        table = self.bpf[b"bench_eth"]
        table[ctypes.c_int(0)] = table.Leaf.from_buffer_copy(packet[:14])

    def run(self, prog: str, packet: bytes, repeat: int) -> tuple[testrun.RunResult, dict]:
        before = lbctl.read_stats(self.pin_dir)
        result = testrun.run(self.fds[prog], packet, repeat)
        after = lbctl.read_stats(self.pin_dir)
        return result, {name: after[name] - before[name] for name in after}


def _expect(delta: dict, result: testrun.RunResult, repeat: int, verdict: int,
            **counts: int) -> None:
    if result.verdict != verdict:
        raise ConnpubError(f"benchmark verdict {result.verdict_name}, expected "
                           f"{testrun.VERDICT_NAMES[verdict]}: counters {delta}")
    for name, want in counts.items():
        if delta[name] != want:
            raise ConnpubError(f"benchmark counted {name} = {delta[name]} over {repeat} runs, "
                               f"expected {want}: the packet was not restored every iteration")


def _round(bench: _Bench, repeat: int, prefill: int) -> dict[str, float]:
    """One interleaved round: the empty program, every wrapper and every repeatable case, each
    `repeat` iterations, in this order (none inserts: the table is the same in every round).
    Figures are the LB program alone: wrapped time - that round's wrapper time + empty."""
    raw: dict[str, float] = {}
    bench.set_prefilled(prefill - 1, COLD_STRIDE)
    hit_packet, cold_packet = bench_packet("A"), bench_packet("A", src="172.16.0.0")
    agg_hit_packet, member_packet = bench_packet("A", dst=AGG_VIP), bench_packet("S", dst=AGG_VIP)
    result, _ = bench.run("xdp_bench_empty", hit_packet, repeat)
    raw["empty_ns"] = result.duration_ns
    bench.target("xdp_bench_empty")
    for name, prog, packet in (("wrapper_ns", "xdp_bench_restore", hit_packet),
                               ("wrapper_new_flow_ns", "xdp_bench_new_flow", member_packet),
                               ("wrapper_new_member_ns", "xdp_bench_new_member", member_packet),
                               ("wrapper_prefilled_ns", "xdp_bench_prefilled", cold_packet)):
        raw[name] = bench.run(prog, packet, repeat)[0].duration_ns
    bench.target("xdp_lb")
    cases = (
        ("hit", "xdp_bench_restore", hit_packet, COLD_STRIDE, {"lease_hit": repeat}),
        ("hit_cold", "xdp_bench_prefilled", cold_packet, COLD_STRIDE, {"lease_hit": repeat}),
        ("hit_cold_inserted_order", "xdp_bench_prefilled", cold_packet, 1,
         {"lease_hit": repeat}),
        ("agg_hit", "xdp_bench_restore", agg_hit_packet, COLD_STRIDE,
         {"agg_hit": repeat, "agg_member": repeat, "lease_hit": 0, "agg_insert": 0}),
        ("agg_new_member", "xdp_bench_new_member", member_packet, COLD_STRIDE,
         {"agg_hit": repeat, "agg_member": repeat, "agg_insert": 0, "new_flow": 0,
          "transition_flow": 0, "lease_hit": 0}),
    )
    wrappers = {"xdp_bench_restore": "wrapper_ns", "xdp_bench_new_member": "wrapper_new_member_ns",
                "xdp_bench_prefilled": "wrapper_prefilled_ns"}
    figures = dict(raw)
    for name, prog, packet, stride, counts in cases:
        bench.set_prefilled(prefill - 1, stride)
        result, delta = bench.run(prog, packet, repeat)
        _expect(delta, result, repeat, testrun.XDP_TX, forwarded=repeat, **counts)
        figures[f"{name}_ns"] = result.duration_ns - raw[wrappers[prog]] + raw["empty_ns"]
    result, delta = bench.run("xdp_lb", bench_packet("A", dst="10.200.0.2"), repeat)
    _expect(delta, result, repeat, testrun.XDP_PASS, not_vip=repeat)
    figures["not_vip_ns"] = result.duration_ns
    figures["agg_new_member_vs_hit_cold"] = figures["agg_new_member_ns"] / figures["hit_cold_ns"]
    return figures


def bench_lb(repeat: int = 1_000_000, prefill: int = 1_000_000, seed: int = 1,
             rounds: int = 5) -> dict[str, float]:
    """ns/packet figures, each the median over `rounds` interleaved rounds (`_round`) of the mean
    over `repeat` BPF_PROG_TEST_RUN iterations:
    empty: empty program; wrapper*: a restore wrapper + tail call to an empty program;
    hit / new_flow / not_vip: the LB program alone (its wrapper's cost removed), and the same
    minus the empty floor (*_minus_floor); hit_cold: hits cycling through the prefilled flows
    in an order unrelated to where their entries sit in memory (a cold lookup, as interleaved
    real traffic makes it), unlike `hit`, which repeats one flow (a hot cache line);
    hit_cold_inserted_order: the same in the order they were inserted (adjacent entries: the
    prefetcher helps). At a level-2 VIP: agg_hit (a member's ACK, its aggregate's entry valid,
    one flow repeated), agg_new_member (SYNs of 2^20 distinct new members of 16 leased
    aggregates: a cold connection-table miss, no insert) and agg_new_aggregate (every
    iteration another client: Maglev over the masked tuple + insert). The connection table holds
    `prefill` flows while all but the two insert cases run; those run once, after the rounds.
    agg_new_member_vs_hit(_cold) = agg_new_member_ns / hit(_cold)_ns of the medians;
    agg_new_member_vs_hit_cold_min/_max: the lowest / highest ratio of a single round."""
    if repeat < 1 or prefill < 2 or rounds < 1:
        raise ConnpubError("the LB benchmark needs repeat >= 1, prefill >= 2 and rounds >= 1")
    rng = np.random.default_rng(seed)
    bench = _Bench(_conn_table_size(prefill + repeat + 1))
    try:
        pin_dir = bench.pin_dir
        lbctl.init_lb_maps(pin_dir, lb_addr4="10.103.0.1", lb_addr6="fd00:103::1",
                           src_mac=LB_MAC, gateway_mac=GW_MAC)
        for backend_id in range(1, BACKEND_COUNT + 1):
            lbctl.add_backend(pin_dir, backend_id, f"10.103.0.{100 + backend_id}")
        lbctl.add_vip(pin_dir, VIP, 80, "tcp")
        lbctl.add_vip(pin_dir, AGG_VIP, 80, "tcp", level=AGG_LEVEL)
        _prefill(pin_dir, prefill - 1, rng)
        hit_packet = bench_packet("A")
        # the hit packet's own flow: the last of the `prefill` entries
        lbctl.apply_flow_leases(pin_dir, _key_of(hit_packet), 1, FAR_FUTURE_NS, now_ns=0)
        bench.set_eth(hit_packet)  # every benchmark packet has this Ethernet header
        for client in _member_clients():  # the aggregates agg_hit / agg_new_member hit
            result, delta = bench.run("xdp_lb", bench_packet("S", dst=AGG_VIP, src=client), 1)
            _expect(delta, result, 1, testrun.XDP_TX, forwarded=1, agg_insert=1)
        _lease_far_ahead(pin_dir)  # as a publish would: no round sees them expire

        per_round = [_round(bench, repeat, prefill) for _ in range(rounds)]
        figures = {name: float(np.median([r[name] for r in per_round])) for name in per_round[0]}
        ratios = [r["agg_new_member_vs_hit_cold"] for r in per_round]
        figures["agg_new_member_vs_hit_cold_min"] = min(ratios)
        figures["agg_new_member_vs_hit_cold_max"] = max(ratios)

        bench.target("xdp_lb")
        new_aggregate = bench_packet("S", dst=AGG_VIP)
        result, delta = bench.run("xdp_bench_new_flow", new_aggregate, repeat)
        _expect(delta, result, repeat, testrun.XDP_TX, forwarded=repeat, agg_insert=repeat,
                new_flow=repeat)
        figures["agg_new_aggregate_ns"] = (result.duration_ns - figures["wrapper_new_flow_ns"]
                                           + figures["empty_ns"])
        result, delta = bench.run("xdp_bench_new_flow", bench_packet("S"), repeat)
        _expect(delta, result, repeat, testrun.XDP_TX, forwarded=repeat, new_flow=repeat,
                lease_hit=0)
        figures["new_flow_ns"] = (result.duration_ns - figures["wrapper_new_flow_ns"]
                                  + figures["empty_ns"])

        empty = figures["empty_ns"]
        for name in ("hit", "hit_cold", "hit_cold_inserted_order", "new_flow", "not_vip",
                     "agg_hit", "agg_new_member", "agg_new_aggregate"):
            figures[f"{name}_minus_floor_ns"] = figures[f"{name}_ns"] - empty
        figures["agg_new_member_vs_hit"] = figures["agg_new_member_ns"] / figures["hit_ns"]
        figures["agg_new_member_vs_hit_cold"] = (figures["agg_new_member_ns"]
                                                 / figures["hit_cold_ns"])
        with lbctl.open_map(pin_dir, "conns") as conns:
            figures["conn_table_entries"] = float(conns.max_entries)
        figures["prefill"] = float(prefill)
        figures["repeat"] = float(repeat)
        figures["rounds"] = float(rounds)
        return {name: float(value) for name, value in figures.items()}
    finally:
        bench.close()


def _lease_far_ahead(pin_dir: Path) -> None:
    """Every aggregate entry leased until FAR_FUTURE_NS."""
    keys, values = lbleases.read_agg_leases(pin_dir)
    values["lease_expiry_ns"] = FAR_FUTURE_NS
    with lbctl.open_map(pin_dir, "agg_leases") as leases:
        leases.update_batch(keys, values)


def _member_clients() -> list[str]:
    """The clients of xdp_bench_new_member: CLIENT + 0 .. AGG_MEMBER_CLIENTS - 1."""
    base = int(ipaddress.ip_address(CLIENT))
    return [str(ipaddress.ip_address(base + i)) for i in range(AGG_MEMBER_CLIENTS)]


def _key_of(packet: bytes) -> np.ndarray:
    ip = Ether(packet)[IP]
    key = np.zeros(1, FLOW_KEY_DTYPE)
    key["client_addr"] = lbctl.address_bytes(ip.src)[0]
    key["vip_addr"] = lbctl.address_bytes(ip.dst)[0]
    key["client_port"], key["vip_port"], key["proto"] = ip[TCP].sport, ip[TCP].dport, 6
    return key
