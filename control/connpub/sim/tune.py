"""Auto-tuning (docs/simulator.md): a seeded local random search over the granularity thresholds
and the lease bounds, scored with the simulator in mode "full". A candidate is feasible when it
has no more lease misses (zero without publish loss) and no more stale flow-seconds than the
baseline on the same trace; among feasible candidates the fewest publish bytes/s wins."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from connpub.config import Config, config_to_dict, config_to_toml, parse_config
from connpub.errors import ConnpubError
from connpub.sim import SimOptions, prepare, simulate_flows
from connpub.sim.predictors import LeasePredictor, ModelPredictor

# (section, name, low, high): searched in log space within [low, high].
SEARCH_SPACE: tuple[tuple[str, str, float, float], ...] = (
    ("granularity", "bandwidth_very_low", 1e2, 1e7),
    ("granularity", "bandwidth_low", 1e2, 1e8),
    ("granularity", "bandwidth_medium", 1e2, 1e9),
    ("granularity", "frequency_very_low", 1e-3, 1e5),
    ("granularity", "frequency_low", 1e-3, 1e6),
    ("granularity", "frequency_medium", 1e-3, 1e7),
    ("granularity", "duration_long_s", 0.05, 600.0),
    ("granularity", "duration_very_long_s", 0.05, 1800.0),
    ("granularity", "duration_extreme_long_s", 0.05, 3600.0),
    ("lease", "min_s", 0.2, 3.0),
    ("lease", "max_s", 3.0, 3600.0),
    ("lease", "skip_threshold_s", 0.01, 10.0),
    ("lease", "max_interval_width", 2.0, 1e6),
    ("lease", "renew_fraction", 0.1, 1.0),
)
ORDERED = (("bandwidth_very_low", "bandwidth_low", "bandwidth_medium"),
           ("frequency_very_low", "frequency_low", "frequency_medium"),
           ("duration_long_s", "duration_very_long_s", "duration_extreme_long_s"))

ProgressFn = Callable[[int, int, dict], None]


@dataclass
class Trial:
    index: int
    config: Config
    metrics: dict
    feasible: bool
    score: float  # publish bytes/s (inf when infeasible)

    def row(self) -> dict:
        m = self.metrics
        return {"trial": self.index, "feasible": self.feasible,
                "publish_bytes_per_s": round(m["publish_bytes_per_s"], 1),
                "entries_per_s": round(m["entries_per_s"], 2),
                "lease_miss_packets": m["lease_miss_packets"],
                "stale_flow_seconds": round(m["stale_flow_seconds"], 1)}


@dataclass
class TuneResult:
    best: Trial
    start: Trial
    baseline: dict
    trials: list[Trial] = field(default_factory=list)

    def summary(self) -> dict:
        base = self.baseline["publish_bytes_per_s"]
        return {
            "baseline": _headline(self.baseline),
            "start": _headline(self.start.metrics) | {"feasible": self.start.feasible},
            "best": _headline(self.best.metrics) | {"feasible": self.best.feasible,
                                                    "trial": self.best.index},
            "reduction_vs_baseline": base / max(self.best.metrics["publish_bytes_per_s"], 1e-9),
            "trials": len(self.trials),
            "tuned": {sec: {name: getattr(getattr(self.best.config, sec), name)
                            for s, name, _, _ in SEARCH_SPACE if s == sec}
                      for sec in ("granularity", "lease")},
        }


def _headline(m: dict) -> dict:
    return {k: m[k] for k in ("publish_bytes_per_s", "entries_per_s", "map_writes_per_s",
                              "lease_miss_packets", "lease_miss_flows", "stale_flow_seconds",
                              "peak_lb_entries")}


def _vector(cfg: Config) -> np.ndarray:
    return np.log(np.array([getattr(getattr(cfg, sec), name) for sec, name, _, _ in SEARCH_SPACE]))


def _candidate(base: Config, log_values: np.ndarray) -> Config | None:
    """The config with these log values (clipped, ordered), or None if it fails the checks."""
    low = np.log([lo for _, _, lo, _ in SEARCH_SPACE])
    high = np.log([hi for _, _, _, hi in SEARCH_SPACE])
    values = np.exp(np.clip(log_values, low, high))
    data = config_to_dict(base)
    for (section, name, _, _), value in zip(SEARCH_SPACE, values, strict=True):
        data[section][name] = float(f"{value:.4g}")
    for chain in ORDERED:
        ordered = sorted(data["granularity"][n] for n in chain)
        for name, value in zip(chain, ordered, strict=True):
            data["granularity"][name] = value
    problems: list[str] = []
    cfg = parse_config(data, problems)
    return None if problems else cfg


def _evaluate(flows, cfg: Config, options: SimOptions, predictor: LeasePredictor,
              baseline: dict, index: int) -> Trial:
    metrics = simulate_flows(flows, ["full"], cfg, options, predictor)["full"]
    metrics.pop("series")
    feasible = (metrics["lease_miss_packets"] <= baseline["lease_miss_packets"]
                and metrics["stale_flow_seconds"] <= baseline["stale_flow_seconds"] + 1e-6)
    score = metrics["publish_bytes_per_s"] if feasible else math.inf
    return Trial(index, cfg, metrics, feasible, score)


def tune(trace: np.ndarray, cfg: Config | None = None, *, budget: int = 30, seed: int = 0,
         options: SimOptions | None = None, predictor: LeasePredictor | None = None,
         progress: ProgressFn | None = None) -> TuneResult:
    """Search `budget` candidates around the best so far (plus random restarts), starting from
    cfg. Every candidate is simulated with the whole traffic in the cohort (rollout fraction 1,
    no shadow), mode "full"; the returned best config keeps cfg's rollout section."""
    if budget < 1:
        raise ConnpubError(f"budget must be >= 1 simulation, got {budget}")
    cfg = cfg or Config()
    options = options or SimOptions()
    search_base = dataclasses.replace(
        cfg, rollout=dataclasses.replace(cfg.rollout, fraction=1.0, shadow=False))
    flows = prepare(trace, search_base, options.servers, options.hash_client_only)
    predictor = predictor or ModelPredictor(cfg.model.path or None)
    baseline = simulate_flows(flows, ["baseline"], search_base, options)["baseline"]
    baseline.pop("series")
    rng = np.random.default_rng(seed)
    start = _evaluate(flows, search_base, options, predictor, baseline, 0)
    best, trials = start, [start]
    if progress:
        progress(0, budget, start.row())
    low = np.log([lo for _, _, lo, _ in SEARCH_SPACE])
    high = np.log([hi for _, _, _, hi in SEARCH_SPACE])
    for index in range(1, budget + 1):
        candidate = None
        for _ in range(100):
            if rng.random() < 0.25:  # restart: anywhere in the box
                point = rng.uniform(low, high)
            else:  # move a few coordinates of the best so far
                point = _vector(best.config)
                scale = 1.5 * (1.0 - 0.8 * index / (budget + 1))
                chosen = rng.random(point.size) < 0.35
                point = point + chosen * rng.normal(0.0, scale, point.size) * (high - low) / 6
            candidate = _candidate(search_base, point)
            if candidate is not None:
                break
        if candidate is None:
            continue
        trial = _evaluate(flows, candidate, options, predictor, baseline, index)
        trials.append(trial)
        if trial.score < best.score:
            best = trial
        if progress:
            progress(index, budget, trial.row())
    return TuneResult(best, start, baseline, trials)


def tuned_config(result: TuneResult, original: Config) -> Config:
    """The best candidate with the original rollout section, and publish.mode = "full" when it is
    feasible (else the original config unchanged: nothing found is better than it)."""
    if not result.best.feasible:
        return original
    best = result.best.config
    return dataclasses.replace(best, rollout=original.rollout,
                               publish=dataclasses.replace(best.publish, mode="full"))


def tuned_toml(result: TuneResult, original: Config, trace_name: str) -> str:
    summary = result.summary()
    best, base = summary["best"], summary["baseline"]
    header = [
        f"# connpub tune on {trace_name}: {summary['trials']} simulations (mode full).",
        f"# best trial {best['trial']}: {best['publish_bytes_per_s']:.0f} publish B/s vs "
        f"baseline {base['publish_bytes_per_s']:.0f} B/s, lease misses "
        f"{best['lease_miss_packets']}, stale {best['stale_flow_seconds']:.0f} flow-s "
        f"(baseline {base['stale_flow_seconds']:.0f}).",
    ]
    if not result.best.feasible:
        header.append("# No candidate was feasible: this is the input config, unchanged.")
    header.append("")
    return "\n".join(header) + config_to_toml(tuned_config(result, original))
