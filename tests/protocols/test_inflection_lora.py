"""Inflection-layer LoRA (attnlab.protocols.inflection_lora): LoRA placement by parameter names, the line task on
hand-written text, the classification-loss gradient norms against a plain autograd computation, and a tiny random
BERT end to end (Python API and CLI)."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from typer.testing import CliRunner

from attnlab.errors import ConfigError
from attnlab.protocols.inflection_lora import (
    ClassifierRunner, InflectionLoraConfig, MeanPoolClassifier, add_lora, build_tasks, fit, play_lines,
    run_inflection_lora, trainable_parameters,
)
from tests.tiny_models import WORDS, save_model_dir, tiny_tokenizer


def _tiny_bert(layers: int = 4, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                        vocab_size=97, max_position_embeddings=64, attn_implementation="sdpa")
    return BertModel(config).eval()


def _lora_layers(model: torch.nn.Module) -> dict[int, set[str]]:
    """{layer index: wrapped module names}, read from the LoRA parameter names."""
    found: dict[int, set[str]] = {}
    for name, _ in model.named_parameters():
        match = re.search(r"\.layer\.(\d+)\..*\.(\w+)\.lora_A\.", name)
        if match:
            found.setdefault(int(match.group(1)), set()).add(match.group(2))
    return found


def _text_dir(tmp_path, lines_per_file: int = 40):
    """Four 'plays' of made-up lines over WORDS, each from its own slice of the vocabulary."""
    rng = random.Random(0)
    groups = {"a": WORDS[:8], "b": WORDS[8:16], "c": WORDS[4:12], "d": WORDS[12:]}
    for name, words in groups.items():
        lines = [" ".join(rng.choice(words) for _ in range(6)) for _ in range(lines_per_file)]
        (tmp_path / f"{name}.txt").write_text("\n".join(lines), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("layers", [[1, 2], [3], None, []], ids=["band-1-2", "band-3", "all", "none"])
def test_lora_lands_on_the_named_layers_only(layers):
    classifier = MeanPoolClassifier(_tiny_bert(), num_labels=3)
    add_lora(classifier, layers, target_modules=("query", "value"), rank=2, alpha=4.0)
    expected_layers = {0, 1, 2, 3} if layers is None else set(layers)
    assert _lora_layers(classifier) == {layer: {"query", "value"} for layer in expected_layers}
    trainable = {name for name, p in classifier.named_parameters() if p.requires_grad}
    assert all(name.startswith("head.") or "lora_" in name for name in trainable)
    assert {"head.weight", "head.bias"} <= trainable
    # by hand: per wrapped 32 → 32 Linear, A (2, 32) + B (32, 2) = 128; the head 32 * 3 + 3 = 99
    assert trainable_parameters(classifier) == 99 + 2 * 128 * len(expected_layers)


@pytest.mark.parametrize("layers", [[1, 3], None], ids=["band-1-3", "all"])
def test_lora_lands_on_the_named_llama_layers_only(layers):
    """A bare Llama base model (keys ``layers.3.self_attn.q_proj``, no prefix: older peft placed nothing there)."""
    from tests.tiny_models import tiny_llama

    classifier = MeanPoolClassifier(tiny_llama(layers=4).model, num_labels=3)
    add_lora(classifier, layers, target_modules=("q_proj", "v_proj"), rank=2, alpha=4.0)
    found: dict[int, set[str]] = {}
    for name, _ in classifier.named_parameters():
        match = re.search(r"layers\.(\d+)\.self_attn\.(\w+)\.lora_A\.", name)
        if match:
            found.setdefault(int(match.group(1)), set()).add(match.group(2))
    assert found == {layer: {"q_proj", "v_proj"} for layer in ({0, 1, 2, 3} if layers is None else {1, 3})}


def test_lora_placement_that_peft_misses_is_a_config_error(monkeypatch):
    """If peft puts the adapters elsewhere (here: it is told to use layer 0), the read-back refuses."""
    import peft

    real = peft.inject_adapter_in_model

    def misplaced(config, model):
        config.layers_to_transform = [0]
        return real(config, model)

    monkeypatch.setattr(peft, "inject_adapter_in_model", misplaced)
    with pytest.raises(ConfigError, match=r"landed on \{0: \['query', 'value'\]\}, expected .* blocks \[2\]"):
        add_lora(MeanPoolClassifier(_tiny_bert(), num_labels=3), [2], target_modules=("query", "value"), rank=2,
                 alpha=4.0)


def test_a_bad_lora_target_fails_before_any_training(tmp_path, monkeypatch):
    import attnlab.protocols.inflection_lora as module
    from tests.tiny_models import tiny_llama

    monkeypatch.setattr(module, "fit", lambda *a, **k: pytest.fail("training ran before the target check"))
    config = module.InflectionLoraConfig(source_plays="a,b", target_plays="c,d", text_dir=str(_text_dir(tmp_path)),
                                         train_lines=8, test_lines=4, target_train_lines=4, min_words=3,
                                         diagnose_lines=4, max_tokens=12)
    with pytest.raises(ConfigError, match=r"LoRA target modules \['query', 'value'\] not found in every block"):
        module.run_inflection_lora(config, model=tiny_llama(), tokenizer=tiny_tokenizer())


def test_lora_starts_as_the_identity():
    """LoRA's B starts at zero, so the adapted classifier's logits equal the plain one's before training."""
    torch.manual_seed(1)
    classifier = MeanPoolClassifier(_tiny_bert(), num_labels=3)
    ids = torch.randint(3, 97, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    before = classifier(ids, mask)
    add_lora(classifier, [0, 2], target_modules=("query", "value"), rank=2, alpha=4.0)
    torch.testing.assert_close(classifier(ids, mask), before)


def test_lora_target_the_model_lacks_is_a_config_error():
    classifier = MeanPoolClassifier(_tiny_bert(), num_labels=2)
    with pytest.raises(ConfigError, match="q_proj.*not found.*linear modules: .*query"):
        add_lora(classifier, [1], target_modules=("q_proj",), rank=2, alpha=4.0)


def test_play_lines_keep_spoken_lines_only():
    text = ("header\n*** START OF THIS PROJECT GUTENBERG EBOOK ***\n"
            "HAMLET.\nTo be, or not to be, that is the question:\n[Enter Ghost.]\nEnter Horatio and Marcellus.\n"
            "Exeunt all but Hamlet.\nAy, there's the rub.\nTo be, or not to be, that is the question:\n"
            "Whether 'tis nobler in the mind to suffer\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK ***\nThis eBook is for the use of anyone anywhere\n")
    assert play_lines(text, min_words=5) == ["To be, or not to be, that is the question:",
                                             "Whether 'tis nobler in the mind to suffer"]
    assert "Ay, there's the rub." in play_lines(text, min_words=4)


def test_build_tasks_draws_disjoint_balanced_lines(tmp_path):
    folder = _text_dir(tmp_path)
    train, test = build_tasks(("a", "b", "c"), train_per_play=10, test_per_play=5, min_words=3, seed=0,
                              text_dir=str(folder))
    assert train.classes == test.classes == ("a", "b", "c")
    assert [train.labels.count(k) for k in range(3)] == [10, 10, 10]
    assert [test.labels.count(k) for k in range(3)] == [5, 5, 5]
    for task in (train, test):
        for text, label in zip(task.texts, task.labels):
            assert text in (folder / f"{task.classes[label]}.txt").read_text()
    pairs = set(zip(train.texts, train.labels))
    assert not pairs & set(zip(test.texts, test.labels))
    assert build_tasks(("a", "b"), train_per_play=4, test_per_play=2, min_words=3, seed=0, text_dir=str(folder)) \
        == build_tasks(("a", "b"), train_per_play=4, test_per_play=2, min_words=3, seed=0, text_dir=str(folder))
    joined, _ = build_tasks(("a", "b"), train_per_play=6, test_per_play=2, min_words=3, seed=0,
                            text_dir=str(folder), lines_per_item=3)
    for text, label in zip(joined.texts, joined.labels):  # three consecutive lines of the file, joined by spaces
        lines = (folder / f"{joined.classes[label]}.txt").read_text().splitlines()
        assert any(" ".join(lines[i : i + 3]) == text for i in range(0, len(lines) - 2, 3))
    with pytest.raises(ConfigError, match="unknown play.*'zz'.*available: a, b, c, d"):
        build_tasks(("a", "zz"), train_per_play=4, test_per_play=2, min_words=3, seed=0, text_dir=str(folder))
    with pytest.raises(ConfigError, match="play 'a' has .* need 100"):
        build_tasks(("a", "b"), train_per_play=90, test_per_play=10, min_words=3, seed=0, text_dir=str(folder))


@pytest.mark.parametrize("values, message", [
    ({"source_plays": "a,b", "target_plays": "b,c"}, "both source and target"),
    ({"source_plays": "a"}, ">= 2 plays"),
    ({"under_steps": 10, "over_steps": 10}, "under_steps must be < over_steps"),
    ({"target_lr": 0.0}, "target_lr must be > 0"),
    ({"lora_target": ""}, "lora_target"),
])
def test_bad_settings_are_one_line_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        InflectionLoraConfig(**values)


def test_classifier_runner_gradients_match_plain_autograd():
    """‖∂L/∂h_l‖ of the classification loss for one line, against transformers' hidden_states and autograd."""
    torch.manual_seed(2)
    classifier = MeanPoolClassifier(_tiny_bert(layers=3), num_labels=3).eval()
    ids = torch.randint(3, 97, (1, 9))
    mask = torch.ones_like(ids)
    labels = torch.tensor([2])
    record = ClassifierRunner(classifier).forward({"input_ids": ids, "attention_mask": mask, "labels": labels},
                                                  gradients=True)
    output = classifier.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hidden = output.hidden_states  # embeddings, then the output of each block
    pooled = hidden[-1].mean(1)
    loss = torch.nn.functional.cross_entropy(classifier.head(pooled), labels)
    grads = torch.autograd.grad(loss, hidden[1:])
    expected = torch.tensor([float(g.double().norm()) for g in grads], dtype=torch.float64)
    torch.testing.assert_close(record.activation_grad_norm, expected, rtol=1e-5, atol=1e-9)


def test_fit_lowers_the_loss_and_repeats_by_seed(tmp_path):
    tokenizer = tiny_tokenizer()
    train, _ = build_tasks(("a", "b"), train_per_play=12, test_per_play=2, min_words=3, seed=0,
                           text_dir=str(_text_dir(tmp_path)))

    def run() -> list[float]:
        torch.manual_seed(0)
        classifier = MeanPoolClassifier(_tiny_bert(layers=2), num_labels=2)
        return fit(classifier, tokenizer, train, steps=30, lr=3e-3, batch_size=8, max_tokens=12, seed=5)

    losses = run()
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert run() == losses


def test_tiny_bert_end_to_end(tmp_path):
    folder = _text_dir(tmp_path)
    config = InflectionLoraConfig(source_plays="a,b", target_plays="c,d", text_dir=str(folder), train_lines=16,
                                  test_lines=6, target_train_lines=8, min_words=3, under_steps=1, over_steps=6,
                                  target_steps=3, batch_size=8, diagnose_lines=6, max_tokens=12, lora_rank=2)
    results = run_inflection_lora(config, model=_tiny_bert(layers=4), tokenizer=tiny_tokenizer())
    extras = results["extras"]["inflection_lora"]
    assert [(r["regime"], r["placement"]) for r in extras["table"]] == \
        [(regime, placement) for regime in ("under", "over") for placement in ("inflection", "all", "none")]
    head = 32 * 2 + 2
    for record in extras["table"]:
        layers = {"all": 4, "none": 0}.get(record["placement"], len(extras["diagnosis"][record["regime"]]["band"]))
        assert record["trainable_params"] == head + layers * 2 * (2 * 32 * 2)
        assert record["target_accuracy_low"] <= record["target_accuracy"] <= record["target_accuracy_high"]
    for regime in ("under", "over"):
        diagnosis = extras["diagnosis"][regime]
        assert len(diagnosis["entropy"]) == 4 and diagnosis["drop"][0] is None
        assert set(diagnosis["band"]) <= {1, 2, 3}
    statistics = {(row["variant"], row["statistic"]) for row in results["rows"]}
    assert ("over/all", "target_accuracy") in statistics and ("under", "inflection_band") in statistics
    json.dumps(results)  # JSON-ready


def test_cli_runs_and_refuses_bad_input(tmp_path):
    from attnlab.cli.main import app

    model_dir = save_model_dir(tmp_path / "model", _tiny_bert(layers=3), tiny_tokenizer())
    plays = tmp_path / "plays"
    plays.mkdir()
    folder = _text_dir(plays)
    common = ["protocol", "inflection-lora", "--model", str(model_dir), "--text-dir", str(folder),
              "--source-plays", "a,b", "--target-plays", "c,d", "--train-lines", "8", "--test-lines", "4",
              "--target-train-lines", "4", "--min-words", "3", "--under-steps", "1", "--over-steps", "2",
              "--target-steps", "1", "--batch-size", "4", "--diagnose-lines", "4", "--max-tokens", "10",
              "--lora-rank", "2"]
    runner = CliRunner()
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["command"] == "protocol inflection-lora"
    assert len(saved["extras"]["inflection_lora"]["table"]) == 6
    assert 'id="inflection-lora"' in (tmp_path / "out" / "report.html").read_text()
    bad = runner.invoke(app, [*common, "--target-plays", "c,zz", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "unknown play" in bad.output


def test_an_empty_band_is_named_in_the_table_and_the_summary(tmp_path, monkeypatch, capsys):
    """No band (review 15c #6): the inflection row says it trained the head alone, and so does the summary line."""
    import attnlab.protocols.inflection_lora as module
    from attnlab.cli.protocol_inflection_lora import _print_summary

    real = module.diagnose
    monkeypatch.setattr(module, "diagnose", lambda *a, **k: {**real(*a, **k), "band": []})
    config = InflectionLoraConfig(source_plays="a,b", target_plays="c,d", text_dir=str(_text_dir(tmp_path)),
                                  train_lines=8, test_lines=4, target_train_lines=4, min_words=3, under_steps=0,
                                  over_steps=1, target_steps=1, batch_size=8, diagnose_lines=4, max_tokens=12,
                                  lora_rank=2)
    results = run_inflection_lora(config, model=_tiny_bert(layers=3), tokenizer=tiny_tokenizer())
    table = results["extras"]["inflection_lora"]["table"]
    rows = {(r["regime"], r["placement"]): r for r in table}
    for regime in ("under", "over"):
        assert rows[regime, "inflection"]["layers"] == "no band: head only"
        assert rows[regime, "inflection"]["trainable_params"] == rows[regime, "none"]["trainable_params"] == 32 * 2 + 2
    _print_summary(results)
    assert capsys.readouterr().out.count("band [none: inflection = head only]") == 2
