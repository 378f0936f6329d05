"""The README runs as written: its ``bash`` and ``python`` blocks are executed in order, in one scratch folder.

Every fenced ``bash`` or ``python`` block of README.md is a test, run in README order in one shared scratch
directory (so a later block may read what an earlier one wrote, as a reader following the README would). The
scratch directory holds a link to the repository's ``examples/`` folder, and the ``attnlab`` on PATH is this
interpreter's. A comment line right before a block changes what happens to it:

- ``<!-- readme-test: skip (why) -->``: never run (e.g. ``git clone``, ``make test`` itself);
- ``<!-- readme-test: slow (about N min) -->``: run only with ``ATTNLAB_README_ALL=1``.

``bash`` blocks run under ``set -euo pipefail``; ``python`` blocks are separate processes, so each must stand
alone. A block that fails shows its stderr tail. Run every block, slow ones too, with
``ATTNLAB_README_ALL=1 python -m pytest tests/test_readme.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARK = re.compile(r"<!--\s*readme-test:\s*(skip|slow)\b(.*?)-->")
RUN_ALL = os.environ.get("ATTNLAB_README_ALL", "") not in ("", "0")


@dataclass(frozen=True)
class Block:
    """One fenced block of the README: its language, first line number, text and marker (None, skip or slow)."""

    language: str
    line: int
    text: str
    mark: str | None
    why: str

    @property
    def id(self) -> str:
        return f"{self.language}@{self.line}"


def readme_blocks(text: str) -> list[Block]:
    """The ``bash``/``python`` fenced blocks of ``text`` with the readme-test marker of the line before each."""
    blocks, lines = [], text.splitlines()
    index, previous = 0, ""
    while index < len(lines):
        line = lines[index]
        fence = re.match(r"^```(\w*)\s*$", line)
        if not fence:
            if line.strip():
                previous = line
            index += 1
            continue
        language, start = fence.group(1), index + 1
        end = next(i for i in range(start, len(lines)) if lines[i].startswith("```"))
        mark = MARK.search(previous)
        if language in ("bash", "python"):
            blocks.append(Block(language, start + 1, "\n".join(lines[start:end]) + "\n",
                                mark.group(1) if mark else None, mark.group(2).strip(" ()—-") if mark else ""))
        index, previous = end + 1, ""
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    (folder / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    return folder


def test_readme_has_blocks() -> None:
    assert sum(block.language == "bash" for block in BLOCKS) >= 5
    assert sum(block.language == "python" for block in BLOCKS) >= 3


def test_readme_has_no_placeholders() -> None:
    """Nothing a newcomer has to invent: no ``<this repo>``, ``path/to/…``, ``my.txt`` or YAML that is not shipped."""
    text = README.read_text(encoding="utf-8")
    for placeholder in ("<this repo>", "path/to/", "my.txt"):
        assert placeholder not in text, placeholder
    for pattern in (r"(?<![\w/])(?:prose|verse)\.txt\b", r"(?<![\w/])run\.yaml\b"):  # only the shipped examples/ files
        assert not re.search(pattern, text), pattern
    prose = re.sub(r"```.*?```", "", text, flags=re.S)  # outside code blocks: no template tokens left in
    assert not re.findall(r"\b[A-Z]+_[A-Z_]+\b", re.sub(r"`[^`]*`", "", prose))
    for name in re.findall(r"(examples/[\w./-]+\.(?:txt|yaml|py))", text):
        assert (ROOT / name).is_file(), f"README names {name}, which is not in the repository"


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_readme_block_runs(block: Block, scratch: Path) -> None:
    if block.mark == "skip":
        pytest.skip(f"marked skip: {block.why}")
    if block.mark == "slow" and not RUN_ALL:
        pytest.skip(f"slow ({block.why}); ATTNLAB_README_ALL=1 runs it")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONUNBUFFERED": "1"}
    if block.language == "bash":
        command = ["bash", "-c", "set -euo pipefail\n" + block.text]
    else:
        script = scratch / f"block_{block.line}.py"
        script.write_text(block.text, encoding="utf-8")
        command = [sys.executable, str(script)]
    done = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, (f"README block at line {block.line} failed (exit {done.returncode}):\n"
                                  f"{block.text}\n--- stderr (tail) ---\n{done.stderr[-3000:]}")
