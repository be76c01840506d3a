"""`connpub bench predict`: features + inference throughput of the server agent's model on a
full table of live flows, and the planner's first and next tick (docs/model.md)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from connpub.config import Config, RolloutConfig
from connpub.errors import ConnpubError
from connpub.model.observations import ClientPriorIndex, flow_features, table_snapshot
from connpub.model.planner import PredictivePlanner
from connpub.traffic import workload
from connpub.traffic.trace import history_from_flows

NS_PER_S = 1_000_000_000


def bench_predict(rows: int = 1_000_000, model_path: str | Path | None = None,
                  history_flows: int = 200_000, seed: int = 1) -> dict:
    """Features + inference throughput (wall and CPU time) on `rows` live flow-table rows (a
    generated mixed workload at mid-life, client priors from `history_flows` finished flows);
    also the planner's first tick (every flow decided) and the next one (default lease config: flows
    with too wide intervals or short lives are decided again)."""
    from connpub.model.quantile import Predictor  # noqa: PLC0415

    if rows <= 0:
        raise ConnpubError(f"rows must be positive, got {rows}")
    trace = workload.generate("mixed", rows, seed=seed, window_s=600.0)
    rng = np.random.default_rng(seed)
    start = trace["start_ns"].astype(np.int64)
    end = trace["end_ns"].astype(np.int64)
    now_ns = int(end.max()) + 1
    # shift every flow so that now falls inside it (a full table of live flows)
    point = start + (rng.random(rows) * np.maximum(end - start, 1)).astype(np.int64)
    shifted = trace.copy()
    shifted["start_ns"] = start + (now_ns - point)
    shifted["end_ns"] = end + (now_ns - point) + 1
    keys, values, _ = table_snapshot(shifted, now_ns)
    history = history_from_flows(workload.generate("mixed", history_flows, seed=seed + 1))
    history["first_seen_ns"] += now_ns - int(history["last_seen_ns"].max())
    history["last_seen_ns"] += now_ns - int(history["last_seen_ns"].max())
    priors = ClientPriorIndex.from_history(history)
    predictor = Predictor(model_path or None)
    n = len(keys)

    c0, t0 = time.process_time(), time.perf_counter()
    features = flow_features(keys, values, now_ns, priors)
    c1, t1 = time.process_time(), time.perf_counter()
    predictor.predict(features)
    c2, t2 = time.process_time(), time.perf_counter()

    class _Fixed:
        client_priors = priors

        def predict(self, batch):
            return predictor.predict(batch)

    cfg = Config(rollout=RolloutConfig(fraction=1.0))
    planner = PredictivePlanner(cfg, _Fixed())
    live = np.ones(n, bool)
    t3 = time.perf_counter()
    first = planner.plan(keys, values, now_ns, live)
    t4 = time.perf_counter()
    second = planner.plan(keys, values, now_ns + round(cfg.publish.interval_s * NS_PER_S), live)
    t5 = time.perf_counter()
    features_s, inference_s = t1 - t0, t2 - t1
    return {
        "rows": n, "quantiles": 3, "model_id": predictor.metadata.get("model_id", ""),
        "features_s": round(features_s, 4), "inference_s": round(inference_s, 4),
        "features_per_s": round(n / features_s), "inference_per_s": round(n / inference_s),
        "predictions_per_s": round(n / (features_s + inference_s)),
        # CPU time of this process (one thread): what the rate is on an otherwise idle core
        "features_cpu_s": round(c1 - c0, 4), "inference_cpu_s": round(c2 - c1, 4),
        "predictions_per_cpu_s": round(n / max(c2 - c0, 1e-9)),
        "planner_first_tick_s": round(t4 - t3, 4),
        "planner_first_tick_published": int(first.publish.sum()),
        "planner_next_tick_s": round(t5 - t4, 4),
        "planner_next_tick_decisions": int(second.decided.sum()),
        "planner_next_tick_published": int(second.publish.sum()),
    }

