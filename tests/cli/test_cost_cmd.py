"""`attnlab cost` on a tiny saved TinyLM: the table, the CSV, and one-line errors."""

from __future__ import annotations

import csv

import pytest
from typer.testing import CliRunner

from attnlab.cli.main import app
from attnlab.cost import ModelSizes, attention_cost
from attnlab.lab.modeling import TinyLMSpec, build_model
from attnlab.lab.tasks import TASKS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = build_model(TinyLMSpec(vocab_size=32, num_layers=2, hidden_size=16, num_heads=4), seed=0)
    model.save_pretrained(folder)
    TASKS.get("mqar")(vocab_size=32, seq_len=16, num_kv_pairs=2).tokenizer().save_pretrained(folder)
    return folder, sum(p.numel() for p in model.parameters())


def test_cost_table_and_csv(tiny, tmp_path):
    folder, params = tiny
    out = tmp_path / "cost.csv"
    done = CliRunner().invoke(app, ["cost", "--model", str(folder), "--prompt-len", "8", "--gen-len", "4,16",
                                    "--attention", "dense,linear", "--accelerator", "h100,b200", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert f"{params} parameters, 2 layers, 4 query heads, 4 kv heads, head_dim 4" in done.stdout
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 * 2 * 2  # attentions × gen lengths × accelerators
    first = rows[0]
    want = attention_cost(ModelSizes(params, 2, 4, 4, 4), prompt_len=8, gen_len=4)
    assert (first["attention"], first["gen_len"], first["accelerator"]) == ("dense", "4", "h100")
    assert float(first["flops"]) == want.flops and float(first["bytes"]) == want.bytes


@pytest.mark.parametrize("args, message", [
    (["--accelerator", "tpu"], "--accelerator expects names among"),
    (["--gen-len", "abc"], "--gen-len expects comma-separated integers"),
    (["--attention", "radial"], "--attention expects names among"),
])
def test_cost_bad_input_is_one_line(tiny, args, message):
    done = CliRunner().invoke(app, ["cost", "--model", str(tiny[0]), *args])
    assert done.exit_code == 2 and message in done.output and len(done.output.strip().splitlines()) == 1


def test_cost_cpu2_and_measure(tiny, tmp_path, monkeypatch):
    """``--accelerator cpu2`` is the reference CPU's entry; ``--measure`` adds this machine as 'measured' (the timing
    itself is replaced here: tests never time anything)."""
    import attnlab.cost as cost

    fake = cost.Accelerator("measured", peak_flops=1e11, bandwidth=1e10, note="fake")
    monkeypatch.setattr(cost, "measure_accelerator", lambda: fake)
    out = tmp_path / "cost.csv"
    done = CliRunner().invoke(app, ["cost", "--model", str(tiny[0]), "--prompt-len", "8", "--gen-len", "4",
                                    "--attention", "dense", "--accelerator", "cpu2", "--measure", "--out", str(out)])
    assert done.exit_code == 0, done.output
    rows = list(csv.DictReader(out.open()))
    assert [row["accelerator"] for row in rows] == ["cpu2", "measured"]
    assert float(rows[1]["seconds"]) == pytest.approx(float(rows[1]["flops"]) / 1e11 + float(rows[1]["bytes"]) / 1e10)
