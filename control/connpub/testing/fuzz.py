"""Datapath fuzzing (docs/fuzzing.md): a scapy-built seed corpus (testing.corpus), numpy
mutations in bulk, a reference parser written from the parsing contract (testing.reference),
and a BPF_PROG_TEST_RUN loop that checks verdicts, output bytes, outcome counters and the flow
tables of the XDP programs per batch (testing.targets, testing.report); also the receive-path
wire mutator."""

from __future__ import annotations

import ctypes
import time
from collections import Counter
from contextlib import contextmanager

import numpy as np

from connpub.datapath import libbpf, loader
from connpub.errors import ConnpubError
from connpub.testing.corpus import Corpus, Mutator, build_corpus
from connpub.testing.reference import (  # noqa: F401 - the harness's public names
    C4,
    C6,
    FINDINGS,
    MIN_FRAME,
    OUT_STRIDE,
    SERVER_OUTCOME_NAMES,
    STRIDE,
    V4,
    V6,
    VERDICT_NAMES,
    Parsed,
    Progress,
    reference_parse,
)
from connpub.testing.report import MAX_EXAMPLES, FuzzReport
from connpub.testing.targets import LbTarget, ServerTarget, _frame, _mapped, _stat_totals  # noqa: F401

# ---------------------------------------------------------------------------------------------
# BPF_PROG_TEST_RUN over a batch
# ---------------------------------------------------------------------------------------------


class BatchRunner:
    """Runs a program once per frame of a batch; one opts struct, buffers are numpy rows."""

    def __init__(self, prog_fd: int) -> None:
        self.prog_fd = prog_fd
        self.opts = libbpf.BpfTestRunOpts(sz=ctypes.sizeof(libbpf.BpfTestRunOpts), repeat=1)
        self.run_seconds = 0.0

    def run(self, rows: np.ndarray, lengths: np.ndarray):
        """-> (verdicts, output rows (n, OUT_STRIDE), output lengths)."""
        count = len(lengths)
        rows = np.ascontiguousarray(rows)
        out = np.zeros((count, OUT_STRIDE), np.uint8)
        verdicts = np.zeros(count, np.int64)
        out_lengths = np.zeros(count, np.int64)
        opts, prog_fd = self.opts, self.prog_fd
        opts_ref = ctypes.byref(opts)
        test_run = libbpf.LIB.bpf_prog_test_run_opts
        in_base, out_base = rows.ctypes.data, out.ctypes.data
        lengths_list = lengths.tolist()
        results = [(0, 0)] * count
        started = time.perf_counter()
        for index in range(count):
            opts.data_in = in_base + index * STRIDE
            opts.data_out = out_base + index * OUT_STRIDE
            opts.data_size_in = lengths_list[index]
            opts.data_size_out = OUT_STRIDE
            ret = test_run(prog_fd, opts_ref)
            if ret < 0:
                libbpf.check(ret, f"BPF_PROG_TEST_RUN of a {lengths_list[index]}-byte frame")
            results[index] = (opts.retval, opts.data_size_out)
        self.run_seconds += time.perf_counter() - started
        verdicts[:], out_lengths[:] = np.array(results, np.int64).T if count else ((), ())
        return verdicts, out, out_lengths



# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


def diagnose_outcomes(prog_fd: int, pin_dir, target, parsed: list[Parsed], rows, lengths,
                      report: FuzzReport) -> None:
    """After a batch whose counters disagree with the reference: rerun its frames one by one,
    reading the counters after each, and report the frames whose outcome differs (outcomes do
    not depend on earlier frames: same config, tables far from full)."""
    names = target.outcome_names
    runner = BatchRunner(prog_fd)
    before = _stat_totals(pin_dir, names)
    for index, item in enumerate(parsed):
        runner.run(rows[index : index + 1], lengths[index : index + 1])
        after = _stat_totals(pin_dir, names)
        moved = np.flatnonzero(after - before)
        before = after
        got = names[int(moved[0])] if len(moved) == 1 else f"{len(moved)} outcomes"
        want = target.classify(item)
        if got != want:
            report.fail("outcome_mismatch", f"datapath {got}, reference {want}",
                        _frame(rows, lengths, index))


@contextmanager
def scratch_target(role: str, seed: int = 1):
    """A scratch-loaded program of `role` (maps pinned in a scratch folder, removed after) and
    its fuzz target, set up with the fuzz VIPs/backends/classes."""
    targets = {"server": ServerTarget, "lb": LbTarget}
    if role not in targets:
        raise ConnpubError(f"unknown role {role!r}: expected server or lb")
    target_cls = targets[role]
    pin_dir = loader.scratch_pin_dir(f"fuzz-{role}")
    program = loader.compile_program(role, pin_dir, target_cls.defines)
    target = None
    try:
        target = target_cls(pin_dir, np.random.default_rng(seed))
        yield program, target
    finally:
        if target is not None:
            target.close()
        program.close()
        loader.remove_pins(pin_dir)


def fuzz_datapath(role: str = "server", packets: int = 20_000, batch: int = 10_000,
                  seed: int = 1, epoch_batches: int = 5, skip_findings: tuple[str, ...] = (),
                  progress: Progress | None = None) -> FuzzReport:
    """Fuzz one XDP program (scratch-loaded, not attached) with `packets` generated frames.
    skip_findings: frames with one of these FINDINGS are generated but not run (to keep a
    known, reported bug from masking others)."""
    loader.check_privileges()
    if role not in ("server", "lb"):
        raise ConnpubError(f"unknown role {role!r}: expected server or lb")
    if packets < 1 or batch < 1:
        raise ConnpubError("--packets and --batch must be >= 1")
    unknown = set(skip_findings) - set(FINDINGS)
    if unknown:
        raise ConnpubError(f"unknown findings {sorted(unknown)}: expected some of {FINDINGS}")
    skip = frozenset(skip_findings)
    corpus = Corpus.from_frames(build_corpus())
    mutator = Mutator(corpus, seed)
    report = FuzzReport(role)
    started = time.perf_counter()
    with scratch_target(role, seed + 1) as (program, target):
        pin_dir = program.pin_dir
        runner = BatchRunner(program.prog_fd)
        names = target.outcome_names
        done = 0
        while done < packets:
            count = min(batch, packets - done)
            target.before_batch(report.batches, epoch_batches)
            rows, lengths = mutator.batch(count)
            parsed = [reference_parse(rows[i, : lengths[i]].tobytes()) for i in range(count)]
            if skip:
                keep = [i for i, p in enumerate(parsed) if not skip.intersection(p.findings)]
                report.skipped += count - len(keep)
                rows, lengths = rows[keep], lengths[keep]
                parsed = [parsed[i] for i in keep]
                count = len(keep)
            before = _stat_totals(pin_dir, names)
            verdicts, out, out_lengths = runner.run(rows, lengths)
            moved = _stat_totals(pin_dir, names) - before
            outcomes = target.classify_batch(parsed)
            expected = Counter(outcomes)
            for name, value in zip(names, moved.tolist(), strict=True):
                if value:
                    report.outcomes[name] += value
            report.expected_outcomes.update(expected)
            report.verdicts.update(VERDICT_NAMES[v] if 0 <= v < 5 else str(v)
                                   for v in verdicts.tolist())
            if int(moved.sum()) != count:
                report.fail("outcomes_do_not_add_up",
                            f"{int(moved.sum())} outcomes counted for {count} frames")
            if any(moved[i] != expected.get(name, 0) for i, name in enumerate(names)):
                if report.failures["outcome_mismatch"] < MAX_EXAMPLES:
                    diagnose_outcomes(program.prog_fd, pin_dir, target, parsed, rows, lengths,
                                      report)
                else:  # enough examples: count the frames the histograms disagree on
                    differ = sum(abs(int(moved[i]) - expected.get(name, 0))
                                 for i, name in enumerate(names))
                    report.fail_many("outcome_mismatch", differ // 2)
            for index, item in enumerate(parsed):
                if item.findings and item.outcome == "tracked":
                    for finding in item.findings:
                        report.found(finding, _frame(rows, lengths, index))
            target.check(report, parsed, outcomes, rows, lengths, verdicts, out, out_lengths)
            done += count
            report.packets = done
            report.batches += 1
            if progress:
                progress(done, packets)
    report.seconds = time.perf_counter() - started
    report.run_seconds = runner.run_seconds
    return report

# ---------------------------------------------------------------------------------------------
# receive path: mutations of publishing-protocol datagrams (tests/test_fuzz_receive.py)
# ---------------------------------------------------------------------------------------------

WIRE_MUTATIONS = ("random", "random_body", "bit_flips", "resize", "splice", "header_field",
                  "replay")
# (offset, width) of the header fields of docs/protocol.md: magic, version, type, reserved,
# sender, sequence, timestamp, entry count, reserved2
_WIRE_HEADER_FIELDS = ((0, 4), (4, 1), (5, 1), (6, 2), (8, 4), (12, 8), (20, 8), (28, 2), (30, 2))
_WIRE_EDGE_VALUES = np.array([0, 1, 2, 3, 4, 0x7F, 0x80, 0xFF, 0xFFFF, 0x43505542, 2**32 - 1,
                              2**63, 2**64 - 1], np.uint64)
MAX_DATAGRAM = 2048


def mutate_wire(rng: np.random.Generator, valid: list[bytes], count: int
                ) -> tuple[list[bytes], np.ndarray]:
    """`count` datagrams derived from `valid` ones (random bytes, random bodies behind a valid
    header, bit flips, truncation/extension, splices of two packets, header fields set to edge
    values, exact replays) and the index into WIRE_MUTATIONS of each. Built with numpy."""
    if not valid:
        raise ConnpubError("mutate_wire needs at least one valid packet")
    rows = np.zeros((len(valid), MAX_DATAGRAM), np.uint8)
    sizes = np.array([len(packet) for packet in valid], np.int64)
    if sizes.max() > MAX_DATAGRAM:
        raise ConnpubError(f"valid packets must be <= {MAX_DATAGRAM} bytes")
    for index, packet in enumerate(valid):
        rows[index, : len(packet)] = np.frombuffer(packet, np.uint8)
    base = rng.integers(0, len(valid), count)
    out, lengths = rows[base].copy(), sizes[base].copy()
    kind = rng.integers(0, len(WIRE_MUTATIONS), count)
    noise = rng.integers(0, 256, (count, MAX_DATAGRAM), dtype=np.uint8)

    pick = kind == 0  # random bytes, random length
    out[pick] = noise[pick]
    lengths[pick] = rng.integers(0, 1500, int(pick.sum()))
    pick = np.flatnonzero(kind == 1)  # a valid header, random rest of random length
    out[pick, 32:] = noise[pick, 32:]
    lengths[pick] = rng.integers(32, 1500, len(pick))
    pick = np.flatnonzero(kind == 2)  # 1-8 bit flips
    for round_index in range(8):
        chosen = pick[rng.random(len(pick)) < (1.0 if round_index == 0 else 0.5)]
        position = (rng.random(len(chosen)) * lengths[chosen] * 8).astype(np.int64)
        out[chosen, position // 8] ^= (1 << (position % 8)).astype(np.uint8)
    pick = np.flatnonzero(kind == 3)  # cut or grow
    lengths[pick] = np.minimum(rng.integers(0, lengths[pick] + 100), MAX_DATAGRAM)
    pick = np.flatnonzero(kind == 4)  # head of this packet + tail of another
    other = rng.integers(0, len(valid), len(pick))
    for row, donor in zip(pick.tolist(), other.tolist(), strict=True):
        cut = int(rng.integers(0, lengths[row] + 1))
        tail = rows[donor, cut : sizes[donor]]
        end = min(MAX_DATAGRAM, cut + len(tail))
        out[row, cut:end] = tail[: end - cut]
        lengths[row] = end
    pick = np.flatnonzero(kind == 5)  # one header field set to an edge value
    field_index = rng.integers(0, len(_WIRE_HEADER_FIELDS), len(pick))
    values = _WIRE_EDGE_VALUES[rng.integers(0, len(_WIRE_EDGE_VALUES), len(pick))]
    for row, which, value in zip(pick.tolist(), field_index.tolist(), values.tolist(),
                                 strict=True):
        offset, width = _WIRE_HEADER_FIELDS[which]
        masked = value & ((1 << (8 * width)) - 1)
        out[row, offset : offset + width] = np.frombuffer(masked.to_bytes(width, "big"), np.uint8)
    # kind 6: exact replay, nothing to do
    return [out[i, : lengths[i]].tobytes() for i in range(count)], kind

