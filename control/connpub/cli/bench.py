"""`connpub bench`: datapath and control-plane benchmarks; the figures the README quotes."""

from __future__ import annotations

import click
from rich.console import Console

from connpub.datapath.loader import check_privileges
from connpub.display import print_json, print_table


def _progress_printer():
    console = Console(stderr=True)
    return lambda message: console.log(message)


@click.group()
def bench():
    """Benchmarks (figures to stdout, progress to stderr)."""


@bench.command("xdp")
@click.option(
    "--repeat",
    type=click.IntRange(min=1000),
    default=1_000_000,
    show_default=True,
    help="BPF_PROG_TEST_RUN repetitions per figure.",
)
@click.option(
    "--prefill",
    type=click.IntRange(min=0),
    default=1_000_000,
    show_default=True,
    help="Flows/connections in the table before measuring hits.",
)
@click.option(
    "--program", type=click.Choice(["all", "server", "lb"]), default="all", show_default=True
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="LB program: interleaved rounds; each figure is their median.",
)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def bench_xdp(repeat, prefill, program, rounds, as_json):
    """ns/packet of the XDP programs under BPF_PROG_TEST_RUN, next to an empty program.

    Example: sudo connpub bench xdp --json
    """
    check_privileges()
    from connpub.bench import xdp as bench_mod  # noqa: PLC0415

    say = _progress_printer()
    results: dict = {}
    if program in ("all", "server"):
        results["server"] = bench_mod.bench_server(repeat, prefill, say)
    if program in ("all", "lb"):
        from connpub.bench import lb as bench_lb  # noqa: PLC0415

        say("LB program")
        results["lb"] = bench_lb.bench_lb(repeat=repeat, prefill=prefill, rounds=rounds)
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
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False),
              default=None, help="ONNX model of the predictions/s figure (default: shipped).")
@click.option("--tcp-sockets", type=click.IntRange(min=0), default=100_000, show_default=True,
              help="ESTABLISHED sockets in a scratch netns for the TCP-state seeding time "
                   "(0 = skip).")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def bench_control(flows, model_path, tcp_sockets, as_json):
    """Control plane: codec and LB apply entries/s, server publish cycle, predictions/s,
    TCP-state seeding time.

    Example: sudo connpub bench control --flows 1000000 --tcp-sockets 100000 --json
    """
    check_privileges()
    from connpub.bench import control as bench_mod  # noqa: PLC0415
    from connpub.bench.predict import bench_predict  # noqa: PLC0415

    say = _progress_printer()
    say(f"codec, LB apply and server publish cycle at {flows} flows")
    results = bench_mod.bench_control(flows=flows)
    say(f"features + ONNX inference on {flows} live flows")
    results["predict"] = bench_predict(rows=flows, model_path=model_path)
    if tcp_sockets:
        from connpub.bench.tcpstate import bench_tcpstate_seed  # noqa: PLC0415

        say(f"TCP-state watcher: load + sock_diag seed with {tcp_sockets} sockets in a netns")
        results["tcpstate_seed"] = bench_tcpstate_seed(tcp_sockets, say)
    if as_json:
        print_json(results)
        return
    rows = []
    for section, figures in results.items():
        if isinstance(figures, dict):
            rows.extend({"section": section, "figure": k, "value": v} for k, v in figures.items()
                        if not isinstance(v, dict | list))
        else:
            rows.append({"section": "", "figure": section, "value": figures})
    print_table("control-plane throughput", rows)


@bench.command("pcap")
@click.option("--sources", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder of real .pcap captures [default: ../shared/traces/ndpi].")
@click.option("--copies", type=click.IntRange(min=1), default=40, show_default=True,
              help="Times the sources are laid end to end (one hour apart).")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where the replicated capture is written (removed after) [default: a temp "
                   "dir].")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def bench_pcap(sources, copies, workdir, as_json):
    """`trace from-pcap` packets/s on one core, on a large capture built from real ones.

    Example: connpub bench pcap --copies 40 --json
    """
    import tempfile  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from connpub.bench.pcap import bench_from_pcap, default_sources  # noqa: PLC0415

    source_dir = Path(sources) if sources else default_sources()
    say = _progress_printer()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        results = bench_from_pcap(source_dir, Path(tmp), copies, say=say)
    if as_json:
        print_json(results)
    else:
        print_table("trace from-pcap throughput",
                    [{"figure": k, "value": v} for k, v in results.items()])


@bench.command("sim")
@click.option("--flows", type=click.IntRange(min=1000), default=1_000_000, show_default=True)
@click.option("--source", type=click.Choice(["real", "mixed", "web", "longlived", "udp"]),
              default="real", show_default=True,
              help="real: ndpi captures merged and replicated (trace replicate); else a workload.")
@click.option("--modes", default="baseline,full", show_default=True)
@click.option("--window", "window_s", type=float, default=3600.0, show_default=True,
              help="Seconds over which copies (or sessions) start.")
@click.option("--workers", type=click.IntRange(0, 256), default=0, show_default=True,
              help="Simulator processes (0: one per usable core; 1: this process only).")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def bench_sim(flows, source, modes, window_s, workers, as_json):
    """Simulator seconds, flows/s per mode and peak RSS on a large trace.

    Example: connpub bench sim --flows 10000000 --source real --json
    """
    from connpub.bench import sim as bench_mod  # noqa: PLC0415
    from connpub.sim import parse_modes  # noqa: PLC0415

    results = bench_mod.bench_sim(flows, parse_modes(modes), source, None, window_s,
                                  say=_progress_printer(), workers=workers)
    if as_json:
        print_json(results)
        return
    rows = [{"mode": mode, **figures} for mode, figures in results["modes"].items()]
    print_table(f"simulator: {results['flows']} flows ({source}), {results['workers']} "
                f"processes, simulate {results['simulate_s']} s, total {results['total_s']} s, "
                f"peak RSS {results['peak_rss_mib']} MiB (workers "
                f"{results['peak_worker_rss_mib']} MiB)", rows)


@bench.command("fuzz")
@click.option(
    "--packets",
    type=click.IntRange(min=1),
    default=1_000_000,
    show_default=True,
    help="Generated frames per program.",
)
@click.option(
    "--program", type=click.Choice(["all", "server", "lb"]), default="all", show_default=True
)
@click.option(
    "--batch",
    type=click.IntRange(min=100, max=100_000),
    default=10_000,
    show_default=True,
    help="Frames per batch (tables are checked after each).",
)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option(
    "--skip-finding",
    "skip_findings",
    multiple=True,
    help="Do not run frames with this reference finding (a known, reported bug).",
)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def bench_fuzz(packets, program, batch, seed, skip_findings, as_json):
    """Fuzz the XDP programs with BPF_PROG_TEST_RUN: mutated fixture frames checked against a
    reference parser (verdicts, outputs, counters, flow tables). Exits 1 on any failure.

    Example: sudo connpub bench fuzz --packets 1000000 --json
    """
    check_privileges()
    from rich.progress import Progress  # noqa: PLC0415

    from connpub.testing import fuzz  # noqa: PLC0415

    results = {}
    with Progress(console=Console(stderr=True), transient=True) as bar:
        for role in ("server", "lb") if program == "all" else (program,):
            task = bar.add_task(f"fuzzing {role}", total=packets)
            report = fuzz.fuzz_datapath(
                role,
                packets,
                batch=batch,
                seed=seed,
                skip_findings=tuple(skip_findings),
                progress=lambda done, _total, task=task: bar.update(task, completed=done),
            )
            results[role] = report.as_dict()
    if as_json:
        print_json(results)
    else:
        rows = [
            {"program": role, "figure": name, "value": value}
            for role, figures in results.items()
            for name, value in figures.items()
            if not name.endswith("_examples")
        ]
        print_table("datapath fuzzing", rows)
    if any(figures["failures"] for figures in results.values()):
        raise SystemExit(1)


def register(group: click.Group) -> None:
    group.add_command(bench)
