"""Shared assertions of the CLI tests."""

from __future__ import annotations


def assert_one_line_error(result, code, *fragments):
    """The command exited with ``code`` and printed exactly one ``error:`` line containing every fragment."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
