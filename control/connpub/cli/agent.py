"""`connpub agent server|lb|status`: run the server or LB agent in the foreground."""

from __future__ import annotations

import logging
from collections.abc import Callable

import click

from connpub import paths
from connpub.datapath import netlink
from connpub.display import print_json, print_table
from connpub.errors import ConnpubError

log = logging.getLogger(__name__)


def register(group: click.Group) -> None:
    group.add_command(agent_group)


@click.group("agent")
def agent_group() -> None:
    """The connection-publishing agents (server side and LB side).

    Example: sudo connpub agent server --config /etc/connpub/connpub.toml --iface fab --netns srv1
    """


def _common(func):
    func = click.option("--netns", help="Network namespace to run in (the UDP socket lives "
                        "there) and of the interface.")(func)
    func = click.option("--iface", required=True,
                        help="Interface the program is attached to (names its pinned maps).")(func)
    func = click.option("--config", "config_file", required=True,
                        type=click.Path(dir_okay=False),
                        help="connpub TOML config ([publish], [lease], [agent], ...).")(func)
    return func


def _prepare(config_file: str, iface: str, netns: str | None, role: str):
    from connpub.config import load_config  # noqa: PLC0415
    from connpub.datapath.loader import check_privileges  # noqa: PLC0415
    from connpub.protocol.wire import load_key  # noqa: PLC0415

    check_privileges()
    cfg = load_config(config_file)
    key = load_key(cfg.security.key_file)
    if role == "server" and not cfg.agent.lb_addresses:
        raise ConnpubError(f"{config_file}: [agent] lb_addresses is empty: list the LB nodes' "
                           "addresses the server publishes to")
    if netns and not netlink.netns_exists(netns):
        raise ConnpubError(f"no netns {netns}: see `ip netns list`")
    from connpub.agents.common import agents_using  # noqa: PLC0415

    for other in agents_using(iface, netns):
        if other.get("role") == role:
            raise ConnpubError(f"a {role} agent (pid {other.get('pid')}) already runs on "
                               f"{paths.attachment_name(iface, netns)}: one agent per attachment")
    pin_dir = paths.pin_dir(iface, netns)
    if not pin_dir.exists():
        raise ConnpubError(f"nothing attached on {paths.attachment_name(iface, netns)} "
                           f"({pin_dir} missing): run `connpub attach` first")
    from connpub.datapath.clock import datapath_clock  # noqa: PLC0415

    datapath_clock()  # calibrate (or read the cached calibration) before serving
    return cfg, key, pin_dir


def _run(make_agent, netns: str | None, banner: str | Callable[[object], str]) -> None:
    """Create the agent in netns (binds its socket: errors come before the banner), serve until
    SIGTERM/SIGINT, then remove its status file (a stopped agent leaves none behind)."""
    from connpub.agents.common import StopFlag  # noqa: PLC0415

    stop = StopFlag()
    stop.install_signal_handlers()
    with netlink.entered(netns):
        agent = make_agent()
        click.echo(banner(agent) if callable(banner) else banner, err=True)
        try:
            agent.run(stop)
        finally:
            agent.close()
            agent.status_file.unlink(missing_ok=True)


@agent_group.command("server")
@_common
def server_command(config_file: str, iface: str, netns: str | None) -> None:
    """Publish this server's flows to the LB agents every [publish] interval_s; apply their
    DIRECTIVEs; record finished flows. Stops on SIGTERM/SIGINT.

    Example: sudo connpub agent server --config lab.toml --iface fab --netns cp-srv1
    """
    from connpub.agents.server import ServerAgent  # noqa: PLC0415

    cfg, key, pin_dir = _prepare(config_file, iface, netns, "server")
    banner = (f"server agent {cfg.agent.server_id} on {paths.attachment_name(iface, netns)}: "
              f"{cfg.publish.mode}, every {cfg.publish.interval_s:g}s to "
              f"{', '.join(cfg.agent.lb_addresses)}")
    _run(lambda: ServerAgent(cfg, pin_dir, key=key, iface=iface, netns=netns), netns, banner)


@agent_group.command("lb")
@_common
def lb_command(config_file: str, iface: str, netns: str | None) -> None:
    """Apply the servers' PUBLISH packets as leases, decide granularity per VIP and send
    DIRECTIVEs; ask every server for a resync at start. Stops on SIGTERM/SIGINT.

    Example: sudo connpub agent lb --config lab.toml --iface eth0 --netns cp-lb1
    """
    from connpub.agents.lb import LbAgent  # noqa: PLC0415

    cfg, key, pin_dir = _prepare(config_file, iface, netns, "lb")

    def banner(agent) -> str:
        host, port = agent.socket.sock.getsockname()[:2]
        return (f"LB agent {cfg.agent.server_id} on {paths.attachment_name(iface, netns)}: "
                f"{cfg.publish.mode}, listening on UDP {host}:{port}")

    _run(lambda: LbAgent(cfg, pin_dir, key=key, iface=iface, netns=netns), netns, banner)


def agent_rows() -> list[dict]:
    """One summary row per agent status file (for `connpub status` and `agent status`)."""
    from connpub.agents.common import read_statuses  # noqa: PLC0415

    rows = []
    for status in read_statuses():
        totals = status.get("totals", {})

        def total(prefix: str, direction: str | None = None, _totals=totals) -> int:
            return int(sum(v for k, v in _totals.items() if k.startswith(prefix)
                           and (direction is None or f"direction={direction}" in k)))

        model = (status.get("predictive") or {}).get("model") or {}
        rows.append({
            "agent": f"{status.get('role')} {status.get('netns') or 'root'}/{status.get('iface')}",
            "pid": status.get("pid"), "alive": status.get("alive"), "mode": status.get("mode"),
            "publish_pkts_sent": total("publish_packets", "sent"),
            "publish_pkts_received": total("publish_packets", "received"),
            "publish_bytes": total("publish_bytes"),
            "entries_applied": total("entries_applied"),
            "rejected": total("rejected"),
            "directives": total("directives"),
            "lease_misses": status.get("lease_misses_since_start", ""),
            "model": f"v{model['version']} {model.get('model_id', '')}" if model else "",
        })
    return rows


@agent_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Full status files as JSON.")
def status_command(as_json: bool) -> None:
    """The agents' status files (/run/connpub/agents/): counters, last cycle, class levels.

    Example: connpub agent status --json
    """
    from connpub.agents.common import read_statuses  # noqa: PLC0415

    if as_json:
        print_json({"agents": read_statuses()})
        return
    rows = agent_rows()
    if rows:
        print_table("connpub agents", rows)
    else:
        click.echo("no agent status files", err=True)
