"""Generators of multiple-choice items (:class:`~attnlab.evaluation.choice.ChoiceItem`): cloze, IOI, Colored Objects.

Each generator is deterministic given its ``seed`` (``random.Random(seed)``) and the tokenizer, and returns
``count`` items. Choices carry their leading space (``" Mary"``), the context none at its end.

- ``cloze``: a masked word at the end of a corpus passage (LAMBADA-like, from local text): the passage is the text
  before a lowercase word of >= ``min_length`` letters preceded by a space, trimmed from the left at a word
  boundary to at most ``context_tokens`` tokens; distractors are frequency-matched: the ``num_choices - 1`` are
  drawn from the ``2·(num_choices - 1)`` eligible words nearest the answer in rank of their counts (eligible: all
  lowercase, >= ``min_length`` letters, seen lowercase >= ``min_count`` times; :func:`word_counts`).
- ``ioi``: Wang et al. 2022, "Interpretability in the Wild" (IOI), Figure 14 / their ``ioi_dataset.py``: the
  15 templates, names, places and objects, both orders (BABA and ABBA, alternating); choices ``(IO, S)``, answer
  0. ``meta["corrupted"]``: the ABC corruption (IO, S1 and S2 replaced by three other names, as their ABC
  dataset), same number of tokens. Names are kept only if single-token (with a leading space) under the tokenizer.
- ``colored_objects``: the BIG-bench ``reasoning_about_colored_objects`` form ("On the table, I see a red pen, a
  blue mug and a green book. What color is the mug? Answer:"), choices = the scene's colours in order (single
  tokens under the tokenizer). ``meta["corrupted"]``: the same scene with the colours rotated by one object (same
  tokens, other order), so the asked object's colour changes; ``meta["corrupted_answer"]`` is its index. Used by
  Merullo et al. 2024 (METHODS.md #18) next to IOI; their exact prompts are not reproduced (low confidence).
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from attnlab.errors import ConfigError, TextError
from attnlab.evaluation.choice import ChoiceItem

logger = logging.getLogger(__name__)

DEFAULT_COUNT = 64  # items a generator makes when no count is given

# Wang et al. 2022, ioi_dataset.py (Redwood's Easy-Transformer): the 100 names, places, objects, BABA templates.
IOI_NAMES = (
    "Michael Christopher Jessica Matthew Ashley Jennifer Joshua Amanda Daniel David James Robert John Joseph Andrew "
    "Ryan Brandon Jason Justin Sarah William Jonathan Stephanie Brian Nicole Nicholas Anthony Heather Eric Elizabeth "
    "Adam Megan Melissa Kevin Steven Thomas Timothy Christina Kyle Rachel Laura Lauren Amber Brittany Danielle "
    "Richard Kimberly Jeffrey Amy Crystal Michelle Tiffany Jeremy Benjamin Mark Emily Aaron Charles Rebecca Jacob "
    "Stephen Patrick Sean Erin Jamie Kelly Samantha Nathan Sara Dustin Paul Angela Tyler Scott Katherine Andrea "
    "Gregory Erica Mary Travis Lisa Kenneth Bryan Lindsey Kristen Jose Alexander Jesse Katie Lindsay Shannon "
    "Vanessa Courtney Christine Alicia Cody Allison Bradley Samuel"
).split()
IOI_PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
IOI_OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")
IOI_BABA_TEMPLATES = (  # [B] = subject S, [A] = indirect object IO; the final " [A]" is the answer
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
)

# BIG-bench reasoning_about_colored_objects: colours (those not starting with a vowel, so "a" fits every one and a
# rotation of colours keeps the tokens) and single-word objects from its scenes.
CO_COLORS = ("red", "yellow", "green", "blue", "brown", "magenta", "fuchsia", "mauve", "teal", "turquoise",
             "burgundy", "silver", "gold", "black", "grey", "purple", "pink")
CO_OBJECTS = ("pen", "notebook", "keychain", "mug", "cup", "plate", "booklet", "envelope", "pencil", "crayon",
              "bracelet", "necklace", "jug", "scrunchie", "sunglasses", "paperclip", "textbook", "puzzle")
CO_SURFACES = ("table", "desk", "floor", "nightstand")

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


def _single_tokens(tokenizer: Any, words: tuple[str, ...] | list[str]) -> list[str]:
    """The words that are one token with a leading space (``" Mary"``) under ``tokenizer``."""
    return [w for w in words if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]


def _num_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _check_count(name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def word_counts(text: str) -> Counter[str]:
    """Counts of the all-lowercase words of ``text`` (letters, with inner apostrophes: ``"o'er"`` is one word);
    capitalised occurrences (names, sentence starts) are not counted."""
    return Counter(w for w in _WORD.findall(text) if w.islower())


def _trim_left(tokenizer: Any, passage: str, max_tokens: int) -> str:
    """The longest suffix of ``passage`` that starts a word (after whitespace) and has <= ``max_tokens`` tokens."""
    starts = [0] + [m.end() for m in re.finditer(r"\s+", passage)]
    starts = [s for s in starts if s < len(passage)]
    low, high = 0, len(starts) - 1  # find the smallest k with tokens(passage[starts[k]:]) <= max_tokens
    if _num_tokens(tokenizer, passage[starts[high]:]) > max_tokens:
        raise TextError(f"a single word of the passage has more than {max_tokens} tokens")
    while low < high:
        mid = (low + high) // 2
        if _num_tokens(tokenizer, passage[starts[mid]:]) <= max_tokens:
            high = mid
        else:
            low = mid + 1
    return passage[starts[low]:]


def cloze_items(tokenizer: Any, *, text: str | Path | None = None, count: int = 64, num_choices: int = 4,
                seed: int = 0, context_tokens: int = 48, min_length: int = 4, min_count: int = 5
                ) -> list[ChoiceItem]:
    """Cloze items: a passage of the text and its next word, against frequency-matched distractors.

    Args:
        tokenizer: measures the passage (``encode(text, add_special_tokens=False)``).
        text: a text file (None: the bundled corpus, :func:`attnlab.text.corpus_text`).
        count: items. num_choices: choices per item (>= 2). seed: drawing seed.
        context_tokens: most tokens of a passage (>= 4); it starts at a word boundary.
        min_length: fewest letters of an answer or distractor. min_count: fewest occurrences in the text.

    Returns:
        ``count`` items; ``meta``: ``{"offset": char offset of the answer, "word", "count", "choice_counts"}``.

    Raises:
        ConfigError: bad sizes, or a text with too few eligible words or positions for ``count`` items.
    """
    from attnlab.text import corpus_text, read_text_file

    for name, value, low in (("count", count, 1), ("num_choices", num_choices, 2),
                             ("context_tokens", context_tokens, 4), ("min_length", min_length, 1),
                             ("min_count", min_count, 1)):
        _check_count(name, value, low)
    source = corpus_text() if text is None else read_text_file(text)
    counts = word_counts(source)
    eligible = sorted((w for w, c in counts.items() if c >= min_count and len(w) >= min_length and w.isalpha()),
                      key=lambda w: (-counts[w], w))
    if len(eligible) < 2 * num_choices:
        raise ConfigError(f"the text has {len(eligible)} words of >= {min_length} letters seen >= {min_count} times; "
                          f"cloze needs >= {2 * num_choices}")
    rank = {w: i for i, w in enumerate(eligible)}
    span = context_tokens * 12  # characters read before the answer (then trimmed to context_tokens tokens)
    pattern = re.compile(r"(?<=[^\s] )([a-z]{%d,})(?![A-Za-z'\-])" % min_length)
    positions = [m.start(1) for m in pattern.finditer(source) if m.group(1) in rank and m.start(1) > span]
    if len(positions) < count:
        raise ConfigError(f"the text gives {len(positions)} cloze positions; asked for count={count}")
    rng = random.Random(seed)
    items = []
    for position in sorted(rng.sample(positions, count)):
        word = _WORD.match(source, position).group(0)  # type: ignore[union-attr]
        passage = source[position - span:position - 1]  # without the space before the answer
        context = _trim_left(tokenizer, passage[passage.find(" ") + 1:] if " " in passage else passage,
                             context_tokens)
        r = rank[word]
        near = sorted((k for k in range(max(0, r - 2 * num_choices), min(len(eligible), r + 2 * num_choices + 1))
                       if k != r), key=lambda k: (abs(k - r), k))[:2 * (num_choices - 1)]
        distractors = [eligible[k] for k in rng.sample(near, num_choices - 1)]
        answer = rng.randrange(num_choices)
        words = distractors[:answer] + [word] + distractors[answer:]
        items.append(ChoiceItem(context, tuple(" " + w for w in words), answer,
                                {"offset": position, "word": word, "count": counts[word],
                                 "choice_counts": [counts[w] for w in words]}))
    return items


def _fill(template: str, names: list[str], place: str, obj: str) -> str:
    """Fill [B], [A], [B] (in order of appearance) with ``names`` and the nouns; the final " [A]" is dropped."""
    text = template[:-len(" [A]")].replace("[PLACE]", place).replace("[OBJECT]", obj)
    for name in names:
        text = re.sub(r"\[[AB]\]", name, text, count=1)
    return text


def _abba(template: str) -> str:
    """The ABBA order: the first clause's [B] and [A] swapped (Wang et al.'s ioi_dataset.py)."""
    return template.replace("[B]", "[X]", 1).replace("[A]", "[B]", 1).replace("[X]", "[A]", 1)


def _draw_until(count: int, build: Callable[[int], ChoiceItem | None], what: str) -> list[ChoiceItem]:
    """``count`` items from ``build(number of items so far)`` (None = rejected draw), at most ``50 * count`` draws.

    Raises:
        TextError: ``could not build <what>`` when the draws run out.
    """
    items: list[ChoiceItem] = []
    for _ in range(50 * count):
        item = build(len(items))
        if item is not None:
            items.append(item)
            if len(items) == count:
                return items
    raise TextError(f"could not build {what}")


def ioi_items(tokenizer: Any, *, count: int = 64, seed: int = 0) -> list[ChoiceItem]:
    """Indirect-object-identification items (Wang et al. 2022, §2 and Figure 14); BABA and ABBA alternate.

    Returns:
        ``count`` items with choices ``(" IO", " S")`` or ``(" S", " IO")`` (the order drawn per item from
        ``seed``; ``answer`` = ``meta["io_index"]``, the IO's place); ``meta``: ``{"template": index into
        IOI_BABA_TEMPLATES, "order": "BABA" | "ABBA", "io", "s", "io_index", "place", "object", "corrupted": ABC ctx,
        "corrupted_names": [first-clause names..., S2] as filled}``.

    Raises:
        ConfigError: ``count < 1``, or fewer than 5 of the names are single tokens under ``tokenizer``.
    """
    _check_count("count", count)
    names = _single_tokens(tokenizer, IOI_NAMES)
    if len(names) < 5:
        raise ConfigError(f"ioi needs >= 5 names that are one token with a leading space; this tokenizer has "
                          f"{len(names)}")
    rng = random.Random(seed)

    def build(index_in_list: int) -> ChoiceItem | None:
        order = "BABA" if index_in_list % 2 == 0 else "ABBA"
        index = rng.randrange(len(IOI_BABA_TEMPLATES))
        template = IOI_BABA_TEMPLATES[index] if order == "BABA" else _abba(IOI_BABA_TEMPLATES[index])
        io, s, c1, c2, c3 = rng.sample(names, 5)
        place, obj = rng.choice(IOI_PLACES), rng.choice(IOI_OBJECTS)
        fill = [s, io, s] if order == "BABA" else [io, s, s]
        corrupted_names = [c2, c1, c3] if order == "BABA" else [c1, c2, c3]  # IO → c1, S1 → c2, S2 → c3
        context = _fill(template, fill, place, obj)
        corrupted = _fill(template, corrupted_names, place, obj)
        if _num_tokens(tokenizer, context) != _num_tokens(tokenizer, corrupted):
            return None
        io_index = rng.randrange(2)  # the IO's place among the choices, so ties cannot favour the answer
        choices = (" " + io, " " + s) if io_index == 0 else (" " + s, " " + io)
        return ChoiceItem(context, choices, io_index,
                          {"template": index, "order": order, "io": io, "s": s, "io_index": io_index,
                           "place": place, "object": obj, "corrupted": corrupted,
                           "corrupted_names": corrupted_names})

    return _draw_until(count, build, "IOI items whose corrupted context has the clean one's token count")


def _scene(surface: str, colors: list[str], objects: list[str], asked: str) -> str:
    listed = [f"a {c} {o}" for c, o in zip(colors, objects)]
    listing = ", ".join(listed[:-1]) + " and " + listed[-1]
    return f"On the {surface}, I see {listing}. What color is the {asked}? Answer:"


def colored_objects_items(tokenizer: Any, *, count: int = 64, seed: int = 0, num_objects: int = 3
                          ) -> list[ChoiceItem]:
    """Colored Objects items (BIG-bench ``reasoning_about_colored_objects`` form; module docstring).

    Returns:
        ``count`` items; choices = the scene's colours (``" red"``…), answer = the asked object's place in the
        scene; ``meta``: ``{"surface", "colors", "objects", "asked", "corrupted", "corrupted_answer"}``.

    Raises:
        ConfigError: bad sizes, or fewer colours that are single tokens under ``tokenizer`` than ``num_objects``.
    """
    _check_count("count", count)
    _check_count("num_objects", num_objects, 2)
    colors = _single_tokens(tokenizer, CO_COLORS)
    if len(colors) < num_objects or len(CO_OBJECTS) < num_objects:
        raise ConfigError(f"colored_objects needs >= {num_objects} colours that are one token with a leading "
                          f"space; this tokenizer has {len(colors)}")
    rng = random.Random(seed)

    def build(_: int) -> ChoiceItem | None:
        scene_colors = rng.sample(colors, num_objects)
        objects = rng.sample(CO_OBJECTS, num_objects)
        answer = rng.randrange(num_objects)
        surface = rng.choice(CO_SURFACES)
        context = _scene(surface, scene_colors, objects, objects[answer])
        rotated = scene_colors[1:] + scene_colors[:1]
        corrupted = _scene(surface, rotated, objects, objects[answer])
        if _num_tokens(tokenizer, context) != _num_tokens(tokenizer, corrupted):
            return None
        return ChoiceItem(context, tuple(" " + c for c in scene_colors), answer,
                          {"surface": surface, "colors": scene_colors, "objects": objects,
                           "asked": objects[answer], "corrupted": corrupted,
                           "corrupted_answer": scene_colors.index(rotated[answer])})

    return _draw_until(count, build, "Colored Objects items whose corrupted context keeps the token count")


CHOICE_TASKS: dict[str, Callable[..., list[ChoiceItem]]] = {
    "cloze": cloze_items, "ioi": ioi_items, "colored_objects": colored_objects_items,
}


def choice_items(task: str, tokenizer: Any, *, count: int | None = None, seed: int = 0,
                 text: str | Path | None = None) -> list[ChoiceItem]:
    """Items of a named task (:data:`CHOICE_TASKS`; ``count`` items, None = 64; ``text`` only for cloze) or of a
    JSONL file (``task`` a path; its first ``count`` items, None = all; a cut file logs a warning).

    Raises:
        ConfigError: an unknown task name that is not an existing file, or a bad file (one line).
    """
    from attnlab.evaluation.choice import load_choice_items

    if task in CHOICE_TASKS:
        kwargs: dict[str, Any] = {"count": DEFAULT_COUNT if count is None else count, "seed": seed}
        if task == "cloze":
            kwargs["text"] = text
        return CHOICE_TASKS[task](tokenizer, **kwargs)
    if not (task.endswith(".jsonl") or task.endswith(".json") or Path(task).is_file()):
        from attnlab.registry import unknown_name_message

        raise ConfigError(unknown_name_message("choice task", task, list(CHOICE_TASKS)) + " (or a JSONL file)")
    items = load_choice_items(task)
    if count is not None and count < len(items):
        logger.warning("%s has %d items; scoring the first %d (--choice-items)", task, len(items), count)
        items = items[:count]
    return items
