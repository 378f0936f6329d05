"""The attention-pattern viewer in headless chromium: click a token in the real report, read the weights back.

The report honours a URL fragment ``#pattern=LAYER.HEAD&token=POSITION&mode=row|column`` by dispatching a real
``click`` event on the token's span (the same handler a mouse click runs), so ``chromium --dump-dom`` of that URL
shows the DOM after the click: every token span's ``data-weight`` and classes, and the readout. Skipped when
chromium is not installed.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import numpy as np
import pytest
from report.pattern_data import make_patterns
from report.test_browser import CHROMIUM, _chromium, _console_lines

from attnlab.report.io import write_results

pytestmark = pytest.mark.browser

ACCENT = np.array([31, 95, 174])  # the viewer's shade at full weight: rgba(31, 95, 174, 1)


class _Viewer(HTMLParser):
    """Collects the token spans of the viewer (attributes), the text of its readout and the legend's maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[dict[str, str | None]] = []
        self.readout, self.controls_hidden, self._in_readout = "", None, False
        self.legend_max, self._in_legend = "", False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if tag == "span" and "pt" in classes:
            self.spans.append(attributes)
        if attributes.get("id") == "pattern-readout":
            self._in_readout = True
        self._in_legend = attributes.get("id") == "pattern-legend-max"
        if "pattern-controls" in classes:
            self.controls_hidden = "hidden" in attributes

    def handle_endtag(self, tag: str) -> None:
        if tag == "p":
            self._in_readout = False
        self._in_legend = False

    def handle_data(self, data: str) -> None:
        if self._in_readout:
            self.readout += data
        if self._in_legend:
            self.legend_max += data


@pytest.fixture
def patterns():
    return make_patterns(num_tokens=12, heads=((1, 2), (0, 3)))


@pytest.fixture
def report(tmp_path, patterns):
    """report.html of a results dict with no probe rows (the viewer near the top) and the ``patterns`` above."""
    results = {"schema_version": 2, "command": "report", "model": {"name": "m", "num_layers": 2}, "rows": [],
               "patterns": patterns}
    return write_results(tmp_path / "run", results)["html"].resolve()


def _click(tmp_path, report, fragment: str) -> _Viewer:
    result = _chromium(tmp_path, f"{report.as_uri()}#{fragment}", "--virtual-time-budget=3000", "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    assert _console_lines(result.stderr) == []  # the CSP let the viewer's script run, and it threw nothing
    assert not re.search(r"<script[^>]*\ssrc\s*=", result.stdout, re.I)
    viewer = _Viewer()
    viewer.feed(result.stdout)
    return viewer


def _weights(viewer: _Viewer) -> list[float | None]:
    return [None if span.get("data-weight") is None else float(span["data-weight"]) for span in viewer.spans]


def test_clicking_a_token_shades_what_it_attends_to(tmp_path, report, patterns):
    viewer = _click(tmp_path, report, "pattern=0.3&token=5")
    probs = patterns["heads"][1]["probs"]  # head 0.3 is the second in the list
    assert len(viewer.spans) == 12 and viewer.controls_hidden is False
    assert _weights(viewer) == [pytest.approx(p, abs=5e-5) for p in probs[5]] + [None] * 6  # causal: keys ≤ 5
    assert [span["data-pos"] for span in viewer.spans if "sel" in span["class"].split()] == ["5"]
    assert all("masked" in span["class"].split() for span in viewer.spans[6:])
    assert viewer.spans[5]["aria-pressed"] == "true" and viewer.spans[4]["aria-pressed"] == "false"
    best = int(np.argmax(probs[5]))
    assert "rgb(31, 95, 174)" in viewer.spans[best]["style"]  # the largest weight gets the full shade
    assert f"weight {probs[5][best]:.4f}" in viewer.spans[best]["title"]
    top = sorted(range(6), key=lambda k: (-probs[5][k], k))[:5]
    assert viewer.readout.startswith("token ' Citizen' @5 attends to: ")
    assert re.findall(r"@(\d+) (\d\.\d{4})", viewer.readout.split("attends to:")[1]) == [
        (str(k), f"{probs[5][k]:.4f}") for k in top]
    assert viewer.legend_max == f"{probs[5][best]:.4f}"  # the legend's full shade is the largest weight shown


def test_readout_leaves_out_zero_weights_and_glyphs_stay_visible_when_shaded(tmp_path, patterns):
    """Walkthrough: the top-5 readout listed zero weights; the magenta newline glyph vanished on dark shading."""
    heads = patterns["heads"]
    heads[1]["probs"][5] = [0.0, 0.0, 0.0, 0.1, 0.9, 0.0]  # head 0.3, query 5: key 4 is "\n" (a control glyph)
    heads[0]["probs"][11][11] = 0.0  # head 1.2: nobody attends to the last token
    results = {"schema_version": 2, "command": "report", "model": {"name": "m"}, "rows": [], "patterns": patterns}
    report = write_results(tmp_path / "run", results)["html"].resolve()
    viewer = _click(tmp_path, report, "pattern=0.3&token=5")
    assert viewer.readout == "token ' Citizen' @5 attends to: '↵' @4 0.9000, ' &amp;' @3 0.1000"
    assert "dark" in viewer.spans[4]["class"].split() and "dark" not in viewer.spans[3]["class"].split()
    assert viewer.legend_max == "0.9000"
    viewer = _click(tmp_path, report, "pattern=1.2&token=11&mode=column")
    assert viewer.readout == "token ' further' @11 is attended to by: nothing else"


def test_an_unknown_head_in_the_link_is_named_in_the_readout(tmp_path, report):
    viewer = _click(tmp_path, report, "pattern=5.5&token=5")
    assert viewer.readout.startswith("no head 5.5 in this report; showing 1.2. token ' Citizen' @5 attends to: ")
    viewer = _click(tmp_path, report, "pattern=1.2&token=5")
    assert viewer.readout.startswith("token ' Citizen' @5 attends to: ")


def test_column_mode_shades_what_attends_to_the_token(tmp_path, report, patterns):
    viewer = _click(tmp_path, report, "pattern=1.2&token=3&mode=column")
    probs = patterns["heads"][0]["probs"]
    expected = [None] * 3 + [pytest.approx(probs[query][3], abs=5e-5) for query in range(3, 12)]
    assert _weights(viewer) == expected  # causal: only queries ≥ 3 see key 3
    assert "is attended to by: " in viewer.readout


def test_bidirectional_patterns_have_no_masked_tokens(tmp_path):
    patterns = make_patterns(num_tokens=6, heads=((0, 0),), causal=False)
    results = {"schema_version": 2, "command": "report", "model": {"name": "m"}, "rows": [], "patterns": patterns}
    report = write_results(tmp_path / "run", results)["html"].resolve()
    viewer = _click(tmp_path, report, "token=1")  # no pattern= : the first head
    assert _weights(viewer) == [pytest.approx(p, abs=5e-5) for p in patterns["heads"][0]["probs"][1]]


def test_without_a_click_nothing_is_shaded(tmp_path, report):
    viewer = _click(tmp_path, report, "nothing")
    assert _weights(viewer) == [None] * 12 and viewer.readout == "Click or hover a token."


@pytest.mark.parametrize("fragment", ["pattern=0.3&token=", "token=x", "token=99"])
def test_an_empty_or_unknown_token_in_the_link_pins_nothing(tmp_path, report, fragment):
    """``#token=`` is not token 0 (``Number("")`` is 0 in JavaScript); nothing is pinned or shaded, and every
    tooltip is the one the page was written with (the script writes the same text)."""
    written = _Viewer()
    written.feed(report.read_text(encoding="utf-8"))
    viewer = _click(tmp_path, report, fragment)
    assert _weights(viewer) == [None] * 12 and viewer.readout == "Click or hover a token."
    assert not any("sel" in span["class"].split() for span in viewer.spans)
    assert [span["title"] for span in viewer.spans] == [span["title"] for span in written.spans]


def test_a_script_that_does_not_match_the_hash_is_blocked(tmp_path, report):
    """Negative control: the CSP is enforced, and only the hash lets the viewer run."""
    html = report.read_text(encoding="utf-8")
    report.write_text(html.replace('"use strict";', '"use strict"; ', 1), encoding="utf-8")
    result = _chromium(tmp_path, f"{report.as_uri()}#token=5", "--virtual-time-budget=3000", "--dump-dom")
    assert any("Content Security Policy" in line for line in _console_lines(result.stderr)), result.stderr[-2000:]
    viewer = _Viewer()
    viewer.feed(result.stdout)
    assert _weights(viewer) == [None] * 12 and viewer.controls_hidden is True


def _accent_pixels(path) -> int:
    from matplotlib.image import imread

    pixels = np.round(imread(path)[..., :3] * 255)
    return int((np.abs(pixels - ACCENT).max(axis=-1) <= 2).sum())


def test_screenshot_shows_the_shaded_tokens(tmp_path, report):
    """The pinned token's strongest key is painted in the full accent colour (a window tall enough not to scroll:
    headless screenshots of a scrolled page come out blank)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    shots = {}
    for name, fragment in (("plain", ""), ("clicked", "#pattern=0.3&token=5")):
        shots[name] = tmp_path / f"{name}.png"
        result = _chromium(tmp_path, report.as_uri() + fragment, "--virtual-time-budget=3000", "--hide-scrollbars",
                           "--window-size=1000,1400", f"--screenshot={shots[name]}")
        assert result.returncode == 0, result.stderr[-2000:]
    assert _accent_pixels(shots["clicked"]) - _accent_pixels(shots["plain"]) > 150
