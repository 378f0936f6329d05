"""Peer oracle: our forms against flash-linear-attention's pure-torch naive references on the same inputs.

fla's references are float32, seq-first ``(B, T, H, D)``; ours are heads-first. Importing fla needs ``triton``
(import only, nothing runs on it); both come with the ``dev`` extra. Without them these tests are skipped.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnlab.functional.linear_attention import FORMS
from attnlab.functional.positions import retnet_log_decay
from attnlab.testing import TOLERANCES

pytestmark = pytest.mark.peer
fla_gla = pytest.importorskip("fla.ops.gla.naive", reason="flash-linear-attention (+ triton) not installed")
fla_simple = pytest.importorskip("fla.ops.simple_gla.naive", reason="flash-linear-attention not installed")
fla_retention = pytest.importorskip("fla.ops.retention.naive", reason="flash-linear-attention not installed")
fla_linear = pytest.importorskip("fla.ops.linear_attn.naive", reason="flash-linear-attention not installed")

TOL = TOLERANCES[torch.float32]
CHUNK = 16


def assert_close_to_peer(ours, peer):
    """float32 peer vs our float64 result: the float32 table tolerances times the chunked-path fudge."""
    torch.testing.assert_close(peer.double(), ours.double(), rtol=TOL["rtol"] * TOL["fudge"],
                               atol=TOL["atol"] * TOL["fudge"])


def inputs(T, K=8, V=6, H=3, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, T, K, generator=g, dtype=torch.float64), torch.randn(B, H, T, K, generator=g,
                                                                                 dtype=torch.float64)
    v = torch.randn(B, H, T, V, generator=g, dtype=torch.float64)
    gk = F.logsigmoid(torch.randn(B, H, T, K, generator=g, dtype=torch.float64) + 2) / 4
    state = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    return q, k, v, gk, state


def seq_first(*xs):
    return [x.transpose(1, 2).float().contiguous() for x in xs]


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("T", [1, CHUNK + 5, 3 * CHUNK])
def test_gla_matches_fla_naive_recurrent(form, T):
    q, k, v, gk, state = inputs(T)
    ours, ours_state = FORMS[form](q, k, v, gk, initial_state=state, output_final_state=True,
                                   **({"chunk_size": CHUNK} if form == "chunk" else {}))
    peer, peer_state = fla_gla.naive_recurrent_gla(*seq_first(q, k, v, gk), initial_state=state.float(),
                                                   output_final_state=True)
    assert_close_to_peer(ours, peer.transpose(1, 2))
    assert_close_to_peer(ours_state, peer_state)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_simple_gla_matches_fla_naive(form):
    T = 2 * CHUNK  # fla's naive chunk form needs whole chunks for its padding of g
    q, k, v, gk, state = inputs(T, seed=1)
    g = gk[..., 0]  # (B, H, T): one data-dependent scalar per head and step
    ours, ours_state = FORMS[form](q, k, v, g, initial_state=state, output_final_state=True,
                                   **({"chunk_size": CHUNK} if form == "chunk" else {}))
    qs, ks, vs = seq_first(q, k, v)
    gs = g.transpose(1, 2).float().contiguous()
    chunk, chunk_state = fla_simple.naive_chunk_simple_gla(qs, ks, vs, gs, initial_state=state.float(),
                                                           output_final_state=True, chunk_size=CHUNK)
    recurrent, recurrent_state = fla_simple.naive_recurrent_simple_gla(qs, ks, vs, gs, initial_state=state.float())
    parallel, _ = fla_simple.naive_parallel_simple_gla(qs, ks, vs, gs)
    for peer in (chunk, recurrent):
        assert_close_to_peer(ours, peer.transpose(1, 2))
    assert_close_to_peer(ours_state, chunk_state)
    assert_close_to_peer(ours_state, recurrent_state)
    no_state, _ = FORMS[form](q, k, v, g, **({"chunk_size": CHUNK} if form == "chunk" else {}))
    assert_close_to_peer(no_state, parallel.transpose(1, 2))


@pytest.mark.parametrize("form", sorted(FORMS))
def test_retention_matches_fla_naive(form):
    q, k, v, _, _ = inputs(2 * CHUNK + 3, H=4, seed=2)
    ours, _ = FORMS[form](q, k, v, retnet_log_decay(4).float(), **({"chunk_size": CHUNK} if form == "chunk" else {}))
    # fla's retention is heads-first
    assert_close_to_peer(ours, fla_retention.naive_retention(q.float(), k.float(), v.float()))


@pytest.mark.parametrize("form", sorted(FORMS))
def test_plain_linear_attention_matches_fla_naive(form):
    q, k, v, _, state = inputs(64, seed=3)  # fla's naive chunk form uses a fixed chunk of 64
    ours, ours_state = FORMS[form](q, k, v, None, initial_state=state, output_final_state=True)
    qs, ks, vs = seq_first(q, k, v)
    peer, peer_state = fla_linear.naive_recurrent_linear_attn(qs, ks, vs, initial_state=state.float(),
                                                              output_final_state=True)
    assert_close_to_peer(ours, peer.transpose(1, 2))
    assert_close_to_peer(ours_state, peer_state)
    assert_close_to_peer(FORMS[form](q, k, v)[0], fla_linear.naive_chunk_linear_attn(qs, ks, vs).transpose(1, 2))
