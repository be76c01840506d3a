"""Reproducibly train the shipped default model on real captures and flow logs plus the
generator, and report how it holds on real sources it did not see (docs/model.md, "Shipped").

Run: python -m connpub.model.train_default [--traces DIR] [--out PATH] [--report]
(writes control/connpub/data/default_model.onnx). The real data is read at train time from
../shared/traces relative to the repository (never copied in): ndpi/*.pcap* (one source),
zeek/*.conn.log (one source), argus/*.binetflow (one source).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from connpub.errors import ConnpubError
from connpub.model.quantile import (
    Predictor,
    TrainConfig,
    default_model_path,
    evaluate_samples,
    export_onnx,
    train_samples,
)
from connpub.model.samples import Samples, sample_flows
from connpub.traffic import workload
from connpub.traffic.flowlogs import concat_sources, plausible_flows, read_flow_source

REPO = Path(__file__).resolve().parents[3]
DEFAULT_TRACES = REPO.parent / "shared" / "traces"
REAL_SOURCES = {"ndpi": "ndpi/*.pcap*", "zeek": "zeek/*.conn.log", "argus": "argus/*.binetflow"}
WORKLOAD = "realfit"  # generator workload re-fitted to the real captures (docs/workloads.md)
TRAIN_FLOWS = 10_000  # generated flows (a few times the real decision samples, not 100x)
TRAIN_SEED = 20261204  # generator seed of the training flows
MODEL_SEED = 0
CREATED = "2026-12-04T00:00:00Z"  # fixed so the file is byte-for-byte reproducible


def real_sources(traces: Path) -> dict[str, np.ndarray]:
    """FLOW_DTYPE table per real source (files of a source placed one after the other;
    unreadable captures and implausible spliced-capture flows are left out)."""
    if not traces.is_dir():
        raise ConnpubError(f"{traces}: no traces directory (want ../shared/traces or --traces)")
    out = {}
    for name, pattern in REAL_SOURCES.items():
        tables = []
        for path in sorted(traces.glob(pattern)):
            try:
                tables.append(plausible_flows(read_flow_source(path)))
            except (ConnpubError, ValueError, OverflowError, OSError) as err:  # reader bugs
                print(f"skipped {path.name}: {err}", file=sys.stderr)
        if tables:
            out[name] = concat_sources(tables)
    if not out:
        raise ConnpubError(f"{traces}: none of {list(REAL_SOURCES.values())} found")
    return out


def source_samples(traces: Path) -> dict[str, Samples]:
    """Decision samples of every real source and of the generator."""
    samples = {name: sample_flows(flows) for name, flows in real_sources(traces).items()}
    samples["generator"] = sample_flows(workload.generate(WORKLOAD, TRAIN_FLOWS, seed=TRAIN_SEED))
    return samples


def fit(samples: dict[str, Samples], names: list[str]):
    """train_samples on the named sources with cross-source calibration."""
    parts = [samples[name] for name in names]
    groups = np.concatenate([np.full(p.log_remaining_s.size, i) for i, p in enumerate(parts)])
    return train_samples(Samples.concat(parts), seed=MODEL_SEED, config=TrainConfig(),
                         groups=groups)


def held_out_report(samples: dict[str, Samples], scratch: Path) -> dict:
    """Per real source: a model trained (same recipe) on every other source, scored on it,
    as shipped and (`online`) with the agent's coverage tracker replayed over the source."""
    report = {}
    for name in samples:
        if name == "generator":
            continue
        model = fit(samples, [other for other in samples if other != name])
        path = export_onnx(model, scratch / f"without-{name}.onnx", created=CREATED)
        predictor = Predictor(path)
        report[name] = evaluate_samples(samples[name], predictor)
        report[name]["online"] = evaluate_samples(samples[name], predictor, online=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(default_model_path()))
    parser.add_argument("--traces", default=str(DEFAULT_TRACES))
    parser.add_argument("--report", action="store_true",
                        help="also score models trained without each real source on it")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    samples = source_samples(Path(args.traces))
    model = fit(samples, list(samples))
    model.training.update({"workload": WORKLOAD, "generator_seed": TRAIN_SEED,
                           "generator_flows": TRAIN_FLOWS, "sources": sorted(samples)})
    path = export_onnx(model, args.out, created=CREATED)
    out = {"out": str(path), "size_bytes": path.stat().st_size,
           "rows": {name: int(s.log_remaining_s.size) for name, s in samples.items()},
           "train_seconds": round(time.perf_counter() - started, 1)}
    if args.report:
        with tempfile.TemporaryDirectory(prefix="connpub-train-") as scratch:
            out["held_out"] = held_out_report(samples, Path(scratch))
    json.dump(out, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
