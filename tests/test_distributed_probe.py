"""Probe runs over shards and processes: state export/import of every probe and analysis, merges of partial runs,
shard files and ``--resume``, ``--out`` rules, rank-aware CLI errors, and two-process ``torchrun`` runs.

Tolerance (stated in :mod:`attnlab.pipeline`): rows of N processes (or of merged parts) equal those of one run over
the same windows within ``rtol=1e-9, atol=1e-12`` (only the float summation order differs); counts, hit lists,
per-window records and extras are equal exactly.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import typer

import attnlab
from attnlab.capture.runner import ModelRunner
from attnlab.config import RunConfig
from attnlab.distributed import decode_state, encode_state
from attnlab.errors import ConfigError, DistributedError
from attnlab.pipeline import _check_shardable, run_probes
from attnlab.report.io import check_out_dir
from attnlab.shards import SHARD_DIR, ShardStore, bundle_of, load_bundle, merge_bundles
from tiny_models import WORDS, save_model_dir, tiny_llama, tiny_tokenizer

RTOL, ATOL = 1e-9, 1e-12


def _rows(rows):
    return {(r["probe"], r["statistic"], r["layer"], r["head"], r["position"]): r["value"] for r in rows}


def assert_rows_close(expected, actual):
    expected, actual = _rows(expected), _rows(actual)
    assert expected.keys() == actual.keys() and expected
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=RTOL, abs=ATOL, nan_ok=True), key


def _probe(name):
    from attnlab.probes import PROBES

    special = {"magnets": {"token_classes": {i: i % 4 + 1 for i in range(97)}, "bos_token_id": 1, "theta": 0.05,
                           "min_queries": 2},
               "massive_activations": {"abs_threshold": 1e-3, "ratio_threshold": 1.0, "min_layers": 1},
               "sink": {"min_queries": 2, "theta": 0.05}, "spatial_decay": {"grid": (4,)}}
    return PROBES.get(name)(**special.get(name, {}))


PROBE_NAMES = ["entropy", "sink", "distance", "norms", "magnets", "massive_activations", "rope_decay",
               "spatial_decay", "coordinate_decay"]


def _observe(model, probes, *batches, first_window=0):
    """A Session over ``batches`` (one forward pass each) whose sequences are numbered from ``first_window`` (as a
    shard's are)."""
    with attnlab.Session(model, probes=probes) as session:
        session.num_sequences = first_window
        for ids in batches:
            for probe in session.probes:
                if probe.name == "coordinate_decay":
                    probe.set_coordinates(torch.arange(ids.numel() * 3, dtype=torch.float64).view(*ids.shape, 3) % 5)
            with torch.no_grad():
                model(input_ids=ids)
    return session


def _bound(model, names):
    return attnlab.Session(model, probes=[_probe(name) for name in names]).probes


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


IDS = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", PROBE_NAMES)
def test_every_probe_exports_and_imports_its_whole_state(model, name):
    session = _observe(model, [_probe(name)], IDS)
    tensors, side = session.probes[0].export_state()
    back_tensors, back_side = decode_state(encode_state(tensors, side))  # safetensors + JSON, never pickle
    assert back_side == json.loads(json.dumps(side))
    (fresh,) = _bound(model, [name])
    fresh.import_state(back_tensors, back_side)
    assert_rows_close(session.probes[0].rows(), fresh.rows())
    assert fresh.extras(str) == session.probes[0].extras(str)
    if name in ("sink", "magnets", "massive_activations"):
        assert fresh.hits == session.probes[0].hits and fresh.hits  # non-tensor parts travel too
    with pytest.raises(ValueError, match=f"cannot import a {name} state with keys"):
        fresh.import_state({"bogus": torch.zeros(1)}, side)


def test_merged_half_runs_equal_one_run_with_global_window_numbers(model):
    names = [n for n in PROBE_NAMES if n != "coordinate_decay"]
    whole = _observe(model, [_probe(n) for n in names], IDS[:2], IDS[2:])  # the same batches as the parts
    first = _observe(model, [_probe(n) for n in names], IDS[:2])
    second = _observe(model, [_probe(n) for n in names], IDS[2:], first_window=2)
    before = first.probes[1].rows()
    merged = merge_bundles(first.probes, bundle_of(first.probes, first.attention_paths),
                           bundle_of(second.probes, second.attention_paths))
    fresh = _bound(model, names)
    assert load_bundle(fresh, merged) == whole.attention_paths
    for expected, actual in zip(whole.probes, fresh):
        assert_rows_close(expected.rows(), actual.rows())
        assert actual.extras(str) == expected.extras(str), actual.name
    # the live objects of the parts kept their own state
    assert first.probes[1].rows() == before


def _analysis(name):
    from attnlab.analyses import ANALYSES

    special = {"active_dormant": {"layers": [1]}, "head_importance": {"layers": [1]},
               "head_overlap": {"layers": [1]}, "length_collapse": {"lengths": (3, 5), "count": 2},
               "cka": {"max_tokens": 20}}
    return ANALYSES.get(name)(**special.get(name, {}))


ANALYSIS_NAMES = ["active_dormant", "cka", "contrast", "head_divergence", "head_importance", "head_overlap",
                  "inflection", "length_collapse", "memory_fidelity"]


@pytest.mark.parametrize("name", ANALYSIS_NAMES)
def test_every_analysis_merges_through_export_like_one_analysis(model, name):
    runner = ModelRunner(model, tiny_tokenizer())
    runner.other = ModelRunner(tiny_llama(seed=1), tiny_tokenizer())
    batches = [{"input_ids": IDS[i : i + 1], "attention_mask": torch.ones_like(IDS[i : i + 1])} for i in range(3)]
    whole, first, second, fresh = (_analysis(name) for _ in range(4))
    for obj in (whole, first, second, fresh):
        obj.prepare(runner.facts, runner)
    assert whole.shardable
    for i, batch in enumerate(batches):
        whole.observe(runner, batch)
        (first if i < 2 else second).observe(runner, batch)
    parts = [bundle_of([obj], {}) for obj in (first, second)]
    parts = [decode_state(encode_state(*part)) for part in parts]
    load_bundle([fresh], merge_bundles([fresh], *parts))
    for obj in (whole, fresh):
        obj.finish(runner)
    if name == "memory_fidelity":  # a Llama has no recurrent layer: skipped (its data path is not run here)
        assert whole.rows() == [] and "skipped" in whole.extras(str)
    else:
        assert whole.rows(), name  # something is compared
        assert_rows_close(whole.rows(), fresh.rows())
    assert fresh.extras(str) == whole.extras(str)


def test_unshardable_plugins_are_refused_under_several_processes(monkeypatch):
    class Plugin:
        name, shardable = "plugin_stat", False

    assert _check_shardable([("analysis", Plugin())], ShardStore("x")) is False  # one process: one plain pass
    with pytest.raises(ConfigError, match="--resume: plugin_stat saves no shard state"):
        _check_shardable([("analysis", Plugin())], ShardStore("x", resume=True))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="^plugin_stat cannot run over several processes"):
        _check_shardable([("analysis", Plugin())], None)


def test_plugins_with_list_state_run_one_plain_pass_in_one_process(tmp_path, model):
    """A plug-in probe and analysis written to the pre-#14 contract (a list besides ``state()``, not
    ``shardable``) see each window once, as in one straight pass, with built-in probes beside them."""
    from attnlab.analyses.base import Analysis
    from attnlab.probes import PROBES
    from attnlab.probes.base import Probe

    class ListProbe(Probe):
        name, needs = "list_probe", frozenset({"probs"})

        def __init__(self):
            self.seen, self.calls = [], 0

        def begin_call(self, call):
            self.calls += 1

        def end_call(self, call):
            self.seen.append(self.calls)

        def rows(self):
            return [{"probe": self.name, "statistic": "calls", "layer": None, "head": None, "position": None,
                     "value": float(len(self.seen))}]

    class ListAnalysis(Analysis):
        name = "list_analysis"

        def __init__(self):
            self.seen = []

        def observe(self, runner, batch):
            self.seen.extend(int(i) for i in batch["input_ids"][:, 1])

        def merge(self, other):
            self.seen.extend(other.seen)

        def rows(self):
            return [{"probe": self.name, "statistic": "seen", "layer": None, "head": None, "position": None,
                     "value": float(len(self.seen))}]

        def extras(self, decode=None):
            return {"seen": self.seen}

    from attnlab.analyses import ANALYSES

    PROBES.register("list_probe")(ListProbe)
    ANALYSES.register("list_analysis")(ListAnalysis)
    try:
        config = RunConfig(model="tiny", text=str(_text(tmp_path / "t.txt")), seq_len=10, max_windows=4,
                           probes=("list_probe", "list_analysis", "entropy"), pattern_heads="none")
        results = run_probes(config, model=model, tokenizer=tiny_tokenizer(), shards=ShardStore(tmp_path / "out"))
    finally:
        PROBES._items.pop("list_probe", None) if hasattr(PROBES, "_items") else None
        ANALYSES._items.pop("list_analysis", None) if hasattr(ANALYSES, "_items") else None
    values = {r["statistic"]: r["value"] for r in results["rows"] if r["probe"].startswith("list_")}
    assert values == {"calls": 4 * 2, "seen": 4}  # one attention call per layer and window; one item per window
    assert results["extras"]["list_analysis"]["seen"] == [w["ids"][1] for w in results["windows"]]
    assert not (tmp_path / "out" / SHARD_DIR).exists()  # no shard files
    straight = attnlab.Session(model, probes=[_probe("entropy")])
    with straight, torch.no_grad():
        for w in results["windows"]:
            model(input_ids=torch.tensor([w["ids"]]))
    expected = _rows(straight.probes[0].rows())  # the Session's own defaults: equal up to float32 kernel rounding
    got = _rows([r for r in results["rows"] if r["probe"] == "entropy"])
    assert got.keys() == expected.keys() and all(got[k] == pytest.approx(v, rel=1e-6) for k, v in expected.items())


def _text(path, words=400, seed=0):
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(words)))
    return path


def test_resume_reuses_saved_shards_and_refuses_another_runs_shards(tmp_path, model, monkeypatch):
    text = _text(tmp_path / "t.txt")
    config = RunConfig(model="tiny", text=str(text), seq_len=10, max_windows=5,
                       probes=("entropy", "sink", "head_importance"), probe_args={"sink": {"min_queries": 2}},
                       pattern_heads="none")
    store = ShardStore(tmp_path / "out")
    first = run_probes(config, model=model, tokenizer=tiny_tokenizer(), shards=store)
    saved = sorted(p.name for p in store.folder.iterdir())  # kept until the caller has written the results
    assert saved == [f"shard-{i:05d}.safetensors" for i in range(5)]
    store.remove()
    assert not store.folder.exists()
    run_probes(config, model=model, tokenizer=tiny_tokenizer(), shards=store)  # as if it stopped before writing
    for i in (1, 3):
        store.path(i).unlink()
    messages = []
    again = run_probes(config, model=model, tokenizer=tiny_tokenizer(), shards=ShardStore(tmp_path / "out",
                       resume=True), progress=lambda done, total, what: messages.append(what))
    reused = [m for m in messages if " from " in m]
    assert reused == [f"window {i}/5 from {store.folder}" for i in (1, 3, 5)]
    assert again["rows"] == first["rows"] and again["extras"] == first["extras"]
    grown = RunConfig(**{**config.to_dict(), "max_windows": 7})  # more windows: every saved shard is reused
    messages.clear()
    run_probes(grown, model=model, tokenizer=tiny_tokenizer(), shards=ShardStore(tmp_path / "out", resume=True),
               progress=lambda done, total, what: messages.append(what))
    assert len([m for m in messages if " from " in m]) == 5
    other = RunConfig(**{**config.to_dict(), "block_size": 64})
    with pytest.raises(ConfigError, match=r"^--resume: shard-00000.safetensors was written with another config "
                       r"\(block_size 128 → 64\); pass --force to start over"):
        run_probes(other, model=model, tokenizer=tiny_tokenizer(), shards=ShardStore(tmp_path / "out", resume=True))
    run_probes(other, model=model, tokenizer=tiny_tokenizer(), shards=ShardStore(tmp_path / "out"))  # fresh start
    assert len(list(store.folder.iterdir())) == 5


def test_resume_refuses_shards_of_weights_overwritten_in_place(tmp_path, monkeypatch):
    save_model_dir(tmp_path / "model", tiny_llama(seed=0))
    config = RunConfig(model=str(tmp_path / "model"), text=str(_text(tmp_path / "t.txt")), seq_len=10,
                       max_windows=2, probes=("entropy",), pattern_heads="none")
    monkeypatch.setattr(ShardStore, "remove", lambda self: None)  # as if the run stopped before its end
    run_probes(config, shards=ShardStore(tmp_path / "out"))
    save_model_dir(tmp_path / "model", tiny_llama(seed=1))  # same path, other weights (further training)
    with pytest.raises(ConfigError, match=r"^--resume: shard-00000.safetensors was written with other weights"):
        run_probes(config, shards=ShardStore(tmp_path / "out", resume=True))


def test_a_shard_whose_state_does_not_fit_is_a_one_line_error(tmp_path, model):
    (probe,) = _bound(model, ["entropy"])
    tensors, meta = bundle_of([probe], {})
    with pytest.raises(ConfigError, match=r"^out/x.safetensors does not fit this run's entropy \(cannot import"):
        load_bundle([probe], ({"0/bogus": torch.zeros(1)}, meta), "out/x.safetensors")


def test_out_dir_rules_for_shard_folders(tmp_path):
    out = tmp_path / "out"
    (out / SHARD_DIR).mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"holds the shards of an interrupted run \(.shards\); pass --resume"):
        check_out_dir(out, force=False)
    check_out_dir(out, force=False, resume=True)
    check_out_dir(out, force=True)
    (out / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"is not empty \(results.json\); pass --force"):
        check_out_dir(out, force=False, resume=True)
    (out / SHARD_DIR).rmdir()
    with pytest.raises(ConfigError, match=r"^--resume: --out .* holds a finished run \(results.json, no shards to "
                       r"continue\); pass --force to run it again"):
        check_out_dir(out, force=False, resume=True)


def test_cli_errors_are_printed_by_the_right_rank(monkeypatch, capsys):
    from attnlab.cli.options import run_guarded

    def fails(error):
        def body():
            raise error
        return body

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(typer.Exit) as exited:  # one rank's own usage error: it says it
        run_guarded(fails(ConfigError("--text t.txt: no such file")), False)
    assert exited.value.exit_code == 2 and capsys.readouterr().err == "error: rank 1/2: --text t.txt: no such file\n"
    agreed = ConfigError("rank 0/2: --seq-len 9000 exceeds 128")
    agreed.agreed = True  # made known to every rank (attnlab.distributed.agree): rank 0 says it
    with pytest.raises(typer.Exit) as exited:
        run_guarded(fails(agreed), False)
    assert exited.value.exit_code == 2 and capsys.readouterr().err == ""
    with pytest.raises(typer.Exit) as exited:
        run_guarded(fails(RuntimeError("out of memory")), False)
    assert exited.value.exit_code == 1 and capsys.readouterr().err == "error: rank 1/2: out of memory\n"
    with pytest.raises(typer.Exit):
        run_guarded(fails(DistributedError("rank 1/2: another rank failed during x (y); no results were written")),
                    False)
    assert capsys.readouterr().err.startswith("error: rank 1/2: another rank failed")  # named once
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(typer.Exit):
        run_guarded(fails(ConfigError("--seq-len 9000 exceeds 128")), False)
    assert capsys.readouterr().err == "error: rank 0/2: --seq-len 9000 exceeds 128\n"


# ---- two processes (torchrun, gloo on localhost) ------------------------------------------------------------------

PROBES_RUN = ["--probe", "entropy", "--probe", "sink", "--probe", "distance", "--probe", "norms", "--probe",
              "head_importance", "--probe-arg", "head_importance.layers=[1]", "--probe-arg", "sink.min_queries=2"]


def _attnlab(tmp, out, *, processes=1, extra=(), env=None, probes=PROBES_RUN):
    args = ["report", "--model", str(tmp / "model"), "--text", str(tmp / "text.txt"), "--seq-len", "16",
            "--max-windows", "5", *probes, "--pattern-heads", "none", "--out", str(tmp / out), *extra]
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                          str(processes)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *launcher, "-m", "attnlab", *args], capture_output=True, text=True,
                          env=full_env, timeout=120)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """A tiny random Llama saved as a folder, a text, and the one-process result of 5 windows (two processes:
    rank 0 takes shards 0-2, rank 1 shards 3-4)."""
    tmp = tmp_path_factory.mktemp("dist")
    save_model_dir(tmp / "model", tiny_llama(max_positions=64))
    _text(tmp / "text.txt")
    done = _attnlab(tmp, "one")
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp, json.loads((tmp / "one" / "results.json").read_text())


def _same_results(expected, actual):
    assert_rows_close(expected["rows"], actual["rows"])
    for key in ("windows", "attention_paths", "extras"):
        assert actual[key] == expected[key], key


@pytest.mark.distributed
def test_two_processes_equal_one_process_on_uneven_shards(one_process):
    tmp, expected = one_process
    done = _attnlab(tmp, "two", processes=2)
    assert done.returncode == 0, done.stderr[-2000:]
    two = json.loads((tmp / "two" / "results.json").read_text())
    _same_results(expected, two)
    assert (expected["timing"]["processes"], two["timing"]["processes"]) == (1, 2)
    assert sorted(p.name for p in (tmp / "two").iterdir()) == ["report.html", "results.csv", "results.json"]
    assert done.stderr.count("config: ") == 1 and done.stdout.count("report: ") == 1  # rank 0 alone
    total = 5 * (1 + 4)  # per window: the attention pass and 4 head ablations of layer 1
    assert f"done {total}/{total} (100%)" in done.stderr  # the global count


@pytest.mark.distributed
def test_a_dead_rank_fails_the_run_and_resume_in_one_process_finishes_it(one_process):
    tmp, expected = one_process
    done = _attnlab(tmp, "dead", processes=2, env={"ATTNLAB_TEST_KILL_RANK": "1:1"})
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert all(line.startswith("error: rank 0/2: another rank failed") for line in errors), errors
    assert errors or "local_rank: 1" in done.stderr  # ours, or torchrun stopped rank 0 first and names rank 1
    assert not (tmp / "dead" / "results.json").exists()
    saved = sorted(p.name for p in (tmp / "dead" / SHARD_DIR).iterdir())
    assert "shard-00003.safetensors" in saved and "shard-00004.safetensors" not in saved  # rank 1 did one shard
    refused = _attnlab(tmp, "dead")
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    resumed = _attnlab(tmp, "dead", extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "window 4/5 from" in resumed.stderr
    _same_results(expected, json.loads((tmp / "dead" / "results.json").read_text()))
    assert not (tmp / "dead" / SHARD_DIR).exists()


GROWING = ["--probe", "sink", "--probe", "massive_activations", "--probe", "rope_decay", "--probe", "contrast",
           "--probe-arg", "sink.min_queries=2", "--probe-arg", "sink.theta=0.05",
           "--probe-arg", "massive_activations.abs_threshold=0.001", "--probe-arg",
           "massive_activations.ratio_threshold=1.0", "--probe-arg", "massive_activations.min_layers=1"]


@pytest.mark.distributed
def test_two_processes_with_batches_of_two_and_growing_states_equal_one_process(one_process):
    """5 windows in batches of 2: shards [0,1] [2,3] [4]; rank 0 takes two, rank 1 one. Hit lists name the same
    global windows, growing states (massive_activations, rope_decay) and contrast's per-window parts merge."""
    tmp, _ = one_process
    (tmp / "batch2.yaml").write_text("batch_size: 2\n")  # no --batch-size flag: the config file sets it
    probes = [*GROWING, "--config", str(tmp / "batch2.yaml")]
    one = _attnlab(tmp, "grow1", probes=probes)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _attnlab(tmp, "grow2", processes=2, probes=probes)
    assert two.returncode == 0, two.stderr[-2000:]
    expected, actual = (json.loads((tmp / out / "results.json").read_text()) for out in ("grow1", "grow2"))
    _same_results(expected, actual)
    assert expected["config"]["batch_size"] == 2
    assert expected["extras"]["sink"] and {r["probe"] for r in expected["rows"]} == {
        "sink", "massive_activations", "rope_decay", "contrast"}
