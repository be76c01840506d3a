"""`connpub attach|detach|status|maps`: the XDP programs on interfaces and their pinned maps."""

from __future__ import annotations

import click

from connpub import paths
from connpub.datapath import loader, netlink, pinned
from connpub.datapath.abi import MAP_LAYOUTS
from connpub.datapath.maps import PinnedMap, fold_cpus
from connpub.display import entry_rows, print_json, print_table
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
    mask_rows = None
    if config_file:
        from connpub.config import load_config  # noqa: PLC0415
        from connpub.datapath.masks import mask_table  # noqa: PLC0415

        cfg = load_config(config_file)
        mask_rows = mask_table(cfg.masks.specs) if hasattr(cfg, "masks") else None
    att = loader.attach(role, iface, netns, mode, defines=defines or None,
                        default_level=default_level, mask_rows=mask_rows, replace=replace)
    if role == "lb" and not replace:
        from connpub.datapath import lbctl  # noqa: PLC0415

        if hasattr(lbctl, "init_lb_maps"):
            lbctl.init_lb_maps(paths.pin_dir(iface, netns))
    click.echo(
        f"attached {role} program id {att.prog_id} on {att.name} ({att.mode}); "
        f"maps pinned in {att.pin_dir}",
        err=True,
    )


@click.command()
@click.option("--iface", required=True, help="Interface to detach from.")
@click.option("--netns", help="Network namespace of the interface.")
def detach(iface, netns):
    """Detach the program and remove its pins and state.

    Example: sudo connpub detach --iface veth1 --netns srv1
    """
    att = loader.detach(iface, netns)
    what = (
        f"{att.role} program id {att.prog_id}" if att else "XDP program (not attached by connpub)"
    )
    click.echo(f"detached {what} from {paths.attachment_name(iface, netns)}", err=True)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def status(as_json):
    """Every attachment: role, mode, program, whether it is still attached, key counters.

    Example: sudo connpub status --json
    """
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
        except ConnpubError:
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
        with _open_map(att, name) as pinned:
            from connpub.datapath.maps import MAP_TYPE_NAMES  # noqa: PLC0415

            entries = len(pinned.keys()) if pinned.map_type not in (2, 6) else pinned.max_entries
            rows.append(
                {
                    "name": name,
                    "type": MAP_TYPE_NAMES.get(pinned.map_type, pinned.map_type),
                    "key_size": pinned.key_dtype.itemsize,
                    "value_size": pinned.value_dtype.itemsize,
                    "max_entries": pinned.max_entries,
                    "entries": entries,
                    "pin": pinned.path,
                }
            )
    if as_json:
        print_json({"attachment": att.name, "maps": rows})
    else:
        print_table(f"maps of {att.name} ({att.role})", rows)


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
def maps_dump(name, iface, netns, as_json, limit):
    """Decoded entries of one map: tuples as text, timestamps as ages, bytes in human units.

    Example: sudo connpub maps dump flows --netns srv1 --iface veth1 --limit 20
    """
    att = _pick_attachment(iface, netns)
    with _open_map(att, name) as pinned:
        keys, values = pinned.items()
    total = len(keys)
    if limit and total > limit:
        keys, values = keys[:limit], values[:limit]
        click.echo(f"showing {limit} of {total} entries (--limit 0 for all)", err=True)
    values = fold_cpus(values)
    now_ns = _now_ns()
    rows = entry_rows(keys, values, now_ns, raw=as_json)
    if as_json:
        print_json(
            {"attachment": att.name, "map": name, "entries": total, "now_ns": now_ns, "rows": rows}
        )
    else:
        print_table(f"{name} of {att.name}: {total} entries", rows)


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
