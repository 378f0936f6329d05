"""Atomic files, text or bytes: write a temporary file beside the target, fsync it, rename it into place, so a
reader sees the old file or the whole new one (the report's result files, the lab's train_log.csv and sweep
tables, the per-shard state files of :mod:`attnlab.distributed`). A failed write removes its temporary file. Also
the name of a run's shard folder (:data:`SHARD_DIR`). Stdlib only, so every tier may use it."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from attnlab.errors import ConfigError

SHARD_DIR = ".shards"
"""The folder inside a run's ``--out`` that holds its shard files until the results are written
(:mod:`attnlab.shards`; ``check_out_dir`` lets ``--resume`` into a folder that holds only it)."""

__all__ = ["SHARD_DIR", "atomic_write_bytes", "atomic_write_text", "prepare_out_dir", "write_temp"]


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


def write_temp(out_dir: Path, name: str, text: str | bytes) -> Path:
    """Write ``text`` (UTF-8, newlines as given) or bytes to a new temporary file next to ``out_dir / name``,
    fsynced; return its path. On any failure (a full disk) the temporary file is removed and the error raised."""
    temp = out_dir / f".{name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, like a normal file
    try:
        with (os.fdopen(fd, "wb") if isinstance(text, bytes)
              else os.fdopen(fd, "w", encoding="utf-8", newline="")) as handle:
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
    return _atomic_write(path, text)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a fsynced temporary file in the same directory and a rename: the old file
    stays whole until the new one is complete.

    Raises ConfigError (one line) if the directory cannot be created or written; an error while writing (a full
    disk) is raised as it is, after the temporary file is removed.
    """
    return _atomic_write(path, data)


def _atomic_write(path: str | os.PathLike[str], data: str | bytes) -> Path:
    path = Path(path)
    prepare_out_dir(path.parent)
    temp = write_temp(path.parent, path.name, data)
    try:
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {error.strerror or error}") from None
    return path
