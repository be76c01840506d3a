"""What a fuzz run found (docs/fuzzing.md): counts, failures and findings with a few example
packets each."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

MAX_EXAMPLES = 5  # failing / finding packets kept per kind


@dataclass
class FuzzReport:
    role: str
    packets: int = 0
    batches: int = 0
    skipped: int = 0  # generated frames not run (skip_findings)
    seconds: float = 0.0
    run_seconds: float = 0.0  # inside BPF_PROG_TEST_RUN calls (incl. the ctypes call)
    outcomes: Counter = field(default_factory=Counter)  # datapath counters
    expected_outcomes: Counter = field(default_factory=Counter)  # reference parser
    verdicts: Counter = field(default_factory=Counter)
    findings: Counter = field(default_factory=Counter)
    finding_examples: dict = field(default_factory=dict)
    failures: Counter = field(default_factory=Counter)
    failure_examples: dict = field(default_factory=dict)
    flows_checked: int = 0
    aggregates_checked: int = 0

    def fail(self, kind: str, detail: str, frame: bytes | None = None) -> None:
        self.failures[kind] += 1
        examples = self.failure_examples.setdefault(kind, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append({"detail": detail, "frame": frame.hex() if frame else None})

    def fail_many(self, kind: str, count: int) -> None:
        """Count `count` more failures of `kind` without examples."""
        if count > 0:
            self.failures[kind] += count

    def found(self, kind: str, frame: bytes) -> None:
        self.findings[kind] += 1
        examples = self.finding_examples.setdefault(kind, [])
        if len(examples) < 2:
            examples.append(frame.hex())

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict:
        return {
            "role": self.role,
            "packets": self.packets,
            "batches": self.batches,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "packets_per_s": round(self.packets / self.seconds) if self.seconds else 0,
            "test_run_packets_per_s": (round(self.packets / self.run_seconds)
                                       if self.run_seconds else 0),
            "outcomes": dict(self.outcomes),
            "expected_outcomes": dict(self.expected_outcomes),
            "verdicts": dict(self.verdicts),
            "flows_checked": self.flows_checked,
            "aggregates_checked": self.aggregates_checked,
            "failures": dict(self.failures),
            "failure_examples": self.failure_examples,
            "findings": dict(self.findings),
            "finding_examples": self.finding_examples,
        }


