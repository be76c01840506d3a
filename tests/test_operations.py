"""docs/operations.md and its systemd units (issue 15 item 11, no root): every unit parses,
its ExecStart runs a real connpub command with options that exist, the agents restart on
failure but not on a config error (exit 2), and every metric the page tells you to watch is
one the agents export."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from connpub.agents.metrics import exported_names
from connpub.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs"
UNITS = sorted((DOCS / "systemd").glob("*.service"))


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str
    parser.read(path)
    return parser


def connpub_commands(exec_start: str) -> list[list[str]]:
    """Every `connpub ...` invocation in an ExecStart line (also inside sh -c '... || ...')."""
    words = shlex.split(exec_start)
    if words[:2] == ["/bin/sh", "-c"]:
        words = shlex.split(words[2])
    commands, current = [], None
    for word in words:
        if word.endswith("/connpub") or word == "connpub":
            current = []
            commands.append(current)
        elif word in ("||", "&&", ";"):
            current = None
        elif current is not None:
            current.append(word.replace("%i", "eth0").replace('"$CONNPUB_ROLE"', "lb")
                           .replace("$CONNPUB_ROLE", "lb"))
    return commands


def test_units_run_real_commands_and_restart_on_failure():
    assert {u.name for u in UNITS} == {"connpub-attach@.service", "connpub-agent-lb@.service",
                                       "connpub-agent-server@.service"}
    runner = CliRunner()
    for path in UNITS:
        parsed = unit(path)
        commands = connpub_commands(parsed["Service"]["ExecStart"])
        assert commands, path
        for argv in commands:
            path_words = [w for w in argv if not w.startswith("-")][:2]
            result = runner.invoke(main, [*path_words, "--help"])
            assert result.exit_code == 0, (path.name, argv, result.output)
            for option in (w for w in argv if w.startswith("--")):
                assert option in result.output, (path.name, option)
        if path.name.startswith("connpub-agent-"):
            service = parsed["Service"]
            assert service["Restart"] == "on-failure"
            assert service["RestartPreventExitStatus"] == "2"
            assert service["KillSignal"] == "SIGTERM"
            assert parsed["Unit"]["Requires"] == "connpub-attach@%i.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_units_verify():
    for path in UNITS:
        proc = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                              text=True, timeout=60)
        problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                    if line.strip() and "is not executable" not in line]
        assert problems == [], (path.name, problems)


def test_operations_page_covers_the_procedures_and_names_real_metrics():
    page = (DOCS / "operations.md").read_text()
    for needle in ("attach --replace", "## Key rotation", "## Upgrade", "## What survives what",
                   "## Ports", "/etc/connpub/key", "0600", "--stop-agent",
                   *(u.name for u in UNITS)):
        assert needle in page, needle
    known = exported_names("lb") | exported_names("server")
    cited = set(re.findall(r"connpub_(?:lb|server)_[a-z_]+", page))
    cited = {name.removesuffix("_") for name in cited if not name.endswith("_...")}
    assert cited and cited <= known, cited - known
