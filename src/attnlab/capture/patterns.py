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
(layer, query head) pairs only: memory is batch · layers · heads · q_len · kv_len floats (assembling them into
one tensor adds at most one layer's share). Under GQA the heads are query heads. The report viewer's
``"patterns"`` object is made in :mod:`attnlab.capture.pattern_report` (docs/patterns.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attnlab.capture.inputs import model_batch
from attnlab.errors import ConfigError, UnsupportedModelError
from attnlab.facts import ModelFacts
from attnlab.functional.attention import BlockView
from attnlab.params import check_indices
from attnlab.probes.base import AttentionCall, Probe, SequenceInfo

__all__ = ["AttentionPattern", "PatternProbe", "attention_pattern"]

Selection = int | Sequence[int] | None


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

    def __repr__(self) -> str:
        """A short summary (no tensor values): shape, layers, heads, real tokens per batch row, causal."""
        return (f"AttentionPattern(shape={tuple(self.probs.shape)}, layers={list(self.layers)}, "
                f"heads={list(self.heads)}, tokens={self.valid.sum(1).tolist()}, causal={self.causal})")

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
        columns batch, layer, head, query, key (real-token positions, 0 = first real token), weight (float).
        For a causal pattern only keys ≤ query are listed (the masked future keys, weight 0, are left out)."""
        import numpy as np
        import pandas as pd

        parts = []
        for b in range(self.probs.shape[0]):
            query_valid, key_valid = self.real(b)
            n_q, n_k = int(query_valid.sum()), int(key_valid.sum())
            queries, keys = np.meshgrid(np.arange(n_k - n_q, n_k), np.arange(n_k), indexing="ij")
            keep = keys <= queries if self.causal else np.ones_like(keys, dtype=bool)
            for layer in self.layers:
                for head in self.heads:
                    weight = self.get(layer, head, b).numpy()[keep]
                    parts.append(pd.DataFrame({"batch": b, "layer": layer, "head": head, "query": queries[keep],
                                               "key": keys[keep], "weight": weight.astype(np.float64)}))
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
    """One forward pass's calls: layer → (probs (B, heads_sel, Lq, Lk) float32 CPU, call record); ``probs``: all
    layers in one (B, layers_sel, heads_sel, q_len, kv_len) tensor once assembled (the per-layer tensors are then
    views of it)."""

    sequence: SequenceInfo
    calls: dict[int, tuple[Tensor, AttentionCall]] = field(default_factory=dict)
    probs: Tensor | None = None


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
        self.layers = check_indices("layers", self._requested[0], facts.num_layers)
        self.heads = check_indices("heads", self._requested[1], facts.num_heads)
        self._forwards = []  # a probe reused in a new session starts afresh

    def begin_call(self, call: AttentionCall) -> None:
        if call.layer_idx not in self.layers:
            return
        check_indices("heads", self.heads, call.num_heads)
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
        (``session.attention_paths``); ``tokenizer`` fills ``tokens`` from the forward's input_ids. A second call
        returns the same ``probs`` tensors (no copy). Binding the probe to a new session forgets earlier passes."""
        return [self._assemble(recorded, paths or {}, tokenizer) for recorded in self._forwards]

    def _assemble(self, recorded: _Recorded, paths: Mapping[int, str], tokenizer: Any) -> AttentionPattern:
        layers = tuple(layer for layer in self.layers if layer in recorded.calls)
        calls = [recorded.calls[layer][1] for layer in layers]
        batch = calls[0].batch
        q_len = max(call.q_len for call in calls)
        kv_len = max(call.kv_len for call in calls)
        valid = torch.zeros(batch, kv_len, dtype=torch.bool)
        for call in calls:  # keys (and queries) are the last tokens: right-align
            valid[:, kv_len - call.kv_len:] |= call.key_valid.cpu()
        if recorded.probs is None or recorded.probs.shape[1] != len(layers):  # peak memory: all layers + one layer
            recorded.probs = torch.zeros(batch, len(layers), len(self.heads), q_len, kv_len)
            for slot, (layer, call) in enumerate(zip(layers, calls)):  # each layer moves in, freeing its own tensor
                view = recorded.probs[:, slot, :, q_len - call.q_len:, kv_len - call.kv_len:]
                view.copy_(recorded.calls[layer][0])
                recorded.calls[layer] = (view, call)
        ids = recorded.sequence.input_ids
        tokens = None
        if tokenizer is not None and ids is not None and ids.shape[-1] >= kv_len:
            tokens = [[tokenizer.decode([i]) for i in row] for row in ids[:, ids.shape[-1] - kv_len:].tolist()]
        return AttentionPattern(probs=recorded.probs, layers=layers, heads=self.heads, valid=valid, tokens=tokens,
                                paths={layer: paths[layer] for layer in layers if layer in paths},
                                causal=all(call.causal for call in calls))


def attention_pattern(model: Any, inputs: Any, *, layers: Selection = None, heads: Selection = None,
                      tokenizer: Any = None, block_size: int = 128) -> AttentionPattern:
    """The attention weights of chosen heads on ``inputs``: ONE forward pass under ``torch.no_grad`` in a Session.

    Args:
        model: a transformers model (attention through the AttentionInterface) or a LoadedModel.
        inputs: a str or a list of str (one padded batch; needs a tokenizer: the LoadedModel's or ``tokenizer=``),
            an input_ids tensor (seq_len,) or (batch, seq_len) (or nested lists of ids), or a dict batch
            (input_ids, optional attention_mask …); see :func:`attnlab.capture.inputs.model_batch`.
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
    from attnlab.capture.device_map import input_device

    batch = model_batch(inputs, input_device(model), tokenizer)
    probe = PatternProbe(layers=layers, heads=heads)
    with Session(model, probes=[probe], block_size=block_size) as session, torch.no_grad():
        model(**batch)
    found = session.patterns(tokenizer=tokenizer)
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__} made no attention call the session could observe")
    return found[0]
