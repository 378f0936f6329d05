"""Finished variants of an eval run, saved as it goes so that ``attnlab eval --resume`` reruns only the rest.

The unit is one *variant* (the baseline, or one ``--edit``): once every rank has scored its share of a variant and
the parts are merged (:func:`attnlab.evaluation.runner.evaluate_variants`), rank 0 writes the variant's merged
outcome atomically to ``OUT/.shards/variant-NNN.json`` (:class:`VariantStore`; NNN = the variant's place, the
baseline being 000): its rows and its record exactly as the run returns them, and, for the baseline, the per-(item,
choice) scores that later variants compare with (gained / lost / McNemar), all under the run's
:func:`attnlab.shards.fingerprint` (config without device/out/force/resume, the weights' sha256 when known, and
the token ids of every window, passkey prompt and choice request). Plain JSON (NaN kept as ``NaN``), no pickle.

A run with ``resume`` reads the variant files on rank 0 and broadcasts them (so ``OUT`` need only be on rank 0's
machine), every rank skips those variants, and the results equal an uninterrupted run's: rows and records are
the saved ones, the baseline's choice scores are reassembled from its saved entries. A file of another run is a
one-line ConfigError on every rank. Without ``resume`` rank 0 removes old files first; the command removes the
folder after the results are written (:meth:`VariantStore.remove`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from attnlab.distributed import barrier, broadcast_json, world
from attnlab.errors import ConfigError
from attnlab.io_utils import SHARD_DIR, atomic_write_text

__all__ = ["VariantStore"]

PREFIX = "variant-"


def _plain(value: Any) -> Any:
    """``json.dumps``' ``default``: numpy/torch scalars and arrays as Python numbers and lists."""
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"a {type(value).__name__} cannot be saved in a variant file")


class VariantStore:
    """The variant files of an eval run under ``OUT/.shards`` (module docstring).

    Args:
        out_dir: the run's ``--out``. resume: reuse the variant files already there (``--resume``).

    Attributes:
        saved: after :meth:`open`, variant number → ``{"label", "rows", "record", "choice_entries"}`` of the
            variants an earlier try finished (empty without ``resume``), the same on every rank.
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, resume: bool = False) -> None:
        self.folder = Path(out_dir) / SHARD_DIR
        self.resume = resume
        self.fingerprint: str | None = None
        self.saved: dict[int, dict[str, Any]] = {}

    def path(self, number: int) -> Path:
        return self.folder / f"{PREFIX}{number:03d}.json"

    def open(self, run_fingerprint: str, labels: list[str]) -> None:
        """Start a run of the variants ``labels`` (baseline first), on every rank (a collective): with ``resume``
        rank 0 reads this run's variant files and every rank gets them in :attr:`saved`; without, rank 0 removes
        the old folder.

        Raises:
            ConfigError: with ``resume``, on every rank: a variant file written by another run (config, model,
                text or variants differ), an unreadable one, or files of another command (probe shards).
        """
        self.fingerprint = run_fingerprint
        found: dict[str, Any] = {"error": None, "saved": {}}
        if world().is_main:
            if self.resume:
                try:
                    found["saved"] = self._read_all(run_fingerprint, labels)
                except ConfigError as error:
                    found["error"] = str(error)
            elif self.folder.exists():
                shutil.rmtree(self.folder)
        found = broadcast_json(found, "the saved variants") if world().active else found
        if found["error"]:
            raise ConfigError(found["error"])
        self.saved = {int(number): payload for number, payload in found["saved"].items()}

    def _read_all(self, run_fingerprint: str, labels: list[str]) -> dict[str, Any]:
        saved: dict[str, Any] = {}
        if not self.folder.is_dir():
            return saved
        files = sorted(path for path in self.folder.iterdir() if not path.name.startswith("."))
        others = [path.name for path in files if not (path.name.startswith(PREFIX) and path.suffix == ".json")]
        if others:
            raise ConfigError(f"--resume: {self.folder} holds files of another kind of run ({', '.join(others[:2])}"
                              f"), not eval variants; remove it or run without --resume")
        for path in files:
            try:
                payload = json.loads(path.read_text(encoding="utf-8"))
                number = int(path.stem[len(PREFIX):])
            except (OSError, ValueError) as error:
                raise ConfigError(f"--resume: {path} is not a readable variant file ({error}); remove it") from None
            if not isinstance(payload, dict) or payload.get("fingerprint") != run_fingerprint \
                    or payload.get("variant") != number or number >= len(labels) \
                    or payload.get("label") != labels[number]:
                raise ConfigError(f"--resume: {path} was written by a different run (config, model, text or "
                                  f"variants differ); remove {self.folder} or run without --resume")
            saved[str(number)] = {key: payload.get(key) for key in ("label", "rows", "record", "choice_entries")}
        return saved

    def write(self, number: int, label: str, rows: list[dict[str, Any]], record: dict[str, Any],
              choice_entries: list[Any] | None = None) -> None:
        """Save variant ``number`` (rank 0 writes, atomically; every rank calls it: it ends with a barrier, so no
        rank starts the next variant before the file exists)."""
        if world().is_main:
            payload = {"fingerprint": self.fingerprint, "variant": number, "label": label, "rows": rows,
                       "record": record, "choice_entries": choice_entries}
            atomic_write_text(self.path(number), json.dumps(payload, default=_plain))
        barrier("the variant files")

    def remove(self) -> None:
        """Remove the folder (rank 0, after the result files are written)."""
        if world().is_main:
            shutil.rmtree(self.folder, ignore_errors=True)
