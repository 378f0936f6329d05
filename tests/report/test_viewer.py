"""The attention-pattern viewer section (report/viewer.py): present only with ``patterns``, CSP by hash, escaping."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
from html import unescape

import pytest
from report.pattern_data import make_patterns
from typer.testing import CliRunner

from attnlab.config import MAX_PATTERN_HEADS, PATTERN_TOKENS_RANGE
from attnlab.errors import ConfigError
from attnlab.report.io import write_results
from attnlab.report.render import render_html
from attnlab.report.viewer import SCALE, check_patterns

CSP = re.compile(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">')
SCRIPTS = re.compile(r"<script([^>]*)>(.*?)</script>", re.S)


def _executable(html: str) -> list[tuple[str, str]]:
    """(attributes, text) of every <script> element that would run (not a JSON data block)."""
    return [(attrs, text) for attrs, text in SCRIPTS.findall(html) if "application/json" not in attrs]


def _data(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="pattern-data">(.*?)</script>', html, re.S)
    assert match, "no pattern-data block"
    return json.loads(match.group(1))


def _results(patterns: dict | None = None) -> dict:
    """A results dict with no probe rows (nothing to plot, fast to render), optionally with ``patterns``."""
    results = {"schema_version": 2, "command": "report", "model": {"name": "m", "num_layers": 2}, "rows": []}
    return results if patterns is None else {**results, "patterns": patterns}


@pytest.fixture
def with_patterns():
    return _results(make_patterns())


def test_the_full_report_with_patterns_keeps_every_other_section(fake_results):
    plain = render_html(fake_results)
    fake_results["patterns"] = make_patterns()
    html = render_html(fake_results)
    ids = re.findall(r'<section id="([^"]+)">', html)
    assert ids == [i for i in re.findall(r'<section id="([^"]+)">', plain) if i != "tokens" and i != "tables"] + [
        "patterns", "tokens", "tables"]
    without = re.sub(r'<section id="patterns">.*?</section>\n', "", html, flags=re.S)
    without = re.sub(r"script-src [^;]*; ", "", without).replace('<a href="#patterns">Attention patterns</a>', "")
    assert without == plain  # the viewer adds its section, nav link and CSP source, and changes nothing else


def test_no_patterns_no_section_and_no_script(fake_results):
    html = render_html(fake_results)
    assert 'id="patterns"' not in html and 'href="#patterns"' not in html
    assert "<script" not in html.lower()
    assert "script-src" not in CSP.search(html).group(1)


def test_patterns_section_with_its_picker_and_tokens(with_patterns):
    html = render_html(with_patterns)
    assert html.count('<section id="patterns">') == 1 and 'href="#patterns"' in html
    section = re.search(r'<section id="patterns">(.*?)</section>', html, re.S).group(1)
    options = re.findall(r'<option value="(\d+)">(.*?)</option>', section)
    assert [label for _, label in options] == [f"layer {h['layer']} · head {h['head']} — {h['label']}"
                                               for h in with_patterns["patterns"]["heads"]]
    spans = re.findall(r'<span class="tok pt" data-pos="(\d+)"', section)
    assert spans == [str(i) for i in range(len(with_patterns["patterns"]["tokens"]))]
    assert '<span class="ctl">↵</span>' in section  # tokens shown visibly, as in the tokens section
    assert section.index('id="pattern-viewer"') < section.index("<script")  # the script runs after its DOM


def test_csp_allows_exactly_the_inline_viewer_script_by_its_hash(with_patterns):
    html = render_html(with_patterns)
    policy = CSP.search(html).group(1)
    scripts = _executable(html)
    assert len(scripts) == 1
    attrs, text = scripts[0]
    assert attrs == ""  # inline, no src
    digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()
    sources = re.search(r"script-src ([^;]*);", policy).group(1).split()
    assert sources == [f"'sha256-{digest}'"]
    assert policy.startswith("default-src 'none';")
    assert "'unsafe-eval'" not in policy and "http" not in policy
    assert not re.search(r"<script[^>]*\ssrc\s*=", html, re.I)


def test_weights_in_the_page_equal_the_probs(with_patterns):
    data = _data(render_html(with_patterns))
    assert data["scale"] == SCALE and data["causal"] is True
    for head, shown in zip(with_patterns["patterns"]["heads"], data["heads"]):
        assert (shown["layer"], shown["head"]) == (head["layer"], head["head"])
        for row, ints in zip(head["probs"], shown["w"]):
            assert [w / SCALE for w in ints] == pytest.approx(row, abs=1e-9)


def test_a_script_closing_token_cannot_break_out(with_patterns):
    tokens = with_patterns["patterns"]["tokens"]
    assert "</script><b>" in tokens
    html = render_html(with_patterns)
    block = re.search(r'id="pattern-data">(.*?)</script>', html, re.S).group(1)
    assert "<" not in block and ">" not in block and "&" not in block
    assert "\\u003c/script\\u003e\\u003cb\\u003e" in block
    assert _data(html)["tokens"][tokens.index("</script><b>")] == "</script><b>"
    assert _data(html)["tokens"][tokens.index("\n")] == "↵"  # visible, as in the spans
    assert html.lower().count("</script>") == 2  # the data block and the viewer script, nothing else
    assert "<b>" not in html


def test_bidirectional_patterns_have_full_rows():
    patterns = make_patterns(num_tokens=5, causal=False)
    check_patterns(patterns)
    broken = copy.deepcopy(patterns)
    broken["heads"][0]["probs"][1] = broken["heads"][0]["probs"][1][:2]
    with pytest.raises(ConfigError, match=r"probs\[1\] must be a list of 5 weights"):
        check_patterns(broken)


@pytest.mark.parametrize(("change", "match"), [
    pytest.param(lambda p: p["heads"].extend([p["heads"][0]] * MAX_PATTERN_HEADS), "1..16 heads", id="heads"),
    pytest.param(lambda p: p.update(make_patterns(num_tokens=PATTERN_TOKENS_RANGE[1] + 1)), "257 tokens", id="tokens"),
    pytest.param(lambda p: p["heads"][0]["probs"][3].append(0.0), r"probs\[3\] must be a list of 4", id="row"),
    pytest.param(lambda p: p["heads"][0]["probs"][2].__setitem__(0, 1.5), "weights in", id="value"),
    pytest.param(lambda p: p["heads"][1].update(layer="3"), "layer must be", id="layer"),
    pytest.param(lambda p: p.update(tokens=p["tokens"][:-1]), "one row per token", id="rows"),
    # the same bounds as --pattern-tokens (2..256)
    pytest.param(lambda p: p.update(make_patterns(num_tokens=1)), "1 tokens; expected 2..256", id="one-token"),
    # "false" (a string) is not a bool: it must not be read as causal=True
    pytest.param(lambda p: p.update(causal="false"), "'causal' must be true or false, got 'false'", id="causal"),
])
def test_malformed_patterns_are_one_line_config_errors(change, match):
    patterns = make_patterns()
    change(patterns)
    with pytest.raises(ConfigError, match=match) as error:
        render_html(_results(patterns))
    assert "\n" not in str(error.value) and str(error.value).startswith("results 'patterns': ")


def test_bounds_are_accepted_at_the_limit():
    patterns = make_patterns(num_tokens=PATTERN_TOKENS_RANGE[1], heads=tuple((i // 4, i % 4) for i in range(16)))
    html = render_html(_results(patterns))
    assert len(_data(html)["heads"]) == MAX_PATTERN_HEADS
    assert len(html.encode("utf-8")) < 2_500_000  # 16 heads × 256² / 2 weights as integers


def test_attnlab_render_of_a_results_json_with_patterns(tmp_path, with_patterns):
    from attnlab.cli.main import app

    write_results(tmp_path / "run", with_patterns)
    stored = json.loads((tmp_path / "run" / "results.json").read_text(encoding="utf-8"))
    assert stored["patterns"] == with_patterns["patterns"]
    (tmp_path / "run" / "report.html").unlink()
    result = CliRunner().invoke(app, ["render", str(tmp_path / "run" / "results.json")])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert html == render_html(with_patterns) and 'id="patterns"' in html


def test_attnlab_render_refuses_malformed_patterns_in_one_line(tmp_path, with_patterns):
    from attnlab.cli.main import app

    with_patterns["patterns"]["heads"][0]["probs"][0] = [0.5, 0.5]
    (tmp_path / "results.json").write_text(json.dumps(with_patterns), encoding="utf-8")
    result = CliRunner().invoke(app, ["render", str(tmp_path / "results.json")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "probs[0] must be a list of 1 weights" in lines[0], result.output


def test_a_report_with_the_viewer_still_loads_nothing_from_outside(with_patterns):
    html = render_html(with_patterns)
    assert "http://" not in html and "https://" not in html
    assert not re.search(r'(?:src|href)\s*=\s*["\']?\s*(?!data:|#)[a-z]+:', html, re.I)
    assert not re.search(r"\b(?:fetch|XMLHttpRequest|import\(|eval\(|innerHTML)\b", _executable(html)[0][1])


def test_token_tooltips_are_the_ones_the_script_writes(with_patterns):
    """The spans' titles before the script runs are the text viewer.js writes back when nothing is chosen
    (``"position " + k + " · '" + data.tokens[k] + "'"``), also for tokens with quotes, spaces and newlines."""
    patterns = make_patterns(num_tokens=4)
    patterns["tokens"] = ["it's", " a", "\n", '"q"']
    page = render_html(_results(patterns))
    titles = re.findall(r'<span class="tok pt" data-pos="\d+"[^>]* title="([^"]*)"', page)
    assert [unescape(t) for t in titles] == [
        f"position {k} · '{token}'" for k, token in enumerate(_data(page)["tokens"])]


def test_viewer_has_a_colour_legend_and_white_glyphs_on_dark_shading(with_patterns):
    """Walkthrough: no colour legend; control glyphs (magenta ↵) vanished on dark shading."""
    html = render_html(with_patterns)
    section = re.search(r'<section id="patterns">.*?</section>', html, re.S).group(0)
    assert '<span class="pattern-legend-bar"></span> <span id="pattern-legend-max">max</span>' in section
    assert ".pt.dark .ctl { color: inherit; }" in html
