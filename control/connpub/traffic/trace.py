"""Parquet flow traces and finished-flow history records: schemas, read/write, pcap import."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from connpub.errors import ConnpubError
from connpub.traffic.pcap import PcapStats, read_packets
from connpub.traffic.pcap_flows import APP_UNKNOWN, assemble_flows  # noqa: F401 (re-export)
from connpub.traffic.workload import FLOW_DTYPE, NS_PER_S, TCP_FIN, TCP_RST

SCHEMA_VERSION = "1"
ADDRESS_FIELDS = ("client_addr", "vip_addr")  # stored as fixed_size_binary(16)

# One record per finished flow, as the server agent appends it to the history (see docs/model.md).
HISTORY_DTYPE = np.dtype(
    [
        ("flow_id", "<u8"),  # 0 when unknown
        ("client_addr", "u1", (16,)),
        ("vip_addr", "u1", (16,)),
        ("client_port", "<u2"),  # host order
        ("vip_port", "<u2"),
        ("proto", "u1"),
        ("first_seen_ns", "<i8"),
        ("last_seen_ns", "<i8"),
        ("duration_ns", "<i8"),  # true duration (target of the model)
        ("packets", "<u8"),
        ("bytes", "<u8"),
        ("first_n", "u1"),  # packets in the first-packet sketch (<= FIRST_N)
        ("first_size_sum", "<u4"),  # sum of L3 sizes of the first packets
        ("first_size_sumsq", "<u8"),  # sum of squared sizes
        ("first_size_max", "<u2"),
        ("first_iat_sum_ns", "<u8"),  # sum of inter-arrival gaps among the first packets
        ("first_iat_max_ns", "<u8"),
        ("first_tcp_flags", "u1"),  # OR of TCP flags of the first packets
        ("tcp_flags", "u1"),  # OR of TCP flags over the flow
        ("closed", "?"),  # ended by FIN/RST (True) or by idle timeout (False)
        ("server_id", "<u4"),  # 0 when unknown
        ("session_id", "<u8"),  # ground truth from the generator; 0 when unknown
        ("app_id", "<u8"),
    ]
)

FIELD_DOCS = {
    "flow_id": "flow number, unique within the file",
    "session_id": "ground-truth session (client opening parallel connections); 0 = unknown",
    "app_id": "ground-truth (client, application) id; 0 = unknown",
    "app_class": "index into connpub.traffic.workload.APP_CLASSES; 255 = unknown",
    "start_ns": "first packet time, ns since the trace start",
    "end_ns": "last packet (or closing FIN/RST) time, ns; end-start is the true duration",
    "client_addr": "client IPv6 address, IPv4 as IPv4-mapped ::ffff:a.b.c.d",
    "vip_addr": "virtual IP, same encoding as client_addr",
    "client_port": "client port, host order",
    "vip_port": "VIP port, host order",
    "proto": "IP protocol number (6 TCP, 17 UDP)",
    "bytes": "L3 bytes client->VIP",
    "packets": "packets client->VIP",
    "first_n": "valid entries in first_sizes / first_iat_ns",
    "first_sizes": "L3 sizes of the first 8 client->VIP packets",
    "first_iat_ns": "gap before each of the first 8 client->VIP packets (entry 0 is 0)",
    "first_tcp_flags": "OR of TCP flags over the first packets",
    "tcp_flags": "OR of TCP flags over the whole flow (both directions for pcap)",
    "first_seen_ns": "first packet time, ns (CLOCK_MONOTONIC on the server, or trace time)",
    "last_seen_ns": "last packet time, ns",
    "duration_ns": "true duration of the finished flow, ns",
    "first_size_sum": "sum of L3 sizes of the first packets",
    "first_size_sumsq": "sum of squared L3 sizes of the first packets",
    "first_size_max": "largest L3 size among the first packets",
    "first_iat_sum_ns": "sum of inter-arrival gaps among the first packets, ns",
    "first_iat_max_ns": "largest inter-arrival gap among the first packets, ns",
    "closed": "flow ended by FIN/RST (true) or idle timeout (false)",
    "server_id": "server that held the flow; 0 = unknown",
}


def _arrow_type(dtype: np.dtype, name: str, shape: tuple) -> pa.DataType:
    if name in ADDRESS_FIELDS:
        return pa.binary(16)
    base = pa.from_numpy_dtype(dtype)
    return pa.list_(base, shape[0]) if shape else base


def schema_for(dtype: np.dtype, kind: str) -> pa.Schema:
    """Arrow schema mirroring a numpy record dtype (address arrays -> fixed_size_binary(16))."""
    fields = []
    for name in dtype.names:
        sub = dtype.fields[name][0]
        base, shape = (sub.base, sub.shape) if sub.shape else (sub, ())
        fields.append(
            pa.field(name, _arrow_type(base, name, shape), nullable=False,
                     metadata={"doc": FIELD_DOCS.get(name, "")})
        )
    return pa.schema(fields, metadata={"connpub.kind": kind, "connpub.schema": SCHEMA_VERSION})


TRACE_SCHEMA = schema_for(FLOW_DTYPE, "trace")
HISTORY_SCHEMA = schema_for(HISTORY_DTYPE, "history")


def to_table(records: np.ndarray, schema: pa.Schema, metadata: Mapping[str, str] | None = None
             ) -> pa.Table:
    """Numpy record array -> Arrow table of `schema` (vectorised, no per-row Python)."""
    columns = []
    n = records.size
    for field in schema:
        column = np.ascontiguousarray(records[field.name])
        if pa.types.is_fixed_size_binary(field.type):
            buf = pa.py_buffer(column.astype(np.uint8).tobytes())
            columns.append(pa.Array.from_buffers(field.type, n, [None, buf]))
        elif pa.types.is_fixed_size_list(field.type):
            flat = pa.array(column.reshape(-1), type=field.type.value_type)
            columns.append(pa.FixedSizeListArray.from_arrays(flat, field.type.list_size))
        else:
            columns.append(pa.array(column, type=field.type))
    merged = dict(schema.metadata or {})
    merged.update({k.encode(): str(v).encode() for k, v in (metadata or {}).items()})
    return pa.Table.from_arrays(columns, schema=schema.with_metadata(merged))


def from_table(table: pa.Table, dtype: np.dtype, schema: pa.Schema, source: str) -> np.ndarray:
    """Arrow table -> numpy record array; ConnpubError naming the first missing/bad column."""
    out = np.zeros(table.num_rows, dtype)
    for field in schema:
        if field.name not in table.column_names:
            kind = (schema.metadata or {}).get(b"connpub.kind", b"").decode()
            doc = "docs/workloads.md" if kind == "trace" else "docs/model.md"
            raise ConnpubError(
                f"{source}: column {field.name!r} missing; expected a connpub {kind} file ({doc})"
            )
        column = table.column(field.name).combine_chunks()
        if column.null_count:
            raise ConnpubError(f"{source}: column {field.name!r} has nulls; fill or drop them")
        try:
            if pa.types.is_fixed_size_binary(field.type) or pa.types.is_fixed_size_list(
                field.type
            ):
                if column.type != field.type:
                    column = column.cast(field.type)
                if pa.types.is_fixed_size_binary(field.type):
                    raw = np.frombuffer(column.buffers()[1], np.uint8)
                    start = column.offset * 16
                    values = raw[start : start + 16 * len(column)].reshape(-1, 16)
                else:
                    values = column.flatten().to_numpy(zero_copy_only=False)
                    values = values.reshape(-1, field.type.list_size)
            else:
                values = column.cast(field.type).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as err:
            raise ConnpubError(
                f"{source}: column {field.name!r} of type {column.type} does not fit {field.type}"
            ) from err
        out[field.name] = values
    return out


def _write(records: np.ndarray, schema: pa.Schema, path: str | Path,
           metadata: Mapping[str, str] | None) -> None:
    pq.write_table(to_table(records, schema, metadata), str(path), compression="zstd")


def _read(path: str | Path, dtype: np.dtype, schema: pa.Schema) -> np.ndarray:
    try:
        table = pq.read_table(str(path))
    except FileNotFoundError as err:
        raise ConnpubError(f"{path}: no such file") from err
    except (pa.ArrowInvalid, OSError) as err:
        raise ConnpubError(f"{path}: not a readable Parquet file ({err})") from err
    return from_table(table, dtype, schema, str(path))


def write_trace(flows: np.ndarray, path: str | Path,
                metadata: Mapping[str, str] | None = None) -> None:
    """Write a FLOW_DTYPE table as a Parquet trace (schema TRACE_SCHEMA)."""
    _write(flows, TRACE_SCHEMA, path, metadata)


def read_trace(path: str | Path) -> np.ndarray:
    """Read a Parquet trace into a FLOW_DTYPE array."""
    return _read(path, FLOW_DTYPE, TRACE_SCHEMA)


def write_history(records: np.ndarray, path: str | Path,
                  metadata: Mapping[str, str] | None = None) -> None:
    """Write HISTORY_DTYPE records as Parquet (schema HISTORY_SCHEMA)."""
    _write(records, HISTORY_SCHEMA, path, metadata)


def append_history(records: np.ndarray, path: str | Path) -> None:
    """Append records to a history: a directory of Parquet part files (one per call)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    index = len(list(folder.glob("part-*.parquet")))
    write_history(records, folder / f"part-{index:06d}.parquet")


def read_history(path: str | Path) -> np.ndarray:
    """Read a history file, or a directory of part files, into a HISTORY_DTYPE array."""
    target = Path(path)
    if target.is_dir():
        parts = sorted(target.glob("*.parquet"))
        if not parts:
            raise ConnpubError(f"{path}: directory holds no .parquet history parts")
        return np.concatenate([_read(part, HISTORY_DTYPE, HISTORY_SCHEMA) for part in parts])
    return _read(path, HISTORY_DTYPE, HISTORY_SCHEMA)


def history_from_flows(flows: np.ndarray, server_id: int = 0) -> np.ndarray:
    """Finished-flow records a server would append for each flow of a FLOW_DTYPE table."""
    out = np.zeros(flows.size, HISTORY_DTYPE)
    for name in ("flow_id", "client_addr", "vip_addr", "client_port", "vip_port", "proto",
                 "packets", "bytes", "first_n", "first_tcp_flags", "tcp_flags", "session_id",
                 "app_id"):
        out[name] = flows[name]
    out["first_seen_ns"] = flows["start_ns"]
    out["last_seen_ns"] = flows["end_ns"]
    out["duration_ns"] = flows["end_ns"] - flows["start_ns"]
    sizes = flows["first_sizes"].astype(np.uint64)
    out["first_size_sum"] = sizes.sum(axis=1)
    out["first_size_sumsq"] = (sizes * sizes).sum(axis=1)
    out["first_size_max"] = sizes.max(axis=1)
    out["first_iat_sum_ns"] = flows["first_iat_ns"].sum(axis=1)
    out["first_iat_max_ns"] = flows["first_iat_ns"].max(axis=1)
    out["closed"] = (flows["tcp_flags"] & (TCP_FIN | TCP_RST)) != 0
    out["server_id"] = server_id
    return out


def check_udp_idle_s(udp_idle_s: float) -> int:
    """UDP idle timeout in ns; ConnpubError unless it is a finite number of seconds > 0."""
    if not math.isfinite(udp_idle_s) or udp_idle_s <= 0:
        raise ConnpubError(f"UDP idle timeout {udp_idle_s:g} s is not a positive number of "
                           "seconds; use e.g. 30")
    return int(udp_idle_s * NS_PER_S)


def import_pcap(path: str | Path, udp_idle_s: float = 30.0, allow_truncated: bool = False
                ) -> tuple[np.ndarray, PcapStats]:
    """Flows of a pcap/pcapng file (FLOW_DTYPE, rules in docs/workloads.md) and the reader's
    counts of what it skipped. A file cut mid-record is a ConnpubError unless allow_truncated
    (then the complete records are used and stats.truncated_bytes says how much was cut)."""
    idle_ns = check_udp_idle_s(udp_idle_s)
    packets, stats = read_packets(path)
    if stats.truncated_bytes and not allow_truncated:
        raise ConnpubError(
            f"{path}: capture cut mid-record ({stats.truncated_bytes} bytes after the last of "
            f"{stats.records} complete records); pass --allow-truncated to import those")
    return assemble_flows(packets, idle_ns), stats


def flows_from_pcap(path: str | Path, udp_idle_s: float = 30.0,
                    allow_truncated: bool = False) -> np.ndarray:
    """FLOW_DTYPE table of a pcap/pcapng file (see import_pcap)."""
    return import_pcap(path, udp_idle_s, allow_truncated)[0]
