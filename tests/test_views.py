"""attnlab.pattern_html: the report's pattern viewer as a standalone page for an AttentionPattern (attnlab.views)."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
import torch
from report.test_browser import _chromium, _console_lines
from report.test_viewer_browser import _Viewer, _weights
from tiny_models import WORDS, tiny_llama, tiny_tokenizer

import attnlab
from attnlab.capture.loading import LoadedModel
from attnlab.errors import ConfigError

CSP = re.compile(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">')
SCRIPTS = re.compile(r"<script([^>]*)>(.*?)</script>", re.S)
TEXT = " ".join(WORDS[:10])


@pytest.fixture(scope="module")
def pattern():
    loaded = LoadedModel.wrap(tiny_llama(num_heads=4, num_kv_heads=2), tiny_tokenizer())
    return attnlab.attention_pattern(loaded, [TEXT, " ".join(WORDS[3:6])], layers=[0, 1], heads=[1, 3])


def test_page_holds_the_viewer_with_a_matching_csp_hash(pattern, tmp_path):
    html = attnlab.pattern_html(pattern, path=tmp_path / "sub" / "pattern.html")
    assert (tmp_path / "sub" / "pattern.html").read_text(encoding="utf-8") == html
    assert '<section id="patterns">' in html and 'id="pattern-viewer"' in html and "<nav" not in html
    scripts = [text for attrs, text in SCRIPTS.findall(html) if "application/json" not in attrs]
    assert len(scripts) == 1 and "src=" not in html.split("<main>")[0]
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode("utf-8")).digest()).decode("ascii")
    policy = CSP.search(html).group(1)
    assert f"script-src 'sha256-{digest}'" in policy and "default-src 'none'" in policy
    labels = re.findall(r'<option value="\d+">([^<]*)</option>', html)
    assert labels == ["layer 0 · head 1", "layer 0 · head 3", "layer 1 · head 1", "layer 1 · head 3"]
    assert "on 10 tokens" in html and "window" not in html.split('class="caption"')[1].split("</p>")[0]
    assert len(re.findall(r'class="tok pt"', html)) == 10


def test_heads_batch_and_limits(pattern):
    html = attnlab.pattern_html(pattern, heads="1.3,0.1", batch=1)
    assert re.findall(r'<option value="\d+">([^<]*)</option>', html) == ["layer 1 · head 3", "layer 0 · head 1"]
    assert len(re.findall(r'class="tok pt"', html)) == 3  # batch row 1's real tokens, padding dropped
    assert attnlab.pattern_html(pattern, heads=[(0, 3)]).count("<option ") == 1
    for kwargs, message in (({"heads": [(0, 2)]}, "head 2 was not recorded"),
                            ({"heads": [3]}, r"heads must be \(layer, head\) pairs"),
                            ({"heads": []}, r"shows 1\.\.16 heads, got 0"),
                            ({"batch": 2}, r"batch must be in 0\.\.1, got 2")):
        with pytest.raises(ConfigError, match=message) as info:
            attnlab.pattern_html(pattern, **kwargs)
        assert "\n" not in str(info.value)


def test_too_many_heads_or_tokens_are_refused_in_one_line():
    model = tiny_llama(num_heads=4, num_kv_heads=2, layers=5)
    with pytest.raises(ConfigError, match=r"shows 1\.\.16 heads, got 20: choose some with heads="):
        attnlab.pattern_html(attnlab.attention_pattern(model, list(range(3, 8))))
    long = attnlab.attention_pattern(model, [[4] * 257], layers=0, heads=0)
    with pytest.raises(ConfigError, match=r"shows 2\.\.256 tokens, batch row 0 has 257: .* fewer tokens$"):
        attnlab.pattern_html(long)
    short = attnlab.pattern_html(attnlab.attention_pattern(model, [5, 6, 7], layers=0, heads=0))
    assert ">#0</span>" in short or 'title="position 0 · \'#0\'"' in short  # no tokenizer: positions stand in


@pytest.mark.browser
def test_clicking_a_token_in_the_page_shows_its_weights(pattern, tmp_path):
    page = tmp_path / "pattern.html"
    attnlab.pattern_html(pattern, path=page)
    result = _chromium(tmp_path, f"{page.resolve().as_uri()}#pattern=1.3&token=4", "--virtual-time-budget=3000",
                       "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    assert _console_lines(result.stderr) == []  # the CSP let the script run, and it threw nothing
    viewer = _Viewer()
    viewer.feed(result.stdout)
    expected = pattern.get(1, 3)[4]
    assert _weights(viewer) == [pytest.approx(float(w), abs=1e-4) for w in expected[:5]] + [None] * 5
    assert viewer.readout.startswith("token 'a' @4 attends to: ")
    assert torch.isclose(expected[:5].sum(), torch.tensor(1.0), atol=1e-5)
