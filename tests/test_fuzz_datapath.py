"""Datapath fuzzing (connpub.testing.fuzz, docs/fuzzing.md): the reference parser against the
fixture tables, the mutator, mutated frames through both XDP programs under BPF_PROG_TEST_RUN, and
regressions for the datapath bugs fuzzing found."""

from __future__ import annotations

import json

import numpy as np
import pytest
from connpub.datapath import testrun
from connpub.datapath.abi import AGG_KEY_DTYPE, AGG_VALUE_DTYPE, CLASS_KEY_DTYPE, CLASS_LEVEL_DTYPE
from connpub.datapath.maps import PinnedMap
from connpub.testing import fuzz
from datapath_fixtures import mapped
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from test_server_xdp import TRACKED, UNTRACKED

# Frames that trigger the two datapath bugs reported to the lead (docs/fuzzing.md "Bugs
# found"); the fast and slow runs leave them out so that they cannot hide other failures. The
# findings the datapath is known to mishandle (skipped by the fuzz runs); none at present.
KNOWN_BUG_FINDINGS: tuple[str, ...] = ()
FAST_PACKETS = 20_000
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def key_of(client: str, vip: str, client_port: int, vip_port: int, proto: int) -> bytes:
    return (mapped(client) + mapped(vip) + client_port.to_bytes(2, "big")
            + vip_port.to_bytes(2, "big") + bytes((proto, 0, 0, 0)))


# ---------------------------------------------------------------------------------------------
# the reference parser and the mutator (no kernel needed)


@pytest.mark.parametrize("description,packet,tuple_", TRACKED, ids=[f[0] for f in TRACKED])
def test_reference_parser_tracks_the_tracked_fixtures(description, packet, tuple_):
    parsed = fuzz.reference_parse(bytes(packet))
    assert parsed.outcome == "tracked", description
    assert parsed.key == key_of(*tuple_)


@pytest.mark.parametrize("description,packet,outcome", UNTRACKED, ids=[f[0] for f in UNTRACKED])
def test_reference_parser_gives_the_untracked_fixtures_their_outcome(description, packet,
                                                                     outcome):
    assert fuzz.reference_parse(bytes(packet)).outcome == outcome


def test_reference_parser_limits_and_findings():
    corpus = dict(fuzz.build_corpus())
    outcome = {name: fuzz.reference_parse(frame) for name, frame in corpus.items()}
    assert outcome["3 vlan tags"].outcome == "non_ip"  # VLAN_MAX_DEPTH = 2
    assert outcome["ipv6 4 ext headers"].outcome == "tracked"  # IPV6_EXT_MAX_CHAIN = 4
    assert outcome["ipv6 5 ext headers"].outcome == "unsupported"
    assert outcome["ipv6 fragment after 4"].outcome == "unsupported"
    assert outcome["4in6 in 6in4"].outcome == "unsupported"  # one tunnel level only
    assert outcome["ipv6 ah"].outcome == "tracked"
    assert outcome["ipv6 hbh twice"].findings == ("hopopts_not_first",)
    assert outcome["ipv6 v4-mapped"].outcome == "malformed"  # RFC 4291 2.5.5.2
    wrapped = bytearray(corpus["ipv6 tcp syn"])
    wrapped[18:20] = (0xFFD8).to_bytes(2, "big")
    parsed = fuzz.reference_parse(bytes(wrapped))
    assert (parsed.outcome, parsed.l3_len) == ("tracked", 65536)
    assert set(parsed.findings) == {"ip_length_beyond_frame"}


@settings(max_examples=2000, deadline=None)
@given(st.binary(min_size=0, max_size=300))
def test_reference_parser_never_raises(frame):
    parsed = fuzz.reference_parse(frame)
    assert parsed.outcome in fuzz.SERVER_OUTCOME_NAMES
    assert (parsed.key is not None) == (parsed.outcome == "tracked")


def test_mutator_is_reproducible_and_bounded():
    corpus = fuzz.Corpus.from_frames(fuzz.build_corpus())
    rows_a, lengths_a = fuzz.Mutator(corpus, seed=5).batch(5000)
    rows_b, lengths_b = fuzz.Mutator(corpus, seed=5).batch(5000)
    assert np.array_equal(rows_a, rows_b) and np.array_equal(lengths_a, lengths_b)
    assert lengths_a.min() >= fuzz.MIN_FRAME and lengths_a.max() <= fuzz.STRIDE
    outcomes = {fuzz.reference_parse(rows_a[i, : lengths_a[i]].tobytes()).outcome
                for i in range(len(lengths_a))}
    assert outcomes == set(fuzz.SERVER_OUTCOME_NAMES) - {"table_full"}
    seeds = {frame for _, frame in fuzz.build_corpus()}
    unchanged = sum(rows_a[i, : lengths_a[i]].tobytes() in seeds for i in range(len(lengths_a)))
    assert unchanged < len(lengths_a) // 2  # most frames are mutated


# ---------------------------------------------------------------------------------------------
# through the kernel


def assert_clean(report: fuzz.FuzzReport, packets: int) -> None:
    detail = json.dumps(report.failure_examples, indent=1)[:4000]
    assert report.failures == {}, detail
    assert report.packets == packets
    assert sum(report.outcomes.values()) == packets  # every frame counted in one outcome
    assert report.outcomes == report.expected_outcomes
    assert sum(report.verdicts.values()) == packets


@pytest.mark.root
def test_server_fuzz_fast():
    report = fuzz.fuzz_datapath("server", FAST_PACKETS, seed=11,
                                skip_findings=KNOWN_BUG_FINDINGS)
    assert_clean(report, FAST_PACKETS)
    assert report.verdicts == {"XDP_PASS": FAST_PACKETS}
    assert set(report.outcomes) == set(fuzz.SERVER_OUTCOME_NAMES) - {"table_full"}
    assert report.flows_checked > 0 and report.aggregates_checked > 0


@pytest.mark.root
def test_lb_fuzz_fast():
    report = fuzz.fuzz_datapath("lb", FAST_PACKETS, seed=12, skip_findings=KNOWN_BUG_FINDINGS)
    assert_clean(report, FAST_PACKETS)
    assert set(report.verdicts) == {"XDP_PASS", "XDP_DROP", "XDP_TX"}
    assert {"forwarded", "not_vip", "tunnelled", "no_backend", "too_big", "truncated",
            "malformed", "fragment", "unsupported", "non_ip"} <= set(report.outcomes)
    assert report.flows_checked > 0


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("role", ["server", "lb"])
def test_fuzz_one_million_frames(role):
    packets = 1_000_000
    report = fuzz.fuzz_datapath(role, packets, seed=21, skip_findings=KNOWN_BUG_FINDINGS)
    assert_clean(report, packets)


@pytest.mark.root
def test_bench_fuzz_command_json():
    from click.testing import CliRunner
    from connpub.cli import main

    args = ["bench", "fuzz", "--program", "server", "--packets", "3000", "--batch", "1000",
            "--json"] + [f"--skip-finding={name}" for name in KNOWN_BUG_FINDINGS]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["server"]
    assert (report["packets"], report["failures"]) == (3000, {})
    assert report["batches"] >= 3  # batches of 1000 frames, fewer run when some are skipped
    assert sum(report["outcomes"].values()) == 3000
    bad = CliRunner().invoke(main, ["bench", "fuzz", "--skip-finding", "nope"])
    assert bad.exit_code == 2 and "unknown findings ['nope']" in bad.output


# ---------------------------------------------------------------------------------------------
# regressions for the bugs fuzzing found (fixed)


def run(program, frame: bytes) -> testrun.RunResult:
    return testrun.run(program.prog_fd, frame)


@pytest.mark.root
def test_lb_does_not_forward_an_ipv6_frame_whose_length_wraps_16_bits():
    frame = bytearray(bytes(ETH / IPv6(src=fuzz.C6, dst=fuzz.V6) / TCP(sport=40001, dport=80,
                                                                        flags="S") / Raw(b"p")))
    frame[18:20] = (0xFFD8).to_bytes(2, "big")  # payload_len: 65496 + 40 = 65536 -> 0
    assert fuzz.reference_parse(bytes(frame)).l3_len == 65536
    with fuzz.scratch_target("lb") as (program, target):
        result = run(program, bytes(frame))
        assert target.classify(fuzz.reference_parse(bytes(frame))) == "truncated"
        assert result.verdict_name == "XDP_PASS"


@pytest.mark.root
def test_server_active_flows_stay_positive_when_ipv4_and_mapped_ipv6_share_a_key():
    syn4 = ETH / IP(src=fuzz.C4, dst=fuzz.V4) / TCP(sport=40001, dport=80, flags="S")
    fin6 = ETH / IPv6(src="::ffff:" + fuzz.C4, dst="::ffff:" + fuzz.V4) / \
        TCP(sport=40001, dport=80, flags="FA")
    with fuzz.scratch_target("server") as (program, target):
        key = np.zeros(1, CLASS_KEY_DTYPE)
        key["vip_addr"] = np.frombuffer(mapped(fuzz.V4), np.uint8)
        key["vip_port"], key["proto"] = 80, 6
        target.classes.update(key, np.array(3, CLASS_LEVEL_DTYPE))  # subnet level
        fuzz.loader.init_server_maps(program.pin_dir)
        for packet in (syn4, fin6):
            assert run(program, bytes(packet)).verdict_name == "XDP_PASS"
        _, values = target.aggregates.items()
        assert values["active_flows"].sum(axis=1).min() >= 0


@pytest.mark.root
def test_server_flow_refused_by_a_full_aggregate_table_never_decrements():
    pin_dir = fuzz.loader.scratch_pin_dir("fuzz-aggfull")
    program = fuzz.loader.compile_program("server", pin_dir, {"MAX_AGGREGATES": 2})
    try:
        fuzz.loader.init_server_maps(pin_dir, default_level=2)
        for client in ("10.1.0.1", "10.1.0.2", "10.1.0.3"):  # the third finds the table full
            run(program, bytes(ETH / IP(src=client, dst=fuzz.V4) / TCP(sport=1000, dport=80,
                                                                       flags="S")))
        with PinnedMap(pin_dir / "aggregates", AGG_KEY_DTYPE, AGG_VALUE_DTYPE) as aggregates:
            keys, _ = aggregates.items()
            aggregates.delete(keys[0:1])  # what the server agent does to a stale aggregate
            run(program, bytes(ETH / IP(src="10.1.0.3", dst=fuzz.V4) / TCP(sport=1000, dport=80,
                                                                           flags="FA")))
            _, values = aggregates.items()
        assert values["active_flows"].sum(axis=1).min() >= 0
    finally:
        program.close()
        fuzz.loader.remove_pins(pin_dir)
