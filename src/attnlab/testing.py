"""Test helpers shared by attnlab's tests and by users testing their own probes/kernels.

One tolerance table (STYLE.md rule 33) and the golden/ref/fast comparison of FlexAttention's tests:
``err(fast, golden) <= fudge * err(ref, golden) + atol``.
"""

from __future__ import annotations

import torch
from torch import Tensor

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-7, "atol": 1e-7, "fudge": 1.0},
    torch.float32: {"rtol": 1.3e-6, "atol": 1e-5, "fudge": 10.0},
    torch.float16: {"rtol": 1e-3, "atol": 1e-5, "fudge": 1.1},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5, "fudge": 1.1},
}

# Logits of a model under the attnlab backend vs attn_implementation="sdpa" (fp32), tiny random models.
MODEL_LOGITS_ATOL = 1e-5
# The same on the bundled SmolLM2 (HF's own eager path differs from sdpa by ~7.6e-5 there).
REAL_MODEL_LOGITS_ATOL = 1e-4


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype | None = None) -> None:
    """``torch.testing.assert_close`` with the table's tolerance for ``dtype`` (default: actual's dtype)."""
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=tol["rtol"], atol=tol["atol"])


def assert_matches_reference(fast: Tensor, ref: Tensor, golden: Tensor, dtype: torch.dtype | None = None) -> None:
    """Fail if the fast path is further from the float64 golden than ``fudge`` × the same-dtype reference is."""
    tol = TOLERANCES[dtype or fast.dtype]
    golden = golden.double()
    fast_err = (fast.double() - golden).abs().max().item()
    ref_err = (ref.double() - golden).abs().max().item()
    bound = tol["fudge"] * ref_err + tol["atol"]
    if not fast_err <= bound:
        raise AssertionError(f"fast path error {fast_err:.3e} exceeds {tol['fudge']} x reference error "
                             f"{ref_err:.3e} + atol {tol['atol']:.1e}")


def feed_probs(probes, probs: Tensor, keep: Tensor | None = None, *, value: Tensor | None = None,
               causal: bool = True, query_valid: Tensor | None = None, input_ids: Tensor | None = None,
               layer_idx: int = 0, num_layers: int = 1, num_kv_heads: int | None = None, bind: bool = True) -> None:
    """Feed constructed attention to probes, as one attention call of one layer (for known-answer tests).

    Args:
        probes: Probe instances.
        probs: (B, H, L, L) attention probabilities (rows of masked-out queries may be all 0).
        keep: bool (B|1, H|1, L, L) visibility mask; default: causal if ``causal`` else all visible.
        value: (B, Hkv, L, Dv) value states; default ones with Hkv = H.
        query_valid: (B, L) bool, real tokens; default all True.
        input_ids: (B, L) token ids, for token-level tables.
    """
    from attnlab.functional.attention import BlockView, causal_keep
    from attnlab.facts import ModelFacts
    from attnlab.probes.base import AttentionCall, SequenceInfo

    B, H, Lq, Lk = probs.shape
    if keep is None and causal:
        keep = causal_keep(Lq, Lk)[None, None]
    valid = torch.ones(B, Lk, dtype=torch.bool) if query_valid is None else query_valid
    value = torch.ones(B, num_kv_heads or H, Lk, 4) if value is None else value
    sequence = SequenceInfo.from_mask(valid, input_ids, 0)
    call = AttentionCall(layer_idx=layer_idx, num_heads=H, num_kv_heads=value.shape[1], q_len=Lq, kv_len=Lk,
                         causal=causal, scale=1.0, value=value, query_valid=valid[:, Lk - Lq:], key_valid=valid,
                         query_positions=sequence.positions[:, Lk - Lq:], key_positions=sequence.positions,
                         sequence=sequence)
    logits = torch.log(probs).clamp_min(torch.finfo(probs.dtype).min)  # the kernel's finite masked logits
    block = BlockView(probs=probs, logits=logits, keep=keep, q_index=torch.arange(Lq))
    for probe in probes:
        if bind:
            probe.bind(ModelFacts(num_layers=num_layers, num_heads=H, num_kv_heads=value.shape[1],
                                  head_dim=value.shape[-1], hidden_size=H * value.shape[-1]))
        probe.begin_call(call)
        probe.update(call, block)
        probe.end_call(call)
