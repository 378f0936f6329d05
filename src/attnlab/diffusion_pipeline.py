"""``attnlab probe --model <diffusers folder>``: generate with a diffusion pipeline under a DiffusionSession and
build the results dict (docs/results.md; per-step rows carry ``denoising_step``).

Folders it reads (:func:`diffusion_source`): a diffusers pipeline folder (``model_index.json``, e.g. a local copy
of ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` or ``PixArt-alpha/PixArt-XL-2-512x512``; loaded with
``DiffusionPipeline.from_pretrained``, no remote code) and the lab's synthetic DiT (``lab_dit.json``,
:mod:`attnlab.lab.dit`). A folder holding only a transformer (``config.json`` of a diffusers model) has no sampler
and is refused with a hint. The pipeline runs with ``output_type="latent"`` where it takes one (the VAE decode
holds no attention of interest and costs time).
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnlab.columns import SCHEMA_VERSION
from attnlab.diffusion.session import DiffusionSession
from attnlab.errors import ConfigError
from attnlab.progress import Progress, ProgressArg, progress_to

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def diffusion_source(model: str | Path) -> str | None:
    """``"lab"`` (lab_dit.json), ``"pipeline"`` (model_index.json), ``"transformer"`` (a diffusers model's
    config.json alone) for a local folder, else None (not a diffusion model: the text/VLM loaders take it)."""
    path = Path(model)
    if not path.is_dir():
        return None
    if (path / "lab_dit.json").is_file() or (path / "checkpoint" / "lab_dit.json").is_file():
        return "lab"  # a lab DiT folder, or the --out of `attnlab dit train` holding one as checkpoint/
    if (path / "model_index.json").is_file():
        return "pipeline"
    config = path / "config.json"
    if config.is_file():
        try:
            if "_diffusers_version" in json.loads(config.read_text(encoding="utf-8")):
                return "transformer"
        except (OSError, ValueError):
            return None
    return None


@dataclass
class DiffusionRun:
    """What one diffusion probe run does.

    Attributes:
        model: the folder (see :func:`diffusion_source`). prompts: one sample per prompt (captions, or class
            names for class-conditional pipelines such as DiT). probes: names (``attnlab ls probes``), with
            ``probe_args`` (name → keyword arguments). edits: edit specs applied during generation (``steps=``
            schedules them). steps: denoising steps. guidance: classifier-free guidance scale (None = the
            pipeline's default). seed, device, dtype, block_size, query_fraction, probe_kernel: as ``attnlab
            probe``. pipe_args: extra keyword arguments of the pipeline call (``height``, ``width``,
            ``num_frames`` …).
    """

    model: str
    prompts: list[str]
    probes: list[str]
    probe_args: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    edits: list[str] = field(default_factory=list)
    steps: int = 20
    guidance: float | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 128
    query_fraction: float = 1.0
    probe_kernel: str = "fused"
    pipe_args: Mapping[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise ConfigError on settings no run could use (before anything loads)."""
        if diffusion_source(self.model) is None:
            raise ConfigError(f"expected a diffusers pipeline folder (model_index.json) or a lab DiT folder "
                              f"(lab_dit.json), got {self.model!r}")
        if diffusion_source(self.model) == "transformer":
            raise ConfigError(f"{self.model} holds a diffusers transformer alone, which has no sampler; pass the "
                              "pipeline folder (the one with model_index.json)")
        if not self.prompts:
            raise ConfigError("a diffusion run needs at least one --prompt")
        if not self.probes:
            raise ConfigError("attnlab probe needs at least one --probe NAME; see `attnlab ls probes`")
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        from attnlab.edits import parse_edit_list

        for spec in self.edits:  # a bad spec, or a schedule no step of this run reaches, fails before loading
            for edit in parse_edit_list(spec):
                if edit.steps is not None and min(edit.steps) >= self.steps:
                    raise ConfigError(f"--edit {edit.spec()}: steps={'+'.join(map(str, edit.steps))} but the run has "
                                      f"--steps {self.steps} (steps count from 0: 0…{self.steps - 1})")
                dense = getattr(edit, "dense_steps", None)
                if isinstance(dense, int) and dense >= self.steps:
                    raise ConfigError(f"--edit {edit.spec()}: dense_steps={dense} keeps all --steps {self.steps} "
                                      "dense, so the edit would never act; lower dense_steps or raise --steps")

    def to_dict(self) -> dict[str, Any]:
        return {key: (dict(value) if isinstance(value, Mapping) else value) for key, value in vars(self).items()}


class _Generator:
    """A loaded pipeline: ``transformer`` and ``generate(prompt, seed)`` (one sample)."""

    def __init__(self, run: DiffusionRun) -> None:
        self.run, self.source = run, diffusion_source(run.model)
        dtype = DTYPES[run.dtype]
        if self.source == "lab":
            from attnlab.lab.dit.pipeline import load_pipeline

            self.pipe = load_pipeline(run.model)
            self.transformer = self.pipe.transformer.to(run.device, dtype)
        else:
            self.pipe = _load_pipeline(run.model, dtype)
            self.pipe.set_progress_bar_config(disable=True)
            self.pipe.to(run.device)
            self.transformer = getattr(self.pipe, "transformer", None) or getattr(self.pipe, "unet", None)
            if self.transformer is None:
                raise ConfigError(f"{type(self.pipe).__name__} has no transformer (or unet) to probe")
        self.transformer.eval()

    def generate(self, prompt: str, seed: int) -> None:
        run = self.run
        if self.source == "lab":
            options = {} if run.guidance is None else {"guidance": run.guidance}
            self.pipe.sample([prompt], steps=run.steps, seed=seed, **options, **run.pipe_args)
            return
        accepted = inspect.signature(self.pipe.__call__).parameters
        name = type(self.pipe).__name__
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
            unknown = sorted(set(run.pipe_args) - set(accepted))
            if unknown:
                raise ConfigError(f"--pipe-arg {', '.join(unknown)}: {name} does not take it; it takes "
                                  f"{', '.join(sorted(accepted))}")
        options: dict[str, Any] = {"num_inference_steps": run.steps,
                                   "generator": torch.Generator(run.device).manual_seed(seed), **run.pipe_args}
        if "prompt" in accepted:
            options["prompt"] = prompt
        elif "class_labels" in accepted and hasattr(self.pipe, "get_label_ids"):
            labels = sorted(getattr(self.pipe, "labels", {}) or {})
            if prompt not in labels:
                shown = ", ".join(labels[:20]) + (" …" if len(labels) > 20 else "")
                raise ConfigError(f"expected a class name of this pipeline as --prompt ({shown}), got {prompt!r}")
            options["class_labels"] = self.pipe.get_label_ids([prompt])
        else:
            raise ConfigError(f"{name} takes neither a prompt nor class labels, so --prompt cannot condition it")
        if run.guidance is not None:
            if "guidance_scale" not in accepted:
                raise ConfigError(f"--guidance: {name} has no guidance_scale argument")
            options["guidance_scale"] = run.guidance
        if "output_type" in accepted:
            options.setdefault("output_type", "latent")
        self.pipe(**options)


def _load_pipeline(folder: str, dtype: torch.dtype) -> Any:
    """``DiffusionPipeline.from_pretrained(folder)`` (local files, no remote code) without diffusers' progress bar
    and load-time chatter (its messages stay available at its own logging levels once loaded)."""
    import warnings

    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch_dtype is renamed dtype in newer diffusers
            return DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    finally:
        diffusers_logging.set_verbosity(level)
        diffusers_logging.enable_progress_bar()


def _count_forwards(session: DiffusionSession, notify: Progress, total: int, prompt_index: int, steps: int) -> Any:
    def hook(module: Any, args: Any, output: Any) -> None:
        done = prompt_index * steps + min(steps, (session.step or 0) + 1)
        notify(done, total, f"sample {prompt_index + 1}/{total // steps} · step {(session.step or 0) + 1}/{steps}")
    return session.model.register_forward_hook(hook)


def run_diffusion_probes(run: DiffusionRun, *, progress: ProgressArg = None, command: str = "probe",
                         build_probes: Callable[[list[str], Mapping[str, Mapping[str, Any]]], list[Any]] | None = None
                         ) -> dict[str, Any]:
    """Generate one sample per prompt under one :class:`DiffusionSession` and return the results dict: the
    probes' rows summed over steps and per step (``denoising_step``), ``sections``, ``extras``, the edit report,
    and ``diffusion`` (layer table, steps, timesteps, prompts) for the per-step/per-block report sections.

    Raises:
        ConfigError: bad settings (:meth:`DiffusionRun.check`), an unknown class name for a class-conditional
            pipeline; RegistryError: unknown probe or edit.
    """
    from attnlab import __version__
    from attnlab.params import build_probes as default_build
    from attnlab.report.sections import section_specs

    run.check()
    started = time.perf_counter()
    random.seed(run.seed)
    torch.manual_seed(run.seed)
    probes = (build_probes or default_build)(tuple(run.probes), run.probe_args)
    with progress_to(progress) as notify:
        notify(0, 0, f"loading model {run.model}")
        generator = _Generator(run)
        session = DiffusionSession(generator.transformer, probes, edits=run.edits, block_size=run.block_size,
                                   query_fraction=run.query_fraction,
                                   probe_kernel=run.probe_kernel)  # type: ignore[arg-type]
        total = run.steps * len(run.prompts)
        with torch.no_grad(), session:
            for index, prompt in enumerate(run.prompts):
                handle = _count_forwards(session, notify, total, index, run.steps)
                try:
                    generator.generate(prompt, run.seed + index)
                finally:
                    handle.remove()
        notify(total, total, "done")
    layers = session.layer_table().to_dict("records")
    for layer in layers:
        layer["calls"] = session.calls_per_layer.get(int(layer["layer"]), 0)
    merged = session.merged_probes()
    return {
        "schema_version": SCHEMA_VERSION,
        "attnlab_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "config": run.to_dict(),
        "model": {**session.facts.to_dict(), "name": Path(run.model).name, "source": str(run.model),
                  "loaded_from": generator.source, "requested": run.model},
        "tokenizer": None,
        "seed": run.seed,
        "versions": _versions(),
        "attention_paths": {str(layer): path for layer, path in sorted(session.attention_paths.items())},
        "windows": [],
        "rows": [row for probe in merged for row in probe.rows()] + session.rows(per_step=True),  # all, then per step
        "probe_args": {name: dict(args) for name, args in run.probe_args.items()},
        "extras": {probe.name: probe.extras(_no_token) for probe in merged},
        "sections": section_specs(merged),
        "edits": session.edit_report().to_dict("records") if session.edits else [],
        "diffusion": {"steps": run.steps, "samples": session.samples, "prompts": list(run.prompts),
                      "timesteps": {str(step): t for step, t in sorted(session.timesteps.items())},
                      "layers": layers},
        "timing": {"seconds": round(time.perf_counter() - started, 3), "processes": 1},
    }


def _no_token(token_id: int) -> str:
    """Diffusion tokens are patches and text-encoder slots, not vocabulary ids: tables show their position only."""
    return "·"


def _versions() -> dict[str, str]:
    import diffusers

    from attnlab.pipeline import versions as base

    return {**base(), "diffusers": diffusers.__version__}
