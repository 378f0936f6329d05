"""The lm-eval model ``attnlab`` (attnlab.integrations.lm_eval) on a tiny random Llama saved as a local folder.

Oracles are independent of the adapter: lm-eval's own HFLM on the same weights (baseline), HFLM on a copy whose
query projections are scaled by 1/τ (the temperature edit: RoPE is linear, so logits/τ exactly), and plain loops
over single unpadded sequences. The local task is a YAML multiple_choice task over a small JSONL file.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from attnlab.errors import ConfigError, RegistryError  # noqa: E402
from attnlab.integrations.lm_eval import AttnlabLM, main, parse_edits_arg, register  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src"
PAIRS = [("the cat sat", " on a mat"), ("the", " dog"), ("", "the dog ran"),
         ("birds sang over green hills far away and the", " cat"), ("the dog ran to it while", " birds sang")]
TEXT = "the cat sat on a mat and the dog ran to it while birds sang over green hills far away"
ITEMS = [{"context": "the cat sat on", "choices": [" a mat", " the dog", " hills"], "answer": 0},
         {"context": "birds sang over", "choices": [" green hills", " it"], "answer": 0},
         {"context": "the dog ran to", "choices": [" it", " the cat sat"], "answer": 1},
         {"context": "far away", "choices": [" and the dog", " birds", " on a mat"], "answer": 2}]
QK_GAIN = 10.0  # query/key weights × this: attention logits of order 1
LOGLIK_ATOL = 1e-4  # sums of a few float32 log-probs; batched/padded vs single passes (tiny model)


def _tiny_model(tokenizer, seed: int = 0):
    """A 2-layer Llama (GQA) whose vocabulary is the tokenizer's, so generated ids decode to words."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=len(tokenizer), max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper attention than the random init's near-uniform one, so edits show
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(QK_GAIN)
            layer.self_attn.k_proj.weight.mul_(QK_GAIN)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder, model, tokenizer): the tiny model saved as a local model folder attnlab loads."""
    from tiny_models import save_model_dir, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = _tiny_model(tokenizer)
    folder = save_model_dir(tmp_path_factory.mktemp("model"), model, tokenizer)
    return folder, model, tokenizer


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _hflm(model, tokenizer, **kwargs) -> HFLM:
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, **kwargs)


def _assert_scores_close(actual, expected):
    assert len(actual) == len(expected)
    for (logprob, greedy), (ref_logprob, ref_greedy) in zip(actual, expected):
        assert logprob == pytest.approx(ref_logprob, abs=LOGLIK_ATOL)
        assert greedy == ref_greedy


def _plain_loglik(model, tokenizer, context: str, continuation: str, edits=()) -> float:
    """Σ log p over the continuation's tokens, one unpadded sequence, by a Python loop over positions."""
    from attnlab.capture.session import Session

    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False) or [tokenizer.bos_token_id]
    if not context:
        whole = context_ids + whole
    with torch.no_grad(), Session(model, edits=list(edits)):
        logits = model(input_ids=torch.tensor([whole])).logits[0].double()  # (len(whole), vocab)
    total = 0.0
    for position in range(len(context_ids), len(whole)):
        row = logits[position - 1]
        total += float(row[whole[position]] - torch.logsumexp(row, dim=0))
    return total


# baseline: the adapter equals lm-eval's own HFLM on the same weights ---------------------------------------------

@pytest.mark.parametrize("batch_size", [1, 3], ids=["batch1", "batch3"])
def test_loglikelihood_matches_hflm(saved, batch_size):
    folder, model, tokenizer = saved
    requests = _requests("loglikelihood", PAIRS)
    ours = AttnlabLM(pretrained=str(folder), batch_size=batch_size, progress=False).loglikelihood(requests)
    _assert_scores_close(ours, _hflm(model, tokenizer).loglikelihood(requests))


def test_loglikelihood_truncates_like_hflm(saved):
    """max_length=6: long pairs keep their last 7 tokens in both."""
    folder, model, tokenizer = saved
    requests = _requests("loglikelihood", PAIRS)
    ours = AttnlabLM(pretrained=str(folder), batch_size=2, max_length=6, progress=False).loglikelihood(requests)
    _assert_scores_close(ours, _hflm(model, tokenizer, max_length=6).loglikelihood(requests))


def test_loglikelihood_matches_plain_loop(saved):
    folder, model, tokenizer = saved
    ours = AttnlabLM(pretrained=str(folder), batch_size=4, progress=False).loglikelihood(
        _requests("loglikelihood", PAIRS))
    for (context, continuation), (logprob, _) in zip(PAIRS, ours):
        assert logprob == pytest.approx(_plain_loglik(model, tokenizer, context, continuation), abs=LOGLIK_ATOL)


@pytest.mark.parametrize("max_length", [5, 64], ids=["several_windows", "one_window"])
def test_loglikelihood_rolling_matches_hflm(saved, max_length):
    folder, model, tokenizer = saved
    requests = _requests("loglikelihood_rolling", [(TEXT,), ("the cat sat",)])
    ours = AttnlabLM(pretrained=str(folder), batch_size=3, max_length=max_length,
                     progress=False).loglikelihood_rolling(requests)
    ref = _hflm(model, tokenizer, max_length=max_length).loglikelihood_rolling(requests)
    assert ours == pytest.approx(ref, abs=LOGLIK_ATOL)


def test_loglikelihood_rolling_is_the_sum_over_all_tokens_when_one_window_fits(saved):
    """Every token predicted from its full prefix (the first from BOS): the plain-loop loglikelihood of the text."""
    folder, model, tokenizer = saved
    (ours,) = AttnlabLM(pretrained=str(folder), progress=False).loglikelihood_rolling(
        _requests("loglikelihood_rolling", [(TEXT,)]))
    assert ours == pytest.approx(_plain_loglik(model, tokenizer, "", TEXT), abs=LOGLIK_ATOL)


def test_generate_until_matches_hflm_and_cuts_at_stop(saved):
    folder, model, tokenizer = saved
    lm = AttnlabLM(pretrained=str(folder), progress=False)
    ref = _hflm(model, tokenizer)
    free = _requests("generate_until", [("the cat sat", {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}),
                                        ("birds sang", {"max_gen_toks": 5, "temperature": 0.0})])
    texts = lm.generate_until(free)
    assert texts == ref.generate_until(free)
    words = texts[0].split()
    assert len(words) >= 3, texts  # the tiny model's greedy text is long enough to cut
    stop = words[2]
    cut = _requests("generate_until", [("the cat sat", {"until": [stop], "max_gen_toks": 8})])
    assert lm.generate_until(cut) == [texts[0].split(stop)[0]] == ref.generate_until(cut)


def test_generate_until_is_greedy_despite_sampling_settings(saved, caplog):
    folder, _, _ = saved
    lm = AttnlabLM(pretrained=str(folder), progress=False)
    greedy = lm.generate_until(_requests("generate_until", [("the dog", {"max_gen_toks": 6})]))
    sampled = lm.generate_until(_requests("generate_until", [("the dog", {"max_gen_toks": 6, "do_sample": True,
                                                                          "temperature": 1.5, "top_k": 3})]))
    assert sampled == greedy
    assert "decodes greedily" in caplog.text


# edits -----------------------------------------------------------------------------------------------------------

def _query_scaled(model, factor: float):
    """A copy of ``model`` whose query projections are multiplied by ``factor``: logits × factor in every layer."""
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for layer in scaled.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
    return scaled


def test_temperature_edit_equals_scaled_queries_in_hflm(saved):
    """temperature:tau=0.25 divides every logit by τ; so does a model whose q_proj is scaled by 1/τ (HFLM)."""
    folder, model, tokenizer = saved
    requests = _requests("loglikelihood", PAIRS)
    edited = AttnlabLM(pretrained=str(folder), edits="temperature:tau=0.25", batch_size=3, progress=False)
    ours = edited.loglikelihood(requests)
    _assert_scores_close(ours, _hflm(_query_scaled(model, 4.0), tokenizer).loglikelihood(requests))
    baseline = _hflm(model, tokenizer).loglikelihood(requests)
    assert max(abs(a[0] - b[0]) for a, b in zip(ours, baseline)) > 100 * LOGLIK_ATOL  # the edit changed scores
    report = edited.get_model_info()["attnlab_edit_report"]["loglikelihood"]
    assert [row["edit"] for row in report] == ["temperature"] and report[0]["calls_touched"] > 0


def test_temperature_edit_applies_to_rolling_and_generation(saved):
    """The same oracle for the other two request types (generation: every KV-cache decode step is edited)."""
    folder, model, tokenizer = saved
    edited = AttnlabLM(pretrained=str(folder), edits="temperature:tau=0.25", batch_size=2, max_length=5,
                       progress=False)
    ref = _hflm(_query_scaled(model, 4.0), tokenizer, max_length=5)
    rolling = _requests("loglikelihood_rolling", [(TEXT,)])
    assert edited.loglikelihood_rolling(rolling) == pytest.approx(ref.loglikelihood_rolling(rolling), abs=LOGLIK_ATOL)
    generate = _requests("generate_until", [("the cat", {"max_gen_toks": 3}), ("birds", {"max_gen_toks": 3})])
    assert edited.generate_until(generate) == ref.generate_until(generate)
    assert set(edited.get_model_info()["attnlab_edit_report"]) == {"loglikelihood_rolling", "generate_until"}


def test_identity_edit_equals_baseline(saved):
    folder, model, tokenizer = saved
    requests = _requests("loglikelihood", PAIRS)
    same = AttnlabLM(pretrained=str(folder), edits="temperature:tau=1", batch_size=2, progress=False)
    _assert_scores_close(same.loglikelihood(requests), _hflm(model, tokenizer).loglikelihood(requests))


def test_two_edits_with_semicolons_match_a_plain_loop(saved):
    """``;`` stands for the comma inside one edit; the batched scores equal single unpadded passes."""
    folder, model, tokenizer = saved
    text = "sink_window:sinks=1;window=3+temperature:tau=0.5;layers=1"
    edits = parse_edits_arg(text)
    assert [e.name for e in edits] == ["sink_window", "temperature"]
    assert (edits[0].sinks, edits[0].window, edits[1].tau) == (1, 3, 0.5)
    ours = AttnlabLM(pretrained=str(folder), edits=text, batch_size=3, progress=False).loglikelihood(
        _requests("loglikelihood", PAIRS))
    for (context, continuation), (logprob, _) in zip(PAIRS, ours):
        expected = _plain_loglik(model, tokenizer, context, continuation, parse_edits_arg(text))
        assert logprob == pytest.approx(expected, abs=LOGLIK_ATOL)


@pytest.mark.parametrize("kwargs, error", [
    ({"edits": "temprature:tau=0.9"}, RegistryError),
    ({"edits": "temperature:tau=-1"}, ConfigError),
    ({"edits": "temperature:tau=0.9;layers=7"}, ConfigError),  # the model has 2 layers
    ({"edits": 3}, ConfigError),
    ({"batch_size": "auto"}, ConfigError),
    ({"max_gen_toks": 0}, ConfigError),
], ids=["unknown_edit", "bad_value", "missing_layer", "not_text", "auto_batch", "zero_gen_toks"])
def test_bad_model_args_are_one_line_errors(saved, kwargs, error):
    folder, _, _ = saved
    with pytest.raises(error) as info:
        AttnlabLM(pretrained=str(folder), progress=False, **kwargs)
    assert "\n" not in str(info.value)


def test_model_args_batch_size_wins_over_lm_evals_own(saved):
    """lm-eval's CLI always passes its --batch_size (default 1) beside model_args; model_args' key wins."""
    folder, _, _ = saved
    extra = {"batch_size": 1, "max_batch_size": None, "device": "cpu"}
    lm = AttnlabLM.create_from_arg_string(f"pretrained={folder},batch_size=2,progress=False", extra)
    assert lm.batch_size == 2
    lm = AttnlabLM.create_from_arg_obj({"pretrained": str(folder), "progress": False}, {**extra, "batch_size": "3"})
    assert lm.batch_size == 3


def test_raw_comma_inside_edits_names_the_semicolon_rule(saved):
    folder, _, _ = saved
    with pytest.raises(ConfigError) as info:
        AttnlabLM.create_from_arg_string(f"pretrained={folder},edits=sink_window:sinks=4,window=252",
                                         {"batch_size": 1})
    message = str(info.value)
    assert "\n" not in message and "'window'" in message and "sinks=4;window=252" in message


def test_an_encoder_is_refused(tmp_path):
    from tiny_models import save_model_dir, tiny_bert

    folder = save_model_dir(tmp_path / "bert", tiny_bert())
    with pytest.raises(ConfigError, match="causal LM"):
        AttnlabLM(pretrained=str(folder), progress=False)


# the local YAML task, through lm-eval's registry and its command line ----------------------------------------------

def _local_task(root: Path) -> Path:
    """tasks/attnlab_toy_choice.yaml over items.jsonl (attnlab's choice JSONL: context, choices, answer)."""
    (root / "tasks").mkdir(parents=True)
    (root / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (root / "tasks" / "toy.yaml").write_text(
        "task: attnlab_toy_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'items.jsonl'}\n  cache_dir: {root / 'hf_cache'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: context\ndoc_to_choice: \"{{choices | map('trim') | list}}\"\ndoc_to_target: answer\n"
        "target_delimiter: \" \"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return root / "tasks"


def _expected_accuracy(model, tokenizer, edits=()) -> tuple[list[list[float]], float, float]:
    """Plain-loop logliks per item and choice; acc (arg-max) and acc_norm (loglik / characters of the choice
    without its leading space, lm-eval's acc_norm with target_delimiter " ")."""
    logliks = [[_plain_loglik(model, tokenizer, item["context"], choice, edits) for choice in item["choices"]]
               for item in ITEMS]
    acc = sum(max(range(len(s)), key=s.__getitem__) == item["answer"] for s, item in zip(logliks, ITEMS))
    norm = sum(max(range(len(s)), key=lambda i: s[i] / len(item["choices"][i].lstrip())) == item["answer"]
               for s, item in zip(logliks, ITEMS))
    return logliks, acc / len(ITEMS), norm / len(ITEMS)


def _score_choices(model, tokenizer, edits=()):
    """attnlab's own multiple-choice scorer (evaluation.choice) on ITEMS under the same edits."""
    from attnlab.capture.session import Session
    from attnlab.evaluation.choice import ChoiceItem, score_choices

    items = [ChoiceItem(item["context"], tuple(item["choices"]), item["answer"]) for item in ITEMS]
    with Session(model, edits=list(edits)):
        return score_choices(model, tokenizer, items, batch_size=3)


@pytest.mark.parametrize("edits", ["", "temperature:tau=0.5;layers=0"], ids=["baseline", "edited"])
def test_local_yaml_task_through_simple_evaluate(saved, tmp_path, edits, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder, model, tokenizer = saved
    register()
    results = simple_evaluate(model="attnlab", model_args=f"pretrained={folder},edits={edits}",
                              tasks=["attnlab_toy_choice"], task_manager=TaskManager(include_path=str(_local_task(
                                  tmp_path))), log_samples=True)
    logliks, acc, acc_norm = _expected_accuracy(model, tokenizer, parse_edits_arg(edits))
    samples = sorted(results["samples"]["attnlab_toy_choice"], key=lambda s: s["doc_id"])
    for sample, expected in zip(samples, logliks):
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(expected, abs=LOGLIK_ATOL)
    scores = results["results"]["attnlab_toy_choice"]
    assert scores["acc,none"] == pytest.approx(acc) and scores["acc_norm,none"] == pytest.approx(acc_norm)
    assert results["config"]["attnlab_edits"] == edits
    ours = _score_choices(model, tokenizer, parse_edits_arg(edits))  # attnlab eval's scorer agrees item by item
    for sample, expected in zip(samples, ours.logliks):
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(expected, abs=LOGLIK_ATOL)
    assert (scores["acc,none"], scores["acc_norm,none"]) == pytest.approx((ours.accuracy("none"),
                                                                          ours.accuracy("char")))


def test_command_line_runs_the_local_task(saved, tmp_path):
    """``python -m attnlab.integrations.lm_eval`` is lm-eval's CLI with the model registered (a real shell run)."""
    folder, model, tokenizer = saved
    tasks = _local_task(tmp_path)
    out = tmp_path / "out"
    env = {"PYTHONPATH": str(SRC), "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "attnlab.integrations.lm_eval", "--model", "attnlab",
                           "--model_args", f"pretrained={folder},edits=temperature:tau=0.5;layers=0",
                           "--tasks", "attnlab_toy_choice", "--include_path", str(tasks), "--output_path", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (written,) = out.rglob("results_*.json")
    results = json.loads(written.read_text())
    _, acc, _ = _expected_accuracy(model, tokenizer, parse_edits_arg("temperature:tau=0.5;layers=0"))
    assert results["results"]["attnlab_toy_choice"]["acc,none"] == pytest.approx(acc)
    assert results["config"]["attnlab_edits"] == "temperature:tau=0.5;layers=0"


def test_command_line_usage_error_is_one_line_exit_2(saved, tmp_path, monkeypatch, capsys):
    folder, _, _ = saved
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["lm_eval"])
    code = main(["--model", "attnlab", "--model_args", f"pretrained={folder},edits=temprature:tau=0.9",
                 "--tasks", "attnlab_toy_choice", "--include_path", str(_local_task(tmp_path))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error:") and "temperature" in err[-1]
    assert sys.argv == ["lm_eval"]  # main() puts sys.argv back


def test_command_line_raw_comma_in_edits_is_one_line_exit_2(saved, tmp_path, monkeypatch, capsys):
    folder, _, _ = saved
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code = main(["--model", "attnlab", "--model_args", f"pretrained={folder},edits=sink_window:sinks=1,window=4",
                 "--tasks", "attnlab_toy_choice", "--include_path", str(_local_task(tmp_path))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error:") and "sinks=4;window=252" in err[-1]


def test_register_is_idempotent_and_keeps_lm_evals_models():
    from lm_eval.api.registry import get_model

    register()
    register()
    assert get_model("attnlab") is AttnlabLM
    assert get_model("hf") is HFLM
