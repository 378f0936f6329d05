"""The sink-dropped distance statistics (``*_no_sink``) are accurate where the sink takes nearly all the mass."""

from __future__ import annotations

import pytest
import torch

from attnlab.functional.attention import causal_keep
from attnlab.probes.distance import DistanceProbe
from attnlab.testing import feed_probs


def _rows(source):
    """{(statistic, layer, head, position): value} of a probe's or a session's rows."""
    return {(r["statistic"], r["layer"], r["head"], r["position"]): r["value"] for r in source.rows()}


def test_no_sink_renormalisation_is_exact_when_the_sink_takes_almost_everything():
    """Row i puts 1 - rest_i on the sink and rest_i / i on each other key: renormalised, every pair is 1 / i.

    With rest_i down to 1e-9 the float32 probs of a row sum to 1 only within ~3e-8, so dividing by
    ``1 - sink`` (not by the mass actually off the sink) is wrong by up to 3e-8 / rest_i.
    """
    L = 32
    keep = causal_keep(L, L)
    rest = 10.0 ** -torch.linspace(3, 9, L, dtype=torch.float64)  # (L,) mass off the sink, per row
    i = torch.arange(L, dtype=torch.float64).clamp(min=1)
    probs = torch.where(keep, (rest / i)[:, None], torch.zeros((), dtype=torch.float64))
    probs[:, 0] = 1 - rest
    probs[0, 0] = 1.0
    probe = DistanceProbe()
    feed_probs([probe], probs.float()[None, None].expand(1, 2, L, L).contiguous())
    rows = _rows(probe)
    expected = (1 / torch.arange(L // 2, L, dtype=torch.float64)).mean().item()  # fixed rows 16..31, d < 16
    for start in (0, 1, 2, 4, 8):
        for head in (0, 1):
            assert rows[("mean_attention_no_sink", 0, head, start)] == pytest.approx(expected, rel=1e-6)
    assert rows[("power_law_exponent_no_sink", 0, 0, None)] == pytest.approx(0.0, abs=1e-6)  # flat


def _sink_llama():
    """A tiny Llama whose four heads leave from ~1e-1 down to below 1e-7 of a row off <s>, with a decay over distance.

    Only <s> (id 1) has hidden dimension 0, and only that dimension feeds key component 3 (the slowest RoPE pair,
    nearly unrotated over 100 tokens), which every query reads through its bias with a per-head weight: a sink
    per head of graded strength. Query and key biases on component 1 (RoPE frequency 0.1) add
    ``cos(0.1 (q - k))``, a decay over the fixed rows' distances (< 50), so the decay fits are well conditioned.
    """
    from tiny_models import tiny_llama

    model = tiny_llama(num_heads=4, num_kv_heads=2, layers=3, seed=0, attention_bias=True)
    hidden, head_dim = model.config.hidden_size, model.config.hidden_size // 4
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, 0] = 0.0
        embed[1, 0] = 3.0
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.bias.zero_()
            attn.k_proj.bias.zero_()
            attn.q_proj.bias.view(-1, head_dim)[:, 3] = torch.tensor([2.5, 3.5, 4.5, 5.5])
            attn.q_proj.bias.view(-1, head_dim)[:, 1] = 3.0
            attn.k_proj.bias.view(-1, head_dim)[:, 1] = 3.0
            key_weight = attn.k_proj.weight.view(-1, head_dim, hidden)
            key_weight[:, 3, :] = 0.0
            key_weight[:, 3, 0] = 2.0
    return model


def test_left_padded_batch_gives_the_distance_statistics_of_each_text_alone():
    """Every distance statistic, the sink-dropped ones included, agrees within 1e-5 relative (was 2e-4)."""
    import attnlab

    model = _sink_llama()
    generator = torch.Generator().manual_seed(4)
    texts = [[1] + torch.randint(3, 97, (n,), generator=generator).tolist() for n in (99, 60)]

    alone = attnlab.Session(model, probes=["distance"])
    with alone, torch.no_grad():
        for ids in texts:
            model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    n = max(map(len, texts))
    ids = torch.tensor([[0] * (n - len(t)) + t for t in texts])
    mask = torch.tensor([[0] * (n - len(t)) + [1] * len(t) for t in texts])
    batched = attnlab.Session(model, probes=["distance"])
    with batched, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)

    expected, got = _rows(alone), _rows(batched)
    assert expected.keys() == got.keys()
    assert {key[0] for key in expected} >= {"mean_attention_no_sink", "power_law_exponent_no_sink",
                                            "exp_decay_rate_no_sink", "mean_attention", "mass"}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-12), key
