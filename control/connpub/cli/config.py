"""`connpub config check|show`: validate a config file and print the effective config."""

from __future__ import annotations

import json
import sys

import click

from connpub.config import check_config, config_to_dict, config_to_toml
from connpub.errors import ConnpubError


def register(group: click.Group) -> None:
    group.add_command(config_group)


@click.group("config")
def config_group() -> None:
    """Check or show the connpub config file (TOML).

    Example: connpub config check /etc/connpub/connpub.toml
    """


@config_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--no-key-check", is_flag=True, help="Do not check the key file's existence/mode.")
@click.option("--json", "as_json", is_flag=True, help="Print {ok, problems} as JSON.")
def check_command(file: str, no_key_check: bool, as_json: bool) -> None:
    """Validate FILE: print OK and a summary, or one line per problem and exit 2.

    Example: connpub config check connpub.toml
    """
    cfg, problems = check_config(file, check_key_file=not no_key_check)
    if as_json:
        click.echo(json.dumps({"ok": not problems, "problems": problems}))
    elif problems:
        for problem in problems:  # problems are errors: stderr, one line each
            click.echo(f"connpub: error: {file}: {problem}", err=True)
    else:
        assert cfg is not None
        click.echo(
            f"OK {file}: mode={cfg.publish.mode} interval={cfg.publish.interval_s:g}s "
            f"mtu={cfg.publish.mtu} lease=[{cfg.lease.min_s:g}, {cfg.lease.max_s:g}]s "
            f"k={cfg.lease.k:g} order={cfg.granularity.order} "
            f"rollout={cfg.rollout.fraction:g}{' (shadow)' if cfg.rollout.shadow else ''} "
            f"server_id={cfg.agent.server_id} lbs={len(cfg.agent.lb_addresses)}"
        )
    if problems:
        sys.exit(2)


@config_group.command("show")
@click.argument("file", type=click.Path(dir_okay=False), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the config as JSON.")
def show_command(file: str | None, as_json: bool) -> None:
    """Print the effective config of FILE (or the defaults), defaults filled in.

    Example: connpub config show connpub.toml --json
    """
    cfg, problems = check_config(file, check_key_file=False)
    if problems:
        more = f" (+{len(problems) - 1} more; run `connpub config check {file}`)" \
            if len(problems) > 1 else ""
        raise ConnpubError(f"{file}: {problems[0]}{more}")
    assert cfg is not None
    click.echo(json.dumps(config_to_dict(cfg), indent=2) if as_json else config_to_toml(cfg))
