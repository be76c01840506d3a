"""`connpub model ...` (train/eval/info/generate-history) and `connpub trace ...` commands."""

from __future__ import annotations

import json
import time

import click
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


@model_group.command("train")
@click.option("--history", "history_path", required=True, type=click.Path(),
              help="History Parquet file or directory of part files.")
@click.option("--out", "out_path", required=True, type=click.Path(), help="ONNX file to write.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--max-iter", default=None, type=int, help="Boosting rounds per quantile.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def train_cmd(history_path: str, out_path: str, seed: int, max_iter: int | None,
              as_json: bool) -> None:
    """Train the quantile model on a history and export one ONNX file.

    Example: connpub model train --history hist.parquet --out model.onnx --seed 1
    """
    from dataclasses import replace

    from connpub.model.features import sample_history
    from connpub.model.quantile import TrainConfig, export_onnx, read_metadata, train_samples
    from connpub.traffic.trace import read_history

    config = TrainConfig() if max_iter is None else replace(TrainConfig(), max_iter=max_iter)
    if config.max_iter <= 0:
        raise ConnpubError(f"--max-iter must be positive, got {config.max_iter}")
    history = read_history(history_path)
    started = time.perf_counter()
    with _stderr.status(f"training on {history.size} flows"):
        samples = sample_history(history)
        fitted = train_samples(samples, seed=seed, config=config)
        export_onnx(fitted, out_path)
    meta = read_metadata(out_path)
    _emit("model train", {
        "out": out_path, "model_id": meta["model_id"], "trees": int(meta["trees"]),
        "flows": fitted.training["flows"], "rows": fitted.training["rows"],
        "seconds": round(time.perf_counter() - started, 2),
    }, as_json)


@model_group.command("eval")
@click.option("--history", "history_path", required=True, type=click.Path(),
              help="Held-back history Parquet file or directory.")
@click.option("--model", "model_path", required=True, type=click.Path(),
              help="ONNX model file ('default' = the shipped model).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def eval_cmd(history_path: str, model_path: str, as_json: bool) -> None:
    """MAE of log remaining duration vs the per-service median baseline, and p10-p90 coverage.

    Example: connpub model eval --history heldout.parquet --model model.onnx --json
    """
    from connpub.model.quantile import Predictor, default_model_path, evaluate
    from connpub.traffic.trace import read_history

    predictor = Predictor(default_model_path() if model_path == "default" else model_path)
    metrics = evaluate(read_history(history_path), predictor)
    _emit("model eval", metrics, as_json)


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
    """Add `model` and `trace` (merging into an existing `trace` group if another area made one)."""
    group.add_command(model_group)
    existing = group.commands.get("trace")
    if isinstance(existing, click.Group):
        for name, command in trace_group.commands.items():
            existing.add_command(command, name)
    else:
        group.add_command(trace_group)
