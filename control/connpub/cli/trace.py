"""`connpub trace replicate | merge | shift`: build large traces from real ones
(docs/workloads.md, "Trace tools"); the other trace commands live in cli/model.py."""

from __future__ import annotations

import click
import numpy as np

from connpub.display import print_json, print_table


def _load(path: str):
    from connpub.traffic.pcap import PCAP_SUFFIXES
    from connpub.traffic.trace import flows_from_pcap, read_trace

    if path.endswith(PCAP_SUFFIXES):
        return flows_from_pcap(path)
    return read_trace(path)


def _emit(table, out_path: str, source: str, as_json: bool, extra: dict) -> None:
    from connpub.traffic.trace import write_trace
    from connpub.traffic.workload import NS_PER_S

    write_trace(table, out_path, {"source": source})
    summary = {"out": out_path, "flows": int(table.size),
               "span_s": float((table["end_ns"].max() - table["start_ns"].min()) / NS_PER_S)
               if table.size else 0.0,
               "clients": int(np.unique(np.ascontiguousarray(table["client_addr"]).view(
                   "V16")).size), **extra}
    if as_json:
        print_json(summary)
    else:
        print_table(f"trace {out_path}", [{"key": k, "value": v} for k, v in summary.items()])


@click.command("replicate")
@click.argument("trace_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--copies", type=click.IntRange(1), required=True, help="Copies of the trace.")
@click.option("--spread-s", type=float, default=0.0, show_default=True,
              help="Each copy starts at a seeded random offset in [0, S) seconds.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def replicate_cmd(trace_file, copies, spread_s, seed, out_path, as_json) -> None:
    """Copies of a trace (Parquet or pcap/pcapng) with each copy's clients in fresh subnets, so
    flows stay distinct and the client/subnet structure holds.

    Example: connpub trace replicate capture.pcap --copies 5000 --spread-s 600 --out big.parquet
    """
    from connpub.traffic.tracetools import replicate

    table = replicate(_load(trace_file), copies, spread_s, seed)
    _emit(table, out_path, f"{trace_file} x {copies}", as_json, {"copies": copies})


@click.command("merge")
@click.argument("trace_files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def merge_cmd(trace_files, out_path, as_json) -> None:
    """One trace from several (Parquet or pcap/pcapng), each starting at 0, addresses kept.

    Example: connpub trace merge a.parquet b.pcap c.pcapng --out merged.parquet
    """
    from connpub.traffic.tracetools import merge

    table = merge([_load(path) for path in trace_files])
    _emit(table, out_path, ",".join(trace_files), as_json, {"inputs": len(trace_files)})


@click.command("shift")
@click.argument("trace_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--by-s", type=float, default=0.0, show_default=True,
              help="Seconds added to every time (negative: earlier, never before 0).")
@click.option("--scale", type=float, default=1.0, show_default=True,
              help="Times divided by this first (2 = twice as fast).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def shift_cmd(trace_file, by_s, scale, out_path, as_json) -> None:
    """Move and/or speed up a trace in time (sizes and counts unchanged).

    Example: connpub trace shift big.parquet --by-s 30 --scale 10 --out fast.parquet
    """
    from connpub.traffic.tracetools import shift

    table = shift(_load(trace_file), by_s, scale)
    _emit(table, out_path, trace_file, as_json, {"by_s": by_s, "scale": scale})


def register(group: click.Group) -> None:
    """Add the commands to the `trace` group (made by cli/model.py, or made here)."""
    existing = group.commands.get("trace")
    if not isinstance(existing, click.Group):
        @click.group("trace")
        def existing() -> None:
            """Flow traces (Parquet).

            Example: connpub trace merge a.parquet b.parquet --out ab.parquet
            """
        group.add_command(existing)
    for command in (replicate_cmd, merge_cmd, shift_cmd):
        existing.add_command(command)
