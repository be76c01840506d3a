"""The one TOML config file (docs/config.md): defaults, parsing, checks; frozen dataclasses."""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connpub.datapath.masks import DEFAULT_MASK_SPECS, LEVEL_COUNT, MaskSpec, mask_is_coarser
from connpub.errors import ConnpubError
from connpub.protocol.wire import load_key

MODES = ("baseline", "adaptive", "predictive", "full")
SEND_TO = ("one_random", "all")
ORDERS = ("coarsest_first", "literal")
MODEL_PROTOCOLS = ("tcp", "udp", "tcp+udp", "none")  # [lease] model_protocols
TCP_LIVENESS = ("kernel", "packets")


def _f(default: Any, lo: float | None = None, hi: float | None = None, *,
       lo_open: bool = False, choices: tuple | None = None, doc: str = "") -> Any:
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices, "doc": doc}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class PublishConfig:
    interval_s: float = _f(1.0, 0.0, 3600.0, lo_open=True, doc="publish cycle T")
    mode: str = _f("baseline", choices=MODES, doc="baseline | adaptive | predictive | full")
    send_to: str = _f("one_random", choices=SEND_TO, doc="LB nodes each cycle goes to")
    mtu: int = _f(1400, 576, 65535, doc="path MTU; packets incl. IP+UDP stay within it")


@dataclass(frozen=True)
class LeaseConfig:
    k: float = _f(3.0, 0.0, 1000.0, lo_open=True, doc="baseline lease = k * interval_s")
    min_s: float = _f(1.0, 0.0, 86400.0, lo_open=True, doc="shortest lease the LB grants")
    max_s: float = _f(300.0, 0.0, 86400.0, lo_open=True, doc="longest lease; longer = rejected")
    initial_s: float = _f(3.0, 0.0, 86400.0, lo_open=True, doc="lease of a new flow at the LB")
    idle_timeout_s: float = _f(60.0, 0.0, 86400.0, lo_open=True,
                               doc="idle flow counts as closed (TCP by packets, not UDP)")
    skip_threshold_s: float = _f(10.0, 0.0, 86400.0, doc="skip renewal if p90 below this")
    max_interval_width: float = _f(1e6, 1.0, 1e9, lo_open=True,
                                   doc="p90/p10 above this: baseline lease")
    renew_fraction: float = _f(0.8, 0.0, 1.0, lo_open=True, doc="renew at this part of a lease")
    model_protocols: str = _f("tcp", choices=MODEL_PROTOCOLS,
                              doc="whose leases the model sets: tcp, udp (extends idle "
                                  "horizons), tcp+udp, none (k*T)")


@dataclass(frozen=True)
class GranularityConfig:
    bandwidth_very_low: float = _f(100_000.0, 0.0, doc="bytes/s per flow, level 3 below")
    bandwidth_low: float = _f(200_000.0, 0.0, doc="bytes/s per flow, level 1 below")
    bandwidth_medium: float = _f(400_000.0, 0.0, doc="bytes/s per flow, level 2 below")
    frequency_very_low: float = _f(10_000.0, 0.0, doc="new flows/s per class, level 3 below")
    frequency_low: float = _f(20_000.0, 0.0, doc="new flows/s per class, level 1 below")
    frequency_medium: float = _f(50_000.0, 0.0, doc="new flows/s per class, level 2 below")
    duration_long_s: float = _f(0.1, 0.0, doc="flow duration (LB: mean age), level 1 above")
    duration_very_long_s: float = _f(0.2, 0.0, doc="flow duration (LB: mean age), level 2 above")
    duration_extreme_long_s: float = _f(0.3, 0.0, doc="flow duration (LB: mean age), level 3 "
                                        "above")
    order: str = _f("coarsest_first", choices=ORDERS, doc="coarsest_first | literal (seed)")
    evaluation_interval_s: float = _f(5.0, 0.0, 86400.0, lo_open=True, doc="how often to decide")
    hysteresis_evaluations: int = _f(3, 1, 1000, doc="agreeing evaluations before coarsening")
    hysteresis_margin: float = _f(0.2, 0.0, 0.9, doc="relative slack before refining")
    history_half_life_s: float = _f(60.0, 0.0, 86400.0, lo_open=True, doc="EWMA half-life")
    map_pressure: tuple[float, ...] = _f((0.75, 0.85, 0.95), 0.0, 1.0, lo_open=True,
                                         doc="occupancy forcing level >= 1, 2, 3")
    hold_flows_from: float = _f(0.5, 0.0, 1.0, doc="classes hold their connections (docs/lb.md "
                                "\"Held flows\") from this fraction of the first map_pressure "
                                "occupancy on")
    max_spread: float = _f(1.3, 1.0, 1000.0, doc="predicted max/mean connections per backend of "
                           "a service that coarser levels may reach (>= backends: no bound)")
    initial_level: int = _f(3, 0, LEVEL_COUNT - 1, doc="level of a class with no data yet")
    retire_after_s: float = _f(86400.0, 0.0, 86400.0, doc="after a level change, members of "
                               "the left level get entries of their own (86400: off in "
                               "practice, the default: docs/policy.md)")


@dataclass(frozen=True)
class MasksConfig:
    level0: MaskSpec = DEFAULT_MASK_SPECS[0]
    level1: MaskSpec = DEFAULT_MASK_SPECS[1]
    level2: MaskSpec = DEFAULT_MASK_SPECS[2]
    level3: MaskSpec = DEFAULT_MASK_SPECS[3]

    @property
    def specs(self) -> tuple[MaskSpec, ...]:
        return (self.level0, self.level1, self.level2, self.level3)


_MASK_LIMITS = {"client_prefix_v4": (0, 32), "client_prefix_v6": (0, 128)}


@dataclass(frozen=True)
class RolloutConfig:
    fraction: float = _f(0.1, 0.0, 1.0, doc="share of classes in the adaptive/predictive cohort")
    shadow: bool = _f(False, doc="compute and report decisions, act as baseline")
    salt: str = _f("connpub", doc="hash salt; change it to draw another cohort")


@dataclass(frozen=True)
class SecurityConfig:
    key_file: str = _f("/etc/connpub/key", doc="hex HMAC key, mode 0600")
    replay_window: int = _f(64, 1, 4096, doc="sequences remembered per sender")
    per_sender_entry_quota: float = _f(1_000_000.0, 0.0, 1e12, lo_open=True,
                                       doc="entries/s accepted per sender")


@dataclass(frozen=True)
class AgentConfig:
    server_id: int = _f(1, 1, 2**32 - 1, doc="this server's id = backend id")
    listen_address: str = _f("", doc="UDP address the agent binds; '' = the fabric address "
                             "(LB: its program's tunnel source lb_addr4, else lb_addr6; server: "
                             "every address); '0.0.0.0' or '::' = every address")
    listen_port: int = _f(7390, 1, 65535, doc="UDP port of both agents")
    lb_addresses: tuple[str, ...] = _f((), doc="LB node addresses a server publishes to")
    allowed_sources: tuple[str, ...] = _f((), doc="prefixes the agent's peers send from (LB: "
                                          "the servers, server: the LB nodes); other senders "
                                          "are dropped before the HMAC check; () = the LB's "
                                          "backends' addresses / the server's lb_addresses")
    metrics_port: int = _f(9465, 0, 65535, doc="Prometheus port, 0 = off")
    history_path: str = _f("/var/lib/connpub/history", doc="where flow history is written")


@dataclass(frozen=True)
class LivenessConfig:
    tcp: str = _f("kernel", choices=TCP_LIVENESS,
                  doc="kernel: open = socket ESTABLISHED | packets: idle timeout")
    udp_idle_s: float = _f(30.0, 0.0, 86400.0, lo_open=True,
                           doc="UDP flow with one packet: idle horizon")
    udp_stream_idle_s: float = _f(120.0, 0.0, 86400.0, lo_open=True,
                                  doc="UDP flow with more packets: idle horizon")
    udp_service_idle_s: tuple[tuple[int, float], ...] = _f(
        (), doc="[vip port, seconds] pairs: a service's UDP idle horizon")

    def service_ports(self) -> tuple[list[int], list[float]]:
        """(ports, seconds) of the per-service horizons, sorted by port."""
        pairs = sorted(self.udp_service_idle_s)
        return [p for p, _ in pairs], [s for _, s in pairs]


@dataclass(frozen=True)
class ModelConfig:
    path: str = _f("", doc="ONNX model; empty = the packaged default")


@dataclass(frozen=True)
class Config:
    publish: PublishConfig = PublishConfig()
    lease: LeaseConfig = LeaseConfig()
    granularity: GranularityConfig = GranularityConfig()
    masks: MasksConfig = MasksConfig()
    rollout: RolloutConfig = RolloutConfig()
    security: SecurityConfig = SecurityConfig()
    agent: AgentConfig = AgentConfig()
    liveness: LivenessConfig = LivenessConfig()
    model: ModelConfig = ModelConfig()


DEFAULT_CONFIG_PATH = Path(__file__).parent / "data" / "default.toml"


# ------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(options)}"


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


def _convert(value: Any, annotation: str) -> tuple[Any, str | None]:
    """TOML value -> field value of the given annotation, or an error text."""
    if annotation == "bool":
        return (value, None) if isinstance(value, bool) else (None, "a boolean")
    if annotation == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return (value, None) if ok else (None, "an integer")
    if annotation == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and math.isfinite(value):
            return float(value), None
        return None, "a finite number"
    if annotation == "str":
        return (value, None) if isinstance(value, str) else (None, "a string")
    if annotation == "tuple[float, ...]":
        ok = isinstance(value, list) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        return (tuple(float(v) for v in value), None) if ok else (None, "an array of numbers")
    if annotation == "tuple[str, ...]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return (tuple(value), None) if ok else (None, "an array of strings")
    if annotation == "tuple[tuple[int, float], ...]":
        def pair(v: Any) -> bool:
            return (isinstance(v, list) and len(v) == 2 and isinstance(v[0], int)
                    and not isinstance(v[0], bool) and isinstance(v[1], int | float)
                    and not isinstance(v[1], bool) and math.isfinite(v[1]))

        ok = isinstance(value, list) and all(pair(v) for v in value)
        return ((tuple((v[0], float(v[1])) for v in value), None) if ok
                else (None, "an array of [port, seconds] pairs"))
    raise AssertionError(annotation)


def _range_problem(value: Any, meta: dict) -> str | None:
    if meta.get("choices") and value not in meta["choices"]:
        return f"'{value}' is not one of {', '.join(meta['choices'])}"
    lo, hi = meta.get("lo"), meta.get("hi")
    for item in value if isinstance(value, tuple) else (value,):
        if isinstance(item, str):
            continue
        if lo is not None and (item < lo or (meta.get("lo_open") and item == lo)):
            return f"{item} is out of range (must be {'>' if meta.get('lo_open') else '>='} {lo})"
        if hi is not None and item > hi:
            return f"{item} is out of range (must be <= {hi})"
    return None


def _parse_section(cls, table: dict, where: str, problems: list[str]):
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for name, raw in table.items():
        if name not in known:
            problems.append(f"{where} {name}: unknown key{_did_you_mean(name, known)}")
            continue
        spec = known[name]
        value, expected = _convert(raw, str(spec.type))
        if expected is not None:
            problems.append(f"{where} {name}: wrong type, expected {expected}, "
                            f"got {_type_name(raw)} {raw!r}")
            continue
        problem = _range_problem(value, spec.metadata)
        if problem:
            problems.append(f"{where} {name}: {problem}")
            continue
        values[name] = value
    return cls(**values)


def _parse_masks(table: dict, problems: list[str]) -> MasksConfig:
    levels = {f"level{i}": DEFAULT_MASK_SPECS[i] for i in range(LEVEL_COUNT)}
    for name, raw in table.items():
        where = f"[masks.{name}]"
        if name not in levels:
            problems.append(f"[masks] {name}: unknown key{_did_you_mean(name, levels)}")
            continue
        if not isinstance(raw, dict):
            problems.append(f"[masks] {name}: wrong type, expected a table, got {_type_name(raw)}")
            continue
        fields = {f.name: f for f in dataclasses.fields(MaskSpec)}
        values = dataclasses.asdict(levels[name])
        for key, value in raw.items():
            if key not in fields:
                problems.append(f"{where} {key}: unknown key{_did_you_mean(key, fields)}")
                continue
            annotation = str(fields[key].type)
            converted, expected = _convert(value, annotation)
            if expected is not None:
                problems.append(f"{where} {key}: wrong type, expected {expected}, "
                                f"got {_type_name(value)} {value!r}")
                continue
            if key in _MASK_LIMITS:
                lo, hi = _MASK_LIMITS[key]
                if not lo <= converted <= hi:
                    problems.append(f"{where} {key}: {converted} is out of range ({lo}..{hi})")
                    continue
            values[key] = converted
        levels[name] = MaskSpec(**values)
    return MasksConfig(**levels)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _cross_checks(cfg: Config, problems: list[str]) -> None:
    gran, lease = cfg.granularity, cfg.lease
    for group, names in (
        ("bandwidth", ("bandwidth_very_low", "bandwidth_low", "bandwidth_medium")),
        ("frequency", ("frequency_very_low", "frequency_low", "frequency_medium")),
        ("duration", ("duration_long_s", "duration_very_long_s", "duration_extreme_long_s")),
    ):
        values = [getattr(gran, n) for n in names]
        if not values[0] < values[1] < values[2]:
            chain = " < ".join(f"{n}={v:g}" for n, v in zip(names, values, strict=True))
            problems.append(f"[granularity] {group} thresholds out of order: need {chain}")
    pressure = gran.map_pressure
    if len(pressure) != 3 or list(pressure) != sorted(pressure):
        problems.append(f"[granularity] map_pressure: need 3 ascending occupancy fractions, "
                        f"got {list(pressure)}")
    if not lease.min_s <= lease.max_s:
        problems.append(f"[lease] min_s={lease.min_s:g} must be <= max_s={lease.max_s:g}")
    if not lease.min_s <= lease.initial_s <= lease.max_s:
        problems.append(f"[lease] initial_s={lease.initial_s:g} must be within "
                        f"[min_s, max_s] = [{lease.min_s:g}, {lease.max_s:g}]")
    baseline_s = lease.k * cfg.publish.interval_s
    if not lease.min_s <= baseline_s <= lease.max_s:
        problems.append(f"[lease] baseline lease k*interval_s = {baseline_s:g}s must be within "
                        f"[min_s, max_s] = [{lease.min_s:g}, {lease.max_s:g}]")
    if lease.max_s * 1000 >= 2**32:
        problems.append(f"[lease] max_s={lease.max_s:g} does not fit the u32 ms wire field")
    specs = cfg.masks.specs
    for level in range(1, LEVEL_COUNT):
        if not mask_is_coarser(specs[level - 1], specs[level]):
            problems.append(f"[masks] level{level} keeps something level{level - 1} drops; "
                            "each level must be at most as fine as the one before")
    live = cfg.liveness
    if live.udp_idle_s > live.udp_stream_idle_s:
        problems.append(f"[liveness] udp_idle_s={live.udp_idle_s:g} must be <= "
                        f"udp_stream_idle_s={live.udp_stream_idle_s:g}")
    seen_ports: set[int] = set()
    for port, seconds in live.udp_service_idle_s:
        if not 1 <= port <= 65535:
            problems.append(f"[liveness] udp_service_idle_s: port {port} is out of range "
                            "(1..65535)")
        elif port in seen_ports:
            problems.append(f"[liveness] udp_service_idle_s: port {port} is given twice")
        elif not 0 < seconds <= 86400:
            problems.append(f"[liveness] udp_service_idle_s: {seconds:g} s for port {port} is "
                            "out of range (must be > 0 and <= 86400)")
        seen_ports.add(port)
    listen = (cfg.agent.listen_address,) if cfg.agent.listen_address else ()
    for address in cfg.agent.lb_addresses + listen:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            problems.append(f"[agent] '{address}' is not an IP address")
    for prefix in cfg.agent.allowed_sources:
        try:
            ipaddress.ip_network(prefix, strict=False)
        except ValueError:
            problems.append(f"[agent] allowed_sources: '{prefix}' is not an address prefix "
                            "(e.g. 10.103.0.0/24)")


def key_file_problem(key_file: str) -> str | None:
    """One line if the key file is missing, unreadable or open to group/others."""
    path = Path(key_file)
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        return (f"[security] key_file: cannot stat {path} ({err.strerror}); create it with "
                f"`(umask 077; openssl rand -hex 32 > {path})`")
    if mode & 0o077:
        return (f"[security] key_file: {path} is accessible by group/others "
                f"(mode {mode & 0o7777:04o}); run `chmod 600 {path}`")
    try:
        load_key(path)
    except ConnpubError as err:
        return f"[security] key_file: {err}"
    return None


def parse_config(data: dict, problems: list[str]) -> Config:
    """Build a Config from parsed TOML, appending one line per problem to `problems`."""
    sections: dict[str, Any] = {}
    for name, table in data.items():
        if name not in _SECTIONS:
            problems.append(f"[{name}]: unknown section{_did_you_mean(name, _SECTIONS)}")
            continue
        if not isinstance(table, dict):
            problems.append(f"[{name}]: expected a table, got {_type_name(table)}")
            continue
        if name == "masks":
            sections[name] = _parse_masks(table, problems)
        else:
            sections[name] = _parse_section(globals()[_SECTIONS[name]], table, f"[{name}]",
                                            problems)
    cfg = Config(**sections)
    _cross_checks(cfg, problems)
    return cfg


def check_config(path: str | os.PathLike | None, *,
                 check_key_file: bool = True) -> tuple[Config | None, list[str]]:
    """(config, problems). The config is None when the file cannot be read or parsed."""
    problems: list[str] = []
    if path is None:
        cfg = Config()
    else:
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except OSError as err:
            return None, [f"cannot read {path}: {err.strerror}"]
        except tomllib.TOMLDecodeError as err:
            return None, [f"not valid TOML: {err}"]
        cfg = parse_config(data, problems)
    if check_key_file:
        problem = key_file_problem(cfg.security.key_file)
        if problem:
            problems.append(problem)
    return cfg, problems


def load_config(path: str | os.PathLike | None = None, *, check_key_file: bool = False) -> Config:
    """The effective config (defaults where the file says nothing); ConnpubError on any problem."""
    cfg, problems = check_config(path, check_key_file=check_key_file)
    if problems:
        more = f" (+{len(problems) - 1} more; run `connpub config check {path}`)" \
            if len(problems) > 1 else ""
        raise ConnpubError(f"{path}: {problems[0]}{more}")
    assert cfg is not None
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Plain dict (tuples as lists) for JSON/TOML output."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def config_to_toml(cfg: Config) -> str:
    """The effective config as TOML text (loads back to the same Config)."""
    lines: list[str] = []

    def emit(prefix: str, table: dict) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        if scalars:
            lines.append(f"[{prefix}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
            lines.append("")
        for k, v in table.items():
            if isinstance(v, dict):
                emit(f"{prefix}.{k}", v)

    for section, table in config_to_dict(cfg).items():
        emit(section, table)
    return "\n".join(lines)
