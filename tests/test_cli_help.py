"""Every subcommand's --help names and explains each of its arguments."""

from __future__ import annotations

import argparse
import subprocess
import sys

from ivon_diag.cli import build_parser


def _parsers(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, path + (name,))


def test_every_argument_of_every_subcommand_has_help():
    missing = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"ivon-diag {' '.join(path)} {action.dest}")
    assert not missing, missing
    assert len(list(_parsers(build_parser()))) > 15  # the walk reached the nested subcommands


def test_help_of_a_nested_subcommand_as_a_process():
    out = subprocess.run([sys.executable, "-m", "ivon_diag.cli", "runs", "rename", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "the run's id" in out.stdout and "the new name" in out.stdout and "--db" in out.stdout
