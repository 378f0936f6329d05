"""Training checkpoints without pickle: ``out/checkpoint/`` holds everything a run needs to continue bit for bit.

Layout of a checkpoint directory::

    config.json, model.safetensors        the TinyLM (``save_pretrained``); attnlab.load_model(dir) reads it
    tokenizer.json, tokenizer_config.json the task's tokenizer (``save_pretrained``)
    trainer_state.safetensors             the optimizer state, one named tensor per (parameter, state key):
                                          ``state.{index}.{key}`` (index = position across the optimizer's
                                          param groups, as ``optimizer.state_dict()`` numbers them: the
                                          matrices' group first, then norms and biases; AdamW: ``step``,
                                          ``exp_avg``, ``exp_avg_sq``)
    trainer_state.json                    step, stopped_early, the optimizer's param groups (hyperparameters and
                                          parameter indices), the TrainConfig, the log and probe rows so far,
                                          seconds trained; plain JSON

A checkpoint is written to a temporary directory beside the target and renamed into place; the previous one is
moved aside to ``.checkpoint.*.old`` first (and moved back if the rename fails) and deleted after the rename. A crash
between the two renames leaves only the ``.old`` directory, which :func:`read_state` (via :func:`find_checkpoint`)
falls back to; so a resume sees either the old or the new checkpoint, never a mixture. A process killed while
filling the temporary directory leaves it (``.checkpoint.*.tmp``, never read); the next write removes it.

Under several processes (``torchrun``) rank 0 alone writes the checkpoint while the other ranks wait at a barrier
(:mod:`attnlab.lab.train`); the replicas are equal, and the batches depend on the step alone, so a checkpoint
resumes on any number of processes (the global batch must divide by it).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from attnlab.capture.loading import no_hf_progress_bars
from attnlab.errors import ConfigError

__all__ = ["CHECKPOINT", "STATE_JSON", "STATE_TENSORS", "find_checkpoint", "optimizer_state", "replace_dir",
           "read_state", "restore_optimizer", "write_checkpoint"]

CHECKPOINT = "checkpoint"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
FORMAT = 1


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The optimizer's ``state_dict()`` as ``({"state.{index}.{key}": tensor}, param_groups)``.

    Non-tensor state values (none for AdamW/SGD in current torch) are stored as 0-d float64 tensors and marked in
    the group list under ``"scalar_state"``, so nothing is lost or pickled.
    """
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: list[str] = []
    for index, state in state_dict["state"].items():
        for key, value in state.items():
            name = f"state.{index}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().contiguous().clone()
            elif value is not None:
                tensors[name] = torch.tensor(float(value), dtype=torch.float64)
                scalars.append(name)
    groups = [{**group, "params": list(group["params"])} for group in state_dict["param_groups"]]
    if scalars:
        groups[0] = {**groups[0], "scalar_state": scalars}
    return tensors, groups


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      groups: list[dict[str, Any]]) -> None:
    """Load what :func:`optimizer_state` produced into ``optimizer`` (same parameters, same order).

    Raises ConfigError when the groups do not match the optimizer's (another optimizer or model shape).
    """
    current = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in current] != [len(g["params"]) for g in groups]:
        raise ConfigError(f"checkpoint optimizer has parameter groups of sizes {[len(g['params']) for g in groups]}, "
                          f"this model's has {[len(g['params']) for g in current]}")
    scalars = set(groups[0].get("scalar_state", ())) if groups else set()
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor.item() if name in scalars else tensor
    clean = []
    for group in groups:
        group = {key: value for key, value in group.items() if key != "scalar_state"}
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        clean.append(group)
    optimizer.load_state_dict({"state": state, "param_groups": clean})


def write_checkpoint(out_dir: Path, model: Any, tokenizer: Any, optimizer: torch.optim.Optimizer,
                     state: dict[str, Any]) -> Path:
    """Write ``out_dir/checkpoint`` (layout in the module docstring) through a temporary directory; return it.

    ``state`` is the JSON part (step, config, log ...); the optimizer's param groups are added to it.
    """
    def fill(temp: Path) -> None:
        with no_hf_progress_bars():  # no "Writing model shards" bar at every checkpoint
            model.save_pretrained(temp, safe_serialization=True)
            tokenizer.save_pretrained(temp)
        tensors, groups = optimizer_state(optimizer)
        save_file(tensors, str(temp / STATE_TENSORS), metadata={"format": str(FORMAT)})
        text = json.dumps({"format": FORMAT, **state, "param_groups": groups}, indent=1, allow_nan=True)
        (temp / STATE_JSON).write_text(text + "\n", encoding="utf-8")

    return replace_dir(out_dir, CHECKPOINT, fill)


def replace_dir(out_dir: Path, name: str, fill: Callable[[Path], None]) -> Path:
    """Write the directory ``out_dir/name`` atomically: ``fill(temp)`` fills a temporary directory beside it, the
    previous one is moved aside to ``.NAME.*.old`` (and moved back if the rename fails), the temporary one is
    renamed into place and the old one deleted. Returns ``out_dir/name``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / name
    temp = out_dir / f".{name}.{secrets.token_hex(6)}.tmp"
    try:
        temp.mkdir()
        fill(temp)
        old = None
        if target.exists():
            old = out_dir / f".{name}.{secrets.token_hex(6)}.old"
            os.replace(target, old)
        try:
            os.replace(temp, target)
        except BaseException:
            if old is not None and not target.exists():
                os.replace(old, target)  # put the previous directory back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        for pattern in (f".{name}.*.old", f".{name}.*.tmp"):  # from an earlier crash (between the renames, or
            for leftover in out_dir.glob(pattern):           # a process killed while filling its temp directory)
                shutil.rmtree(leftover, ignore_errors=True)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return target


def find_checkpoint(checkpoint: Path) -> Path:
    """``checkpoint`` if it exists, else the newest ``.checkpoint.*.old`` beside it (left by a crash between the two
    renames of :func:`write_checkpoint`), else ``checkpoint`` (so the caller reports it missing)."""
    if checkpoint.exists():
        return checkpoint
    leftovers = sorted(checkpoint.parent.glob(f".{checkpoint.name}.*.old"), key=lambda p: p.stat().st_mtime)
    complete = [p for p in leftovers if (p / STATE_JSON).is_file() and (p / STATE_TENSORS).is_file()]
    return complete[-1] if complete else checkpoint


def read_state(checkpoint: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(trainer_state.json as a dict, optimizer tensors)`` of a checkpoint directory (or of the ``.old`` copy
    :func:`find_checkpoint` falls back to when the directory itself is missing).

    Raises ConfigError (one line) when the directory or either file is missing or unreadable.
    """
    checkpoint = find_checkpoint(checkpoint)
    json_path, tensor_path = checkpoint / STATE_JSON, checkpoint / STATE_TENSORS
    if not json_path.is_file() or not tensor_path.is_file():
        raise ConfigError(f"no checkpoint to resume in {checkpoint} (expected {STATE_JSON} and {STATE_TENSORS}); "
                          "run without --resume to start")
    try:
        state = json.loads(json_path.read_text(encoding="utf-8"))
        tensors = load_file(str(tensor_path))
    except (OSError, ValueError, RuntimeError) as error:
        raise ConfigError(f"cannot read the checkpoint in {checkpoint}: {' '.join(str(error).split())}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{json_path} is not a trainer state of format {FORMAT}")
    return state, tensors
