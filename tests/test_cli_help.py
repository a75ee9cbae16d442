"""Every option of every command says what it does and shows its default."""
from __future__ import annotations

import argparse

import pytest

from tplab import cli


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    for command in cli.COMMANDS:
        command.register(subparsers)
    return dict(subparsers.choices)


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_option_has_help_that_shows_its_default(name, capsys):
    sub = subcommands()[name]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{name} {action.option_strings[0]} has no help text"
    with pytest.raises(SystemExit):
        cli.main([name, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for action in sub._actions:
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS) and action.dest != "help":
            shown = ",".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
            assert "default" in " ".join(action.help.split()) or f"(default: {shown})" in text, \
                f"{name} {action.option_strings[0]}: default {shown} not shown"
