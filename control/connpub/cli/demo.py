"""`connpub demo`: the README's main job, the same workload through the lab per mode, then a
run at scale (baseline and full at >= 10k concurrent connections)."""

from __future__ import annotations

import click
from rich.console import Console

from connpub.display import print_json, print_table
from connpub.traffic.workload import VIP_V4

DEMO_MODES = ("baseline", "adaptive", "predictive", "full")
# the four-mode section in real time (docs/lab.md "Time": the model sees the workload's own
# durations only at time scale 1): 3000 flows in 30 s, 100 new flows/s, ~650 concurrent
DEMO_FLOWS, DEMO_TIME_SCALE = 3000, 1.0
# the scale section (docs/lab.md, "Scale"): 100k flows in 30 s at 3x time, ~12k concurrent
SCALE_DURATION_S, SCALE_TIME_SCALE = 30.0, 3.0
SCALE_COLUMNS = ("flows", "peak_concurrent_connections", "broken_connections", "lease_misses",
                 "publish_bytes_per_s", "udp_resent", "echo_rtt_max_s")


def _cell(value) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def scale_rows(results: dict[str, dict]) -> list[dict]:
    """The scale table: one row per metric, one column per mode; publish bytes against
    baseline's; the agents' job durations (max and mean seconds) per role/job."""
    rows = [{"metric": column, **{mode: _cell(m[column]) for mode, m in results.items()}}
            for column in SCALE_COLUMNS]
    if "baseline" in results:
        base = results["baseline"]["publish_bytes_per_s"]
        rows.append({"metric": "publish bytes: baseline / mode",
                     **{mode: f"{base / max(m['publish_bytes_per_s'], 1e-9):.1f}x"
                        for mode, m in results.items()}})
    jobs = sorted({job for m in results.values() for job in m["tick_s"]})
    for job in jobs:
        row = {"metric": f"tick {job}, max (mean) s"}
        for mode, m in results.items():
            tick = m["tick_s"].get(job)
            row[mode] = f"{tick['max']:.2f} ({tick['mean']:.2f})" if tick else "-"
        rows.append(row)
    return rows


@click.command()
@click.option("--duration", "duration_s", type=click.FloatRange(min=5), default=30.0,
              show_default=True, help="Wall-clock seconds of traffic per mode.")
@click.option("--flows", type=click.IntRange(min=1), default=DEMO_FLOWS, show_default=True,
              help="Flows of the four-mode section (real time: workload seconds = wall seconds).")
@click.option("--mode", "modes", multiple=True, type=click.Choice(DEMO_MODES),
              help="Modes to compare (default: all four).")
@click.option("--scale-flows", type=click.IntRange(min=0), default=100_000, show_default=True,
              help="Flows of the scale section (baseline and full, 30 s at 3x time); 0 skips.")
@click.option("--plot", "plot_path", default="connpub-demo.png", show_default=True,
              type=click.Path(dir_okay=False), help="Where to write the plot.")
@click.option("--json", "as_json", is_flag=True,
              help="Everything as JSON: {mode: metrics, ..., 'scale': {mode: metrics}}.")
def demo(duration_s, flows, modes, scale_flows, plot_path, as_json):
    """Lab up, the reference mixed workload per mode on identical traffic, tables, plot, lab down;
    then baseline and full at scale (--scale-flows).

    Example: sudo connpub demo --duration 30
    """
    from connpub.cli.lab import run_workload  # noqa: PLC0415
    from connpub.lab import run as labrun  # noqa: PLC0415

    modes = list(modes) or list(DEMO_MODES)
    console = Console(stderr=True)
    console.rule("connpub demo: real TCP/UDP through XDP LB and server programs, both agents")
    ctx = click.get_current_context()
    results = ctx.invoke(run_workload, workload="mixed", duration_s=duration_s, modes=modes,
                         flows=flows, time_scale=DEMO_TIME_SCALE, loss_pct=0.0,
                         interval_s=0.5, seed=7, vips=len(VIP_V4), prefix="cpdemo",
                         plot_path=plot_path, as_json=True, quiet=True)
    scale = {}
    if scale_flows:
        console.rule(f"scale: {scale_flows} flows in {SCALE_DURATION_S:.0f} s, baseline and full")
        scale = ctx.invoke(run_workload, workload="mixed", duration_s=SCALE_DURATION_S,
                           modes=["baseline", "full"], flows=scale_flows,
                           time_scale=SCALE_TIME_SCALE, loss_pct=0.0, interval_s=0.5, seed=7,
                           vips=len(VIP_V4), prefix="cpdemo", plot_path=None, as_json=True,
                           quiet=True)
    if as_json:
        print_json({**results, **({"scale": scale} if scale else {})})
        return
    first = results[modes[0]]["snapshot"]
    for name in ("flows", "aggregates"):
        table = first.get(name, {})
        print_table(f"{first.get('server')} {name} mid-run ({modes[0]}): {table.get('entries', 0)} "
                    "entries, largest first", table.get("rows", []))
    last = results[modes[-1]]["snapshot"]
    table = last.get("aggregates", {})
    print_table(f"{last.get('server')} aggregates mid-run ({modes[-1]}): "
                f"{table.get('entries', 0)} entries", table.get("rows", []))
    print_table(f"side by side, same workload (mixed, {flows} flows in real time), same seed",
                labrun.summary_rows(results))
    if scale:
        print_table(f"at scale: {scale_flows} mixed flows in {SCALE_DURATION_S:.0f} s "
                    f"({SCALE_TIME_SCALE:g}x time), C load generator and echo servers",
                    scale_rows(scale))
    console.print(f"plot: {plot_path}")


def register(group: click.Group) -> None:
    group.add_command(demo)
