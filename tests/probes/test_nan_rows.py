"""A query row whose attention becomes NaN inside the model is flagged (``nan_rows``), never counted as entropy 0."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import attnlab
from attnlab.functional.attention import attention_reference, blocked_attention, causal_keep

PROBES = ["entropy", "sink", "distance"]
IDS = [5, 9, 11, 3, 17, 21, 8, 30, 12, 6, 7, 40, 41, 2, 13, 50]


def _rows(session):
    return {(r["probe"], r["statistic"], r["layer"], r["head"], r["position"]): r["value"] for r in session.rows()}


def _run(model, ids, poison=None):
    """Rows of a session over one text; ``poison = (module, token)`` sets that module's output at token to NaN."""
    handle = None
    if poison is not None:
        module, token = poison

        def hook(_module, _args, output):
            output = output.clone()
            output[:, token] = float("nan")
            return output

        handle = module.register_forward_hook(hook)
    session = attnlab.Session(model, probes=PROBES)
    try:
        with session, torch.no_grad():
            model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    finally:
        if handle is not None:
            handle.remove()
    return _rows(session)


def _pick(rows, probe, statistic, layer):
    return {key[3:]: value for key, value in rows.items() if key[:3] == (probe, statistic, layer)}


@pytest.fixture(scope="module")
def llama():
    from tiny_models import tiny_llama

    return tiny_llama(num_heads=4, num_kv_heads=2, layers=2)


@pytest.mark.parametrize("projection, token, nan_per_head", [("q_proj", 15, 1), ("k_proj", 12, 4)])
def test_nan_rows_are_counted_and_left_out_of_the_entropy(llama, caplog, projection, token, nan_per_head):
    """In the last layer, a NaN query at the last token (15) spoils row 15; a NaN key at token 12 spoils rows 12-15.

    The entropy of that layer must then be the mean over the healthy rows, i.e. the entropy of the text cut before
    ``token`` (causal: the rows before it are the same), and every value in the results must be finite.
    """
    module = getattr(llama.model.layers[1].self_attn, projection)
    with caplog.at_level(logging.WARNING, logger="attnlab"):
        poisoned = _run(llama, IDS, (module, token))
    clean, cut = _run(llama, IDS), _run(llama, IDS[:token])

    assert all(math.isfinite(value) for value in poisoned.values())
    assert _pick(poisoned, "entropy", "nan_rows", 1) == {(h, None): nan_per_head for h in range(4)}
    assert _pick(poisoned, "entropy", "nan_rows", 0) == {(h, None): 0 for h in range(4)}
    for statistic in ("entropy", "normalised_entropy"):
        assert _pick(poisoned, "entropy", statistic, 0) == pytest.approx(_pick(clean, "entropy", statistic, 0))
        got, expected = _pick(poisoned, "entropy", statistic, 1), _pick(cut, "entropy", statistic, 1)
        assert got.keys() == expected.keys() and len(got) == 4
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5), (statistic, key)
    for probe, statistic in (("sink", "alpha"), ("distance", "mass"), ("distance", "mean_attention")):
        assert _pick(poisoned, probe, statistic, 1), (probe, statistic)  # still measured on the healthy rows
    warnings = [r for r in caplog.records if "became NaN" in r.getMessage()]
    assert len(warnings) == 1 and "layer 1" in warnings[0].getMessage()


def test_a_run_without_nan_rows_has_no_nan_rows_statistic_and_no_warning(llama, caplog):
    with caplog.at_level(logging.WARNING, logger="attnlab"):
        rows = _run(llama, IDS)
    assert not [key for key in rows if key[1] == "nan_rows"]
    assert not [r for r in caplog.records if "became NaN" in r.getMessage()]


def test_kernels_keep_a_nan_row_nan_and_a_fully_masked_row_zero():
    """The blocked kernel and the reference agree: no visible key -> zeros; a NaN query -> NaN, flagged."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(3))
    q[0, 1, 4] = float("nan")  # head 1, query 4
    keep = causal_keep(6, 6)[None, None].clone()
    keep[..., 2, :] = False  # query 2 sees nothing
    blocks = []
    output = blocked_attention(q, k, v, keep, block_size=4, on_block=blocks.append)
    _, probs, _ = attention_reference(q, k, v, keep)
    assert torch.isnan(probs[0, 1, 4, :5]).all() and torch.isnan(output[0, 1, 4]).all()  # keys 0 … 4 visible
    assert (probs[:, :, 2] == 0).all() and (output[:, :, 2] == 0).all()
    flagged = torch.cat([block.nan_rows for block in blocks], dim=-1)  # (1, 2, 6)
    assert flagged.nonzero().tolist() == [[0, 1, 4]]
    clean = blocks[1].without_nan_rows()  # rows 4, 5
    assert not torch.isnan(clean.probs).any() and not clean.keep[0, 1, 0].any() and clean.keep[0, 0, 0].any()
    assert blocks[0].without_nan_rows() is blocks[0]


def test_probes_that_do_not_count_nan_rows_never_see_them(llama):
    """Only a probe with ``counts_nan_rows`` (entropy) is handed NaN rows; every other probe gets them masked out."""
    from attnlab.probes.base import Probe

    class SeesProbs(Probe):
        needs = frozenset({"probs"})

        def __init__(self) -> None:
            self.nan_seen = False
            self.rows_seen = 0

        def update(self, call, block):
            self.nan_seen |= bool(torch.isnan(block.probs).any())
            self.rows_seen += block.probs.shape[2]

    probe = SeesProbs()
    module = llama.model.layers[1].self_attn.k_proj

    def hook(_module, _args, output):
        output = output.clone()
        output[:, 12] = float("nan")
        return output

    handle = module.register_forward_hook(hook)
    try:
        with attnlab.Session(llama, probes=[probe, "entropy"]) as session, torch.no_grad():
            llama(input_ids=torch.tensor([IDS]))
    finally:
        handle.remove()
    assert probe.rows_seen > 0 and not probe.nan_seen
    assert any(r["statistic"] == "nan_rows" and r["value"] > 0 for r in session.rows())  # entropy still counts them
