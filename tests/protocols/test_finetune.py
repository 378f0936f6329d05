"""The shared fine-tuning loop: losses against plain loops, padding, determinism, and that training learns."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_llama

from attnlab.errors import ConfigError
from attnlab.evaluation.passkey import greedy_decode
from attnlab.protocols.finetune import FinetuneConfig, Finetuner, make_batch, shuffled_batches, token_losses

SEQS = [[5, 9, 11, 3, 40, 41, 8], [7, 7, 20, 21], [60, 2, 33, 34, 35]]


def plain_nll(model, ids: list[int], start: int) -> list[float]:
    """−log p(ids[t] | ids[:t]) for t = start … end, one forward per token, no batching."""
    out = []
    with torch.no_grad():
        for t in range(start, len(ids)):
            logits = model(input_ids=torch.tensor([ids[:t]])).logits[0, -1].double()
            out.append(float(-(logits - torch.logsumexp(logits, 0))[ids[t]]))
    return out


def test_make_batch_layout():
    batch = make_batch(SEQS, pad_id=0, loss_start=[3, 1, 4])
    assert batch.input_ids.tolist() == [SEQS[0], [7, 7, 20, 21, 0, 0, 0], [60, 2, 33, 34, 35, 0, 0]]
    assert batch.attention_mask.tolist() == [[1] * 7, [1] * 4 + [0] * 3, [1] * 5 + [0] * 2]
    assert batch.loss_mask.int().tolist() == [[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0]]
    assert batch.num_targets == 4 + 3 + 1


@pytest.mark.parametrize("kwargs, fragment", [
    ({"sequences": []}, "at least one sequence"),
    ({"sequences": [[1]]}, "at least 2 tokens"),
    ({"sequences": [[1, 2, 3]], "loss_start": [3]}, "1..2, got 3"),
    ({"sequences": [[1, 2, 3]], "loss_start": [0]}, "1..2, got 0"),
    ({"sequences": [[1, 2, 3]], "loss_start": [1, 1]}, "one entry per sequence"),
])
def test_make_batch_refuses(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        make_batch(**kwargs)


def test_config_coerces_and_refuses():
    assert FinetuneConfig(lr="1e-4", seed="3").lr == 1e-4
    with pytest.raises(ConfigError, match="lr"):
        FinetuneConfig(lr=0)
    with pytest.raises(ConfigError, match="grad_clip"):
        FinetuneConfig(grad_clip=-1.0)


def test_token_losses_match_plain_loop_and_ignore_padding():
    model = tiny_llama()
    starts = [2, 1, 3]
    scores = token_losses(model, make_batch(SEQS, loss_start=starts))
    for row, (ids, start) in enumerate(zip(SEQS, starts)):
        expected = plain_nll(model, ids, start)
        got = scores.nll[row, start:len(ids)].tolist()
        assert got == pytest.approx(expected, abs=1e-4)
        assert float(scores.nll[row, :start].abs().sum()) == 0 and float(scores.nll[row, len(ids):].abs().sum()) == 0
        assert float(scores.mean_nll()[row]) == pytest.approx(sum(expected) / len(expected), abs=1e-4)
        alone = token_losses(model, make_batch([ids], loss_start=[start]))  # no padding at all
        torch.testing.assert_close(alone.nll[0], scores.nll[row, :len(ids)], atol=1e-5, rtol=0)


def test_all_correct_agrees_with_greedy_decoding():
    model = tiny_llama(seed=1)
    prefix = [4, 8, 15]
    greedy = greedy_decode(model, prefix, 4)
    wrong = greedy[:2] + [(greedy[2] + 1) % 97] + greedy[3:]
    scores = token_losses(model, make_batch([prefix + greedy, prefix + wrong], loss_start=[3, 3]))
    assert scores.all_correct().tolist() == [True, False]
    assert scores.correct[1, 3:].tolist() == [True, True, False, greedy[3] == int(
        model(input_ids=torch.tensor([prefix + wrong[:3]])).logits[0, -1].argmax())]


def test_step_returns_the_mean_target_loss_and_lowers_it():
    model = tiny_llama()
    batch = make_batch(SEQS, loss_start=[2, 1, 3])
    by_row = [plain_nll(model, ids, s) for ids, s in zip(SEQS, [2, 1, 3])]
    expected = sum(sum(r) for r in by_row) / sum(len(r) for r in by_row)  # token-weighted mean
    tuner = Finetuner(model, FinetuneConfig(lr=1e-2, seed=0))
    losses = tuner.run([batch] * 20)
    assert losses[0] == pytest.approx(expected, abs=1e-4)
    after = float(token_losses(model, batch).nll.sum()) / batch.num_targets
    assert after < 0.25 * expected
    assert tuner.steps_done == 20 and not model.training  # tiny_llama is built in eval mode; mode restored


def test_only_trainable_parameters_change_and_decay_skips_vectors():
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    frozen = model.model.embed_tokens.weight.clone()
    tuner = Finetuner(model, FinetuneConfig(lr=1e-2, weight_decay=0.1))
    tuner.step(make_batch(SEQS))
    assert torch.equal(model.model.embed_tokens.weight, frozen)
    decays = {id(p): g["weight_decay"] for g in tuner.optimizer.param_groups for p in g["params"]}
    norm = model.model.norm.weight
    assert decays[id(norm)] == 0.0 and decays[id(model.lm_head.weight)] == 0.1
    assert id(frozen) not in decays and id(model.model.embed_tokens.weight) not in decays


def _train(seed: int, dropout: float) -> dict[str, torch.Tensor]:
    model = tiny_llama(attention_dropout=dropout)
    Finetuner(model, FinetuneConfig(lr=1e-3, seed=seed)).run(shuffled_batches(SEQS, 2, seed=seed))
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_deterministic_by_seed_and_global_rng_untouched():
    first, second = _train(0, 0.5), _train(0, 0.5)
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = _train(1, 0.5)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    model = tiny_llama(seed=0)  # reseeds the global RNG; the loop itself must not consume it
    before = torch.get_rng_state()
    Finetuner(model, FinetuneConfig(seed=5)).step(make_batch(SEQS))
    assert torch.equal(torch.get_rng_state(), before)


def test_shuffled_batches_cover_every_sequence_once():
    seqs = [[i, i + 1] for i in range(10)]
    firsts = [row[0] for b in shuffled_batches(seqs, 3, seed=4) for row in b.input_ids.tolist()]
    assert sorted(firsts) == list(range(10)) and firsts != list(range(10))
    again = [row[0] for b in shuffled_batches(seqs, 3, seed=4) for row in b.input_ids.tolist()]
    assert again == firsts
    plain = [row[0] for b in shuffled_batches(seqs, 4, seed=4, shuffle=False) for row in b.input_ids.tolist()]
    assert plain == list(range(10))
    assert [b.input_ids.shape[0] for b in shuffled_batches(seqs, 4, seed=0)] == [4, 4, 2]


def test_refuses_a_batch_without_targets_and_a_frozen_model():
    model = tiny_llama()
    batch = make_batch([[1, 2]])
    empty = type(batch)(batch.input_ids, batch.attention_mask, torch.zeros_like(batch.loss_mask))
    with pytest.raises(ConfigError, match="no target"):
        Finetuner(model).step(empty)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="requires_grad"):
        Finetuner(model)
    assert math.isfinite(token_losses(model, batch).nll.sum().item())


def test_load_state_returns_to_a_branch_point_exactly():
    model = tiny_llama()
    tuner = Finetuner(model, FinetuneConfig(lr=1e-2))
    tuner.step(make_batch(SEQS))
    saved = tuner.state()
    straight = [tuner.step(make_batch(SEQS[:2])) for _ in range(2)]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    tuner.load_state(saved)
    tuner.step(make_batch(SEQS[1:]))  # a detour, then back to the branch point
    tuner.load_state(saved)
    assert tuner.steps_done == 1
    assert [tuner.step(make_batch(SEQS[:2])) for _ in range(2)] == straight
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_token_batch_refuses_mismatched_shapes_and_targets_on_padding():
    from attnlab.errors import ShapeError
    from attnlab.protocols.finetune import TokenBatch

    batch = make_batch(SEQS)
    with pytest.raises(ShapeError, match="share one"):
        TokenBatch(batch.input_ids, batch.attention_mask[:, :3], batch.loss_mask)
    with pytest.raises(ConfigError, match="padding"):
        TokenBatch(batch.input_ids, batch.attention_mask, torch.ones_like(batch.loss_mask))


def test_reset_optimizer_steps_like_a_fresh_finetuner():
    model, twin = tiny_llama(), tiny_llama()
    tuner = Finetuner(model, FinetuneConfig(lr=1e-2))
    tuner.step(make_batch(SEQS))
    twin.load_state_dict(model.state_dict())
    tuner.reset_optimizer()
    fresh = Finetuner(twin, FinetuneConfig(lr=1e-2))
    fresh.steps_done = tuner.steps_done
    tuner.step(make_batch(SEQS[:2]))
    fresh.step(make_batch(SEQS[:2]))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
