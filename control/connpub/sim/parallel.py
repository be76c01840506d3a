"""The simulator on several cores (docs/simulator.md, "Scale"): the flows split into shards
that share no LB or server state, each shard's modes run in a worker process with the same
engine (sim.engine.ModeRun, the agents' own rules), and the shards' runs add up to the serial
run's metrics exactly (sim.merge_parts; tests/test_sim_parallel.py).

Why (VIP, protocol) shards are independent: a traffic class is (VIP, port, proto), every
aggregate key keeps the VIP and the protocol (when every [masks] level keeps the VIP), a lease,
an aggregate, a CLOSED and a level decision only ever concern flows of one class or of one
aggregate, and the model sees one flow's features at a time (client priors come from the
whole trace, computed once here). What couples shards, and how it is handled:
- publish packets: a server's packet carries entries of every VIP, so shards count entries per
  server and step, and the packets are counted after the merge (sim.mode_metrics);
- map pressure: the LB's occupancy counts every shard's connections; each shard records its
  valid connections at every evaluation, and if the summed occupancy would have forced another
  level than a shard's own at any evaluation the mode is re-run serially (`serial_reruns`);
- publish loss (SimOptions.loss > 0): the loss draws follow the order of one run's packets,
  so with loss every mode runs whole in one worker (modes in parallel, no shards);
- the spread bound ([granularity] max_spread, docs/policy.md): the backends' load is every
  VIP's, so while the bound can bind (max_spread below the server count) there are no shards.
Worker processes are forked (Linux): they inherit the trace and the prior index."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from connpub.config import Config
from connpub.policy.granularity import map_pressure_min_level
from connpub.sim import (
    ModelPredictor,
    ModePart,
    merge_parts,
    mode_metrics,
    parse_modes,
    run_clock,
    run_mode,
)
from connpub.sim.engine import SimOptions
from connpub.sim.flows import client_priors, prepare
from connpub.sim.predictors import LeasePredictor

ProgressFn = Callable[[int, int], None]  # (tasks done, tasks)
MAX_SHARD_FLOWS = 3_000_000  # more flows: more shards than workers (a worker's memory)


@dataclass
class _Job:
    """What forked workers inherit (module global, set before the pool starts)."""

    trace: np.ndarray
    shards: list[np.ndarray]  # row indices into trace, ascending
    modes: tuple[str, ...]
    cfg: Config
    options: SimOptions
    predictor: LeasePredictor | None
    priors: object
    ticks: int


_JOB: _Job | None = None


def shard_rows(trace: np.ndarray, cfg: Config, options: SimOptions, shards: int
               ) -> list[np.ndarray]:
    """Row indices (ascending) of at most `shards` independent shards of a trace of about
    equal size, each a set of whole (VIP, protocol) groups; a single shard when a [masks]
    level drops the VIP (aggregates then span VIPs), with publish loss or a spread bound that
    can bind (module doc). Every
    shard costs a step's fixed overhead per publish interval, so there are few."""
    if shards <= 1 or options.loss > 0 or not all(spec.keep_vip for spec in cfg.masks.specs) \
            or cfg.granularity.max_spread < options.servers:
        return [np.arange(trace.size)]
    groups = _vip_proto_groups(trace)
    bins: list[list[np.ndarray]] = [[] for _ in range(min(shards, len(groups)))]
    sizes = np.zeros(len(bins), np.int64)
    for group in sorted(groups, key=lambda g: -g.size):  # largest first into the emptiest
        emptiest = int(np.argmin(sizes))
        bins[emptiest].append(group)
        sizes[emptiest] += group.size
    return [np.sort(np.concatenate(b)) for b in bins]


def _vip_proto_groups(trace: np.ndarray) -> list[np.ndarray]:
    """Row indices (ascending) of each (VIP, protocol) group."""
    words = np.ascontiguousarray(trace["vip_addr"]).view("<u8")
    group = np.asarray(trace["proto"], np.int64)
    for column in range(words.shape[1]):  # 1-D uniques: a few VIPs among millions of flows
        values, inverse = np.unique(words[:, column], return_inverse=True)
        group = group * values.size + inverse.reshape(-1)
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    return list(np.split(order, bounds))


def _run_shard(task: tuple[int, tuple[int, ...]]) -> list[tuple[int, ModePart]]:
    """Worker: prepare shard `task[0]` and run the modes `task[1]` (indices into job.modes)."""
    job = _JOB
    assert job is not None
    rows = job.shards[task[0]]
    options = job.options
    flows = prepare(job.trace[rows], job.cfg, options.servers, options.hash_client_only,
                    priors=job.priors)
    predictor = job.predictor
    out = []
    for mode_index in task[1]:
        mode = job.modes[mode_index]
        if predictor is None and mode in ("predictive", "full"):
            predictor = ModelPredictor(job.cfg.model.path or None)
        part = run_mode(flows, mode, mode_index, job.cfg, options, predictor, job.ticks)
        # flow indices of the shard -> of the whole trace (the serial order of predictions)
        part.quality = [(q[0], q[1], q[2], rows[q[3]], q[4]) for q in part.quality]
        out.append((mode_index, part))
    return out


def pressure_consistent(parts: Sequence[ModePart], cfg: Config, options: SimOptions) -> bool:
    """True when no shard's own occupancy forced another map-pressure level than the summed
    occupancy of all shards would have, at any granularity evaluation."""
    thresholds = cfg.granularity.map_pressure
    for counts in zip(*(p.evaluated_valid for p in parts), strict=True):
        total = map_pressure_min_level(sum(counts) / options.lb_capacity, thresholds)
        if any(map_pressure_min_level(c / options.lb_capacity, thresholds) != total
               for c in counts):
            return False
    return True


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


def simulate_parallel(trace: np.ndarray, modes: Sequence[str], cfg: Config,
                      options: SimOptions | None = None,
                      predictor: LeasePredictor | None = None, workers: int | None = None,
                      progress: ProgressFn | None = None, shards: int | None = None
                      ) -> dict[str, dict]:
    """simulate_flows(prepare(trace, ...), modes, ...) over `workers` processes (default: the
    cores this process may use); the same metrics, except sim_seconds (summed over shards).
    The trace must be conditioned (sim.condition); results also carry `parallel` (shards,
    workers, serial re-runs). shards: default one per worker, more for large traces."""
    global _JOB
    options = options or SimOptions()
    modes = parse_modes(modes)
    workers = workers or default_workers()
    if (np.diff(trace["start_ns"]) < 0).any():
        trace = trace[np.argsort(trace["start_ns"], kind="stable")]
    ticks, duration_s, flows_started = run_clock(trace["start_ns"], cfg, options)
    shards = shard_rows(trace, cfg, options, shards or max(
        workers, -(-trace.size // MAX_SHARD_FLOWS)))
    # one task per shard with every mode (one prepare per shard); without shards, a task per
    # mode; largest first so the last tasks to finish are small
    if len(shards) > 1:
        tasks = [(i, tuple(range(len(modes)))) for i in
                 sorted(range(len(shards)), key=lambda i: -shards[i].size)]
    else:
        tasks = [(0, (m,)) for m in range(len(modes))]
    _JOB = _Job(trace, shards, modes, cfg, options, predictor, client_priors(trace), ticks)
    parts: dict[int, list[ModePart]] = {m: [] for m in range(len(modes))}
    try:
        if workers == 1 or len(tasks) == 1:
            outputs = map(_run_shard, tasks)
            for done, output in enumerate(outputs, 1):
                _collect(output, parts, progress, done, len(tasks))
        else:
            context = multiprocessing.get_context("fork")
            # without shards every mode's worker prepares the whole trace: run no more of
            # them at once than the memory of two MAX_SHARD_FLOWS shards
            pool_size = min(workers, len(tasks)) if len(shards) > 1 else \
                max(1, min(workers, len(tasks), 2 * MAX_SHARD_FLOWS // trace.size))
            with context.Pool(pool_size) as pool:
                for done, output in enumerate(pool.imap_unordered(_run_shard, tasks), 1):
                    _collect(output, parts, progress, done, len(tasks))
        results: dict[str, dict] = {}
        reruns = []
        for mode_index, mode in enumerate(modes):
            ordered = parts[mode_index]  # in completion order: the parts add up in any
            if len(ordered) > 1 and not pressure_consistent(ordered, cfg, options):
                reruns.append(mode)
                _JOB.shards = [np.arange(trace.size)]
                merged = _run_shard((0, (mode_index,)))[0][1]
            else:
                merged = merge_parts(ordered)
            results[mode] = mode_metrics(merged, cfg, options, duration_s, flows_started)
            results[mode]["parallel"] = {"shards": len(shards), "workers": workers,
                                         "serial_rerun": mode in reruns}
        return results
    finally:
        _JOB = None


def _collect(output: list[tuple[int, ModePart]], parts: dict[int, list[ModePart]],
             progress: ProgressFn | None, done: int, total: int) -> None:
    for mode_index, part in output:
        parts[mode_index].append(part)
    if progress is not None:
        progress(done, total)
