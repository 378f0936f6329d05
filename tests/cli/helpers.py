"""Shared assertions of the CLI tests."""

from __future__ import annotations


def assert_one_line_error(result, code, *fragments):
    """The command exited with ``code`` and printed exactly one ``error:`` line containing every fragment."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def tiny_model_and_text(root, *, name="model", words=200, stride=1):
    """A tiny random Llama saved as the model folder ``root/name`` and ``root/words.txt`` holding ``words`` words
    (word i is ``WORDS[i * stride]``); returns ``(model_folder, text_path)``."""
    from tiny_models import WORDS, save_model_dir, tiny_llama

    text = root / "words.txt"
    text.write_text(" ".join(WORDS[(i * stride) % len(WORDS)] for i in range(words)), encoding="utf-8")
    return save_model_dir(root / name, tiny_llama()), text
