"""Decaying linear attention in three forms: ``parallel`` (quadratic, the oracle), ``chunk`` and ``recurrent``.

One recurrence covers retention, simple GLA, Lightning Attention, GLA and LightNet (METHODS.md #21-#24, #35):

    S_t = Diag(exp(g_t)) S_{t-1} + k_tᵀ v_t          o_t = scale · q_t S_t

with ``g = log_decay`` ≤ 0 (``decay = exp(log_decay)`` in (0, 1]; fla calls a per-head constant ``g_gamma`` and a
data-dependent one ``g``/``gk``). The decay at step t acts on the state *before* k_t v_t is added, so a key is
never decayed by its own step (Yang et al. 2024, §3 (METHODS.md #21); Sun et al. 2023, recurrent form
(METHODS.md #35)).

Shape legend (used in every docstring of this module):
    B   batch
    H   num_heads (query heads); Hkv num_kv_heads, a divisor of H: query head h reads kv head ``h // (H // Hkv)``
    T   seq_len
    K   key_dim (query/key head dim), V value_dim (value head dim)

``log_decay`` may be
    None                 no decay (plain causal linear attention),
    (H,)                 a constant per head (retention, lightning),
    (B, H, T)            data dependent, one scalar per head and step (simple GLA),
    (B, H, T, K)         data dependent per key dim (GLA, LightNet).

Numerical policy: everything is computed in float32 (float64 stays float64, so the forms can be checked against the
float64 reference in ``functional/reference/linear.py``); the output is cast back to ``value.dtype`` and the final
state is float32/float64. No form ever exponentiates a positive log decay sum: every factor is exp(≤ 0), so a
log decay of -1e4 underflows to exact zeros instead of overflowing (the ``Q ⊙ B, K ⊘ B`` factorisation of the GLA
paper is avoided for that reason). Decays between two steps are summed directly (:func:`segment_sums`, an exclusive
reverse cumsum for "to the end of the chunk"), never as differences of cumulative sums, which cancel under an
extreme gate (-1e4, -0.1 · float32 max) and used to break segment chaining in float32. The chunk form with a
per-key-dim decay runs chunks of at most ``PER_KEY_CHUNK`` (8) tokens whatever chunk_size says (each materialises an (8, 8, K) decay tensor: memory
O(T · 8 · K) per head); the state carried between those short chunks plays the role of GLA's secondary chunking.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.attention import check_qkv, compute_dtype

__all__ = [
    "FORMS",
    "linear_attention",
    "linear_attention_chunk",
    "linear_attention_parallel",
    "linear_attention_recurrent",
    "prepare_inputs",
    "segment_sums",
]


def prepare_inputs(query: Tensor, key: Tensor, value: Tensor, log_decay: Tensor | None,
                   initial_state: Tensor | None, scale: float | None, *, scale_query: bool = True):
    """Validate, repeat kv heads, upcast; return ``(q * scale, k, v, g, state0)`` with g of shape (B|1, H, T, 1|K)
    (with ``scale_query=False``: ``(q, k, v, g, state0, scale)``, q unscaled).

    Raises ShapeError for inconsistent query/key/value, log_decay or initial_state shapes.
    """
    num_heads, group = check_qkv(query, key, value)
    B, H, T, K = query.shape  # (B, H, T, K)
    if key.shape[2] != T:
        raise ShapeError(f"linear attention needs q_len == kv_len, got {T} and {key.shape[2]}")
    dtype = compute_dtype(query)
    V = value.shape[-1]
    if group > 1:  # (B, Hkv, T, K) -> (B, H, T, K), query head h reads kv head h // group
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scale = K ** -0.5 if scale is None else scale
    q = query.to(dtype) * scale if scale_query else query.to(dtype)
    k, v = key.to(dtype), value.to(dtype)
    if log_decay is None:
        g = q.new_zeros(1, H, T, 1)
    elif log_decay.shape == (H,):
        g = log_decay.to(dtype)[None, :, None, None].expand(1, H, T, 1)
    elif log_decay.shape == (B, H, T):
        g = log_decay.to(dtype)[..., None]
    elif log_decay.shape == (B, H, T, K):
        g = log_decay.to(dtype)
    else:
        raise ShapeError(f"expected log_decay of shape ({H},), ({B}, {H}, {T}) or ({B}, {H}, {T}, {K}), "
                         f"got {tuple(log_decay.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, K, V):
        raise ShapeError(f"expected initial_state of shape ({B}, {H}, {K}, {V}), got {tuple(initial_state.shape)}")
    state0 = None if initial_state is None else initial_state.to(dtype)
    return (q, k, v, g, state0) if scale_query else (q, k, v, g, state0, scale)


def _finish(o: Tensor, state: Tensor, value: Tensor, output_final_state: bool):
    return o.to(value.dtype), (state if output_final_state else None)


def _empty(q: Tensor, v: Tensor, state0: Tensor | None, value: Tensor, output_final_state: bool):
    """T = 0: an empty (B, H, 0, V) output and the initial state (zeros if None) unchanged."""
    B, H, _, K = q.shape
    state = q.new_zeros(B, H, K, v.shape[-1]) if state0 is None else state0
    return _finish(v.new_zeros(B, H, 0, v.shape[-1]), state, value, output_final_state)


def segment_sums(g: Tensor) -> Tensor:
    """Log decay between every pair of steps: (..., T, D) -> (..., T, T, D), ``out[..., t, s, :] = Σ_{s<r≤t} g_r``
    for s ≤ t (0 on the diagonal) and -inf above it, so ``out.exp()`` is the causal decay matrix.

    Summed directly (a masked cumsum over t), never as ``G_t - G_s`` of cumulative sums: with an extreme gate
    (g = -1e4, or -0.1 · float32 max) those differences cancel catastrophically (or give inf - inf) and the
    small decays after the extreme step are lost, so a sequence and the same sequence in two halves disagreed.
    Memory: T · T · D per leading index (the quadratic forms need that tensor anyway).
    """
    T = g.shape[-2]
    steps = torch.ones(T, T, dtype=torch.bool, device=g.device)
    after = steps.tril(-1)[..., None]  # (T, T, 1): r > s, the steps that decay a key written at s
    x = g[..., :, None, :].expand(*g.shape[:-1], T, g.shape[-1]).masked_fill(~after, 0.0)  # x[t, s] = g_t if t > s
    return x.cumsum(dim=-3).masked_fill(~steps.tril()[..., None], float("-inf"))


def linear_attention_parallel(query: Tensor, key: Tensor, value: Tensor, log_decay: Tensor | None = None, *,
                              scale: float | None = None, initial_state: Tensor | None = None,
                              output_final_state: bool = False) -> tuple[Tensor, Tensor | None]:
    """Quadratic form ``O = ((Q Kᵀ) ⊙ D) V`` with ``D_ts = exp(Σ_{s<r≤t} g_r)`` for s ≤ t (:func:`segment_sums`).

    Memory O(T²) per head (O(T² K) for a per-key-dim decay): the oracle for short sequences.
    Args/returns as :func:`linear_attention`.
    """
    q, k, v, g, state0 = prepare_inputs(query, key, value, log_decay, initial_state, scale)
    T = q.shape[2]
    if T == 0:
        return _empty(q, v, state0, value, output_final_state)
    G = g.cumsum(dim=2)  # (B|1, H, T, 1|K): inclusive sums from the start, only exponentiated, never subtracted
    sums = segment_sums(g)  # (B|1, H, T, T, 1|K): Σ_{s<r≤t} g_r, -inf above the diagonal
    if g.shape[-1] == 1:
        logits = (q @ k.transpose(-1, -2)) * sums[..., 0].exp()  # (B, H, T, T)
    else:
        logits = torch.einsum("bhtk,bhsk,bhtsk->bhts", q, k, sums.exp())
    o = logits @ v  # (B, H, T, V)
    to_end = sums[:, :, -1].exp()  # (B|1, H, T, 1|K): decay from step s+1 to the end (the last row)
    state = (k * to_end).transpose(-1, -2) @ v  # (B, H, K, V)
    if state0 is not None:
        o = o + (q * G.exp()) @ state0
        state = state + G[:, :, -1, :, None].exp() * state0
    return _finish(o, state, value, output_final_state)


def linear_attention_recurrent(query: Tensor, key: Tensor, value: Tensor, log_decay: Tensor | None = None, *,
                               scale: float | None = None, initial_state: Tensor | None = None,
                               output_final_state: bool = False) -> tuple[Tensor, Tensor | None]:
    """Step-by-step form (decode): one state update and one readout per token. Args/returns as
    :func:`linear_attention`."""
    q, k, v, g, state = prepare_inputs(query, key, value, log_decay, initial_state, scale)
    B, H, T, K = q.shape
    if state is None:
        state = q.new_zeros(B, H, K, v.shape[-1])
    decay = g.exp()
    outputs = []
    for t in range(T):
        state = decay[:, :, t, :, None] * state + k[:, :, t, :, None] * v[:, :, t, None, :]  # (B, H, K, V)
        outputs.append((q[:, :, t, None, :] @ state)[:, :, 0])  # (B, H, V)
    if T == 0:
        return _empty(q, v, state, value, output_final_state)
    return _finish(torch.stack(outputs, dim=2), state, value, output_final_state)


# Chunks processed together by one batched pass of the chunk form: enough to amortise Python overhead, few
# enough that a block's tensors stay in cache (1024 tokens at chunk_size 64: ~1.4x faster than one pass on CPU).
CHUNKS_PER_BLOCK = 16
# Chunk length used for a per-key-dim (GLA/LightNet) decay when chunk_size is larger. Its intra-chunk part needs a
# (C, C, K) decay tensor; the state-carried inter-chunk part is matmuls. On CPU (T=2048, 8 heads, K=64) chunks of
# 8 ran ~4.5x faster than 64 and ~2.8x faster than 64 split by GLA's secondary chunking (off-diagonal sub-blocks
# as matmuls); the result is the same up to rounding.
PER_KEY_CHUNK = 8


# Tokens between two states kept by the memory-lean chunk form for its backward (rounded to whole chunks, at least
# one chunk): backward recomputes one such segment at a time, so its working set is that of SEGMENT_TOKENS tokens.
# At 16k tokens, 8 heads, dim 64: 8 MiB of kept states. Smaller segments save little memory and add Python overhead.
SEGMENT_TOKENS = 256


def linear_attention_chunk(query: Tensor, key: Tensor, value: Tensor, log_decay: Tensor | None = None, *,
                           scale: float | None = None, initial_state: Tensor | None = None,
                           output_final_state: bool = False, chunk_size: int = 64,
                           recompute: bool = True) -> tuple[Tensor, Tensor | None]:
    """Chunkwise form: exact quadratic attention inside each chunk, the state carried between chunks.

    Lightning Attention's intra/inter split (Qin et al. 2024, §3 (METHODS.md #23)); the chunkwise form of GLA
    (Yang et al. 2024, §3.3 (METHODS.md #21)) without the overflow-prone ``K ⊘ B`` factor. Chunks are batched
    ``CHUNKS_PER_BLOCK`` at a time, blocks run one after another with the state carried (same result; better
    cache use). The last block is padded to a multiple of ``chunk_size`` (padding has k = v = 0 and
    log_decay = 0, so it leaves the state unchanged). A per-key-dim decay uses chunks of at most
    ``PER_KEY_CHUNK`` tokens.

    ``recompute=True`` (default) runs it as one autograd Function that keeps only its (prepared) inputs and the state
    every ``SEGMENT_TOKENS`` tokens; backward recomputes one segment at a time, last to first, and back-propagates
    through it (per-segment checkpointing: about one extra forward in time; memory: inputs, gradients and one
    segment's intermediates). It is first-order only: a backward with ``create_graph=True`` raises
    NotImplementedError, and ``torch.func`` transforms (grad/vmap/jacrev) do not go through it (no ``setup_context``).
    ``recompute=False`` is plain autograd through every op (it keeps every chunk's logits and states: 691 MiB
    against SDPA's 194 MiB at 16k tokens forward+backward, docs/benchmarks.md); it is the oracle the tests compare
    against, and supports higher-order gradients and torch.func.
    Args/returns as :func:`linear_attention`. Raises ConfigError if chunk_size < 1.
    """
    if chunk_size < 1:
        raise ConfigError(f"expected chunk_size >= 1, got {chunk_size}")
    q, k, v, g, state, scale = prepare_inputs(query, key, value, log_decay, initial_state, scale, scale_query=False)
    B, H, T, K = q.shape
    if T == 0:
        return _empty(q, v, state, value, output_final_state)
    if state is None:
        state = q.new_zeros(B, H, K, v.shape[-1])
    constant = log_decay is None or log_decay.dim() == 1
    if g.shape[-1] != 1:  # per-key-dim decay: short chunks (see PER_KEY_CHUNK)
        chunk_size = min(chunk_size, PER_KEY_CHUNK)
    if recompute and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, g, state)):
        o, state = _ChunkRecompute.apply(q, k, v, g, state, scale, chunk_size, constant)
        return _finish(o, state, value, output_final_state)
    if recompute:  # nothing to differentiate: the same blocks, each written straight into the output
        with torch.no_grad():
            o, state, _ = _chunk_forward(q, k, v, g, state, scale, chunk_size, constant, segment=None)
        return _finish(o, state, value, output_final_state)
    step = chunk_size * CHUNKS_PER_BLOCK
    outputs = []
    blocks = zip(*(x.split(step, dim=2) for x in (q, k, v, g)))  # split, not slicing: O(T) backward
    for q_blk, k_blk, v_blk, g_blk in blocks:
        out, state, _ = _chunk_block(q_blk, k_blk, v_blk, g_blk, state, scale, chunk_size, constant)
        outputs.append(out)
    o = torch.cat(outputs, dim=2) if len(outputs) != 1 else outputs[0]
    return _finish(o, state, value, output_final_state)


def _chunk_block(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor, scale: float, C: int,
                 constant: bool, out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One block of whole chunks, batched: (B, H, T, K|V) prepared inputs, state (B, H, K, V) in and out; also the
    state entering each of its N chunks, (B, H, N, K, V). ``out``: a (B, H, T, V) view the output is written into
    (only without autograd, and only for a block of whole chunks); else a new tensor is returned."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    N = -(-T // C)
    pad = N * C - T
    if pad:
        q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
    q, k, v = (x.reshape(B, H, N, C, -1) for x in (q, k, v))  # (B, H, N, C, K|V)
    g = g.reshape(g.shape[0], H, N, C, -1)  # (B|1, H, N, C, 1|K)
    b = g.cumsum(dim=3)  # local inclusive cumulative log decay (exponentiated only, never subtracted)
    if b.shape[-1] == 1:
        # a constant decay gives every chunk the same (C, C) matrix (padding rows/cols only meet k = v = 0)
        sums = segment_sums(g[:, :, :1] if constant else g)[..., 0]  # (B|1, H, N|1, C, C)
        o = ((q @ k.transpose(-1, -2)) * (sums.exp() * scale)) @ v  # (B, H, N, C, C) @ (B, H, N, C, V) intra-chunk
    else:
        q = q * scale
        sums = segment_sums(g)  # (B, H, N, C, C, K)
        logits = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", q, k, sums.exp())
        o = logits @ v  # (B, H, N, C, V) intra-chunk part
    # decay from step s+1 to the chunk's end: an exclusive reverse cumsum (padding has g = 0), not last - b
    to_end = F.pad(g[:, :, :, 1:].flip(3).cumsum(3).flip(3), (0, 0, 0, 1))  # (B|1, H, N, C, 1|K)
    chunk_states = (k * to_end.exp()).transpose(-1, -2) @ v  # (B, H, N, K, V) each chunk's own contribution
    chunk_decay = b[:, :, :, -1, :, None].exp()  # (B|1, H, N, 1|K, 1)
    entering = []
    for decay_n, state_n in zip(chunk_decay.unbind(2), chunk_states.unbind(2)):  # unbind: O(N) backward
        entering.append(state)
        state = torch.addcmul(state_n, decay_n, state)  # decay_n * state + state_n in one pass
    entering = torch.stack(entering, dim=2)  # (B, H, N, K, V): the state before each chunk
    target = {} if out is None or pad else {"out": out.view(B, H, N, C, V)}
    if b.shape[-1] == 1:  # a scalar decay factors out of the readout: scale its V outputs, not its K inputs
        o = torch.add(o, (q @ entering) * (b.exp() * scale), **target)
    else:
        o = torch.add(o, (q * b.exp()) @ entering, **target)  # inter-chunk part: (B, H, N, C, K) @ (B, H, N, K, V)
    o = o.reshape(B, H, N * C, V)[:, :, :T]
    if out is not None and not target:
        out.copy_(o)
    return o, state, entering


def _chunk_forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor, scale: float, C: int,
                   constant: bool, segment: int | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The chunk form without autograd (call under no_grad): blocks of ``CHUNKS_PER_BLOCK`` chunks written into one
    preallocated (B, H, T, V) output (no list of block outputs, no cat). Returns ``(o, final_state, kept)``; kept is
    the state entering every ``segment`` tokens, (num_segments, B, H, K, V), or None when segment is None."""
    B, H, T, _ = q.shape
    o = q.new_empty(B, H, T, v.shape[-1])
    kept = None if segment is None else state.new_empty(-(-T // segment), *state.shape)
    step = C * CHUNKS_PER_BLOCK
    for lo in range(0, T, step):
        hi = min(lo + step, T)
        _, new_state, entering = _chunk_block(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], g[:, :, lo:hi], state,
                                              scale, C, constant, out=o[:, :, lo:hi])
        for n, start in enumerate(range(lo, hi, C) if kept is not None else ()):
            if start % segment == 0:  # entering[:, :, n]: the state before token start
                kept[start // segment] = entering[:, :, n]
        state = new_state
    return o, state, kept


class _ChunkRecompute(torch.autograd.Function):
    """The chunk form with per-segment recomputation in backward (see :func:`linear_attention_chunk`).

    Inputs are prepared tensors: q (B, H, T, K) unscaled, k (B, H, T, K), v (B, H, T, V), g (B|1, H, T, 1|K),
    state (B, H, K, V); scale, chunk size C and ``constant`` as in :func:`_chunk_block`. Saves q, k, v, g and the
    state entering every segment of ``C * max(1, SEGMENT_TOKENS // C)`` tokens, (num_segments, B, H, K, V).
    """

    @staticmethod
    def forward(ctx, q, k, v, g, state, scale, C, constant):
        segment = C * max(1, SEGMENT_TOKENS // C)
        o, state, kept = _chunk_forward(q, k, v, g, state, scale, C, constant, segment)
        ctx.segment, ctx.scale, ctx.C, ctx.constant = segment, scale, C, constant
        ctx.save_for_backward(q, k, v, g, kept)
        return o, state

    @staticmethod
    def backward(ctx, d_o, d_state):
        if torch.is_grad_enabled():  # create_graph=True: the recomputation below is not differentiable itself
            raise NotImplementedError("linear_attention_chunk(recompute=True) has first-order gradients only, got a "
                                      "backward with create_graph=True; use recompute=False for higher orders")
        q, k, v, g, kept = ctx.saved_tensors
        T = q.shape[2]
        needs = ctx.needs_input_grad[:5]  # q, k, v, g, state
        grads = [torch.empty_like(x) if need else None for x, need in zip((q, k, v, g), needs)]
        if needs[3] and g.stride(2) == 0:  # an expanded constant decay: a real (B|1, H, T, 1) gradient buffer
            grads[3] = torch.empty(g.shape, dtype=g.dtype, device=g.device)
        d_carry = d_state  # gradient w.r.t. the state leaving the current segment
        for i in reversed(range(kept.shape[0])):
            lo, hi = i * ctx.segment, min((i + 1) * ctx.segment, T)
            with torch.enable_grad():
                inputs = [x[:, :, lo:hi].detach().requires_grad_(need) for x, need in zip((q, k, v, g), needs)]
                state_in = kept[i].detach().requires_grad_()
                out, state_out, _ = _chunk_block(*inputs, state_in, ctx.scale, ctx.C, ctx.constant)
                wrt = [x for x in (*inputs, state_in) if x.requires_grad]
                found = iter(torch.autograd.grad((out, state_out), wrt, (d_o[:, :, lo:hi], d_carry)))
            for buffer, x in zip(grads, inputs):
                if x.requires_grad:
                    buffer[:, :, lo:hi] = next(found)
            d_carry = next(found)
        return (*grads, d_carry if needs[4] else None, None, None, None)


FORMS: dict[str, Callable[..., tuple[Tensor, Tensor | None]]] = {
    "parallel": linear_attention_parallel,
    "chunk": linear_attention_chunk,
    "recurrent": linear_attention_recurrent,
}


def linear_attention(query: Tensor, key: Tensor, value: Tensor, log_decay: Tensor | None = None, *,
                     form: str = "chunk", scale: float | None = None, initial_state: Tensor | None = None,
                     output_final_state: bool = False, chunk_size: int = 64,
                     recompute: bool = True) -> tuple[Tensor, Tensor | None]:
    """Causal decaying linear attention ``S_t = Diag(exp(g_t)) S_{t-1} + k_tᵀ v_t, o_t = scale · q_t S_t``.

    Args:
        query: (B, H, T, K) tensor, any float dtype; computed in float32 (float64 stays float64).
        key: (B, Hkv, T, K) tensor.
        value: (B, Hkv, T, V) tensor.
        log_decay: None, (H,), (B, H, T) or (B, H, T, K); values ≤ 0 (not checked).
        form: "parallel", "chunk" or "recurrent" (all give the same result up to rounding).
        scale: multiplies query; default K ** -0.5.
        initial_state: (B, H, K, V) state carried in from a previous segment, or None (zeros).
        output_final_state: return the state after the last token (else None).
        chunk_size: tokens per chunk (chunk form only; at most PER_KEY_CHUNK = 8 for a per-key-dim decay).
        recompute: chunk form only. True (default): the memory-lean autograd Function of
            :func:`linear_attention_chunk`, whose gradients are first-order only (``create_graph=True`` raises
            NotImplementedError; it has no ``setup_context``, so ``torch.func`` grad/vmap/jacrev do not work through
            it). False: plain autograd through every op (more memory; higher-order gradients and torch.func work).

    Returns:
        output (B, H, T, V) in value's dtype; final_state (B, H, K, V) float32/float64, or None. T = 0 gives an
        empty output and the initial state (zeros if None) unchanged.

    Raises:
        ShapeError on inconsistent shapes; ConfigError for an unknown form or chunk_size < 1.
    """
    if form not in FORMS:
        raise ConfigError(f"expected form in {sorted(FORMS)}, got {form!r}")
    kwargs = {"chunk_size": chunk_size, "recompute": recompute} if form == "chunk" else {}
    return FORMS[form](query, key, value, log_decay, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, **kwargs)
