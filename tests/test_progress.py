"""Progress everywhere (issue 12, finding 4): plain lines off a terminal with counts and ETA, inner progress of
model-level probes, ``progress=True`` in the Python API."""

from __future__ import annotations

import io
import re

import pytest
from tiny_models import WORDS, save_model_dir, tiny_llama, tiny_tokenizer
from typer.testing import CliRunner

from attnlab.capture.loading import LoadedModel
from attnlab.config import RunConfig
from attnlab.errors import ConfigError
from attnlab.progress import PlainLines, progress_interval, progress_to, silent, stage, takes_progress

LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text(" ".join(WORDS[(i * 5) % len(WORDS)] for i in range(300)), encoding="utf-8")
    return str(path)


def test_plain_lines_have_counts_elapsed_and_eta():
    clock, stream = Clock(), io.StringIO()
    lines = PlainLines(stream, interval=10, clock=clock)
    lines(0, 0, "loading model tiny")
    clock.now = 4
    lines(0, 4, "running attention probes")
    clock.now = 6
    lines(1, 4, "running attention probes")  # same stage, 2 s after the last line: held back
    clock.now = 16
    lines(2, 4, "running attention probes")  # 12 s later: printed, ETA from 2 done in 12 s
    clock.now = 28
    lines(4, 4, "done")
    out = stream.getvalue().splitlines()
    assert len(out) == 4 and all(LINE.match(line) for line in out)
    assert out[0].endswith("loading model tiny · 0 s elapsed")
    assert out[1].endswith("running attention probes 0/4 (0%) · 4 s elapsed")
    assert out[2].endswith("running attention probes 2/4 (50%) · 16 s elapsed · ETA 12 s")
    assert out[3].endswith("done 4/4 (100%) · 28 s elapsed")


def test_stage_changes_print_at_once_and_numbers_do_not_make_a_new_stage():
    assert stage("active_dormant: window 1/2 · head 37/270") == "active_dormant: window #/#"
    assert stage("step 3/200: loss 1.25") == stage("step 4/200: loss 1.5")
    clock, stream = Clock(), io.StringIO()
    lines = PlainLines(stream, interval=10, clock=clock)
    for head in range(5):
        lines(head, 10, f"a: window 1/2 · head {head}/5")
    lines(5, 10, "a: window 2/2 · head 0/5")  # same stage, within the interval
    lines(6, 10, "b: window 1/2")  # a new stage
    out = stream.getvalue().splitlines()
    assert len(out) == 2 and out[0].endswith("a: window 1/2 · head 0/5 · 0/10 (0%) · 0 s elapsed")


def test_interval_zero_prints_every_call(monkeypatch):
    monkeypatch.setenv("ATTNLAB_PROGRESS_INTERVAL", "0")
    stream = io.StringIO()
    lines = PlainLines(stream)
    for done in range(3):
        lines(done, 3, "x")
    assert len(stream.getvalue().splitlines()) == 3
    for bad, expected in (("", 10.0), ("soon", 10.0), ("-1", 10.0), ("2.5", 2.5)):
        monkeypatch.setenv("ATTNLAB_PROGRESS_INTERVAL", bad)
        assert progress_interval() == expected


def test_progress_arguments():
    def mine(done, total, message):
        pass

    @takes_progress
    def work(*, progress):
        return progress

    for value, expected in ((None, silent), (False, silent), (mine, mine)):
        with progress_to(value) as notify:
            assert notify is expected
        assert work(progress=value) is expected
    with progress_to(True) as notify:  # pytest's stderr is not a terminal
        assert isinstance(notify, PlainLines)
    assert isinstance(work(progress=True), PlainLines)
    with pytest.raises(ConfigError, match="progress must be"), progress_to("yes"):
        pass


def test_progress_true_is_a_bar_in_a_terminal_everywhere(monkeypatch):
    """progress=True gives the same display in every API: a rich bar in a terminal (evaluate_variants and the
    searches printed plain lines, or failed on True)."""
    import rich.progress
    from rich.console import Console

    from attnlab.evaluation import runner, search

    bars = []
    real = rich.progress.Progress

    def recording(*args, **kwargs):
        bars.append(real(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(rich.progress, "Progress", recording)
    monkeypatch.setattr("rich.console.Console", lambda **kw: Console(file=io.StringIO(), force_terminal=True))
    monkeypatch.setattr(search, "measure", lambda *args, **kwargs: {"nll": 1.0, "accuracy": 0.5, "entropy": 1.0})
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    found = search.zerotuning_search(None, [1, 2], [], gammas=(0.5,), progress=True)
    assert [point["gamma"] for point in found["grid"]] == [0.5, 1.0] and len(bars) == 1
    assert bars[0].tasks[0].completed == 2
    rows, _ = runner.evaluate_variants(None, None, [], tasks=("perplexity",), ids=[], plans=[], bos_id=None,
                                       seq_len=4, prompts=[], progress=True)
    assert rows == [] and len(bars) == 2


def test_events_get_a_line_of_their_own():
    clock, stream = Clock(), io.StringIO()
    lines = PlainLines(stream, interval=10, clock=clock, always=lambda message: message.startswith("eval"))
    for step in range(1, 5):
        lines(step, 8, f"step {step}/8: loss 1.0")
        lines(step, 8, f"eval step {step}/8: loss 1.0")  # a new stage each time, and marked an event
    lines(5, 8, "eval step 5/8: loss 0.5")  # same stage as the last line, printed as an event
    out = stream.getvalue().splitlines()
    assert sum("] eval step" in line for line in out) == 5


class Fake:
    """Stands in for an analysis: reports ``steps`` inner steps per call."""

    name = "fake"

    def __init__(self, steps):
        self.steps, self.hook = steps, None

    def set_progress(self, hook):
        self.hook = hook

    def call(self):
        for done in range(self.steps + 1):
            self.hook(done, self.steps, "head")


def test_tally_turns_inner_steps_into_increasing_overall_progress():
    from attnlab.pipeline import _Tally

    seen = []
    fake, plain = Fake(5), Fake(0)
    tally = _Tally(lambda *args: seen.append(args), batches=2, attention=True, analyses=[fake, plain])
    for _ in range(2):
        tally.step("running attention probes")
        tally.done += 1
    for number in (1, 2):
        for obj in (fake, plain):
            with tally.call(obj, f"{obj.name}: window {number}/2"):
                if obj.steps:
                    obj.call()
    dones = [done for done, _, _ in seen]
    assert dones == sorted(dones) and tally.done == 2 + 2 * 5 + 2 * 1
    assert seen[-1][1] == tally.done and len(set(dones)) > 4  # moves during the analysis, ends at its total
    assert ("fake: window 1/2 · head 3/5") in [message for _, _, message in seen]
    assert fake.hook is None  # cleared after each call


def test_active_dormant_reports_each_head(text):
    from attnlab.pipeline import run_probes

    seen = []
    loaded = LoadedModel.wrap(tiny_llama(), tiny_tokenizer(), name="tiny")
    config = RunConfig(text=text, seq_len=16, max_windows=2, bos="never", probes=("entropy", "active_dormant"))
    run_probes(config, model=loaded, progress=lambda *args: seen.append(args))
    messages = [message for _, _, message in seen]
    assert "active_dormant: window 1/2 · head 3/8" in messages and "active_dormant: window 2/2 · head 8/8" in messages
    dones = [done for done, _, _ in seen]
    assert dones == sorted(dones)  # monotone
    planned = 2 + 2 * 8 + 1  # 2 attention windows + one pass per head per window + the viewer's pattern pass
    assert seen[-1][:2] == (planned, planned)
    assert all(done <= total for done, total, _ in seen if total)
    # the total is planned from the start: the percentage never goes backwards (was 2/4 50% → 2/18 11%)
    assert {total for _, total, _ in seen if total} == {planned}
    percents = [100 * done // total for done, total, _ in seen if total]
    assert percents == sorted(percents)


def test_planned_steps_of_analyses_with_inner_steps():
    from attnlab.analyses import ANALYSES
    from attnlab.capture.architectures import model_facts

    facts = model_facts(tiny_llama(num_heads=4, layers=3))
    expected = [("active_dormant", {}, (12, 0)), ("active_dormant", {"layers": [1], "other_text": "b.txt"}, (4, 20)),
                ("head_importance", {"layers": [0, 2]}, (8, 0)), ("head_overlap", {"other_text": "b.txt"}, (12, 60)),
                ("length_collapse", {"lengths": (8, 16, 32)}, (1, 3)), ("inflection", {}, (1, 0))]
    for name, args, steps in expected:  # 3 batches of 5 windows
        analysis = ANALYSES.get(name)(**args)
        analysis.facts = facts  # what prepare sets
        assert analysis.planned_steps(3, 5) == steps, name


def test_run_probes_progress_true_prints_lines(text, capsys, monkeypatch):
    from attnlab.pipeline import run_probes

    monkeypatch.setenv("ATTNLAB_PROGRESS_INTERVAL", "0")
    loaded = LoadedModel.wrap(tiny_llama(), tiny_tokenizer(), name="tiny")
    run_probes(RunConfig(text=text, seq_len=16, max_windows=2, bos="never", probes=("entropy",)), model=loaded,
               progress=True)
    err = capsys.readouterr().err.splitlines()
    # 2 windows and the viewer's pattern pass
    assert any(LINE.match(line) and "running attention probes on window 2/2, forward passes 1/3 (33%)" in line
               and "ETA" in line for line in err)
    assert any(LINE.match(line) and "attention patterns 2/3 (66%)" in line for line in err)
    assert LINE.match(err[-1]) and "done 3/3 (100%)" in err[-1]


def test_cli_off_a_terminal_prints_periodic_lines(text, tmp_path):
    from attnlab.cli.main import app

    folder = save_model_dir(tmp_path / "model", tiny_llama())
    result = CliRunner().invoke(app, ["report", "--model", str(folder), "--text", text, "--seq-len", "16",
                                      "--max-windows", "3", "--out", str(tmp_path / "out")],
                                env={"ATTNLAB_PROGRESS_INTERVAL": "0"})
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if LINE.match(line)]
    assert any(f"loading model {folder}" in line for line in lines)
    counted = [line for line in lines if "running attention probes" in line]
    assert [re.search(r"(\d)/4 \(", line).group(1) for line in counted] == ["0", "1", "2"]  # + the pattern pass
    assert "ETA" in counted[-1] and "elapsed" in counted[-1]


def test_progress_module_imports_nothing_heavy():
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    code = "import sys, attnlab.progress; print(sorted(m for m in ('rich', 'torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "[]"
