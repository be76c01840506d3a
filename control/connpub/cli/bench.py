"""`connpub bench`: datapath and control-plane benchmarks; the figures the README quotes."""

from __future__ import annotations

import click
from rich.console import Console

from connpub.display import print_json, print_table
from connpub.loader import check_privileges


def _progress_printer():
    console = Console(stderr=True)
    return lambda message: console.log(message)


@click.group()
def bench():
    """Benchmarks (figures to stdout, progress to stderr)."""


@bench.command("xdp")
@click.option("--repeat", type=click.IntRange(min=1000), default=1_000_000, show_default=True,
              help="BPF_PROG_TEST_RUN repetitions per figure.")
@click.option("--prefill", type=click.IntRange(min=0), default=1_000_000, show_default=True,
              help="Flows/connections in the table before measuring hits.")
@click.option("--program", type=click.Choice(["all", "server", "lb"]), default="all",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def bench_xdp(repeat, prefill, program, as_json):
    """ns/packet of the XDP programs under BPF_PROG_TEST_RUN, next to an empty program.

    Example: sudo connpub bench xdp --json
    """
    check_privileges()
    from connpub import bench as bench_mod  # noqa: PLC0415

    say = _progress_printer()
    results: dict = {}
    if program in ("all", "server"):
        results["server"] = bench_mod.bench_server(repeat, prefill, say)
    if program in ("all", "lb"):
        from connpub import bench_lb  # noqa: PLC0415

        say("LB program")
        results["lb"] = bench_lb.bench_lb(repeat=repeat, prefill=prefill)
    if as_json:
        print_json(results)
        return
    rows = [
        {"program": prog, "figure": name, "value": value}
        for prog, figures in results.items()
        for name, value in figures.items()
    ]
    print_table("XDP datapath cost (ns/packet unless named otherwise)", rows)


@bench.command("control")
@click.option("--flows", type=click.IntRange(min=1000), default=1_000_000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def bench_control(flows, as_json):
    """Control plane: codec entries/s, LB apply entries/s, server publish cycle, model predictions/s.

    Example: sudo connpub bench control --flows 1000000 --json
    """
    check_privileges()
    from connpub import bench_control as bench_mod  # noqa: PLC0415

    results = bench_mod.bench_control(flows=flows)
    if as_json:
        print_json(results)
    else:
        print_table("control-plane throughput", [{"figure": k, "value": v} for k, v in results.items()])


def register(group: click.Group) -> None:
    group.add_command(bench)
