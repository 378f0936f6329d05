"""Open report.html in headless chromium: the page loads offline, shows every section and logs nothing.

Chromium (``apt-get install chromium``) writes the page's console messages, including uncaught exceptions and
Content-Security-Policy violations (a blocked script or external resource), to stderr as ``CONSOLE:`` lines when
run with ``--enable-logging=stderr``. Skipped when chromium is not installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from attnlab.report.io import write_results

pytestmark = pytest.mark.browser

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)
HEADINGS = ["Run", "Attention sinks", "Attention entropy", "Attention vs distance", "Extreme tokens",
            "Residual and value norms", "Tokens as fed", "Tables"]
CONSOLE_LINE = re.compile(r"CONSOLE[:(]|Uncaught")


def _chromium(tmp_path, url: str, *args: str) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr", "--v=0", *args, url,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if CONSOLE_LINE.search(line)]


@pytest.fixture
def report_url(tmp_path, fake_results) -> str:
    paths = write_results(tmp_path / "run", fake_results)
    return paths["html"].resolve().as_uri()


def test_dom_has_every_section_and_no_console_errors(tmp_path, report_url):
    result = _chromium(tmp_path, report_url, "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    for heading in HEADINGS:  # probe sections name their probe after the title: <h2>Title <small>…</small></h2>
        assert re.search(rf"<h2>{re.escape(heading)}( <small>.*?</small>)?</h2>", dom), heading
    for section_id in ("run", "sinks", "entropy", "distance", "extreme-tokens", "norms", "tokens", "tables"):
        assert f'id="{section_id}"' in dom
    assert "<script" not in dom.lower()  # the malicious token stayed text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert _console_lines(result.stderr) == []


def test_screenshot_renders(tmp_path, report_url):
    shot = tmp_path / "report.png"
    result = _chromium(tmp_path, report_url, f"--screenshot={shot}", "--window-size=1200,3000")
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    assert _console_lines(result.stderr) == []


def test_console_detection_works(tmp_path):
    """Negative control: a page that does log errors is caught, so the tests above are not vacuous."""
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><body><script>console.error('boom'); missing();</script></body></html>")
    result = _chromium(tmp_path, page.as_uri(), "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(_console_lines(result.stderr)) >= 1
