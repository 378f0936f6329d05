"""``attnlab circuit`` end to end on a tiny random Llama with a JSONL task (exit codes, files written)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from attnlab.cli.main import app
from attnlab.errors import ConfigError
from tiny_models import save_model_dir, tiny_llama

runner = CliRunner()
ITEMS = [
    {"context": "the cat sat on a", "choices": [" mat", " dog"], "answer": 0,
     "meta": {"corrupted": "the dog sat on a"}},
    {"context": "the dog ran to the", "choices": [" hills", " cat"], "answer": 1,
     "meta": {"corrupted": "the cat ran to the"}},
    {"context": "birds sang over green", "choices": [" hills", " mat"], "answer": 0,
     "meta": {"corrupted": "birds sat over green"}},
    {"context": "the cat ran on green", "choices": [" hills", " dog"], "answer": 0,
     "meta": {"corrupted": "the dog ran on green"}},
    {"context": "a dog sat over the", "choices": [" mat", " cat"], "answer": 1,
     "meta": {"corrupted": "a cat sat over the"}},
    {"context": "birds ran to a", "choices": [" mat", " hills"], "answer": 0,
     "meta": {"corrupted": "birds sat to a"}},
]


def task_file(tmp_path, name, items):
    path = tmp_path / name
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return str(path)


def test_two_circuits_overlap_and_intervention(tmp_path):
    model = str(save_model_dir(tmp_path / "tiny", tiny_llama(layers=2)))
    one = task_file(tmp_path, "one.jsonl", ITEMS)
    two = task_file(tmp_path, "two.jsonl", ITEMS[::-1])
    out = tmp_path / "run"
    args = ["circuit", "--model", model, "--task", one, "--items", "3", "--stages", "2", "--fraction", "0.25",
            "--batch-size", "2", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    first = json.loads((out / "circuit.json").read_text())
    assert list(first["circuits"]) == [one] and len(first["circuits"][one]["stages"][0]["top"]) == 2
    table = pd.read_csv(out / "circuit.csv")
    assert {"task", "stage", "layer", "head", "score", "effect", "in_circuit"} <= set(table.columns)
    assert (table["stage"] == 1).sum() == 8  # every head of the 2 x 4 model scored against the logits

    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output

    both = tmp_path / "both"
    result = runner.invoke(app, ["circuit", "--model", model, "--task", two, "--load", str(out / "circuit.json"),
                                 "--items", "3", "--stages", "2", "--fraction", "0.25", "--intervene",
                                 "--receiver-inputs", "q", "--activation",
                                 "--eval-items", "3", "--out", str(both)])
    assert result.exit_code == 0, result.output
    record = json.loads((both / "circuit.json").read_text())
    assert set(record["circuits"]) == {one, two} and record["circuits"][one]["loaded"]
    assert record["schema_version"] and record["tokenizer"]["bos_policy"] == "auto" and record["seed"] == 0
    assert record["config"]["model"] == model and record["model"]["requested"] == model
    overlap = record["overlap"]
    heads_one = {tuple(h) for h in record["circuits"][one]["heads"]}
    heads_two = {tuple(h) for h in record["circuits"][two]["heads"]}
    second = sorted([one, two])[1]
    shared = heads_one & heads_two
    assert overlap["intersection"] == len(shared) and overlap["union"] == len(heads_one | heads_two)
    assert overlap["jaccard"] == len(shared) / len(heads_one | heads_two)
    assert overlap["of_second"] == len(shared) / len(heads_one if second == one else heads_two)
    assert "importance" in overlap and overlap["configs"][one]["items"] == 3
    tasks = record["intervention"]["tasks"]
    assert set(tasks) == {one, two} and set(tasks[one]) == {"none", "circuit", "shared", "control"}
    assert "overlap:" in result.output
    assert record["circuits"][two]["stages"][1]["receiver_inputs"] == "q" and record["activation"][two]["scores"]
    assert (pd.read_csv(both / "circuit.csv")["stage"] == 0).sum() == 8  # activation patching rows

    other = str(save_model_dir(tmp_path / "other", tiny_llama(layers=3)))
    result = runner.invoke(app, ["circuit", "--model", other, "--load", str(out / "circuit.json"),
                                 "--task", two, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "num_layers=2" in result.output and "circuit.json" in result.output


def test_file_tasks_split_patching_and_evaluation_items(tmp_path):
    from attnlab.circuits.run import _items

    path = task_file(tmp_path, "six.jsonl", ITEMS)
    patching = _items(path, None, 3, 0)
    evaluation = _items(path, None, 3, 1000, skip=3)
    assert [i.context for i in patching] == [i["context"] for i in ITEMS[:3]]
    assert [i.context for i in evaluation] == [i["context"] for i in ITEMS[3:]]
    with pytest.raises(ConfigError, match="need 7"):
        _items(path, None, 4, 1000, skip=3)


def test_bad_options_exit_2(tmp_path):
    result = runner.invoke(app, ["circuit", "--task", "nonsense", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "Unknown --task 'nonsense'" in result.output
    result = runner.invoke(app, ["circuit", "--task", "ioii", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "Did you mean: ioi?" in result.output
    result = runner.invoke(app, ["circuit", "--task", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "nope.jsonl not found" in result.output
    result = runner.invoke(app, ["circuit", "--items", "0", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--items must be" in result.output
    result = runner.invoke(app, ["circuit", "--fraction", "2", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--fraction must be" in result.output
    result = runner.invoke(app, ["circuit", "--load", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "cannot read circuits" in result.output
    result = runner.invoke(app, ["circuit", "--receiver-inputs", "qx", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "combination of q, k and v" in result.output
    for layers in ("a-b", "5-3"):
        result = runner.invoke(app, ["circuit", "--sender-layers", layers, "--out", str(tmp_path / "x")])
        assert result.exit_code == 2 and "--sender-layers" in result.output
    model = str(save_model_dir(tmp_path / "tiny", tiny_llama(layers=2)))
    one = task_file(tmp_path, "one.jsonl", ITEMS)
    result = runner.invoke(app, ["circuit", "--model", model, "--task", one, "--intervene",
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "needs two circuits" in result.output
    assert "path patching" not in result.output  # refused before the search
    for tasks, message in ((["cloze"], "has no corrupted contexts"), (["ioi", "ioi"], "at most once")):
        args = [a for t in tasks for a in ("--task", t)]
        result = runner.invoke(app, ["circuit", *args, "--out", str(tmp_path / "x")])
        assert result.exit_code == 2 and message in result.output


STAGE = {"scores": [[1.0, None]], "receivers": "logits", "clean_logit_diff": 2.0, "corrupted_logit_diff": 1.0,
         "num_pairs": 3}


@pytest.mark.parametrize("circuit, message", [
    ({"heads": [[0, 1]], "stages": [{k: v for k, v in STAGE.items() if k != "scores"}]}, "lacks 'scores'"),
    ({"heads": [["a", 1]], "stages": [STAGE]}, "non-negative ints"),
    ({"heads": [[0, 1, 2]], "stages": [STAGE]}, "non-negative ints"),
    ({"heads": [[0, 1]], "stages": [{**STAGE, "scores": [1, 2]}]}, "list of lists"),
])
def test_bad_load_files_exit_2(tmp_path, circuit, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"model": {"num_layers": 2, "num_heads": 4}, "circuits": {"ioi": circuit}}))
    result = runner.invoke(app, ["circuit", "--load", str(path), "--task", "colored_objects",
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "bad.json" in result.output and message in result.output
    assert "Traceback" not in result.output
