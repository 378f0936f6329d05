"""Synthetic scenes, videos and captions of the DiT lab: determinism, masks equal to the drawn pixels, straight-line
motion that extends with more frames, caption encoding, and the evaluation's measures on hand-made pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnlab.errors import ConfigError
from attnlab.lab.dit.evaluate import colour_fidelity, foreground_masks, track_stats
from attnlab.lab.dit.model import tokenize
from attnlab.lab.dit.scenes import (BACKGROUND, COLOURS, DIRECTIONS, SHAPES, SIZE, draw_image_scene, draw_video,
                                    vocabulary)


def test_scenes_are_a_function_of_the_generator() -> None:
    for objects in (1, 2):
        a = draw_image_scene(np.random.default_rng(7), objects=objects)
        b = draw_image_scene(np.random.default_rng(7), objects=objects)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks) and a.caption == b.caption
        c = draw_image_scene(np.random.default_rng(8), objects=objects)
        assert not np.array_equal(a.image, c.image)
    v, w = draw_video(np.random.default_rng(3)), draw_video(np.random.default_rng(3))
    assert np.array_equal(v.image, w.image) and v.caption == w.caption


@given(seed=st.integers(0, 2**32 - 1), objects=st.sampled_from([1, 2]))
def test_masks_are_exactly_the_drawn_pixels(seed: int, objects: int) -> None:
    drawn = draw_image_scene(np.random.default_rng(seed), objects=objects)
    assert drawn.image.shape == (SIZE, SIZE, 3) and drawn.image.dtype == np.uint8
    assert drawn.masks.shape == (objects, SIZE, SIZE) and drawn.masks.dtype == bool
    assert not (drawn.masks[0] & drawn.masks[-1]).any() or objects == 1  # objects never overlap
    painted = (drawn.image != np.array(BACKGROUND, dtype=np.uint8)).any(axis=-1)
    assert np.array_equal(painted, drawn.masks.any(axis=0))
    for obj, mask in zip(drawn.objects, drawn.masks):
        assert mask.sum() > 10
        assert (drawn.image[mask] == np.array(COLOURS[obj.colour], dtype=np.uint8)).all()


def test_captions_name_the_objects_with_stop_words() -> None:
    rng = np.random.default_rng(0)
    one = [draw_image_scene(rng) for _ in range(40)]
    assert {d.caption[0] for d in one} == {"a", "the"}
    assert all(d.caption[1:] == (d.objects[0].colour, d.objects[0].shape) for d in one)
    two = draw_image_scene(rng, objects=2)
    a, b = two.objects
    assert two.caption == ("a", a.colour, a.shape, "and", "a", b.colour, b.shape)
    assert (a.colour, a.shape) != (b.colour, b.shape)
    video = draw_video(rng)
    assert video.caption[-2] == "moving" and video.caption[-1] in DIRECTIONS
    words = set(vocabulary())
    assert {"a", "the", "and"} <= words and set(COLOURS) <= words and set(SHAPES) <= words


def test_video_moves_in_a_straight_line_and_extends_with_more_frames() -> None:
    for seed in range(20):
        short = draw_video(np.random.default_rng(seed), frames=4)
        long = draw_video(np.random.default_rng(seed), frames=12)
        assert short.image.shape == (4, SIZE, SIZE, 3) and long.masks.shape == (1, 12, SIZE, SIZE)
        assert np.array_equal(long.image[:4], short.image) and short.caption == long.caption
        ys, xs = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
        centres = np.array([[xs[m].mean(), ys[m].mean()] for m in long.masks[0]])  # (12, 2)
        dx, dy = DIRECTIONS[long.caption[-1]]
        along = np.diff(centres, axis=0) @ np.array([dx, dy])  # pixel rasterisation: 0 … 2 px per frame
        assert (along >= 0).all() and abs(along.mean() - np.hypot(long.objects[0].dx, long.objects[0].dy)) < 0.2
        frame = np.arange(12)[:, None]
        fit = np.polyfit(np.arange(12), centres, 1)  # (2, 2): slope, intercept per coordinate
        assert np.sqrt(((centres - (fit[0] * frame + fit[1])) ** 2).sum(axis=1).mean()) < 0.5
        assert long.masks[0].any(axis=(1, 2)).all()  # the object stays inside


def test_bad_scene_settings_are_config_errors() -> None:
    rng = np.random.default_rng(0)
    for bad in (0, 3):
        with pytest.raises(ConfigError, match="objects"):
            draw_image_scene(rng, objects=bad)
    for bad in (0, 17, 2.5, True):
        with pytest.raises(ConfigError, match="frames"):
            draw_video(rng, frames=bad)


def test_tokenize_pads_marks_words_and_null() -> None:
    ids, keep = tokenize(["a red circle", "", ("the", "blue", "square", "and", "a", "green", "triangle")], 8)
    vocab = vocabulary()
    assert ids.shape == keep.shape == (3, 8) and ids.dtype == torch.int64 and keep.dtype == torch.bool
    assert [vocab[i] for i in ids[0, :3]] == ["a", "red", "circle"] and (ids[0, 3:] == 0).all()
    assert keep[0].tolist() == [True] * 3 + [False] * 5
    assert vocab[int(ids[1, 0])] == "<null>" and keep[1].tolist() == [True] + [False] * 7
    assert keep[2].sum() == 7
    with pytest.raises(ConfigError, match="unknown caption word 'pink'"):
        tokenize(["a pink circle"], 8)
    with pytest.raises(ConfigError, match="unknown caption word '<pad>'"):
        tokenize(["a <pad>"], 8)
    with pytest.raises(ConfigError, match="at most 2"):
        tokenize(["a red circle"], 2)
    with pytest.raises(ConfigError):
        tokenize([], 8)


def test_colour_fidelity_and_foreground_on_a_hand_made_image() -> None:
    image = torch.ones(1, 3, 4, 4)  # white
    red, blue = torch.tensor(COLOURS["red"]) / 255, torch.tensor(COLOURS["blue"]) / 255
    image[0, :, 0, 0] = image[0, :, 0, 1] = image[0, :, 1, 0] = red
    image[0, :, 1, 1] = blue
    image[0, :, 3, 3] = 0.9  # light grey: background, darkness 0.1
    masks = foreground_masks(image)
    assert masks[0].nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    scores = colour_fidelity(image, masks, ["red"])
    assert scores["colour_fidelity"] == pytest.approx(0.75)
    expected_error = float((blue - red).norm()) / 4 / 3 ** 0.5
    assert scores["colour_error"] == pytest.approx(expected_error, rel=1e-5)
    assert scores["background_error"] == pytest.approx(0.1 / 12, rel=1e-4)
    assert scores["foreground_area"] == pytest.approx(4 / 16)
    with pytest.raises(ConfigError):
        colour_fidelity(image, masks, ["red", "blue"])


def test_track_stats_of_a_pixel_moving_right_and_one_jumping() -> None:
    masks = torch.zeros(2, 6, 8, 8, dtype=torch.bool)
    for f in range(6):
        masks[0, f, 3, 1 + f] = True  # straight right at 1 px per frame
        masks[1, f, 1 + (f % 2) * 4, 2] = True  # jumps up and down
    scores = track_stats(masks[:1], ["right"])
    assert scores["track_rmse"] == pytest.approx(0, abs=1e-5) and scores["speed"] == pytest.approx(1, rel=1e-5)
    assert scores["direction_accuracy"] == 1 and scores["track_found"] == 1
    assert track_stats(masks[:1], ["left"])["direction_accuracy"] == 0
    jumping = track_stats(masks[1:], ["down"])
    assert jumping["track_rmse"] > 1.5
