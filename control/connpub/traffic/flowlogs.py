"""Flow-log importers: Zeek conn.log (TSV with #fields, or JSON lines) and Argus .binetflow
records -> FLOW_DTYPE tables (docs/workloads.md, "Flow-log import").

A flow log keeps per-connection totals but not the first packets, so every imported flow has
first_n = 0: "no first-packet sketch" (connpub.model.features.sketch_missing). The client is
the connection's originator (Zeek id.orig_*, Argus SrcAddr/Sport), the VIP its responder.
Only TCP and UDP records are kept; times are relative to the log's first kept record.
"""

from __future__ import annotations

import csv
import ipaddress
import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from connpub.errors import ConnpubError
from connpub.traffic.workload import (
    FIRST_N,
    FLOW_DTYPE,
    NS_PER_S,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
)

APP_UNKNOWN = 255
PROTOCOLS = {"tcp": PROTO_TCP, "udp": PROTO_UDP}
# Zeek conn.log `history` letters (upper case = originator) -> TCP flags seen in the flow.
_ZEEK_HISTORY_FLAGS = {"s": TCP_SYN, "h": TCP_SYN | TCP_ACK, "a": TCP_ACK, "d": TCP_PSH,
                       "f": TCP_FIN, "r": TCP_RST}
# Argus TCP State letters (per direction, "src_dst") -> TCP flags.
_ARGUS_STATE_FLAGS = {"S": TCP_SYN, "A": TCP_ACK, "P": TCP_PSH, "F": TCP_FIN, "R": TCP_RST}
_ZEEK_FIELDS = ("ts", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto", "duration")
_ARGUS_FIELDS = ("StartTime", "Dur", "Proto", "SrcAddr", "Sport", "DstAddr", "Dport", "State",
                 "TotPkts", "TotBytes", "SrcBytes")


class _Columns:
    """Accumulates imported records column by column, then builds a FLOW_DTYPE table."""

    def __init__(self) -> None:
        self.start_ns: list[int] = []
        self.duration_s: list[float] = []
        self.client: list[bytes] = []
        self.vip: list[bytes] = []
        self.client_port: list[int] = []
        self.vip_port: list[int] = []
        self.proto: list[int] = []
        self.bytes: list[int] = []
        self.packets: list[int] = []
        self.first_flags: list[int] = []
        self.flags: list[int] = []
        self._addresses: dict[str, bytes] = {}

    def address(self, text: str, where: str) -> bytes:
        """16-byte address (IPv4 as IPv4-mapped), cached per distinct text."""
        cached = self._addresses.get(text)
        if cached is None:
            try:
                ip = ipaddress.ip_address(text.strip())
            except ValueError as err:
                raise ConnpubError(f"{where}: {text!r} is not an IP address") from err
            cached = (ip.packed if ip.version == 6
                      else bytes(10) + b"\xff\xff" + ip.packed)
            self._addresses[text] = cached
        return cached

    def add(self, start_ns: int, duration_s: float, client: bytes, client_port: int,
            vip: bytes, vip_port: int, proto: int, nbytes: int, packets: int,
            first_flags: int, flags: int) -> None:
        self.start_ns.append(start_ns)
        self.duration_s.append(max(duration_s, 0.0))
        self.client.append(client)
        self.vip.append(vip)
        self.client_port.append(client_port)
        self.vip_port.append(vip_port)
        self.proto.append(proto)
        self.bytes.append(max(nbytes, 0))
        self.packets.append(max(packets, 0))
        self.first_flags.append(first_flags)
        self.flags.append(flags)

    def table(self) -> np.ndarray:
        n = len(self.start_ns)
        out = np.zeros(n, FLOW_DTYPE)
        if n == 0:
            return out
        start_ns = np.asarray(self.start_ns, np.int64)
        order = np.argsort(start_ns, kind="stable")
        start_ns = start_ns - start_ns.min()
        duration_ns = np.rint(np.asarray(self.duration_s) * NS_PER_S).astype(np.int64)
        columns = {
            "start_ns": start_ns, "end_ns": start_ns + duration_ns,
            "client_addr": np.frombuffer(b"".join(self.client), np.uint8).reshape(n, 16),
            "vip_addr": np.frombuffer(b"".join(self.vip), np.uint8).reshape(n, 16),
            "client_port": np.asarray(self.client_port), "vip_port": np.asarray(self.vip_port),
            "proto": np.asarray(self.proto), "bytes": np.asarray(self.bytes, np.uint64),
            "packets": np.asarray(self.packets, np.uint64),
            "first_tcp_flags": np.asarray(self.first_flags),
            "tcp_flags": np.asarray(self.flags),
        }
        for name, column in columns.items():
            out[name] = column[order]
        out["flow_id"] = np.arange(1, n + 1)
        out["app_class"] = APP_UNKNOWN
        out["first_n"] = 0  # no first-packet sketch in a flow log
        return out


def _port(text: str, where: str) -> int:
    try:
        value = int(text, 16) if text.lower().startswith("0x") else int(text)
    except ValueError as err:
        raise ConnpubError(f"{where}: port {text!r} is not a number") from err
    if not 0 <= value <= 0xFFFF:
        raise ConnpubError(f"{where}: port {value} out of range")
    return value


def _number(text, where: str, name: str, unset: str = "-") -> float:
    """A numeric field; Zeek's unset marker (and JSON null / absent) counts as 0."""
    if text is None or text == unset or text == "":
        return 0.0
    try:
        return float(text)
    except (TypeError, ValueError) as err:
        raise ConnpubError(f"{where}: field {name} = {text!r} is not a number") from err


def _time_ns(value, where: str) -> int:
    """Epoch seconds (text with up to 9 decimals, exactly; or a JSON number) -> ns."""
    if isinstance(value, int | float):
        return round(value * NS_PER_S)
    text = str(value).strip()
    whole, _, frac = text.partition(".")
    if not (whole.lstrip("-").isdigit() and (frac == "" or frac.isdigit())):
        raise ConnpubError(f"{where}: time {text!r} is not epoch seconds")
    sign = -1 if whole.startswith("-") else 1
    return int(whole) * NS_PER_S + sign * int((frac + "000000000")[:9])


def _zeek_flags(history: str, proto: int) -> tuple[int, int]:
    """(flags the originator's first packets carried, flags over the flow) from Zeek history."""
    if proto != PROTO_TCP or not history or history == "-":
        return 0, 0
    flags = 0
    for letter in history.lower():
        flags |= _ZEEK_HISTORY_FLAGS.get(letter, 0)
    first = TCP_SYN if history[0] == "S" else 0  # the log saw the originator's SYN first
    return first, flags


def _zeek_record(columns: _Columns, rec: dict, where: str, unset: str) -> None:
    proto = PROTOCOLS.get(str(rec.get("proto", "")).lower())
    if proto is None:
        return
    client = columns.address(str(rec["id.orig_h"]), where)
    vip = columns.address(str(rec["id.resp_h"]), where)
    nbytes = rec.get("orig_ip_bytes", rec.get("orig_bytes"))
    first, flags = _zeek_flags(str(rec.get("history") or ""), proto)
    columns.add(_time_ns(rec["ts"], where), _number(rec.get("duration"), where,
                "duration", unset), client, _port(str(rec["id.orig_p"]), where), vip,
                _port(str(rec["id.resp_p"]), where), proto,
                int(_number(nbytes, where, "orig_ip_bytes", unset)),
                int(_number(rec.get("orig_pkts"), where, "orig_pkts", unset)), first, flags)


def _zeek_tsv_rows(lines: Iterator[str], path: str) -> Iterator[tuple[str, dict, str]]:
    fields: list[str] | None = None
    separator, unset = "\t", "-"
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line:
            continue
        if line.startswith("#"):
            if line.startswith("#separator"):
                raw = line.split(None, 1)[1] if " " in line or "\t" in line else "\\x09"
                separator = raw.encode().decode("unicode_escape")
            elif line.startswith("#unset_field"):
                unset = line.split(separator, 1)[1]
            elif line.startswith("#fields"):
                fields = line.split(separator)[1:]
                lacking = [name for name in _ZEEK_FIELDS if name not in fields]
                if lacking:
                    raise ConnpubError(f"{path}: #fields lacks {', '.join(lacking)}; "
                                       "not a Zeek conn.log")
            continue
        if fields is None:
            raise ConnpubError(f"{path}:{number}: record before the #fields header")
        values = line.split(separator)
        if len(values) != len(fields):
            raise ConnpubError(f"{path}:{number}: {len(values)} fields, #fields names "
                               f"{len(fields)}")
        yield f"{path}:{number}", dict(zip(fields, values, strict=True)), unset


def _zeek_json_rows(lines: Iterable[str], path: str) -> Iterator[tuple[str, dict, str]]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConnpubError(f"{where}: not a JSON object ({err.msg})") from err
        if not isinstance(rec, dict):
            raise ConnpubError(f"{where}: not a JSON object")
        lacking = [name for name in _ZEEK_FIELDS[:6] if name not in rec]
        if lacking:
            raise ConnpubError(f"{where}: lacks {', '.join(lacking)}; not a Zeek conn record")
        yield where, rec, "-"


def read_zeek_conn(path: str | Path) -> np.ndarray:
    """FLOW_DTYPE table of a Zeek conn.log (TSV with a #fields header, or JSON lines).

    Bytes/packets are the originator's (orig_ip_bytes, else orig_bytes; orig_pkts); TCP flags
    from `history`; an unset duration (a single packet) is 0.
    """
    columns = _Columns()
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            first = handle.readline()
            handle.seek(0)
            rows = (_zeek_json_rows(handle, str(path)) if first.lstrip().startswith("{")
                    else _zeek_tsv_rows(handle, str(path)))
            for where, rec, unset in rows:
                _zeek_record(columns, rec, where, unset)
    except FileNotFoundError as err:
        raise ConnpubError(f"{path}: no such file") from err
    except IsADirectoryError as err:
        raise ConnpubError(f"{path}: is a directory, want a conn.log file") from err
    return columns.table()


def _argus_flags(state: str, proto: int) -> tuple[int, int]:
    if proto != PROTO_TCP:
        return 0, 0
    src, _, dst = state.partition("_")
    flags = 0
    for letter in src + dst:
        flags |= _ARGUS_STATE_FLAGS.get(letter, 0)
    return (TCP_SYN if "S" in src else 0), flags


def _argus_time_ns(text: str, where: str) -> int:
    """Argus StartTime (YYYY/MM/DD HH:MM:SS[.ffffff], UTC, or epoch seconds) -> ns."""
    stamp, _, frac = text.strip().partition(".")
    try:
        seconds = int(datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S").replace(
            tzinfo=UTC).timestamp())
    except ValueError:
        return _time_ns(text, where)
    if frac and not frac.isdigit():
        raise ConnpubError(f"{where}: StartTime {text!r} is not a time")
    return seconds * NS_PER_S + int((frac + "000000000")[:9])


def read_argus_binetflow(path: str | Path) -> np.ndarray:
    """FLOW_DTYPE table of an Argus bidirectional flow file (.binetflow CSV with a header).

    Bytes are SrcBytes; Argus keeps only the total packet count, so the originator's packets
    are estimated as TotPkts * SrcBytes / TotBytes (at least 1). TCP flags from State.
    """
    columns = _Columns()
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            lacking = [name for name in _ARGUS_FIELDS if name not in header]
            if lacking:
                raise ConnpubError(f"{path}: header lacks {', '.join(lacking)}; not an Argus "
                                   ".binetflow file")
            at = {name: header.index(name) for name in _ARGUS_FIELDS}
            for number, values in enumerate(reader, 2):
                if not values:
                    continue
                where = f"{path}:{number}"
                if len(values) < len(header):
                    raise ConnpubError(f"{where}: {len(values)} fields, header names "
                                       f"{len(header)}")
                proto = PROTOCOLS.get(values[at["Proto"]].strip().lower())
                if proto is None:
                    continue
                total_bytes = _number(values[at["TotBytes"]], where, "TotBytes")
                src_bytes = _number(values[at["SrcBytes"]], where, "SrcBytes")
                total_pkts = _number(values[at["TotPkts"]], where, "TotPkts")
                share = src_bytes / total_bytes if total_bytes > 0 else 1.0
                first, flags = _argus_flags(values[at["State"]].strip(), proto)
                columns.add(
                    _argus_time_ns(values[at["StartTime"]], where),
                    _number(values[at["Dur"]], where, "Dur"),
                    columns.address(values[at["SrcAddr"]], where),
                    _port(values[at["Sport"]].strip() or "0", where),
                    columns.address(values[at["DstAddr"]], where),
                    _port(values[at["Dport"]].strip() or "0", where), proto, int(src_bytes),
                    max(1, round(total_pkts * share)), first, flags)
    except FileNotFoundError as err:
        raise ConnpubError(f"{path}: no such file") from err
    except IsADirectoryError as err:
        raise ConnpubError(f"{path}: is a directory, want a .binetflow file") from err
    return columns.table()


def read_flow_source(path: str | Path, udp_idle_s: float = 30.0) -> np.ndarray:
    """FLOW_DTYPE table of one capture or log, by its name: .pcap/.pcapng (connpub's pcap
    reader), .binetflow (Argus), *.log / *.json / *.ndjson (Zeek conn), .parquet or a
    directory (a connpub trace, or a history: read_flow_table)."""
    name = Path(path).name.lower()
    if name.endswith((".pcap", ".pcapng", ".cap")):
        from connpub.traffic.trace import flows_from_pcap  # noqa: PLC0415

        return flows_from_pcap(path, udp_idle_s=udp_idle_s)
    if name.endswith(".binetflow"):
        return read_argus_binetflow(path)
    if name.endswith((".log", ".json", ".ndjson", ".jsonl")):
        return read_zeek_conn(path)
    if name.endswith(".parquet") or Path(path).is_dir():
        return read_flow_table(path)
    raise ConnpubError(f"{path}: unknown flow source (want .pcap, .pcapng, .binetflow, a Zeek "
                       "conn .log / .json, or a .parquet trace)")


def read_flow_table(path: str | Path) -> np.ndarray:
    """FLOW_DTYPE table of a connpub Parquet trace, or of a history (file or directory of
    parts; flows_from_history), told apart by the file's connpub.kind metadata."""
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    from connpub.traffic.trace import read_history, read_trace  # noqa: PLC0415

    target = Path(path)
    if target.is_dir():
        return flows_from_history(read_history(target))
    try:
        metadata = pq.read_schema(str(target)).metadata or {}
    except FileNotFoundError as err:
        raise ConnpubError(f"{path}: no such file") from err
    except (pa.ArrowInvalid, OSError) as err:
        raise ConnpubError(f"{path}: not a readable Parquet file ({err})") from err
    if metadata.get(b"connpub.kind") == b"history":
        return flows_from_history(read_history(target))
    return read_trace(target)


def flows_from_history(history: np.ndarray) -> np.ndarray:
    """FLOW_DTYPE rows of finished-flow HISTORY_DTYPE records. A record keeps the sketch as
    sums, so the first packets are rebuilt as first_n packets of the mean size with even gaps
    (an approximation: sums, maxima and counts at a complete sketch are those recorded)."""
    out = np.zeros(history.size, FLOW_DTYPE)
    for name in ("flow_id", "client_addr", "vip_addr", "client_port", "vip_port", "proto",
                 "packets", "bytes", "first_n", "first_tcp_flags", "tcp_flags", "session_id",
                 "app_id"):
        out[name] = history[name]
    out["app_class"] = 255
    out["start_ns"] = history["first_seen_ns"]
    out["end_ns"] = history["first_seen_ns"] + history["duration_ns"]
    count = np.minimum(history["first_n"].astype(np.int64), FIRST_N)
    column = np.arange(FIRST_N)[None, :]
    in_sketch = column < count[:, None]
    mean_size = history["first_size_sum"] / np.maximum(count, 1)
    out["first_sizes"] = np.where(in_sketch, np.rint(mean_size)[:, None], 0)
    gap = history["first_iat_sum_ns"] / np.maximum(count - 1, 1)
    out["first_iat_ns"] = np.where(in_sketch & (column >= 1), np.rint(gap)[:, None], 0)
    return out



MAX_PLAUSIBLE_DURATION_S = 86_400.0  # longer "flows" are capture artefacts (spliced pcaps)


def plausible_flows(table: np.ndarray, max_duration_s: float = MAX_PLAUSIBLE_DURATION_S
                    ) -> np.ndarray:
    """The flows of a table lasting at most max_duration_s: test captures (nDPI's) splice
    packets of different years into one file, which makes tuples "last" for years."""
    return table[(table["end_ns"] - table["start_ns"]) <= int(max_duration_s * NS_PER_S)]


def _compress_gaps(table: np.ndarray, max_gap_ns: int) -> np.ndarray:
    """Shift flows so that no gap between consecutive flow starts exceeds max_gap_ns (order
    and every flow's duration kept): a capture spanning years becomes a compact one."""
    order = np.argsort(table["start_ns"], kind="stable")
    out = table[order].copy()
    start = out["start_ns"].astype(np.int64)
    gaps = np.diff(start, prepend=start[:1])
    shift = np.cumsum(np.maximum(gaps - max_gap_ns, 0))
    out["start_ns"] = start - shift
    out["end_ns"] = out["end_ns"].astype(np.int64) - shift
    return out


def concat_sources(tables: list[np.ndarray], gap_s: float = 86_400.0) -> np.ndarray:
    """One FLOW_DTYPE table of several captures placed one after the other, each starting
    gap_s after the previous one's last end (gaps over gap_s inside a capture shrink to
    gap_s), flow ids renumbered. Client priors then never mix two captures' times."""
    parts, offset = [], 0
    gap_ns = int(gap_s * NS_PER_S)
    for table in tables:
        if table.size == 0:
            continue
        part = _compress_gaps(table, gap_ns)
        shift = offset - int(part["start_ns"].min())
        part["start_ns"] += shift
        part["end_ns"] += shift
        offset = int(part["end_ns"].max()) + gap_ns
        parts.append(part)
    out = np.concatenate(parts) if parts else np.zeros(0, FLOW_DTYPE)
    out["flow_id"] = np.arange(1, out.size + 1)
    return out
