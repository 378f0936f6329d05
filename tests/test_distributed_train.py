"""attnlab train and sweep under torchrun: 2 processes (gloo, CPU) against 1 process.

Fast in-process tests check the slicing and the loss scaling; the ``distributed`` ones start torchrun (4 launches)
with a tiny run (1 layer, width 32, seq_len 16, 6 steps). Tolerance of 2 vs 1 process: counts, accuracies and the
learning rate exactly equal; losses and gradient norms within rel 1e-5; final weights within abs 1e-5 (measured
≤ 2e-7: the two differ only by the order of float sums)."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from attnlab.distributed import World
from attnlab.errors import ConfigError
from attnlab.lab import data_parallel as dp
from torchrun_helpers import run_attnlab

TRAIN = ["train", "--layer", "masked", "--task", "mqar", "--task-arg", "vocab_size=24", "--task-arg", "seq_len=16",
         "--task-arg", "num_kv_pairs=2", "--layers", "1", "--width", "32", "--heads", "2", "--steps", "6",
         "--lr", "1e-2", "--batch-size", "16", "--warmup-steps", "2", "--eval-every", "2", "--eval-batches", "3",
         "--probe", "sink"]
RTOL, WEIGHTS_ATOL = 1e-5, 1e-5


# in-process: slicing and loss scaling ---------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 4])
def test_rank_slices_cover_the_global_batch_in_order(size):
    slices = [dp.batch_slice(16, World(rank, size)) for rank in range(size)]
    assert [i for part in slices for i in range(16)[part]] == list(range(16))


def test_a_batch_size_the_world_size_does_not_divide_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"divisible by the world size 4 .*got 10$") as info:
        dp.batch_slice(10, World(1, 4))
    assert "\n" not in str(info.value)


def _uneven_batch():
    """Logits (8, 5, 7) and labels whose ignored positions are spread unevenly (rank slices differ in counts)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, 7, generator=generator)
    labels = torch.randint(0, 7, (8, 5), generator=generator)
    labels[:3] = -100  # the first sequences are not scored at all
    labels[3, :4] = -100
    labels[6, 1:] = -100
    return logits, labels


@pytest.mark.parametrize("size", [2, 4])
def test_scaled_rank_losses_average_to_the_global_mean_and_its_gradient(size):
    logits, labels = _uneven_batch()
    count = dp.labelled(labels)
    counts = [dp.labelled(labels[dp.batch_slice(8, World(r, size))]) for r in range(size)]
    assert len(set(counts)) > 1  # the ranks really see different numbers of scored tokens
    whole = logits.clone().requires_grad_(True)
    F.cross_entropy(whole.flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
    parts, grads = [], []
    for rank in range(size):  # what each rank back-propagates; DDP then averages (sum / size)
        part = dp.batch_slice(8, World(rank, size))
        mine = logits[part].clone().requires_grad_(True)
        loss = dp.scaled_loss(dp.token_loss_sum(mine, labels[part]), count, size)
        loss.backward()
        parts.append(loss.detach())
        grads.append(mine.grad)
    assert torch.allclose(sum(parts) / size, F.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                            ignore_index=-100), rtol=1e-6)
    assert torch.allclose(torch.cat(grads) / size, whole.grad, rtol=1e-5, atol=1e-8)


def test_step_statistics_in_one_process_are_the_batch_mean():
    stats = dp.global_step_stats(12.5, 3, 4, 5)
    assert stats == {"loss": 2.5, "accuracy": 0.75}
    assert dp.global_step_stats(0.0, 0, 0, 0)["loss"] != dp.global_step_stats(0.0, 0, 0, 0)["loss"]  # NaN


def test_unused_parameters_are_detected_before_wrapping():
    from attnlab.lab.modeling import build_model
    from attnlab.lab.train import TrainConfig, make_task, model_spec

    def unused(layer):
        config = TrainConfig(layer=layer, task="mqar", task_args={"vocab_size": 24, "seq_len": 16, "num_kv_pairs": 2},
                             width=16, num_heads=2, num_layers=1, probes=())
        task = make_task(config)
        model = build_model(model_spec(config, task), seed=0)
        found = dp._unused_parameters(model, task.batch(0, 1)["input_ids"])
        assert all(p.grad is None for p in model.parameters())  # the trial pass leaves no gradient behind
        return found

    assert not unused("masked") and unused("moda")  # moda owns a gain its default path does not use


def test_a_layer_class_that_may_skip_parameters_always_gets_the_unused_search():
    class Skips(torch.nn.Linear):
        may_skip_parameters = True

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), Skips(2, 2))
    assert dp.find_unused(model, torch.zeros(1, 2, dtype=torch.long))  # no trial pass needed (it would fail here)


def test_a_parameter_ddp_could_not_average_stops_the_step_with_one_line(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from attnlab.errors import DistributedError

    class Gated(torch.nn.Module):  # uses its gate only for some inputs (here: never)
        def __init__(self):
            super().__init__()
            self.body, self.gate = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.body(x)

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        net = DistributedDataParallel(Gated(), find_unused_parameters=False)
        net(torch.randn(3, 2)).sum().backward()
        with pytest.raises(DistributedError, match=r"^rank 0/1: training step 5 left gate.weight and 1 more "
                                                   r"without a gradient.*may_skip_parameters = True") as info:
            dp.check_reduced(net, 5)
        assert "\n" not in str(info.value)
        dp.check_reduced(torch.nn.Linear(2, 2), 5)  # one process: nothing to check
    finally:
        dist.destroy_process_group()


@pytest.fixture
def launched_without_group(monkeypatch):
    """The environment torchrun gives rank 0 of 2, with no process group running and no rendezvous address."""
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")


def test_evaluate_without_a_process_group_under_torchrun_is_a_one_line_error(launched_without_group):
    from attnlab.errors import DistributedError
    from attnlab.lab.modeling import build_model
    from attnlab.lab.train import TrainConfig, evaluate, make_task, model_spec

    config = TrainConfig(task_args={"vocab_size": 24, "seq_len": 16, "num_kv_pairs": 2}, width=16, num_heads=2,
                         num_layers=1, probes=())
    task = make_task(config)
    with pytest.raises(DistributedError, match=r"^rank 0/2: evaluate\(\) needs the process group, but "
                                               r"WORLD_SIZE > 1 and none runs; run the work inside "
                                               r"attnlab.distributed.distributed\(\)$"):
        evaluate(build_model(model_spec(config, task), seed=0), task, config, 0)


def test_train_and_run_sweep_start_the_process_group_themselves(launched_without_group, tmp_path):
    """They enter distributed("cpu"): here it cannot start (no MASTER_ADDR), a one-line DistributedError before
    any work (not a bare ValueError after the --force clean-up, nor a KeyError after each rank's share)."""
    from attnlab.errors import DistributedError
    from attnlab.lab.sweep import run_sweep
    from attnlab.lab.train import TrainConfig, train

    config = TrainConfig(task_args={"vocab_size": 24, "seq_len": 16, "num_kv_pairs": 2}, width=16, num_heads=2,
                         num_layers=1, steps=1, probes=(), out=str(tmp_path / "run"))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(SWEEP))
    for call in (lambda: train(config), lambda: run_sweep(path, tmp_path / "sweep")):
        with pytest.raises(DistributedError, match=r"^rank 0: cannot start the process group: .*MASTER_ADDR") as info:
            call()
        assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_sweep_jobs_under_torchrun_get_the_computed_thread_count(monkeypatch):
    from attnlab.lab.sweep import _job_env

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun sets for every rank
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    env = _job_env(3)
    assert env["OMP_NUM_THREADS"] == "3"
    assert not {"RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"} & set(env)  # a job is one plain process
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert _job_env(3)["OMP_NUM_THREADS"] == "1"  # outside torchrun the user's setting wins


# torchrun -------------------------------------------------------------------------------------------------------
def _attnlab(args, *, procs=1, **env):
    """``attnlab ARGS`` on ``procs`` processes (:func:`torchrun_helpers.run_attnlab`: a timed-out run is stopped
    with all its ranks)."""
    return run_attnlab([str(a) for a in args], nproc=procs, env=env, timeout=150)


def _log(out):
    with open(out / "train_log.csv", newline="", encoding="utf-8") as handle:
        return [(int(r["step"]), r["split"], r["statistic"], float(r["value"])) for r in csv.DictReader(handle)]


def _assert_same_run(out, reference):
    """The train logs agree (keys exactly; accuracy and lr exactly; losses and grad norms within RTOL) and so do
    the final weights (WEIGHTS_ATOL)."""
    mine, theirs = _log(out), _log(reference)
    assert [row[:3] for row in mine] == [row[:3] for row in theirs]
    for (step, split, statistic, value), (*_, expected) in zip(mine, theirs):
        if statistic in ("accuracy", "lr"):
            assert value == expected, (step, split, statistic)
        else:
            assert value == pytest.approx(expected, rel=RTOL), (step, split, statistic)
    weights = load_file(str(out / "checkpoint" / "model.safetensors"))
    expected = load_file(str(reference / "checkpoint" / "model.safetensors"))
    assert weights.keys() == expected.keys()
    for name in weights:
        assert torch.allclose(weights[name], expected[name], rtol=0, atol=WEIGHTS_ATOL), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 1-process run every torchrun run is compared with."""
    out = tmp_path_factory.mktemp("one") / "run"
    done = _attnlab([*TRAIN, "--out", out])
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.distributed
def test_two_processes_train_like_one_on_the_same_global_batch(tmp_path, reference):
    out = tmp_path / "two"
    done = _attnlab([*TRAIN, "--out", out], procs=2)
    assert done.returncode == 0, done.stderr
    _assert_same_run(out, reference)
    lines = done.stderr.splitlines()  # rank 0 alone prints: one config line, one done line, no warnings
    assert [line.split(":")[0] for line in lines if line.startswith(("config:", "done:"))] == ["config", "done"]
    assert "Warning" not in done.stderr
    results = json.loads((out / "results.json").read_text())
    expected = json.loads((reference / "results.json").read_text())
    probes = [(r["probe"], r["statistic"], r["layer"], r["step"]) for r in results["rows"] if r["probe"] != "train"]
    assert probes == [(r["probe"], r["statistic"], r["layer"], r["step"]) for r in expected["rows"]
                      if r["probe"] != "train"]  # the probe pass (rank 0) at every evaluation
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


@pytest.mark.distributed
def test_a_two_process_run_stopped_early_resumes_in_one_process(tmp_path, reference):
    out = tmp_path / "split"
    first = _attnlab([*TRAIN, "--out", out, "--stop-at", "3"], procs=2)
    assert first.returncode == 0, first.stderr
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    assert "stopped at --stop-at 3 of 6" in first.stderr
    resumed = _attnlab(["train", "--out", out, "--resume"])  # another world size: 1 process
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(out, reference)


@pytest.mark.distributed
def test_a_rank_that_dies_fails_the_run_and_leaves_the_last_checkpoint(tmp_path, reference):
    from attnlab.lab.checkpoint import read_state

    out = tmp_path / "dies"
    done = _attnlab([*TRAIN, "--out", out], procs=2, ATTNLAB_TEST_KILL_RANK="1:3")  # rank 1 dies after step 3
    assert done.returncode != 0
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s+exitcode\s*:\s*17", done.stderr), done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) <= 1, errors  # rank 0 may be stopped by torchrun before its collective fails
    assert all(re.fullmatch(r"error: rank 0/2: another rank failed during training step 4 \(.+\); no results were "
                            r"written", line) for line in errors), errors
    state, _ = read_state(out / "checkpoint")  # the checkpoint of the evaluation at step 2, whole
    assert state["step"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "train_log.csv"]  # no results, no temp files
    resumed = _attnlab(["train", "--out", out, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(out, reference)


SWEEP = {"grid": {"layers": ["masked"], "widths": [16], "lrs": [1e-2, 3e-3], "tasks": ["mqar"]},
         "train": {"num_layers": 1, "num_heads": 2, "steps": 2, "eval_every": 2, "batch_size": 4,
                   "eval_batches": 1, "probes": ["sink"],
                   "task_args": {"vocab_size": 24, "seq_len": 16, "num_kv_pairs": 2}}}
TIMING = ("wall_seconds", "train_seconds", "out", "error")  # error: names the job's own --out


def _table(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(handle)]


@pytest.mark.distributed
def test_a_two_process_sweep_with_a_failed_job_writes_the_one_process_summary_and_resumes(tmp_path):
    """Rank 1's job fails (its --out is a file); rank 1 must not exit before rank 0 has written the summary."""
    from attnlab.lab.sweep import load_sweep, run_sweep

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(SWEEP))
    one, two = tmp_path / "one", tmp_path / "two"
    ok, bad = [job.name for job in load_sweep(path, one)]  # job i of the pending ones runs on rank i % 2
    for root in (one, two):
        (root / "jobs").mkdir(parents=True)
        (root / "jobs" / bad).write_text("not a directory")
    done = _attnlab(["sweep", path, "--out", one, "--jobs", "2", "--resume"])  # 1 process, 2 jobs side by side
    assert done.returncode == 1, done.stderr
    done = _attnlab(["sweep", path, "--out", two, "--resume"], procs=2)
    assert done.returncode == 1, done.stderr
    assert f"error: 1 of 2 job(s) failed: {bad}" in done.stderr
    assert re.search(r"rank\s*:\s*0 \(local_rank: 0\)\s+exitcode\s*:\s*1\b", done.stderr), done.stderr
    assert "SIGTERM" not in done.stderr  # rank 0 was not stopped part-way through its summary
    assert set(re.findall(r"job (\S+): .*\(rank 1\)", done.stderr)) == {bad}  # rank 0 reports rank 1's job
    assert _table(two / "sweep.csv") == _table(one / "sweep.csv")
    with open(two / "sweep.csv", newline="", encoding="utf-8") as handle:
        rows = {row["job"]: row for row in csv.DictReader(handle)}
    assert rows[ok]["status"] == "ok" and rows[bad]["status"] == "failed"
    assert re.fullmatch(r"exit 2: error: --out .* exists and is not a directory", rows[bad]["error"])
    assert (two / "best.csv").read_bytes() == (one / "best.csv").read_bytes()
    assert (two / "report.html").is_file() and (two / "results.json").is_file()
    logs = {p.name: p.read_text() for p in (two / "logs").iterdir()}  # each job ran exactly once
    assert len([line for line in logs[f"{ok}.log"].splitlines() if line.startswith("config:")]) == 1
    assert len([line for line in logs[f"{bad}.log"].splitlines() if line.startswith("error:")]) == 1
    (two / "jobs" / bad).unlink()
    again = run_sweep(path, two, resume=True)  # 1 process (this one) finishes what 2 processes left
    assert not again.failed
    assert _table(two / "sweep.csv")[0] == _table(one / "sweep.csv")[0]
    assert (two / "logs" / f"{ok}.log").read_text() == logs[f"{ok}.log"]  # the finished job did not run again
