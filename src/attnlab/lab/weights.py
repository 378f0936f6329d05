"""Reading a TinyLM checkpoint folder for :meth:`attnlab.lab.modeling.TinyLMPreTrainedModel.from_pretrained`:
which safetensors files, a strict state-dict load, and the ``dtype=`` / ``device_map=`` values transformers takes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.errors import ConfigError

__all__ = ["IGNORED", "checkpoint_folder", "load_state", "resolve_device", "resolve_dtype", "safetensors_files"]


IGNORED = {"cache_dir", "force_download", "local_files_only", "proxies", "revision", "token", "trust_remote_code",
           "adapter_kwargs", "code_revision", "low_cpu_mem_usage", "_from_auto", "_from_pipeline", "_commit_hash"}
"""Keywords transformers' Auto classes pass on that mean nothing for a local folder."""


def checkpoint_folder(path: str | os.PathLike, subfolder: str, model_args: tuple, kwargs: dict[str, Any],
                      use_safetensors: bool | None) -> str:
    """The local folder to load from; ConfigError for other positional or keyword arguments (beyond
    :data:`IGNORED`), ``use_safetensors=False``, or a path that is not a folder (a hub id)."""
    unknown = sorted(set(kwargs) - IGNORED)
    if model_args or unknown:
        raise ConfigError(f"TinyLM's from_pretrained takes config, dtype, device_map, attn_implementation and "
                          f"subfolder; got positional {list(model_args)} and keywords {unknown}")
    if use_safetensors is False:
        raise ConfigError("TinyLM checkpoints load from safetensors only; got use_safetensors=False")
    folder = os.path.join(os.fspath(path), subfolder)
    if not os.path.isdir(folder):
        raise ConfigError(f"TinyLM loads from a local folder written by save_pretrained; {folder!r} is not a "
                          "folder (hub ids are not loaded here)")
    return folder


def safetensors_files(folder: str) -> list[str]:
    """``model.safetensors``, or the shards ``model.safetensors.index.json`` lists; ConfigError if neither."""
    single, index = os.path.join(folder, "model.safetensors"), os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            weight_map = json.load(handle).get("weight_map", {})
        return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    raise ConfigError(f"expected model.safetensors or model.safetensors.index.json in {folder!r} (a TinyLM saved "
                      "with save_pretrained)")


def load_state(model: nn.Module, state: dict[str, Tensor], folder: str) -> None:
    """Copy ``state`` into ``model`` strictly: a head-model checkpoint loads into the base model (without
    ``lm_head``) and the reverse; only a tied ``lm_head.weight`` may be missing. ConfigError otherwise."""
    prefix, base = f"{model.base_model_prefix}.", not hasattr(model, "lm_head")
    has_prefix = any(key.startswith(prefix) for key in state)
    if base and has_prefix:  # a TinyLMForCausalLM checkpoint, loaded as the base model
        state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    elif not base and not has_prefix:  # a TinyLMModel checkpoint under a head
        state = {prefix + key: value for key, value in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a tensor of another shape
        raise ConfigError(f"the weights in {folder!r} do not fit the model its config describes: "
                          f"{str(error).splitlines()[-1].strip()}") from None
    tied = {"lm_head.weight"} if not base and model.config.tie_word_embeddings else set()
    missing = sorted(set(missing) - tied)
    if missing or unexpected:
        raise ConfigError(f"the weights in {folder!r} do not fit the model its config describes: missing "
                          f"{missing}, unexpected {sorted(unexpected)}")


def resolve_dtype(dtype: Any, config: Any, state: dict[str, Tensor]) -> torch.dtype:
    """A torch dtype from ``dtype=`` as transformers takes it (a dtype, its name, "auto" or None = "auto")."""
    if dtype is None or dtype == "auto":
        saved = getattr(config, "dtype", None)
        if saved is not None:
            dtype = saved
        else:
            stored = [value.dtype for value in state.values() if value.is_floating_point()]
            return stored[0] if stored else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"expected dtype as a floating torch dtype, its name or 'auto', got {dtype!r}")
    return dtype


def resolve_device(device_map: Any) -> torch.device:
    """One device from ``device_map=`` (a name, an index or a torch.device); ConfigError for a map or "auto"."""
    try:
        return torch.device(device_map)
    except (TypeError, RuntimeError, ValueError):
        raise ConfigError(f"TinyLM loads onto one device: expected device_map like 'cpu', 'cuda:0' or 0, got "
                          f"{device_map!r}") from None
