"""Turn decoded map entries (numpy structured arrays) into columns and rows for tables, plain
lines and JSON. Formatting is column by column (numpy, one decode per distinct address), so a
dump of millions of entries takes seconds, not minutes.

Column names depend on the field only, never on the data: a timestamp that lies ahead
(`*expiry*`, `*deadline*`) becomes `<field>_in_s` (signed seconds from now: negative = already
past), any other timestamp `<field>_ago_s`, a duration (`initial_lease_ns`) `<field>_s`; 0 means
"never set" and shows as "-". Addresses show as IPs, MACs as aa:bb:..., bytes in human units."""

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
DURATION_FIELDS = ("initial_lease_ns", "close_linger_ns")  # lengths of time, not timestamps
FUTURE_WORDS = ("expiry", "deadline")  # timestamps that normally lie ahead
MISSING = "-"
TABLE_ROWS_MAX = 2000  # `auto` output: more entries than this print as plain lines


def ip_text(addr: np.ndarray) -> str:
    """An address of a flow key (16 bytes, IPv4-mapped for IPv4) as text."""
    raw = bytes(np.asarray(addr, np.uint8))
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw))
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


def level_name(level: int) -> str:
    return LEVEL_NAMES[level] if 0 <= level < len(LEVEL_NAMES) else f"level{level}"


# ---------------------------------------------------------------------------------------------
# column-wise formatting


def _by_unique(raw: np.ndarray, text_of) -> list[str]:
    """text_of(row) for every row of a (n, width) uint8 array, computed once per distinct row."""
    if len(raw) == 0:
        return []
    raw = np.ascontiguousarray(raw, np.uint8).reshape(len(raw), -1)
    rows = raw.view(np.dtype((np.void, raw.shape[1]))).ravel()
    unique, inverse = np.unique(rows, return_inverse=True)
    texts = np.array([text_of(np.frombuffer(u.tobytes(), np.uint8)) for u in unique], object)
    return texts[inverse.ravel()].tolist()


def ip_texts(addrs: np.ndarray) -> list[str]:
    return _by_unique(addrs, ip_text)


def mac_texts(macs: np.ndarray) -> list[str]:
    return _by_unique(macs, lambda mac: ":".join(f"{int(b):02x}" for b in mac))


def endpoint_texts(addrs: np.ndarray, ports: np.ndarray) -> list[str]:
    hosts = ip_texts(addrs)
    return [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in zip(hosts, ports.tolist(),
                                                                      strict=True)]


def _lookup_texts(values: np.ndarray, text_of) -> list[str]:
    unique, inverse = np.unique(values, return_inverse=True)
    texts = np.array([text_of(int(u)) for u in unique], object)
    return texts[inverse.ravel()].tolist() if len(values) else []


def seconds_texts(seconds: np.ndarray, zero: np.ndarray) -> list[str]:
    """Signed seconds with 3 decimals (1 beyond 1000 s); MISSING where `zero`."""
    out = np.where(np.abs(seconds) < 1000, np.char.mod("%.3f", seconds),
                   np.char.mod("%.1f", seconds)).astype(object) if len(seconds) else \
        np.zeros(0, object)
    out[zero] = MISSING
    return out.tolist()


def flow_key_columns(keys: np.ndarray, prefix: str = "") -> dict[str, list]:
    """The columns of struct flow_key (masked parts show as zeros)."""
    return {
        f"{prefix}proto": _lookup_texts(keys["proto"], lambda p: PROTO_NAMES.get(p, str(p))),
        f"{prefix}client": endpoint_texts(keys["client_addr"], keys["client_port"]),
        f"{prefix}vip": endpoint_texts(keys["vip_addr"], keys["vip_port"]),
    }


def flow_key_row(key: np.void) -> dict:
    """The columns of one struct flow_key."""
    columns = flow_key_columns(np.asarray(key).reshape(1))
    return {name: column[0] for name, column in columns.items()}


def _time_columns(label: str, values: np.ndarray, now_ns: int | None, raw: bool,
                  field_name: str) -> dict[str, list]:
    base = label.removesuffix("_ns")
    ns = values.astype(np.int64) if values.dtype.kind == "u" else values
    zero = values == 0
    if raw or now_ns is None:
        return {label: values.tolist()}
    if field_name in DURATION_FIELDS:
        return {f"{base}_s": seconds_texts(ns / 1e9, zero)}
    if any(word in field_name for word in FUTURE_WORDS):
        return {f"{base}_in_s": seconds_texts((ns - np.int64(now_ns)) / 1e9, zero)}
    return {f"{base}_ago_s": seconds_texts((np.int64(now_ns) - ns) / 1e9, zero)}


def field_columns(prefix: str, records: np.ndarray, now_ns: int | None,
                  raw: bool = False) -> dict[str, list]:
    """One column per field of a structured array (nested structs flattened with dots)."""
    dtype = records.dtype
    columns: dict[str, list] = {}
    for name in dtype.names:
        if name.startswith("pad") or name == "reserved":
            continue
        values = records[name]
        sub = dtype.fields[name][0]
        label = f"{prefix}{name}"
        if sub == FLOW_KEY_DTYPE:
            columns.update(flow_key_columns(values, prefix))
        elif sub.names:
            columns.update(field_columns(f"{label}.", values, now_ns, raw))
        elif name.endswith(("addr", "addr4", "addr6")) and values.ndim == 2:
            columns[label] = ip_texts(values)
        elif name.endswith("mac") and values.ndim == 2:
            columns[label] = mac_texts(values)
        elif name.endswith("_ns"):
            columns.update(_time_columns(label, values, now_ns, raw, name))
        elif raw:
            columns[label] = values.tolist()
        elif name == "bytes":
            columns[label] = _lookup_texts(values, human_bytes)
        elif name == "level":
            columns[label] = _lookup_texts(values, level_name)
        elif name == "tcp_flags":
            columns[label] = _lookup_texts(values, tcp_flags_text)
        elif name == "proto":
            columns[label] = _lookup_texts(values, lambda p: PROTO_NAMES.get(p, str(p)))
        elif values.ndim == 2:
            columns[label] = [" ".join(map(str, row)) for row in values.tolist()]
        else:
            columns[label] = values.tolist()
    return columns


def entry_columns(keys: np.ndarray, values: np.ndarray, now_ns: int | None, raw: bool = False,
                  key_name: str = "key", value_name: str = "value") -> dict[str, list]:
    """Columns of a map dump: the key's fields, then the value's. A plain (unnamed) key or value
    is one column, `key_name` / `value_name` (a name ending in _ns is decoded as a time)."""
    columns: dict[str, list] = {}
    for records, plain_name in ((keys, key_name), (values, value_name)):
        if records.dtype == FLOW_KEY_DTYPE:
            columns.update(flow_key_columns(records))
        elif records.dtype.names:
            columns.update(field_columns("", records, now_ns, raw))
        else:
            named = np.zeros(len(records), [(plain_name, records.dtype)])
            named[plain_name] = records
            columns.update(field_columns("", named, now_ns, raw))
    return columns


def column_rows(columns: dict[str, list]) -> list[dict]:
    names = list(columns)
    return [dict(zip(names, cells, strict=True)) for cells in zip(*columns.values(), strict=True)]


def entry_rows(keys: np.ndarray, values: np.ndarray, now_ns: int | None, raw: bool = False,
               **names: str) -> list[dict]:
    """One row per map entry, every field decoded by name (entry_columns)."""
    return column_rows(entry_columns(keys, values, now_ns, raw, **names))


# ---------------------------------------------------------------------------------------------
# output


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


def table_columns(rows: list[dict]) -> list[str]:
    """Every key of any row, in order of first appearance."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    return list(names)


def print_table(title: str, rows: Iterable[dict], columns: list[str] | None = None) -> None:
    """A rich table on stdout. Columns: `columns`, else every key of any row; a row without a
    column shows "-". No rows: the title and "(empty)"."""
    rows = list(rows)
    console = Console()
    if not console.is_terminal:  # pipes and files: no folding of wide tables
        console = Console(width=250)
    names = columns or table_columns(rows)
    if not rows:
        console.print(Text(f"{title}\n(empty)"))
        return
    table = Table(title=title, title_justify="left")
    for name in names:
        table.add_column(name, overflow="fold")
    for row in rows:  # Text: "[fd00::1]:80" is data, not rich markup
        table.add_row(*(Text(_cell(row.get(name, MISSING))) for name in names))
    console.print(table)


def _cell(value) -> str:
    return MISSING if value is None or value == "" else str(value)


def _text_column(cells: list) -> np.ndarray:
    """A column's cells as a numpy string array (numbers converted in C, MISSING for blanks)."""
    values = np.asarray(cells) if cells else np.zeros(0, "U1")
    if values.dtype.kind in "iub" or (values.dtype.kind == "f" and values.ndim == 1):
        return values.astype(str)
    return np.asarray([_cell(v) for v in cells], dtype=str) if cells else values


def print_lines(columns: dict[str, list], out=None) -> None:
    """A header line, then one line per entry, cells separated by two spaces and padded to the
    column's width: each entry is one line, for grep and sort (formatted column-wise)."""
    out = out or sys.stdout
    names = list(columns)
    texts = [_text_column(cells) for cells in columns.values()]
    widths = [max(len(name), int(np.char.str_len(text).max()) if len(text) else 0)
              for name, text in zip(names, texts, strict=True)]
    out.write("  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)).rstrip() + "\n")
    if not texts or not len(texts[0]):
        out.write("(empty)\n")
        return
    lines = np.char.ljust(texts[0], widths[0])
    for text, width in zip(texts[1:], widths[1:], strict=True):
        lines = np.char.add(np.char.add(lines, "  "), np.char.ljust(text, width))
    out.write("\n".join(np.char.rstrip(lines).tolist()))
    out.write("\n")


def print_json_rows(meta: dict, columns: dict[str, list], out=None) -> None:
    """`meta` and its "rows" (one JSON object per entry, one per line) as one JSON document,
    written row by row: millions of entries in seconds, not minutes."""
    out = out or sys.stdout
    encode = json.JSONEncoder(separators=(", ", ": ")).encode
    head = json.dumps(to_jsonable(meta), indent=2)
    out.write(head[:-2] + ',\n  "rows": [\n' if meta else '{\n  "rows": [\n')
    names = list(columns)
    rows = (encode(dict(zip(names, cells, strict=True)))
            for cells in zip(*columns.values(), strict=True))
    out.write(",\n".join(f"    {row}" for row in rows))
    out.write("\n  ]\n}\n")
