"""Guidance for diffusion sampling: classifier-free guidance, perturbation guidance (PAG / SoftPAG) and a predictor
that runs SoftPAG's perturbed branch inside a :class:`~attnlab.diffusion.DiffusionSession`.

    predict = softpag_predictor(transformer, heads=[(2, 0), (4, 1)], alpha=0.5, scale=3.0, cfg_scale=4.0,
                                forward=lambda x, t, cond: transformer(x, timestep=t, class_labels=cond).sample,
                                null_cond=null_labels)
    velocity = predict(x_t, t, labels)      # any sampler that calls predict(x, t, cond) at each step

The combinations are pure functions of the branch predictions. Each is an *affine* combination (its weights sum
to 1: ``(1 - s)·ε_u + (s + w)·ε_c - w·ε̃_c``), so it commutes with every per-step affine change of parametrisation
given ``x_t`` and ``t``: ε, x₀ and a flow-matching velocity (``ε = x_t + (1 - t)·v`` for ``x_t = (1 - t)·x₀ +
t·ε``) give the same guided sample. Nothing here knows which one the model predicts.

Shapes: every prediction is one tensor of the model's output shape, e.g. (B, C, H, W) for an image DiT or
(B, C, F, H, W) for a video one; all branches of one combination have the same shape.

Sources: classifier-free guidance, Ho & Salimans 2022 (written as ``ε_u + s·(ε_c - ε_u)``); perturbed-attention
guidance (PAG), Ahn et al. 2024; SoftPAG, Ahn et al. 2025, "Fine-Grained Perturbation Guidance via Attention Head
Selection", §3 (METHODS.md #14, medium confidence): ``ε̂ = ε + w·(ε - ε̃)`` with ε̃ the prediction of the model
whose selected heads' attention is ``(1-α)·A + α·I`` (the ``identity_blend`` edit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from attnlab.diffusion.session import DiffusionSession, attention_modules
from attnlab.edits.identity_blend import IdentityBlend
from attnlab.errors import ConfigError, ShapeError

__all__ = ["Forward", "Head", "attention_kind", "cfg", "cfg_perturbation_guidance", "check_heads", "head_pairs",
           "perturbable_heads",
           "perturbation_guidance", "softpag_edits", "softpag_predictor"]

Head = tuple[int, int]  # (attnlab layer = attention module index, head index)
Forward = Callable[[Tensor, Tensor, Any], Tensor]  # (x_t, t, cond) -> prediction (ε, x₀ or velocity)
PERTURBABLE_KINDS = ("self", "joint")  # attention kinds whose map has an identity (queries = keys)


def _scale(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _same_shape(**tensors: Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        raise ShapeError("guidance branches must have one shape, got "
                         + ", ".join(f"{name} {shape}" for name, shape in shapes.items()))


def cfg(uncond: Tensor | None, cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: ``ε_u + s·(ε_c - ε_u)`` (Ho & Salimans 2022).

    Args:
        uncond: ε_u, the prediction without the condition (any shape); may be None when ``scale == 1``.
        cond: ε_c, the conditional prediction, same shape. scale: s (1 = no guidance, 0 = unconditional).

    Returns:
        The guided prediction, shape of ``cond``. ``scale == 1`` returns ``cond`` itself (exactly; the formula
        would round), ``scale == 0`` returns ``uncond``.

    Raises:
        ConfigError: scale not finite, or ``uncond`` None with ``scale != 1``. ShapeError: shapes differ.
    """
    scale = _scale("cfg_scale", scale)
    if scale == 1:
        return cond
    if uncond is None:
        raise ConfigError(f"cfg_scale={scale} needs the unconditional prediction, got None")
    _same_shape(uncond=uncond, cond=cond)
    return uncond if scale == 0 else uncond + scale * (cond - uncond)


def perturbation_guidance(pred: Tensor, perturbed: Tensor | None, scale: float) -> Tensor:
    """Perturbation guidance (PAG, SoftPAG): ``ε̂ = ε + w·(ε - ε̃)``, away from the perturbed ("weak") model.

    Ahn et al. 2025, §3 (METHODS.md #14); the same form as PAG (Ahn et al. 2024).

    Args:
        pred: ε, the prediction of the unchanged model (any shape).
        perturbed: ε̃, the prediction with the selected heads perturbed, same shape; may be None when ``scale == 0``.
        scale: w (0 = no guidance; may be negative, which guides toward the weak model).

    Returns:
        The guided prediction, shape of ``pred``; ``scale == 0`` returns ``pred`` itself (exactly).

    Raises:
        ConfigError: scale not finite, or ``perturbed`` None with ``scale != 0``. ShapeError: shapes differ.
    """
    scale = _scale("scale", scale)
    if scale == 0:
        return pred
    if perturbed is None:
        raise ConfigError(f"scale={scale} needs the perturbed prediction, got None")
    _same_shape(pred=pred, perturbed=perturbed)
    return pred + scale * (pred - perturbed)


def cfg_perturbation_guidance(uncond: Tensor | None, cond: Tensor, perturbed: Tensor | None, cfg_scale: float,
                              scale: float) -> Tensor:
    """CFG and perturbation guidance together: ``ε̂ = ε_u + s·(ε_c - ε_u) + w·(ε_c - ε̃_c)``.

    The perturbed branch runs on the *conditional* input (ε̃_c), and its term is added to CFG's result. This is
    the combination of diffusers' PAG pipelines (``PAGMixin._apply_perturbed_attention_guidance`` in
    ``diffusers/pipelines/pag/pag_utils.py``: ``uncond + guidance_scale·(text - uncond) + pag_scale·(text -
    perturb)``) and of PAG with CFG (Ahn et al. 2024). Why this one: each term is one direction measured at the
    same conditional point, CFG toward the condition and PAG away from the weak model, so the two scales are
    independent knobs; ``s = 1`` gives :func:`perturbation_guidance` (ε_c + w·(ε_c - ε̃_c)) and ``w = 0`` gives
    :func:`cfg`. Its weights sum to 1 (see the module docstring), so it applies to ε, x₀ or velocity alike.

    Args:
        uncond: ε_u (None allowed when ``cfg_scale == 1``). cond: ε_c. perturbed: ε̃_c (None allowed when
            ``scale == 0``). All the same shape.
        cfg_scale: s (1 = no CFG). scale: w (0 = no perturbation guidance).

    Returns:
        The guided prediction, shape of ``cond``; exactly ``cfg(uncond, cond, cfg_scale)`` when ``scale == 0``.

    Raises:
        ConfigError: a scale not finite, or a branch missing that its scale needs. ShapeError: shapes differ.
    """
    guided = cfg(uncond, cond, cfg_scale)
    scale = _scale("scale", scale)
    if scale == 0:
        return guided
    if perturbed is None:
        raise ConfigError(f"scale={scale} needs the perturbed prediction, got None")
    _same_shape(cond=cond, perturbed=perturbed)
    return guided + scale * (cond - perturbed)


# heads ------------------------------------------------------------------------------------------------------
def attention_kind(module: nn.Module) -> str:
    """``"cross"``, ``"joint"`` or ``"self"``, read from a diffusers attention module's own attributes before any call:
    cross if it says so (``is_cross_attention``: PixArt/Wan ``attn2``), joint if it projects a second stream
    (``added_kv_proj_dim``: SD3, Flux double blocks), else self (DiT, Flux single blocks: queries = keys)."""
    if getattr(module, "is_cross_attention", False):
        return "cross"
    return "joint" if getattr(module, "added_kv_proj_dim", None) is not None else "self"


def _layer_heads(transformer: nn.Module) -> list[tuple[str, int]]:
    """(kind, num_heads) of each attnlab layer (attention module, ``named_modules`` order) of ``transformer``."""
    return [(attention_kind(module), int(module.heads)) for _, module in attention_modules(transformer)]


def perturbable_heads(transformer: nn.Module) -> list[Head]:
    """Every (layer, head) whose attention SoftPAG can perturb: the heads of self- and joint-attention layers.

    Cross-attention layers (patches → text) are left out: their map has no identity (queries are not keys).

    Returns:
        (layer, head) pairs in layer order then head order; layers are attnlab layers (attention modules in
        ``named_modules()`` order, as in ``DiffusionSession.layer_table()``).
    """
    return [(layer, head) for layer, (kind, count) in enumerate(_layer_heads(transformer))
            if kind in PERTURBABLE_KINDS for head in range(count)]


def head_pairs(items: Iterable[Sequence[int]], noun: str = "head") -> list[Head]:
    """``items`` as a list of (layer, head) int pairs, in order, without looking at any model.

    Raises:
        ConfigError: an item that is not a pair of non-negative ints, or a repeated pair (``noun`` names them).
    """
    pairs: list[Head] = []
    for item in items:
        pair = tuple(item) if isinstance(item, (tuple, list)) else (item,)
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair):
            raise ConfigError(f"a {noun} must be a (layer, head) pair of non-negative ints, got {item!r}")
        if pair in pairs:
            raise ConfigError(f"{noun} {pair} is given twice")
        pairs.append(pair)
    return pairs


def check_heads(transformer: nn.Module, heads: Iterable[Sequence[int]]) -> list[Head]:
    """``heads`` as a list of (layer, head) int pairs, checked against ``transformer``.

    Raises:
        ConfigError: an item that is not a pair of non-negative ints, a repeated pair, a layer or head the model
            does not have, or a head of a cross-attention layer.
    """
    layers = _layer_heads(transformer)
    checked = head_pairs(heads)
    for pair in checked:
        layer, head = pair
        if layer >= len(layers):
            raise ConfigError(f"head {pair}: the model has {len(layers)} attention layers (0…{len(layers) - 1}), "
                              f"got layer {layer}")
        kind, count = layers[layer]
        if kind not in PERTURBABLE_KINDS:
            raise ConfigError(f"head {pair}: layer {layer} is {kind} attention; SoftPAG perturbs self or joint "
                              "attention only (its identity map needs queries = keys)")
        if head >= count:
            raise ConfigError(f"head {pair}: layer {layer} has {count} heads (0…{count - 1}), got head {head}")
    return checked


def softpag_edits(heads: Iterable[Head], alpha: float) -> list[IdentityBlend]:
    """One ``identity_blend`` edit per layer of ``heads`` ((layer, head) pairs), each on that layer's heads.

    Raises:
        ConfigError: alpha outside [0, 1].
    """
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    return [IdentityBlend(alpha=alpha, layers=[layer], heads=chosen) for layer, chosen in sorted(by_layer.items())]


def softpag_predictor(transformer: nn.Module, heads: Iterable[Sequence[int]], *, alpha: float = 1.0,
                      scale: float = 3.0, cfg_scale: float = 1.0, forward: Forward,
                      null_cond: Any = None) -> Forward:
    """A ``predict(x, t, cond)`` that returns the SoftPAG-guided prediction (with CFG when ``cfg_scale != 1``).

    Each call runs up to three forwards of ``forward``: the conditional branch ε_c and (if ``cfg_scale != 1``)
    the unconditional branch ε_u = ``forward(x, t, null_cond)`` plainly, and (if ``scale != 0`` and ``heads``)
    the perturbed branch ε̃_c inside its own ``DiffusionSession(transformer, edits=softpag_edits(heads, alpha))``,
    then combines them with :func:`cfg_perturbation_guidance`. Sessions do not nest, so ``predict`` must not be
    called inside another attnlab session on the same thread (the perturbed branch's session refuses to start).
    Sources: Ahn et al. 2025, §3 (METHODS.md #14); the combination's formula and why: see
    :func:`cfg_perturbation_guidance`.

    Exactness: ``scale == 0`` or no heads skips the perturbed branch and returns the plain (CFG) prediction;
    ``alpha == 0`` runs it through the session with identity edits, which leave the forward bit-identical, so the
    result is again exactly the plain prediction.

    Args:
        transformer: the diffusers transformer ``forward`` calls (its attention modules are the layers).
        heads: (layer, head) pairs to perturb (``perturbable_heads`` lists them); empty = no perturbation.
        alpha: SoftPAG's α in [0, 1] (1 = PAG's identity attention). scale: w. cfg_scale: s.
        forward: ``forward(x, t, cond) -> prediction`` (ε, x₀ or velocity; the combination does not care), e.g.
            ``lambda x, t, c: transformer(x, timestep=t, class_labels=c).sample``. Shapes are its own.
        null_cond: the ``cond`` of the unconditional branch (a null class id, an empty-prompt embedding).

    Raises:
        ConfigError: bad heads (see :func:`check_heads`), alpha outside [0, 1], a scale not finite, forward not
            callable.
    """
    if not callable(forward):
        raise ConfigError(f"forward must be a callable (x, t, cond) -> prediction, got {forward!r}")
    scale, cfg_scale = _scale("scale", scale), _scale("cfg_scale", cfg_scale)
    IdentityBlend(alpha=alpha)  # checks alpha even when there are no heads
    edits = softpag_edits(check_heads(transformer, heads), alpha)
    perturb = scale != 0 and bool(edits)

    def predict(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        conditional = forward(x, t, cond)
        unconditional = None if cfg_scale == 1 else forward(x, t, null_cond)
        perturbed = None
        if perturb:
            with DiffusionSession(transformer, edits=edits, verify_rows=0):
                perturbed = forward(x, t, cond)
        return cfg_perturbation_guidance(unconditional, conditional, perturbed, cfg_scale, scale if perturb else 0)

    return predict
