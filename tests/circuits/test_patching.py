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
EXACT = 1e-5  # float32 forwards of a 2-layer model whose other heads write exactly zero: rounding only
TOL = 1e-4  # attnlab's attention vs TransformerLens's own (different summation order, float32)
VISIBLE = 1e-3  # an effect this large is not rounding: the comparison is not vacuous


def test_planted_head_tops_the_ranking_and_heads_without_a_path_have_no_effect(planted, pairs):
    model = planted()
    for result in (activation_patching(model, pairs()), path_patching(model, pairs())):
        assert result.top(1) == [PLANTED]
        assert float(result.scores[PLANTED]) == pytest.approx(0.0, abs=EXACT)  # alone it carries the whole answer
        others = [result.scores[layer, head] for layer in range(2) for head in range(4) if (layer, head) != PLANTED]
        assert torch.stack(others).sub(1).abs().max() < EXACT
        assert result.clean_logit_diff != pytest.approx(result.corrupted_logit_diff)


def test_per_position_patching_finds_the_planted_head_at_the_last_position_only(planted, pairs):
    model = planted()
    result = activation_patching(model, pairs(ragged=False), heads=[PLANTED, (0, 0)], per_position=True)
    assert result.scores.shape == (2, 4, 7)
    by_position = result.scores[PLANTED]
    # the planted head is in the last layer: only its output at the last position reaches the logits read there
    assert float(by_position[6]) == pytest.approx(0.0, abs=EXACT)
    assert float(by_position[:6].sub(1).abs().max()) < EXACT
    assert torch.isnan(result.scores[1, 0]).all()  # not asked for
    assert float(result.scores[0, 0].sub(1).abs().max()) < EXACT
    saved = result.to_dict()
    assert "scores" not in saved and saved["summed_effect"][1][2] == pytest.approx(-1.0, abs=EXACT)
    assert saved["summed_effect"][1][0] is None


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


def ragged_batch():
    """A second batch, right-padded: rows of 5 and 7 tokens."""
    return collate_pairs([
        ([1, 26, 34, 48, 57], [1, 28, 39, 48, 57], [6, 12], 1),
        ([1, 27, 37, 42, 53, 64, 75], [1, 29, 38, 42, 53, 64, 75], [5, 12], 0)])


def unpadded_rows(batch):
    """(clean ids (1, n), corrupted ids (1, n), a one-row batch) for each row of ``batch``, padding dropped."""
    out = []
    for row in range(batch.size):
        n = int(batch.valid[row].sum())
        clean, corrupted = batch.clean[row:row + 1, :n], batch.corrupted[row:row + 1, :n]
        out.append((clean, corrupted, collate_pairs([(clean[0].tolist(), corrupted[0].tolist(),
                                                      batch.choice_ids[row].tolist(), int(batch.answer[row]))])))
    return out


def test_activation_patching_over_padded_batches_matches_transformer_lens_row_by_row(gpt2_and_bridge):
    """Two batches, one right-padded: TL runs each pair unpadded; the normalisation is over the means of all pairs."""
    from transformer_lens.patching import get_act_patch_attn_head_out_all_pos

    model, bridge = gpt2_and_bridge
    batches = [one_batch(), ragged_batch()]
    ours = activation_patching(model, batches)
    patched, clean, corrupted = [], [], []
    with torch.no_grad():
        for batch in batches:
            for clean_ids, corrupted_ids, single in unpadded_rows(batch):
                raw = oracle_metric(single, None, None)
                clean.append(float(raw(bridge(clean_ids))))
                corrupted.append(float(raw(bridge(corrupted_ids))))
                _, cache = bridge.run_with_cache(corrupted_ids)
                patched.append(get_act_patch_attn_head_out_all_pos(bridge, clean_ids, cache, raw).double())
    clean_ld, corrupted_ld = sum(clean) / len(clean), sum(corrupted) / len(corrupted)
    expected = (torch.stack(patched).mean(dim=0) - corrupted_ld) / (clean_ld - corrupted_ld)
    assert ours.num_pairs == 5 and ours.clean_logit_diff == pytest.approx(clean_ld, abs=TOL)
    torch.testing.assert_close(ours.scores, expected, rtol=TOL, atol=TOL)


def test_per_position_patching_matches_transformer_lens_by_pos(gpt2_and_bridge):
    from transformer_lens.patching import get_act_patch_attn_head_out_by_pos

    model, bridge = gpt2_and_bridge
    batch = one_batch()
    ours = activation_patching(model, [batch], per_position=True)
    raw = oracle_metric(batch, None, None)
    with torch.no_grad():
        clean_ld, corrupted_ld = float(raw(bridge(batch.clean))), float(raw(bridge(batch.corrupted)))
        _, corrupted_cache = bridge.run_with_cache(batch.corrupted)
        theirs = get_act_patch_attn_head_out_by_pos(bridge, batch.clean, corrupted_cache,
                                                    oracle_metric(batch, clean_ld, corrupted_ld))  # (L, S, H)
    torch.testing.assert_close(ours.scores.float(), theirs.permute(0, 2, 1).float(), rtol=TOL, atol=TOL)


def test_per_position_patching_refuses_pairs_of_different_lengths(planted, pairs):
    with pytest.raises(ConfigError, match="one token length"):
        activation_patching(planted(), pairs(ragged=True), heads=[PLANTED], per_position=True)
    with pytest.raises(ConfigError, match="at least one"):
        activation_patching(planted(), pairs(), heads=[])


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
    assert ours.clean_logit_diff == pytest.approx(clean_ld, abs=TOL)
    assert ours.corrupted_logit_diff == pytest.approx(corrupted_ld, abs=TOL)
    torch.testing.assert_close(ours.scores.float(), theirs.float(), rtol=TOL, atol=TOL)


def _path_oracle(bridge, batch, sender, receivers, metric, inputs="qkv", definition=False):
    """Path patching written with TransformerLens hooks on hook_z (per-head outputs before W_O); with
    ``definition`` (or a part of q/k/v) the receivers' hook_q/k/v are patched instead (Wang et al.'s definition)."""
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
        if inputs != "qkv" or definition:
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
            assert float(ours.scores[sender]) == pytest.approx(expected, abs=TOL), sender
    assert ours.meta["receiver_inputs"] == inputs
    assert float((ours.scores[0, 3] - 1).abs()) > VISIBLE  # not a vacuous match


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
        assert float(ours.scores[sender]) == pytest.approx(expected, abs=TOL), sender
        if receivers != "logits":  # the output route against the definition (receivers' q, k and v patched)
            defined = _path_oracle(bridge, batch, sender, receivers, metric, definition=True)
            assert float(ours.scores[sender]) == pytest.approx(defined, abs=TOL), sender
    assert torch.isnan(ours.scores[1, 0])  # not a sender


def test_projection_route_equals_output_route_when_whole_kv_groups_receive(planted, pairs):
    """On a GQA Llama, patching q, k and v at the input projections of every head of a layer (whole kv groups)
    must give what replacing the receivers' outputs gives."""
    model = planted(alive=((0, 1), (0, 3), (1, 2)))
    receivers = [(1, 0), (1, 1), (1, 2), (1, 3)]
    senders = [(0, 1), (0, 3)]
    by_output = path_patching(model, pairs(), receivers=receivers, senders=senders)
    by_projection = path_patching(model, pairs(), receivers=receivers, senders=senders, route="projection")
    torch.testing.assert_close(by_projection.scores, by_output.scores, rtol=EXACT, atol=EXACT, equal_nan=True)
    assert float((by_output.scores[0, 1] - 1).abs()) > VISIBLE
    only_q = path_patching(model, pairs(), receivers=receivers, senders=senders, receiver_inputs="q")
    assert not torch.allclose(only_q.scores[0, 1], by_output.scores[0, 1])


def test_k_or_v_receivers_under_gqa_must_cover_whole_kv_groups(planted, pairs):
    """(1, 3) writes nothing; its kv group is shared with (1, 2): a v patch of (1, 3) alone would reach (1, 2)."""
    from attnlab.circuits.circuit import find_circuit

    model = planted(alive=((0, 1), (1, 2)))
    for inputs in ("k", "v", "kv"):
        with pytest.raises(ConfigError, match=r"without \[\(1, 2\)\]"):
            path_patching(model, pairs(), receivers=[(1, 3)], senders=[(0, 1)], receiver_inputs=inputs)
        with pytest.raises(ConfigError, match="GQA"):
            find_circuit(model, pairs(), receiver_inputs=inputs)
    alone = path_patching(model, pairs(), receivers=[(1, 3)], senders=[(0, 1)], receiver_inputs="q")
    assert float(alone.scores[0, 1]) == pytest.approx(1.0, abs=EXACT)  # (1, 3) writes nothing: no effect
    group = path_patching(model, pairs(), receivers=[(1, 2), (1, 3)], senders=[(0, 1)], receiver_inputs="v")
    assert float((group.scores[0, 1] - 1).abs()) > VISIBLE
