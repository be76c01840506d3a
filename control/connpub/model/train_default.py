"""Reproducibly train the shipped default model on the generator's "mixed" workload.

Run: python -m connpub.model.train_default [--out PATH]
(writes control/connpub/data/default_model.onnx)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from connpub.model.quantile import (
    Predictor,
    TrainConfig,
    default_model_path,
    evaluate,
    export_onnx,
    train,
)
from connpub.traffic import workload
from connpub.traffic.trace import history_from_flows

WORKLOAD = "mixed"
TRAIN_FLOWS = 200_000
TRAIN_SEED = 20261126  # generator seed of the training history
HELDOUT_SEED = 20261127  # generator seed of the held-back evaluation history
HELDOUT_FLOWS = 50_000
MODEL_SEED = 0
CREATED = "2026-11-26T00:00:00Z"  # fixed so the file is byte-for-byte reproducible


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(default_model_path()))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    history = history_from_flows(workload.generate(WORKLOAD, TRAIN_FLOWS, seed=TRAIN_SEED))
    fitted = train(history, seed=MODEL_SEED, config=TrainConfig())
    fitted.training.update({"workload": WORKLOAD, "generator_seed": TRAIN_SEED})
    path = export_onnx(fitted, args.out, created=CREATED)
    heldout = history_from_flows(workload.generate(WORKLOAD, HELDOUT_FLOWS, seed=HELDOUT_SEED))
    predictor = Predictor(path)
    metrics = evaluate(heldout, predictor)
    metrics.update({"out": str(path), "size_bytes": path.stat().st_size,
                    "train_seconds": round(time.perf_counter() - started, 1)})
    json.dump(metrics, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
