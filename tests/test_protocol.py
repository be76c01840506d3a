"""Wire protocol: round trips, MTU splitting, authentication, replay, entry checks, fuzzing."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter

import numpy as np
import pytest
from connpub.config import Config, LeaseConfig, MasksConfig
from connpub.datapath.abi import PUBLISH_ENTRY_DTYPE
from connpub.datapath.masks import MaskSpec, apply_masks, mask_byte_table
from connpub.errors import ConnpubError
from connpub.protocol import wire as P
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_helpers import random_directive_entries, random_publish_entries

KEY = bytes(range(32))
MAX_LEASE_MS = 300_000
SENDER = 7


def decoder(**kwargs) -> P.Decoder:
    return P.Decoder(KEY, max_lease_ms=MAX_LEASE_MS, **kwargs)


def resign(packet: bytes, key: bytes = KEY) -> bytes:
    """Recompute the tag so a deliberately broken body gets past authentication."""
    body = packet[: -P.TAG_LEN]
    return body + P._tag(key, body)


def one_packet(entries: np.ndarray, sequence: int = 1) -> bytes:
    packets = P.encode_publish(entries, sender_id=SENDER, first_sequence=sequence,
                               timestamp_ns=5, key=KEY, mtu=9000)
    assert len(packets) == 1
    return packets[0]


def valid_entries(count: int = 3, seed: int = 0) -> np.ndarray:
    return random_publish_entries(np.random.default_rng(seed), count, SENDER, MAX_LEASE_MS)


# Worked example of docs/protocol.md (same bytes).
WORKED_EXAMPLE_HEX = (
    "43505542010100000000000700000000" "0000002a17979cfe362a000000010000"
    "0102cccc000000070000000000000000" "0000ffffc000024d0000000000000000"
    "0000ffffc633640a000001bb06000000" "00000003000000000001e240000000fa"
    "0000afc8000000001fce3406e34ee2c2" "a84f76c30c5a6d42"
)


def test_worked_example_matches_docs():
    entry = np.zeros(1, PUBLISH_ENTRY_DTYPE)
    key = entry["key"]
    key["client_addr"][0] = list(bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 77]))
    key["vip_addr"][0] = list(bytes(10) + b"\xff\xff" + bytes([198, 51, 100, 10]))
    key["vip_port"], key["proto"] = 443, 6
    entry["level"], entry["flags"], entry["confidence"] = 1, P.FLAG_RENEW, 52428
    entry["backend_id"], entry["flow_count"], entry["bytes"] = 7, 3, 123456
    entry["last_activity_age_ms"], entry["predicted_remaining_ms"] = 250, 45000
    packets = P.encode_publish(entry, sender_id=7, first_sequence=42,
                               timestamp_ns=1_700_000_000_000_000_000, key=KEY, mtu=1500)
    assert [p.hex() for p in packets] == [WORKED_EXAMPLE_HEX]
    result = decoder().decode(packets[0], now_ns=0)
    assert result.reason is None
    assert (result.packet_type, result.sender_id, result.sequence) == (P.PacketType.PUBLISH, 7, 42)
    assert result.timestamp_ns == 1_700_000_000_000_000_000
    assert result.entries.tobytes() == entry.tobytes()


@settings(max_examples=60, deadline=None)
@given(count=st.integers(0, 400), seed=st.integers(0, 2**32 - 1),
       mtu=st.integers(576, 9000), ip_version=st.sampled_from([4, 6]))
def test_publish_round_trip_split_to_mtu(count, seed, mtu, ip_version):
    entries = random_publish_entries(np.random.default_rng(seed), count, SENDER, MAX_LEASE_MS)
    packets = P.encode_publish(entries, sender_id=SENDER, first_sequence=1000,
                               timestamp_ns=123, key=KEY, mtu=mtu, ip_version=ip_version)
    ip_len = P.IPV4_HEADER_LEN if ip_version == 4 else P.IPV6_HEADER_LEN
    assert all(len(p) + ip_len + P.UDP_HEADER_LEN <= mtu for p in packets)
    per_packet = P.max_entries_per_packet(PUBLISH_ENTRY_DTYPE.itemsize, mtu, ip_version)
    assert len(packets) == -(-count // per_packet)
    results = decoder().decode_batch(packets, now_ns=0)
    assert [r.reason for r in results] == [None] * len(packets)
    assert [r.sequence for r in results] == list(range(1000, 1000 + len(packets)))
    decoded = P.accepted_entries(results, P.PacketType.PUBLISH)
    assert decoded.dtype == PUBLISH_ENTRY_DTYPE
    assert decoded.tobytes() == entries.tobytes()


@settings(max_examples=30, deadline=None)
@given(count=st.integers(1, 300), seed=st.integers(0, 2**32 - 1), mtu=st.integers(576, 9000))
def test_directive_round_trip(count, seed, mtu):
    entries = random_directive_entries(np.random.default_rng(seed), count)
    packets = P.encode_directive(entries, sender_id=1, first_sequence=5, timestamp_ns=9, key=KEY,
                                 mtu=mtu)
    assert all(len(p) + 48 <= mtu for p in packets)
    results = decoder().decode_batch(packets, now_ns=0)
    assert all(r.packet_type == P.PacketType.DIRECTIVE for r in results)
    decoded = P.accepted_entries(results, P.PacketType.DIRECTIVE)
    assert decoded.tobytes() == entries.tobytes()


def test_resync_request_round_trip_and_encoder_sequence():
    encoder = P.Encoder(3, KEY, mtu=1400, first_sequence=10)
    request = encoder.resync_request(timestamp_ns=77)
    assert len(request) == P.HEADER_LEN + P.TAG_LEN
    packets = encoder.publish(valid_entries(40), timestamp_ns=78)
    assert encoder.next_sequence == 11 + len(packets)
    result = P.Decoder(KEY, max_lease_ms=MAX_LEASE_MS, require_backend_is_sender=False).decode(
        request, 0)
    assert (result.reason, result.packet_type, result.sequence) == (
        None, P.PacketType.RESYNC_REQUEST, 10)
    assert result.entries is None


def test_no_entries_no_packets():
    assert P.encode_publish(valid_entries(0), sender_id=1, first_sequence=1, timestamp_ns=0,
                            key=KEY, mtu=1400) == []


def test_wrong_key_and_tag_bit_flip_are_bad_tag():
    packet = one_packet(valid_entries())
    assert P.Decoder(b"x" * 32, max_lease_ms=MAX_LEASE_MS).decode(packet, 0).reason == "bad_tag"
    flipped = packet[:-1] + bytes([packet[-1] ^ 1])
    assert decoder().decode(flipped, 0).reason == P.Reject.BAD_TAG


@settings(max_examples=200, deadline=None)
@given(bit=st.integers(0, (P.HEADER_LEN + 3 * 72 + P.TAG_LEN) * 8 - 1))
def test_any_single_bit_flip_is_rejected_with_the_field_reason(bit):
    packet = bytearray(one_packet(valid_entries()))
    packet[bit // 8] ^= 1 << (bit % 8)
    reason = decoder().decode(bytes(packet), 0).reason
    byte = bit // 8
    expected = {0: "bad_magic", 1: "bad_magic", 2: "bad_magic", 3: "bad_magic",
                4: "bad_version", 5: "bad_type", 6: "bad_padding", 7: "bad_padding",
                28: "bad_length", 29: "bad_length", 30: "bad_padding", 31: "bad_padding"}
    if byte == 5 and (packet[5] in (2, 3)):
        assert reason == "bad_length"  # another known type: length does not add up
    else:
        assert reason == expected.get(byte, "bad_tag")


def test_replay_window():
    packets = P.encode_publish(valid_entries(450), sender_id=SENDER, first_sequence=1,
                               timestamp_ns=0, key=KEY, mtu=576)
    assert len(packets) >= 70
    dec = decoder(replay_window=64)
    assert dec.decode(packets[0], 0).accepted
    assert dec.decode(packets[0], 0).reason == P.Reject.REPLAY
    assert dec.decode(packets[69], 0).accepted  # jump ahead: seq 70
    assert dec.decode(packets[10], 0).accepted  # seq 11: 59 behind, inside the window
    assert dec.decode(packets[10], 0).reason == "replay"
    assert dec.decode(packets[5], 0).reason == "replay"  # seq 6: 64 behind, outside
    assert dec.decode(packets[6], 0).accepted  # seq 7: 63 behind, last slot of the window
    assert dec.counts["accepted"] == 4 and dec.counts["replay"] == 3


def test_replay_window_is_per_sender_and_inside_a_batch():
    entries_a = valid_entries()
    entries_b = entries_a.copy()
    entries_b["backend_id"] = 8
    packet_a = one_packet(entries_a, sequence=5)
    packet_b = P.encode_publish(entries_b, sender_id=8, first_sequence=5, timestamp_ns=5,
                                key=KEY, mtu=9000)[0]
    results = decoder().decode_batch([packet_a, packet_b, packet_a])
    assert [r.reason for r in results] == [None, None, "replay"]


def test_replay_window_unit():
    window = P.ReplayWindow(4)
    for sequence in (10, 8, 7):
        assert window.is_fresh(sequence)
        window.accept(sequence)
    assert not window.is_fresh(6)  # 4 behind 10
    assert window.is_fresh(9) and not window.is_fresh(8)
    window.accept(1000)
    assert window.bitmap == 1 and window.highest == 1000 and not window.is_fresh(10)


def _broken(mutate) -> bytes:
    entries = valid_entries()
    mutate(entries)
    return one_packet(entries)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda e: e["level"].__setitem__(1, 4), "bad_level"),
        (lambda e: e["flags"].__setitem__(0, 0x08), "bad_flags"),
        (lambda e: e["reserved"].__setitem__(2, 1), "bad_padding"),
        (lambda e: e["key"]["pad"].__setitem__((0, 1), 1), "bad_padding"),
        (lambda e: e["backend_id"].__setitem__(0, SENDER + 1), "bad_backend"),
        (lambda e: e["predicted_remaining_ms"].__setitem__(1, MAX_LEASE_MS + 1),
         "lease_too_long"),
    ],
)
def test_entry_checks_reject_the_whole_packet(mutate, reason):
    dec = decoder()
    result = dec.decode(_broken(mutate), 0)
    assert (result.reason, result.entries) == (reason, None)
    assert dec.counts[reason] == 1 and dec.counts["accepted"] == 0
    assert SENDER not in dec.windows  # nothing recorded for a rejected packet
    assert dec.decode(one_packet(valid_entries()), 0).accepted  # same sequence still usable


def test_key_bits_outside_the_level_mask_are_bad_key():
    entries = valid_entries(4)
    entries["level"] = 3
    entries["key"] = valid_entries(4, seed=9)["key"]
    entries["key"]["client_port"] = 1234  # level 3 drops ports
    assert decoder().decode(one_packet(entries), 0).reason == "bad_key"


def test_first_failing_entry_check_names_the_packet():
    entries = valid_entries(3)
    entries["level"][0] = 9
    entries["predicted_remaining_ms"][2] = MAX_LEASE_MS + 1
    assert decoder().decode(one_packet(entries), 0).reason == "bad_level"


def test_header_checks():
    packet = one_packet(valid_entries())
    assert decoder().decode(packet[:40], 0).reason == "bad_length"
    assert decoder().decode(resign(packet[:-P.TAG_LEN - 72] + packet[-P.TAG_LEN:]), 0).reason \
        == "bad_length"
    assert decoder().decode(resign(b"XPUB" + packet[4:]), 0).reason == "bad_magic"
    assert decoder().decode(resign(packet[:4] + b"\x02" + packet[5:]), 0).reason == "bad_version"
    assert decoder().decode(resign(packet[:5] + b"\x09" + packet[6:]), 0).reason == "bad_type"
    lb_side_only = decoder(accept_types=(P.PacketType.PUBLISH,))
    directive = P.encode_directive(random_directive_entries(np.random.default_rng(1), 2),
                                   sender_id=1, first_sequence=1, timestamp_ns=0, key=KEY,
                                   mtu=1400)[0]
    assert lb_side_only.decode(directive, 0).reason == "bad_type"
    assert decoder().decode("not bytes", 0).reason == "bad_length"  # type: ignore[arg-type]


def test_directive_level_checked():
    entries = random_directive_entries(np.random.default_rng(2), 3)
    entries["level"][1] = 4
    packet = P.encode_directive(entries, sender_id=1, first_sequence=1, timestamp_ns=0, key=KEY,
                                mtu=1400)[0]
    assert decoder().decode(packet, 0).reason == "bad_level"


def test_entry_quota_per_sender():
    dec = decoder(entry_quota_per_s=10)
    packets = P.encode_publish(valid_entries(12), sender_id=SENDER, first_sequence=1,
                               timestamp_ns=0, key=KEY, mtu=576)  # 6 entries per packet
    assert dec.decode(packets[0], now_ns=0).accepted
    assert dec.decode(packets[1], now_ns=0).reason == "quota"
    assert dec.decode(packets[1], now_ns=200_000_000).accepted  # 2 tokens refilled: 4+2 = 6


def test_fuzz_100k_random_and_mutated_packets_never_raise():
    rng = np.random.default_rng(1234)
    valid = P.encode_publish(valid_entries(300), sender_id=SENDER, first_sequence=1,
                             timestamp_ns=0, key=KEY, mtu=1400)
    valid += P.encode_directive(random_directive_entries(rng, 50), sender_id=SENDER,
                                first_sequence=500, timestamp_ns=0, key=KEY, mtu=1400)
    dec = decoder(entry_quota_per_s=1e6)
    for packet in valid:  # take their sequences, so any replay of them must be rejected
        assert dec.decode(packet, 0).accepted
    reasons: Counter[str] = Counter()
    total = 100_000
    for index in range(total):
        base = valid[index % len(valid)]
        kind = index % 5
        if kind == 0:  # random bytes, random length
            packet = os.urandom(int(rng.integers(0, 1500)))
        elif kind == 1:  # a valid header, random rest
            packet = base[:32] + os.urandom(int(rng.integers(0, 1400)))
        elif kind == 2:  # bit flips
            buffer = bytearray(base)
            for position in rng.integers(0, len(buffer) * 8, int(rng.integers(1, 8))):
                buffer[position // 8] ^= 1 << (position % 8)
            packet = bytes(buffer)
        elif kind == 3:  # truncation / extension
            cut = int(rng.integers(0, len(base) + 80))
            packet = base[:cut] + os.urandom(max(0, cut - len(base)))
        else:  # exact replay
            packet = base
        result = dec.decode(packet, 0)
        assert result.reason is not None, f"accepted mutated packet kind {kind}"
        reasons[result.reason.value] += 1
    assert sum(reasons.values()) == total
    assert dec.counts["accepted"] == len(valid)
    assert sum(v for k, v in dec.counts.items() if k != "accepted") == total
    assert {"bad_length", "bad_tag", "replay", "bad_magic"} <= set(reasons)


def test_load_key(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY.hex() + "\n")
    key_file.chmod(0o600)
    assert P.load_key(key_file) == KEY
    key_file.chmod(0o640)
    with pytest.raises(ConnpubError, match="chmod 600"):
        P.load_key(key_file)
    key_file.chmod(0o604)
    with pytest.raises(ConnpubError, match="group/others"):
        P.load_key(key_file)
    key_file.write_text("abcd")
    key_file.chmod(0o600)
    with pytest.raises(ConnpubError, match="2 bytes, need >= 16"):
        P.load_key(key_file)
    key_file.write_text("not hex at all")
    with pytest.raises(ConnpubError, match="not hex"):
        P.load_key(key_file)
    with pytest.raises(ConnpubError, match="cannot read key file"):
        P.load_key(tmp_path / "missing")


def test_mtu_too_small_is_a_clear_error():
    with pytest.raises(ConnpubError, match="too small"):
        P.max_entries_per_packet(72, 100)


def test_decoder_from_config_uses_masks_and_lease_bound():
    cfg = dataclasses.replace(
        Config(),
        lease=dataclasses.replace(LeaseConfig(), max_s=10.0),
        masks=dataclasses.replace(MasksConfig(), level3=MaskSpec(False, False, 16, 48, True)),
    )
    dec = P.Decoder.from_config(cfg, KEY, (P.PacketType.PUBLISH,))
    entries = valid_entries(2)
    entries["level"] = 3
    entries["predicted_remaining_ms"] = 10_000
    entries["key"] = apply_masks(entries["key"], 3, mask_byte_table(cfg.masks.specs))
    assert dec.decode(one_packet(entries, 1), 0).accepted
    entries["predicted_remaining_ms"][0] = 10_001
    assert dec.decode(one_packet(entries, 2), 0).reason == "lease_too_long"
    entries["predicted_remaining_ms"][0] = 0
    entries["key"] = apply_masks(valid_entries(2, seed=5)["key"], 3)  # default /24 mask
    entries["key"]["client_addr"][:, 14] = 1  # byte 14 = third v4 octet; v6: inside /56
    assert dec.decode(one_packet(entries, 3), 0).reason == "bad_key"


def test_codec_round_trip_100k_entries():
    """100k entries through encode and batch decode, byte for byte (throughput: `connpub bench
    control`)."""
    entries = valid_entries(100_000, seed=3)
    packets = P.encode_publish(entries, sender_id=SENDER, first_sequence=1, timestamp_ns=0,
                               key=KEY, mtu=1400)
    assert max(len(packet) for packet in packets) <= 1400
    results = decoder().decode_batch(packets, now_ns=0)
    assert P.accepted_entries(results, P.PacketType.PUBLISH).tobytes() == entries.tobytes()
