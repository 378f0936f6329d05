"""Titans, memory as a gate (MAG): sliding-window attention gated by a neural long-term memory (METHODS.md #31)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.errors import ConfigError
from attnlab.functional.implied import softmax_map
from attnlab.functional.positions import rotary
from attnlab.functional.titans import (MEMORY_FORMS, context_attention, context_keep, memory_read, neural_memory,
                                       window_attention, window_keep)
from attnlab.layers import LAYERS
from attnlab.layers._common import GatedHeadNorm, check_hidden, merge_heads, split_heads
from attnlab.layers.base import DEFAULT_NUM_HEADS, Layer


class TitansState(NamedTuple):
    """Carried between segments: memory (W1, W2, S1, S2), each (B, H, ·, ·), and the sliding-window key/value
    cache (B, H, ≤ window-1, head_dim) after rotary."""

    memory: tuple[Tensor, Tensor, Tensor, Tensor]
    keys: Tensor
    values: Tensor


class _NeuralMemoryLayer(Layer):
    """What TitansMAG and TitansMAC share: the memory's projections, gates, learned initial weights, persistent
    tokens, the two output norms and the output projection."""

    carries_state = True

    def _build_memory(self, hidden_size: int, num_heads: int, num_persistent: int, memory_expansion: int,
                      max_lr: float, form: str, norm_eps: float) -> None:
        self.hidden_size, self.num_heads, self.form, self.max_lr = hidden_size, num_heads, form, max_lr
        D = self.head_dim = hidden_size // num_heads
        E = memory_expansion * D
        self.memory_qkv_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.gate_proj = nn.Linear(hidden_size, 3 * num_heads)  # θ, η, α logits per head
        self.persistent = nn.Parameter(0.02 * torch.randn(num_persistent, hidden_size))
        self.memory_w1 = nn.Parameter(torch.randn(num_heads, D, E) / D ** 0.5)
        self.memory_w2 = nn.Parameter(torch.randn(num_heads, E, D) / E ** 0.5)
        self.attention_norm = GatedHeadNorm(D, norm_eps)
        self.memory_norm = GatedHeadNorm(D, norm_eps)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def _memory_weights(self, batch_size: int, dtype: torch.dtype | None):
        """Learned initial memory weights and zero momentum: (W1, W2, S1, S2), each (B, H, ·, ·)."""
        dtype = dtype or self.memory_w1.dtype
        w1 = self.memory_w1.to(dtype).expand(batch_size, -1, -1, -1)
        w2 = self.memory_w2.to(dtype).expand(batch_size, -1, -1, -1)
        return w1, w2, torch.zeros_like(w1), torch.zeros_like(w2)

    def _memory_branch(self, memory_input: Tensor, gate_input: Tensor, memory, chunk_size: int):
        """Write memory_input (B, T, C) into the memory (gates from gate_input); return (recalled (B, H, T, D),
        memory). q, k ℓ2-normalised; θ = max_lr·σ, η = σ, α = σ of gate_proj."""
        mq, mk, mv = (split_heads(F.silu(t), self.num_heads) for t in self.memory_qkv_proj(memory_input).chunk(3, -1))
        mq, mk = F.normalize(mq, dim=-1), F.normalize(mk, dim=-1)
        theta, eta, alpha = (g.transpose(1, 2) for g in torch.sigmoid(self.gate_proj(gate_input)).chunk(3, dim=-1))
        return neural_memory(mq, mk, mv, self.max_lr * theta, eta, alpha, memory, chunk_size=chunk_size,
                             form=self.form)

    def _gate(self, attended: Tensor, recalled: Tensor) -> Tensor:
        """RMSNorm(attended) ⊙ σ(RMSNorm(recalled)), both (B, H, T, D), in attended's dtype."""
        return self.attention_norm(attended) * torch.sigmoid(self.memory_norm(recalled.to(attended.dtype)))


@LAYERS.register("titans")
class TitansMAG(_NeuralMemoryLayer):
    """Titans MAG: sliding-window softmax attention with persistent tokens, gated by a neural memory read.

    Attention branch: ``y = SWA([p] ∥ x)`` (persistent tokens p are keys/values every query sees; window over
    the sequence, RoPE by absolute position). Memory branch: q, k, v = SiLU(x W) (q, k ℓ2-normalised), per-token
    step size θ = max_lr·σ(x w_θ), momentum η = σ(x w_η), forgetting α = σ(x w_α), memory
    ``functional.titans.neural_memory`` (MLP depth 2, expansion ``memory_expansion``; gradients at chunk-start
    weights). Output ``W_O (RMSNorm(y) ⊙ σ(RMSNorm(M(q))))`` per head (Behrouz et al. 2025, §4.2 (METHODS.md #31);
    medium confidence in the exact gate). Deviations: no depthwise conv after the projections; the memory reads
    and writes x only (persistent tokens feed attention, so each segment does not re-write them).
    Segments chain exactly when every boundary except the last is a multiple of chunk_size.

    Implied map (``attention_hook``): ``softmax_map`` of the attention branch only, keys ``[persistent (P) ∥
    window cache ∥ this call's tokens]`` (kv_len = P + cached + T; the persistent keys come first), kind "softmax";
    the branch's output before its norm equals ``dense() @ value``. Not covered: the neural memory branch (an MLP
    read, no q·k map) and its gate on the output.

    Args:
        hidden_size: C. num_heads: H. window: sliding-window length (keys per query, itself included).
        num_persistent: persistent tokens. memory_expansion: E / head_dim. chunk_size: memory chunk.
        max_lr: upper bound of θ. form: "chunk" (default) or "recurrent" (memory form). norm_eps: RMSNorm eps.

    Raises ConfigError for bad sizes or form; ShapeError for bad inputs.
    """

    positional = True

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, *, window: int = 64,
                 num_persistent: int = 4, memory_expansion: int = 4, chunk_size: int = 16, max_lr: float = 1.0, form: str = "chunk",
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        if form not in MEMORY_FORMS:
            raise ConfigError(f"expected form in {list(MEMORY_FORMS)}, got {form!r}")
        if num_heads < 1 or hidden_size % num_heads or window < 1 or num_persistent < 0 or chunk_size < 1:
            raise ConfigError(f"expected num_heads dividing hidden_size, window >= 1, num_persistent >= 0, "
                              f"chunk_size >= 1, got num_heads={num_heads}, hidden_size={hidden_size}, "
                              f"window={window}, num_persistent={num_persistent}, chunk_size={chunk_size}")
        self.window, self.chunk_size = window, chunk_size
        self.qkv_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self._build_memory(hidden_size, num_heads, num_persistent, memory_expansion, max_lr, form, norm_eps)

    def initial_state(self, batch_size: int, dtype: torch.dtype | None = None) -> TitansState:
        """Learned initial memory weights, zero momentum, empty window cache."""
        memory = self._memory_weights(batch_size, dtype)
        empty = memory[0].new_zeros(batch_size, self.num_heads, 0, self.head_dim)
        return TitansState(memory, empty, empty)

    def _attention(self, x: Tensor, state: TitansState, offset: int) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv_proj(x).chunk(3, dim=-1))  # (B, H, T, D)
        q, k = rotary(q, offset), rotary(k, offset)
        keys, values = torch.cat([state.keys, k], dim=2), torch.cat([state.values, v], dim=2)
        _, pk, pv = (split_heads(t, self.num_heads).expand(x.shape[0], -1, -1, -1)
                     for t in self.qkv_proj(self.persistent[None].to(x.dtype)).chunk(3, dim=-1))
        out = window_attention(q, keys, values, pk, pv, self.window)
        if self.attention_hook is not None:
            keep = window_keep(q.shape[2], keys.shape[2], pk.shape[2], self.window, q.device)
            self.expose_map(softmax_map(q, torch.cat([pk, keys], 2), torch.cat([pv, values], 2), keep[None, None]))
        tail = max(self.window - 1, 0)
        return out, keys[:, :, keys.shape[2] - tail:], values[:, :, values.shape[2] - tail:]

    def forward(self, hidden_states: Tensor, *, state: TitansState | None = None,
                position_offset: int | None = None) -> tuple[Tensor, TitansState]:
        """hidden_states: (B, T, C); state from the previous segment(s) of ``position_offset`` tokens in all
        (required with a state, ConfigError otherwise: RoPE positions are not in the state), or None
        (``self.initial_state``). Returns output (B, T, C) and a ``TitansState``."""
        check_hidden(hidden_states, self.hidden_size)
        position_offset = self.start_position(state, position_offset)
        x = hidden_states
        state = state if state is not None else self.initial_state(x.shape[0], x.dtype)
        attended, keys, values = self._attention(x, state, position_offset)
        recalled, memory = self._memory_branch(x, x, state.memory, self.chunk_size)
        return self.o_proj(merge_heads(self._gate(attended, recalled))), TitansState(memory, keys, values)


@LAYERS.register("titans_mac")
class TitansMAC(_NeuralMemoryLayer):
    """Titans MAC: memory as context. Per segment, attention over [persistent ∥ memory read ∥ segment].

    For segment n of ``segment_size`` tokens: ``h = M_{n-1}(q)`` with q from the segment; ``y = Attn([p] ∥ h ∥ x)``
    (persistent tokens visible to every query; a query sees retrieved token h_j and token x_j for j ≤ i, since
    h_j is read with x_j's query); the memory is written
    with y (one memory chunk per segment); ``o = W_O(RMSNorm(y) ⊙ σ(RMSNorm(M_{n-1}(y))))`` (Behrouz et al. 2025,
    §4.1 (METHODS.md #31); medium confidence in the gate). Deviation: the paper's final read ``M_n(y)`` uses the
    memory after the segment's write, which would let a token see later tokens of its segment; this layer reads
    the memory from before the write, so it stays causal. Memory rule, gates and projections
    as ``TitansMAG``. State: the memory (W1, W2, S1, S2); segments chain at multiples of segment_size.

    Implied map (``attention_hook``): one ``softmax_map`` per call over keys ``[persistent (P) ∥ retrieved h (T) ∥
    tokens x (T)]`` (kv_len = P + 2T; the persistent keys come first, then every segment's h, then every x), with
    each query seeing the persistent keys and h_j, x_j for j ≤ i in its own segment; kind "softmax"; the segment
    attention y before its norm equals ``dense() @ value``. Not covered: the memory reads (h itself and the output
    gate), which have no q·k map.

    Args:
        hidden_size: C. num_heads: H. segment_size: tokens per segment (= memory chunk).
        num_persistent: persistent tokens. memory_expansion: E / head_dim. max_lr: upper bound of θ.
        form: memory form, "chunk" (default) or "recurrent". norm_eps: RMSNorm eps.

    Raises ConfigError for bad sizes or form; ShapeError for bad inputs.
    """

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, *, segment_size: int = 64,
                 num_persistent: int = 4, memory_expansion: int = 4, max_lr: float = 1.0, form: str = "chunk",
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        if form not in MEMORY_FORMS:
            raise ConfigError(f"expected form in {list(MEMORY_FORMS)}, got {form!r}")
        if num_heads < 1 or hidden_size % num_heads or segment_size < 1 or num_persistent < 0:
            raise ConfigError(f"expected num_heads dividing hidden_size, segment_size >= 1 and num_persistent >= 0, "
                              f"got num_heads={num_heads}, hidden_size={hidden_size}, segment_size={segment_size}, "
                              f"num_persistent={num_persistent}")
        self.segment_size = segment_size
        self.qkv_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.retrieve_proj = nn.Linear(hidden_size, hidden_size, bias=False)  # x -> memory query for h
        self._build_memory(hidden_size, num_heads, num_persistent, memory_expansion, max_lr, form, norm_eps)

    def initial_state(self, batch_size: int, dtype: torch.dtype | None = None):
        """Learned initial memory weights and zero momentum: (W1, W2, S1, S2)."""
        return self._memory_weights(batch_size, dtype)

    def _segment(self, x: Tensor, memory):
        B, H, P = x.shape[0], self.num_heads, self.persistent.shape[0]
        h = merge_heads(memory_read(F.normalize(split_heads(F.silu(self.retrieve_proj(x)), H), dim=-1),
                                    *memory[:2]).to(x.dtype))  # (B, T, C): retrieved tokens
        context = torch.cat([self.persistent[None].to(x.dtype).expand(B, -1, -1), h, x], dim=1)  # (B, P+2T, C)
        q, k, v = (split_heads(t, H) for t in self.qkv_proj(context).chunk(3, dim=-1))
        y = context_attention(q[:, :, P + x.shape[1]:], k, v, P)  # (B, H, T, D)
        # one memory chunk per segment: reads the memory as it was before this segment
        recalled, memory = self._memory_branch(merge_heads(y), x, memory, x.shape[1])
        return merge_heads(self._gate(y, recalled)), memory, (q[:, :, P + x.shape[1]:], k, v)

    def _expose(self, parts: list[tuple[Tensor, Tensor, Tensor]]) -> None:
        """One softmax map for the call from the segments' (query, key, value) (see the class docstring)."""
        P = self.persistent.shape[0]
        sizes = [q.shape[2] for q, _, _ in parts]
        query = torch.cat([q for q, _, _ in parts], dim=2)

        def keys(index: int) -> Tensor:  # [persistent ∥ every h ∥ every x] of key (0) or value (1) tensors
            tensors = [part[index + 1] for part in parts]
            return torch.cat([tensors[0][:, :, :P]] + [t[:, :, P:P + n] for t, n in zip(tensors, sizes)]
                             + [t[:, :, P + n:] for t, n in zip(tensors, sizes)], dim=2)

        keep = context_keep(query.shape[2], P, self.segment_size, query.device)[None, None]
        self.expose_map(softmax_map(query, keys(0), keys(1), keep))

    def forward(self, hidden_states: Tensor, *, state: tuple[Tensor, ...] | None = None,
                position_offset: int = 0) -> tuple[Tensor, tuple[Tensor, ...]]:
        """hidden_states: (B, T, C); state: (W1, W2, S1, S2) or None; position_offset: accepted, unused (no
        positions). Returns output (B, T, C) and the memory state."""
        check_hidden(hidden_states, self.hidden_size)
        self.start_position(state, position_offset)
        memory = state if state is not None else self.initial_state(hidden_states.shape[0], hidden_states.dtype)
        outputs, parts = [], []
        for segment in hidden_states.split(self.segment_size, dim=1):
            out, memory, attention_inputs = self._segment(segment, memory)
            outputs.append(out)
            parts.append(attention_inputs)
        if self.attention_hook is not None and parts:
            self._expose(parts)
        return self.o_proj(torch.cat(outputs, dim=1)), memory


__all__ = ["TitansMAC", "TitansMAG", "TitansState"]
