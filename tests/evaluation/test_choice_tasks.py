"""Choice-task generators (attnlab.evaluation.choice_tasks) on hand-checked examples and a stub tokenizer."""

from __future__ import annotations

import pytest

from attnlab.errors import ConfigError
from attnlab.evaluation import choice_tasks as ct
from attnlab.evaluation.choice_tasks import (CHOICE_TASKS, choice_items, cloze_items, colored_objects_items,
                                             ioi_items, word_counts)


class SplitTokenizer:
    """A stub: one token per whitespace-separated piece, two for each word in ``long`` (a multi-token name)."""

    def __init__(self, long=()):
        self.long = set(long)

    def encode(self, text, add_special_tokens=False):
        out = []
        for piece in text.split():
            out += [hash(piece)] * (2 if piece.strip(",.?") in self.long else 1)
        return out


def test_ioi_templates_filled_by_hand():
    template = ct.IOI_BABA_TEMPLATES[0]
    assert ct._fill(template, ["John", "Mary", "John"], "store", "ring") == \
        "Then, John and Mary went to the store. John gave a ring to"
    assert ct._abba(template) == "Then, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to [A]"
    assert ct._fill(ct._abba(ct.IOI_BABA_TEMPLATES[7]), ["Mary", "John", "John"], "school", "bone") == \
        "When Mary and John got a bone at the school, John decided to give the bone to"


def test_ioi_items_both_orders_abc_corruption_and_single_token_names():
    tokenizer = SplitTokenizer(long=ct.IOI_NAMES[:90])  # only 10 names stay single-token
    items = ioi_items(tokenizer, count=12, seed=3)
    allowed = set(ct.IOI_NAMES[90:])
    assert [item.meta["order"] for item in items] == ["BABA", "ABBA"] * 6
    for item in items:
        io, s = item.meta["io"], item.meta["s"]
        words = item.context.replace(",", " ").replace(".", " ").split()
        assert item.answer == item.meta["io_index"] and item.choices[item.answer] == " " + io
        assert item.choices[1 - item.answer] == " " + s
        assert words.count(io) == 1 and words.count(s) == 2
        first_io, first_s = words.index(io), words.index(s)
        assert (first_s < first_io) == (item.meta["order"] == "BABA")
        assert {io, s} | set(item.meta["corrupted_names"]) <= allowed
        assert len({io, s, *item.meta["corrupted_names"]}) == 5
        corrupted = item.meta["corrupted"].replace(",", " ").replace(".", " ").split()
        assert io not in corrupted and s not in corrupted
        assert len(tokenizer.encode(item.context)) == len(tokenizer.encode(item.meta["corrupted"]))
        assert item.context.endswith(" to")
    assert {item.answer for item in items} == {0, 1}  # the IO's place is drawn, not fixed
    assert ioi_items(tokenizer, count=12, seed=3) == items
    assert ioi_items(tokenizer, count=12, seed=4) != items


def test_ioi_needs_single_token_names():
    with pytest.raises(ConfigError, match="ioi needs >= 5 names"):
        ioi_items(SplitTokenizer(long=ct.IOI_NAMES[:-4]), count=2)


def test_colored_objects_scene_by_hand():
    assert ct._scene("table", ["red", "blue", "green"], ["pen", "mug", "book"], "mug") == \
        "On the table, I see a red pen, a blue mug and a green book. What color is the mug? Answer:"


def test_colored_objects_items_answer_and_rotation():
    tokenizer = SplitTokenizer(long=["magenta", "fuchsia"])
    items = colored_objects_items(tokenizer, count=20, seed=1, num_objects=4)
    for item in items:
        meta = item.meta
        assert item.choices == tuple(" " + c for c in meta["colors"])
        assert len(set(meta["colors"])) == 4 and not {"magenta", "fuchsia"} & set(meta["colors"])
        asked = meta["objects"].index(meta["asked"])
        assert item.answer == asked
        assert f"a {meta['colors'][asked]} {meta['asked']}" in item.context
        new_color = item.choices[meta["corrupted_answer"]].strip()
        assert f"a {new_color} {meta['asked']}" in meta["corrupted"] and meta["corrupted_answer"] != item.answer
        assert sorted(meta["corrupted"].split()) == sorted(item.context.split())
    assert len({item.answer for item in items}) > 1


TEXT = " ".join(
    ["It was a quiet morning when alpha came"] * 12 + ["and then bravo spoke"] * 10 + ["until charlie left"] * 8
    + ["so delta waited"] * 6 + ["while echo slept"] * 5 + ["Alpha Golf"] * 9)


def test_word_counts_ignore_capitalised_words():
    counts = word_counts(TEXT)
    assert counts["alpha"] == 12 and counts["bravo"] == 10 and "golf" not in counts and counts["quiet"] == 12


def test_cloze_items_on_a_small_text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    tokenizer = SplitTokenizer()
    items = cloze_items(tokenizer, text=path, count=20, num_choices=3, seed=0, context_tokens=6, min_count=5)
    counts = word_counts(TEXT)
    ranked = sorted((w for w, c in counts.items() if c >= 5 and len(w) >= 4), key=lambda w: (-counts[w], w))
    for item in items:
        word, offset = item.meta["word"], item.meta["offset"]
        assert TEXT[offset:offset + len(word)] == word and TEXT[offset - 1] == " "
        assert TEXT[:offset - 1].endswith(item.context) and TEXT[offset - 2 - len(item.context)] == " "
        assert len(tokenizer.encode(item.context)) <= 6
        before = TEXT[:offset - 2 - len(item.context)].rsplit(" ", 1)[-1]  # the word the trim dropped last
        assert len(tokenizer.encode(before + " " + item.context)) > 6
        assert item.choices[item.answer] == " " + word
        choice_ranks = [ranked.index(c.strip()) for c in item.choices]
        assert max(choice_ranks) - min(choice_ranks) <= 4  # the 2·(3-1) rank neighbours at most
        assert item.meta["choice_counts"] == [counts[c.strip()] for c in item.choices]
    assert cloze_items(tokenizer, text=path, count=20, num_choices=3, seed=0, context_tokens=6) == items
    with pytest.raises(ConfigError, match="cloze positions"):
        cloze_items(tokenizer, text=path, count=10_000, context_tokens=6)
    with pytest.raises(ConfigError, match="num_choices must be an integer >= 2"):
        cloze_items(tokenizer, text=path, num_choices=1)


def test_choice_items_names_and_files(tmp_path, caplog):
    from attnlab.evaluation.config import CHOICE_TASK_NAMES

    assert tuple(CHOICE_TASKS) == CHOICE_TASK_NAMES == ("cloze", "ioi", "colored_objects")
    assert len(choice_items("ioi", SplitTokenizer(), count=3)) == 3
    path = tmp_path / "t.jsonl"
    path.write_text('{"context": "Q", "choices": [" a", " b"], "answer": 0}\n' * 5, encoding="utf-8")
    assert len(choice_items(str(path), SplitTokenizer())) == 5  # a file is read whole by default…
    assert not caplog.records
    assert len(choice_items(str(path), SplitTokenizer(), count=2)) == 2  # …and a cut one says so
    assert "has 5 items; scoring the first 2" in caplog.text
    assert len(choice_items("ioi", SplitTokenizer())) == 64  # a generator's default count
    with pytest.raises(ConfigError, match="Did you mean: ioi"):
        choice_items("iio", SplitTokenizer())


@pytest.mark.slow
def test_generators_on_the_smollm2_tokenizer():
    from attnlab.capture.loading import load_tokenizer

    tokenizer, _ = load_tokenizer("smollm2-135m")
    for task in ("ioi", "colored_objects"):
        for item in CHOICE_TASKS[task](tokenizer, count=16, seed=0):
            ids = tokenizer.encode(item.context, add_special_tokens=False)
            assert len(ids) == len(tokenizer.encode(item.meta["corrupted"], add_special_tokens=False))
            assert all(len(tokenizer.encode(c, add_special_tokens=False)) == 1 for c in item.choices)
    items = cloze_items(tokenizer, count=8, seed=0)
    assert all(len(tokenizer.encode(item.context, add_special_tokens=False)) <= 48 for item in items)
