"""``mean_ablation``: head outputs replaced by a mean, against an independent oracle (means computed from a forward
pre-hook on ``o_proj`` of plain HF passes, written into the o_proj input of a plain pass)."""

from __future__ import annotations

import pytest
import torch

from attnlab import Session
from attnlab.capture.head_record import record_head_means
from attnlab.edits import EDITS
from attnlab.edits.mean_ablation import MeanAblation
from attnlab.errors import ConfigError
from attnlab.evaluation.passkey import _cache_argument
from attnlab.testing import MODEL_LOGITS_ATOL
from edits.test_head_patch import H, o_proj, oracle_head_inputs, oracle_logits, patched_logits
from tiny_models import tiny_llama

G = torch.Generator().manual_seed(9)
IDS = torch.randint(0, 97, (2, 12), generator=G)
REFERENCE = [torch.randint(0, 97, (3, 10), generator=G), torch.randint(0, 97, (2, 7), generator=G)]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_heads=H, num_kv_heads=2, layers=2)


def oracle_means(model, batches):
    """{layer: (H, D)}: mean o_proj input over every real token of the batches (float64)."""
    sums, count = {}, 0
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        seen = oracle_head_inputs(model, ids, mask)
        count += int(mask.sum())
        for layer, x in seen.items():
            sums[layer] = sums.get(layer, 0) + x[mask.bool()].double().sum(0)
    return {layer: total / count for layer, total in sums.items()}


def test_recorded_means_equal_the_o_proj_oracle_on_a_padded_batch(model):
    padded = torch.ones(2, 7, dtype=torch.long)
    padded[0, :3] = 0
    batches = [{"input_ids": REFERENCE[0], "attention_mask": torch.ones_like(REFERENCE[0])},
               {"input_ids": REFERENCE[1], "attention_mask": padded}]
    means = record_head_means(model, batches)
    expected = oracle_means(model, batches)
    assert sorted(means) == [0, 1] and means[0].shape == (H, 8)
    for layer in (0, 1):
        torch.testing.assert_close(means[layer].double(), expected[layer], atol=1e-6, rtol=0)
    mask = torch.ones_like(IDS)
    mask[1, :4] = 0
    edit = MeanAblation.from_means(means, layers=[1], heads=[1, 2])
    got, session = patched_logits(model, [edit], IDS, mask=mask)
    want = oracle_logits(model, IDS, {(1, h): expected[1][h].expand(2, 12, -1) for h in (1, 2)}, mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=MODEL_LOGITS_ATOL, rtol=0)
    report = session.edit_report()
    assert report.calls_touched[0] == 1 and report.heads_touched[0] == 2 and report.max_change[0] > 0
    assert report.spec[0] == "mean_ablation:fraction=1.0,source=recorded,layers=1,heads=1+2"


@pytest.mark.parametrize("probes", [(), ("entropy",)], ids=["fast", "eager"])
def test_the_batch_mean_equals_the_mean_over_the_calls_real_tokens(model, probes):
    mask = torch.ones_like(IDS)
    mask[0, :5] = 0
    got, session = patched_logits(model, ["mean_ablation:layers=0,heads=3"], IDS, mask=mask, probes=probes)
    plain = oracle_head_inputs(model, IDS, mask)[0][:, :, 3]  # (B, L, D); layer 0 sees no earlier edit
    mean = plain[mask.bool()].double().mean(0)
    want = oracle_logits(model, IDS, {(0, 3): mean.expand(2, 12, -1)}, mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=MODEL_LOGITS_ATOL, rtol=0)
    assert session.edit_report().max_change[0] > 0


def test_the_sequence_mean_gives_each_sequence_its_own_result(model):
    mask = torch.ones_like(IDS)
    mask[1, :4] = 0
    spec = "mean_ablation:fraction=0.5,source=sequence,layers=1,heads=0"
    together, _ = patched_logits(model, [spec], IDS, mask=mask)
    alone, _ = patched_logits(model, [spec], IDS[1:, 4:])
    torch.testing.assert_close(together[1, 4:], alone[0], atol=1e-4, rtol=0)
    first, _ = patched_logits(model, [spec], IDS[:1])
    torch.testing.assert_close(together[0], first[0], atol=1e-4, rtol=0)
    batch_mean, _ = patched_logits(model, [spec.replace("sequence", "batch")], IDS, mask=mask)
    assert not torch.allclose(batch_mean[1, 4:], alone[0], atol=1e-4)  # the batch mean mixes the sequences


def test_fraction_zero_is_the_identity_on_the_fast_path(model):
    plain, _ = patched_logits(model, [], IDS)
    got, session = patched_logits(model, ["mean_ablation:fraction=0"], IDS)
    assert torch.equal(got, plain) and set(session.attention_paths.values()) == {"sdpa"}  # the no-edit path
    assert bool(session.edit_report().identity[0])


def test_recorded_without_means_and_bad_means_are_one_line_config_errors(model):
    with pytest.raises(ConfigError, match="source=recorded needs recorded means; use the Python API") as info:
        Session(model, edits=["mean_ablation:source=recorded"])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"no recorded mean for layer\(s\) \[1\]"):
        MeanAblation.from_means({0: torch.zeros(H, 8)}, layers=[0, 1])
    with pytest.raises(ConfigError, match="num_heads=4"):
        Session(model, edits=[MeanAblation.from_means({0: torch.zeros(3, 8)})])
    with pytest.raises(ConfigError, match=r"fraction must be in \[0.0, 1.0\]"):
        EDITS.get("mean_ablation")(fraction=2.0)
    with pytest.raises(ConfigError, match="no real token"):
        record_head_means(model, [{"input_ids": IDS, "attention_mask": torch.zeros_like(IDS)}])


def generate_logits(model, ids, steps=3):
    """(steps, B, vocab) logits of greedy ``generate`` with the KV cache (prefill, then one-row decode calls)."""
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                             do_sample=False, use_cache=True, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
    return torch.stack(out.logits)


@pytest.mark.parametrize("source", ["batch", "sequence"])
def test_a_call_mean_under_a_kv_cache_reuses_the_prefill_mean_on_decode_steps(model, source):
    """Decode steps (q_len 1 < kv_len) get the prompt's mean, like an o_proj hook writing the prompt mean into every
    row of every step; before, a decode step's mean was its own single row, so the edit did nothing there."""
    plain = oracle_head_inputs(model, IDS)[0][:, :, 3].double()  # (B, L, D): layer 0 sees no earlier edit
    mean = plain.mean(dim=(0, 1)).expand(2, -1) if source == "batch" else plain.mean(dim=1)  # (B, D)
    hook = o_proj(model, 0).register_forward_pre_hook(lambda m, args: write_head(args[0], 3, mean))
    try:
        want = generate_logits(model, IDS)
    finally:
        hook.remove()
    with Session(model, edits=[f"mean_ablation:source={source},layers=0,heads=3"]) as session:
        got = generate_logits(model, IDS)
    torch.testing.assert_close(got, want, atol=MODEL_LOGITS_ATOL, rtol=0)
    assert session.edit_report().calls_touched[0] == 3  # the prefill and two decode steps


def test_a_decode_step_without_a_prefill_in_the_session_is_a_one_line_config_error(model):
    edit = EDITS.get("mean_ablation")(layers=[0], heads=[3])
    with Session(model, edits=[edit]):
        generate_logits(model, IDS, steps=2)  # leaves a prefill mean in the edit
    name = _cache_argument(model)  # "cache" or "past_key_values", by transformers version
    with torch.no_grad():
        cache = getattr(model(input_ids=IDS, use_cache=True), name)
    with pytest.raises(ConfigError, match=r"q_len 1 < kv_len 13 \(a KV cache\).*use source=recorded") as info:
        with torch.no_grad(), Session(model, edits=[edit]):  # a new session forgets the last one's prefill
            model(input_ids=IDS[:, :1], attention_mask=torch.ones(2, 13, dtype=torch.long), use_cache=True,
                  **{name: cache})
    assert "\n" not in str(info.value)


def write_head(x, head, mean):
    """o_proj input (B, n, H·D) with head ``head``'s slice set to ``mean`` (B, D) on every row."""
    x = x.clone().view(*x.shape[:2], H, -1)
    x[:, :, head] = mean[:, None].to(x.dtype)
    return (x.flatten(2),)
