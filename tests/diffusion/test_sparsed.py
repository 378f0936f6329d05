"""sparsed edit and the masked-diffusion LM sampler: the schedule fires on the intended steps, the pattern selected at
step t* is reused, re-selection touches only the generated region, select=1 equals dense."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.edits import parse_edit_spec
from attnlab.edits.sparsed import SparseD, generation_block
from attnlab.errors import ConfigError, ShapeError
from attnlab.lab.diffusion_lm import sample, tokens_per_step
from attnlab.probes.base import Probe
from diffusion.mech_calls import diffusion_call, edited

L, BS, HEADS = 22, 4, 3  # 6 blocks, the last one partial


def lm_call(step, seed=0, layer_idx=0):
    """A bidirectional call of L tokens at ``step`` (no patch layout needed)."""
    return diffusion_call((1, 1, L), step=step, seed=seed, layer_idx=layer_idx, heads=HEADS, head_dim=6)


def run(edit, step, seed=0, layer_idx=0):
    call, q, k, v = lm_call(step, seed, layer_idx)
    return edited([edit], call, q, k, v), (call, q, k, v)


def oracle_select(probs, select, bs, first=0):
    """(B, H, nq, nk') bool: per (head, query block), the ⌊nk'·select⌋+1 key blocks ≥ ``first`` with the largest mean
    probability, the probabilities renormalised over keys ≥ first·bs when first > 0; written out tile by tile."""
    B, H, Lq, Lk = probs.shape
    part = probs[..., first * bs:]
    if first:
        part = part / part.sum(-1, keepdim=True)
    nq, nk = math.ceil(Lq / bs), math.ceil(part.shape[-1] / bs)
    keep = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    count = min(nk, int(nk * select) + 1)
    for b in range(B):
        for h in range(H):
            for i in range(nq):
                means = [float(part[b, h, i * bs:(i + 1) * bs, j * bs:(j + 1) * bs].mean()) for j in range(nk)]
                for j in sorted(range(nk), key=lambda j: -means[j])[:count]:
                    keep[b, h, i, j] = True
    return keep


def probs_of(call, q, k):
    return torch.softmax(q @ k.transpose(-1, -2) * call.scale, dim=-1)


def test_schedule_fires_on_the_intended_steps():
    edit = SparseD(num_steps=10, skip=0.2, select=0.3, block_size=BS, gen_len=9)
    assert edit.selection_step == 3  # ⌊0.2 · 10⌋ + 1, the repo's end_time
    masked = [run(edit, step)[0].keep is not None for step in range(10)]
    assert masked == [False] * 4 + [True] * 6


def test_pattern_selected_at_t_star_is_the_oracle_and_reused():
    edit = SparseD(num_steps=10, skip=0.2, select=0.3, block_size=BS, gen_len=9, reselect=False)
    for step in range(3):
        run(edit, step, seed=step)
    _, (call, q, k, v) = run(edit, 3, seed=3)
    last = generation_block(L, BS, 9)
    assert last == 4  # 22 - 4·4 = 6 <= 9 (and 22 - 3·4 = 10 > 9)
    probs = probs_of(call, q, k)
    expected = oracle_select(probs, 0.3, BS)
    expected[..., last:] = oracle_select(probs, 0.3, BS, first=last)
    assert torch.equal(edit.pattern(0), expected)
    assert not bool(torch.equal(expected[:, 0], expected[:, 1]) and torch.equal(expected[:, 1], expected[:, 2]))
    for step in (4, 7, 9):  # other query/key states: the same pattern, as whole tiles
        call_edit, _ = run(edit, step, seed=step)
        tiles = expected.repeat_interleave(BS, 2).repeat_interleave(BS, 3)[..., :L, :L]
        assert torch.equal(call_edit.keep.expand_as(tiles), tiles)
    assert torch.equal(edit.pattern(0), expected)


def test_reselection_touches_only_the_generated_region_and_acts_from_the_next_step():
    edit = SparseD(num_steps=10, skip=0.2, select=0.3, block_size=BS, gen_len=9, reselect=True)
    for step in range(4):
        run(edit, step, seed=step)
    selected = edit.pattern(0).clone()
    last = generation_block(L, BS, 9)
    patterns = [selected]
    for step in range(4, 10):
        call_edit, (call, q, k, v) = run(edit, step, seed=step)
        tiles = patterns[-1].repeat_interleave(BS, 2).repeat_interleave(BS, 3)[..., :L, :L]
        assert torch.equal(call_edit.keep.expand_as(tiles), tiles)  # this step uses the earlier steps' selections
        reselected = oracle_select(probs_of(call, q, k), 0.3, BS, first=last)
        patterns.append(patterns[-1].clone())
        patterns[-1][..., last:] |= reselected
    final = edit.pattern(0)
    assert torch.equal(final[..., :last], selected[..., :last])  # the prompt part never changes
    assert bool((final[..., last:] >= selected[..., last:]).all()) and not torch.equal(final, selected)
    assert torch.equal(final, patterns[-1])


def test_layers_keep_their_own_patterns_and_a_new_sample_starts_over():
    edit = SparseD(num_steps=5, skip=0.2, select=0.3, block_size=BS)  # t* = 2
    for step in range(3):
        run(edit, step, seed=step, layer_idx=0)
        run(edit, step, seed=10 + step, layer_idx=1)
    assert not torch.equal(edit.pattern(0), edit.pattern(1))
    run(edit, 0, layer_idx=0)
    assert edit.pattern(0) is None and edit.pattern(1) is not None


def test_select_one_equals_dense():
    edit = parse_edit_spec(f"sparsed:num_steps=4,skip=0,select=1,block_size={BS}")
    assert edit.is_identity()
    for step in range(4):
        call, q, k, v = lm_call(step, seed=step)
        assert torch.equal(edited([edit], call, q, k, v).eager(), edited([], call, q, k, v).eager())
    # and the selection itself keeps every block at select=1 (the non-identity code path)
    call, q, k, v = lm_call(1)
    assert bool(oracle_select(probs_of(call, q, k), 1.0, BS).all())


def test_errors_are_one_line():
    edit = SparseD(num_steps=4, block_size=BS)
    call, q, k, v = diffusion_call((1, 1, L), step=None)
    with pytest.raises(ConfigError, match="set_step"):
        edited([edit], call, q, k, v)
    edit = SparseD(num_steps=4, skip=0.0, block_size=BS)  # t* = 1
    run(edit, 0), run(edit, 1)
    call, q, k, v = diffusion_call((1, 1, L + 4), step=2, heads=HEADS, head_dim=6)
    with pytest.raises(ShapeError, match="selected its pattern"):
        edited([edit], call, q, k, v)
    with pytest.raises(ConfigError, match="select"):
        parse_edit_spec("sparsed:select=0")


# ------------------------------------------------------------------------------------------ the diffusion LM sampler


def tiny_bert(seed=0):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64, attn_implementation="sdpa")
    return BertForMaskedLM(config).eval()


def test_tokens_per_step_splits_the_answer_evenly():
    assert tokens_per_step(10, 4) == [3, 3, 2, 2] and sum(tokens_per_step(37, 9)) == 37
    with pytest.raises(ConfigError, match="num_steps must be <= answer_len"):
        tokens_per_step(3, 4)


def test_sampler_unmasks_the_scheduled_counts_and_the_most_confident_tokens():
    model = tiny_bert()
    prompt = torch.randint(0, 48, (2, 7), generator=torch.Generator().manual_seed(1))
    out = sample(model, prompt, answer_len=12, num_steps=5, mask_token_id=49)
    assert out.tokens.shape == (2, 19) and torch.equal(out.tokens[:, :7], prompt)
    counts = torch.stack([(out.unmasked_at == t).sum(-1) for t in range(5)], dim=-1)
    assert counts.tolist() == [tokens_per_step(12, 5)] * 2
    # step 0: the kept tokens are the most confident predictions of the all-[MASK] answer
    first = torch.cat([prompt, torch.full((2, 12), 49)], dim=1)
    with torch.no_grad():
        confidence = torch.softmax(model(input_ids=first).logits[:, 7:], -1).max(-1).values
    for row in range(2):
        kept = set((out.unmasked_at[row] == 0).nonzero().flatten().tolist())
        assert kept == set(confidence[row].topk(3).indices.tolist())


def _session_with_steps():
    from attnlab import Session

    if not hasattr(Session, "set_step"):
        pytest.skip("Session.set_step arrives with the diffusion core")
    return Session


def test_sparsed_in_a_session_is_dense_until_t_star_and_select_one_equals_dense():
    Session = _session_with_steps()
    model = tiny_bert()
    prompt = torch.randint(0, 48, (1, 9), generator=torch.Generator().manual_seed(2))
    dense = sample(model, prompt, answer_len=15, num_steps=5, mask_token_id=49)
    with Session(model, edits=[SparseD(num_steps=5, skip=0.0, select=1.0, block_size=4)]) as session:
        same = sample(model, prompt, answer_len=15, num_steps=5, mask_token_id=49, session=session)
    assert torch.equal(same.tokens, dense.tokens)
    edit = SparseD(num_steps=5, skip=0.2, select=0.3, block_size=4, gen_len=15)  # t* = 2
    with Session(model, edits=[edit]) as session:
        sparse = sample(model, prompt, answer_len=15, num_steps=5, mask_token_id=49, session=session)
    early = sparse.unmasked_at <= edit.selection_step  # tokens fixed at the full-attention steps
    assert torch.equal(sparse.tokens[:, 9:][early], dense.tokens[:, 9:][early])
    assert edit.pattern(0) is not None and edit.pattern(1) is not None
    assert not bool(edit.pattern(0).all())


class StepKeeps(Probe):
    """Records (step, layer) → the keep mask (B, H, Lq, Lk) the blocked kernel applied."""

    name = "step_keeps"
    needs = frozenset({"probs"})

    def __init__(self) -> None:
        super().__init__()
        self.keeps = {}

    def begin_call(self, call):
        self.keeps[(call.step, call.layer_idx)] = torch.ones(call.batch, call.num_heads, call.q_len, call.kv_len,
                                                             dtype=torch.bool)

    def update(self, call, block):
        width = block.probs.shape[-1]
        keep = torch.ones_like(block.probs, dtype=torch.bool) if block.keep is None else block.keep
        self.keeps[(call.step, call.layer_idx)][:, :, block.q_index, :width] = keep.expand_as(block.probs)
        self.keeps[(call.step, call.layer_idx)][:, :, block.q_index, width:] = False


@pytest.mark.parametrize("reselect", [False, True])
def test_on_a_tiny_bert_the_schedule_pattern_and_reselection_land_on_the_intended_steps_and_keys(reselect):
    Session = _session_with_steps()
    model = tiny_bert()
    prompt = torch.randint(0, 48, (1, 9), generator=torch.Generator().manual_seed(3))
    edit = SparseD(num_steps=6, skip=0.2, select=0.3, block_size=4, gen_len=15, reselect=reselect)  # t* = 2
    recorder = StepKeeps()
    with Session(model, edits=[edit], probes=[recorder]) as session:
        sample(model, prompt, answer_len=15, num_steps=6, mask_token_id=49, session=session)
    last = generation_block(24, 4, 15)
    assert last == 3
    for layer in (0, 1):
        keeps = [recorder.keeps[(step, layer)] for step in range(6)]
        assert all(bool(keep.all()) for keep in keeps[:3])  # steps 0, 1, t* = 2: full attention
        assert not bool(keeps[3].all())  # the first sparse step
        tiles = keeps[3][..., ::4, ::4]  # whole 4 × 4 tiles: one entry each
        assert torch.equal(keeps[3], tiles.repeat_interleave(4, 2).repeat_interleave(4, 3)[..., :24, :24])
        for later in keeps[4:]:
            assert torch.equal(later[..., : last * 4], keeps[3][..., : last * 4])  # the prompt keys: reused
            if not reselect:
                assert torch.equal(later, keeps[3])
            assert bool((later >= keeps[3]).all())  # re-selection only adds generated-region blocks
        if reselect:
            assert any(not torch.equal(later, keeps[3]) for later in keeps[4:])
