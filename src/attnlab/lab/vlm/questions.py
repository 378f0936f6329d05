"""Questions about a synthetic scene with exact one-word answers: presence, colour, count, position.

| kind | text | answer | asked when |
|---|---|---|---|
| ``presence`` | ``is there a red circle ?`` | ``yes`` / ``no`` | always; half the questions name an object that is absent |
| ``colour`` | ``what colour is the circle ?`` | a colour | some shape occurs exactly once |
| ``count`` | ``how many circles are there ?`` | ``zero`` … ``nine`` | always (any shape, present or not) |
| ``position`` | ``where is the red circle ?`` | a cell word (``top-left`` … ``bottom-right``) | some (colour, shape) occurs exactly once (3 × 3 grids) |

Absent objects in presence questions are chosen like POPE's "adversarial" split: a (colour, shape) pair that is
not in the scene but shares its colour or its shape with an object that is (any absent pair when none does). The
share of ``yes`` answers to those questions is the model's hallucination rate (:mod:`attnlab.lab.vlm.evaluate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attnlab.errors import ConfigError
from attnlab.lab.vlm.scenes import COLOURS, POSITION_WORDS, SHAPES, Scene

__all__ = ["COUNT_WORDS", "KINDS", "Question", "ask", "draw_question", "possible_kinds", "vocabulary"]

KINDS: tuple[str, ...] = ("presence", "colour", "count", "position")
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLURAL = {shape: shape + "s" for shape in SHAPES}


@dataclass(frozen=True)
class Question:
    """One question: its kind, its words (``text``, space-separated, ending with ``?``), the exact one-word
    ``answer``, and ``absent`` = True for a presence question about an object not in the scene."""

    kind: str
    text: str
    answer: str
    absent: bool = False


def vocabulary() -> tuple[str, ...]:
    """Every word a question or an answer uses, in a fixed order (the tokenizer's word ids follow it)."""
    words = ["is", "there", "a", "what", "colour", "the", "how", "many", "are", "where", "?", "yes", "no",
             *COLOURS, *SHAPES, *PLURAL.values(), *COUNT_WORDS, *POSITION_WORDS]
    return tuple(dict.fromkeys(words))


def possible_kinds(scene: Scene) -> tuple[str, ...]:
    """The kinds :func:`draw_question` can ask about ``scene`` (colour needs a unique shape, position a unique
    (colour, shape) on a 3 × 3 grid)."""
    kinds = ["presence", "count"]
    if any(scene.count(shape=s) == 1 for s in SHAPES):
        kinds.insert(1, "colour")
    if scene.grid == 3 and any(scene.count(shape=o.shape, colour=o.colour) == 1 for o in scene.objects):
        kinds.append("position")
    return tuple(k for k in KINDS if k in kinds)


def ask(scene: Scene, kind: str, *, shape: str, colour: str | None = None) -> Question:
    """The question of ``kind`` about ``shape`` (and ``colour`` for presence/position) with its exact answer.

    Raises ConfigError for an unknown kind, shape or colour, a colour question whose shape does not occur exactly
    once, or a position question whose object does not occur exactly once (or a grid other than 3 × 3).
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown question kind {kind!r}; expected one of {', '.join(KINDS)}")
    if shape not in SHAPES or (colour is not None and colour not in COLOURS):
        raise ConfigError(f"unknown shape {shape!r} or colour {colour!r}")
    if kind == "presence":
        if colour is None:
            raise ConfigError("a presence question needs a colour")
        present = scene.count(shape=shape, colour=colour) > 0
        return Question(kind, f"is there a {colour} {shape} ?", "yes" if present else "no", absent=not present)
    if kind == "count":
        return Question(kind, f"how many {PLURAL[shape]} are there ?", COUNT_WORDS[scene.count(shape=shape)])
    if kind == "colour":
        matches = [o for o in scene.objects if o.shape == shape]
        if len(matches) != 1:
            raise ConfigError(f"a colour question needs exactly one {shape}, the scene has {len(matches)}")
        return Question(kind, f"what colour is the {shape} ?", matches[0].colour)
    matches = [o for o in scene.objects if o.shape == shape and o.colour == colour]
    if len(matches) != 1 or scene.grid != 3:
        raise ConfigError(f"a position question needs exactly one {colour} {shape} on a 3 x 3 grid, the scene has "
                          f"{len(matches)} on a {scene.grid} x {scene.grid} grid")
    return Question(kind, f"where is the {colour} {shape} ?", POSITION_WORDS[3 * matches[0].row + matches[0].col])


def draw_question(scene: Scene, rng: np.random.Generator, kinds: Sequence[str] | None = None,
                  absent_fraction: float = 0.5) -> Question:
    """A random question about ``scene``: its kind uniform among ``kinds`` (default all) that the scene allows,
    then its subject uniform among the valid ones. A presence question names an absent object with probability
    ``absent_fraction`` (adversarial choice, see the module doc), otherwise an object of the scene.

    Raises ConfigError when no kind of ``kinds`` can be asked about the scene, or an unknown kind is given.
    """
    wanted = tuple(KINDS if kinds is None else kinds)
    if any(k not in KINDS for k in wanted):
        raise ConfigError(f"unknown question kinds {list(wanted)}; expected some of {', '.join(KINDS)}")
    allowed = [k for k in possible_kinds(scene) if k in wanted]
    if not allowed:
        raise ConfigError(f"none of the kinds {list(wanted)} can be asked about this scene")
    kind = allowed[int(rng.integers(len(allowed)))]
    if kind == "count":
        return ask(scene, kind, shape=SHAPES[int(rng.integers(len(SHAPES)))])
    if kind == "colour":
        shapes = [s for s in SHAPES if scene.count(shape=s) == 1]
        return ask(scene, kind, shape=shapes[int(rng.integers(len(shapes)))])
    if kind == "position":
        unique = [o for o in scene.objects if scene.count(shape=o.shape, colour=o.colour) == 1]
        obj = unique[int(rng.integers(len(unique)))]
        return ask(scene, kind, shape=obj.shape, colour=obj.colour)
    absent = [(c, s) for c in COLOURS for s in SHAPES if scene.count(shape=s, colour=c) == 0]
    if not absent or not scene.objects or rng.random() >= absent_fraction:
        if not scene.objects:  # an empty board: only absent objects exist
            colour, shape = absent[int(rng.integers(len(absent)))]
            return ask(scene, kind, shape=shape, colour=colour)
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        return ask(scene, kind, shape=obj.shape, colour=obj.colour)
    near = [(c, s) for c, s in absent if scene.count(colour=c) or scene.count(shape=s)]
    colour, shape = (near or absent)[int(rng.integers(len(near or absent)))]
    return ask(scene, kind, shape=shape, colour=colour)
