"""Synthetic scenes and questions of the VLM lab: determinism, exact answers consistent with the rendered image."""

from __future__ import annotations

import numpy as np
import pytest

from attnlab.errors import ConfigError
from attnlab.lab.vlm.data import draw_items, rings
from attnlab.lab.vlm.questions import COUNT_WORDS, KINDS, ask, draw_question, possible_kinds, vocabulary
from attnlab.lab.vlm.scenes import BACKGROUND, COLOURS, POSITION_WORDS, Scene, SceneObject, draw_scene, render


def test_batches_are_a_function_of_seed_split_and_step() -> None:
    a, b = draw_items(3, 5, 16), draw_items(3, 5, 16)
    assert a == b
    assert all(np.array_equal(x.image(), y.image()) for (x, _), (y, _) in zip(a, b))
    assert draw_items(3, 6, 16) != a and draw_items(4, 5, 16) != a and draw_items(3, 5, 16, split="eval") != a


def _pixel(image: np.ndarray, obj: SceneObject, cell: int, dy: float = 0.5, dx: float = 0.5) -> tuple[int, ...]:
    return tuple(int(v) for v in image[int(obj.row * cell + dy * cell), int(obj.col * cell + dx * cell)])


def test_render_puts_each_object_in_its_cell_in_its_colour() -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        scene = draw_scene(rng)
        image = render(scene)
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        occupied = {(o.row, o.col) for o in scene.objects}
        for obj in scene.objects:
            assert _pixel(image, obj, scene.cell) == COLOURS[obj.colour]  # the centre of the cell
        for row in range(3):
            for col in range(3):
                block = image[row * 32:(row + 1) * 32, col * 32:(col + 1) * 32].reshape(-1, 3)
                colours = {tuple(int(v) for v in p) for p in block}
                if (row, col) not in occupied:
                    assert colours == {BACKGROUND}


def test_shapes_differ_where_they_should() -> None:
    cell = 32
    square, circle, triangle = (Scene((SceneObject(s, "red", 0, 0),)) for s in ("square", "circle", "triangle"))
    corner = (0.15, 0.15)  # inside the square's box, outside the circle and the triangle
    assert _pixel(render(square), square.objects[0], cell, *corner) == COLOURS["red"]
    assert _pixel(render(circle), circle.objects[0], cell, *corner) == BACKGROUND
    assert _pixel(render(triangle), triangle.objects[0], cell, *corner) == BACKGROUND
    bottom_corner = (0.85, 0.15)  # the triangle's base corner, outside the circle
    assert _pixel(render(triangle), triangle.objects[0], cell, *bottom_corner) == COLOURS["red"]
    assert _pixel(render(circle), circle.objects[0], cell, *bottom_corner) == BACKGROUND


def test_answers_are_exact_and_consistent_with_the_scene() -> None:
    scene = Scene((SceneObject("circle", "red", 0, 0), SceneObject("circle", "blue", 1, 1),
                   SceneObject("square", "green", 2, 2)))
    assert ask(scene, "presence", shape="circle", colour="red").answer == "yes"
    absent = ask(scene, "presence", shape="square", colour="red")
    assert absent.answer == "no" and absent.absent
    assert ask(scene, "count", shape="circle").answer == "two"
    assert ask(scene, "count", shape="triangle").answer == "zero"
    assert ask(scene, "colour", shape="square").answer == "green"
    assert ask(scene, "position", shape="circle", colour="blue").answer == "center"
    assert ask(scene, "position", shape="square", colour="green").text == "where is the green square ?"
    with pytest.raises(ConfigError):
        ask(scene, "colour", shape="circle")  # two circles: no single colour
    assert possible_kinds(scene) == KINDS


def test_drawn_questions_match_an_independent_reading_of_the_scene() -> None:
    words = set(vocabulary())
    for scene, question in draw_items(0, 0, 300):
        assert set(question.text.split()) <= words and question.answer in words
        cells = {(o.row, o.col): o for o in scene.objects}
        if question.kind == "presence":
            _, _, _, colour, shape, _ = question.text.split()
            present = any(o.shape == shape and o.colour == colour for o in cells.values())
            assert question.answer == ("yes" if present else "no") and question.absent == (not present)
        elif question.kind == "count":
            shape = question.text.split()[2][:-1]
            assert question.answer == COUNT_WORDS[sum(o.shape == shape for o in cells.values())]
        elif question.kind == "colour":
            shape = question.text.split()[4]
            (obj,) = [o for o in cells.values() if o.shape == shape]
            assert question.answer == obj.colour
        else:
            _, _, _, colour, shape, _ = question.text.split()
            row, col = divmod(POSITION_WORDS.index(question.answer), 3)
            assert cells[(row, col)].shape == shape and cells[(row, col)].colour == colour


def test_absent_objects_are_adversarial_and_about_half_of_presence_questions() -> None:
    rng = np.random.default_rng(1)
    absent = present = 0
    for _ in range(400):
        scene = draw_scene(rng)
        question = draw_question(scene, rng, ("presence",))
        if question.absent:
            absent += 1
            _, _, _, colour, shape, _ = question.text.split()
            assert scene.count(colour=colour) or scene.count(shape=shape)
        else:
            present += 1
    assert 0.4 < absent / 400 < 0.6


def test_bad_scene_arguments_raise_config_error() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError):
        draw_scene(rng, max_objects=10)
    with pytest.raises(ConfigError):
        draw_scene(rng, colours=("purple",))
    with pytest.raises(ConfigError):
        draw_question(draw_scene(rng), rng, ("size",))


def test_rings_are_concentric() -> None:
    assert rings(6).reshape(6, 6).tolist()[2] == [0, 1, 2, 2, 1, 0]
    assert rings(3).reshape(3, 3).tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
