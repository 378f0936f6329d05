"""Activation and path patching: a planted circuit in a tiny Llama, and TransformerLens as the oracle on a tiny
GPT-2 (the same weights in a TransformerBridge, offline)."""

from __future__ import annotations

import copy

import pytest
import torch

from attnlab.circuits.pairs import collate_pairs
from attnlab.circuits.patching import activation_patching, path_patching
from attnlab.errors import ConfigError
from tiny_models import tiny_tokenizer

PLANTED = (1, 2)


def test_planted_head_tops_the_ranking_and_heads_without_a_path_have_no_effect(planted, pairs):
    model = planted()
    for result in (activation_patching(model, pairs()), path_patching(model, pairs())):
        assert result.top(1) == [PLANTED]
        assert float(result.scores[PLANTED]) == pytest.approx(0.0, abs=1e-5)  # alone it carries the whole answer
        others = [result.scores[layer, head] for layer in range(2) for head in range(4) if (layer, head) != PLANTED]
        assert torch.stack(others).sub(1).abs().max() < 1e-5
        assert result.clean_logit_diff != pytest.approx(result.corrupted_logit_diff)


def test_per_position_patching_finds_the_planted_head_at_the_last_position_only(planted, pairs):
    model = planted()
    result = activation_patching(model, pairs(ragged=False), heads=[PLANTED, (0, 0)], per_position=True)
    assert result.scores.shape == (2, 4, 7)
    by_position = result.scores[PLANTED]
    # the planted head is in the last layer: only its output at the last position reaches the logits read there
    assert float(by_position[6]) == pytest.approx(0.0, abs=1e-5)
    assert float(by_position[:6].sub(1).abs().max()) < 1e-5
    assert torch.isnan(result.scores[1, 0]).all()  # not asked for
    assert float(result.scores[0, 0].sub(1).abs().max()) < 1e-5


def test_bad_inputs_are_one_line_config_errors(planted, pairs):
    model = planted()
    with pytest.raises(ConfigError, match="not a head"):
        activation_patching(model, pairs(), heads=[(2, 0)])
    with pytest.raises(ConfigError, match="at least one batch"):
        path_patching(model, [])
    with pytest.raises(ConfigError, match="receivers must be"):
        path_patching(model, pairs(), receivers="loggits")
    same = collate_pairs([([4, 5, 6], [4, 5, 6], [7, 8], 0)])
    with pytest.raises(ConfigError, match="same mean logit difference"):
        activation_patching(model, [same], heads=[(0, 0)])
    with pytest.raises(ConfigError, match="row 0"):
        collate_pairs([([4, 5, 6], [4, 5], [7, 8], 0)])


# --- TransformerLens as the oracle --------------------------------------------------------------------------

def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    # initializer_range 0.3 (not 0.02): attention logits far from 0, so queries and keys matter to the patterns
    config = GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=97, n_positions=64, bos_token_id=1,
                        eos_token_id=2, initializer_range=0.3, attn_implementation="sdpa")
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def gpt2_and_bridge(tmp_path_factory):
    pytest.importorskip("transformer_lens")
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    tiny_tokenizer().save_pretrained(folder)
    model = tiny_gpt2()
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=copy.deepcopy(model),
                                                 tokenizer=AutoTokenizer.from_pretrained(folder))
    return model, bridge


def oracle_metric(batch, clean_ld, corrupted_ld):
    """Normalised mean logit difference from full logits, by a plain loop over rows."""
    def metric(logits):
        total = 0.0
        for row in range(batch.size):
            at = logits[row, int(batch.last[row])]
            choices = [float(at[int(t)]) for t in batch.choice_ids[row]]
            answer = int(batch.answer[row])
            wrong = [c for i, c in enumerate(choices) if i != answer]
            total += choices[answer] - sum(wrong) / len(wrong)
        mean = total / batch.size
        if clean_ld is None:
            return torch.tensor(mean)
        return torch.tensor((mean - corrupted_ld) / (clean_ld - corrupted_ld))
    return metric


def one_batch():
    return collate_pairs([(r[0], r[1], r[2], r[3]) for r in [
        ([1, 20, 31, 44, 50, 61, 70], [1, 22, 35, 44, 50, 61, 70], [5, 9], 0),
        ([1, 21, 33, 47, 52, 63, 72], [1, 24, 30, 47, 52, 63, 72], [9, 5], 1),
        ([1, 23, 32, 41, 55, 66, 77], [1, 25, 36, 41, 55, 66, 77], [12, 6], 0)]])


def test_activation_patching_matches_transformer_lens(gpt2_and_bridge):
    from transformer_lens.patching import get_act_patch_attn_head_out_all_pos

    model, bridge = gpt2_and_bridge
    batch = one_batch()
    ours = activation_patching(model, [batch])
    raw = oracle_metric(batch, None, None)
    with torch.no_grad():
        clean_ld = float(raw(bridge(batch.clean)))
        corrupted_ld = float(raw(bridge(batch.corrupted)))
        _, corrupted_cache = bridge.run_with_cache(batch.corrupted)
        # TransformerLens runs its "corrupted_tokens" and patches from the cache: here the clean run ← corrupted
        theirs = get_act_patch_attn_head_out_all_pos(bridge, batch.clean, corrupted_cache,
                                                     oracle_metric(batch, clean_ld, corrupted_ld))
    assert ours.clean_logit_diff == pytest.approx(clean_ld, abs=1e-4)
    assert ours.corrupted_logit_diff == pytest.approx(corrupted_ld, abs=1e-4)
    torch.testing.assert_close(ours.scores.float(), theirs.float(), rtol=1e-4, atol=1e-4)


def _path_oracle(bridge, batch, sender, receivers, metric, inputs="qkv"):
    """Path patching written with TransformerLens hooks on hook_z (per-head outputs before W_O)."""
    layers, heads = bridge.cfg.n_layers, bridge.cfg.n_heads
    with torch.no_grad():
        _, clean = bridge.run_with_cache(batch.clean)
        _, corrupted = bridge.run_with_cache(batch.corrupted)

        def hooks(until):
            out = []
            for layer in range(sender[0], until):
                def hook(z, hook, layer=layer):
                    z = clean[f"blocks.{layer}.attn.hook_z"].clone() if layer > sender[0] else z.clone()
                    if layer == sender[0]:
                        z[:, :, sender[1]] = corrupted[f"blocks.{layer}.attn.hook_z"][:, :, sender[1]]
                    return z
                out.append((f"blocks.{layer}.attn.hook_z", hook))
            return out

        if receivers == "logits":
            return float(metric(bridge.run_with_hooks(batch.clean, fwd_hooks=hooks(layers))))
        if inputs != "qkv":
            return _path_oracle_qkv(bridge, batch, sender, receivers, metric, inputs, hooks)
        received = {}
        for layer in sorted({r[0] for r in receivers if r[0] > sender[0]}):
            def keep(z, hook, layer=layer):
                received[layer] = z.clone()
            bridge.run_with_hooks(batch.clean, fwd_hooks=[*hooks(layer), (f"blocks.{layer}.attn.hook_z", keep)])
        if not received:
            return 1.0

        def patch(z, hook):
            layer = int(hook.name.split(".")[1])
            z = z.clone()
            for r_layer, r_head in receivers:
                if r_layer == layer:
                    z[:, :, r_head] = received[layer][:, :, r_head]
            return z
        names = [(f"blocks.{layer}.attn.hook_z", patch) for layer in received]
        return float(metric(bridge.run_with_hooks(batch.clean, fwd_hooks=names)))


def _path_oracle_qkv(bridge, batch, sender, receivers, metric, inputs, hooks):
    """Receivers' hook_q/hook_k/hook_v (per head) from the frozen run, written into the clean run."""
    layers = sorted({r[0] for r in receivers if r[0] > sender[0]})
    if not layers:
        return 1.0
    names = [f"blocks.{layer}.attn.hook_{c}" for layer in layers for c in inputs]
    received = {}

    def keep(x, hook):
        received[hook.name] = x.clone()
    bridge.run_with_hooks(batch.clean, fwd_hooks=[*hooks(bridge.cfg.n_layers), *[(n, keep) for n in names]])

    def patch(x, hook):
        layer = int(hook.name.split(".")[1])
        x = x.clone()
        for r_layer, r_head in receivers:
            if r_layer == layer:
                x[:, :, r_head] = received[hook.name][:, :, r_head]
        return x
    return float(metric(bridge.run_with_hooks(batch.clean, fwd_hooks=[(n, patch) for n in names])))


@pytest.mark.parametrize("inputs", ["q", "k", "v", "kv"])
def test_path_patching_to_receiver_q_k_v_matches_a_transformer_lens_oracle(gpt2_and_bridge, inputs):
    model, bridge = gpt2_and_bridge
    batch = one_batch()
    raw = oracle_metric(batch, None, None)
    with torch.no_grad():
        clean_ld, corrupted_ld = float(raw(bridge(batch.clean))), float(raw(bridge(batch.corrupted)))
    receivers = [(1, 0), (2, 2)]
    senders = [(0, 0), (0, 3), (1, 1)]
    ours = path_patching(model, [batch], receivers=receivers, senders=senders, receiver_inputs=inputs)
    metric = oracle_metric(batch, clean_ld, corrupted_ld)
    with torch.no_grad():
        for sender in senders:
            expected = _path_oracle(bridge, batch, sender, receivers, metric, inputs)
            assert float(ours.scores[sender]) == pytest.approx(expected, abs=1e-4), sender
    assert ours.meta["receiver_inputs"] == inputs
    assert float((ours.scores[0, 3] - 1).abs()) > 1e-3  # not a vacuous match


@pytest.mark.parametrize("receivers", ["logits", [(2, 1), (2, 3)], [(1, 0), (2, 2)]], ids=["logits", "layer2",
                                                                                             "layers1and2"])
def test_path_patching_matches_a_transformer_lens_oracle(gpt2_and_bridge, receivers):
    model, bridge = gpt2_and_bridge
    batch = one_batch()
    raw = oracle_metric(batch, None, None)
    with torch.no_grad():
        clean_ld, corrupted_ld = float(raw(bridge(batch.clean))), float(raw(bridge(batch.corrupted)))
    senders = [(0, 0), (0, 3), (1, 1), (2, 0)]
    ours = path_patching(model, [batch], receivers=receivers, senders=senders)
    metric = oracle_metric(batch, clean_ld, corrupted_ld)
    for sender in senders:
        expected = _path_oracle(bridge, batch, sender, receivers, metric)
        assert float(ours.scores[sender]) == pytest.approx(expected, abs=1e-4), sender
    assert torch.isnan(ours.scores[1, 0])  # not a sender


def test_projection_route_equals_output_route_when_whole_kv_groups_receive(planted, pairs, monkeypatch):
    """On a GQA Llama, patching q, k and v at the input projections of every head of a layer (whole kv groups)
    must give what replacing the receivers' outputs gives."""
    from attnlab.circuits import patching

    model = planted(alive=((0, 1), (0, 3), (1, 2)))
    receivers = [(1, 0), (1, 1), (1, 2), (1, 3)]
    senders = [(0, 1), (0, 3)]
    by_output = path_patching(model, pairs(), receivers=receivers, senders=senders)
    monkeypatch.setattr(patching, "COMPONENTS", ("forced",))  # qkv no longer matches: the projection route runs
    by_projection = path_patching(model, pairs(), receivers=receivers, senders=senders)
    torch.testing.assert_close(by_projection.scores, by_output.scores, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert float((by_output.scores[0, 1] - 1).abs()) > 1e-3
    only_q = path_patching(model, pairs(), receivers=receivers, senders=senders, receiver_inputs="q")
    assert not torch.allclose(only_q.scores[0, 1], by_output.scores[0, 1])
