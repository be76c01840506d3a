"""`connpub lb vip|backend|config|stats`: VIPs, backends and settings of an attached LB program."""

from __future__ import annotations

from pathlib import Path

import click

from connpub import paths
from connpub.datapath import lbctl
from connpub.display import print_json, print_table
from connpub.errors import ConnpubError


def register(group: click.Group) -> None:
    group.add_command(lb_group)


def _where(func):
    func = click.option("--netns", help="Network namespace of the interface (default: root).")(func)
    return click.option("--iface", required=True, help="Interface the LB program is attached to.")(
        func)


def _pin_dir(iface: str, netns: str | None) -> Path:
    pin_dir = paths.pin_dir(iface, netns)
    if not (pin_dir / "vips").exists():
        raise ConnpubError(f"no LB program attached on {paths.attachment_name(iface, netns)}: "
                           f"run `connpub attach --role lb --iface {iface}"
                           f"{f' --netns {netns}' if netns else ''}` first")
    return pin_dir


def _save(iface: str, netns: str | None) -> None:
    """Keep the operator's configuration for a re-attach (datapath/lbsaved.py)."""
    from connpub.datapath import lbsaved  # noqa: PLC0415

    lbsaved.save(iface, netns)


@click.group("lb")
def lb_group() -> None:
    """VIPs, backends and settings of an LB-node program.

    Example: sudo connpub lb vip add 10.200.0.1 80 tcp --iface eth0 --netns cp-lb1
    """


@lb_group.group("vip")
def vip_group() -> None:
    """Add, delete or list VIPs (address, port, protocol -> service).

    Example: sudo connpub lb vip list --iface eth0 --netns cp-lb1
    """


@vip_group.command("add")
@click.argument("address")
@click.argument("port", type=click.IntRange(1, 65535))
@click.argument("proto", type=click.Choice(["tcp", "udp"]))
@click.option("--service", type=click.IntRange(min=0), default=0, show_default=True,
              help="Service (Maglev table / backend set) of the VIP.")
@click.option("--client-affinity", is_flag=True,
              help="Hash the client address only: one client -> one backend.")
@_where
def vip_add(address, port, proto, service, client_affinity, iface, netns):
    """Add a VIP served by a service's backends.

    Example: sudo connpub lb vip add fd00:200::1 80 tcp --service 0 --iface eth0 --netns cp-lb1
    """
    flags = lbctl.VIP_F_HASH_CLIENT_ONLY if client_affinity else 0
    index = lbctl.add_vip(_pin_dir(iface, netns), address, port, proto, service, flags)
    _save(iface, netns)
    click.echo(f"added VIP {address} {port}/{proto} -> service {service} (stats slot {index})",
               err=True)


@vip_group.command("del")
@click.argument("address")
@click.argument("port", type=click.IntRange(1, 65535))
@click.argument("proto", type=click.Choice(["tcp", "udp"]))
@_where
def vip_del(address, port, proto, iface, netns):
    """Delete a VIP and its connections.

    Example: sudo connpub lb vip del 10.200.0.1 80 tcp --iface eth0 --netns cp-lb1
    """
    removed = lbctl.del_vip(_pin_dir(iface, netns), address, port, proto)
    _save(iface, netns)
    click.echo(f"deleted VIP {address} {port}/{proto} and {removed} connections", err=True)


@vip_group.command("list")
@_where
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def vip_list(iface, netns, as_json):
    """VIPs with their service, level and counters.

    Example: sudo connpub lb vip list --iface eth0 --netns cp-lb1 --json
    """
    rows = lbctl.list_vips(_pin_dir(iface, netns))
    if as_json:
        print_json(rows)
    else:
        print_table("VIPs", rows)


@lb_group.group("backend")
def backend_group() -> None:
    """Add, delete, drain or list backends (Maglev tables are rebuilt and swapped atomically).

    Example: sudo connpub lb backend list --iface eth0 --netns cp-lb1
    """


@backend_group.command("add")
@click.argument("backend_id", type=click.IntRange(min=1))
@click.argument("address")
@click.option("--service", "services", type=click.IntRange(min=0), multiple=True,
              help="Service(s) the backend serves (repeatable; default 0).")
@click.option("--mac", help="Next-hop MAC of the backend (default: the gateway MAC).")
@_where
def backend_add(backend_id, address, services, mac, iface, netns):
    """Add backend ID (the server's id) at ADDRESS, the outer destination of its tunnel.

    Example: sudo connpub lb backend add 1 10.103.0.101 --mac 02:00:00:00:01:01 --iface eth0
    """
    lbctl.add_backend(_pin_dir(iface, netns), backend_id, address, services or (0,), mac)
    _save(iface, netns)
    click.echo(f"added backend {backend_id} {address}", err=True)


@backend_group.command("del")
@click.argument("backend_id", type=click.IntRange(min=1))
@_where
def backend_del(backend_id, iface, netns):
    """Remove a backend; its flows are re-picked on their next packet.

    Example: sudo connpub lb backend del 2 --iface eth0 --netns cp-lb1
    """
    lbctl.del_backend(_pin_dir(iface, netns), backend_id)
    _save(iface, netns)
    click.echo(f"deleted backend {backend_id}", err=True)


@backend_group.command("drain")
@click.argument("backend_id", type=click.IntRange(min=1))
@click.option("--undo", is_flag=True, help="Stop draining: the backend takes new flows again.")
@_where
def backend_drain(backend_id, undo, iface, netns):
    """Drain a backend: no new flows; flows holding a lease on it stay.

    Example: sudo connpub lb backend drain 2 --iface eth0 --netns cp-lb1
    """
    lbctl.drain_backend(_pin_dir(iface, netns), backend_id, draining=not undo)
    _save(iface, netns)
    click.echo(f"backend {backend_id} {'takes new flows again' if undo else 'draining'}", err=True)


@backend_group.command("list")
@_where
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def backend_list(iface, netns, as_json):
    """Backends with their state, Maglev share and counters.

    Example: sudo connpub lb backend list --iface eth0 --netns cp-lb1
    """
    rows = lbctl.list_backends(_pin_dir(iface, netns))
    if as_json:
        print_json(rows)
    else:
        print_table("backends", [{**row, "services": ",".join(map(str, row["services"])),
                                  "maglev_share": " ".join(f"{k}:{v:.4f}" for k, v in
                                                           row["maglev_share"].items())}
                                 for row in rows])


@lb_group.group("config")
def config_group() -> None:
    """Show or change the LB program's settings (tunnel source, MACs, MTU, initial lease).

    Example: sudo connpub lb config show --iface eth0 --netns cp-lb1
    """


@config_group.command("show")
@_where
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def config_show(iface, netns, as_json):
    """The settings in the config map.

    Example: sudo connpub lb config show --iface eth0 --netns cp-lb1 --json
    """
    cfg = lbctl.config_dict(lbctl.read_config(_pin_dir(iface, netns)))
    if as_json:
        print_json(cfg)
    else:
        print_table("LB config", [{"setting": k, "value": v} for k, v in cfg.items()])


@config_group.command("set")
@click.option("--lb-addr4", help="Outer IPv4 source of tunnels.")
@click.option("--lb-addr6", help="Outer IPv6 source of tunnels.")
@click.option("--src-mac", help="Ethernet source of forwarded frames.")
@click.option("--gateway-mac", help="Ethernet destination for backends without a MAC.")
@click.option("--mtu", type=int, help="Largest encapsulated IP packet (bigger: dropped, counted).")
@click.option("--initial-lease-s", type=float, help="Lease of a flow the LB has just placed.")
@click.option("--close-linger-s", type=float,
              help="Lease left to a flow after its client's FIN/RST.")
@click.option("--redirect-iface",
              help="Send out of this interface (XDP_REDIRECT); '' = back out (XDP_TX).")
@_where
@click.option("--json", "as_json", is_flag=True, help="Print the new config as JSON.")
def config_set(lb_addr4, lb_addr6, src_mac, gateway_mac, mtu, initial_lease_s, close_linger_s,
               redirect_iface,
               iface, netns, as_json):
    """Change some settings; the others keep their value.

    Example: sudo connpub lb config set --gateway-mac 02:00:00:00:00:fe --iface eth0 --netns cp-lb1
    """
    cfg = lbctl.set_config(_pin_dir(iface, netns), lb_addr4=lb_addr4, lb_addr6=lb_addr6,
                           src_mac=src_mac, gateway_mac=gateway_mac, mtu=mtu,
                           initial_lease_s=initial_lease_s, close_linger_s=close_linger_s,
                           redirect_iface=redirect_iface,
                           netns=netns)
    _save(iface, netns)
    if as_json:
        print_json(cfg)
    else:
        print_table("LB config", [{"setting": k, "value": v} for k, v in cfg.items()])


@lb_group.command("stats")
@_where
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def stats(iface, netns, as_json):
    """Global counters: outcomes (one per packet) and events (lease hits, misses, ...).

    Example: sudo connpub lb stats --iface eth0 --netns cp-lb1 --json
    """
    counters = lbctl.read_stats(_pin_dir(iface, netns))
    if as_json:
        print_json(counters)
    else:
        print_table("LB counters", [{"counter": k, "value": v} for k, v in counters.items()])


def _vip_name(row: dict) -> str:
    host = f"[{row['vip']}]" if ":" in row["vip"] else row["vip"]
    return f"{host}:{row['port']}/{row['proto']}"


def maglev_rows(pin_dir: Path, services: list[int]) -> list[dict]:
    """Per service: table size, active bank and slots per backend id of the active table."""
    import numpy as np  # noqa: PLC0415

    rows = []
    for service in services:
        table = lbctl.maglev_table(pin_dir, service)
        with lbctl.open_map(pin_dir, "maglev_bank") as banks:
            bank = int(banks.lookup(np.array(service, "<u4"))) & 1
        ids, counts = np.unique(table[table != 0], return_counts=True)
        rows.append({"service": service, "size": len(table), "active_bank": bank,
                     "slots": {str(int(i)): int(c) for i, c in zip(ids, counts, strict=True)}})
    return rows


def _used_services(vips: list[dict], backends: list[dict]) -> list[int]:
    return sorted({row["service"] for row in vips} |
                  {s for row in backends for s in row["services"]})


@lb_group.command("list")
@_where
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def service_list(iface, netns, as_json):
    """One line per service: its VIPs, the backends taking new flows, the draining ones.

    Example: sudo connpub lb list --iface eth0 --netns cp-lb1
    """
    pin_dir = _pin_dir(iface, netns)
    vips, backends = lbctl.list_vips(pin_dir), lbctl.list_backends(pin_dir)
    rows = []
    for service in _used_services(vips, backends):
        members = [b for b in backends if service in b["services"]]
        rows.append({
            "service": service,
            "vips": [_vip_name(v) for v in vips if v["service"] == service],
            "backends": [b["id"] for b in members if not b["draining"]],
            "draining": [b["id"] for b in members if b["draining"]],
            "new_flows": sum(v["new_flows"] for v in vips if v["service"] == service),
            "lease_misses": sum(v["lease_misses"] for v in vips if v["service"] == service),
        })
    if as_json:
        print_json(rows)
    else:
        print_table("services", [{**row, **{k: " ".join(map(str, row[k])) or "-"
                                            for k in ("vips", "backends", "draining")}}
                                 for row in rows])


@lb_group.group("maglev")
def maglev_group() -> None:
    """The services' Maglev tables.

    Example: sudo connpub lb maglev list --iface eth0 --netns cp-lb1
    """


@maglev_group.command("list")
@_where
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def maglev_list(iface, netns, as_json):
    """One line per service: table size, active bank, slots per backend (the full table:
    `connpub maps dump maglev --limit 0 --backend ID`).

    Example: sudo connpub lb maglev list --iface eth0 --netns cp-lb1 --json
    """
    pin_dir = _pin_dir(iface, netns)
    services = _used_services(lbctl.list_vips(pin_dir), lbctl.list_backends(pin_dir))
    rows = maglev_rows(pin_dir, services)
    if as_json:
        print_json(rows)
    else:
        print_table("Maglev tables", [{**row, "slots": " ".join(f"{k}:{v}" for k, v in
                                                                row["slots"].items()) or "-"}
                                      for row in rows])
