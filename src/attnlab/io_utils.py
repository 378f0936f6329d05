"""Atomic text files: write beside the target, fsync, rename into place. Stdlib only, so every tier may use it
(the report's result files, the lab's train_log.csv and sweep tables)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from attnlab.errors import ConfigError

SHARD_DIR = ".shards"
"""The folder inside a run's ``--out`` that holds its shard files until the results are written
(:mod:`attnlab.shards`; ``check_out_dir`` lets ``--resume`` into a folder that holds only it)."""

__all__ = ["atomic_write_text", "prepare_out_dir", "write_temp"]


def prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and check it is a writable directory; ConfigError (one line) if not."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot write results to {out_dir}: {error.strerror or error}") from None
    if not out_dir.is_dir():
        raise ConfigError(f"cannot write results to {out_dir}: Not a directory")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write results to {out_dir}: Permission denied")


def write_temp(out_dir: Path, name: str, text: str) -> Path:
    """Write ``text`` to a new temporary file next to ``out_dir / name``; return its path."""
    temp = out_dir / f".{name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, like a normal file
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename.

    Raises ConfigError (one line) if the directory cannot be created or written.
    """
    path = Path(path)
    prepare_out_dir(path.parent)
    temp = write_temp(path.parent, path.name, text)
    try:
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {error.strerror or error}") from None
    return path
