"""`connpub demo`: the README's main job, the same workload through the lab per mode."""

from __future__ import annotations

import click
from rich.console import Console

from connpub.display import print_json, print_table

DEMO_MODES = ("baseline", "adaptive", "predictive", "full")


@click.command()
@click.option("--duration", "duration_s", type=click.FloatRange(min=5), default=30.0,
              show_default=True, help="Wall-clock seconds of traffic per mode.")
@click.option("--flows", type=click.IntRange(min=1), default=800, show_default=True)
@click.option("--mode", "modes", multiple=True, type=click.Choice(DEMO_MODES),
              help="Modes to compare (default: all four).")
@click.option("--plot", "plot_path", default="connpub-demo.png", show_default=True,
              type=click.Path(dir_okay=False), help="Where to write the plot.")
@click.option("--json", "as_json", is_flag=True, help="Everything as JSON.")
def demo(duration_s, flows, modes, plot_path, as_json):
    """Lab up, the reference mixed workload per mode on identical traffic, tables, plot, lab down.

    Example: sudo connpub demo --duration 30
    """
    from connpub.cli.lab import run_workload  # noqa: PLC0415
    from connpub.lab import run as labrun  # noqa: PLC0415

    modes = list(modes) or list(DEMO_MODES)
    console = Console(stderr=True)
    console.rule("connpub demo: real TCP/UDP through XDP LB and server programs, both agents")
    ctx = click.get_current_context()
    results = ctx.invoke(run_workload, workload="mixed", duration_s=duration_s, modes=modes,
                         flows=flows, time_scale=10.0, loss_pct=0.0, interval_s=0.5, seed=7,
                         prefix="cpdemo", plot_path=plot_path, as_json=True, quiet=True)
    if as_json:
        print_json(results)
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
    print_table("side by side, same workload (mixed), same seed", labrun.summary_rows(results))
    console.print(f"plot: {plot_path}")


def register(group: click.Group) -> None:
    group.add_command(demo)
