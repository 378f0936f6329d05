"""ImageOverlay: the section primitive that draws a token grid on the run's input image (report/image_overlay.py)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from attnlab.columns import SCHEMA_VERSION
from attnlab.errors import ConfigError
from attnlab.report.image_overlay import draw_overlays, find_image
from attnlab.report.render import render_html
from attnlab.report.sections import ImageOverlay, Section, sections_from_dicts


def _image(path, color=(30, 160, 60), size=(64, 48)):
    Image.new("RGB", size, color).save(path)
    return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "width": size[0],
            "height": size[1]}


def _results(inputs, sections, extras=None):
    return {"schema_version": SCHEMA_VERSION, "command": "probe", "model": {"name": "tiny-vlm", "num_layers": 2},
            "rows": [], "extras": extras or {}, "sections": sections, "inputs": inputs}


def _section_html(html, section_id):
    match = re.search(rf'<section id="{section_id}">(.*?)</section>', html, re.S)
    assert match, f"section {section_id} missing"
    return match.group(1)


def _png(html_part):
    src = re.search(r'src="data:image/png;base64,([^"]+)"', html_part).group(1)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src))).convert("RGB"))


def test_spec_round_trips_through_json_and_lists_become_tuples():
    part = ImageOverlay("mass", 1, 0, [[0.1, 0.2], [None, 0.4]], [[0, 1]], caption="c {x}")
    assert part.grid == ((0.1, 0.2), (None, 0.4)) and part.markers == ((0, 1),)
    data = json.loads(json.dumps(Section("s", "S", (part,)).to_dict()))
    assert sections_from_dicts([data])[0].parts[0] == part


@pytest.mark.parametrize("fields, match", [
    pytest.param({"grid": [[1.0, 2.0], [3.0]]}, "equal length", id="ragged"),
    pytest.param({"grid": [["a"]]}, "ImageOverlay.grid", id="not-numbers"),
    pytest.param({"markers": [[1, 2, 3]]}, "ImageOverlay.markers", id="bad-marker"),
    pytest.param({"top": 0}, "top", id="top-zero"),
    pytest.param({"sequence": "0"}, "ImageOverlay.sequence", id="sequence-str"),
])
def test_bad_specs_are_one_line_config_errors(fields, match):
    data = {"id": "s", "title": "S", "parts": [{"kind": "image_overlay", **fields}]}
    with pytest.raises(ConfigError, match=match) as error:
        sections_from_dicts([data])
    assert "\n" not in str(error.value)


def _one_per_file(count):
    return [{"image": k, "tile": 0} for k in range(count)]


def test_find_image_translates_the_span_index_through_spans():
    images = [{"path": "a"}, {"path": "b"}]
    inputs = [{"sequence": 3, "images": images, "spans": [{"image": 0, "tile": 0}, {"image": 0, "tile": 1},
                                                          {"image": 1, "tile": 0}]},
              {"sequence": 5, "images": [], "spans": []}]
    assert find_image(inputs, 3, 0) == ({"path": "a"}, "")
    assert find_image(inputs, 3, 1) == ({"path": "a"}, "tile 1 of file 0")  # a tile of file 0, not file 1
    assert find_image(inputs, 3, 2) == ({"path": "b"}, "")
    for sequence, span in [(3, 3), (5, 0), (4, 0)]:
        record, note = find_image(inputs, sequence, span)
        assert record is None and note


@pytest.mark.parametrize("entry", [
    pytest.param({"spans": [{"image": None, "tile": None}] * 2}, id="unmapped"),
    pytest.param({"spans": [{"image": 0, "tile": 0}, {"image": 5, "tile": 0}]}, id="file-out-of-range"),
    pytest.param({}, id="no-spans-key"),
])
def test_a_span_without_its_file_is_grey_never_another_file(tmp_path, entry):
    """Two files (green, cyan: colours the colour map lacks); the record is span 1. Without a valid mapping the
    panel shows neither."""
    green, red = _image(tmp_path / "g.png"), _image(tmp_path / "r.png", color=(20, 200, 220))
    extras = {"p": {"grids": [{"sequence": 0, "image_index": 1, "grid": [[None]]}]}}
    part = ImageOverlay(extras="grids", caption="c")
    html = render_html(_results([{"sequence": 0, "images": [green, red], **entry}],
                                {"p": [Section("ov", "Overlay", (part,)).to_dict()]}, extras))
    section = _section_html(html, "ov")
    assert "sequence 0, image 1:" in section
    pixels = _png(section).astype(int)
    cyan = (pixels[..., 2] > pixels[..., 0] + 100) & (pixels[..., 1] > pixels[..., 0] + 100)
    greenish = (pixels[..., 1] > pixels[..., 0] + 60) & (pixels[..., 1] > pixels[..., 2] + 60)
    assert cyan.sum() < 50 and greenish.sum() < 50


def test_a_tile_is_drawn_on_its_own_file(tmp_path):
    green, red = _image(tmp_path / "g.png"), _image(tmp_path / "r.png", color=(20, 200, 220))
    spans = [{"image": 0, "tile": 0}, {"image": 0, "tile": 1}, {"image": 1, "tile": 0}]
    extras = {"p": {"grids": [{"sequence": 0, "image_index": 1, "grid": [[None]]}]}}
    part = ImageOverlay(extras="grids", caption="c")
    html = render_html(_results([{"sequence": 0, "images": [green, red], "spans": spans}],
                                {"p": [Section("ov", "Overlay", (part,)).to_dict()]}, extras))
    section = _section_html(html, "ov")
    assert "tile 1 of file 0" in section
    pixels = _png(section).astype(int)
    greenish = (pixels[..., 1] > pixels[..., 0] + 60) & (pixels[..., 1] > pixels[..., 2] + 60)
    cyan = (pixels[..., 2] > pixels[..., 0] + 100) & (pixels[..., 1] > pixels[..., 0] + 100)
    assert greenish.sum() > 500 and cyan.sum() < 50


def test_a_centre_crop_is_named_and_the_grid_covers_the_crop(tmp_path):
    """A 96 x 48 green picture, cropped to its central 48 x 48: the hot cell hides the middle, the sides stay green."""
    record = {**_image(tmp_path / "g.png", size=(96, 48)), "fed": "center-crop", "crop": [24, 0, 72, 48]}
    part = ImageOverlay("t", 0, 0, [[1.0]], vmin=0.0, vmax=1.0)
    drawn = draw_overlays(part, {}, [{"sequence": 0, "images": [record], "spans": _one_per_file(1)}])
    assert drawn is not None and any("centre-cropped" in note and "crop" in note for note in drawn[1])
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(drawn[0].split(",", 1)[1]))).convert("RGB"))
    greenish = pixels[..., 1].astype(int) > pixels[..., 0].astype(int) + 60
    columns = np.nonzero(greenish.any(axis=0))[0]
    width = columns.max() - columns.min()
    middle = greenish[:, columns.min() + width // 2]
    side = greenish[:, columns.min() + width // 8]
    assert side.sum() > 10 * max(1, middle.sum())


def test_extras_records_draw_one_panel_each_and_missing_files_are_named(tmp_path):
    record = _image(tmp_path / "a.png")
    inputs = [{"sequence": 0, "images": [record, {**record, "path": str(tmp_path / "gone.png")}],
               "spans": _one_per_file(2)}]
    extras = {"p": {"grids": [{"sequence": 0, "image_index": 0, "grid": [[0.0, 1.0]], "markers": [[0, 1]]},
                              {"sequence": 0, "image_index": 1, "grid": [[1.0, 0.0]], "markers": []}]}}
    part = ImageOverlay(extras="grids", title="ignored", caption="two images", label="mass")
    html = render_html(_results(inputs, {"p": [Section("ov", "Overlay", (part,)).to_dict()]}, extras))
    section = _section_html(html, "ov")
    assert "two images" in section and "image not found" in section and "gone.png" in section
    assert section.count("<img") == 1  # one figure, one panel per record


def test_changed_file_is_drawn_and_flagged(tmp_path):
    record = _image(tmp_path / "a.png")
    _image(tmp_path / "a.png", color=(200, 10, 10))
    drawn = draw_overlays(ImageOverlay("t", 0, 0, [[1.0]]), {}, [{"sequence": 0, "images": [record],
                                                                 "spans": _one_per_file(1)}])
    assert drawn is not None and "changed" in drawn[1][0]


def test_nothing_to_draw_leaves_the_part_out():
    part = ImageOverlay(extras="absent")
    assert draw_overlays(part, {}, []) is None
    html = render_html(_results([], {"p": [Section("ov", "Overlay", (part,)).to_dict()]}))
    assert "<img" not in _section_html(html, "ov")
