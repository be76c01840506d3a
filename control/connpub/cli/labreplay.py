"""`connpub lab replay`: a real trace or capture through the lab, flow by flow (docs/lab.md)."""

from __future__ import annotations

import click
from rich.console import Console


@click.command("replay")
@click.argument("trace_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--speed", type=float, default=1.0, show_default=True,
              help="Trace seconds per wall-clock second (2 = twice as fast).")
@click.option("--vips", type=click.IntRange(1, 200), default=4, show_default=True,
              help="Lab VIPs per family the trace's servers are dealt onto.")
@click.option("--mode", "modes", multiple=True,
              type=click.Choice(["baseline", "adaptive", "predictive", "full"]),
              help="Mode to run (repeat for a side-by-side comparison; default baseline).")
@click.option("--clients", type=click.IntRange(1, 50), default=2, show_default=True)
@click.option("--servers", type=click.IntRange(1, 50), default=3, show_default=True)
@click.option("--interval", "interval_s", type=click.FloatRange(min=0.05), default=0.5,
              show_default=True, help="Publish interval T, seconds.")
@click.option("--liveness", type=click.Choice(["kernel", "packets"]), default="kernel",
              show_default=True,
              help="Server agents' flow liveness: the kernel's TCP sockets and per-service UDP "
                   "horizons, or packets only (idle timeout; what the simulator models).")
@click.option("--prefix", default="cpreplay", show_default=True, help="Lab name prefix.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write publish bytes/s, lease misses and valid leases over time (PNG).")
@click.option("--json", "as_json", is_flag=True, help="Metrics as JSON instead of a table.")
def replay_command(trace_file, speed, vips, modes, clients, servers, interval_s, liveness,
                   prefix, plot_path, as_json):
    """Re-enact every flow of a Parquet trace or pcap/pcapng capture as a real TCP/UDP
    connection through the XDP LB (start, duration, gaps, bytes); metrics per mode as in
    `lab run`.

    Example: sudo connpub lab replay capture.pcap --speed 2 --vips 4 --mode baseline --mode full
    """
    from connpub.cli.lab import _require_root, run_modes_with_progress
    from connpub.display import print_json, print_table
    from connpub.lab import replay
    from connpub.lab import run as labrun

    _require_root()
    replay.check_speed(speed)
    table = replay.load_trace(trace_file)
    spec = labrun.RunSpec(workload=f"replay:{trace_file}", time_scale=speed,
                          interval_s=interval_s, clients=clients, servers=servers,
                          prefix=prefix, replay=True, vips=vips,
                          config_overrides=replay.packet_liveness(
                              labrun.LAB_RUN_SETTINGS["lease"]["idle_timeout_s"])
                          if liveness == "packets" else {})
    table, repaired, spec = replay.prepare(table, spec)
    console = Console(stderr=True)
    if repaired:
        console.print(f"repaired the trace: {repaired}")
    console.print(f"replaying {trace_file}: {replay.summary(table, spec)}")
    results = run_modes_with_progress(spec, list(modes) or ["baseline"])
    if plot_path:
        labrun.plot(results, plot_path)
    if as_json:
        print_json({"trace": trace_file, "speed": speed, "repaired": repaired,
                    "modes": results})
    else:
        print_table(f"lab replay: {trace_file}, speed {speed:g}, {table.size} flows",
                    labrun.summary_rows(results))


def register(group: click.Group) -> None:
    """Add `replay` to the `lab` group (made by cli/lab.py)."""
    lab = group.commands.get("lab")
    if isinstance(lab, click.Group):
        lab.add_command(replay_command)
