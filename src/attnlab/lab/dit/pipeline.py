"""The DiT lab's pipeline: caption encoding, the rectified-flow Euler sampler with classifier-free guidance, and the
folder format.

    pipe = load_pipeline("runs/dit17/image")                 # a training's --out, or its checkpoint/ folder
    images = pipe.sample(["a red circle", "a blue square and a green triangle"], steps=20, guidance=3.0, seed=0)
    images.shape                                             # (2, 3, 32, 32) float32 in [0, 1]

Flow convention (rectified flow, Liu et al. 2023; the flow-matching loss of Lipman et al. 2023): ``x_t = (1 − t)·x0
+ t·noise`` for t ∈ [0, 1], pixels ``x0`` in [−1, 1]; the transformer predicts the velocity ``noise − x0`` and gets
``timestep = 1000·t`` (a float). The sampler starts from seeded Gaussian noise at t = 1 and takes ``steps`` Euler
steps ``x ← x − (t_i − t_{i+1})·v`` on ``t_i = 1 − i/steps``, so the transformer sees timesteps decreasing from 1000
(attnlab's DiffusionSession counts a new denoising step whenever the timestep changes, and a higher one starts a
new sample).

Guidance: the velocity at each step is ``predict(x, t, cond)``; the default is :meth:`LabPipeline.cfg_velocity`,
``v_null + guidance·(v_caption − v_null)`` from two forwards with the same timestep (caption first, then the empty
caption), or the caption's forward alone when ``guidance == 1``. A guidance method (SoftPAG, …) passes its own
``predict`` and calls :meth:`LabPipeline.velocity` for the forwards it needs.

Folder format (:func:`save_pipeline`): ``lab_dit.json`` (marker: format, kind, spec, vocabulary, training
settings), ``transformer/`` (diffusers ``save_pretrained``: ``config.json`` + safetensors) and
``text_embedding.safetensors`` (the :class:`~attnlab.lab.dit.model.WordEmbedding`). No pickle.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.errors import ConfigError
from attnlab.lab.dit.model import DitSpec, WordEmbedding, build_transformer, tokenize
from attnlab.progress import ProgressArg, progress_to

__all__ = ["FORMAT", "LAB_JSON", "Condition", "LabPipeline", "is_lab_dit_dir", "load_pipeline", "pipeline_path",
           "save_pipeline", "to_uint8"]

LAB_JSON = "lab_dit.json"
TRANSFORMER = "transformer"
TEXT_EMBEDDING = "text_embedding.safetensors"
FORMAT = 1


@dataclass(frozen=True)
class Condition:
    """What a ``predict`` gets besides ``x`` and ``t``: the caption's and the empty caption's encoder states.

    Attributes:
        hidden: (batch, max_words, text_dim) float32. keep: (batch, max_words) bool (True = a word).
        null_hidden, null_keep: the same for the empty caption (``<null>``), broadcast to the batch.
        guidance: the classifier-free guidance scale.
    """

    hidden: Tensor
    keep: Tensor
    null_hidden: Tensor
    null_keep: Tensor
    guidance: float


Predict = Callable[[Tensor, float, Condition], Tensor]


class LabPipeline:
    """A lab transformer with its word embedding and spec (see the module doc).

    Attributes: ``transformer`` (the diffusers model), ``text`` (:class:`WordEmbedding`), ``spec``
    (:class:`DitSpec`), ``lab`` (the ``lab_dit.json`` settings)."""

    def __init__(self, transformer: nn.Module, text: WordEmbedding, spec: DitSpec,
                 lab: dict[str, Any] | None = None) -> None:
        self.transformer, self.text, self.spec = transformer, text, spec
        self.lab = dict(lab or {})

    @classmethod
    def build(cls, spec: DitSpec, *, seed: int = 0) -> LabPipeline:
        """A randomly initialised pipeline (transformer then word embedding, after ``torch.manual_seed(seed)``)."""
        from attnlab.lab.dit.scenes import vocabulary

        transformer = build_transformer(spec, seed=seed)
        text = WordEmbedding(len(vocabulary()), spec.text_dim, spec.max_words)
        return cls(transformer, text, spec, {"spec": spec.to_dict()})

    @property
    def kind(self) -> str:
        """``image`` or ``video``."""
        return self.spec.kind

    @property
    def device(self) -> torch.device:
        """The transformer's device."""
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's dtype (inputs are cast to it; samples come back float32)."""
        return next(self.transformer.parameters()).dtype

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> LabPipeline:
        """Move both modules to ``device`` (and the transformer to ``dtype``); returns self."""
        self.transformer.to(device, dtype)
        self.text.to(device)
        return self

    def eval(self) -> LabPipeline:
        self.transformer.eval()
        self.text.eval()
        return self

    def encode(self, captions: Sequence[str | Sequence[str]]) -> tuple[Tensor, Tensor]:
        """``(encoder_hidden_states (batch, max_words, text_dim), encoder_attention_mask (batch, max_words) bool)`` of
        captions, on the transformer's device and in its dtype (see :func:`~attnlab.lab.dit.model.tokenize`; ConfigError for unknown words)."""
        ids, keep = tokenize(captions, self.spec.max_words)
        hidden = self.text(ids.to(self.text.token.weight.device))  # the table may stay where it is (CPU, float32)
        return hidden.to(self.device, self.dtype), keep.to(self.device)

    def forward_kwargs(self, x: Tensor, t: float | Tensor, hidden: Tensor, keep: Tensor) -> dict[str, Any]:
        """The transformer's keyword arguments for one forward: ``timestep = 1000·t`` as a (batch,) float32
        tensor; PixArt also gets ``encoder_attention_mask`` (Wan's cross-attention takes none)."""
        timestep = torch.as_tensor(t, dtype=torch.float32, device=x.device) * 1000  # float32 in any model dtype
        kwargs = {"hidden_states": x, "encoder_hidden_states": hidden,
                  "timestep": timestep.expand(x.shape[0]).contiguous(), "return_dict": False}
        if self.kind == "image":
            kwargs["encoder_attention_mask"] = keep
        return kwargs

    def velocity(self, x: Tensor, t: float | Tensor, hidden: Tensor, keep: Tensor) -> Tensor:
        """One transformer forward: the predicted velocity ``noise − x0``, shaped like ``x`` ((batch, 3, 32, 32)
        or (batch, 3, frames, 32, 32)); ``t`` in [0, 1] (a float or (batch,))."""
        return self.transformer(**self.forward_kwargs(x, t, hidden, keep))[0]

    def cfg_velocity(self, x: Tensor, t: float, cond: Condition) -> Tensor:
        """Classifier-free guidance (Ho & Salimans 2022): ``v_null + guidance·(v_caption − v_null)``; the caption's
        forward alone when ``guidance == 1``."""
        conditional = self.velocity(x, t, cond.hidden, cond.keep)
        if cond.guidance == 1:
            return conditional
        unconditional = self.velocity(x, t, cond.null_hidden, cond.null_keep)
        return unconditional + cond.guidance * (conditional - unconditional)

    def noise(self, batch: int, *, seed: int, frames: int | None = None) -> Tensor:
        """The sampler's starting noise: (batch, 3, 32, 32) or (batch, 3, frames, 32, 32) from a CPU
        ``torch.Generator`` seeded with ``seed`` (the same on every device), in the transformer's dtype."""
        from attnlab.lab.dit.scenes import SIZE

        shape = (batch, 3, SIZE, SIZE) if self.kind == "image" else (batch, 3, frames, SIZE, SIZE)
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=generator).to(self.device, self.dtype)

    @torch.no_grad()
    def sample(self, captions: Sequence[str | Sequence[str]], steps: int = 20, guidance: float = 3.0, seed: int = 0,
               frames: int | None = None, predict: Predict | None = None, progress: ProgressArg = None) -> Tensor:
        """Generate one image (video) per caption: the Euler sampler of the module doc.

        Args:
            captions: text (words split on whitespace) or word sequences; ``""`` is the empty caption.
            steps: Euler steps (≥ 1). guidance: CFG scale (> 0; 1 = caption only). seed: the noise seed.
            frames: video frames (default ``spec.frames``; 1 … 16); must be None for the image model.
            predict: ``predict(x, t, cond) -> velocity`` replacing :meth:`cfg_velocity`.

        Returns (batch, 3, 32, 32), or (batch, 3, frames, 32, 32) for video, float32 in [0, 1] on the CPU.
        Raises ConfigError (one line) for bad steps, guidance, frames or caption words."""
        frames = self._check_sample(steps, guidance, frames)
        hidden, keep = self.encode(list(captions))
        null_hidden, null_keep = self.encode([""])
        cond = Condition(hidden, keep, null_hidden.expand_as(hidden), null_keep.expand_as(keep), float(guidance))
        x = self.noise(len(hidden), seed=seed, frames=frames)
        predict = predict or self.cfg_velocity
        times = torch.linspace(1, 0, steps + 1).tolist()
        with progress_to(progress) as notify:
            for index in range(steps):
                x = x - (times[index] - times[index + 1]) * predict(x, times[index], cond)
                notify(index + 1, steps, f"sampling step {index + 1}/{steps}")
        return ((x.clamp(-1, 1) + 1) / 2).float().cpu()

    def _check_sample(self, steps: int, guidance: float, frames: int | None) -> int | None:
        from attnlab.lab.dit.scenes import HORIZON

        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"expected steps >= 1, got {steps!r}")
        if not guidance > 0:
            raise ConfigError(f"expected guidance > 0, got {guidance!r}")
        if self.kind == "image":
            if frames is not None:
                raise ConfigError(f"the image model takes no frames, got frames={frames!r}")
            return None
        frames = self.spec.frames if frames is None else frames
        if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= HORIZON:
            raise ConfigError(f"expected frames in 1 … {HORIZON}, got {frames!r}")
        return frames


def to_uint8(images: Tensor) -> Any:
    """Sampler output in [0, 1] → numpy uint8 channels-last: (batch, 32, 32, 3) or (batch, frames, 32, 32, 3)."""
    array = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return array.movedim(1, -1).numpy()


def save_pipeline(pipe: LabPipeline, folder: str | Path) -> Path:
    """Write ``pipe`` into ``folder`` (created; existing files replaced) in the module doc's format; returns it."""
    from safetensors.torch import save_file

    from attnlab.capture.loading import no_hf_progress_bars
    from attnlab.lab.dit.scenes import vocabulary

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with no_hf_progress_bars():
        pipe.transformer.save_pretrained(folder / TRANSFORMER, safe_serialization=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in pipe.text.state_dict().items()}, folder / TEXT_EMBEDDING)
    lab = {**pipe.lab, "format": FORMAT, "kind": pipe.kind, "spec": pipe.spec.to_dict(),
           "vocabulary": list(vocabulary())}
    (folder / LAB_JSON).write_text(json.dumps(lab, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def pipeline_path(path: str | Path) -> Path:
    """``path/checkpoint`` when ``path`` is a training's output folder, else ``path``."""
    path = Path(path)
    if not (path / LAB_JSON).is_file() and (path / "checkpoint" / LAB_JSON).is_file():
        return path / "checkpoint"
    return path


def is_lab_dit_dir(path: str | Path) -> bool:
    """True when ``path`` (or ``path/checkpoint``) holds a ``lab_dit.json`` marker."""
    try:
        return (pipeline_path(path) / LAB_JSON).is_file()
    except (OSError, TypeError, ValueError):
        return False


def load_pipeline(path: str | Path, *, device: str | torch.device = "cpu") -> LabPipeline:
    """Load a folder written by :func:`save_pipeline` (or a training's ``--out``), in eval mode, float32.

    Raises ConfigError (one line) when it is not a lab DiT folder or was written with another vocabulary."""
    from diffusers import PixArtTransformer2DModel, WanTransformer3DModel
    from safetensors.torch import load_file

    from attnlab.capture.loading import no_hf_progress_bars
    from attnlab.lab.dit.scenes import vocabulary

    folder = pipeline_path(path)
    try:
        lab = json.loads((folder / LAB_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} is not a DiT lab folder (cannot read {LAB_JSON}: "
                          f"{' '.join(str(error).split())})") from None
    if not isinstance(lab, dict) or not isinstance(lab.get("spec"), dict):
        raise ConfigError(f"{folder / LAB_JSON} is not a DiT lab marker (expected a JSON object with 'spec')")
    if lab.get("vocabulary") != list(vocabulary()):
        raise ConfigError(f"{folder} was written with another caption vocabulary than this attnlab's")
    spec = DitSpec(**lab["spec"])
    model_class = PixArtTransformer2DModel if spec.kind == "image" else WanTransformer3DModel
    with no_hf_progress_bars():
        transformer = model_class.from_pretrained(folder / TRANSFORMER, local_files_only=True)
    text = WordEmbedding(len(vocabulary()), spec.text_dim, spec.max_words)
    text.load_state_dict(load_file(folder / TEXT_EMBEDDING))
    return LabPipeline(transformer, text, spec, lab).to(device).eval()
