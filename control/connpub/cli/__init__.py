"""The `connpub` command: one click group; each area registers its commands from its own module."""

from __future__ import annotations

import importlib
import logging
import sys

import click

from connpub.errors import ConnpubError

# Modules under connpub.cli that each define `register(group)`. Order is the help order.
COMMAND_MODULES = (
    "datapath",  # attach, detach, status, maps
    "lb",  # lb vip/backend
    "lab",  # lab up/down/status/run
    "labreplay",  # lab replay
    "agent",  # agent server/lb
    "config",  # config check/show
    "model",  # model train/eval/info, trace generate/from-pcap/show
    "trace",  # trace replicate/merge/shift
    "sim",  # sim, tune, trace
    "bench",  # bench xdp/control/fuzz
    "demo",  # demo: the README's main job
)


class ConnpubGroup(click.Group):
    """A group that turns ConnpubError and click's usage errors into one line on stderr and
    exit status 2 (click's own format is usage + hint + blank + error: four lines)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ConnpubError as err:
            click.echo(f"connpub: error: {err}", err=True)
            sys.exit(2)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            result = super().main(args, prog_name or "connpub", complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as err:  # a bare group: its help, as click
            click.echo(err.ctx.get_help() if err.ctx is not None else str(err))
            sys.exit(0)
        except click.UsageError as err:
            path = err.ctx.command_path if err.ctx is not None else "connpub"
            message = " ".join(err.format_message().split())
            click.echo(f"connpub: error: {message} (see `{path} --help`)", err=True)
            sys.exit(2)
        except click.ClickException as err:
            click.echo(f"connpub: error: {' '.join(err.format_message().split())}", err=True)
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("connpub: aborted", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)


@click.group(cls=ConnpubGroup)
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-vv for debug).")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """connpub: connection publishing for an XDP L4 load balancer.

    Example: sudo connpub attach --role server --iface eth1 --netns srv1
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    ctx.ensure_object(dict)


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"connpub.cli.{_name}")
    except ModuleNotFoundError as _err:  # an area not built yet in this checkout
        if _err.name != f"connpub.cli.{_name}":
            raise
        continue
    _module.register(main)
