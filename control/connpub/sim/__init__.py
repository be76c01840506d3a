"""The simulator (docs/simulator.md): replays a flow trace through the agents' real
policy code (leases, granularity controller with hysteresis, rollout, masks, MTU splitting) on a
simulated clock and reports the metrics of docs/simulator.md per mode.

Library use: `simulate(trace, modes, cfg, options=SimOptions(...)) -> {mode: metrics}`."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from connpub.config import MODES, Config
from connpub.datapath.abi import PUBLISH_ENTRY_DTYPE
from connpub.errors import ConnpubError
from connpub.sim.condition import condition_trace
from connpub.sim.engine import (
    FLOAT_SERIES,
    SERIES,
    EvalSignals,
    ModeRun,
    SimOptions,
    packet_layout,
)
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
    "MODES", "FixedPredictor", "ModePart", "ModelPredictor", "OraclePredictor",
    "PerPortPredictor", "SimFlows", "SimOptions", "condition_trace", "make_predictor",
    "merge_parts", "mode_metrics", "model_quality", "parse_modes", "prepare", "run_clock",
    "run_mode", "simulate", "simulate_flows", "simulate_predictors",
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


def model_quality(part: ModePart) -> dict | None:
    """MAE of log remaining duration (p50) vs the per-service median baseline, and p10-p90
    coverage, over every prediction the run made for a flow that was still alive."""
    if not part.quality:
        return None
    from connpub.model.quantile import NOMINAL_COVERAGE, service_median_baseline

    totals = part.totals
    predicted = np.concatenate([q[0] for q in part.quality])
    truth = np.concatenate([q[1] for q in part.quality])
    service = np.concatenate([q[2] for q in part.quality])
    baseline = service_median_baseline(
        SimpleNamespace(vip_port=service, proto=np.zeros_like(service), log_remaining_s=truth))
    mae = float(np.mean(np.abs(predicted[:, 1] - truth)))
    baseline_mae = float(np.mean(np.abs(baseline - truth)))
    return {
        "predictor": part.predictor_name,
        "predictions": int(truth.size),
        "mae_log": mae,
        "baseline_mae_log": baseline_mae,
        "mae_ratio": mae / baseline_mae if baseline_mae > 0 else math.inf,
        "coverage_p10_p90": float(np.mean((predicted[:, 0] <= truth) & (truth <= predicted[:, 2]))),
        "nominal_coverage": NOMINAL_COVERAGE,
        # the online coverage tracker's own count: decisions scored at their flow's end (or
        # once live past p90) against the interval it gave (None: predictor not tracked)
        "online_coverage": (1 - (totals["interval_below"] + totals["interval_above"])
                            / totals["interval_scored"] if totals.get("interval_scored")
                            else None),
    }


@dataclass
class ModePart:
    """What a run of one mode over the flows (or over one shard of them: sim.parallel) leaves
    for its metrics. Shards' parts add up to the serial run's (merge_parts)."""

    series: dict[str, np.ndarray]  # SERIES + stale_ns + backend_entries (ticks+1, servers+1)
    totals: dict  # ModeRun.totals (level_flow_steps: an array)
    lease_miss_flows: int
    idle_gap_miss_flows: int
    backend_load: np.ndarray  # (servers + 1,) connections summed over the steps
    quality: list  # (predicted, truth, service, flow index, now_ns) per prediction call
    predictor_name: str | None
    predictive: bool
    seconds: float  # simulation seconds (summed over shards)
    evaluated_valid: list[int] = field(default_factory=list)  # per granularity evaluation


def run_mode(flows: SimFlows, mode: str, mode_index: int, cfg: Config, options: SimOptions,
             predictor: LeasePredictor | None, ticks: int,
             progress: ProgressFn | None = None,
             exchange: Callable[[EvalSignals], np.ndarray] | None = None) -> ModePart:
    """Step one mode over prepared flows for ticks + 1 publish intervals. exchange: a shard's
    granularity evaluations decided with the other shards' (ModeRun.exchange, sim.parallel)."""
    interval_ns = round(cfg.publish.interval_s * NS_PER_S)
    run = ModeRun(flows, cfg, mode, options, predictor, mode_index)
    run.exchange = exchange
    series = {name: np.zeros(ticks + 1, np.float64 if name in FLOAT_SERIES
                             else np.int64) for name in SERIES}
    series["stale_ns"] = np.zeros(ticks + 1, np.int64)
    series["stale_udp_ns"] = np.zeros(ticks + 1, np.int64)
    series["backend_entries"] = np.zeros((ticks + 1, options.servers + 1), np.int64)
    began = time.perf_counter()
    for tick in range(ticks + 1):
        run.step(tick * interval_ns, series, tick)
        if progress is not None and (tick % 50 == 0 or tick == ticks):
            progress(mode, tick, ticks)
    return ModePart(
        series=series, totals=run.totals, lease_miss_flows=int(run.missed.sum()),
        idle_gap_miss_flows=int((run.missed & run.servers.idled).sum()),
        backend_load=run.backend_load,
        quality=run.quality,
        predictor_name=(getattr(run.predictor, "name", type(run.predictor).__name__)
                        if run.predictive else None),
        predictive=run.predictive, seconds=time.perf_counter() - began,
        evaluated_valid=run.evaluated_valid)


def merge_parts(parts: Sequence[ModePart]) -> ModePart:
    """The run of a mode from its shards' runs (sim.parallel): integer series, counters and
    loads add up; predictions are put back in the serial order (by step, then flow index:
    the order in which one run over all flows makes them; the flow indices must be global)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    series = {name: sum(p.series[name] for p in parts) for name in first.series}
    totals = {name: sum(p.totals[name] for p in parts) for name in first.totals}
    quality = [q for p in parts for q in p.quality]
    if quality:
        predicted = np.concatenate([q[0] for q in quality])
        truth = np.concatenate([q[1] for q in quality])
        service = np.concatenate([q[2] for q in quality])
        index = np.concatenate([q[3] for q in quality])
        at = np.concatenate([np.full(q[3].size, q[4], np.int64) for q in quality])
        order = np.lexsort((index, at))
        quality = [(predicted[order], truth[order], service[order], index[order], 0)]
    return ModePart(
        series=series, totals=totals, lease_miss_flows=sum(p.lease_miss_flows for p in parts),
        idle_gap_miss_flows=sum(p.idle_gap_miss_flows for p in parts),
        backend_load=sum(p.backend_load for p in parts), quality=quality,
        predictor_name=first.predictor_name, predictive=first.predictive,
        seconds=sum(p.seconds for p in parts),
        evaluated_valid=[sum(v) for v in zip(*(p.evaluated_valid for p in parts), strict=True)])


def mode_metrics(part: ModePart, cfg: Config, options: SimOptions, duration_s: float,
                 flows_started: int) -> dict:
    """The metrics of docs/simulator.md from a (merged) run. Publish packets and bytes are
    counted from each step's entries per server (max_entries_per_packet per packet)."""
    per_packet, overhead = packet_layout(cfg, options.ip_version)
    raw = part.series
    packets = (-(-raw["backend_entries"] // per_packet)).sum(axis=1)
    series = {name: raw[name] for name in SERIES}
    series["publish_packets"] = packets
    series["publish_bytes"] = packets * overhead + raw["entries"] * PUBLISH_ENTRY_DTYPE.itemsize
    series["stale_flow_seconds"] = raw["stale_ns"] / NS_PER_S
    series["stale_udp_flow_seconds"] = raw["stale_udp_ns"] / NS_PER_S
    series["t_s"] = np.arange(packets.size) * cfg.publish.interval_s
    totals = dict(part.totals)
    level_steps = totals.pop("level_flow_steps")
    share = level_steps / max(level_steps.sum(), 1)
    load = part.backend_load[1:]
    return {
        "flows": flows_started,
        "duration_s": duration_s,
        "publish_packets_per_s": float(series["publish_packets"].sum() / duration_s),
        "publish_bytes_per_s": float(series["publish_bytes"].sum() / duration_s),
        "entries_per_s": float(series["entries"].sum() / duration_s),
        "map_writes_per_s": float((series["map_writes"].sum() + totals["directive_writes"])
                                  / duration_s),
        "lease_miss_packets": int(series["lease_miss_packets"].sum()),
        "lease_miss_flows": part.lease_miss_flows,
        # of those, flows the server agent had idled out (idle_timeout_s without packets)
        "idle_gap_miss_flows": part.idle_gap_miss_flows,
        "stale_flow_seconds": float(series["stale_flow_seconds"].sum()),
        "stale_tcp_flow_seconds": float(series["stale_flow_seconds"].sum()
                                        - series["stale_udp_flow_seconds"].sum()),
        "stale_udp_flow_seconds": float(series["stale_udp_flow_seconds"].sum()),
        "peak_lb_entries": int(series["lb_entries"].max(initial=0)),
        # max / mean over the backends of their connections (summed over the steps)
        "backend_spread": float(load.max() / load.mean()) if load.sum() > 0 else 1.0,
        "mean_lb_entries": float(series["lb_entries"].mean()) if series["lb_entries"].size else 0.0,
        "level_share": [float(v) for v in share],
        "model": model_quality(part) if part.predictive else None,
        "totals": {k: int(v) for k, v in totals.items()},
        "sim_seconds": part.seconds,
        "series": series,
    }


def run_clock(flows_start_ns: np.ndarray, cfg: Config, options: SimOptions
              ) -> tuple[int, float, int]:
    """(ticks, duration_s, flows started) of a run over flows sorted by start."""
    interval_s = cfg.publish.interval_s
    last_start_s = float(flows_start_ns[-1]) / NS_PER_S
    duration_s = options.duration_s if options.duration_s is not None else last_start_s
    if not duration_s > 0:
        raise ConnpubError(f"duration must be positive, got {duration_s:g}s")
    ticks = max(1, math.ceil(duration_s / interval_s - 1e-9))
    interval_ns = round(interval_s * NS_PER_S)
    started = int(np.searchsorted(flows_start_ns, ticks * interval_ns, side="right"))
    return ticks, ticks * interval_s, started


def simulate_flows(flows: SimFlows, modes: Sequence[str], cfg: Config,
                   options: SimOptions | None = None,
                   predictor: LeasePredictor | None = None,
                   progress: ProgressFn | None = None) -> dict[str, dict]:
    """Run every mode over prepared flows, one after the other in this process (see simulate;
    sim.parallel.simulate_parallel runs shards of the flows on several cores)."""
    options = options or SimOptions()
    modes = parse_modes(modes)
    ticks, duration_s, flows_started = run_clock(flows.start_ns, cfg, options)
    if predictor is None and any(m in ("predictive", "full") for m in modes):
        predictor = ModelPredictor(cfg.model.path or None)
    results: dict[str, dict] = {}
    for mode_index, mode in enumerate(modes):
        part = run_mode(flows, mode, mode_index, cfg, options, predictor, ticks, progress)
        results[mode] = mode_metrics(part, cfg, options, duration_s, flows_started)
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
