"""The simulator on several cores (docs/simulator.md, "Scale"): the flows split into shards
that share no LB or server state, each shard runs in a worker process with the same engine
(sim.engine.ModeRun, the agents' own rules), and the shards' runs add up to the serial run's
metrics exactly (sim.merge_parts; tests/test_sim_parallel.py).

Why (VIP, protocol) shards are independent: a traffic class is (VIP, port, proto), every
aggregate key keeps the VIP and the protocol (when every [masks] level keeps the VIP), a lease,
an aggregate, a CLOSED and a lease plan only ever concern flows of one class or of one
aggregate, and the model sees one flow's features at a time (client priors come from the
whole trace, computed once here). What couples shards, and how it is handled:
- publish packets: a server's packet carries entries of every VIP, so shards count entries per
  server and step, and the packets are counted after the merge (sim.mode_metrics);
- the level decisions: the spread bound ([granularity] max_spread, docs/policy.md) predicts the
  backends' load over every VIP, and map pressure counts every shard's connections. At each
  granularity evaluation every shard sends its classes' signals (sim.engine.EvalSignals: a few
  numbers per class) to this process, which runs the LB agent's one LevelPipeline over all
  classes, as one run would (sim.engine.evaluate_levels), and sends each shard its classes'
  levels (`_Coordinator`); the shards run in lock step only at evaluations;
- publish loss (SimOptions.loss > 0): the loss draws follow the order of one run's packets,
  so with loss every mode runs whole in one worker (modes in parallel, no shards).
Worker processes are forked (Linux): they inherit the trace and the prior index."""

from __future__ import annotations

import multiprocessing
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

import numpy as np

from connpub.config import Config
from connpub.datapath.abi import CLASS_KEY_DTYPE
from connpub.errors import ConnpubError
from connpub.policy.granularity import aggregate_units
from connpub.policy.pipeline import LevelPipeline
from connpub.sim import (
    ModelPredictor,
    ModePart,
    merge_parts,
    mode_metrics,
    parse_modes,
    run_clock,
    run_mode,
)
from connpub.sim.engine import EvalSignals, SimOptions, evaluate_levels
from connpub.sim.flows import class_words, client_priors, group_ids, prepare
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
    level drops the VIP (aggregates then span VIPs) or with publish loss (module doc). Every
    shard costs a step's fixed overhead per publish interval, so there are few."""
    if shards <= 1 or options.loss > 0 or not all(spec.keep_vip for spec in cfg.masks.specs):
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


def _run_shard(task: tuple[int, tuple[int, ...]], conn: Connection | None = None
               ) -> list[tuple[int, ModePart]]:
    """Worker: prepare shard `task[0]` and run the modes `task[1]` (indices into job.modes);
    with `conn` (several shards) its granularity evaluations go through the _Coordinator."""
    job = _JOB
    assert job is not None
    rows = job.shards[task[0]]
    options = job.options
    flows = prepare(job.trace[rows], job.cfg, options.servers, options.hash_client_only,
                    priors=job.priors)
    if conn is not None:
        conn.send(("classes", flows.class_keys))
    predictor = job.predictor
    out = []
    for mode_index in task[1]:
        mode = job.modes[mode_index]
        if predictor is None and mode in ("predictive", "full"):
            predictor = ModelPredictor(job.cfg.model.path or None)
        exchange = None
        if conn is not None:
            exchange = _exchange(conn, mode_index)
        part = run_mode(flows, mode, mode_index, job.cfg, options, predictor, job.ticks,
                        exchange=exchange)
        # flow indices of the shard -> of the whole trace (the serial order of predictions)
        part.quality = [(q[0], q[1], q[2], rows[q[3]], q[4]) for q in part.quality]
        out.append((mode_index, part))
    return out


def _exchange(conn: Connection, mode_index: int) -> Callable[[EvalSignals], np.ndarray]:
    def exchange(signals: EvalSignals) -> np.ndarray:
        conn.send(("eval", mode_index, signals))
        return conn.recv()
    return exchange


def _shard_process(index: int, modes: tuple[int, ...], conn: Connection) -> None:
    """Body of a shard's process: its parts, or the error, to the coordinator."""
    try:
        conn.send(("done", _run_shard((index, modes), conn)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class _Coordinator:
    """The LB agent's evaluations of a sharded run: one LevelPipeline per mode over every
    shard's classes (numbered as one run over all flows numbers them: sim.flows.class_words),
    fed with the shards' EvalSignals of the same evaluation placed at their classes' rows;
    occupancy is the valid connections of all shards over the LB's capacity."""

    def __init__(self, cfg: Config, options: SimOptions, shard_keys: list[np.ndarray]) -> None:
        self.cfg, self.options = cfg, options
        keys = np.concatenate(shard_keys).astype(CLASS_KEY_DTYPE)  # (concatenate: native order)
        ids, classes = group_ids(class_words(keys))
        if classes != keys.size:
            raise ConnpubError("a traffic class is in two shards")
        self.class_keys = np.empty(classes, keys.dtype)
        self.class_keys[ids] = keys
        bounds = np.cumsum([0, *(k.size for k in shard_keys)])
        self.rows = [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        self.units = aggregate_units(self.class_keys)
        self.columns = np.ones((1, options.servers + 1), bool)  # one service: every backend
        self.columns[0, 0] = False  # as ModeRun.backend_columns
        self.pipelines: dict[int, LevelPipeline] = {}

    def evaluate(self, mode_index: int, signals: list[EvalSignals]) -> list[np.ndarray]:
        """Each shard's classes' levels from all shards' signals of one evaluation."""
        if len({s.now_ns for s in signals}) != 1:
            raise ConnpubError("shards evaluated at different times")
        classes = self.class_keys.size
        pipeline = self.pipelines.setdefault(mode_index, LevelPipeline(self.cfg, classes))
        first = signals[0]
        merged = EvalSignals(first.now_ns, np.zeros(classes), np.zeros(classes, np.int64),
                             np.zeros(classes, np.int64), np.full(classes, np.nan),
                             sum(s.valid for s in signals),
                             np.zeros((classes, *first.loads.shape[1:])))
        for rows, part in zip(self.rows, signals, strict=True):
            for name in ("bytes_seen", "new_flows", "active_flows", "mean_age_s", "loads"):
                getattr(merged, name)[rows] = getattr(part, name)
        levels = evaluate_levels(pipeline, self.cfg, self.class_keys, merged,
                                 self.options.lb_capacity, self.columns, self.units)
        return [levels[rows] for rows in self.rows]


def _run_sharded(job: _Job, tasks: list[tuple[int, tuple[int, ...]]],
                 progress: ProgressFn | None) -> list[list[tuple[int, ModePart]]]:
    """Every shard in its own forked process at once (they step in lock step at the
    granularity evaluations, _Coordinator); returns each shard's parts."""
    context = multiprocessing.get_context("fork")
    conns: list[Connection] = []
    processes = []
    try:
        for index, modes in tasks:
            ours, theirs = context.Pipe()
            process = context.Process(target=_shard_process, args=(index, modes, theirs),
                                      daemon=True)
            process.start()
            theirs.close()
            conns.append(ours)
            processes.append(process)
        keys = [_expect(conn, "classes")[1] for conn in conns]
        coordinator = _Coordinator(job.cfg, job.options, [keys[p] for p in _by_shard(tasks)])
        order = _by_shard(tasks)  # position in `tasks` of shard 0, 1, ...
        outputs: list = [None] * len(conns)
        pending: dict[int, dict[int, EvalSignals]] = {}
        waiting = set(range(len(conns)))
        while waiting:
            for conn in wait([conns[i] for i in waiting]):
                position = conns.index(conn)
                message = _expect(conn, "eval", "done")
                if message[0] == "done":
                    outputs[position] = message[1]
                    waiting.discard(position)
                    if progress is not None:
                        progress(len(conns) - len(waiting), len(conns))
                    continue
                mode_index, signals = message[1], message[2]
                batch = pending.setdefault(mode_index, {})
                batch[position] = signals
                if len(batch) == len(conns):
                    del pending[mode_index]
                    levels = coordinator.evaluate(mode_index, [batch[p] for p in order])
                    for shard, position_of in enumerate(order):
                        conns[position_of].send(levels[shard])
        if pending:
            raise ConnpubError("a shard ended before the others' evaluations")
        return outputs
    finally:
        for conn in conns:
            conn.close()
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join()


def _by_shard(tasks: list[tuple[int, tuple[int, ...]]]) -> list[int]:
    """Positions in `tasks` of shard 0, 1, ..."""
    return [position for _, position in sorted((task[0], p) for p, task in enumerate(tasks))]


def _expect(conn: Connection, *kinds: str) -> tuple:
    try:
        message = conn.recv()
    except EOFError:
        raise ConnpubError("a simulator shard process died (out of memory?)") from None
    if message[0] == "error":
        raise ConnpubError(f"a simulator shard failed:\n{message[1]}")
    if message[0] not in kinds:
        raise ConnpubError(f"unexpected message {message[0]!r} from a simulator shard")
    return message


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
    workers). shards: default one per worker, more for large traces (every shard is a
    process of its own: they step together at evaluations)."""
    global _JOB
    options = options or SimOptions()
    modes = parse_modes(modes)
    workers = workers or default_workers()
    if (np.diff(trace["start_ns"]) < 0).any():
        trace = trace[np.argsort(trace["start_ns"], kind="stable")]
    ticks, duration_s, flows_started = run_clock(trace["start_ns"], cfg, options)
    shards = shard_rows(trace, cfg, options, shards or max(
        workers, -(-trace.size // MAX_SHARD_FLOWS)))
    _JOB = _Job(trace, shards, modes, cfg, options, predictor, client_priors(trace), ticks)
    parts: dict[int, list[ModePart]] = {m: [] for m in range(len(modes))}
    try:
        if len(shards) > 1:
            # one process per shard with every mode (one prepare per shard), largest first
            tasks = [(i, tuple(range(len(modes)))) for i in
                     sorted(range(len(shards)), key=lambda i: -shards[i].size)]
            for output in _run_sharded(_JOB, tasks, progress):
                _collect(output, parts, None, 0, 0)
        else:
            # a task per mode, each worker preparing the whole trace: no more of them at once
            # than the memory of two MAX_SHARD_FLOWS shards
            tasks = [(0, (m,)) for m in range(len(modes))]
            pool_size = max(1, min(workers, len(tasks), 2 * MAX_SHARD_FLOWS // trace.size))
            if pool_size == 1:
                for done, output in enumerate(map(_run_shard, tasks), 1):
                    _collect(output, parts, progress, done, len(tasks))
            else:
                context = multiprocessing.get_context("fork")
                with context.Pool(pool_size) as pool:
                    for done, output in enumerate(pool.imap_unordered(_run_shard, tasks), 1):
                        _collect(output, parts, progress, done, len(tasks))
        results: dict[str, dict] = {}
        for mode_index, mode in enumerate(modes):
            merged = merge_parts(parts[mode_index])  # in any order: the parts add up
            results[mode] = mode_metrics(merged, cfg, options, duration_s, flows_started)
            results[mode]["parallel"] = {"shards": len(shards), "workers": workers}
        return results
    finally:
        _JOB = None


def _collect(output: list[tuple[int, ModePart]], parts: dict[int, list[ModePart]],
             progress: ProgressFn | None, done: int, total: int) -> None:
    for mode_index, part in output:
        parts[mode_index].append(part)
    if progress is not None:
        progress(done, total)
