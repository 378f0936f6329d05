"""RefAM on text→image cross-attention maps: attention magnets, global attention sinks, the grounding map.

After Kukleva et al. 2025, "RefAM: Attention Magnets for Zero-Shot Referral Segmentation" (METHODS.md #16; low
confidence: abstract, project page and introduction). The paper's ideas, as attnlab implements them:

- *Attention magnets*: stop words absorb surplus attention; their maps are noise. :func:`magnet_indices` marks them
  from the caption's token strings with the stop-word list of :mod:`attnlab.probes.magnets`.
- *Global attention sinks (GAS)*: text tokens that receive high attention uniformly from every image token
  (deeper layers). The paper gives no numeric rule; attnlab's rule (:func:`gas_scores`, :func:`detect_gas`) is
  **our choice**: per layer, for text token t with head-averaged map a_t(p) over the P patches,
  ``enrichment_t = (Σ_p a_t(p) / Σ_p Σ_t' a_t'(p)) · T`` (its share of all text-directed attention over the uniform
  share 1/T) and ``coverage_t`` = the fraction of patches p for which ``a_t(p) ≥ Σ_t' a_t'(p) / T`` (patch p pays
  t at least its uniform share). t is a GAS when ``enrichment_t ≥ min_enrichment`` (default 2) **and**
  ``coverage_t ≥ min_coverage`` (default 0.9): much attention, and from almost everywhere.
- *Grounding map*: the mean of the content tokens' maps (all text tokens but magnets, GAS and padding), aggregated
  over chosen layers and steps (the caller stacks them; :func:`grounding_map`), min–max normalised. Its peak gives a
  point (:func:`peak_point`), thresholding a mask (:func:`threshold_mask`; the paper prompts SAM with the point,
  attnlab stops at the thresholded map).
- *Redistribution*: extra stop words appended to the caption split the background attention into small clusters
  (:func:`append_stop_words`; a prompt-level operation, the words are our choice).
- Suppressing GAS/magnets inside the model: the ``suppress_keys`` edit (:mod:`attnlab.edits.suppress_keys`).

Shapes follow :mod:`attnlab.functional.cross_maps`: ``maps`` (B, T, F, R, C) or (T, F, R, C).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnlab.functional.cross_maps import check_indices, normalise_maps
from attnlab.errors import ConfigError, ShapeError
from attnlab.probes.magnets import STOP_WORDS, token_class

__all__ = ["DEFAULT_EXTRA_STOP_WORDS", "append_stop_words", "content_indices", "detect_gas", "gas_scores",
           "grounding_map", "magnet_indices", "peak_point", "threshold_mask"]

DEFAULT_EXTRA_STOP_WORDS: tuple[str, ...] = ("the", "of", "and", "a", "with")
"""Words :func:`append_stop_words` appends by default (our choice; the paper's list was not recovered)."""

MIN_ENRICHMENT = 2.0
MIN_COVERAGE = 0.9


def magnet_indices(tokens: Sequence[str]) -> list[int]:
    """Indices of the attention magnets among a caption's decoded text tokens: stop words (the case-insensitive
    list of :data:`attnlab.probes.magnets.STOP_WORDS`, SentencePiece/BPE space markers ``▁``/``Ġ`` stripped) and
    tokens made only of punctuation or symbols (end-of-text ``</s>`` counts as a magnet too)."""
    out = []
    for i, text in enumerate(tokens):
        word = text.replace("▁", " ").replace("Ġ", " ").strip()
        if not word or word.lower() in STOP_WORDS or token_class(word) in (1, 2) or \
                (word.startswith("<") and word.endswith(">")):
            out.append(i)
    return out


def append_stop_words(caption: str, words: Sequence[str] = DEFAULT_EXTRA_STOP_WORDS) -> str:
    """RefAM's redistribution: ``caption`` with ``words`` appended, separated by spaces (``"a red car"`` →
    ``"a red car the of and a with"``). Raises ConfigError when a word is not a stop word (the point is to add
    magnets, not content)."""
    extra = [w.strip() for w in words]
    bad = [w for w in extra if w.lower() not in STOP_WORDS]
    if bad or not extra:
        raise ConfigError(f"append_stop_words appends stop words (attnlab.probes.magnets.STOP_WORDS), got "
                          f"{bad or words}")
    return " ".join([caption.rstrip(), *extra])


def _text_maps(maps: Tensor) -> Tensor:
    if maps.dim() == 4:
        maps = maps[None]
    if maps.dim() != 5:
        raise ShapeError(f"maps must be (B, T, F, R, C) or (T, F, R, C), got shape {tuple(maps.shape)}")
    return maps


def gas_scores(maps: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Enrichment and coverage of every text token (the GAS rule's two numbers; module docstring), pooled over the
    batch.

    Args:
        maps: (B, T, F, R, C) or (T, F, R, C) non-negative maps of one layer (head-averaged attention).
        valid: (T,) or (B, T) bool, real text tokens (None = all); padding neither counts in T nor is scored.
    Returns:
        ``(enrichment (T,), coverage (T,))`` float64; NaN for tokens that are never valid.
    """
    maps = _text_maps(maps).double()
    B, T = maps.shape[:2]
    valid = torch.ones(B, T, dtype=torch.bool, device=maps.device) if valid is None else valid.to(maps.device)
    valid = valid.expand(B, T) if valid.dim() == 1 else valid
    if valid.shape != (B, T):
        raise ShapeError(f"valid must be (T,) or (B, T) = ({T},) or ({B}, {T}), got {tuple(valid.shape)}")
    flat = maps.flatten(2) * valid[..., None]  # (B, T, P)
    count = valid.sum(dim=1).clamp_min(1).double()  # (B,) real text tokens
    mass = flat.sum(dim=2)  # (B, T)
    share = mass / mass.sum(dim=1, keepdim=True).clamp_min(1e-300)
    fair = flat.sum(dim=1, keepdim=True) / count[:, None, None]  # (B, 1, P) each patch's uniform share
    covered = ((flat >= fair) & (fair > 0)).double().mean(dim=2)  # (B, T)
    seen = valid.sum(dim=0).double()  # (T,)
    nan = torch.full_like(seen, float("nan"))
    enrichment = torch.where(seen > 0, (share * count[:, None] * valid).sum(0) / seen.clamp_min(1), nan)
    coverage = torch.where(seen > 0, (covered * valid).sum(0) / seen.clamp_min(1), nan)
    return enrichment, coverage


def detect_gas(maps: Tensor, valid: Tensor | None = None, min_enrichment: float = MIN_ENRICHMENT,
               min_coverage: float = MIN_COVERAGE) -> Tensor:
    """(T,) bool: the global attention sinks of one layer's maps: ``enrichment ≥ min_enrichment`` and
    ``coverage ≥ min_coverage`` (:func:`gas_scores`; thresholds are our choice, module docstring).

    Raises:
        ConfigError: min_enrichment < 1 (a sink must get more than its uniform share) or min_coverage outside (0, 1].
    """
    if not min_enrichment >= 1.0 or not 0.0 < min_coverage <= 1.0:
        raise ConfigError(f"detect_gas needs min_enrichment >= 1 and 0 < min_coverage <= 1, got {min_enrichment} "
                          f"and {min_coverage}")
    enrichment, coverage = gas_scores(maps, valid)
    return (enrichment >= min_enrichment) & (coverage >= min_coverage)


def content_indices(num_text: int, magnets: Sequence[int] = (), sinks: Sequence[int] | Tensor = (),
                    valid: Tensor | None = None) -> list[int]:
    """The text tokens that enter the grounding map: 0…num_text-1 minus magnets, GAS and invalid (padding) tokens.

    Args:
        sinks: indices, or a (T,) bool such as :func:`detect_gas` returns. valid: (T,) bool or None.
    Raises:
        ConfigError: an index out of range, or nothing left.
    """
    if isinstance(sinks, Tensor):
        if sinks.shape != (num_text,):
            raise ShapeError(f"sinks as a mask must be ({num_text},), got {tuple(sinks.shape)}")
        sinks = sinks.nonzero().flatten().tolist()
    drop = set(check_indices("magnets", list(dict.fromkeys(magnets)), num_text))
    drop |= set(check_indices("sinks", list(dict.fromkeys(sinks)), num_text))
    if valid is not None:
        drop |= set((~valid.bool().cpu()).nonzero().flatten().tolist())
    keep = [t for t in range(num_text) if t not in drop]
    if not keep:
        raise ConfigError(f"no content token left among {num_text} text tokens after removing magnets and sinks")
    return keep


def grounding_map(maps: Tensor, content: Sequence[int]) -> Tensor:
    """RefAM's grounding map: the mean of the content tokens' maps, min–max normalised to [0, 1].

    Args:
        maps: (B, T, F, R, C) or (T, F, R, C), already aggregated over the chosen layers and steps (e.g. the mean of
            :func:`attnlab.functional.cross_maps.spatial_maps` over them). content: text token indices
            (:func:`content_indices`).
    Returns:
        (B, F, R, C), or (F, R, C) for an unbatched input; maps' dtype; a flat map becomes all 0.
    """
    unbatched = maps.dim() == 4
    maps = _text_maps(maps)
    chosen = check_indices("content", list(content), maps.shape[1])
    if not chosen:
        raise ConfigError("grounding_map needs at least one content token")
    index = torch.tensor(chosen, device=maps.device)
    out = normalise_maps(maps.index_select(1, index).mean(dim=1), "minmax")
    return out[0] if unbatched else out


def peak_point(grounding: Tensor) -> Tensor:
    """(B, 3) long (or (3,) unbatched): the (frame, row, col) of each map's maximum (first in raster order on ties)."""
    unbatched = grounding.dim() == 3
    g = grounding[None] if unbatched else grounding
    if g.dim() != 4:
        raise ShapeError(f"grounding must be (B, F, R, C) or (F, R, C), got shape {tuple(grounding.shape)}")
    _, F, R, C = g.shape
    flat = g.flatten(1).argmax(dim=1)  # (B,)
    point = torch.stack((flat // (R * C), (flat // C) % R, flat % C), dim=1)
    return point[0] if unbatched else point


def threshold_mask(grounding: Tensor, fraction: float = 0.5) -> Tensor:
    """bool, grounding's shape: patches at ≥ ``fraction`` of their map's maximum (default 0.5, our choice).

    Raises:
        ConfigError: fraction outside (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"threshold_mask fraction must be in (0, 1], got {fraction}")
    peak = grounding.amax(dim=(-3, -2, -1), keepdim=True)
    return (grounding >= fraction * peak) & (peak > 0)
