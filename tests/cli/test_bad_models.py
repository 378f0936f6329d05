"""Broken model folders and files: one ``error:`` line on stderr, exit 2, no traceback (issue 10)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from attnlab.cli.main import app
from cli.helpers import assert_one_line_error, tiny_model_and_text

runner = CliRunner()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return tiny_model_and_text(tmp_path_factory.mktemp("bad_models"), name="good")


def _edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(change(config)))


def _without_model_type(folder):
    _edit_config(folder, lambda c: {k: v for k, v in c.items() if k != "model_type"})


def _unknown_model_type(folder):
    _edit_config(folder, lambda c: {**c, "model_type": "no_such_architecture"})


def _json_array(folder):
    (folder / "config.json").write_text("[1, 2, 3]")


def _heads_not_dividing_hidden(folder):
    _edit_config(folder, lambda c: {**c, "num_attention_heads": 5, "num_key_value_heads": 5})


def _corrupt_safetensors(folder):
    (folder / "model.safetensors").write_bytes(os.urandom(4096))


def _no_tokenizer(folder):
    for path in folder.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            path.unlink()


@pytest.mark.parametrize(("breaker", "fragment"), [
    (_without_model_type, "has no model_type"),
    (_unknown_model_type, "'no_such_architecture' is not known"),
    (_json_array, "got a JSON array"),
    (_heads_not_dividing_hidden, "not a multiple of the number of attention heads"),
    (_corrupt_safetensors, "cannot load the model in"),
    (_no_tokenizer, "has no tokenizer"),
], ids=lambda value: getattr(value, "__name__", "")[1:] if callable(value) else None)
@pytest.mark.parametrize("command", ["report", "eval"])
def test_broken_model_folder_is_one_line_exit_2(good, tmp_path, breaker, fragment, command):
    folder, text = good
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    breaker(broken)
    result = runner.invoke(app, [command, "--model", str(broken), "--text", str(text), "--seq-len", "16",
                                 "--max-windows", "1", "--out", str(tmp_path / "out")])
    assert_one_line_error(result, 2, fragment)
    assert not (tmp_path / "out").exists()


def test_fake_gguf_is_one_line_exit_2(good, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(os.urandom(2048))
    result = runner.invoke(app, ["report", "--model", str(fake), "--text", str(good[1]), "--seq-len", "16",
                                 "--out", str(tmp_path / "out")])
    assert_one_line_error(result, 2, str(fake), "GGUF")
