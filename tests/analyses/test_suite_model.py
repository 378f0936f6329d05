"""Model-level probes: the model runner's hooks, the pure statistics they use, and the probes end to end.

Known answers are computed independently: gradients through HF's own ``output_hidden_states``, head ablation by
zeroing o_proj weight columns. The pure statistics and planted-input tests are in test_suite_stats.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from attnlab.capture.runner import ModelRunner
from attnlab.errors import ConfigError
from tiny_models import WORDS, save_model_dir, tiny_bert, tiny_llama, tiny_tokenizer


# the runner on a tiny Llama --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    return tiny_llama(num_heads=4, num_kv_heads=2, layers=2)


def _batch(ids, pad_left=0):
    ids = torch.tensor(ids)
    mask = torch.ones_like(ids)
    if pad_left:
        mask[:, :pad_left] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_gradient_norms_match_hf_hidden_states(llama):
    batch = _batch([[5, 9, 11, 3, 17, 21, 8, 30]])
    record = ModelRunner(llama).forward(batch, gradients=True)
    out = llama(**batch, output_hidden_states=True)
    logits = out.logits[0, :-1]
    loss = torch.nn.functional.cross_entropy(logits, batch["input_ids"][0, 1:])
    params = list(llama.model.layers[1].parameters())
    grads = torch.autograd.grad(loss, [out.hidden_states[1], *params])  # hidden_states[1] = block 0's output
    assert record.activation_grad_norm[0].item() == pytest.approx(grads[0].norm().item(), rel=1e-4)
    expected_param = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads[1:]))
    assert record.param_grad_norm[1].item() == pytest.approx(expected_param, rel=1e-4)
    assert record.mean_loss()[0].item() == pytest.approx(loss.item(), rel=1e-5)
    assert all(p.grad is None for p in llama.parameters())  # the runner leaves no .grad behind


def test_inflection_gradient_norms_do_not_depend_on_the_batch_size(llama):
    from attnlab.analyses.inflection import InflectionAnalysis

    runner = ModelRunner(llama)
    batch = _batch([[5, 9, 11, 3, 17, 21, 8, 30], [7, 2, 19, 4, 4, 12, 25, 6]])
    together, apart = InflectionAnalysis(), InflectionAnalysis()
    together.prepare(runner.facts, runner)
    apart.prepare(runner.facts, runner)
    together.observe(runner, batch)
    for b in range(2):
        apart.observe(runner, {key: value[b : b + 1] for key, value in batch.items()})
    # independent: per-sequence ‖∂L/∂h_0‖ through HF's hidden states, averaged over the two sequences
    expected = 0.0
    for b in range(2):
        ids = batch["input_ids"][b : b + 1]
        out = llama(input_ids=ids, output_hidden_states=True)
        loss = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:])
        expected += torch.autograd.grad(loss, out.hidden_states[1])[0].norm().item() / 2
    for statistic in ("activation_grad_norm", "param_grad_norm"):
        a = {r["layer"]: r["value"] for r in together.rows() if r["statistic"] == statistic}
        b = {r["layer"]: r["value"] for r in apart.rows() if r["statistic"] == statistic}
        assert a.keys() == b.keys() == {0, 1} and all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a)
    act = {r["layer"]: r["value"] for r in together.rows() if r["statistic"] == "activation_grad_norm"}
    assert act[0] == pytest.approx(expected, rel=1e-4)


def test_head_scale_zero_equals_zeroed_output_projection_columns(llama):
    batch = _batch([[5, 9, 11, 3, 17, 21]])
    runner = ModelRunner(llama)
    scale = torch.tensor([1.0, 0.0, 1.0, 1.0])
    edited = runner.forward(batch, head_scale={1: scale}).logits
    ablated = copy.deepcopy(llama)
    head_dim = ablated.config.hidden_size // ablated.config.num_attention_heads
    with torch.no_grad():
        ablated.model.layers[1].self_attn.o_proj.weight[:, head_dim : 2 * head_dim] = 0
        expected = ablated(**batch).logits
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-5)
    plain = runner.forward(batch, head_scale={1: torch.ones(4)}).logits
    torch.testing.assert_close(plain, llama(**batch).logits.detach(), rtol=1e-6, atol=1e-6)


def test_first_key_equals_one_hot_attention_on_the_first_real_token(llama):
    """One-hot on the first real key makes the head output v_first at every query; checked with left padding."""
    from attnlab.capture.session import Session

    from attnlab.edits import EDITS

    batch = _batch([[0, 0, 5, 9, 11, 3, 17]], pad_left=2)
    runner = ModelRunner(llama)
    mine = runner.forward(batch, first_key={0: torch.tensor([False, True, False, True])}).logits
    edit = EDITS.get("first_key")(alpha=1.0, layers=[0], heads=[1, 3])
    with Session(llama, edits=[edit]), torch.no_grad():
        theirs = llama(**batch).logits
    real = batch["attention_mask"][0].bool()
    torch.testing.assert_close(mine[0, real], theirs[0, real], rtol=1e-4, atol=1e-4)
    # and zero ablation equals the head_scale edit
    mine = runner.forward(batch, head_scale={1: torch.tensor([1.0, 0.0, 1.0, 0.0])}).logits
    with Session(llama, edits=[EDITS.get("head_scale")(scale=0.0, layers=[1], heads=[1, 3])]), torch.no_grad():
        theirs = llama(**batch).logits
    torch.testing.assert_close(mine[0, real], theirs[0, real], rtol=1e-4, atol=1e-4)


def test_head_outputs_and_probs_ignore_left_padding(llama):
    runner = ModelRunner(llama)
    alone = runner.forward(_batch([[5, 9, 11, 3]]), head_outputs=True)
    padded = runner.forward(_batch([[0, 0, 5, 9, 11, 3]], pad_left=2), head_outputs=True)
    torch.testing.assert_close(padded.head_outputs[1][0, 2:], alone.head_outputs[1][0], rtol=1e-4, atol=1e-5)
    probs = runner.attention_probs(_batch([[0, 0, 5, 9, 11, 3]], pad_left=2))
    assert probs[0].shape == (1, 4, 6, 6)
    assert float(probs[0][0, :, :2].abs().sum()) == 0.0  # padding rows
    torch.testing.assert_close(probs[0][0, :, 2:].sum(-1), torch.ones(4, 4))


# the probes end to end on tiny models ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    a = save_model_dir(root / "a", tiny_llama(num_heads=4, num_kv_heads=2, layers=3, seed=0))
    b = save_model_dir(root / "b", tiny_llama(num_heads=4, num_kv_heads=2, layers=3, seed=1))
    text = root / "text.txt"
    rng = torch.Generator().manual_seed(0)
    text.write_text(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (600,), generator=rng)))
    return a, b, text


def _run(model_dir, text, probes, compare=None, probe_args=None, seq_len=32, max_windows=2):
    from attnlab.pipeline import RunConfig, run_probes

    config = RunConfig(model=str(model_dir), text=str(text), seq_len=seq_len, max_windows=max_windows,
                       probes=tuple(probes), bos="never", compare=str(compare) if compare else None,
                       probe_args=probe_args or {})
    return run_probes(config)


def _rows(results, statistic):
    return [r for r in results["rows"] if r["statistic"] == statistic]


def test_suite_runs_every_probe_on_a_tiny_llama(tiny_dirs):
    a, b, text = tiny_dirs
    probes = ["massive_activations", "magnets", "rope_decay", "spatial_decay", "inflection", "cka",
              "head_divergence"]
    results = _run(a, text, probes, compare=b, probe_args={"spatial_decay": {"grid": [4, 4], "start": 1}})
    assert results["command"] == "probe" and results["compare_model"]["requested"] == str(b)
    seen = {r["probe"] for r in results["rows"]}
    assert set(probes) <= seen
    assert len(_rows(results, "cka")) == 3 and all(0 <= r["value"] <= 1 for r in _rows(results, "cka"))
    assert len(_rows(results, "divergence")) == 3 * 4
    assert sum(r["value"] for r in _rows(results, "inflection_band")) >= 1
    same = _run(a, text, ["cka"], compare=a)
    assert all(r["value"] == pytest.approx(1.0, abs=1e-6) for r in _rows(same, "cka"))
    assert all(r["value"] == pytest.approx(0.0, abs=1e-6) for r in _rows(same, "delta_cka_pca"))


def test_cka_without_compare_and_bad_probe_args_are_config_errors(tiny_dirs):
    a, _, text = tiny_dirs
    with pytest.raises(ConfigError, match="--compare"):
        _run(a, text, ["cka"])
    with pytest.raises(ConfigError, match="bad --probe-arg"):
        _run(a, text, ["inflection"], probe_args={"inflection": {"nope": 1}})
    with pytest.raises(ConfigError, match="not selected"):
        _run(a, text, ["inflection"], probe_args={"cka": {"max_tokens": 8}})


def test_probes_that_need_prepare_or_drive_the_model_fail_loudly_in_a_session(tiny_dirs, llama):
    from attnlab.capture.session import Session
    from attnlab.pipeline import RunConfig, run_probes

    for name in ("inflection", "active_dormant"):
        with pytest.raises(ConfigError, match=f"probe {name} drives the model itself"):
            Session(llama, probes=[name])
    with pytest.raises(ConfigError, match="prepare"):  # magnets needs the tokenizer (needs_runner)
        Session(llama, probes=["magnets"])
    Session(llama, probes=["rope_decay"])  # rope_theta/head_dim come from the facts in bind
    a, _, text = tiny_dirs
    # one run path: report/probe run model-level probes too (outside the Session), no longer refused
    ran = run_probes(RunConfig(model=str(a), text=str(text), seq_len=32, max_windows=1, probes=("inflection",)),
                     command="report")
    assert ran["command"] == "report" and {r["probe"] for r in ran["rows"]} == {"inflection"}
    # `attnlab report` prepares magnets/rope_decay: the text is mostly stop words ("the", "a", "and", "on", ...)
    results = run_probes(RunConfig(model=str(a), text=str(text), seq_len=32, max_windows=1,
                                   probes=("magnets", "rope_decay"), bos="never"))
    stop_share = [r["value"] for r in results["rows"] if r["statistic"] == "class_share" and r["position"] == 3]
    assert stop_share and min(stop_share) > 0
    assert _rows(results, "rope_bound")


def test_length_collapse_pools_real_tokens_only(tmp_path):
    bert = tiny_bert()
    tok = tiny_tokenizer()
    runner = ModelRunner(bert, tok)
    batch = runner.encode([[5, 6, 7], [5, 6, 7, 8, 9, 10]])
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    from attnlab.analyses.length_collapse import LengthCollapseAnalysis

    probe = LengthCollapseAnalysis(lengths=[2, 4], count=3)
    probe.prepare(runner.facts, runner)
    probe.observe(runner, {"input_ids": torch.arange(3, 21)[None], "attention_mask": torch.ones(1, 18)})
    probe.finish(runner)
    rows = probe.rows()
    cos = {r["position"]: r["value"] for r in rows if r["statistic"] == "mean_cosine"}
    assert set(cos) == {2, 4} and all(-1 <= v <= 1 for v in cos.values())
    assert sum(r["statistic"] == "highpass_gain" for r in rows) == 2 * 2
    assert sum(r["statistic"] == "highpass_ratio" for r in rows) == 2 * 2
    # one text alone gives the same embedding as inside the padded batch (padding never enters)
    alone = runner.forward(runner.encode([[5, 6, 7]])).last_hidden[0]
    together = runner.forward(batch).last_hidden[0, :3]
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)


# active_dormant, head_importance, head_overlap ---------------------------------------------------------------------

def test_entropy_detector_flags_one_hot_on_the_first_key():
    from attnlab.analyses.active_dormant import entropy_detector

    n = 6
    keep = torch.tril(torch.ones(n, n, dtype=torch.bool))
    sink = torch.zeros(2, n, n)
    sink[..., 0] = 1.0
    row, col = entropy_detector(sink, keep)
    assert torch.allclose(row, torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(col, torch.ones(2, dtype=torch.float64))  # column 0 is uniform over all n queries
    uniform = keep.double() / keep.sum(-1, keepdim=True)
    row, _ = entropy_detector(uniform[None], keep)
    assert row.item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["active_dormant", "head_importance", "head_overlap"])
@pytest.mark.parametrize("layers", [[-1], [5], [0, 2]])
def test_ablation_probes_reject_layers_outside_the_model(name, layers):
    from attnlab.analyses import ANALYSES
    from attnlab.facts import ModelFacts

    facts = ModelFacts(num_layers=2, num_heads=2, num_kv_heads=2, head_dim=4, hidden_size=8)
    # a negative index is refused by the constructor (an index list, as in edit specs), a too-large one once the
    # model's size is known
    message = r"non-negative integers, got \[-1\]" if min(layers) < 0 else r"layers must be in 0\.\.1, got [25]"
    with pytest.raises(ConfigError, match=message):
        ANALYSES.get(name)(layers=layers).prepare(facts, None)


@pytest.mark.parametrize("name", ["active_dormant", "head_overlap"])
def test_text_b_windows_follow_the_runs_bos_policy(tiny_dirs, monkeypatch, name):
    import importlib

    from attnlab.pipeline import RunConfig, run_probes

    a, _, text = tiny_dirs
    module = importlib.import_module(f"attnlab.analyses.{name}")
    seen, real = [], module.head_effects
    monkeypatch.setattr(module, "head_effects", lambda runner, batch, *args, **kwargs: (
        seen.append(batch["input_ids"].cpu().clone()), real(runner, batch, *args, **kwargs))[1])
    config = RunConfig(model=str(a), text=str(text), seq_len=16, max_windows=2, probes=(name,), bos="always",
                       probe_args={name: {"other_text": str(text), "layers": [0]}})
    run_probes(config)
    # text B is the same file, so its windows must be the run's windows, BOS included (the tokenizer adds none)
    assert len(seen) == 4 and all(bool((ids[:, 0] == ids[0, 0]).all()) for ids in seen)
    torch.testing.assert_close(torch.cat(seen[:2]), torch.cat(seen[2:]))


@pytest.mark.parametrize("name", ["active_dormant", "head_overlap"])
def test_ablation_probes_merge_like_one_probe_over_all_windows(llama, name):
    from attnlab.analyses import ANALYSES

    runner = ModelRunner(llama)
    windows = [_batch([[5, 9, 11, 3, 17, 21]]), _batch([[7, 2, 19, 4, 12, 25]]), _batch([[8, 8, 30, 1, 6, 14]])]
    whole, first, rest = (ANALYSES.get(name)(layers=[1]) for _ in range(3))
    for probe in (whole, first, rest):
        probe.prepare(runner.facts, runner)
    for i, batch in enumerate(windows):
        whole.observe(runner, batch)
        (first if i == 0 else rest).observe(runner, batch)
    first.merge(rest)
    expected = {(r["statistic"], r["layer"], r["head"]): r["value"] for r in whole.rows()}
    merged = {(r["statistic"], r["layer"], r["head"]): r["value"] for r in first.rows()}
    assert merged.keys() == expected.keys() and len(expected) > 4
    assert all(merged[k] == pytest.approx(expected[k], rel=1e-9, abs=1e-12) for k in expected)
    assert first.extras() == whole.extras()
    assert len(first.per_window) == 3
    if name == "active_dormant":  # windows keep distinct labels, text-B sums are part of the state
        assert [label for label, _ in first.per_window] == ["A0", "A1", "A2"] and first.windows_seen == 3
        assert {"dormant_b", "tested_b"} <= set(first.state())


def test_a_head_with_zero_output_weights_is_dormant_and_unimportant(llama):
    from attnlab.analyses.active_dormant import ActiveDormantAnalysis
    from attnlab.analyses.head_importance import HeadImportanceAnalysis

    model = copy.deepcopy(llama)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, 2 * head_dim : 3 * head_dim] = 0  # head 2 of layer 0
    runner = ModelRunner(model)
    batch = _batch([[5, 9, 11, 3, 17, 21, 8, 30], [0, 0, 7, 7, 12, 40, 41, 2]], pad_left=0)
    batch["attention_mask"][1, :2] = 0
    dormant = ActiveDormantAnalysis(tolerance=1e-6)
    importance = HeadImportanceAnalysis(top_k=3)
    for probe in (dormant, importance):
        probe.prepare(runner.facts, runner)
        probe.observe(runner, batch)
    rows = dormant.rows()
    rate = {(r["layer"], r["head"]): r["value"] for r in rows if r["statistic"] == "dormant_rate"}
    assert rate[(0, 2)] == 1.0
    scores = importance.importance()
    assert scores[0, 2].item() == pytest.approx(0.0, abs=1e-7)
    # independent: ablate head 1 of layer 1 by zeroing its o_proj columns, loss difference per sequence, averaged
    ablated = copy.deepcopy(model)
    with torch.no_grad():
        ablated.model.layers[1].self_attn.o_proj.weight[:, head_dim : 2 * head_dim] = 0
    base, edited = runner.forward(batch).mean_loss(), ModelRunner(ablated).forward(batch).mean_loss()
    assert scores[1, 1].item() == pytest.approx(float((edited - base).mean()), rel=1e-4, abs=1e-7)
    assert (0, 2) not in [(x["layer"], x["head"]) for x in importance.extras()["top_heads"]]


def test_head_overlap_of_two_halves(tiny_dirs):
    a, _, text = tiny_dirs
    results = _run(a, text, ["head_overlap", "active_dormant"], max_windows=2,
                   probe_args={"head_overlap": {"top_k": 3}, "active_dormant": {"other_text": str(text)}})
    # independent: importance of each head = loss with its o_proj input columns zeroed - plain loss, per window
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a).eval()
    head_dim = model.config.hidden_size // model.config.num_attention_heads

    def loss(ids):
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:]))

    tops = []
    for window in results["windows"]:
        ids = torch.tensor([window["ids"]])
        base, scores = loss(ids), {}
        for layer in range(3):
            for head in range(4):
                ablated = copy.deepcopy(model)
                with torch.no_grad():
                    ablated.model.layers[layer].self_attn.o_proj.weight[:, head * head_dim : (head + 1) * head_dim] = 0
                scores[(layer, head)] = float(torch.nn.functional.cross_entropy(
                    ablated(input_ids=ids).logits[0, :-1], ids[0, 1:]).detach()) - base
        tops.append({k for k in sorted(scores, key=lambda k: -scores[k])[:3]})
    shared = len(tops[0] & tops[1])
    extras = results["extras"]["head_overlap"]
    assert {tuple(x) for x in extras["top_heads_a"]} == tops[0] and {tuple(x) for x in extras["top_heads_b"]} == tops[1]
    assert _rows(results, "overlap_of_a")[0]["value"] == pytest.approx(shared / 3)
    assert _rows(results, "overlap_iou")[0]["value"] == pytest.approx(shared / (6 - shared))
    assert len(_rows(results, "dormant_fraction")) == 3
    # text B = the same text: the same windows give the same dormant fractions
    b = {r["layer"]: r["value"] for r in _rows(results, "dormant_fraction_b")}
    assert b == {r["layer"]: r["value"] for r in _rows(results, "dormant_fraction")}


# contrast ------------------------------------------------------------------------------------------------------------

def test_contrast_of_a_query_with_itself_has_zero_kl(tiny_dirs):
    a, _, text = tiny_dirs
    same = _run(a, text, ["contrast"], max_windows=3,
                probe_args={"contrast": {"task": " the cat sat", "generic": " the cat sat"}})
    assert all(r["value"] == pytest.approx(0.0, abs=1e-9) for r in _rows(same, "kl_task_generic"))
    results = _run(a, text, ["contrast"], max_windows=3,
                   probe_args={"contrast": {"task": " the dog ran", "generic": " birds sang"}})
    n = 31  # context tokens seen (32 minus the excluded key 0)
    for statistic in ("context_entropy_generic", "context_entropy_task", "contrast_entropy"):
        assert all(0 <= r["value"] <= math.log(n) + 1e-9 for r in _rows(results, statistic))
    assert all(r["value"] >= 0 for r in _rows(results, "kl_task_generic"))
    assert len(_rows(results, "complexity")) == 3 and len(_rows(results, "entropy_complexity_correlation")) == 1


# memory_fidelity -----------------------------------------------------------------------------------------------------

def test_memory_fidelity_on_a_retention_layer_and_skip_without_one(tiny_dirs):
    from attnlab.layers import LAYERS
    from attnlab.analyses.memory_fidelity import MemoryFidelityAnalysis, recurrent_layers

    layer = LAYERS.get("retention")(hidden_size=16, num_heads=2)
    assert recurrent_layers(layer) == [layer]
    from attnlab.analyses.memory_fidelity import layer_keys_values

    probe = MemoryFidelityAnalysis(lags=[0, 2])
    hidden = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1))
    probe.observe_layer(layer, hidden)
    rows = probe.rows()
    retention = {(r["head"], r["position"]): r["value"] for r in rows if r["statistic"] == "retention"}
    assert set(retention) == {(0, 0), (0, 2), (1, 0), (1, 2)}
    # independent loop: state S_t = γ S_(t-1) + k_tᵀ v_t, read back token t at t + 2 with k_t / ‖k_t‖²
    key, value = (x.detach().double() for x in layer_keys_values(layer, hidden))
    gamma = float(layer.log_decay[0].exp())
    total, count = 0.0, 0
    for b in range(2):
        for t in range(9 - 2):
            state = torch.zeros(key.shape[-1], value.shape[-1], dtype=torch.float64)
            for s in range(t + 3):
                state = gamma * state + torch.outer(key[b, 0, s], value[b, 0, s])
            readout = key[b, 0, t] @ state / key[b, 0, t].dot(key[b, 0, t])
            total += float(readout.dot(value[b, 0, t]) / value[b, 0, t].dot(value[b, 0, t]))
            count += 1
    assert retention[(0, 2)] == pytest.approx(total / count, rel=1e-6)
    a, _, text = tiny_dirs
    skipped = _run(a, text, ["memory_fidelity"])
    assert [r for r in skipped["rows"] if r["probe"] == "memory_fidelity"] == []
    assert "skipped" in skipped["extras"]["memory_fidelity"]["skipped"]


def test_head_divergence_matches_eager_attention_times_values(llama):
    """Layer 0 head outputs rebuilt from HF eager probs (output_attentions) and the v_proj output, by hand."""
    from attnlab.analyses.head_divergence import HeadDivergenceAnalysis

    eager = copy.deepcopy(llama)
    eager.set_attn_implementation("eager")
    ids = torch.tensor([[5, 9, 11, 3, 17, 21, 8, 30, 12, 6]])
    split = 4

    def head_outputs(x):
        captured = {}
        hook = eager.model.layers[0].self_attn.v_proj.register_forward_hook(
            lambda m, a, out: captured.__setitem__("v", out))
        with torch.no_grad():
            attn = eager(input_ids=x, output_attentions=True).attentions[0][0]  # (H, L, L)
        hook.remove()
        v = captured["v"][0].view(x.shape[1], 2, -1).transpose(0, 1).repeat_interleave(2, dim=0)  # (H, L, D)
        return (attn.double() @ v.double()).transpose(0, 1)  # (L, H, D)

    with_ctx, without = head_outputs(ids), head_outputs(ids[:, split:])
    rest = ids.shape[1] - split
    expected = (with_ctx[-rest:] - without[-rest:]).norm(dim=-1).mean(0)  # (H,)
    probe = HeadDivergenceAnalysis(context=split)
    runner = ModelRunner(llama)
    probe.prepare(runner.facts, runner)
    probe.observe(runner, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    got = [r["value"] for r in probe.rows() if r["statistic"] == "divergence" and r["layer"] == 0]
    assert got == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-6)


def test_encode_puts_the_tokenizers_specials_around_each_sequence(tmp_path):
    """transformers 5 tokenizers have no build_inputs_with_special_tokens: [CLS] … [SEP] come from special_tokens."""
    from transformers import BertTokenizerFast

    from attnlab.text import special_tokens

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    assert special_tokens(tok) == ([2], [3])
    runner = ModelRunner(tiny_bert(), tok)
    batch = runner.encode([[5, 6], [7]])
    assert batch["input_ids"].tolist() == [[2, 5, 6, 3], [2, 7, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
