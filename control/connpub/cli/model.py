"""`connpub model ...` (train/eval/info/generate-history) and `connpub trace ...` commands."""

from __future__ import annotations

import json
import time

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from connpub.errors import ConnpubError

_stdout = Console()
_stderr = Console(stderr=True)


def _print_table(title: str, rows: dict) -> None:
    table = Table(title=title, show_header=True)
    table.add_column("key")
    table.add_column("value")
    for key, value in rows.items():
        shown = f"{value:.4g}" if isinstance(value, float) else (
            json.dumps(value) if isinstance(value, dict | list) else str(value)
        )
        table.add_row(key, shown)
    _stdout.print(table)


def _emit(title: str, rows: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
    else:
        _print_table(title, rows)


@click.group("model")
def model_group() -> None:
    """Remaining-duration model: train, evaluate, inspect, make training history.

    Example: connpub model info default
    """


def _source_samples(paths: tuple[str, ...], interval_s: float):
    """(Samples of all sources, source index per row): each path a history or trace Parquet
    file (or directory of parts), a pcap, a Zeek conn.log or an Argus .binetflow."""
    from connpub.model.samples import Samples, sample_flows
    from connpub.traffic.flowlogs import read_flow_source

    parts = []
    for path in paths:
        with _stderr.status(f"reading {path}"):
            parts.append(sample_flows(read_flow_source(path), interval_s=interval_s))
    groups = np.concatenate([np.full(part.log_remaining_s.size, index)
                             for index, part in enumerate(parts)])
    return Samples.concat(parts), groups


_SOURCE_HELP = ("History or trace Parquet (file or directory), pcap, Zeek conn.log or Argus "
                ".binetflow; repeat for several sources.")


@model_group.command("train")
@click.option("--history", "history_paths", required=True, multiple=True, type=click.Path(),
              help=_SOURCE_HELP)
@click.option("--out", "out_path", required=True, type=click.Path(), help="ONNX file to write.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--max-iter", default=None, type=int, help="Boosting rounds per quantile.")
@click.option("--interval-s", default=1.0, show_default=True, type=float,
              help="Publish cycle T of the decision schedule the samples follow.")
@click.option("--calibration", type=click.Choice(["auto", "cross-source", "holdout", "none"]),
              default="auto", show_default=True,
              help="Conformal offsets: auto = cross-source with several --history, else holdout.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def train_cmd(history_paths: tuple[str, ...], out_path: str, seed: int, max_iter: int | None,
              interval_s: float, calibration: str, as_json: bool) -> None:
    """Train the quantile model on histories/captures and export one ONNX file.

    Example: connpub model train --history a.parquet --history conn.log --out model.onnx
    """
    from dataclasses import replace

    from connpub.model.quantile import TrainConfig, export_onnx, read_metadata, train_samples

    config = TrainConfig() if max_iter is None else replace(TrainConfig(), max_iter=max_iter)
    if config.max_iter <= 0:
        raise ConnpubError(f"--max-iter must be positive, got {config.max_iter}")
    if calibration == "cross-source" and len(history_paths) < 2:
        raise ConnpubError("--calibration cross-source needs at least two --history sources")
    samples, groups = _source_samples(history_paths, interval_s)
    cross = calibration == "cross-source" or (calibration == "auto" and len(history_paths) > 1)
    started = time.perf_counter()
    with _stderr.status(f"training on {samples.log_remaining_s.size} decision samples"):
        fitted = train_samples(samples, seed=seed, config=config,
                               calibration_fraction=0.0 if calibration == "none" else 0.2,
                               groups=groups if cross else None)
        export_onnx(fitted, out_path)
    meta = read_metadata(out_path)
    _emit("model train", {
        "out": out_path, "model_id": meta["model_id"], "trees": int(meta["trees"]),
        "flows": fitted.training["flows"], "rows": fitted.training["rows"],
        "calibration": fitted.training["calibration"],
        "seconds": round(time.perf_counter() - started, 2),
    }, as_json)


def _group_table(title: str, groups: dict) -> None:
    columns = ("rows", "mae", "baseline_mae", "baseline_own_mae", "age_only_mae", "coverage")
    table = Table(title=title)
    table.add_column("group")
    for column in columns:
        table.add_column(column, justify="right")
    for name, row in groups.items():
        table.add_row(name, *(f"{row[c]:.3f}" if isinstance(row.get(c), float)
                              else str(row.get(c, "")) for c in columns))
    _stdout.print(table)


@model_group.command("eval")
@click.option("--history", "history_paths", required=True, multiple=True, type=click.Path(),
              help="Held-back " + _SOURCE_HELP)
@click.option("--model", "model_path", required=True, type=click.Path(),
              help="ONNX model file ('default' = the shipped model).")
@click.option("--interval-s", default=1.0, show_default=True, type=float,
              help="Publish cycle T of the decision schedule the samples follow.")
@click.option("--uncalibrated", is_flag=True, help="Ignore the model's conformal offsets.")
@click.option("--online", is_flag=True,
              help="Replay the agent's online coverage tracker over the decisions.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def eval_cmd(history_paths: tuple[str, ...], model_path: str, interval_s: float,
             uncalibrated: bool, online: bool, as_json: bool) -> None:
    """MAE of log remaining duration vs baselines, p10-p90 coverage, by protocol/age/duration.

    baseline_mae uses the per-service medians of the model's training rows (model metadata),
    baseline_own_mae the test rows' own medians, age_only_mae the rule "remaining = age".

    Example: connpub model eval --history heldout.parquet --model model.onnx --json
    """
    from connpub.model.quantile import Predictor, default_model_path, evaluate_samples

    predictor = Predictor(default_model_path() if model_path == "default" else model_path,
                          calibrated=not uncalibrated)
    samples, _ = _source_samples(history_paths, interval_s)
    metrics = evaluate_samples(samples, predictor, online=online, interval_s=interval_s)
    if as_json:
        click.echo(json.dumps(metrics, indent=2, sort_keys=True))
        return
    _print_table("model eval", {k: v for k, v in metrics.items() if not isinstance(v, dict)})
    for key in ("by_protocol", "by_age", "by_duration"):
        if key in metrics:
            _group_table(key, metrics[key])


@model_group.command("train-fleet")
@click.argument("histories")
@click.option("--out", "out_path", required=True, type=click.Path(), help="ONNX file to write.")
@click.option("--scheduler", default=None, help="Dask scheduler ADDR (default: a LocalCluster).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1),
              help="Threads of the in-process LocalCluster (worker processes with --processes).")
@click.option("--processes", is_flag=True, help="LocalCluster with one worker process per core.")
@click.option("--max-iter", default=None, type=click.IntRange(min=1),
              help="Boosting rounds of the median.")
@click.option("--interval-s", default=1.0, show_default=True, type=float,
              help="Publish cycle T of the decision schedule the samples follow.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def train_fleet_cmd(histories: str, out_path: str, scheduler: str | None, workers: int,
                    processes: bool, max_iter: int | None, interval_s: float, seed: int,
                    as_json: bool) -> None:
    """Train on the histories of many servers (a glob or a directory of Parquet files) with
    LightGBM on Dask; the same model file as `model train`.

    Example: connpub model train-fleet '/srv/history/*/part-*.parquet' --out fleet.onnx --json
    """
    import contextlib
    import os
    import sys
    from dataclasses import asdict, replace

    from connpub.model.fleet import history_files, train_fleet
    from connpub.model.quantile import TrainConfig

    config = TrainConfig() if max_iter is None else replace(TrainConfig(), max_iter=max_iter)
    files = history_files(histories)
    where = scheduler or (f"LocalCluster, {workers} worker processes" if processes
                          else f"in-process LocalCluster, {workers} threads")
    # LightGBM (here and in worker processes, which inherit fd 1) prints its network set-up on
    # stdout: send fd 1 to stderr while training so stdout keeps only the summary
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with _stderr.status(f"training on {len(files)} history files ({where})"), \
                contextlib.redirect_stdout(sys.stderr):
            result = train_fleet(histories, out_path, scheduler=scheduler, workers=workers,
                                 config=config, interval_s=interval_s, seed=seed,
                                 processes=processes)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    _emit("model train-fleet", asdict(result), as_json)


@model_group.command("info")
@click.argument("model_file", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
def info_cmd(model_file: str, as_json: bool) -> None:
    """Check a model file and show its metadata ('default' = the shipped model).

    Example: connpub model info default --json
    """
    from connpub.model.quantile import default_model_path, model_info

    path = default_model_path() if model_file == "default" else model_file
    _emit("model info", model_info(path), as_json)


def generated_workload_options(func):
    """The options of a command that writes a generated workload: which, how big, where."""
    for option in reversed([
        click.option("--workload", default="mixed", show_default=True),
        click.option("--flows", default=100_000, show_default=True, type=int),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--window-s", default=3600.0, show_default=True, type=float,
                     help="Seconds over which sessions start."),
        click.option("--out", "out_path", required=True, type=click.Path()),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
    ]):
        func = option(func)
    return func


@model_group.command("generate-history")
@generated_workload_options
def generate_history_cmd(workload: str, flows: int, seed: int, window_s: float, out_path: str,
                         as_json: bool) -> None:
    """Write finished-flow history records of a generated workload (training data).

    Example: connpub model generate-history --workload mixed --flows 200000 --out hist.parquet
    """
    from connpub.traffic import workload as wl
    from connpub.traffic.trace import history_from_flows, write_history

    table = wl.generate(workload, flows, seed=seed, window_s=window_s)
    write_history(history_from_flows(table), out_path,
                  {"workload": workload, "seed": str(seed), "flows": str(flows)})
    _emit("history", {"out": out_path, "workload": workload, "seed": seed,
                      **_flat(wl.summary(table))}, as_json)


def _flat(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not isinstance(v, dict)}


@click.group("trace")
def trace_group() -> None:
    """Flow traces (Parquet): generate from a named workload, import a pcap, summarise.

    Example: connpub trace generate --workload mixed --flows 1000 --out mixed.parquet
    """


@trace_group.command("generate")
@generated_workload_options
def trace_generate_cmd(workload: str, flows: int, seed: int, window_s: float, out_path: str,
                       as_json: bool) -> None:
    """Generate a workload's flow table and write it as a Parquet trace.

    Example: connpub trace generate --workload web --flows 5000 --seed 3 --out web.parquet
    """
    from connpub.traffic import workload as wl
    from connpub.traffic.trace import write_trace

    table = wl.generate(workload, flows, seed=seed, window_s=window_s)
    write_trace(table, out_path, {"workload": workload, "seed": str(seed),
                                  "window_s": str(window_s)})
    _emit("trace", {"out": out_path, **_flat(wl.summary(table))}, as_json)


@trace_group.command("from-pcap")
@click.argument("pcap_file", type=click.Path())
@click.option("--out", "out_path", required=True, type=click.Path())
@click.option("--udp-idle-s", default=30.0, show_default=True, type=float,
              help="A UDP flow idle this long ends (finite, > 0).")
@click.option("--allow-truncated", is_flag=True,
              help="Import a capture cut mid-record up to its last complete record.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def trace_from_pcap_cmd(pcap_file: str, out_path: str, udp_idle_s: float, allow_truncated: bool,
                        as_json: bool) -> None:
    """Build flows (5-tuple, first/last packet, FIN/RST closes) from a pcap/pcapng into a trace;
    the summary counts what was skipped (multicast, fragments, non-TCP/UDP, ...).

    Example: connpub trace from-pcap capture.pcapng --out trace.parquet --json
    """
    from connpub.traffic import workload as wl
    from connpub.traffic.trace import check_udp_idle_s, import_pcap, write_trace

    check_udp_idle_s(udp_idle_s)
    started = time.perf_counter()
    with _stderr.status(f"reading {pcap_file}"):
        table, stats = import_pcap(pcap_file, udp_idle_s, allow_truncated)
    elapsed = time.perf_counter() - started
    if table.size == 0:
        raise ConnpubError(f"{pcap_file}: no unicast TCP/UDP over IPv4/IPv6 packets found "
                           f"({stats.records} records)")
    write_trace(table, out_path, {"source": pcap_file})
    skipped = {f"pcap_{k}": v for k, v in stats.as_dict().items() if k != "link_types"}
    _emit("trace", {"out": out_path, **skipped, "pcap_seconds": round(elapsed, 3),
                    **_flat(wl.summary(table))}, as_json)


@trace_group.command("show")
@click.argument("trace_file", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def trace_show_cmd(trace_file: str, as_json: bool) -> None:
    """Summarise a Parquet trace (durations, shares, sessions).

    Example: connpub trace show mixed.parquet --json
    """
    from connpub.traffic import workload as wl
    from connpub.traffic.trace import read_trace

    table = read_trace(trace_file)
    if table.size == 0:
        raise ConnpubError(f"{trace_file}: trace holds no flows")
    _emit("trace", wl.summary(table), as_json)


def register(group: click.Group) -> None:
    """Add `model`, `history` and `trace` (merging into an existing `trace` group if another
    area made one)."""
    from connpub.cli.history import register as register_history

    group.add_command(model_group)
    register_history(group)
    existing = group.commands.get("trace")
    if isinstance(existing, click.Group):
        for name, command in trace_group.commands.items():
            existing.add_command(command, name)
    else:
        group.add_command(trace_group)
