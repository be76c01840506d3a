"""`connpub attach|detach|status|maps`: the XDP programs on interfaces and their pinned maps."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from connpub import paths
from connpub.datapath import loader, netlink, pinned
from connpub.datapath.abi import MAP_LAYOUTS, STAT_NAMES
from connpub.datapath.lbctl import address_bytes
from connpub.datapath.maps import PinnedMap, fold_cpus
from connpub.display import (
    TABLE_ROWS_MAX,
    column_rows,
    entry_columns,
    print_json,
    print_json_rows,
    print_lines,
    print_table,
)
from connpub.errors import ConnpubError


def _pick_attachment(iface: str | None, netns: str | None) -> loader.Attachment:
    """The attachment named by --iface/--netns, or the only one there is."""
    if iface:
        found = loader.load_attachment(iface, netns)
        if found is None:
            raise ConnpubError(
                f"nothing attached on {paths.attachment_name(iface, netns)} (see `connpub status`)"
            )
        return found
    every = loader.list_attachments()
    if netns:
        every = [a for a in every if a.netns == netns]
    if len(every) == 1:
        return every[0]
    if not every:
        raise ConnpubError("no connpub program is attached (run `connpub attach` first)")
    names = ", ".join(a.name for a in every)
    raise ConnpubError(f"several attachments ({names}): choose one with --iface and --netns")


def _open_map(att: loader.Attachment, name: str) -> PinnedMap:
    return pinned.open_pinned(att.pin_dir, att.role, name)


def read_stats(att: loader.Attachment) -> dict[str, int]:
    """The role's per-CPU stats counters, summed over CPUs, by name."""
    return pinned.read_stats(att.pin_dir, att.role)


def _now_ns() -> int:
    from connpub.datapath.clock import datapath_clock  # noqa: PLC0415

    return datapath_clock().now_ns()


target_options = [
    click.option("--iface", help="Interface the program is attached to."),
    click.option("--netns", help="Network namespace of the interface (default: the root one)."),
]


def with_target(func):
    for option in reversed(target_options):
        func = option(func)
    return func


@click.command()
@click.option("--role", type=click.Choice(["server", "lb"]), required=True, help="Which program.")
@click.option("--iface", required=True, help="Interface to attach to.")
@click.option("--netns", help="Network namespace of the interface.")
@click.option(
    "--mode",
    type=click.Choice(["auto", "native", "generic"]),
    default="auto",
    show_default=True,
    help="XDP mode; auto tries native first.",
)
@click.option(
    "--default-level",
    type=click.IntRange(0, 3),
    default=0,
    show_default=True,
    help="Server: level of traffic classes without a directive.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="connpub TOML config (masks, table sizes); defaults otherwise.",
)
@click.option("--replace", is_flag=True,
              help="Swap the attached program for a new build atomically, keeping its pinned "
                   "maps (connections, leases, settings).")
@click.option("--define", "define_args", multiple=True, metavar="NAME=VALUE",
              help="C define for the build, e.g. MAX_CONNS=4096 (table sizes: "
                   "docs/datapath.md, docs/lb.md).")
def attach(role, iface, netns, mode, default_level, config_file, replace, define_args):
    """Compile, load and attach a program; its maps are pinned under /sys/fs/bpf/connpub.

    Example: sudo connpub attach --role server --iface veth1 --netns srv1
    (a new build in place: sudo connpub attach --role lb --iface eth0 --netns cp-lb1 --replace)
    """
    defines = {}
    for item in define_args:
        name, sep, value = item.partition("=")
        if not sep or not value:
            raise ConnpubError(f"bad --define {item!r}: expected NAME=VALUE, e.g. MAX_CONNS=4096")
        defines[name] = value
    loader.check_defines(defines)
    mask_rows = None
    if config_file:
        from connpub.config import load_config  # noqa: PLC0415
        from connpub.datapath.masks import mask_table  # noqa: PLC0415

        cfg = load_config(config_file)
        mask_rows = mask_table(cfg.masks.specs) if hasattr(cfg, "masks") else None
    att = loader.attach(role, iface, netns, mode, defines=defines or None,
                        default_level=default_level, mask_rows=mask_rows, replace=replace)
    if role == "lb" and not replace:
        from connpub.datapath import lbctl, lbsaved  # noqa: PLC0415

        lbctl.init_lb_maps(paths.pin_dir(iface, netns))
        saved = lbsaved.restore(iface, netns)
        if saved is not None:
            click.echo(f"restored {len(saved['vips'])} VIPs, {len(saved['backends'])} backends "
                       f"and the settings from {lbsaved.saved_path(iface, netns)}", err=True)
    click.echo(
        f"attached {role} program id {att.prog_id} on {att.name} ({att.mode}); "
        f"maps pinned in {att.pin_dir}",
        err=True,
    )


@click.command()
@click.option("--iface", required=True, help="Interface to detach from.")
@click.option("--netns", help="Network namespace of the interface.")
@click.option("--stop-agent", is_flag=True,
              help="Stop (SIGTERM, wait) the agent that uses this attachment first.")
@click.option("--force", is_flag=True,
              help="Detach an XDP program that connpub did not attach there too.")
def detach(iface, netns, stop_agent, force):
    """Detach the program and remove its pins and state. Refuses while an agent uses the
    attachment (unless --stop-agent) and for a program connpub did not attach (unless --force).
    An LB program's VIPs, backends and settings are kept in /run/connpub/lbconfig and restored
    by the next `connpub attach --role lb` on that interface.

    Example: sudo connpub detach --iface veth1 --netns srv1 --stop-agent
    """
    from connpub.agents.common import agents_using  # noqa: PLC0415
    from connpub.agents.common import stop_agent as stop  # noqa: PLC0415

    loader.check_privileges()
    where = paths.attachment_name(iface, netns)
    users = agents_using(iface, netns)
    if users and not stop_agent:
        pids = ", ".join(f"{u.get('role')} agent pid {u.get('pid')}" for u in users)
        raise ConnpubError(f"{where} is in use by the {pids}: stop it first or pass "
                           "--stop-agent")
    for user in users:
        stop(int(user["pid"]))
        click.echo(f"stopped {user.get('role')} agent pid {user.get('pid')}", err=True)
    before = loader.load_attachment(iface, netns)
    if before is not None and before.role == "lb" and (paths.pin_dir(iface, netns) /
                                                        "vips").exists():
        from connpub.datapath import lbsaved  # noqa: PLC0415

        lbsaved.save(iface, netns)
    att = loader.detach(iface, netns, force=force)
    what = (
        f"{att.role} program id {att.prog_id}" if att else "XDP program (not attached by connpub)"
    )
    click.echo(f"detached {what} from {where}", err=True)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def status(as_json):
    """Every attachment: role, mode, program, whether it is still attached, key counters; and
    every agent (alive = its pid still runs an agent).

    Example: sudo connpub status --json
    """
    loader.check_privileges()
    rows = []
    for att in loader.list_attachments():
        live_id = None
        ns_there = att.netns is None or netlink.netns_exists(att.netns)
        if ns_there and netlink.interface_exists(att.iface, att.netns):
            live_id = netlink.xdp_prog_id(att.iface, att.netns)
        row = {
            "attachment": att.name,
            "role": att.role,
            "mode": att.mode,
            "prog_id": att.prog_id,
            "attached": live_id == att.prog_id,
            "pin_dir": att.pin_dir,
        }
        try:
            stats = read_stats(att)
        except (ConnpubError, OSError):
            stats = {}
        row.update(
            {k: stats[k] for k in ("tracked", "new_flow", "forwarded", "lease_miss") if k in stats}
        )
        rows.append(row)
    from connpub.cli.agent import agent_rows  # noqa: PLC0415 - the agents' status files

    agents = agent_rows()
    if as_json:
        print_json({"attachments": rows, "agents": agents})
    elif rows:
        print_table("connpub attachments", rows)
    else:
        click.echo("no connpub program attached", err=True)
    if agents and not as_json:
        print_table("connpub agents", agents)


@click.group()
def maps():
    """Pinned maps of an attachment: list, dump, stats."""


@maps.command("list")
@with_target
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def maps_list(iface, netns, as_json):
    """Maps of an attachment with their type, sizes and occupancy.

    Example: sudo connpub maps list --iface veth1 --netns srv1
    """
    att = _pick_attachment(iface, netns)
    rows = []
    for name in MAP_LAYOUTS.get(att.role, {}):
        with _open_map(att, name) as pinned_map:
            from connpub.datapath.maps import MAP_TYPE_NAMES  # noqa: PLC0415

            entries = len(pinned_map.keys()) if pinned_map.map_type not in (2, 6) \
                else pinned_map.max_entries
            rows.append(
                {
                    "name": name,
                    "type": MAP_TYPE_NAMES.get(pinned_map.map_type, pinned_map.map_type),
                    "key_size": pinned_map.key_dtype.itemsize,
                    "value_size": pinned_map.value_dtype.itemsize,
                    "max_entries": pinned_map.max_entries,
                    "entries": entries,
                    "pin": pinned_map.path,
                }
            )
    if as_json:
        print_json({"attachment": att.name, "maps": rows})
    else:
        print_table(f"maps of {att.name} ({att.role})", rows)


# plain (unnamed) keys and values of each map get a name; *_ns names decode as times
PLAIN_NAMES: dict[str, tuple[str, str]] = {
    "agg_leases": ("key", "lease_expiry_ns"), "maglev": ("slot", "backend_id"),
    "maglev_bank": ("service", "active_bank"), "backends": ("backend_id", "value"),
    "vip_stats": ("vip_index", "value"), "backend_stats": ("backend_id", "value"),
    "vip_filter": ("slot", "vips"), "masks": ("level", "value"), "config": ("index", "value"),
    "stats": ("index", "value"),
}


def _named(records: np.ndarray, name: str) -> np.ndarray:
    if records.dtype.names:
        return records
    out = np.zeros(len(records), [(name, records.dtype, records.shape[1:])])
    out[name] = records
    return out


def _field(records: np.ndarray, name: str) -> np.ndarray | None:
    """records[...][name] for the first field called `name`, searched depth-first."""
    dtype = records.dtype
    if not dtype.names:
        return None
    if name in dtype.names:
        return records[name]
    for sub in dtype.names:
        if dtype.fields[sub][0].names:
            found = _field(records[sub], name)
            if found is not None:
                return found
    return None


def _address_match(field: np.ndarray | None, text: str, what: str) -> np.ndarray:
    if field is None:
        raise ConnpubError(f"--{what} does not apply to this map (it has no {what} address)")
    addr, _ = address_bytes(text)
    return np.all(field == addr, axis=1)


def entry_filter(keys: np.ndarray, values: np.ndarray, vip: str | None, client: str | None,
                 backend: int | None) -> np.ndarray:
    """True for entries matching every filter given (--vip ADDR[:PORT] or [V6]:PORT,
    --client ADDR, --backend ID), looked up by field name in the key, then the value."""
    keep = np.ones(len(keys), bool)

    def field(name: str):
        found = _field(keys, name)
        return found if found is not None else _field(values, name)

    if vip:
        host, port = _split_endpoint(vip)
        keep &= _address_match(field("vip_addr"), host, "vip")
        if port is not None:
            ports = field("vip_port")
            keep &= ports == port if ports is not None else False
    if client:
        keep &= _address_match(field("client_addr"), client, "client")
    if backend is not None:
        ids = field("backend_id")
        if ids is None:
            raise ConnpubError("--backend does not apply to this map (it has no backend_id)")
        keep &= ids.astype(np.int64) == backend
    return keep


def _split_endpoint(text: str) -> tuple[str, int | None]:
    """'10.0.0.1', '10.0.0.1:80', 'fd00::1', '[fd00::1]:80' -> (address, port or None)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            raise ConnpubError(f"bad --vip {text!r}: use ADDR, ADDR:PORT or [V6ADDR]:PORT")
        return host, int(port)
    return text, None


def dump_columns(att: loader.Attachment, name: str, keys: np.ndarray, values: np.ndarray,
                 now_ns: int, raw: bool) -> dict[str, list]:
    """Decoded columns of a map dump, with the names a map's plain keys and values mean."""
    key_name, value_name = PLAIN_NAMES.get(name, ("key", "value"))
    columns = entry_columns(keys, values, now_ns, raw=raw, key_name=key_name,
                            value_name=value_name)
    if name == "stats":
        names = STAT_NAMES[att.role]
        index = columns.pop("index")
        columns = {"counter": [names[i] if i < len(names) else f"stat{i}" for i in index],
                   **columns}
    elif name == "maglev" and att.role == "lb":
        from connpub.datapath.lbctl import maglev_size  # noqa: PLC0415

        size = maglev_size(Path(att.pin_dir))
        slots = np.asarray(columns.pop("slot"), np.int64)
        columns = {"service": (slots // (2 * size)).tolist(),
                   "bank": (slots // size % 2).tolist(), "slot": (slots % size).tolist(),
                   **columns}
    return columns


@maps.command("dump")
@click.argument("name")
@with_target
@click.option("--json", "as_json", is_flag=True, help="JSON (raw numbers) instead of a table.")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    help="At most this many entries (0: all).",
)
@click.option("--vip", help="Only entries of this VIP: ADDR, ADDR:PORT or [V6ADDR]:PORT.")
@click.option("--client", help="Only entries of this client address.")
@click.option("--backend", type=click.IntRange(min=0), help="Only entries of this backend id.")
@click.option("--output", "output", type=click.Choice(["auto", "table", "lines"]),
              default="auto", show_default=True,
              help=f"lines: a header, then one line per entry (for grep); auto: a table up to "
                   f"{TABLE_ROWS_MAX} entries, lines beyond.")
def maps_dump(name, iface, netns, as_json, limit, vip, client, backend, output):
    """Decoded entries of one map: tuples and addresses as text, times as signed seconds from
    now (`*_in_s` ahead, `*_ago_s` past), bytes in human units.

    Example: sudo connpub maps dump conns --netns cp-lb1 --iface eth0 --vip 10.200.0.1:80
    (every Maglev slot of backend 2, one line each: maps dump maglev --limit 0 --backend 2 ...)
    """
    att = _pick_attachment(iface, netns)
    with _open_map(att, name) as pinned_map:
        keys, values = pinned_map.items()
    values = fold_cpus(values)
    key_name, value_name = PLAIN_NAMES.get(name, ("key", "value"))
    keys, values = _named(keys, key_name), _named(values, value_name)
    if vip or client or backend is not None:
        keep = entry_filter(keys, values, vip, client, backend)
        keys, values = keys[keep], values[keep]
    total = len(keys)
    if limit and total > limit:
        keys, values = keys[:limit], values[:limit]
        click.echo(f"showing {limit} of {total} entries (--limit 0 for all)", err=True)
    now_ns = _now_ns()
    columns = dump_columns(att, name, keys, values, now_ns, raw=as_json)
    if as_json:
        print_json_rows({"attachment": att.name, "map": name, "entries": total,
                         "now_ns": now_ns}, columns)
    elif output == "lines" or (output == "auto" and len(keys) > TABLE_ROWS_MAX):
        print_lines(columns)
    else:
        print_table(f"{name} of {att.name}: {total} entries", column_rows(columns),
                    columns=list(columns))


@maps.command("stats")
@with_target
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def maps_stats(iface, netns, as_json):
    """The program's per-CPU counters summed over CPUs.

    Example: sudo connpub maps stats --netns srv1 --iface veth1 --json
    """
    att = _pick_attachment(iface, netns)
    stats = read_stats(att)
    if as_json:
        print_json({"attachment": att.name, "role": att.role, "stats": stats})
    else:
        print_table(f"stats of {att.name}", [{"counter": k, "value": v} for k, v in stats.items()])


def register(group: click.Group) -> None:
    for command in (attach, detach, status, maps):
        group.add_command(command)
