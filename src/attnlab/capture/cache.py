"""KV-cache policies for generation: StreamingLLM's attention sinks + recent window, with optional H2O heavy hitters.

    cache = SinkWindowCache(model, sinks=4, window=252)            # StreamingLLM
    cache = SinkWindowCache(model, sinks=4, window=124, heavy=128)  # + H2O heavy hitters (run inside a Session)
    model.generate(input_ids, cache=cache, max_new_tokens=64)   # past_key_values= before transformers 5.2x

Xiao et al. 2024 (StreamingLLM), and H2O as SinkLoRA applies it (METHODS.md #30, medium confidence for H2O):
- The cache keeps the first ``sinks`` tokens, the ``window - 1`` most recent ones (the next token makes ``window``)
  and, with ``heavy > 0``, the ``heavy`` older tokens with the largest accumulated attention ("heavy hitters").
  Everything else is evicted after each forward pass.
- Keys are stored **before RoPE** (un-rotated from the position they were computed at) and re-rotated at every step
  to their **in-cache** positions, shifted so the newest key sits at the current token's position: the query keeps
  the model's own position and every query-key distance is the in-cache distance, as in StreamingLLM.
- H2O scores: the attention each cached token received, summed over query heads and all queries so far, per
  sequence; eviction is per layer and sequence (the original H2O evicts per head; summing over heads keeps one
  token set per layer, so token positions stay well defined for probes and edits). Scores need probs, so a cache
  with ``heavy > 0`` must be used inside a :class:`attnlab.Session`: the cache is a
  :class:`attnlab.capture.calls.TokenPolicy`, and for each forward pass it hands the session a probe
  (:class:`ReceivedAttention`) that reads the attention every kept key received, as any probe reads attention; the
  session needs every query row for it, so it runs the blocked eager kernel.

Inside a Session the cache also tells the probes which token each kept key is (``key_index``), so positions and
padding come out right after eviction.

Padded batches are not supported: the sinks are the first cache slots, and after eviction transformers builds
the padding mask from contiguous offsets; inside a Session a padded batch is refused with a ConfigError, outside
one it is the caller's responsibility (generate one sequence at a time).

Prefill is not masked by the cache (all prompt tokens attend causally to each other); combine with the
``sink_window`` edit to mask the prefill the same way. Only RoPE models whose rotary embedding has no attention
scaling and whose frequencies do not depend on the sequence length are supported (Llama, Mistral, Qwen2/3,
SmolLM2 ... with default or linear RoPE). Refused with a ConfigError: YaRN, whose cos/sin carry an
``attention_scaling`` (0.1·ln(factor) + 1, about 1.069 for factor 2) so its rotation cannot be undone, and
dynamic-NTK and LongRoPE, which change every key's rotation as the text grows, so re-rotated cached keys would
drift from a fresh forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer

from attnlab.capture.architectures import text_config
from attnlab.errors import ConfigError, UnsupportedModelError
from attnlab.functional.attention import BlockView
from attnlab.probes.base import AttentionCall, Probe, SequenceInfo


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _find_rotary(model: nn.Module) -> nn.Module:
    for name, module in model.named_modules():
        if name.endswith("rotary_emb") and hasattr(module, "inv_freq"):
            return module
    raise UnsupportedModelError(f"{type(model).__name__} has no rotary embedding module (rotary_emb); "
                                "SinkWindowCache re-rotates keys and needs a RoPE model such as Llama or Qwen2")


def _length_dependent_rope(rotary: nn.Module) -> str | None:
    """The rope_type if its frequencies change with the sequence length (transformers' rule: "dynamic" in the
    name, or "longrope"), else None."""
    rope_type = getattr(rotary, "rope_type", "default")
    for name in rope_type.values() if isinstance(rope_type, dict) else (rope_type,):
        if "dynamic" in str(name) or name == "longrope":
            return str(name)
    return None


class SinkWindowLayer(DynamicLayer):
    """One layer's cache: pre-RoPE keys, values and the token index of each kept entry.

    Attributes:
        raw_keys: (B, Hkv, n, D) keys before RoPE. values: (B, Hkv, n, Dv).
        token_index: (B, n) long, the absolute index (0-based, counting every token fed) of each kept entry.
        scores: (B, n) float64 accumulated attention (H2O), or None when heavy = 0.
    """

    def __init__(self, rotate: Any, sinks: int, window: int, heavy: int) -> None:
        super().__init__()
        self.rotate, self.sinks, self.window, self.heavy = rotate, sinks, window, heavy
        self.cumulative_length = 0
        self.raw_keys: Tensor | None = None
        self.token_index: Tensor | None = None
        self.scores: Tensor | None = None
        self._fed = False

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        B = key_states.shape[0]
        self.raw_keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.token_index = torch.zeros(B, 0, dtype=torch.long, device=key_states.device)
        self.scores = torch.zeros(B, 0, dtype=torch.float64, device=key_states.device) if self.heavy else None

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.heavy and self.cumulative_length and not self._fed:
            raise ConfigError("SinkWindowCache with heavy > 0 (H2O) needs attention scores: run the model inside "
                              "an attnlab Session (with Session(model): model.generate(..., cache=cache))")
        self._fed = False
        self._evict()  # the previous step's scores are complete now
        B, _, L, _ = key_states.shape
        new_index = torch.arange(self.cumulative_length, self.cumulative_length + L, device=key_states.device)
        self.raw_keys = torch.cat([self.raw_keys, self.rotate(key_states, -new_index)], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.token_index = torch.cat([self.token_index, new_index.expand(B, L)], dim=-1)
        if self.scores is not None:
            self.scores = torch.cat([self.scores, self.scores.new_zeros(B, L)], dim=-1)
        self.cumulative_length += L
        n = self.raw_keys.shape[-2]
        in_cache = torch.arange(n, device=key_states.device) + (self.cumulative_length - n)
        self.keys = self.rotate(self.raw_keys, in_cache)
        return self.keys, self.values

    def accumulate(self, received: Tensor) -> None:
        """H2O: add (B, n) attention received by each kept entry in the last call (summed over heads and queries)."""
        if self.scores is not None:
            self.scores += received.to(self.scores)
            self._fed = True

    def _evict(self) -> None:
        n = self.raw_keys.shape[-2]
        budget = self.sinks + self.heavy + self.window - 1
        if n <= budget:
            return
        B = self.raw_keys.shape[0]
        device = self.raw_keys.device
        position = torch.arange(n, device=device).expand(B, n)
        protected = (self.token_index < self.sinks) | (position >= n - (self.window - 1))
        if self.heavy and self.scores is not None:
            candidates = torch.where(protected, torch.full_like(self.scores, -1.0), self.scores)
            heavy = candidates.topk(self.heavy, dim=-1).indices
            protected = protected.clone()
            protected.scatter_(-1, heavy, True)
        order = torch.where(protected, position, position + n).argsort(dim=-1)[:, : int(protected.sum(-1).max())]
        order = order.sort(dim=-1).values  # keep the kept entries in token order
        gather = order[:, None, :, None]
        self.raw_keys = self.raw_keys.gather(2, gather.expand(-1, self.raw_keys.shape[1], -1, self.raw_keys.shape[3]))
        self.values = self.values.gather(2, gather.expand(-1, self.values.shape[1], -1, self.values.shape[3]))
        self.token_index = self.token_index.gather(1, order)
        if self.scores is not None:
            self.scores = self.scores.gather(1, order)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = 0 if self.raw_keys is None else self.raw_keys.shape[-2]
        if kept > self.sinks + self.heavy + self.window - 1:
            kept = self.sinks + self.heavy + self.window - 1  # what remains after the eviction update() will do
        return kept + query_length, self.cumulative_length - kept

    def get_seq_length(self) -> int:
        return self.cumulative_length


class SinkWindowCache(Cache):
    """StreamingLLM KV cache (sinks + recent window, keys re-rotated to in-cache positions), optionally + H2O.

    Args:
        model: a transformers RoPE decoder (Llama, Mistral, Qwen2/3 ...).
        sinks: initial tokens always kept (≥ 0). window: recent tokens attended, the current one included (≥ 1).
        heavy: H2O heavy hitters kept besides sinks and window (≥ 0; > 0 needs a Session).

    Raises:
        ConfigError: bad sizes, or a RoPE the cache cannot re-rotate: attention scaling (YaRN) or frequencies that
            depend on the sequence length (dynamic NTK, LongRoPE). UnsupportedModelError: no rotary embedding.
    """

    def __init__(self, model: nn.Module, sinks: int = 4, window: int = 252, heavy: int = 0) -> None:
        if sinks < 0 or window < 1 or heavy < 0:
            raise ConfigError(f"SinkWindowCache needs sinks >= 0, window >= 1, heavy >= 0; got {sinks}, {window}, {heavy}")
        rotary = _find_rotary(model)
        length_dependent = _length_dependent_rope(rotary)
        if length_dependent is not None:
            raise ConfigError(f"SinkWindowCache needs RoPE frequencies that do not depend on the sequence length; "
                              f"{type(model).__name__} uses rope_type={length_dependent!r}")
        if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
            raise ConfigError(f"SinkWindowCache needs RoPE without attention scaling; {type(model).__name__}'s "
                              f"RoPE scales attention by {float(rotary.attention_scaling):.4g} "
                              f"(rope_type={getattr(rotary, 'rope_type', 'default')!r}), so its keys cannot be "
                              "un-rotated")

        def rotate(keys: Tensor, positions: Tensor) -> Tensor:
            cos, sin = rotary(keys, positions[None].to(keys.device))  # (1, n, D)
            return keys * cos[:, None] + _rotate_half(keys) * sin[:, None]

        num_layers = text_config(model).num_hidden_layers
        self.sinks, self.window, self.heavy = sinks, window, heavy
        super().__init__(layers=[SinkWindowLayer(rotate, sinks, window, heavy) for _ in range(num_layers)])

    def bind_forward(self, sequence: SequenceInfo) -> Probe | None:
        """TokenPolicy: called by a Session before each forward pass; the H2O probe when ``heavy > 0``.

        Raises:
            ConfigError: a padded batch (the sinks would be padding slots)."""
        if not bool(sequence.valid.all()):
            raise ConfigError("SinkWindowCache does not support padded batches yet (its sinks are the first cache "
                              "slots, not each sequence's first real tokens); generate one sequence at a time")
        return ReceivedAttention(self) if self.heavy else None

    def key_index(self, layer_idx: int) -> Tensor | None:
        """TokenPolicy: (B, n) absolute token index of each key the layer returned at its last update, or None
        before the first one."""
        return self.layers[layer_idx].token_index


class ReceivedAttention(Probe):
    """H2O scores for a :class:`SinkWindowCache`: the attention each kept key received in one attention call,
    summed over query heads and real query rows, added to the layer's scores when the call ends.

    Needs every query row (``"every_row"``): H2O sums over all queries, so ``query_fraction`` does not apply."""

    name = "received_attention"
    needs = frozenset({"probs", "every_row"})

    def __init__(self, cache: SinkWindowCache) -> None:
        self.cache = cache
        self.received: Tensor | None = None

    def begin_call(self, call: AttentionCall) -> None:
        self.received = torch.zeros(call.batch, call.kv_len, dtype=torch.float64, device=call.device)

    def update(self, call: AttentionCall, block: BlockView) -> None:
        rows_valid = call.query_valid[:, block.q_index][:, None, :, None]  # (B, 1, n, 1)
        self.received[:, : block.probs.shape[-1]] += (block.probs * rows_valid).sum(dim=(1, 2)).double()

    def end_call(self, call: AttentionCall) -> None:
        self.cache.layers[call.layer_idx].accumulate(self.received)
