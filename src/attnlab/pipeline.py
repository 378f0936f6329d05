"""The main job as a function: model + text → probes → a results dict (docs/results.md), ready to write and render.

    from attnlab.pipeline import RunConfig, run_probes
    results = run_probes(RunConfig(seq_len=256, max_windows=2))

The CLI's ``attnlab report`` is a thin wrapper around :func:`run_probes` and
:func:`attnlab.report.io.write_results`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from attnlab import __version__
from attnlab.columns import SCHEMA_VERSION
from attnlab.errors import ConfigError
from attnlab.probes import DEFAULT_PROBES, PROBES
from attnlab.report.sections import section_specs

DTYPES = ("float32", "float64", "bfloat16", "float16")
_FIELD_TYPES = {"model": str, "seq_len": int, "max_windows": int, "batch_size": int, "block_size": int,
                "query_fraction": float, "bos": str, "dtype": str, "device": str, "seed": int}

Progress = Callable[[int, int, str], None]  # (done, total, message)


@dataclass(frozen=True)
class RunConfig:
    """Everything a probe run depends on; saved verbatim (resolved) in results.json.

    Attributes:
        model: bundled name (``attnlab models list``), local directory, ``.gguf`` file, or hub id.
        text: path to a UTF-8 text file, or None for the bundled Shakespeare corpus.
        seq_len: tokens per window (BOS included when one is prepended); at most the model's max positions.
        max_windows: number of windows read from the text.
        batch_size: windows per forward pass.
        probes: probe names (``attnlab ls probes``).
        block_size: query rows per block of the eager kernel.
        query_fraction: fraction of query rows the probes see (1 = exact statistics).
        bos: "auto" | "always" | "never" (see attnlab.text).
        dtype: model dtype; probs are always computed in float32.
        device: torch device string, e.g. "cpu" or "cuda".
        seed: seeds python and torch RNGs (the forward pass is deterministic on CPU anyway).
    """

    model: str = "smollm2-135m"
    text: str | None = None
    seq_len: int = 512
    max_windows: int = 4
    batch_size: int = 1
    probes: tuple[str, ...] = DEFAULT_PROBES
    block_size: int = 128
    query_fraction: float = 1.0
    bos: str = "auto"
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        for name, kind in _FIELD_TYPES.items():
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
            if not ok or isinstance(value, bool):
                raise ConfigError(f"{name} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
        if self.text is not None and not isinstance(self.text, str):
            raise ConfigError(f"text must be a path string, got {self.text!r}")
        if isinstance(self.probes, str) or not all(isinstance(p, str) for p in self.probes):
            raise ConfigError(f"probes must be a list of probe names, got {self.probes!r}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.max_windows < 1 or self.batch_size < 1:
            raise ConfigError(f"max_windows and batch_size must be >= 1, got {self.max_windows}, {self.batch_size}")
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")
        if not 0 < self.query_fraction <= 1:
            raise ConfigError(f"query_fraction must be in (0, 1], got {self.query_fraction}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not self.probes:
            raise ConfigError("at least one probe is needed; see `attnlab ls probes`")
        for name in self.probes:
            PROBES.get(name)  # raises RegistryError with a suggestion

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["probes"] = list(self.probes)
        return data


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "attnlab": __version__}


def check_seq_len(model: Any, seq_len: int) -> None:
    """Raise ConfigError if seq_len exceeds the model's maximum number of positions."""
    from attnlab.capture.architectures import text_config

    limit = getattr(text_config(model), "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings={limit}")


def load_for_run(config: Any, notify: Progress, model: Any = None, tokenizer: Any = None, *,
                 seq_len: int | None = None) -> tuple[Any, Any]:
    """The start every command shares: seed, check the text file, load the model (unless given), check seq_len.

    ``config`` needs ``seed``, ``text``, ``model``, ``dtype``, ``device`` and ``seq_len`` (RunConfig, EvalConfig).
    Raises TextError/ConfigError before the model loads where it can.
    """
    import torch

    from attnlab.capture.loading import load_model
    from attnlab.text import read_text_file

    random.seed(config.seed)
    torch.manual_seed(config.seed)
    if config.text is not None:
        read_text_file(config.text)  # fail on a missing/empty/non-UTF-8 file before loading the model
    if model is None or tokenizer is None:
        notify(0, 0, f"loading model {config.model}")
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    check_seq_len(model, seq_len if seq_len is not None else config.seq_len)
    return model, tokenizer


def results_envelope(command: str, config: Any, model: Any, tokenizer: Any, *, bos_policy: str, bos_added: bool,
                     attention_paths: dict[Any, str], windows: list[dict[str, Any]], rows: list[dict[str, Any]],
                     started: float, **sections: Any) -> dict[str, Any]:
    """The results dict every command writes (docs/results.md): provenance, config, tokens fed, rows, timing;
    ``sections`` adds command-specific keys (``extras``, ``eval``, ``probe_args`` ...)."""
    from attnlab.capture.loading import model_info, tokenizer_info

    return {
        "schema_version": SCHEMA_VERSION,
        "attnlab_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "config": config.to_dict(),
        "model": {**model_info(model), "requested": config.model},
        "tokenizer": {**tokenizer_info(tokenizer), "class": type(tokenizer).__name__, "bos_policy": bos_policy,
                      "bos_token": getattr(tokenizer, "bos_token", None), "bos_added": bos_added},
        "seed": config.seed,
        "versions": _versions(),
        "attention_paths": {str(layer): path for layer, path in sorted(attention_paths.items())},
        "windows": windows,
        "rows": rows,
        **sections,
        "timing": {"seconds": round(time.perf_counter() - started, 3)},
    }


def run_probes(config: RunConfig, *, progress: Progress | None = None, model: Any = None,
               tokenizer: Any = None) -> dict[str, Any]:
    """Load model and text, run the probes over every window, and return the results dict (docs/results.md).

    Pass ``model``/``tokenizer`` to reuse an already loaded pair (``config.model`` is then only recorded).

    Raises:
        ConfigError, TextError, RegistryError, UnsupportedModelError: bad input (the CLI exits 2).
        AssetError: a bundled asset cannot be fetched or verified.
    """
    import torch

    from attnlab.capture.session import Session
    from attnlab.text import load_text

    started = time.perf_counter()
    notify = progress or (lambda done, total, message: None)
    drives_model = [name for name in config.probes if "model" in PROBES.get(name).needs]
    if drives_model:  # model-level probes (inflection, active_dormant ...) cannot run inside a Session
        raise ConfigError(f"probe {', '.join(drives_model)} drives the model itself; run it with `attnlab probe` / "
                          "attnlab.probe_run.run_probe_suite")
    model, tokenizer = load_for_run(config, notify, model, tokenizer)
    probes = [PROBES.get(name)() for name in config.probes]
    if any(hasattr(probe, "prepare") for probe in probes):  # magnets/rope_decay read tokenizer and rope settings
        from attnlab.capture.model_probes import ModelRunner

        info = ModelRunner(model, tokenizer).info
        for probe in probes:
            if hasattr(probe, "prepare"):
                probe.prepare(info)
    notify(0, 0, "reading text")
    windows = load_text(tokenizer, config.text, seq_len=config.seq_len, max_windows=config.max_windows,
                        bos=config.bos, batch_size=config.batch_size, device=config.device)
    session = Session(model, probes=probes, block_size=config.block_size,
                      query_fraction=config.query_fraction)
    total = len(windows)
    with session, torch.no_grad():
        for done, batch in enumerate(windows):
            notify(done, total, "running probes")
            model(**batch)
        notify(total, total, "running probes")

    def decode(token_id: int) -> str:
        return tokenizer.decode([token_id])

    return results_envelope(
        "report", config, model, tokenizer, bos_policy=windows.bos_policy, bos_added=windows.bos_added,
        attention_paths=session.paths, windows=windows.windows, rows=session.rows(), started=started,
        extras=session.extras(decode), sections=section_specs(probes),
    )
