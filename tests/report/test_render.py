"""The HTML report (attnlab.report.render): escaping, sections, self-containment, purity."""

from __future__ import annotations

import base64
import copy
import re

import matplotlib
import pytest

from attnlab.errors import ConfigError
from attnlab.report.render import layer_ranges, render_html, summarise_paths, token_segments

SECTION_IDS = ["run", "sinks", "entropy", "distance", "extreme-tokens", "norms", "tokens", "tables"]


def _section(html: str, section_id: str) -> str:
    match = re.search(rf'<section id="{section_id}">(.*?)</section>', html, re.S)
    assert match, f"section {section_id} missing"
    return match.group(1)


@pytest.fixture(scope="module")
def html(results_factory) -> str:
    """The report of the default fake results, rendered once for the read-only tests of this module."""
    return render_html(results_factory())


def test_every_section_present_with_heading(html):
    assert html.startswith("<!DOCTYPE html>")
    for section_id in SECTION_IDS:
        assert html.count(f'id="{section_id}"') == 1
        assert "<h2>" in _section(html, section_id)
        assert "Not run" not in _section(html, section_id)


def test_malicious_tokens_are_escaped(html):
    assert "<script" not in html.lower()
    assert "alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img src=x>" not in html and "&lt;img src=x&gt;" in html
    assert "&amp;amp;" in html  # the token "&amp;" is shown literally


def test_tokens_shown_visibly(html):
    tokens = _section(html, "tokens")
    assert "↵" in tokens and "→" in tokens and "\\x07" in tokens and "\\u202e" in tokens and "∅" in tokens
    assert "\x07" not in html and "\u202e" not in html
    assert not [c for c in html if ord(c) < 32 and c not in "\n\t"]
    assert re.search(r'title="position 1 · id \d+ · ', tokens)


def test_no_external_resources_and_no_scripts(html):
    assert "http://" not in html and "https://" not in html
    assert not re.search(r'(?:src|href)\s*=\s*["\']?\s*(?!data:|#)[a-z]+:', html, re.I)
    assert re.search(r'<meta http-equiv="Content-Security-Policy" content="default-src \'none\'', html)
    for src in re.findall(r'<img src="([^"]+)"', html):
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_metadata(html):
    run = _section(html, "run")
    for text in ("smollm2-135m", "LlamaForCausalLM", "9f" * 32, "GPT2TokenizerFast", "float32", "cpu",
                 "torch 2.13.0", "2026-11-29T21:00:00+00:00", "blocked_eager: layers 0–2",
                 "BOS token &lt;|im_start|&gt;"):
        assert text in run, text


def test_captions_cite_methods(html):
    assert "Gu et al. 2025" in _section(html, "sinks")
    assert "Yu et al. 2024" in _section(html, "extreme-tokens")
    assert "Guo et al. 2024" in _section(html, "norms")
    assert 'pd.read_csv("results.csv"' in _section(html, "tables").replace("&#34;", '"')


def test_probes_that_did_not_run_have_no_section(fake_results):
    fake_results["rows"] = [row for row in fake_results["rows"] if row["probe"] not in ("distance", "sink")]
    for probe in ("sink", "distance"):
        del fake_results["extras"][probe]
        del fake_results["sections"][probe]
    html = render_html(fake_results)
    for section_id in ("sinks", "distance", "extreme-tokens"):
        assert f'id="{section_id}"' not in html and f'href="#{section_id}"' not in html, section_id
    for section_id in ("entropy", "norms", "tokens"):
        assert "Not run" not in _section(html, section_id), section_id
    assert "Not run" not in html


def test_a_v1_file_renders_its_probes_sections(results_factory):
    html = render_html(results_factory(version=1))
    for section_id in SECTION_IDS:
        assert html.count(f'id="{section_id}"') == 1, section_id
        assert "Not run" not in _section(html, section_id), section_id
    assert "results.json schema 2" in html


def test_minimal_results_render():
    html = render_html({"schema_version": 1, "command": "report", "model": {}, "rows": []})
    for section_id in ("run", "tables"):
        assert f'id="{section_id}"' in html
    for section_id in ("sinks", "entropy", "distance", "extreme-tokens", "norms", "tokens"):  # no data, no section
        assert f'id="{section_id}"' not in html and f'href="#{section_id}"' not in html, section_id
    assert "These results hold no rows." in _section(html, "tables") and "Not run" not in html


def test_render_is_pure(fake_results):
    snapshot = copy.deepcopy(fake_results)
    backend, rc = matplotlib.get_backend(), dict(matplotlib.rcParams)
    first = render_html(fake_results)
    assert render_html(fake_results) == first
    assert fake_results == snapshot or repr(fake_results) == repr(snapshot)  # NaN != NaN
    assert matplotlib.get_backend() == backend and dict(matplotlib.rcParams) == rc


def test_render_rejects_newer_schema(fake_results):
    fake_results["schema_version"] = 99
    with pytest.raises(ConfigError, match="newer"):
        render_html(fake_results)


def test_html_size_for_a_realistic_run(results_factory):
    html = render_html(results_factory(num_layers=30, num_heads=9, num_kv_heads=3, seq_len=256, num_windows=4))
    assert len(html.encode("utf-8")) < 3_000_000
    assert html.count('class="tok"') >= 4 * 256


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        pytest.param("abc", [("abc", False)], id="plain"),
        pytest.param(" a\nb", [(" a", False), ("↵", True), ("b", False)], id="newline"),
        pytest.param("\t\x00\x7f", [("→\\x00\\x7f", True)], id="controls"),
        pytest.param("", [("∅", True)], id="empty"),
        pytest.param("a\u200bb", [("a", False), ("\\u200b", True), ("b", False)], id="zero-width"),
        pytest.param("<&>", [("<&>", False)], id="html-left-to-template"),
    ],
)
def test_token_segments(token, expected):
    assert token_segments(token) == expected


def test_layer_ranges_and_paths():
    assert layer_ranges([0, 1, 2, 5, 7, 8]) == "0–2, 5, 7–8"
    assert layer_ranges([]) == ""
    paths = {"0": "blocked_eager", "1": "blocked_eager", "2": "sdpa", "3": "blocked_eager"}
    assert summarise_paths(paths) == ["blocked_eager: layers 0–1, 3", "sdpa: layer 2"]


def test_run_section_calls_them_attention_paths(fake_results):
    from attnlab.report.render import _run_section

    fake_results["attention_paths"] = {"0": "sdpa", "1": "sdpa", "2": "blocked_eager"}
    run = _run_section(fake_results)
    assert "paths" not in run and run["attention_paths"] == summarise_paths(fake_results["attention_paths"])
    html = render_html(fake_results)
    row = re.search(r'<th scope="row">attention path</th><td>(.*?)</td>', html)
    assert row and "sdpa" in row.group(1) and "blocked_eager" in row.group(1)


def test_a_sweeps_run_table_shows_what_is_known_and_no_placeholders():
    from attnlab.lab.sweep_report import sweep_results

    html = render_html(sweep_results("sweep.toml", [], [], jobs=2, seconds=1.0))
    run = _section(html, "run")
    assert "sweep file sweep.toml" in run and "torch " in run and "attnlab " in run
    assert "— × — (—)" not in run and "BOS policy" not in run and "attention path" not in run
