"""Per-token attention patterns: which key each query attends to, for chosen heads, as full (q_len, kv_len) maps.

    import attnlab
    loaded = attnlab.load_model("smollm2-135m")
    pattern = attnlab.attention_pattern(loaded, "To be, or not to be", layers=[3], heads=[0, 1])
    pattern.get(3, 1)           # (q_len, kv_len) float32 tensor over the real tokens
    pattern.to_frame()          # pandas: batch, layer, head, query, key, weight
    pattern.plot(3, 1)          # a matplotlib Figure (attnlab.plot_pattern)

Inside your own session (one :class:`AttentionPattern` per forward pass)::

    with attnlab.Session(model, probes=[PatternProbe(layers=[3], heads=[0, 1])]) as session:
        model(**batch)
    patterns = session.patterns(tokenizer=tokenizer)

:class:`PatternProbe` needs ``{"probs", "every_row"}``, so the session runs the blocked eager kernel (or reads a lab
layer's implied map, path ``implied:<kind>``) and hands it every query block; the probe assembles the blocks, whose
key axis may be narrower than kv_len (keys past ``width`` are 0), into float32 CPU tensors of the chosen
(layer, query head) pairs only: memory is batch · layers · heads · q_len · kv_len floats. Under GQA the heads
are query heads. :func:`report_patterns` makes the report viewer's ``"patterns"`` object (docs/patterns.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attnlab.config import MAX_PATTERN_HEADS, parse_pattern_heads
from attnlab.errors import ConfigError, UnsupportedModelError
from attnlab.facts import ModelFacts
from attnlab.functional.attention import BlockView
from attnlab.probes.base import AttentionCall, Probe, SequenceInfo

__all__ = ["AttentionPattern", "PatternProbe", "attention_pattern", "check_pattern_heads", "report_patterns"]

logger = logging.getLogger(__name__)

Selection = int | Sequence[int] | None


def select_indices(kind: str, value: Selection, count: int) -> tuple[int, ...]:
    """``layers=``/``heads=`` (an int, a sequence of ints, or None for all) → distinct indices in given order.

    Raises ConfigError ``"layers must be in 0..N-1, got 40"`` for an index out of range, or for a non-integer."""
    if value is None:
        return tuple(range(count))
    items = [value] if isinstance(value, int) else list(value) if isinstance(value, Sequence) else None
    if items is None or not items or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise ConfigError(f"{kind} must be an int, a non-empty list of ints or None, got {value!r}")
    bad = [i for i in items if not 0 <= i < count]
    if bad:
        raise ConfigError(f"{kind} must be in 0..{count - 1}, got {bad[0]}")
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True, eq=False)
class AttentionPattern:
    """The attention weights of chosen heads on one forward pass.

    Attributes:
        probs: (batch, num_layers_sel, num_heads_sel, q_len, kv_len) float32 CPU; row i = query i (the queries are
            the last q_len of the kv_len tokens); rows of padding queries and columns of padding keys are 0.
        layers, heads: the layer and query-head index of each slot of axes 1 and 2.
        valid: (batch, kv_len) bool CPU, True for real tokens (not padding).
        tokens: per batch row, the kv_len token strings (``tokenizer.decode([id])``), or None without a tokenizer.
        paths: layer → the attention path the session recorded (``"blocked_eager"``, ``"implied:signed"`` …).
        causal: whether the layers are causal.
    """

    probs: Tensor
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    valid: Tensor
    tokens: list[list[str]] | None = None
    paths: dict[int, str] = field(default_factory=dict)
    causal: bool = True

    def _slot(self, kind: str, value: int, chosen: tuple[int, ...]) -> int:
        if value not in chosen:
            raise ConfigError(f"{kind} {value!r} was not recorded; recorded {kind}s: {', '.join(map(str, chosen))}")
        return chosen.index(value)

    def _batch(self, batch: int) -> int:
        if isinstance(batch, bool) or not isinstance(batch, int) or not 0 <= batch < self.probs.shape[0]:
            raise ConfigError(f"batch must be in 0..{self.probs.shape[0] - 1}, got {batch!r}")
        return batch

    def real(self, batch: int = 0) -> tuple[Tensor, Tensor]:
        """``(query_valid (q_len,), key_valid (kv_len,))`` bool for one batch row."""
        key_valid = self.valid[self._batch(batch)]
        return key_valid[key_valid.shape[0] - self.probs.shape[3]:], key_valid

    def get(self, layer: int, head: int, batch: int = 0) -> Tensor:
        """(n_q, n_k) float32: the weights of ``head`` in ``layer`` on the real tokens of batch row ``batch``
        (padding rows and columns dropped). ConfigError for a layer/head/batch that was not recorded."""
        probs = self.probs[self._batch(batch), self._slot("layer", layer, self.layers),
                           self._slot("head", head, self.heads)]
        query_valid, key_valid = self.real(batch)
        return probs[query_valid][:, key_valid]

    def tokens_of(self, batch: int = 0) -> list[str] | None:
        """The real tokens' strings of batch row ``batch`` (the key axis of :meth:`get`), or None."""
        if self.tokens is None:
            return None
        return [t for t, ok in zip(self.tokens[self._batch(batch)], self.valid[batch].tolist()) if ok]

    def to_frame(self) -> Any:
        """A pandas DataFrame in long format, one row per (batch, layer, head, query, key) of real tokens:
        columns batch, layer, head, query, key (real-token positions, 0 = first real token), weight (float)."""
        import numpy as np
        import pandas as pd

        parts = []
        for b in range(self.probs.shape[0]):
            query_valid, key_valid = self.real(b)
            n_q, n_k = int(query_valid.sum()), int(key_valid.sum())
            queries, keys = np.meshgrid(np.arange(n_k - n_q, n_k), np.arange(n_k), indexing="ij")
            for layer in self.layers:
                for head in self.heads:
                    weight = self.get(layer, head, b).numpy().reshape(-1)
                    parts.append(pd.DataFrame({"batch": b, "layer": layer, "head": head, "query": queries.reshape(-1),
                                               "key": keys.reshape(-1), "weight": weight.astype(np.float64)}))
        columns = ["batch", "layer", "head", "query", "key", "weight"]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)

    def plot(self, layer: int, head: int, batch: int = 0, ax: Any = None) -> Any:
        """A heatmap of :meth:`get` with token labels: :func:`attnlab.plot_pattern` (returns its Figure)."""
        from attnlab.plotting import plot_pattern  # a leaf (numpy + matplotlib), see test_layering

        path = self.paths.get(layer)
        title = f"layer {layer} head {head}" + (f" ({path})" if path else "")
        return plot_pattern(self.get(layer, head, batch).numpy(), self.tokens_of(batch), ax=ax, title=title)


@dataclass
class _Recorded:
    """One forward pass's calls: layer → (probs (B, heads_sel, Lq, Lk) float32 CPU, call record)."""

    sequence: SequenceInfo
    calls: dict[int, tuple[Tensor, AttentionCall]] = field(default_factory=dict)


class PatternProbe(Probe):
    """Keeps the full probs of the chosen (layer, query head) pairs on every forward pass (not a registered probe:
    pass an instance, ``Session(model, probes=[PatternProbe(layers=[3], heads=[0, 1])])``).

    Args:
        layers, heads: an int, a sequence of ints, or None for all; checked against the model when the session
            binds the probe (ConfigError ``"layers must be in 0..N-1, got 40"``).

    Read the result with :meth:`attnlab.Session.patterns` (or :meth:`patterns`).
    """

    name = "patterns"
    needs = frozenset({"probs", "every_row"})

    def __init__(self, layers: Selection = None, heads: Selection = None) -> None:
        self._requested = (layers, heads)
        self.layers: tuple[int, ...] = ()
        self.heads: tuple[int, ...] = ()
        self._forwards: list[_Recorded] = []
        self._head_index: Tensor | None = None

    def bind(self, facts: ModelFacts) -> None:
        super().bind(facts)
        self.layers = select_indices("layers", self._requested[0], facts.num_layers)
        self.heads = select_indices("heads", self._requested[1], facts.num_heads)

    def begin_call(self, call: AttentionCall) -> None:
        if call.layer_idx not in self.layers:
            return
        if max(self.heads) >= call.num_heads:
            raise ConfigError(f"heads must be in 0..{call.num_heads - 1}, got {max(self.heads)}")
        last = self._forwards[-1] if self._forwards else None
        same = (last is not None and call.layer_idx not in last.calls
                and last.sequence.sequence_offset == call.sequence.sequence_offset)
        if not same:  # a new forward pass (or this layer's second call in one: kept as its own pattern)
            last = _Recorded(call.sequence)
            self._forwards.append(last)
        probs = torch.zeros(call.batch, len(self.heads), call.q_len, call.kv_len, dtype=torch.float32)
        last.calls[call.layer_idx] = (probs, call)
        self._head_index = torch.tensor(self.heads, device=call.device)

    def update(self, call: AttentionCall, block: BlockView) -> None:
        if call.layer_idx not in self.layers or not self._forwards:
            return
        stored = self._forwards[-1].calls.get(call.layer_idx)
        if stored is None or stored[1] is not call:
            return
        width = block.probs.shape[-1]  # keys width … kv_len-1 are 0 for every row of the block
        picked = block.probs.index_select(1, self._head_index.to(block.probs.device))  # (B, heads_sel, bq, width)
        real = call.query_valid[:, block.q_index][:, None, :, None]  # padding queries → 0
        stored[0][:, :, block.q_index.cpu(), :width] = (picked * real).float().cpu()

    def patterns(self, paths: Mapping[int, str] | None = None, tokenizer: Any = None) -> list[AttentionPattern]:
        """One :class:`AttentionPattern` per recorded forward pass (in order). ``paths``: layer → attention path
        (``session.attention_paths``); ``tokenizer`` fills ``tokens`` from the forward's input_ids."""
        return [self._assemble(recorded, paths or {}, tokenizer) for recorded in self._forwards]

    def _assemble(self, recorded: _Recorded, paths: Mapping[int, str], tokenizer: Any) -> AttentionPattern:
        layers = tuple(layer for layer in self.layers if layer in recorded.calls)
        calls = [recorded.calls[layer] for layer in layers]
        batch = calls[0][1].batch
        q_len = max(call.q_len for _, call in calls)
        kv_len = max(call.kv_len for _, call in calls)
        probs = torch.zeros(batch, len(layers), len(self.heads), q_len, kv_len)
        valid = torch.zeros(batch, kv_len, dtype=torch.bool)
        for slot, (layer_probs, call) in enumerate(calls):  # keys (and queries) are the last tokens: right-align
            probs[:, slot, :, q_len - call.q_len:, kv_len - call.kv_len:] = layer_probs
            valid[:, kv_len - call.kv_len:] |= call.key_valid.cpu()
        ids = recorded.sequence.input_ids
        tokens = None
        if tokenizer is not None and ids is not None and ids.shape[-1] >= kv_len:
            tokens = [[tokenizer.decode([i]) for i in row] for row in ids[:, ids.shape[-1] - kv_len:].tolist()]
        return AttentionPattern(probs=probs, layers=layers, heads=self.heads, valid=valid, tokens=tokens,
                                paths={layer: paths[layer] for layer in layers if layer in paths},
                                causal=all(call.causal for _, call in calls))


def _as_batch(inputs: Any, tokenizer: Any, device: torch.device) -> dict[str, Tensor]:
    """``inputs`` (str, 1-D/2-D input_ids tensor or list, or a dict batch) → ``model(**batch)`` keywords."""
    if isinstance(inputs, str):
        if tokenizer is None:
            raise ConfigError("a text input needs a tokenizer: pass tokenizer= or a LoadedModel (attnlab.load_model)")
        inputs = dict(tokenizer(inputs, return_tensors="pt"))
    if isinstance(inputs, (list, tuple)):
        try:
            inputs = torch.tensor(inputs, dtype=torch.long)
        except (TypeError, ValueError):
            raise ConfigError("a list input must hold token ids (ints), one list per sequence") from None
    if isinstance(inputs, Tensor):
        inputs = {"input_ids": inputs}
    if not isinstance(inputs, Mapping) or not isinstance(inputs.get("input_ids"), Tensor):
        raise ConfigError(f"inputs must be a str, an input_ids tensor or a dict with input_ids, got "
                          f"{type(inputs).__name__}")
    batch = dict(inputs)
    ids = batch["input_ids"]
    if ids.dim() == 1:
        batch = {key: value[None] if isinstance(value, Tensor) and value.dim() == 1 else value
                 for key, value in batch.items()}
        ids = batch["input_ids"]
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ConfigError(f"input_ids must be a 1-D or 2-D integer tensor, got {tuple(ids.shape)} {ids.dtype}")
    if ids.numel() == 0:
        raise ConfigError("inputs hold no tokens")
    return {key: value.to(device) if isinstance(value, Tensor) else value for key, value in batch.items()}


def attention_pattern(model: Any, inputs: Any, *, layers: Selection = None, heads: Selection = None,
                      tokenizer: Any = None, block_size: int = 128) -> AttentionPattern:
    """The attention weights of chosen heads on ``inputs``: ONE forward pass under ``torch.no_grad`` in a Session.

    Args:
        model: a transformers model (attention through the AttentionInterface) or a LoadedModel.
        inputs: a str (needs a tokenizer: the LoadedModel's or ``tokenizer=``), an input_ids tensor (seq_len,) or
            (batch, seq_len) (or nested lists of ids), or a dict batch (input_ids, optional attention_mask …).
        layers, heads: an int, a sequence of ints, or None for all (heads are query heads under GQA).
        tokenizer: decodes ``tokens`` (one id at a time); default the LoadedModel's.
        block_size: query rows per block of the eager kernel.

    Returns:
        an :class:`AttentionPattern` (float32 CPU; equal to transformers' eager ``output_attentions`` on the
        real tokens).

    Raises:
        ConfigError: a layer/head out of range (``"layers must be in 0..N-1, got 40"``), a str without a tokenizer,
            empty or malformed inputs. UnsupportedModelError: the Session cannot observe the model.
    """
    from attnlab.capture.loading import LoadedModel
    from attnlab.capture.session import Session

    if isinstance(model, LoadedModel):
        tokenizer = model.tokenizer if tokenizer is None else tokenizer
        model = model.model
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    batch = _as_batch(inputs, tokenizer, parameter.device if parameter is not None else torch.device("cpu"))
    probe = PatternProbe(layers=layers, heads=heads)
    with Session(model, probes=[probe], block_size=block_size) as session, torch.no_grad():
        model(**batch)
    found = session.patterns(tokenizer=tokenizer)
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__} made no attention call the session could observe")
    return found[0]


# the report viewer's data ---------------------------------------------------------------------------------------
def check_pattern_heads(facts: ModelFacts, pattern_heads: str) -> tuple[tuple[int, int], ...] | None:
    """The explicit ``(layer, head)`` pairs of ``pattern_heads`` checked against the model (None for auto/none).

    Raises ConfigError ``"pattern_heads layers must be in 0..N-1, got 40"`` (or heads)."""
    pairs = parse_pattern_heads(pattern_heads)
    for layer, head in pairs or ():
        select_indices("pattern_heads layers", layer, facts.num_layers)
        select_indices("pattern_heads heads", head, facts.num_heads)
    return pairs


def head_scores(pattern: AttentionPattern) -> tuple[Tensor, Tensor]:
    """``(alpha0, entropy)`` (layers_sel, heads_sel) float64 of batch row 0's real tokens: mean weight on key 0
    over query rows ≥ 1, and mean normalised entropy (row entropy / log(keys the row may see)) over rows ≥ 1."""
    query_valid, key_valid = pattern.real(0)
    probs = pattern.probs[0][:, :, query_valid][..., key_valid].double()  # (L, H, n_q, n_k)
    n_q, n_k = probs.shape[-2:]
    rows = probs[:, :, 1:] if n_q > 1 else probs
    alpha0 = rows[..., 0].mean(dim=-1)
    first = n_k - n_q + (1 if n_q > 1 else 0)  # real-token position of the first row used
    seen = torch.arange(first, n_k, dtype=torch.float64) + 1 if pattern.causal else torch.full((rows.shape[2],), n_k)
    entropy = -(rows * rows.clamp_min(1e-300).log()).sum(dim=-1) / seen.double().clamp_min(2).log()
    return alpha0, entropy.mean(dim=-1)


SINK_EPSILON = 0.3
"""α₀ at or above which a head counts as a sink when picking low-entropy heads (the sink probe's ε)."""


def pick_heads(pattern: AttentionPattern, count: int = 4) -> list[tuple[int, int, str]]:
    """``(layer, head, label)`` of up to ``count`` heads with the largest mean α₀ (``"sink α₀=0.93"``), then up to
    ``count`` others with the lowest mean normalised entropy (``"low entropy 0.12"``) among the heads that are not
    sinks (α₀ < SINK_EPSILON, Gu et al.'s ε = 0.3): on models with many dormant heads the sharpest heads are sinks
    too, and the viewer would show the same all-on-key-0 pattern eight times."""
    alpha0, entropy = head_scores(pattern)
    num_heads = len(pattern.heads)
    picked: list[tuple[int, int, str]] = []
    for flat in torch.argsort(alpha0.reshape(-1), descending=True, stable=True)[:count].tolist():
        layer, head = pattern.layers[flat // num_heads], pattern.heads[flat % num_heads]
        picked.append((layer, head, f"sink α₀={alpha0.reshape(-1)[flat]:.2f}"))
    chosen = {(layer, head) for layer, head, _ in picked}
    added = 0
    for flat in torch.argsort(entropy.reshape(-1), stable=True).tolist():
        layer, head = pattern.layers[flat // num_heads], pattern.heads[flat % num_heads]
        if added == count:
            break
        sink = float(alpha0.reshape(-1)[flat]) >= SINK_EPSILON
        if (layer, head) not in chosen and not sink and math.isfinite(float(entropy.reshape(-1)[flat])):
            picked.append((layer, head, f"low entropy {entropy.reshape(-1)[flat]:.2f}"))
            added += 1
    return picked


def pattern_json(pattern: AttentionPattern, chosen: Sequence[tuple[int, int, str]], selection: str) -> dict[str, Any]:
    """The results.json ``"patterns"`` object (docs/patterns.md) for batch row 0 of ``pattern``."""
    heads = []
    for layer, head, label in chosen[:MAX_PATTERN_HEADS]:
        matrix = pattern.get(layer, head).tolist()
        offset = len(matrix[0]) - len(matrix) if matrix else 0
        rows = [[round(w, 4) for w in (row[: offset + i + 1] if pattern.causal else row)]
                for i, row in enumerate(matrix)]
        heads.append({"layer": layer, "head": head, "label": label, "probs": rows})
    return {"window": 0, "tokens": pattern.tokens_of(0) or [], "causal": pattern.causal, "selection": selection,
            "heads": heads}


def report_patterns(loaded: Any, windows: Any, pattern_heads: str, pattern_tokens: int) -> dict[str, Any] | None:
    """The report viewer's ``"patterns"`` object: the first ``pattern_tokens`` tokens of the first window, run
    alone in one extra forward pass (all heads for ``"auto"``, then the chosen ones kept; only the named heads for
    ``"L.H,..."``); None for ``"none"`` or a model the Session refuses (logged once).

    Args:
        loaded: a LoadedModel. windows: an :class:`attnlab.text.Windows` (``windows.windows[0]["ids"]``).
        pattern_heads: ``"auto"`` | ``"none"`` | ``"L.H,L.H"``. pattern_tokens: at most this many tokens.

    Raises:
        ConfigError: an explicit head outside the model (checked first).
    """
    pairs = check_pattern_heads(loaded.facts, pattern_heads)
    if pattern_heads == "none" or not windows.windows:
        return None
    ids = torch.tensor([windows.windows[0]["ids"][:pattern_tokens]], dtype=torch.long)
    layers = None if pairs is None else sorted({layer for layer, _ in pairs})
    heads = None if pairs is None else sorted({head for _, head in pairs})
    try:
        pattern = attention_pattern(loaded, ids, layers=layers, heads=heads)
    except UnsupportedModelError as error:
        logger.warning("no attention patterns for the report viewer: %s", error)
        return None
    if pairs is None:
        return pattern_json(pattern, pick_heads(pattern), "auto")
    return pattern_json(pattern, [(layer, head, "") for layer, head in pairs], "explicit")

