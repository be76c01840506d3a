"""The simulator (docs/simulator.md): replays a flow trace through the agents' real
policy code (leases, granularity controller with hysteresis, rollout, masks, MTU splitting) on a
simulated clock and reports the metrics of docs/simulator.md per mode.

Library use: `simulate(trace, modes, cfg, options=SimOptions(...)) -> {mode: metrics}`."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import numpy as np

from connpub.config import MODES, Config
from connpub.errors import ConnpubError
from connpub.sim.condition import condition_trace
from connpub.sim.engine import FLOAT_SERIES, SERIES, ModeRun, SimOptions
from connpub.sim.flows import SimFlows, prepare
from connpub.sim.predictors import (
    FixedPredictor,
    LeasePredictor,
    ModelPredictor,
    OraclePredictor,
    PerPortPredictor,
    make_predictor,
)
from connpub.traffic.workload import NS_PER_S

__all__ = [
    "MODES", "FixedPredictor", "ModelPredictor", "OraclePredictor", "PerPortPredictor",
    "SimFlows", "SimOptions", "condition_trace", "make_predictor", "model_quality",
    "parse_modes", "prepare", "simulate", "simulate_flows", "simulate_predictors",
]

ProgressFn = Callable[[str, int, int], None]


def parse_modes(text: str | Sequence[str]) -> tuple[str, ...]:
    """'baseline,full' -> ('baseline', 'full'); ConnpubError naming an unknown mode."""
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text)]
    names = [m for m in names if m]
    unknown = [m for m in names if m not in MODES]
    if unknown or not names:
        raise ConnpubError(f"unknown mode {', '.join(unknown) or '(none)'}; choose from "
                           f"{','.join(MODES)}")
    return tuple(dict.fromkeys(names))


def model_quality(run: ModeRun) -> dict | None:
    """MAE of log remaining duration (p50) vs the per-service median baseline, and p10-p90
    coverage, over every prediction the run made for a flow that was still alive."""
    if not run.quality:
        return None
    from connpub.model.quantile import NOMINAL_COVERAGE, service_median_baseline

    predicted = np.concatenate([q[0] for q in run.quality])
    truth = np.concatenate([q[1] for q in run.quality])
    service = np.concatenate([q[2] for q in run.quality])
    baseline = service_median_baseline(
        SimpleNamespace(vip_port=service, proto=np.zeros_like(service), log_remaining_s=truth))
    mae = float(np.mean(np.abs(predicted[:, 1] - truth)))
    baseline_mae = float(np.mean(np.abs(baseline - truth)))
    return {
        "predictor": getattr(run.predictor, "name", type(run.predictor).__name__),
        "predictions": int(truth.size),
        "mae_log": mae,
        "baseline_mae_log": baseline_mae,
        "mae_ratio": mae / baseline_mae if baseline_mae > 0 else math.inf,
        "coverage_p10_p90": float(np.mean((predicted[:, 0] <= truth) & (truth <= predicted[:, 2]))),
        "nominal_coverage": NOMINAL_COVERAGE,
    }


def _metrics(run: ModeRun, series: dict[str, np.ndarray], duration_s: float,
             elapsed_s: float, flows_started: int) -> dict:
    totals = dict(run.totals)
    level_steps = totals.pop("level_flow_steps")
    share = level_steps / max(level_steps.sum(), 1)
    return {
        "flows": flows_started,
        "duration_s": duration_s,
        "publish_packets_per_s": float(series["publish_packets"].sum() / duration_s),
        "publish_bytes_per_s": float(series["publish_bytes"].sum() / duration_s),
        "entries_per_s": float(series["entries"].sum() / duration_s),
        "map_writes_per_s": float((series["map_writes"].sum() + totals["directive_writes"])
                                  / duration_s),
        "lease_miss_packets": int(series["lease_miss_packets"].sum()),
        "lease_miss_flows": int(run.missed.sum()),
        # of those, flows the server agent had idled out (idle_timeout_s without packets)
        "idle_gap_miss_flows": int((run.missed & run.servers.idled).sum()),
        "stale_flow_seconds": float(series["stale_flow_seconds"].sum()),
        "stale_tcp_flow_seconds": float(series["stale_flow_seconds"].sum()
                                        - series["stale_udp_flow_seconds"].sum()),
        "stale_udp_flow_seconds": float(series["stale_udp_flow_seconds"].sum()),
        "peak_lb_entries": int(series["lb_entries"].max(initial=0)),
        "backend_spread": run.backend_spread,
        "mean_lb_entries": float(series["lb_entries"].mean()) if series["lb_entries"].size else 0.0,
        "level_share": [float(v) for v in share],
        "model": model_quality(run) if run.predictive else None,
        "totals": {k: int(v) for k, v in totals.items()},
        "sim_seconds": elapsed_s,
        "series": series,
    }


def simulate_flows(flows: SimFlows, modes: Sequence[str], cfg: Config,
                   options: SimOptions | None = None,
                   predictor: LeasePredictor | None = None,
                   progress: ProgressFn | None = None) -> dict[str, dict]:
    """Run every mode over prepared flows (see simulate)."""
    options = options or SimOptions()
    modes = parse_modes(modes)
    interval_s = cfg.publish.interval_s
    last_start_s = float(flows.start_ns[-1]) / NS_PER_S
    duration_s = options.duration_s if options.duration_s is not None else last_start_s
    if not duration_s > 0:
        raise ConnpubError(f"duration must be positive, got {duration_s:g}s")
    ticks = max(1, math.ceil(duration_s / interval_s - 1e-9))
    duration_s = ticks * interval_s
    interval_ns = round(interval_s * NS_PER_S)
    if predictor is None and any(m in ("predictive", "full") for m in modes):
        predictor = ModelPredictor(cfg.model.path or None)
    flows_started = int(np.searchsorted(flows.start_ns, ticks * interval_ns, side="right"))
    results: dict[str, dict] = {}
    for mode_index, mode in enumerate(modes):
        run = ModeRun(flows, cfg, mode, options, predictor, mode_index)
        series = {name: np.zeros(ticks + 1, np.float64 if name in FLOAT_SERIES
                                 else np.int64) for name in SERIES}
        began = time.perf_counter()
        for tick in range(ticks + 1):
            run.step(tick * interval_ns, series, tick)
            if progress is not None and (tick % 50 == 0 or tick == ticks):
                progress(mode, tick, ticks)
        series["t_s"] = np.arange(ticks + 1) * interval_s
        results[mode] = _metrics(run, series, duration_s, time.perf_counter() - began,
                                 flows_started)
    return results


def simulate_predictors(flows: SimFlows, modes: Sequence[str], cfg: Config,
                        predictors: Sequence[LeasePredictor],
                        options: SimOptions | None = None,
                        progress: ProgressFn | None = None) -> dict[str, dict]:
    """The predictor ablation: modes without a predictor (baseline, adaptive) once, each
    predictive mode once per predictor, on the same prepared flows. With one predictor the
    keys are the modes (as simulate_flows); with several a predictive mode's key is
    "mode[predictor name]". Every predictive result names its predictor (`predictor`)."""
    modes = parse_modes(modes)
    plain = [m for m in modes if m not in ("predictive", "full")]
    predictive = [m for m in modes if m in ("predictive", "full")]
    results: dict[str, dict] = {}
    if plain:
        results.update(simulate_flows(flows, plain, cfg, options, None, progress))
    if not predictive:
        return {m: results[m] for m in modes}
    if not predictors:
        raise ConnpubError("no predictor given for the predictive modes")
    names = [getattr(p, "name", type(p).__name__) for p in predictors]
    if len(set(names)) != len(names):
        raise ConnpubError(f"predictors named twice: {', '.join(names)}")
    runs = {}
    for name, predictor in zip(names, predictors, strict=True):
        for mode, metrics in simulate_flows(flows, predictive, cfg, options, predictor,
                                            progress).items():
            metrics["predictor"] = name
            runs[(mode, name)] = metrics
    ordered: dict[str, dict] = {}
    for mode in modes:
        if mode in results:
            ordered[mode] = results[mode]
            continue
        for name in names:
            ordered[mode if len(names) == 1 else f"{mode}[{name}]"] = runs[(mode, name)]
    return ordered


def simulate(trace: np.ndarray, modes: Sequence[str] = MODES, cfg: Config | None = None, *,
             options: SimOptions | None = None, predictor: LeasePredictor | None = None,
             progress: ProgressFn | None = None) -> dict[str, dict]:
    """Simulate a FLOW_DTYPE trace under each mode; returns {mode: metrics} with the metrics of
    docs/simulator.md (rates per simulated second, totals, peak table size, model quality) and
    per-step `series` arrays. cfg.rollout applies as configured (fraction 0.1 by default: pass a
    config with fraction 1.0 to put every class in the cohort). predictor: None = the configured
    ONNX model (cfg.model.path or the packaged default); OraclePredictor() for an upper bound."""
    cfg = cfg or Config()
    options = options or SimOptions()
    trace, conditioning = condition_trace(trace, cfg)
    if conditioning.repaired():
        logging.getLogger(__name__).warning("trace repaired: %s", conditioning.repaired())
    flows = prepare(trace, cfg, options.servers, options.hash_client_only)
    return simulate_flows(flows, modes, cfg, options, predictor, progress)
