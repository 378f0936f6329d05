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
(:class:`ShardStore`) with the run settings (:func:`run_settings`: attnlab version, config, weights) and the
shard's own window ids (:func:`windows_id`). A run with ``--resume`` reads the shard files already there and
computes only the missing shards, with any number of processes: a file written under other settings is refused
with a one-line ConfigError naming what differs (config field, weights, attnlab version); a file whose windows
differ (the last shard after ``--max-windows`` grew) is computed again, so a grown run reuses every full shard. A
run without ``--resume`` first removes old shard files (``LOCAL_RANK`` 0 of every machine).

Cleaning up: once the run succeeded (the states gathered on rank 0), every rank removes the shard files it wrote
or read, and ``LOCAL_RANK`` 0 of every machine removes the folder on its machine. So no machine keeps shard files
after a successful run, whether or not ``--out`` is shared. For ``--resume`` across *several machines*, ``OUT``
must be a folder every machine mounts (otherwise each machine sees only its own ranks' shards, and the missing
ones are computed again).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attnlab import __version__
from attnlab.distributed import read_state_file, world, write_state_file
from attnlab.errors import ConfigError
from attnlab.io_utils import SHARD_DIR

__all__ = ["SHARD_DIR", "Accumulator", "Bundle", "ShardStore", "bundle_of", "fresh_copy", "gather_bundles",
           "load_bundle", "merge_bundles", "merge_paths", "run_settings", "weights_id", "windows_id"]

FINGERPRINT_VERSION = 2

Bundle = tuple[dict[str, Tensor], dict[str, Any]]
"""``(tensors, meta)``: the exported states of a run's probes and analyses (module docstring)."""

_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    """sha256 of a file, cached by ``(path, size, mtime_ns)`` for this process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def weights_id(loaded: Any) -> dict[str, Any]:
    """What identifies a loaded model's weights (:class:`attnlab.capture.loading.LoadedModel`): its name, the
    weights' sha256 when the loader computed it (GGUF, safetensors folders), for a local folder the sha256 of its
    ``config.json`` and weight files (``*.safetensors``, ``*.bin``; cached by path, size and mtime), and for a hub
    model the commit (``config._commit_hash``)."""
    record: dict[str, Any] = {"name": loaded.facts.name, "sha256": loaded.facts.file_sha256,
                              "commit": getattr(getattr(loaded.model, "config", None), "_commit_hash", None)}
    folder = Path(loaded.loaded_from) if loaded.loaded_from else None
    if folder is not None and folder.is_dir():
        weights = () if loaded.facts.file_sha256 else (".safetensors", ".bin")
        record["files"] = {f.name: _file_sha256(f) for f in sorted(folder.iterdir())
                           if f.is_file() and (f.name == "config.json" or f.suffix in weights)}
    return record


def run_settings(config_dict: dict[str, Any], weights: dict[str, Any], compare: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Everything but the windows that determines a shard's state: the attnlab version, the run's config
    (``RunConfig.to_dict()`` without ``device``/``device_map``, where the model runs changes floats only by
    rounding, the viewer's ``pattern_heads``/``pattern_tokens``, and ``max_windows``, which only adds or drops
    shards (each shard's windows are compared on their own); ``out``/``force``/``resume`` are not part of the
    config) and the weights (:func:`weights_id`; ``compare`` for the ``--compare`` model's)."""
    ignored = {"device", "device_map", "pattern_heads", "pattern_tokens", "max_windows"}
    settings = {key: value for key, value in config_dict.items() if key not in ignored}
    return json.loads(json.dumps({"format": FINGERPRINT_VERSION, "attnlab": __version__, "config": settings,
                                  "weights": {"model": weights, "compare": compare}}, sort_keys=True, default=str))


def windows_id(window_ids: Sequence[Sequence[int]]) -> str:
    """sha256 of the token ids of one shard's windows (so text, ``--seq-len`` and numbering are covered)."""
    return hashlib.sha256(json.dumps([list(map(int, window)) for window in window_ids]).encode()).hexdigest()


def _difference(saved: dict[str, Any], settings: dict[str, Any]) -> str | None:
    """Which part of the run settings differs, in words (None: the same)."""
    if saved.get("format") != settings["format"] or saved.get("attnlab") != settings["attnlab"]:
        return f"another attnlab ({saved.get('attnlab')}, this is {settings['attnlab']})"
    if saved.get("config") != settings["config"]:
        old, new = saved.get("config") or {}, settings["config"]
        changed = [f"{key} {old.get(key)!r} → {new.get(key)!r}" for key in sorted(set(old) | set(new))
                   if old.get(key) != new.get(key)]
        return f"another config ({', '.join(changed)})"
    if saved.get("weights") != settings["weights"]:
        return "other weights (the model files changed)"
    return None


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


def load_bundle(objects: Sequence[Any], bundle: Bundle, source: str = "a saved shard") -> dict[int, str]:
    """Import ``bundle`` into ``objects`` (bound/prepared, same names in the same order); returns its paths.

    Raises:
        ConfigError: the bundle holds other probes, or states that do not fit them (``source``, e.g. a shard file
            of another run or attnlab version, is named).
    """
    tensors, meta = bundle
    names = [obj.name for obj in objects]
    if meta.get("names") != names:
        raise ConfigError(f"{source} holds probes {meta.get('names')}, this run {names}; pass --force to start over")
    for index, obj in enumerate(objects):
        prefix = f"{index}/"
        try:
            obj.import_state({key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)},
                             meta["sides"][index])
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{source} does not fit this run's {obj.name} ({str(error).splitlines()[0]}); pass "
                              "--force to start over") from None
    return {int(layer): path for layer, path in meta["attention_paths"].items()}


def merge_paths(mine: dict[int, str], theirs: dict[int, str]) -> dict[int, str]:
    """Attention paths of two parts of a run: a layer that took different paths reads ``"a|b"``
    (:meth:`attnlab.capture.session.Session.merge`)."""
    merged = dict(mine)
    for layer, path in theirs.items():
        current = merged.get(layer, path)
        merged[layer] = path if current == path or path in current.split("|") else f"{current}|{path}"
    return dict(sorted(merged.items()))


def fresh_copy(obj: Any) -> Any:
    """A deep copy of a probe or analysis (its own containers, so a merge never aliases the original's lists),
    sharing only the modules it refers to (a model is never copied)."""
    memo = {id(value): value for value in vars(obj).values() if isinstance(value, torch.nn.Module)}
    return copy.deepcopy(obj, memo)


class Accumulator:
    """This rank's running total: fresh copies of the run's objects into which each shard's bundle is merged in
    window order (one import per shard; the total is exported once, by :meth:`bundle`)."""

    def __init__(self, objects: Sequence[Any]) -> None:
        self.objects = list(objects)
        self.total: list[Any] | None = None
        self.paths: dict[int, str] = {}

    def add(self, bundle: Bundle, source: str = "a shard") -> None:
        """Merge one shard's bundle (the next in window order) into the total."""
        part = [fresh_copy(obj) for obj in self.objects]
        paths = load_bundle(part, bundle, source)
        if self.total is None:
            self.total, self.paths = part, paths
            return
        self.paths = merge_paths(self.paths, paths)
        for total, other in zip(self.total, part):
            total.merge(other)

    def bundle(self) -> Bundle | None:
        """The total as one bundle; None when no shard was added."""
        return None if self.total is None else bundle_of(self.total, self.paths)


def merge_bundles(objects: Sequence[Any], first: Bundle | None, second: Bundle | None) -> Bundle | None:
    """The bundle of ``first``'s windows followed by ``second``'s, merged with each object's own ``merge`` on
    fresh copies of ``objects`` (the live objects keep their state). None stands for "no windows"."""
    total = Accumulator(objects)
    for bundle in (first, second):
        if bundle is not None:
            total.add(bundle)
    return total.bundle()


def gather_bundles(objects: Sequence[Any], total: Bundle | None) -> Bundle | None:
    """Every rank's total (``total``: its windows' bundle, None if it had none), gathered to rank 0
    (:func:`attnlab.distributed.gather_to_main`) and merged there in rank order, which is window order because
    ranks take contiguous shard ranges. Rank 0 gets the bundle of all windows, the others None; in one process
    ``total`` is returned as is."""
    from attnlab.distributed import decode_state, encode_state, gather_to_main

    if not world().active:
        return total
    payloads = gather_to_main(encode_state(*total) if total is not None else b"", "the probe states")
    if payloads is None:
        return None
    merged = Accumulator(objects)
    for rank, payload in enumerate(payloads):
        if payload:
            merged.add(decode_state(payload), f"the states of rank {rank}")
    return merged.bundle()


SHARD_NAME = re.compile(r"^shard-(\d{5,})\.safetensors$")


class ShardStore:
    """The shard files of a run under ``OUT/.shards`` (module docstring).

    Args:
        out_dir: the run's ``--out``. resume: reuse shard files already there (``--resume``).
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, resume: bool = False) -> None:
        self.folder = Path(out_dir) / SHARD_DIR
        self.resume = resume
        self.settings: dict[str, Any] | None = None
        self.windows: list[str] = []
        self.saved: set[int] = set()
        self.touched: set[int] = set()  # the shards this rank wrote or read (it removes them at the end)

    def path(self, shard: int) -> Path:
        """The file of shard ``shard``: ``OUT/.shards/shard-NNNNN.safetensors``."""
        return self.folder / f"shard-{shard:05d}.safetensors"

    def open(self, settings: dict[str, Any], shard_windows: Sequence[str]) -> None:
        """Start a run whose shards hold the windows ``shard_windows`` (:func:`windows_id` of each shard), with
        the run settings ``settings`` (:func:`run_settings`). With ``resume``, note the shard files that hold the
        same windows under the same settings (a file whose windows differ, e.g. the last shard after
        ``--max-windows`` grew, is computed again; other files are ignored). No collective: every rank checks on
        its own (the caller agrees on errors); :meth:`clear` then removes old files when not resuming.

        Raises:
            ConfigError: with ``resume``, a shard file written under other settings (which part differs is
                named) or a file in the folder that is not a shard file.
        """
        self.settings, self.windows = settings, list(shard_windows)
        if not self.resume or not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("shard-*")):
            found = SHARD_NAME.match(path.name)
            if found is None:
                raise ConfigError(f"--resume: {path} is not a shard file (expected shard-NNNNN.safetensors); "
                                  "remove it")
            number, meta = int(found.group(1)), _header_meta(path)
            differs = _difference(meta.get("run") or {}, settings)
            if differs is not None:
                raise ConfigError(f"--resume: {path.name} was written with {differs}; pass --force to start over "
                                  "(the saved shards are discarded)")
            same = number < len(self.windows) and meta.get("windows") == self.windows[number]
            if same and meta.get("shard") == number:
                self.saved.add(number)

    def clear(self) -> None:
        """Without ``resume``: every machine's first process (``LOCAL_RANK`` 0) removes old shard files on its
        machine (on a shared ``--out`` several machines remove the same files, so what another one removed first is
        not an error); then one agreement (every rank calls it), so an error there stops every rank."""
        from attnlab.distributed import agree

        def remove_old() -> None:
            if not self.resume and world().local_rank == 0 and self.folder.exists():
                shutil.rmtree(self.folder, onerror=_unless_gone)

        agree("clearing the shard files", remove_old)

    def has(self, shard: int) -> bool:
        """True when shard ``shard`` was saved by an earlier try of this run (``--resume``)."""
        return shard in self.saved

    def read(self, shard: int) -> Bundle:
        """The bundle of a saved shard (DistributedError if the file is not a readable state file)."""
        tensors, meta = read_state_file(self.path(shard))
        self.touched.add(shard)
        return tensors, meta["bundle"]

    def write(self, shard: int, bundle: Bundle) -> Path:
        """Save one shard's bundle atomically with the run settings and the shard's windows."""
        tensors, meta = bundle
        self.touched.add(shard)
        return write_state_file(self.path(shard), tensors, {"run": self.settings, "shard": shard,
                                                            "windows": self.windows[shard], "bundle": meta})

    def remove(self) -> None:
        """After a run's results are written (``attnlab probe``/``report`` call it then), on every rank: remove the
        shard files this rank wrote or read, then every machine's first process (``LOCAL_RANK`` 0) removes the folder on its machine, so no
        machine keeps shard files whether or not ``--out`` is shared."""
        for shard in sorted(self.touched):
            self.path(shard).unlink(missing_ok=True)
        if world().local_rank == 0:
            shutil.rmtree(self.folder, ignore_errors=True)


def _unless_gone(function: Any, path: str, error: Any) -> None:
    """``shutil.rmtree``'s error handler: a file or folder another process removed first is fine; re-raise the rest."""
    if not isinstance(error[1], FileNotFoundError):
        raise error[1]


def _header_meta(path: Path) -> dict[str, Any]:
    """The ``attnlab`` meta of a shard file from its safetensors header alone (the tensors are not read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {}).get("attnlab", "{}"))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise ConfigError(f"--resume: {path} is not a readable shard file ({error}); remove it") from None
