"""Model loading from the CLI (issue 12, finding 2): --tokenizer, local paths before hub ids, one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny_models import WORDS, save_model_dir, tiny_llama
from typer.testing import CliRunner

from attnlab.cli.main import app
from cli.helpers import assert_one_line_error

runner = CliRunner()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A complete tiny model folder, the same weights without tokenizer files, and a text."""
    root = tmp_path_factory.mktemp("loading_cli")
    good = save_model_dir(root / "good", tiny_llama())
    bare = root / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(good / name, bare / name)
    text = root / "words.txt"
    text.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(200)), encoding="utf-8")
    return good, bare, text


def _run(command, model, text, out, *extra):
    return runner.invoke(app, [command, "--model", str(model), "--text", str(text), "--seq-len", "16",
                               "--max-windows", "1", "--out", str(out), *extra])


@pytest.mark.parametrize("command", ["report", "eval"])
def test_folder_without_tokenizer_suggests_tokenizer_option(folders, tmp_path, command):
    _, bare, text = folders
    result = _run(command, bare, text, tmp_path / "out")
    assert_one_line_error(result, 2, "has no tokenizer", "--tokenizer")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["report", "probe", "eval"])
def test_tokenizer_option_loads_folder_without_tokenizer(folders, tmp_path, command):
    good, bare, text = folders
    extra = ("--probe", "entropy") if command == "probe" else ()
    result = _run(command, bare, text, tmp_path / "out", "--tokenizer", str(good), *extra)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["config"]["tokenizer"] == str(good)  # replayable from results.json
    assert saved["tokenizer"]["source"] == str(good.resolve()) and saved["tokenizer"]["from_model"] is False
    assert saved["tokenizer"]["name"] == str(good)


def test_config_replays_tokenizer(folders, tmp_path):
    good, bare, text = folders
    assert _run("report", bare, text, tmp_path / "a", "--tokenizer", str(good)).exit_code == 0
    config = json.loads((tmp_path / "a" / "results.json").read_text())["config"]
    import yaml

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["report", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b" / "results.json").read_text())["tokenizer"]["from_model"] is False


def test_relative_path_without_dot_is_local_not_hub(folders, tmp_path, monkeypatch):
    _, _, text = folders
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    result = _run("report", "runs/model", text, tmp_path / "out")
    assert_one_line_error(result, 2, "path runs/model does not exist")
    assert "hub" not in result.output.replace("not a hub id", "")


def test_relative_path_without_dot_loads(folders, tmp_path, monkeypatch):
    good, _, text = folders
    shutil.copytree(good, tmp_path / "runs" / "model")
    monkeypatch.chdir(tmp_path)
    result = _run("report", "runs/model", text, "out")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("tokenizer", "fragment"), [
    ("./no/such/tokenizer", "Tokenizer path ./no/such/tokenizer does not exist"),
    ("EMPTY", "has no tokenizer files"),
    ("BADCONFIG", "cannot load the tokenizer"),
    ("BADJSON", "cannot load the tokenizer"),
    ("TEXTFILE", "not a .gguf file"),
    ("smollm", "Did you mean"),
], ids=["missing", "empty-folder", "config-not-object", "json-not-json", "not-gguf", "unknown-name"])
def test_bad_tokenizer_is_one_line_exit_2(folders, tmp_path, tokenizer, fragment):
    good, bare, text = folders
    if tokenizer == "EMPTY":
        (tmp_path / "empty").mkdir()
        tokenizer = str(tmp_path / "empty")
    elif tokenizer in ("BADCONFIG", "BADJSON"):
        broken = tmp_path / "broken"
        shutil.copytree(good, broken)
        if tokenizer == "BADCONFIG":  # raised AttributeError (a traceback) before issue 12
            (broken / "tokenizer_config.json").write_text("[1]")
        else:
            (broken / "tokenizer.json").write_text("{not json")
        tokenizer = str(broken)
    elif tokenizer == "TEXTFILE":
        (tmp_path / "vocab.txt").write_text("a\nb\n")
        tokenizer = str(tmp_path / "vocab.txt")
    result = _run("report", bare, text, tmp_path / "out", "--tokenizer", tokenizer)
    assert_one_line_error(result, 2, fragment)
    assert not (tmp_path / "out").exists()


def test_broken_tokenizer_config_in_model_folder_is_one_line(folders, tmp_path):
    good, _, text = folders
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    (broken / "tokenizer_config.json").write_text("[1]")
    assert_one_line_error(_run("eval", broken, text, tmp_path / "out"), 2, "cannot load the tokenizer")


@pytest.mark.slow  # loads the bundled tokenizer
def test_tokenizer_larger_than_embedding_is_refused(folders, tmp_path):
    _, bare, text = folders
    result = _run("report", bare, text, tmp_path / "out", "--tokenizer", "smollm2-135m")
    assert_one_line_error(result, 2, "tokens but the model embeds only 97")


def _other_tokenizer():
    """A word-level tokenizer whose ids differ from tiny_tokenizer's (the words in reverse order)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(WORDS))[::-1]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_compare_with_its_own_tokenizer_is_checked_under_tokenizer_option(folders, tmp_path):
    """--tokenizer is for the run's model; a --compare folder with its own, different tokenizer is still refused."""
    good, bare, text = folders
    other = save_model_dir(tmp_path / "other", tiny_llama(seed=1), _other_tokenizer())
    result = _run("probe", bare, text, tmp_path / "out", "--tokenizer", str(good), "--probe", "cka",
                  "--compare", str(other))
    assert_one_line_error(result, 2, f"--compare {other} uses a different tokenizer")
    assert not (tmp_path / "out").exists()


def test_compare_folder_without_tokenizer_takes_tokenizer_option(folders, tmp_path):
    good, bare, text = folders
    result = _run("probe", bare, text, tmp_path / "out", "--tokenizer", str(good), "--probe", "cka",
                  "--compare", str(bare))
    assert result.exit_code == 0, result.output
