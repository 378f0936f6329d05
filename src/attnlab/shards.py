"""Shards of a probe run: the unit of work that ranks share, that a run saves as it goes, and that ``--resume`` reuses.

A *shard* is one batch of windows: shard ``i`` holds windows ``i * batch_size … (i + 1) * batch_size - 1`` of the
run's text (:class:`attnlab.text.Windows`), so shard numbers depend on the text, ``--seq-len``, ``--max-windows``
and ``--batch-size`` only, never on the number of processes. Each rank runs a contiguous range of shards
(:func:`attnlab.distributed.shard_range` over the shards).

A shard's result is a *bundle*: the exported state of every probe and analysis of the run
(:meth:`attnlab.probes.base.Measurement.export_state`) as one set of tensors, keyed ``"INDEX/KEY"`` (INDEX = the
object's place in ``--probe`` order), plus JSON ``meta`` (each object's side parts and the attention paths taken).
Bundles merge in window order with the objects' own ``merge`` (:func:`merge_bundles`); nothing is pickled.

After each shard the rank writes the bundle atomically to ``OUT/.shards/shard-NNNNN.safetensors``
(:class:`ShardStore`), with the run's :func:`fingerprint`. A run with ``--resume`` reads the shard files already
there (every one must carry this run's fingerprint, else a one-line ConfigError) and computes only the missing
shards, with any number of processes; a run without ``--resume`` removes stale shard files first. Rank 0 removes
the folder after the result files are written. With several machines, ``OUT`` must be a shared folder for
``--resume`` to see every rank's shards.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from attnlab.distributed import barrier, read_state_file, world, write_state_file
from attnlab.errors import ConfigError
from attnlab.io_utils import SHARD_DIR

__all__ = ["SHARD_DIR", "Bundle", "ShardStore", "bundle_of", "fingerprint", "load_bundle", "merge_bundles",
           "merge_paths"]

FINGERPRINT_VERSION = 1

Bundle = tuple[dict[str, Tensor], dict[str, Any]]
"""``(tensors, meta)``: the exported states of a run's probes and analyses (module docstring)."""


def fingerprint(config_dict: dict[str, Any], weights_sha256: str | None, window_ids: Sequence[Sequence[int]]) -> str:
    """sha256 of everything that determines a shard's state: the run's config (``RunConfig.to_dict()`` without
    ``device``/``device_map`` (where the model runs changes floats only by rounding) and the viewer's ``pattern_heads``/``pattern_tokens``; ``out``/``force``/``resume`` are not part of
    the config), the weights' sha256 when known (None otherwise: then only the model name is compared), and the
    token ids of every window (so the text and the shard numbering are covered)."""
    ignored = {"device", "device_map", "pattern_heads", "pattern_tokens"}
    settings = {key: value for key, value in config_dict.items() if key not in ignored}
    ids = hashlib.sha256(json.dumps([list(map(int, window)) for window in window_ids]).encode()).hexdigest()
    record = {"version": FINGERPRINT_VERSION, "config": settings, "weights": weights_sha256, "windows": ids}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def bundle_of(objects: Sequence[Any], paths: dict[int, str]) -> Bundle:
    """The exported state of ``objects`` (probes and analyses, in run order) and the attention ``paths`` taken."""
    tensors: dict[str, Tensor] = {}
    sides = []
    for index, obj in enumerate(objects):
        state, side = obj.export_state()
        tensors.update({f"{index}/{key}": tensor for key, tensor in state.items()})
        sides.append(side)
    return tensors, {"names": [obj.name for obj in objects], "sides": sides,
                     "attention_paths": {str(layer): path for layer, path in paths.items()}}


def load_bundle(objects: Sequence[Any], bundle: Bundle) -> dict[int, str]:
    """Import ``bundle`` into ``objects`` (bound/prepared, same names in the same order); returns its paths.

    Raises:
        ConfigError: the bundle holds other probes (a shard of another run).
    """
    tensors, meta = bundle
    names = [obj.name for obj in objects]
    if meta.get("names") != names:
        raise ConfigError(f"a saved shard holds probes {meta.get('names')}, this run {names}")
    for index, obj in enumerate(objects):
        prefix = f"{index}/"
        obj.import_state({key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)},
                         meta["sides"][index])
    return {int(layer): path for layer, path in meta["attention_paths"].items()}


def merge_paths(mine: dict[int, str], theirs: dict[int, str]) -> dict[int, str]:
    """Attention paths of two parts of a run: a layer that took different paths reads ``"a|b"``
    (:meth:`attnlab.capture.session.Session.merge`)."""
    merged = dict(mine)
    for layer, path in theirs.items():
        current = merged.get(layer, path)
        merged[layer] = path if current == path or path in current.split("|") else f"{current}|{path}"
    return dict(sorted(merged.items()))


def merge_bundles(objects: Sequence[Any], first: Bundle | None, second: Bundle | None) -> Bundle | None:
    """The bundle of ``first``'s windows followed by ``second``'s, merged with each object's own ``merge`` on
    shallow copies of ``objects`` (the live objects keep their state). None stands for "no windows"."""
    if first is None or second is None:
        return second if first is None else first
    mine, theirs = [copy.copy(obj) for obj in objects], [copy.copy(obj) for obj in objects]
    paths = merge_paths(load_bundle(mine, first), load_bundle(theirs, second))
    for a, b in zip(mine, theirs):
        a.merge(b)
    return bundle_of(mine, paths)


class ShardStore:
    """The shard files of a run under ``OUT/.shards`` (module docstring).

    Args:
        out_dir: the run's ``--out``. resume: reuse shard files already there (``--resume``).
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, resume: bool = False) -> None:
        self.folder = Path(out_dir) / SHARD_DIR
        self.resume = resume
        self.fingerprint: str | None = None
        self.saved: set[int] = set()

    def path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.safetensors"

    def open(self, run_fingerprint: str, count: int) -> None:
        """Start a run of ``count`` shards, on every rank: with ``resume``, note the shard files of this run (their
        headers checked); without, rank 0 removes any old shard files. Ends with a barrier.

        Raises:
            ConfigError: with ``resume``, a shard file written by a different run (config, model or text) or
                numbered beyond this run's shards.
        """
        self.fingerprint = run_fingerprint
        if self.resume:
            for path in sorted(self.folder.glob("shard-*.safetensors")) if self.folder.is_dir() else []:
                number = int(path.stem.split("-")[1])
                meta = _header_meta(path)
                if meta.get("fingerprint") != run_fingerprint or meta.get("shard") != number or number >= count:
                    raise ConfigError(f"--resume: {path} was written by a different run (config, model or text "
                                      f"differ); remove {self.folder} or run without --resume")
                self.saved.add(number)
        elif world().is_main and self.folder.exists():
            shutil.rmtree(self.folder)
        barrier("the shard files")

    def has(self, shard: int) -> bool:
        """True when shard ``shard`` was saved by an earlier try of this run (``--resume``)."""
        return shard in self.saved

    def read(self, shard: int) -> Bundle:
        """The bundle of a saved shard (DistributedError if the file is not a readable state file)."""
        tensors, meta = read_state_file(self.path(shard))
        return tensors, meta["bundle"]

    def write(self, shard: int, bundle: Bundle) -> Path:
        """Save one shard's bundle atomically with the run's fingerprint."""
        tensors, meta = bundle
        return write_state_file(self.path(shard), tensors,
                                {"fingerprint": self.fingerprint, "shard": shard, "bundle": meta})

    def remove(self) -> None:
        """Remove the shard folder (rank 0, after the result files are written)."""
        if world().is_main:
            shutil.rmtree(self.folder, ignore_errors=True)


def _header_meta(path: Path) -> dict[str, Any]:
    """The ``attnlab`` meta of a shard file from its safetensors header alone (the tensors are not read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {}).get("attnlab", "{}"))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise ConfigError(f"--resume: {path} is not a readable shard file ({error}); remove it") from None
