"""`connpub lab up|down|status|run|load`: the network-namespace lab (see docs/lab.md)."""

from __future__ import annotations

import json
import os
import sys

import click
from rich.console import Console
from rich.table import Table

from connpub.errors import ConnpubError
from connpub.lab import topology as labmod
from connpub.traffic.workload import VIP_V4, WORKLOADS

prefix_option = click.option("--prefix", default=labmod.DEFAULT_PREFIX, show_default=True,
                             help="Name prefix of the lab's namespaces (several labs can coexist).")


def register(group: click.Group) -> None:
    group.add_command(lab_group)


@click.group("lab")
def lab_group() -> None:
    """Build, inspect and remove the namespace lab: clients -> router -> LBs -> servers (DSR).

    Example: sudo connpub lab up --servers 3 && sudo connpub lab load --connections 50
    """


def _require_root() -> None:
    if os.geteuid() != 0:
        raise ConnpubError("the lab needs root (network namespaces): run it with sudo")


@lab_group.command("up")
@click.option("--clients", default=1, show_default=True, help="Client namespaces.")
@click.option("--lbs", default=1, show_default=True, help="LB node namespaces (ECMP if > 1).")
@click.option("--servers", default=2, show_default=True, help="Server namespaces.")
@prefix_option
@click.option("--xdp/--no-xdp", default=True, show_default=True,
              help="Attach the LB program on LB nodes and the server program on servers.")
@click.option("--forward", type=click.Choice(["redirect", "tx"]), default="redirect",
              show_default=True, help="LB forwarding: XDP_REDIRECT to the fabric or XDP_TX.")
@click.option("--json", "as_json", is_flag=True, help="Print the lab state as JSON.")
def up_command(clients: int, lbs: int, servers: int, prefix: str, xdp: bool, forward: str,
               as_json: bool) -> None:
    """Create the lab (namespaces, veths, routes, decap, echo services, XDP); undone on failure.

    Example: sudo connpub lab up --clients 1 --lbs 1 --servers 3 --prefix cp
    """
    _require_root()
    err = Console(stderr=True)
    with err.status("lab up") as spinner:
        lab = labmod.up(prefix, clients, lbs, servers,
                        progress=lambda step: spinner.update(f"lab up: {step}"))
        if xdp:
            spinner.update("lab up: attach_datapath")
            try:
                labmod.attach_datapath(lab, forward)
            except BaseException:
                labmod.down(prefix)
                raise
    if as_json:
        click.echo(json.dumps(lab.to_json(), indent=1))
    else:
        _print_status(labmod.status(prefix))
        err.print(f"state: {labmod.state_path(prefix)}")


@lab_group.command("down")
@prefix_option
@click.option("--all", "all_labs", is_flag=True, help="Remove every lab found on this host.")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON.")
def down_command(prefix: str, all_labs: bool, as_json: bool) -> None:
    """Remove the lab's namespaces, processes and state (also after a crashed `lab up`).

    Example: sudo connpub lab down --prefix cp
    """
    _require_root()
    prefixes = labmod.all_prefixes() if all_labs else [prefix]
    removed = [labmod.down(p) for p in prefixes]
    if as_json:
        click.echo(json.dumps(removed))
        return
    for item in removed:
        click.echo(f"lab {item['prefix']}: removed {len(item['netns'])} netns, "
                   f"stopped {len(item['pids'])} processes")


def _print_status(status: dict) -> None:
    table = Table(title=f"lab {status['prefix']}: VIPs {status['vip4']}, {status['vip6']} "
                        f"tcp/{status['tcp_port']} udp/{status['udp_port']}")
    for column in ("node", "netns", "iface", "ipv4", "ipv6", "mac", "peer", "service"):
        table.add_column(column, no_wrap=True)
    for node in status["nodes"]:
        service = "" if node["pid"] is None else \
            f"pid {node['pid']} {'up' if node['service_alive'] else 'DEAD'}"
        netns = node["netns"] if node["present"] else f"{node['netns']} (MISSING)"
        first = True
        for name, iface in node["ifaces"].items():
            table.add_row(node["name"] if first else "", netns if first else "", name,
                          iface["ipv4"] or "", iface["ipv6"] or "", iface["mac"], iface["peer"],
                          service if first else "")
            first = False
        if first:
            table.add_row(node["name"], netns, "", "", "", "", "", service)
    Console(width=None if sys.stdout.isatty() else 200, emoji=False, highlight=False).print(table)


@lab_group.command("status")
@prefix_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status_command(prefix: str, as_json: bool) -> None:
    """Show the lab's nodes, interfaces, addresses, MACs and services.

    Example: connpub lab status --json
    """
    status = labmod.status(prefix)
    if as_json:
        click.echo(json.dumps(status, indent=1))
    else:
        _print_status(status)


def _node_netns(prefix: str, node: str) -> str:
    lab = labmod.load_lab(prefix)
    if node not in lab.nodes:
        raise ConnpubError(f"no node {node} in lab {prefix}: pick one of {', '.join(lab.nodes)}")
    return lab.nodes[node].netns


@lab_group.command("exec", context_settings={"ignore_unknown_options": True})
@prefix_option
@click.argument("node")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(prefix: str, node: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside the namespace of NODE (client1, router, lb1, srv1, fabric ...).

    Example: sudo connpub lab exec client1 -- ss -tn
    """
    _require_root()
    from pyroute2 import netns as pr_netns

    netns = _node_netns(prefix, node)
    sys.stdout.flush()
    pr_netns.setns(netns, flags=0)
    try:
        os.execvp(command[0], list(command))
    except FileNotFoundError as err:
        raise ConnpubError(f"command not found: {command[0]}") from err


@lab_group.command("impair")
@prefix_option
@click.argument("node")
@click.argument("iface")
@click.option("--loss", "loss_pct", default=0.0, show_default=True, help="Egress loss, percent.")
@click.option("--delay", "delay_ms", default=0.0, show_default=True,
              help="Egress delay, ms (needs netem in the kernel).")
@click.option("--json", "as_json", is_flag=True, help="Print what was applied as JSON.")
def impair_command(prefix: str, node: str, iface: str, loss_pct: float, delay_ms: float,
                   as_json: bool) -> None:
    """Add egress loss/delay on one lab interface (both 0 clears it).

    Example: sudo connpub lab impair router c1 --loss 2
    """
    _require_root()
    applied = labmod.impair(prefix, node, iface, loss_pct, delay_ms)
    if as_json:
        click.echo(json.dumps(applied))
    else:
        click.echo(f"{node}/{iface}: loss {applied['loss_pct']}% delay {applied['delay_ms']} ms "
                   f"({applied['method']})")


@lab_group.command("load")
@prefix_option
@click.option("--client", "node", default="client1", show_default=True, help="Client node.")
@click.option("--ipv6", is_flag=True, help="Use the IPv6 VIP.")
@click.option("--connections", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--bytes", "size", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Payload per connection.")
@click.option("--hold", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds each connection stays open.")
@click.option("--keepalive", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="While holding, send one byte every this many seconds (0 = never).")
@click.option("--json", "as_json", is_flag=True, help="Full per-connection report as JSON.")
def load_command(prefix: str, node: str, ipv6: bool, connections: int, size: int, hold: float,
                 keepalive: float, as_json: bool) -> None:
    """Open TCP connections from a client node to the VIP and check the echoed bytes.

    Example: sudo connpub lab load --connections 100 --bytes 10000 --hold 2 --json
    """
    _require_root()
    lab = labmod.load_lab(prefix)
    netns = _node_netns(prefix, node)
    argv = [sys.executable, "-m", "connpub.traffic.services", "load",
            "--vip", lab.vip6 if ipv6 else lab.vip4, "--port", str(lab.tcp_port),
            "--connections", str(connections), "--bytes", str(size), "--hold", str(hold),
            "--keepalive", str(keepalive)] + (["--json"] if as_json else [])
    result = labmod.run_in_netns(netns, argv)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    if result.returncode != 0:
        sys.exit(result.returncode)


def run_modes_with_progress(spec, modes: list[str]) -> dict[str, dict]:
    """lab.run.run_modes with one rich progress bar per mode on stderr (lab run, lab replay)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from connpub.lab import run as labrun

    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        tasks = {mode: bar.add_task(mode, total=1.0, info="") for mode in modes}

        def progress(mode: str, fraction: float, point: dict) -> None:
            bar.update(tasks[mode], completed=fraction,
                       info=f"publish {point['publish_bytes'] / 1024:.0f} KiB, "
                            f"misses {point['lease_misses']}, leases {point['valid_leases']}")

        return labrun.run_modes(spec, modes, progress)


@lab_group.command("run")
@click.option("--workload", type=click.Choice(sorted(WORKLOADS)), default="mixed",
              show_default=True, help="Workload (connpub.traffic.workload).")
@click.option("--duration", "duration_s", type=click.FloatRange(min=5), default=40.0,
              show_default=True, help="Wall-clock seconds of traffic.")
@click.option("--mode", "modes", multiple=True,
              type=click.Choice(["baseline", "adaptive", "predictive", "full"]),
              help="Mode to run (repeat for a side-by-side comparison; default baseline).")
@click.option("--flows", type=click.IntRange(min=1), default=400, show_default=True,
              help="Flows the workload generator produces.")
@click.option("--time-scale", type=click.FloatRange(min=1), default=10.0, show_default=True,
              help="Workload seconds per wall-clock second.")
@click.option("--loss", "loss_pct", type=click.FloatRange(0, 100), default=0.0,
              show_default=True, help="Loss on the publishing path (server -> LB), percent.")
@click.option("--interval", "interval_s", type=click.FloatRange(min=0.05), default=0.5,
              show_default=True, help="Publish interval T, seconds.")
@click.option("--seed", default=7, show_default=True)
@click.option("--vips", type=click.IntRange(1, labmod.MAX_VIPS), default=len(VIP_V4),
              show_default=True,
              help="Lab VIPs per family; the workload's VIPs are dealt onto them (the default: "
                   "one each, as the simulator has them).")
@click.option("--prefix", default="cprun", show_default=True, help="Lab name prefix.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write publish bytes/s, lease misses and valid leases over time (PNG).")
@click.option("--history-dir", type=click.Path(file_okay=False),
              help="Keep the server agents' finished-flow history here (training data for "
                   "`connpub model train --history DIR/history-1`).")
@click.option("--json", "as_json", is_flag=True, help="Metrics as JSON instead of a table.")
def run_workload(workload, duration_s, modes, flows, time_scale, loss_pct, interval_s, seed,
                 vips, prefix, plot_path, as_json, history_dir=None, quiet=False):
    """Real traffic through a fresh lab with both agents; the docs/simulator.md metrics per mode.

    Example: sudo connpub lab run --workload mixed --duration 40 --mode baseline --mode full
    """
    _require_root()

    from connpub.display import print_json, print_table
    from connpub.lab import run as labrun

    spec = labrun.RunSpec(workload=workload, flows=flows, duration_s=duration_s,
                          time_scale=time_scale, loss_pct=loss_pct, interval_s=interval_s,
                          seed=seed, vips=vips, prefix=prefix, history_dir=history_dir)
    results = run_modes_with_progress(spec, list(modes) or ["baseline"])
    if plot_path:
        labrun.plot(results, plot_path)
    if quiet:  # called by `connpub demo`, which prints its own view
        return results
    if as_json:
        print_json(results)
    else:
        print_table(f"lab run: {workload}, {duration_s:.0f} s, loss {loss_pct}%",
                    labrun.summary_rows(results))
