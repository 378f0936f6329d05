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


def test_cost_batched_reads_weights_once_per_step(tiny, tmp_path):
    """``--batched`` with ``--weight-bytes``: one weight read per decode step for all samples, not one per sample."""
    folder, params = tiny
    tables = {}
    for flag in ([], ["--batched"]):
        out = tmp_path / f"cost{len(flag)}.csv"
        done = CliRunner().invoke(app, ["cost", "--model", str(folder), "--prompt-len", "8", "--gen-len", "4",
                                        "--samples", "3", "--attention", "dense", "--weight-bytes", "4", *flag,
                                        "--out", str(out)])
        assert done.exit_code == 0, done.output
        tables[bool(flag)] = float(next(csv.DictReader(out.open()))["bytes"])
    sizes = ModelSizes(params, 2, 4, 4, 4)
    for batched, got in tables.items():
        want = attention_cost(sizes, prompt_len=8, gen_len=4, samples=3, weight_bytes=4, batched=batched)
        assert got == want.bytes
    assert tables[False] - tables[True] == 4 * params * 4 * (3 - 1)  # weight_bytes · P · L_out · (N − 1)


def run_cost(*args):
    done = CliRunner().invoke(app, ["cost", *args])
    return done, done.output.strip().splitlines()


def test_cost_reads_a_config_alone(tmp_path):
    """A folder with config.json only (no tokenizer, no weights), or the config.json itself: sizes from the config,
    parameters counted on the meta device (WALK13 #3)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=50, tie_word_embeddings=True,
                         architectures=["LlamaForCausalLM"])
    params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    config.save_pretrained(tmp_path)
    for model in (tmp_path, tmp_path / "config.json"):
        done = CliRunner().invoke(app, ["cost", "--model", str(model), "--gen-len", "4", "--attention", "dense"])
        assert done.exit_code == 0, done.output
        assert f"{params} parameters, 3 layers, 6 query heads, 2 kv heads, head_dim 4" in done.stdout


def test_cost_of_a_family_size(monkeypatch):
    """Family sizes need no weights: load_model is never called (WALK13 #7)."""
    import attnlab.capture.loading as loading
    from attnlab.cost import MODEL_FAMILIES

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded weights"))
    done = CliRunner().invoke(app, ["cost", "--model", "Qwen3-8B", "--gen-len", "4", "--attention", "dense"])
    assert done.exit_code == 0, done.output
    sizes = MODEL_FAMILIES["qwen3"]["8b"]
    assert f"{sizes.num_parameters} parameters, 36 layers, 32 query heads, 8 kv heads" in done.stdout
    assert "qwen3-32b" in CliRunner().invoke(app, ["cost", "--help"]).output


def test_cost_defaults_to_linear_for_a_recurrent_tinylm(tmp_path):
    """A TinyLM whose layer keeps a state gets the linear row by default, with a note (WALK13 #17)."""
    model = build_model(TinyLMSpec(layer="gla", vocab_size=32, num_layers=2, hidden_size=16, num_heads=4), seed=0)
    model.save_pretrained(tmp_path)
    done = CliRunner().invoke(app, ["cost", "--model", str(tmp_path), "--gen-len", "4"])
    assert done.exit_code == 0, done.output
    rows = [line.split()[0] for line in done.stdout.splitlines()[2:]]
    assert rows == ["linear"] and "defaults to linear" in done.stderr
    done = CliRunner().invoke(app, ["cost", "--model", str(tmp_path), "--gen-len", "4", "--attention", "dense"])
    assert done.exit_code == 0 and "--attention linear gives its cost" in done.stderr


def test_cost_notes_a_model_that_is_not_causal(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
               vocab_size=40).save_pretrained(tmp_path)
    done = CliRunner().invoke(app, ["cost", "--model", str(tmp_path), "--gen-len", "4", "--attention", "dense"])
    assert done.exit_code == 0 and "not a causal language model" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--attention", ""], "--attention expects names among dense, topk, sliding_window, linear, got ''"),
    (["--attention", ","], "--attention expects names among"),
    (["--accelerator", ""], "--accelerator expects names among"),
    (["--kv-bytes", "inf"], "--kv-bytes expects a finite number > 0, got inf"),
    (["--weight-bytes", "inf"], "--weight-bytes expects a finite number >= 0, got inf"),
    (["--kv-bytes", "0"], "--kv-bytes expects a finite number > 0, got 0.0"),
    (["--samples", "0"], "--samples expects comma-separated integers >= 1, got '0'"),
    (["--prompt-len", "-1"], "--prompt-len expects comma-separated integers >= 0"),
    (["--top-k", "-3"], "--top-k expects an integer >= 1, got -3"),
    (["--block-size", "0"], "--block-size expects an integer >= 1"),
    (["--window", "0"], "--window expects an integer >= 1"),
    (["--local", "-1"], "--local expects an integer >= 0"),
    (["--model", "qwen3-9b"], "--model expects a family size among"),
])
def test_cost_bad_values_name_the_flag(args, message, monkeypatch):
    """Checked before any model is read (WALK13 #1, #11, #12)."""
    import attnlab.capture.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    done, lines = run_cost("--model", "smollm2-135m", *args) if args[0] != "--model" else run_cost(*args)
    assert done.exit_code == 2 and len(lines) == 1 and message in lines[0], done.output


def test_cost_out_is_checked_first(tiny, tmp_path, monkeypatch):
    """--out: a folder, a missing folder or an existing file (without --force) fails before the model is read
    and writes nothing; --force overwrites (WALK13 #13)."""
    import attnlab.cost as cost

    monkeypatch.setattr(cost, "model_from_config", lambda *a: pytest.fail("read the model"))
    existing = tmp_path / "old.csv"
    existing.write_text("keep\n")
    for out, message in ((tmp_path, "is a folder"), (tmp_path / "no" / "x.csv", "does not exist"),
                         (existing, "exists; pass --force")):
        done, lines = run_cost("--model", str(tiny[0]), "--out", str(out))
        assert done.exit_code == 2 and len(lines) == 1 and message in lines[0] and "--out" in lines[0], done.output
    assert existing.read_text() == "keep\n" and not (tmp_path / "no").exists()
    monkeypatch.undo()
    done, _ = run_cost("--model", str(tiny[0]), "--gen-len", "4", "--attention", "dense", "--out", str(existing),
                       "--force")
    assert done.exit_code == 0 and existing.read_text().startswith("attention,")


def test_cost_points_a_train_folder_to_its_checkpoint(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "config.json").write_text("{}")
    done, lines = run_cost("--model", str(tmp_path))
    assert done.exit_code == 2 and len(lines) == 1 and f"did you mean {tmp_path / 'checkpoint'}?" in lines[0]


def test_cost_of_an_uncached_hub_id_reads_no_weights(monkeypatch):
    """A hub id is read as a config (config.json only); offline and uncached, that is one line."""
    import attnlab.capture.loading as loading

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded weights"))
    done, lines = run_cost("--model", "no-such-org/no-such-model")
    assert done.exit_code == 1 and len(lines) == 1 and "no-such-org/no-such-model" in lines[0]
