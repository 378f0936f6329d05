"""Walkthrough fixes of the CLI: flags render as flags in --help, error wording, the final ``done in`` time."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from attnlab.cli.main import app

runner = CliRunner()
COMMANDS = [[], ["report"], ["probe"], ["eval"], ["train"], ["sweep"], ["mask"], ["models", "list"], ["ls", "edits"]]
FLAGS = ("--help", "--force", "--debug", "--resume")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "attnlab")
def test_help_shows_flags_without_a_value_type(command):
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    flag_lines = [line for line in result.output.splitlines()
                  if re.search(r"│ (" + "|".join(FLAGS) + r")\b", line)]
    assert any("--help" in line for line in flag_lines)
    for line in flag_lines:
        assert not re.search(r"--(help|force|debug|resume)\s+<", line), line
