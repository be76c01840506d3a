"""`connpub sim` (simulate modes on a trace) and `connpub tune` (search thresholds and lease
bounds with the simulator); docs/simulator.md."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from connpub.config import Config, check_config, load_config
from connpub.display import print_json, print_table
from connpub.errors import ConnpubError
from connpub.traffic.workload import WORKLOADS

HEADLINE = (
    ("publish_packets_per_s", "pkts/s", "{:.1f}"),
    ("publish_bytes_per_s", "bytes/s", "{:.0f}"),
    ("entries_per_s", "entries/s", "{:.1f}"),
    ("map_writes_per_s", "map writes/s", "{:.1f}"),
    ("lease_miss_packets", "miss pkts", "{}"),
    ("lease_miss_flows", "miss flows", "{}"),
    ("stale_flow_seconds", "stale flow-s", "{:.0f}"),
    ("stale_tcp_flow_seconds", "stale TCP", "{:.0f}"),
    ("stale_udp_flow_seconds", "stale UDP", "{:.0f}"),
    ("peak_lb_entries", "peak LB entries", "{}"),
)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)


def _load_trace(trace_path: str | None, flows: int | None, workload: str, seed: int,
                window_s: float) -> tuple[np.ndarray, str]:
    if (trace_path is None) == (flows is None):
        raise ConnpubError("give either --trace FILE or --flows N (with --workload NAME)")
    if trace_path is not None:
        from connpub.traffic.flowlogs import read_flow_source

        return read_flow_source(trace_path), trace_path
    from connpub.traffic.workload import generate

    return (generate(workload, flows, seed=seed, window_s=window_s),
            f"{workload} x {flows} flows (seed {seed}, {window_s:g}s)")


def _condition(trace: np.ndarray, cfg: Config):
    """Repair the trace and cut idle time (sim.condition); say on stderr what changed."""
    from connpub.sim.condition import condition_trace

    trace, conditioning = condition_trace(trace, cfg, copy=False)  # the trace is ours
    repaired = conditioning.repaired()
    if repaired:
        click.echo("repaired the trace: " + ", ".join(f"{k} {v:g}" for k, v in repaired.items())
                   + f" (idle stretches kept at {conditioning.keep_idle_s:g} s)", err=True)
    return trace, conditioning


def _config(config_path: str | None, rollout_fraction: float | None) -> Config:
    cfg = load_config(config_path) if config_path else Config()
    fraction = rollout_fraction if rollout_fraction is not None else (
        cfg.rollout.fraction if config_path else 1.0)
    if not 0.0 <= fraction <= 1.0:
        raise ConnpubError(f"--rollout-fraction {fraction:g} is out of range; use 0..1")
    return dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, fraction=fraction))


def _options(seed: int, duration_s: float | None, servers: int, hash_client_only: bool,
             loss: float):
    from connpub.sim import SimOptions

    if not 0.0 <= loss < 1.0:
        raise ConnpubError(f"--loss {loss:g} is out of range; use 0 <= loss < 1")
    if duration_s is not None and duration_s <= 0:
        raise ConnpubError(f"--duration {duration_s:g} must be positive")
    return SimOptions(servers=servers, hash_client_only=hash_client_only, loss=loss, seed=seed,
                      duration_s=duration_s)


def _trace_options(func):
    options = [
        click.option("--trace", "trace_path", type=click.Path(exists=True),
                     help="Parquet trace (connpub trace generate / from-pcap) or history, a "
                          "pcap, a Zeek conn.log or an Argus .binetflow."),
        click.option("--flows", type=click.IntRange(1),
                     help="Generate a trace of N flows instead."),
        click.option("--workload", type=click.Choice(sorted(WORKLOADS)), default="mixed",
                     show_default=True, help="Workload of the generated trace."),
        click.option("--window", "window_s", type=float, default=3600.0, show_default=True,
                     help="Seconds over which generated sessions start."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the generated trace, of publish loss and of the search."),
        click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
                     help="connpub TOML config (default: the built-in defaults)."),
        click.option("--rollout-fraction", type=float, default=None,
                     help="Share of classes in the cohort [default: 1, or the config's value "
                          "with --config]."),
        click.option("--duration", "duration_s", type=float, default=None,
                     help="Simulated seconds [default: up to the last flow start]."),
        click.option("--servers", type=click.IntRange(1, 4096), default=4, show_default=True,
                     help="Backends behind the VIPs (Maglev picks one per flow)."),
        click.option("--hash-client-only", is_flag=True,
                     help="VIPs hash on the client address only (one backend per client)."),
        click.option("--loss", type=float, default=0.0, show_default=True,
                     help="Probability that a PUBLISH packet is lost."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _predictors(specs: str, history_path: str | None, trace: np.ndarray, cfg: Config) -> list:
    """The --predictor list (sim.predictors.make_predictor); per-port learns from
    --predictor-history or, without it, from the simulated trace (in-sample)."""
    from connpub.sim import make_predictor

    names = [s.strip() for s in specs.split(",") if s.strip()]
    if not names:
        raise ConnpubError("--predictor: name at least one predictor")
    training, source = trace, "in-sample"
    if history_path is not None and any(n == "per-port" for n in names):
        from connpub.traffic.flowlogs import read_flow_source

        training, source = read_flow_source(history_path), Path(history_path).name
    return [make_predictor(n, model_path=cfg.model.path or None, training_flows=training,
                           interval_s=cfg.publish.interval_s, training_source=source)
            for n in names]


def _rows(results: dict[str, dict]) -> list[dict]:
    base = results.get("baseline")
    rows = []
    for mode, metrics in results.items():
        row = {"mode": mode}
        for key, label, fmt in HEADLINE:
            row[label] = fmt.format(metrics[key])
        if base and base["publish_bytes_per_s"] > 0:
            ratio = base["publish_bytes_per_s"] / max(metrics["publish_bytes_per_s"], 1e-9)
            row["bytes vs baseline"] = f"{ratio:.1f}x less"
        share = metrics["level_share"]
        row["flow-steps L0/L1/L2/L3 %"] = "/".join(f"{100 * s:.0f}" for s in share)
        model = metrics.get("model")
        if model:
            row["model MAE (median)"] = f"{model['mae_log']:.2f} ({model['baseline_mae_log']:.2f})"
            row["p10-p90 cover"] = f"{model['coverage_p10_p90']:.2f}"
        rows.append(row)
    return rows


@click.command("sim")
@_trace_options
@click.option("--modes", default="baseline,adaptive,predictive,full", show_default=True,
              help="Comma-separated modes to simulate.")
@click.option("--predictor", "predictor_specs", default="model", show_default=True,
              help="Remaining-duration predictor(s) of the predictive modes, comma-separated "
                   "for an ablation (one row per predictor): model, oracle, per-port, fixed "
                   "(the baseline lease k*T) or fixed:SECONDS.")
@click.option("--predictor-history", "predictor_history",
              type=click.Path(exists=True),
              help="Flow source the per-port predictor learns its quantiles from [default: "
                   "the simulated trace itself, in-sample].")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--series", is_flag=True, help="With --json: include the per-step time series.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write a PNG of bytes/s, misses, stale state and LB table size over time.")
@click.option("--workers", type=click.IntRange(0, 256), default=0, show_default=True,
              help="Processes (0: one per usable core; 1: this process only). Shards of "
                   "the flows by (VIP, protocol) run in parallel; the metrics are the same.")
def sim_command(trace_path, flows, workload, window_s, seed, config_path, rollout_fraction,
                duration_s, servers, hash_client_only, loss, modes, predictor_specs,
                predictor_history, as_json, series, plot_path, workers) -> None:
    """Replay a trace through the real policy code on a simulated clock; compare modes.

    Example: connpub sim --flows 100000 --workload mixed --modes baseline,full --plot sim.png

    Ablation: connpub sim --trace T --modes baseline,predictive
    --predictor oracle,model,per-port,fixed
    """
    from connpub.sim import parse_modes, prepare, simulate_predictors

    mode_list = parse_modes(modes)
    trace, name = _load_trace(trace_path, flows, workload, seed, window_s)
    cfg = _config(config_path, rollout_fraction)
    options = _options(seed, duration_s, servers, hash_client_only, loss)
    needs_predictor = any(m in ("predictive", "full") for m in mode_list)
    chosen = _predictors(predictor_specs, predictor_history, trace, cfg) if needs_predictor \
        else []
    trace, conditioning = _condition(trace, cfg)
    click.echo(f"simulating {name}: {trace.size} flows, modes {','.join(mode_list)}, "
               f"rollout {cfg.rollout.fraction:g}", err=True)
    from connpub.sim.parallel import default_workers, simulate_parallel

    workers = workers or default_workers()
    with _progress() as progress:
        task = progress.add_task("preparing", total=None, info="")
        if workers > 1 and len(chosen) <= 1:  # an ablation of predictors runs here
            def report_shards(done: int, total: int) -> None:
                progress.update(task, description=f"sim {','.join(mode_list)}",
                                completed=done, total=total, info=f"{done}/{total} shards")

            predictor = chosen[0] if chosen else None
            results = simulate_parallel(trace, mode_list, cfg, options, predictor, workers,
                                        report_shards)
            for mode in results:  # as simulate_predictors names a single predictor
                if predictor is not None and mode in ("predictive", "full"):
                    results[mode]["predictor"] = getattr(predictor, "name",
                                                         type(predictor).__name__)
        else:
            sim_flows = prepare(trace, cfg, options.servers, options.hash_client_only)

            def report(mode: str, tick: int, ticks: int) -> None:
                progress.update(task, description=f"sim {mode}", completed=tick, total=ticks,
                                info=f"{tick}/{ticks} steps")

            results = simulate_predictors(sim_flows, mode_list, cfg, chosen, options, report)
    if plot_path:
        from connpub.sim.plot import plot_results

        plot_results(results, plot_path, title=name)
        click.echo(f"wrote {plot_path}", err=True)
    if as_json:
        out = {"trace": name, "config": {"rollout_fraction": cfg.rollout.fraction},
               "options": dataclasses.asdict(options),
               "conditioning": dataclasses.asdict(conditioning), "modes": {}}
        for mode, metrics in results.items():
            metrics = dict(metrics)
            data = metrics.pop("series")
            if series:
                metrics["series"] = data
            out["modes"][mode] = metrics
        print_json(out)
    else:
        print_table(f"connpub sim: {name}", _rows(results))


@click.command("tune")
@_trace_options
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default="tuned.toml",
              show_default=True, help="Where to write the tuned config.")
@click.option("--budget", type=click.IntRange(1, 10000), default=30, show_default=True,
              help="Candidate configs to simulate.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def tune_command(trace_path, flows, workload, window_s, seed, config_path, rollout_fraction,
                 duration_s, servers, hash_client_only, loss, out_path,
                 budget, as_json) -> None:
    """Search granularity thresholds and lease bounds for the fewest publish bytes with zero
    lease misses and no more stale state than the baseline; write the config.

    Example: connpub tune --trace mixed.parquet --budget 40 --out tuned.toml
    """
    from connpub.sim.tune import tune, tuned_toml

    trace, name = _load_trace(trace_path, flows, workload, seed, window_s)
    original = load_config(config_path) if config_path else Config()
    if rollout_fraction is not None:
        original = dataclasses.replace(
            original, rollout=dataclasses.replace(original.rollout, fraction=rollout_fraction))
    trace, _ = _condition(trace, original)
    options = _options(seed, duration_s, servers, hash_client_only, loss)
    click.echo(f"tuning on {name}: {trace.size} flows, budget {budget}", err=True)
    with _progress() as progress:
        task = progress.add_task("tune", total=budget, info="baseline + start config")

        def report(index: int, total: int, row: dict) -> None:
            progress.update(task, completed=index,
                            info=f"trial {index}: {row['publish_bytes_per_s']:.0f} B/s "
                                 f"miss {row['lease_miss_packets']} "
                                 f"{'ok' if row['feasible'] else 'infeasible'}")

        result = tune(trace, original, budget=budget, seed=seed, options=options,
                      progress=report)
    text = tuned_toml(result, original, name)
    Path(out_path).write_text(text)
    _, problems = check_config(out_path, check_key_file=False)
    if problems:  # never leave a file `connpub config check` would refuse
        Path(out_path).unlink()
        raise ConnpubError(f"tuned config failed its own check: {problems[0]}")
    summary = result.summary()
    summary["out"] = out_path
    if as_json:
        summary["trial_rows"] = [t.row() for t in result.trials]
        print_json(summary)
        return
    rows = []
    for label in ("baseline", "start", "best"):
        row = {"config": label}
        row.update({k: (f"{v:.1f}" if isinstance(v, float) else v)
                    for k, v in summary[label].items()})
        rows.append(row)
    print_table(f"connpub tune: {name} ({summary['trials']} simulations)", rows)
    if result.best.feasible:
        click.echo(f"{summary['reduction_vs_baseline']:.1f}x fewer publish bytes than baseline; "
                   f"wrote {out_path}")
    else:
        click.echo(f"no candidate had no more lease misses and stale state than the baseline; "
                   f"wrote the input config unchanged to {out_path}")
    click.echo(json.dumps(summary["tuned"]), err=True)


def register(group: click.Group) -> None:
    group.add_command(sim_command)
    group.add_command(tune_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(sim_command())
