"""`connpub history ...`: finished-flow training/evaluation histories from captures and flow
logs (pcap traces, Zeek conn.log, Argus .binetflow); see docs/model.md, "Real data"."""

from __future__ import annotations

import json

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from connpub.errors import ConnpubError

_stdout = Console()
_stderr = Console(stderr=True)


def history_summary(flows: np.ndarray) -> dict:
    """Counts and duration quantiles of a FLOW_DTYPE table (what an import produced)."""
    duration = (flows["end_ns"] - flows["start_ns"]) / 1e9
    quantiles = np.quantile(duration, [0.5, 0.9, 0.99]) if flows.size else [0.0] * 3
    return {"flows": int(flows.size), "tcp": int((flows["proto"] == 6).sum()),
            "udp": int((flows["proto"] == 17).sum()),
            "without_sketch": int((flows["first_n"] == 0).sum()),
            "p50_s": round(float(quantiles[0]), 3), "p90_s": round(float(quantiles[1]), 3),
            "p99_s": round(float(quantiles[2]), 3)}


def _write(flows: np.ndarray, source: str, kind: str, out_path: str, as_json: bool) -> None:
    from connpub.traffic.trace import history_from_flows, write_history

    if flows.size == 0:
        raise ConnpubError(f"{source}: no TCP/UDP flows in it; nothing written")
    write_history(history_from_flows(flows), out_path, {"source": source, "imported_from": kind})
    rows = {"out": out_path, "source": source, **history_summary(flows)}
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    table = Table(title=f"history from {kind}")
    table.add_column("key")
    table.add_column("value")
    for key, value in rows.items():
        table.add_row(key, str(value))
    _stdout.print(table)


@click.group("history")
def history_group() -> None:
    """Finished-flow histories (Parquet, docs/model.md) from captures and flow logs.

    Example: connpub history from-zeek conn.log --out zeek.history.parquet
    """


def _import_command(name: str, kind: str, example: str, reader_name: str) -> None:
    def command(source: str, out_path: str, as_json: bool) -> None:
        from connpub.traffic import flowlogs

        with _stderr.status(f"reading {source}"):
            flows = getattr(flowlogs, reader_name)(source)
        _write(flows, source, kind, out_path, as_json)

    command.__doc__ = f"Write the finished-flow history of {kind}.\n\nExample: {example}"
    for option in (
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
        click.option("--out", "out_path", required=True, type=click.Path(),
                     help="History Parquet file to write."),
        click.argument("source", type=click.Path()),
    ):
        command = option(command)
    history_group.command(name)(command)


_import_command("from-trace", "a connpub trace (`trace from-pcap`, `trace generate`)",
                "connpub history from-trace capture.trace.parquet --out capture.history.parquet",
                "read_flow_table")
_import_command("from-zeek", "a Zeek conn.log (TSV with #fields, or JSON lines)",
                "connpub history from-zeek conn.log --out zeek.history.parquet",
                "read_zeek_conn")
_import_command("from-argus", "an Argus .binetflow file",
                "connpub history from-argus normal.binetflow --out argus.history.parquet",
                "read_argus_binetflow")


def register(group: click.Group) -> None:
    group.add_command(history_group)
