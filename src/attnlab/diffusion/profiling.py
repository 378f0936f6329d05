"""ProfilingDiT: foreground/background attention profiles per block, block classes, and block caching over steps.

Ma et al. 2025, "Model Reveals What to Cache: Profiling-Based Feature Reuse for Video Diffusion Models" (ICCV 2025,
arXiv 2504.03140; METHODS.md #44). The abstract states two observations: most blocks prefer either foreground or
background regions consistently, and the predicted noise changes a lot between early steps and little later. The
method keeps full computation for foreground-focused blocks and reuses cached features of background-focused
blocks. attnlab's pieces:

- **Profile** (our definition; the paper's formula was not recovered): for an attention layer with image keys, with
  a_q(k) the head-averaged attention image query q pays to image key k and a foreground mask over the patches,
  ``fg_share = Σ_q Σ_{k∈fg} a_q(k) / Σ_q Σ_{k∈image} a_q(k)`` (pooled over queries, sequences and calls) and
  ``preference = logit(fg_share) - logit(fg_area)``, fg_area = |fg| / P: 0 when the layer attends to the
  foreground in proportion to its area, > 0 foreground-focused, < 0 background-focused.
  :func:`foreground_share` computes it from probs; the ``fg_profile`` probe accumulates it in a Session.
- **Classes**: :func:`block_preference` averages the layers of each transformer block (and the profiled steps);
  :func:`classify_blocks` labels a block ``foreground`` (preference > margin), ``background`` (< -margin) or
  ``mixed`` (margin 0 by default: every block gets one of the two classes, as in the paper).
- **Caching rule** (from the released code, ``DitCache``, uniform schedule): steps before ``step_start`` compute
  everything; from then on, every ``interval``-th step (``(s - step_start) % interval == 0``) is a *compute step*:
  every block runs and each cached block stores its residual delta ``output - input``; on the other steps the
  cached blocks (the background ones) are skipped and return ``input + stored delta``; the other blocks run.
  Defaults from the released Wan2.1 script: step_start 6, interval 6. :class:`BlockCache` applies it with torch
  module wrappers and reports the block evaluations skipped. (``mode="output"`` reuses the stored output itself.)
- **Inter-step similarity**: :func:`step_similarity` (cosine of two steps' predictions) and
  :func:`choose_step_start` (the first step from which the similarity stays ≥ a threshold: our rule to set
  ``step_start``; the paper motivates a late start by this observation without a formula here).
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from attnlab.diffusion.session import BLOCK_LISTS
from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.cross_maps import foreground_share, preference

__all__ = ["BlockCache", "block_preference", "choose_step_start", "classify_blocks", "find_blocks",
           "foreground_share", "preference", "step_similarity"]


def block_preference(layer_preference: dict[int, float], layer_block: dict[int, int]) -> dict[int, float]:
    """Per transformer block: the mean preference of its profiled attention layers (NaN layers skipped).

    Args:
        layer_preference: {layer: preference} (already averaged over steps, or one step's).
        layer_block: {layer: block index} (``DiffusionSession.layer_table()``'s ``layer``/``block`` columns).
    """
    sums: dict[int, list[float]] = {}
    for layer, value in layer_preference.items():
        if layer not in layer_block:
            raise ConfigError(f"layer {layer} has no block in layer_block ({sorted(layer_block)})")
        if not math.isnan(value):
            sums.setdefault(layer_block[layer], []).append(value)
    return {block: sum(values) / len(values) for block, values in sorted(sums.items())}


def classify_blocks(block_pref: dict[int, float], margin: float = 0.0) -> dict[int, str]:
    """``foreground`` (preference > margin), ``background`` (< -margin) or ``mixed`` per block."""
    if margin < 0:
        raise ConfigError(f"margin must be >= 0, got {margin}")
    return {block: "foreground" if p > margin else "background" if p < -margin else "mixed"
            for block, p in block_pref.items()}


def step_similarity(previous: Tensor, current: Tensor) -> float:
    """Cosine similarity of two steps' predictions (e.g. the transformer's noise/velocity outputs), flattened."""
    if previous.shape != current.shape:
        raise ShapeError(f"step_similarity needs equal shapes, got {tuple(previous.shape)} and {tuple(current.shape)}")
    a, b = previous.double().flatten(), current.double().flatten()
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-300))


def choose_step_start(similarities: Sequence[float], threshold: float = 0.95) -> int:
    """The first step s such that ``similarities[i] ≥ threshold`` for every i ≥ s - 1 (``similarities[i]`` compares
    steps i and i+1); len(similarities) + 1 when the tail never settles (then nothing is cached). Our rule."""
    if not -1.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold must be a cosine in [-1, 1], got {threshold}")
    start = len(similarities)
    while start > 0 and similarities[start - 1] >= threshold:
        start -= 1
    return start + 1


def find_blocks(model: nn.Module, names: Sequence[str] = BLOCK_LISTS) -> list[tuple[nn.ModuleList, int]]:
    """The transformer blocks as ``(module list, index in it)`` in global block order (the lists in ``names``
    order). Raises ConfigError when the model has none of them."""
    found = [(blocks, i) for name in names if isinstance(blocks := getattr(model, name, None), nn.ModuleList)
             for i in range(len(blocks))]
    if not found:
        raise ConfigError(f"{type(model).__name__} has no block list among {list(names)}; pass block_lists=")
    return found


def _detached(output: Any) -> Any:
    return output.detach() if isinstance(output, Tensor) else \
        tuple(None if o is None else o.detach() for o in output) if isinstance(output, tuple) else output


class _Cached(nn.Module):
    """A block wrapped by :class:`BlockCache` for the duration of its context."""

    def __init__(self, block: nn.Module, index: int, cache: BlockCache) -> None:
        super().__init__()
        self.block, self.index = block, index
        self._owner = [cache]  # a list: not registered as a submodule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._owner[0].run(self, args, kwargs)


def _inputs(args: tuple, kwargs: dict) -> tuple[Tensor | None, Tensor | None]:
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
    encoder = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else \
        (args[1] if len(args) > 1 and isinstance(args[1], Tensor) else None)
    return hidden, encoder


def _pairing(output: Any, hidden: Tensor | None, encoder: Tensor | None) -> tuple[str, ...]:
    """Which input (``"hidden"`` or ``"encoder"``) each output tensor is a residual update of: a tensor output ↔
    hidden_states; a 2-tuple (diffusers' joint blocks return ``(encoder_hidden_states, hidden_states)``) ↔
    (encoder, hidden), or the swapped pair when only those shapes match."""
    if isinstance(output, Tensor):
        if hidden is not None and output.shape == hidden.shape:
            return ("hidden",)
    elif isinstance(output, tuple) and len(output) == 2:
        def fits(out: Any, inp: Tensor | None) -> bool:
            return out is None or (inp is not None and isinstance(out, Tensor) and out.shape == inp.shape)
        if fits(output[0], encoder) and fits(output[1], hidden):
            return "encoder", "hidden"
        if fits(output[0], hidden) and fits(output[1], encoder):
            return "hidden", "encoder"
    shapes = [None if o is None else tuple(o.shape) for o in (output if isinstance(output, tuple) else (output,))]
    raise ConfigError(f"BlockCache cannot pair the block's outputs {shapes} with its inputs (hidden_states "
                      f"{None if hidden is None else tuple(hidden.shape)}, encoder_hidden_states "
                      f"{None if encoder is None else tuple(encoder.shape)}); use mode='output'")


class BlockCache:
    """ProfilingDiT's block caching as a context manager on a diffusers transformer (module docstring).

    Inside ``with BlockCache(transformer, cached_blocks=...)``, every block of :func:`find_blocks` is wrapped in a
    small module (swapped into its ``ModuleList``, restored on exit). The denoising step is read from each
    forward's ``timestep`` argument (the :class:`attnlab.diffusion.DiffusionSession` rule: a new step when it
    changes, step 0 again when it rises; several forwards at one timestep, e.g. CFG in two passes, keep separate
    caches) or set with :meth:`set_step`.

    Args:
        model: the transformer. cached_blocks: global block indices reused on non-compute steps (the background
            blocks of :func:`classify_blocks`). step_start, interval: the schedule (defaults 6, 6: the released
            Wan2.1 script). mode: ``"delta"`` (input + stored residual delta; the released code) or ``"output"``
            (the stored output). block_lists: attribute names of the block lists (:data:`BLOCK_LISTS`).

    Attributes:
        evaluated, skipped: Counters {block: count} of block calls run and reused.

    Raises:
        ConfigError: a block index the model does not have, interval < 1, step_start < 0, or a block output that
            cannot be paired with its inputs (``mode="delta"``).
    """

    def __init__(self, model: nn.Module, cached_blocks: Sequence[int], step_start: int = 6, interval: int = 6,
                 mode: Literal["delta", "output"] = "delta", block_lists: Sequence[str] = BLOCK_LISTS) -> None:
        self.model, self.blocks = model, find_blocks(model, block_lists)
        self.cached = frozenset(int(b) for b in cached_blocks)
        if any(b < 0 or b >= len(self.blocks) for b in self.cached):
            raise ConfigError(f"cached_blocks {sorted(self.cached)} outside the model's {len(self.blocks)} blocks")
        if interval < 1 or step_start < 0 or mode not in ("delta", "output"):
            raise ConfigError(f"BlockCache needs interval >= 1, step_start >= 0 and mode delta|output, got "
                              f"{interval}, {step_start}, {mode!r}")
        self.step_start, self.interval, self.mode = step_start, interval, mode
        self.evaluated: Counter[int] = Counter()
        self.skipped: Counter[int] = Counter()
        self.step, self._pass, self._timestep, self._manual = 0, -1, None, False
        self._store: dict[tuple[int, int], tuple[Any, ...]] = {}
        self._handle: Any = None

    # schedule -----------------------------------------------------------------------------------------------------
    def is_compute_step(self, step: int) -> bool:
        """True when every block runs at ``step`` (before step_start, and every interval-th step from it)."""
        return step < self.step_start or (step - self.step_start) % self.interval == 0

    def schedule(self, num_steps: int) -> Tensor:
        """(num_steps, num_blocks) bool: True where a block is reused (skipped) at a step."""
        table = torch.zeros(num_steps, len(self.blocks), dtype=torch.bool)
        for step in range(num_steps):
            if not self.is_compute_step(step):
                table[step, sorted(self.cached)] = True
        return table

    def set_step(self, step: int) -> None:
        """Fix the denoising step of the next forwards (overrides the timestep rule until the context ends)."""
        if step < 0:
            raise ConfigError(f"step must be >= 0, got {step}")
        self.step, self._pass, self._manual = step, -1, True

    # context ------------------------------------------------------------------------------------------------------
    def __enter__(self) -> BlockCache:
        for index, (blocks, i) in enumerate(self.blocks):
            blocks[i] = _Cached(blocks[i], index, self)
        self._handle = self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        for blocks, i in self.blocks:
            if isinstance(blocks[i], _Cached):
                blocks[i] = blocks[i].block
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._store = None, {}

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._manual:
            self._pass += 1
            return
        t = kwargs.get("timestep")
        if t is None and args:  # passed by position: find it through the forward's signature
            try:
                t = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments.get("timestep")
            except TypeError:
                t = None
        value = float(t.reshape(-1)[0]) if isinstance(t, Tensor) else (float(t) if t is not None else None)
        if value is None or self._timestep is None:
            self.step, self._pass = (0, 0) if self._timestep is None else (self.step + 1, 0)
        elif value == self._timestep:
            self._pass += 1
        else:
            self.step, self._pass = (0, 0) if value > self._timestep else (self.step + 1, 0)
        self._timestep = value

    # the wrapped block --------------------------------------------------------------------------------------------
    def run(self, wrapper: _Cached, args: tuple, kwargs: dict) -> Any:
        """The wrapped block's forward: reuse the stored result on a non-compute step, else run (and store)."""
        index, key = wrapper.index, (wrapper.index, max(self._pass, 0))
        hidden, encoder = _inputs(args, kwargs)
        if index in self.cached and not self.is_compute_step(self.step) and key in self._store:
            self.skipped[index] += 1
            stored, names, single = self._store[key]
            if self.mode == "output":
                return stored
            inputs = {"hidden": hidden, "encoder": encoder}
            outs = tuple(None if d is None else inputs[n] + d for d, n in zip(stored, names))
            return outs[0] if single else outs
        output = wrapper.block(*args, **kwargs)
        self.evaluated[index] += 1
        if index in self.cached and self.step >= self.step_start and self.is_compute_step(self.step):
            if self.mode == "output":
                self._store[key] = (_detached(output), (), False)
            else:
                names = _pairing(output, hidden, encoder)
                outs = (output,) if isinstance(output, Tensor) else output
                inputs = {"hidden": hidden, "encoder": encoder}
                deltas = tuple(None if o is None else (o - inputs[n]).detach() for o, n in zip(outs, names))
                self._store[key] = (deltas, names, isinstance(output, Tensor))
        return output

    def report(self) -> dict[str, Any]:
        """Block evaluations run and skipped: totals, the skipped fraction and per-block counts."""
        run, skip = sum(self.evaluated.values()), sum(self.skipped.values())
        return {"evaluated": run, "skipped": skip, "skipped_fraction": skip / (run + skip) if run + skip else 0.0,
                "per_block": {b: {"evaluated": self.evaluated[b], "skipped": self.skipped[b]}
                              for b in range(len(self.blocks))},
                "cached_blocks": sorted(self.cached), "step_start": self.step_start, "interval": self.interval,
                "mode": self.mode}
