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

:class:`Placement` is the whole placement step of :func:`attnlab.capture.loading.load_model`: the map checked
before anything loads, the keywords ``from_pretrained`` takes, the dispatch of a model already in memory, and the
map that was used. ``"disk"`` weights go to ``offload_dir=`` when given, else ``$ATTNLAB_OFFLOAD_DIR``, else a
temporary folder that exists only when the map used has ``"disk"`` weights and that belongs to the model: it is
removed when the model is garbage-collected or the process exits (``weakref.finalize``), never by a module-level
list.

Not tested without GPUs. The CPU suite places weights on ``"cpu"`` and ``"disk"`` only, so these paths run on no
test machine without a GPU: a map that spreads the model over two GPUs (inputs on the embeddings' GPU, logits on
the last one, ``token_loss_sum``'s ``labels.to(…)``); ``"cpu"`` offload *beside* a GPU (weights on ``meta``, hence
the gradient refusal of :mod:`attnlab.capture.runner`, which CPU tests reach through ``"disk"`` only); the GPU
checks of :func:`map_devices` (an index beyond ``torch.cuda.device_count()``, ``cuda:N``; only "CUDA is not
available" is tested); a map name (``"auto"`` …) that resolves to GPUs or to disk (on a CPU machine it resolves to
``{"": "cpu"}``); and the branch of :func:`input_device` whose accelerate hook executes on a GPU, which is tested
with a stub hook (``test_input_device_follows_the_hook_not_the_weights``), not with a real GPU.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

from attnlab.config import DEVICE_MAP_NAMES, check_map_and_device, parse_device_map
from attnlab.errors import ConfigError, UsageError

__all__ = ["Placement", "check_map_modules", "dispatch", "input_device", "map_devices", "offload_folder",
           "resolved_map"]

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


def offload_folder(offload_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The folder the user chose for ``"disk"`` weights: ``offload_dir``, else ``$ATTNLAB_OFFLOAD_DIR``; created if
    missing. None when neither is set (a temporary folder is then made only if a map needs one, see
    :class:`Placement`). UsageError (one line) if it cannot be created."""
    chosen = offload_dir if offload_dir is not None else os.environ.get(OFFLOAD_ENV) or None
    if chosen is None:
        return None
    folder = Path(chosen).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot use offload folder {folder}: {error}") from None
    return folder


def _owned_by(model: Any, folder: Path) -> None:
    """Remove ``folder`` when ``model`` is garbage-collected or the process exits, whichever comes first."""
    weakref.finalize(model, shutil.rmtree, str(folder), True)


class Placement:
    """Where :func:`attnlab.capture.loading.load_model` puts a model: on one ``device``, or by a device map.

    ``Placement(device_map, device, offload_dir)`` checks the map at once (:func:`map_devices`: ConfigError; a
    user's offload folder that cannot be created: UsageError), before any weight is read. ``Placement()`` places
    nothing (the loader moves the model to its device in :meth:`finish`).

    Attributes:
        device_map: the parsed map (a name or ``{module: device}``), or None: no map.
        offload_dir: the user's folder for ``"disk"`` weights (:func:`offload_folder`), or None: a temporary one,
            made only if the map used has ``"disk"`` weights and removed with the model.
    """

    def __init__(self, device_map: Any = None, device: Any = "cpu",
                 offload_dir: str | os.PathLike[str] | None = None) -> None:
        self.device_map = map_devices(device_map, device)
        may_use_disk = is_map_name(self.device_map) or (
            isinstance(self.device_map, dict) and "disk" in self.device_map.values())
        self.offload_dir = offload_folder(offload_dir) if may_use_disk else None

    def from_pretrained(self, cls: Any, where: Any, config: Any = None, **kwargs: Any) -> Any:
        """``cls.from_pretrained(where, **kwargs)`` placed by the map (as it is without one). An explicit map is
        first checked against an empty model of the same ``config`` (read from ``where`` when not given:
        :func:`check_map_modules`). Without a user's folder, transformers is handed the name of a temporary
        folder that does not exist yet: it creates it only when the map it resolves has ``"disk"`` weights,
        and the folder then belongs to the model."""
        if self.device_map is None:
            return cls.from_pretrained(where, **kwargs)
        if isinstance(self.device_map, dict):
            from transformers import AutoConfig

            options = {key: kwargs[key] for key in ("trust_remote_code", "local_files_only") if key in kwargs}
            config = config if config is not None else AutoConfig.from_pretrained(where, **options)
            check_map_modules(meta_model(cls, config, bool(kwargs.get("trust_remote_code"))), self.device_map)
        pending = self.offload_dir or Path(tempfile.gettempdir()) / f"attnlab-offload-{secrets.token_hex(8)}"
        try:
            model = cls.from_pretrained(where, **kwargs, device_map=self.device_map, offload_folder=str(pending))
        except BaseException:
            if self.offload_dir is None:
                shutil.rmtree(pending, ignore_errors=True)
            raise
        if self.offload_dir is None and pending.exists():
            _owned_by(model, pending)
        return model

    def dispatch(self, model: Any) -> Any:
        """A model already in memory (on CPU) placed by the map (:func:`dispatch`); as it is without a map."""
        return model if self.device_map is None else dispatch(model, self.device_map, self.offload_dir)

    def finish(self, model: Any, device: torch.device) -> dict[str, int | str] | None:
        """The last step of a load: without a map, move ``model`` to ``device`` and return None; with one, return
        the map used (:func:`resolved_map`, JSON-ready)."""
        if self.device_map is None:
            model.to(device)
            return None
        return resolved_map(model, self.device_map)


def dispatch(model: Any, device_map: str | dict[str, int | str], offload_dir: Path | None = None) -> Any:
    """Place a model that is already in memory (on CPU) by ``device_map`` with accelerate; returns it.

    A map name is resolved by ``infer_auto_device_map`` over the free memory of the GPUs, CPU and disk
    (``get_balanced_memory`` first for every name but ``"sequential"``), never splitting the model's
    ``_no_split_modules``; the model is then dispatched (``dispatch_model``), ``"disk"`` weights written to
    ``offload_dir`` (None: a temporary folder, made only when the map has ``"disk"`` weights and removed with the
    model). The map used is left in ``model.hf_device_map`` as ``from_pretrained`` does.
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
    if "disk" in device_map.values() and offload_dir is None:
        offload_dir = Path(tempfile.mkdtemp(prefix="attnlab-offload-"))
        _owned_by(model, offload_dir)
    if len(set(device_map.values())) > 1 or "disk" in device_map.values():
        dispatch_model(model, device_map=device_map, offload_dir=str(offload_dir) if offload_dir else None)
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
