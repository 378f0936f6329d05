"""A model across devices: accelerate device maps (``--device-map``), offload, and where inputs go.

:func:`attnlab.capture.loading.load_model` takes ``device_map=`` (``"auto"``, ``"balanced"``,
``"balanced_low_0"``, ``"sequential"`` or ``{module name: device}``, read by
:func:`attnlab.config.parse_device_map`). Folders, hub ids and the bundled GGUF's cached fp32 copy pass it to
transformers' ``from_pretrained`` (which loads each weight straight to its device; ``"disk"`` weights stay in
their safetensors file and are read on use); a model already in memory (a ``.gguf`` file without a cached copy)
is placed by :func:`dispatch`, accelerate's ``infer_auto_device_map`` + ``dispatch_model`` (``"disk"`` weights
are written to the offload folder). Either way accelerate's ``AlignDevicesHook`` moves every module's inputs to
its execution device and loads offloaded weights there on the fly, so a module's parameters may sit on ``meta``:
ask :func:`input_device` where inputs go, never the first parameter.

The offload folder is ``offload_dir=`` when given, else ``$ATTNLAB_OFFLOAD_DIR``, else a fresh temporary folder
removed when the process exits (:func:`offload_folder`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from attnlab.config import DEVICE_MAP_NAMES, check_map_and_device, parse_device_map
from attnlab.errors import ConfigError, UsageError

__all__ = ["check_map_modules", "dispatch", "from_pretrained_placed", "input_device", "map_devices", "offload_folder",
           "placed", "pretrained_kwargs", "resolved_map"]

OFFLOAD_ENV = "ATTNLAB_OFFLOAD_DIR"


def map_devices(device_map: Any, device: Any = "cpu") -> str | dict[str, int | str] | None:
    """``device_map`` parsed (:func:`attnlab.config.parse_device_map`) and checked against this machine.

    Raises:
        ConfigError: a bad map (see parse_device_map); a map together with a ``device`` other than ``"cpu"``; a map
            that names a GPU (an int or ``cuda…``) where CUDA is not available, or ``mps`` where MPS is not; a map
            under several processes (``torchrun``: every rank would place the whole model on the same devices).
    """
    from attnlab.distributed import world

    parsed = parse_device_map(device_map)
    check_map_and_device(parsed, device)
    if parsed is not None and world().active:
        raise ConfigError(f"--device-map places one model across this machine's devices, but {world().size} "
                          "processes were started (torchrun); run it in one process, or give each process a whole "
                          "model with --device cuda")
    if isinstance(parsed, dict):
        for module, where in parsed.items():
            cuda = isinstance(where, int) or where.startswith("cuda")
            if cuda and not torch.cuda.is_available():
                raise ConfigError(f"device map puts {module or 'the model'!r} on {where!r} but CUDA is not available "
                                  "here; use \"cpu\" or \"disk\"")
            index = where if isinstance(where, int) else (torch.device(where).index or 0) if cuda else 0
            if cuda and index >= torch.cuda.device_count():
                raise ConfigError(f"device map puts {module or 'the model'!r} on {where!r} but this machine has "
                                  f"{torch.cuda.device_count()} GPU(s)")
            if where == "mps" and not torch.backends.mps.is_available():
                raise ConfigError(f"device map puts {module or 'the model'!r} on 'mps' but MPS is not available here")
    return parsed


def check_map_modules(model: Any, device_map: dict[str, int | str]) -> None:
    """UsageError (one line) unless every key of ``device_map`` names a module of ``model`` (``""`` = the whole
    model), no key lies inside another (``""`` alone, or siblings), and every weight (``state_dict`` key) falls
    under some key. ``model`` may be on ``meta``."""
    modules = dict(model.named_modules())
    unknown = [key for key in device_map if key != "" and key not in modules]
    if unknown:
        top = [name for name in modules if name and "." not in name]
        raise UsageError(f"device map names module {unknown[0]!r}, which {type(model).__name__} does not have; its "
                         f"modules start with {', '.join(top)} (e.g. {_example(modules)})")
    keys = tuple(device_map)
    nested = [(outer, inner) for outer in keys for inner in keys
              if inner != outer and (outer == "" or inner.startswith(outer + "."))]
    if nested:  # accelerate hooks the outer module over all of its weights, offloaded ones included, and fails
        outer, inner = nested[0]
        raise UsageError(f"device map keys must not nest: {outer or chr(34) * 2} contains {inner!r}; give the other "
                         "modules at the same depth instead (as accelerate's own maps do)")
    if "" in device_map:
        return
    missing = [name for name in model.state_dict() if not any(name == k or name.startswith(k + ".") for k in keys)]
    if missing:
        raise UsageError(f"device map places no device for {missing[0]}" + (f" and {len(missing) - 1} more weight(s)"
                         if len(missing) > 1 else "") + "; add its module or \"\" (the rest) to the map")


def _example(modules: dict[str, Any]) -> str:
    """A deep module name to show in an error (the first decoder layer when there is one)."""
    layered = [name for name in modules if name.endswith(".0") and name.count(".") <= 2]
    return layered[0] if layered else next(iter(modules))


def meta_model(cls: Any, config: Any, trust_remote_code: bool = False) -> Any:
    """An empty (``meta``) model of ``cls`` built from ``config``, to check a map before any weight is read."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return cls.from_config(config, trust_remote_code=trust_remote_code)


_TEMPORARY: list[str] = []


def _remove_temporary() -> None:
    for folder in _TEMPORARY:
        shutil.rmtree(folder, ignore_errors=True)


def offload_folder(offload_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where ``"disk"`` weights go: ``offload_dir``, else ``$ATTNLAB_OFFLOAD_DIR``, else a temporary folder that is
    removed when the process exits. Created if missing; UsageError (one line) if it cannot be."""
    chosen = offload_dir if offload_dir is not None else os.environ.get(OFFLOAD_ENV) or None
    if chosen is None:
        if not _TEMPORARY:
            atexit.register(_remove_temporary)
        _TEMPORARY.append(tempfile.mkdtemp(prefix="attnlab-offload-"))
        return Path(_TEMPORARY[-1])
    folder = Path(chosen).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot use offload folder {folder}: {error}") from None
    return folder


def pretrained_kwargs(device_map: str | dict[str, int | str] | None, offload_dir: Path | None) -> dict[str, Any]:
    """The ``from_pretrained`` keywords that place a model by ``device_map`` ({} without one)."""
    if device_map is None:
        return {}
    return {"device_map": device_map, "offload_folder": str(offload_dir) if offload_dir is not None else None}


def from_pretrained_placed(cls: Any, where: Any, place: dict[str, Any], config: Any = None, **kwargs: Any) -> Any:
    """``cls.from_pretrained(where, **kwargs)`` placed by ``place`` (:func:`pretrained_kwargs`); an explicit map is
    first checked against an empty model of the same ``config`` (read from ``where`` when not given)."""
    if isinstance(place.get("device_map"), dict):
        from transformers import AutoConfig

        options = {key: kwargs[key] for key in ("trust_remote_code", "local_files_only") if key in kwargs}
        config = config if config is not None else AutoConfig.from_pretrained(where, **options)
        check_map_modules(meta_model(cls, config, bool(kwargs.get("trust_remote_code"))), place["device_map"])
    return cls.from_pretrained(where, **kwargs, **place)


def placed(model: Any, place: dict[str, Any]) -> Any:
    """A model loaded into memory (CPU), placed by ``place`` (:func:`pretrained_kwargs`; {} = left as it is)."""
    if not place:
        return model
    return dispatch(model, place["device_map"], Path(place["offload_folder"] or offload_folder()))


def dispatch(model: Any, device_map: str | dict[str, int | str], offload_dir: Path) -> Any:
    """Place a model that is already in memory (on CPU) by ``device_map`` with accelerate; returns it.

    A map name is resolved by ``infer_auto_device_map`` over the free memory of the GPUs, CPU and disk
    (``get_balanced_memory`` first for every name but ``"sequential"``), never splitting the model's
    ``_no_split_modules``; the model is then dispatched (``dispatch_model``), ``"disk"`` weights written to
    ``offload_dir``. The map used is left in ``model.hf_device_map`` as ``from_pretrained`` does.
    """
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if isinstance(device_map, str):
        memory = get_max_memory() if device_map == "sequential" else get_balanced_memory(
            model, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    else:
        check_map_modules(model, device_map)
    if len(set(device_map.values())) > 1 or "disk" in device_map.values():
        dispatch_model(model, device_map=device_map, offload_dir=str(offload_dir))
    else:
        model.to(_torch_device(next(iter(device_map.values()))))
    model.hf_device_map = dict(device_map)
    return model


def _torch_device(where: int | str) -> torch.device:
    """A map value as a torch device (``"disk"`` weights run on CPU here)."""
    if isinstance(where, int):
        return torch.device("cuda", where)
    return torch.device("cpu" if where == "disk" else where)


def resolved_map(model: Any, requested: Any = None) -> dict[str, int | str]:
    """The map a model was placed by, JSON-ready: ``model.hf_device_map`` (set by accelerate when the model spans
    several devices or disk), else the ``requested`` map when it was explicit, else ``{"": device}`` of the first
    parameter (a map name that resolved to one device)."""
    mapping = getattr(model, "hf_device_map", None)
    mapping = mapping if isinstance(mapping, dict) and mapping else requested
    if isinstance(mapping, dict) and mapping:
        return {str(k): v if isinstance(v, int) else str(v) for k, v in mapping.items()}
    parameter = next(iter(model.parameters()), None)
    return {"": str(parameter.device) if parameter is not None else "cpu"}


def input_device(model: Any) -> torch.device:
    """The device a model's inputs (token ids, masks) should be on: where its input embeddings execute.

    Under a device map that is the execution device of the embeddings' accelerate hook (their weights may be
    offloaded to ``meta``), else the device of the embeddings' weight, else of the first parameter not on
    ``meta``; CPU for a model without parameters. Works for any ``nn.Module``.
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for module in (embeddings, model):
        hook = getattr(module, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        if execution is not None:
            return _torch_device(execution) if isinstance(execution, (int, str)) else torch.device(execution)
    candidates = list(embeddings.parameters()) if embeddings is not None else []
    candidates += list(model.parameters()) if hasattr(model, "parameters") else []
    for parameter in candidates:
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def is_map_name(device_map: Any) -> bool:
    """Whether ``device_map`` is a name accelerate resolves (``auto`` …) rather than an explicit map."""
    return isinstance(device_map, str) and device_map in DEVICE_MAP_NAMES
