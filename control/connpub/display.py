"""Turn decoded map entries (numpy structured arrays) into rows for tables and JSON."""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Iterable

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from connpub.datapath.abi import FLOW_KEY_DTYPE
from connpub.datapath.masks import LEVEL_NAMES

PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
TCP_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR")


def ip_text(addr: np.ndarray) -> str:
    """An address of a flow key (16 bytes, IPv4-mapped for IPv4) as text."""
    raw = bytes(addr)
    v6 = ipaddress.IPv6Address(raw)
    return str(v6.ipv4_mapped) if v6.ipv4_mapped is not None else str(v6)


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def human_age(seconds: float) -> str:
    if seconds < 0:
        return f"-{human_age(-seconds)}"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def tcp_flags_text(flags: int) -> str:
    return "|".join(name for bit, name in enumerate(TCP_FLAG_NAMES) if flags & (1 << bit)) or "-"


def endpoint(addr: np.ndarray, port: int) -> str:
    text = ip_text(addr)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def flow_key_row(key: np.void) -> dict:
    """The columns of a struct flow_key (masked parts show as zeros)."""
    return {
        "proto": PROTO_NAMES.get(int(key["proto"]), str(int(key["proto"]))),
        "client": endpoint(key["client_addr"], int(key["client_port"])),
        "vip": endpoint(key["vip_addr"], int(key["vip_port"])),
    }


def level_name(level: int) -> str:
    return LEVEL_NAMES[level] if 0 <= level < len(LEVEL_NAMES) else f"level{level}"


def to_jsonable(value):
    """numpy scalars/arrays -> plain Python for json.dumps."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return value


def print_json(data) -> None:
    json.dump(to_jsonable(data), sys.stdout, indent=2)
    sys.stdout.write("\n")


def print_table(title: str, rows: Iterable[dict], columns: list[str] | None = None) -> None:
    """A rich table on stdout with stable columns (the keys of the first row, or `columns`)."""
    rows = list(rows)
    console = Console()
    if not console.is_terminal:  # pipes and files: no folding of wide tables
        console = Console(width=250)
    table = Table(title=title, title_justify="left")
    names = columns or (list(rows[0].keys()) if rows else [])
    for name in names:
        table.add_column(name, overflow="fold")
    for row in rows:  # Text: "[fd00::1]:80" is data, not rich markup
        table.add_row(*(Text(str(row.get(name, ""))) for name in names))
    console.print(table)


def _field_cells(
    prefix: str, record: np.void, dtype: np.dtype, now_ns: int | None, raw: bool
) -> dict:
    cells: dict = {}
    for name in dtype.names:
        if name.startswith("pad") or name == "reserved":
            continue
        value = record[name]
        sub = dtype.fields[name][0]
        label = f"{prefix}{name}"
        if sub == FLOW_KEY_DTYPE:
            cells.update({f"{prefix}{k}": v for k, v in flow_key_row(value).items()})
        elif sub.names:
            cells.update(_field_cells(f"{label}.", value, sub, now_ns, raw))
        elif name.endswith("addr"):
            cells[label] = ip_text(value)
        elif raw:
            cells[label] = to_jsonable(value)
        elif name.endswith("_ns") and now_ns is not None and int(value) != 0:
            delta_s = (int(value) - now_ns) / 1e9
            cells[label.removesuffix("_ns") + (" in" if delta_s >= 0 else " ago")] = human_age(
                abs(delta_s)
            )
        elif name == "bytes":
            cells[label] = human_bytes(int(value))
        elif name == "level":
            cells[label] = level_name(int(value))
        elif name == "tcp_flags":
            cells[label] = tcp_flags_text(int(value))
        elif name == "proto":
            cells[label] = PROTO_NAMES.get(int(value), str(int(value)))
        elif isinstance(value, np.ndarray):
            cells[label] = " ".join(str(x) for x in value.tolist())
        else:
            cells[label] = to_jsonable(value)
    return cells


def entry_rows(
    keys: np.ndarray, values: np.ndarray, now_ns: int | None, raw: bool = False
) -> list[dict]:
    """One row per map entry, every field decoded by name: addresses as text, *_ns as ages
    relative to now_ns (datapath clock), bytes in human units. raw=True keeps numbers as they are
    (for JSON) but still decodes addresses and tuples."""
    rows = []
    for key, value in zip(keys, values, strict=True):
        row = {}
        if keys.dtype == FLOW_KEY_DTYPE:
            row.update(flow_key_row(key))
        elif keys.dtype.names:
            row.update(_field_cells("", key, keys.dtype, now_ns, raw))
        else:
            row["key"] = to_jsonable(key)
        if values.dtype.names:
            row.update(_field_cells("", value, values.dtype, now_ns, raw))
        else:
            row["value"] = to_jsonable(value)
        rows.append(row)
    return rows
