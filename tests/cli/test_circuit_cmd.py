"""``attnlab circuit`` end to end on a tiny random Llama with a JSONL task (exit codes, files written)."""

from __future__ import annotations

import json

import pandas as pd
from typer.testing import CliRunner

from attnlab.cli.main import app
from tiny_models import save_model_dir, tiny_llama

runner = CliRunner()
ITEMS = [
    {"context": "the cat sat on a", "choices": [" mat", " dog"], "answer": 0,
     "meta": {"corrupted": "the dog sat on a"}},
    {"context": "the dog ran to the", "choices": [" hills", " cat"], "answer": 1,
     "meta": {"corrupted": "the cat ran to the"}},
    {"context": "birds sang over green", "choices": [" hills", " mat"], "answer": 0,
     "meta": {"corrupted": "birds sat over green"}},
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
                                 "--receiver-inputs", "kv", "--activation",
                                 "--eval-items", "3", "--out", str(both)])
    assert result.exit_code == 0, result.output
    record = json.loads((both / "circuit.json").read_text())
    assert set(record["circuits"]) == {one, two} and record["circuits"][one]["loaded"]
    overlap = record["overlap"]
    assert 0 <= overlap["jaccard"] <= overlap["of_second"] <= 1 and "importance" in overlap
    tasks = record["intervention"]["tasks"]
    assert set(tasks) == {one, two} and set(tasks[one]) == {"none", "circuit", "shared", "control"}
    assert "overlap:" in result.output
    assert record["circuits"][two]["stages"][1]["receiver_inputs"] == "kv" and record["activation"][two]["scores"]
    assert (pd.read_csv(both / "circuit.csv")["stage"] == 0).sum() == 8  # activation patching rows

def test_bad_options_exit_2(tmp_path):
    result = runner.invoke(app, ["circuit", "--task", "nonsense", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "unknown task" in result.output
    result = runner.invoke(app, ["circuit", "--items", "0", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "items must be" in result.output
    result = runner.invoke(app, ["circuit", "--load", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "cannot read circuits" in result.output
    result = runner.invoke(app, ["circuit", "--receiver-inputs", "qx", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "combination of q, k and v" in result.output
    result = runner.invoke(app, ["circuit", "--sender-layers", "a-b", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--sender-layers" in result.output
