"""README.md's Commands section is the truth (issue 15): every command line there names real
commands, and every option it shows exists on the command it is shown with (no root: click
resolves the commands; running them is what the other tests do)."""

from __future__ import annotations

import itertools
from pathlib import Path

import click
from connpub.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def command_lines() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Commands"):]
    block = section[section.index("```") + 3:]
    block = block[:block.index("```")]
    lines = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    return [part.strip() for line in lines for part in line.split("; ")]


def segments(line: str) -> list[list[str]]:
    """`connpub lb a | b c` -> [[lb, a], [lb, b, c]]: each ' | ' alternative, relative to the
    group of the first one."""
    words = line.removeprefix("sudo ").split()
    assert words[0] == "connpub", line
    parts = " ".join(words[1:]).split(" | ")
    first = parts[0].split()
    out = [first]
    group = first[0]
    out += [[group, *part.split()] for part in parts[1:]]
    return out


def resolve(tokens: list[str]) -> tuple[click.Command, list[str]]:
    command: click.Command = main
    path = []
    for token in tokens:
        if not isinstance(command, click.Group) or token not in command.commands:
            break
        command = command.commands[token]
        path.append(token)
    return command, path


def test_every_readme_command_and_option_exists():
    checked = 0
    for line in command_lines():
        for tokens in segments(line):
            words = [w.strip("[]") for w in tokens]
            choices = [w.split("|") if "|" in w and not w.startswith("-") else [w]
                       for w in words]
            resolved = {}
            for expanded in itertools.product(*choices):
                command, path = resolve(list(expanded))
                if path:
                    resolved[" ".join(path)] = command
            assert resolved, (line, tokens)
            options = {w.split("=")[0] for w in words if w.startswith("--") and w != "--"}
            for path, command in resolved.items():
                assert not isinstance(command, click.Group) or not options, (line, path)
                known = {opt for param in command.params for opt in param.opts}
                known |= {opt for param in command.params for opt in param.secondary_opts}
                assert options <= known, (line, path, options - known)
                checked += 1
    assert checked >= 30
