"""TinyLM (attnlab.lab.modeling): a transformers model built from every registered layer, routed through the
attention interface so attnlab's Session, probes and edits see it; checkpoints load through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from attnlab.capture.session import Session
from attnlab.errors import ConfigError, RegistryError
from attnlab.lab.modeling import TinyLMConfig, TinyLMSpec, build_model, register_auto
from attnlab.lab.tokenizers import char_tokenizer
from attnlab.layers import LAYERS
from attnlab.testing import assert_close

SMALL = {"vocab_size": 12, "num_layers": 2, "hidden_size": 16, "num_heads": 2, "mlp_ratio": 2.0}
NEEDS_ARGS = {"decay_matrix": {"grid_width": 4}}  # layers with a required constructor argument
IDS = torch.tensor([[3, 7, 1, 9, 4, 4, 2, 8, 5, 6, 0, 7, 3, 1, 2, 9]])


def _spec(layer="masked", layer_args=None, **overrides):
    return TinyLMSpec(layer=layer, layer_args=layer_args or NEEDS_ARGS.get(layer, {}), **{**SMALL, **overrides})


# -- spec, config, save/load --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "error"), [
    ({"num_layers": 0}, ConfigError), ({"mlp_ratio": -1.0}, ConfigError), ({"positions": "alibi"}, ConfigError),
    ({"norm": "batchnorm"}, ConfigError), ({"layer_args": {"log_decay": torch.zeros(2)}}, ConfigError),
    ({"layer": "maskd"}, RegistryError),
])
def test_bad_specs_are_refused(kwargs, error):
    with pytest.raises(error):
        TinyLMSpec(**kwargs)


def test_spec_round_trips_through_dict_and_config():
    spec = _spec(layer_args={"mask": "sliding_window:window=4", "num_kv_heads": 1}, positions="learned")
    assert TinyLMSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    config = TinyLMConfig.from_spec(spec)
    assert config.spec == spec
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (2, 2, 1)
    assert config.rope_theta is None  # learned positions
    assert TinyLMConfig.from_spec(_spec()).rope_theta == 10000.0
    assert TinyLMConfig.from_spec(_spec("gla")).rope_theta is None  # GLA takes no rotation


@pytest.mark.parametrize("layer_args", [{"nope": 1}, {"mask": "sliding_window:widow=3"}, {"mask": "nomask"}])
def test_bad_layer_args_fail_at_build(layer_args):
    with pytest.raises((ConfigError, RegistryError)):
        build_model(_spec(layer_args=layer_args))


def test_a_layer_without_masks_refuses_bidirectional():
    with pytest.raises(ConfigError, match="causal=False"):
        build_model(_spec("gla", causal=False))


@pytest.mark.parametrize("overrides", [
    {},
    {"positions": "learned", "tie_word_embeddings": False, "norm": "layernorm", "max_position_embeddings": 32},
    {"layer_args": {"mask": "sliding_window:window=4", "num_kv_heads": 1}, "mlp_ratio": 0.0},
], ids=["default", "learned-untied-layernorm", "window-gqa-attention-only"])
def test_save_and_auto_load_give_identical_logits(tmp_path, overrides):
    from transformers import AutoModelForCausalLM

    model = build_model(_spec(**overrides), seed=3).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    register_auto()
    register_auto()  # idempotent
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.config.spec == model.config.spec
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)
    tied = loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert tied == model.config.tie_word_embeddings


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_every_layer_reloads_exactly(tmp_path, layer):
    """from_pretrained builds the model for real: buffers computed in constructors (decays, ALiBi slopes,
    sigma_reparam's spectral norm), persistent or not, come back equal, and so do the logits."""
    from transformers import AutoModelForCausalLM

    from attnlab.lab.modeling import TinyLMForCausalLM

    model = build_model(_spec(layer), seed=3).eval()
    model.save_pretrained(tmp_path)
    register_auto()
    for loaded in (TinyLMForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert type(loaded) is type(model) and not loaded.training
        want, got = model.state_dict(), loaded.state_dict()
        assert list(got) == list(want)
        for name, value in want.items():
            assert torch.equal(got[name], value), name
        want, got = dict(model.named_buffers()), dict(loaded.named_buffers())
        assert list(got) == list(want)
        for name, value in want.items():
            assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_from_pretrained_dtype_shards_and_refusals(tmp_path):
    from attnlab.lab.modeling import TinyLMForCausalLM, TinyLMModel

    model = build_model(_spec("retention", tie_word_embeddings=False), seed=0).eval()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    loaded = TinyLMForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float64)
    assert loaded.lm_head.weight.dtype == torch.float64
    assert torch.equal(loaded.lm_head.weight.float(), model.lm_head.weight)
    assert TinyLMForCausalLM.from_pretrained(tmp_path / "sharded", torch_dtype="bfloat16").dtype == torch.bfloat16
    base = TinyLMModel.from_pretrained(tmp_path / "sharded")  # the head's checkpoint, loaded as the base model
    assert torch.equal(base.embed_tokens.weight, model.model.embed_tokens.weight)
    with pytest.raises(ConfigError, match="local folder"):
        TinyLMForCausalLM.from_pretrained("someone/tinylm")
    (tmp_path / "empty").mkdir()
    model.config.save_pretrained(tmp_path / "empty")
    with pytest.raises(ConfigError, match="model.safetensors"):
        TinyLMForCausalLM.from_pretrained(tmp_path / "empty")
    other = build_model(_spec("retention", hidden_size=8, tie_word_embeddings=False), seed=0)
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "sharded" / "config.json").write_text((tmp_path / "other" / "config.json").read_text())
    with pytest.raises(ConfigError, match="do not fit"):  # weights of another size
        TinyLMForCausalLM.from_pretrained(tmp_path / "sharded")


def test_a_layer_with_mandatory_rotation_refuses_other_positions():
    with pytest.raises(ConfigError, match="positions='rope'"):
        _spec("retention", positions="learned")
    assert TinyLMConfig.from_spec(_spec("retention")).rope_theta == 10000.0
    assert build_model(_spec("masked", positions="none")).model.layers[0].mixer.layer.rope_base is None


def test_mask_spec_refuses_a_key_given_twice():
    with pytest.raises(ConfigError, match="window is given twice"):
        build_model(_spec(layer_args={"mask": "sliding_window:window=4,window=5"}))


def test_same_seed_same_weights_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    first, second = build_model(_spec(), seed=5), build_model(_spec(), seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


# -- training -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_every_layer_trains_a_repeated_sequence(layer):
    model = build_model(_spec(layer), seed=0)
    labels = torch.cat([IDS[:, 1:], torch.full((1, 1), -100)], dim=1)  # aligned: labels[t] = next token
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=IDS, targets=labels).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0], losses


def test_loss_is_the_mean_cross_entropy_over_labelled_positions():
    """targets are aligned (position t predicts targets[t]); labels are transformers' (shifted inside)."""
    model = build_model(_spec(), seed=1)
    targets = torch.tensor([[5, -100, 2, 2, -100, 11, 0, 3, -100, 1, 1, 4, 6, -100, 8, 9]])
    output = model(input_ids=IDS, targets=targets)
    log_probs = torch.log_softmax(output.logits.double(), dim=-1)[0]
    picked = [-log_probs[t, int(label)] for t, label in enumerate(targets[0]) if label != -100]
    assert_close(output.loss.double(), torch.stack(picked).mean(), dtype=torch.float32)
    shifted = model(input_ids=IDS, labels=torch.cat([torch.full((1, 1), 7), targets[:, :-1]], dim=1))
    assert_close(shifted.loss.double(), torch.stack(picked[:-1]).mean(), dtype=torch.float32)  # last t unscored
    next_token = model(input_ids=IDS, labels=IDS).loss  # transformers' idiom: next-token prediction
    aligned = torch.cat([IDS[:, 1:], torch.full((1, 1), -100)], dim=1)
    assert torch.equal(next_token, model(input_ids=IDS, targets=aligned).loss)


def test_labels_and_targets_together_and_output_attentions_are_refused():
    model = build_model(_spec(), seed=1)
    with pytest.raises(ConfigError, match="not both"):
        model(input_ids=IDS, labels=IDS, targets=IDS)
    with pytest.raises(ConfigError, match="targets of shape"):
        model(input_ids=IDS, targets=IDS[:, 1:])
    with pytest.raises(ConfigError, match="attnlab.Session"):
        model(input_ids=IDS, output_attentions=True)


def test_generate_runs_the_whole_sequence_each_step():
    model = build_model(_spec(), seed=7).eval()
    prompt = IDS[:, :5]
    with torch.no_grad():
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                   do_sample=False)
        sequence = prompt
        for _ in range(4):
            sequence = torch.cat([sequence, model(input_ids=sequence).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, sequence)


def test_generate_under_left_padding_with_learned_positions():
    """prepare_inputs_for_generation counts real tokens for position_ids, so left padding changes nothing."""
    model = build_model(_spec(positions="learned", max_position_embeddings=32), seed=7).eval()
    batch = _padded(SEQUENCES, "left")
    with torch.no_grad():
        padded = model.generate(**batch, max_new_tokens=3, do_sample=False)
        for b, sequence in enumerate(SEQUENCES):
            alone = model.generate(torch.tensor([sequence]), attention_mask=torch.ones(1, len(sequence),
                                   dtype=torch.long), max_new_tokens=3, do_sample=False)
            assert torch.equal(padded[b, -3:], alone[0, -3:])


def test_hidden_states_and_no_cache():
    model = build_model(_spec(), seed=0)
    output = model(input_ids=IDS, output_hidden_states=True)
    assert len(output.hidden_states) == SMALL["num_layers"] + 1
    with pytest.raises(ConfigError, match="KV cache"):
        model(input_ids=IDS, use_cache=True)
    with pytest.raises(ConfigError, match="KV cache"):
        model(input_ids=IDS, past_key_values=object())


# -- routing through the attention interface ----------------------------------------------------------------------
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_the_hook_does_not_change_a_layers_output(layer):
    """sdpa through the hook (softmax layers) == the layer's own path (the hook removed)."""
    model = build_model(_spec(layer), seed=0)
    mixer = model.model.layers[0].mixer.layer
    hidden = torch.randn(2, 10, SMALL["hidden_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hooked = mixer(hidden)[0]
        object.__setattr__(mixer, "attention_hook", None)
        own = mixer(hidden)[0]
    assert_close(hooked, own, dtype=torch.float32)


def test_softmax_layers_route_and_others_do_not():
    for layer, routed in (("masked", True), ("gated", True), ("sigmoid", False), ("gla", False)):
        model = build_model(_spec(layer), seed=0)
        calls = []
        for block in model.model.layers:
            original = block.mixer.softmax
            block.mixer.softmax = lambda *args, _f=original: calls.append(1) or _f(*args)
        model(input_ids=IDS)
        assert bool(calls) is routed, layer


def _layer_inputs(model, inputs):
    """Each block's mixer input (B, T, C) for one forward pass, by layer index."""
    captured = {}
    hooks = [block.mixer.layer.register_forward_pre_hook(
        lambda module, args, index=index: captured.__setitem__(index, args[0]))
        for index, block in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=inputs)
    for hook in hooks:
        hook.remove()
    return captured


def _explicit_stats(model, inputs, lengths, window=None):
    """Sink alpha_0 and mean row entropy per (layer, head) from softmax(q kᵀ · scale) computed here."""
    captured = _layer_inputs(model, inputs)
    L, H = SMALL["num_layers"], SMALL["num_heads"]
    alpha, entropy = torch.zeros(L, H, dtype=torch.float64), torch.zeros(L, H, dtype=torch.float64)
    for layer in range(L):
        attention = model.model.layers[layer].mixer.layer
        q, k, _, _ = attention.project(captured[layer])
        k = k.repeat_interleave(H // k.shape[1], dim=1)
        T = q.shape[2]
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        keep = (j <= i) if window is None else (j <= i) & (i - j < window)
        logits = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
        probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)  # (B, H, T, T)
        rows = []
        for b, n in enumerate(lengths):  # alpha_0: mean attention on key 0 over the queries that see it
            alpha[layer] += probs[b, :, :n, 0].sum(dim=-1) / keep[:n, 0].sum() / len(lengths)
            p = probs[b, :, :n, :n]
            rows.append(-(p * torch.log(p.clamp_min(1e-300))).sum(-1))  # (H, n)
        entropy[layer] = torch.cat(rows, dim=-1).mean(dim=-1)
    return alpha, entropy


def _session_stats(model, batches, probes=("entropy", "sink"), **session_args):
    with Session(model, probes=list(probes), **session_args) as session:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    frame = session.results()
    L, H = SMALL["num_layers"], SMALL["num_heads"]

    def grid(probe, statistic, **where):
        rows = frame[(frame.probe == probe) & (frame.statistic == statistic)]
        for column, value in where.items():
            rows = rows[rows[column] == value]
        out = torch.full((L, H), float("nan"), dtype=torch.float64)
        for row in rows.itertuples():
            if not (row.layer is None or row.head is None or str(row.layer) == "<NA>" or str(row.head) == "<NA>"):
                out[int(row.layer), int(row.head)] = row.value
        return out

    return grid("sink", "alpha", position=0), grid("entropy", "entropy"), session


@pytest.mark.parametrize("layer_args", [{}, {"num_kv_heads": 1}, {"mask": "sliding_window:window=4"}],
                         ids=["causal", "gqa", "sliding-window"])
def test_session_statistics_equal_explicit_attention_maps(layer_args):
    model = build_model(_spec(layer_args=layer_args), seed=2).eval()
    inputs = torch.randint(0, SMALL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    alpha, entropy, session = _session_stats(model, [{"input_ids": inputs}])
    window = 4 if "mask" in layer_args else None
    want_alpha, want_entropy = _explicit_stats(model, inputs, [12, 12], window)
    assert_close(alpha, want_alpha, dtype=torch.float32)
    assert_close(entropy, want_entropy, dtype=torch.float32)
    assert set(session.attention_paths.values()) == {"fused"}  # the fused probe kernel (entropy, sink)
    assert model.config._attn_implementation == "sdpa"  # restored on exit


def test_session_without_probes_reproduces_the_logits():
    model = build_model(_spec(layer_args={"mask": "sliding_window:window=4"}), seed=0).eval()
    with torch.no_grad():
        plain = model(input_ids=IDS).logits
        with Session(model, probes=["entropy"]):
            observed = model(input_ids=IDS).logits
    assert_close(observed, plain, dtype=torch.float32)


def _padded(sequences, side):
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for b, sequence in enumerate(sequences):
        span = slice(0, len(sequence)) if side == "right" else slice(width - len(sequence), width)
        ids[b, span], mask[b, span] = torch.tensor(sequence), 1
    return {"input_ids": ids, "attention_mask": mask}


SEQUENCES = [[3, 7, 1, 9, 4, 4, 2, 8, 5, 6], [2, 5, 5, 1, 0, 11, 8]]


@pytest.mark.parametrize("positions", ["rope", "learned"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_gives_the_statistics_of_the_unpadded_sequences(side, positions):
    """Left padding with learned positions: the Session passes real-token position ids (model_facts: absolute)."""
    model = build_model(_spec(positions=positions, max_position_embeddings=16), seed=4).eval()
    padded = _session_stats(model, [_padded(SEQUENCES, side)])
    alone = _session_stats(model, [{"input_ids": torch.tensor([s])} for s in SEQUENCES])
    assert_close(padded[0], alone[0], dtype=torch.float32)
    assert_close(padded[1], alone[1], dtype=torch.float32)
    if positions == "learned" and side == "left":
        return  # outside a Session the caller passes position_ids (as for GPT-2)
    batch = _padded(SEQUENCES, side)
    with torch.no_grad():
        logits = model(**batch).logits
        for b, sequence in enumerate(SEQUENCES):
            real = batch["attention_mask"][b].bool()
            assert_close(logits[b, real], model(input_ids=torch.tensor([sequence])).logits[0], dtype=torch.float32)


@pytest.mark.parametrize("layer", ["relu", "gla"])
def test_layers_that_cannot_mask_keys_refuse_left_padding_only(layer):
    model = build_model(_spec(layer), seed=0).eval()
    with torch.no_grad():
        with pytest.raises(ConfigError, match="cannot mask padded keys"):
            model(**_padded(SEQUENCES, "left"))
        logits = model(**_padded(SEQUENCES, "right")).logits
        assert_close(logits[1, :7], model(input_ids=torch.tensor([SEQUENCES[1]])).logits[0], dtype=torch.float32)


def test_an_edit_acts_on_a_tinylm_softmax_layer():
    """temperature τ on the logits == queries scaled by 1/τ (RoPE is linear in q)."""
    model = build_model(_spec(), seed=0).eval()
    scaled = build_model(_spec(), seed=0).eval()
    with torch.no_grad():
        for block in scaled.model.layers:
            block.mixer.layer.q_proj.weight /= 2.0
        want, plain = scaled(input_ids=IDS).logits, model(input_ids=IDS).logits
        with Session(model, edits=["temperature:tau=2"]) as session:
            edited = model(input_ids=IDS).logits
    assert_close(edited, want, dtype=torch.float32)
    assert not torch.allclose(edited, plain)
    assert set(session.attention_paths.values()) == {"sdpa+edits"}


def test_score_mod_layers_show_their_implied_map_to_the_session():
    """alibi computes its own output; the session reads the map it implies (path "implied:softmax")."""
    model = build_model(_spec("alibi"), seed=0).eval()
    inputs = torch.randint(0, SMALL["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(3))
    alpha, entropy, session = _session_stats(model, [{"input_ids": inputs}])
    assert set(session.attention_paths.values()) == {"implied:softmax"}
    assert session.calls_per_layer == {0: 1, 1: 1}
    captured = _layer_inputs(model, inputs)
    for layer in range(SMALL["num_layers"]):
        attention = model.model.layers[layer].mixer.layer
        q, k, _, _ = attention.project(captured[layer])
        T = q.shape[2]
        distance = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).double()
        logits = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
        logits = logits + attention.log_decay.double()[:, None, None] * distance  # ALiBi: log_decay_h · (i − j)
        probs = torch.softmax(logits.masked_fill(distance < 0, float("-inf")), dim=-1)
        assert_close(alpha[layer], probs[..., 0].mean(dim=(0, 2)), dtype=torch.float32)
        row_entropy = -(probs * torch.log(probs.clamp_min(1e-300))).sum(-1)
        assert_close(entropy[layer], row_entropy.mean(dim=(0, 2)), dtype=torch.float32)


@pytest.mark.parametrize(("layer", "kind"), [("gla", "signed"), ("sigmoid", "proxy")])
def test_default_probes_run_on_implied_maps_under_gqa(layer, kind):
    """The record of a GQA layer's implied map has the model's num_kv_heads and its value de-expanded."""
    from attnlab.capture import calls

    model = build_model(_spec(layer, layer_args={"num_kv_heads": 1}), seed=0).eval()
    seen = []
    record = calls.implied_call
    inputs = torch.randint(0, SMALL["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(0))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("attnlab.capture.session.implied_call", lambda *a, **k: seen.append(record(*a, **k)) or seen[-1])
        with Session(model, probes=["entropy", "sink", "distance", "norms"]) as session, torch.no_grad():
            model(input_ids=inputs)
    assert set(session.attention_paths.values()) == {f"implied:{kind}"}
    assert {(c.num_heads, c.num_kv_heads, c.value.shape[1]) for c in seen} == {(2, 1, 1)}
    assert set(session.results().probe) >= {"entropy", "sink", "distance", "norms"}


def test_edits_on_layers_with_implied_maps_are_refused():
    model = build_model(_spec("alibi"), seed=0).eval()
    with pytest.raises(ConfigError, match="computes its own attention"):
        with Session(model, edits=["temperature:tau=2"]), torch.no_grad():
            model(input_ids=IDS)


@pytest.mark.parametrize(("layer", "module", "builder"), [("alibi", "attnlab.layers._softmax_base", "softmax_map"),
                                                        ("gla", "attnlab.layers.gla", "linear_map"),
                                                        ("relu", "attnlab.layers.normaliser", "relu_map")])
def test_no_map_is_built_outside_a_session(monkeypatch, layer, module, builder):
    """Training forwards do not build implied maps (only a Session reads them)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"{builder} called outside a Session")

    monkeypatch.setattr(f"{module}.{builder}", refuse)
    model = build_model(_spec(layer), seed=0)
    model(input_ids=IDS).logits.sum().backward()
    with pytest.raises(AssertionError, match="outside a Session"), Session(model, probes=["sink"]), torch.no_grad():
        model(input_ids=IDS)


# -- the CLI on a saved checkpoint --------------------------------------------------------------------------------
ALPHABET = "abcdefghij "


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinylm")
    tokenizer = char_tokenizer(ALPHABET, specials=("<bos>", "<unk>"))
    model = build_model(TinyLMSpec(vocab_size=len(tokenizer), num_layers=2, hidden_size=16, num_heads=2,
                                   mlp_ratio=2.0), seed=0)
    model.save_pretrained(root / "checkpoint")
    tokenizer.save_pretrained(root / "checkpoint")
    text = root / "text.txt"
    text.write_text(" ".join("abcdefghij"[i % 10:] + "abc" for i in range(60)), encoding="utf-8")
    return str(root / "checkpoint"), str(text)


def _cli(*args):
    from attnlab.cli.main import app

    return CliRunner().invoke(app, list(args))


def test_cli_probe_runs_on_a_saved_tinylm(checkpoint, tmp_path):
    model, text = checkpoint
    result = _cli("probe", "--model", model, "--text", text, "--probe", "sink", "--seq-len", "32",
                  "--max-windows", "1", "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["model"]["model_type"] == "attnlab_tinylm"
    assert any(row["statistic"] == "alpha" for row in results["rows"])


def test_cli_report_runs_on_a_saved_tinylm(checkpoint, tmp_path):
    model, text = checkpoint
    result = _cli("report", "--model", model, "--text", text, "--seq-len", "32", "--max-windows", "1",
                  "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    html = (tmp_path / "run" / "report.html").read_text()
    assert 'id="sinks"' in html and 'id="entropy"' in html


def test_cli_eval_runs_on_a_saved_tinylm(checkpoint, tmp_path):
    model, text = checkpoint
    result = _cli("eval", "--model", model, "--text", text, "--seq-len", "32", "--max-windows", "2",
                  "--task", "perplexity", "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["command"] == "eval"
