"""attnlab.distributed: sharding, payloads, state files, and the collectives across two real gloo processes."""

from __future__ import annotations

import json
import re
import sys
import textwrap

import pytest
import torch
import typer
from hypothesis import given
from hypothesis import strategies as st
from torchrun_helpers import finish, run_torchrun, start

from attnlab.distributed import (World, agree, broadcast_json, collective, decode_state, encode_state,
                                 gather_to_main, rank_device, read_state_file, shard_range, sync_step, world,
                                 write_state_file)
from attnlab.errors import (AgreedDistributedError, AgreedUsageError, ConfigError, DistributedError,
                            UsageError)


@given(count=st.integers(0, 200), size=st.integers(1, 9))
def test_shards_cover_the_range_in_order_and_balance(count, size):
    shards = [shard_range(count, World(rank, size)) for rank in range(size)]
    assert [i for shard in shards for i in shard] == list(range(count))
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_world_reads_the_launcher_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world() == World(3, 4, 1) and world().active and not world().is_main
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(DistributedError, match="WORLD_SIZE must be an integer, got 'four'"):
        world()


def test_state_payload_round_trips_tensors_and_meta():
    tensors = {"a": torch.randn(3, 4, dtype=torch.float64), "n": torch.arange(5)}
    back, meta = decode_state(encode_state(tensors, {"hits": [[1, 2.5, "x"]], "k": None}))
    assert meta == {"hits": [[1, 2.5, "x"]], "k": None}
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_a_failed_state_write_leaves_the_old_file_whole_and_no_temp_file(tmp_path, monkeypatch):
    import attnlab.io_utils

    path = write_state_file(tmp_path / "s" / "shard-0.safetensors", {"x": torch.ones(2)}, {"i": 0})
    assert sorted(p.name for p in path.parent.iterdir()) == ["shard-0.safetensors"]  # no temp file left
    tensors, meta = read_state_file(path)
    assert torch.equal(tensors["x"], torch.ones(2)) and meta == {"i": 0}

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(attnlab.io_utils.os, "fsync", disk_full)  # fails after the new bytes were written
    with pytest.raises(OSError, match="No space left"):
        write_state_file(path, {"x": torch.zeros(1000)}, {"i": 1})
    monkeypatch.undo()
    assert sorted(p.name for p in path.parent.iterdir()) == ["shard-0.safetensors"]
    tensors, meta = read_state_file(path)
    assert torch.equal(tensors["x"], torch.ones(2)) and meta == {"i": 0}  # the old file, whole
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DistributedError, match="not a readable attnlab state file"):
        read_state_file(path)


def test_one_process_runs_agree_and_sync_step_locally():
    assert agree("x", lambda: 5) == 5
    with pytest.raises(ConfigError, match="^bad$"):  # unchanged, not agreed
        agree("x", lambda: (_ for _ in ()).throw(ConfigError("bad")))
    assert sync_step(3) == 3.0
    error = RuntimeError("boom")
    with pytest.raises(RuntimeError) as caught:
        sync_step(1, error)
    assert caught.value is error
    assert gather_to_main(b"ab", "x") == [b"ab"] and broadcast_json((1, 2)) == [1, 2]


def test_agreed_errors_name_the_first_failing_rank_and_keep_the_usage_class():
    from attnlab.distributed import _raise_agreed

    local = ConfigError("--text t.txt: no such file")
    outcomes = [None, {"rank": 1, "usage": True, "message": "--text t.txt: no such file"},
                {"rank": 2, "usage": False, "message": "out of memory"}]
    with pytest.raises(AgreedUsageError) as caught:
        _raise_agreed(outcomes, local)
    assert str(caught.value) == "rank 1/3: --text t.txt: no such file" and caught.value.agreed
    assert caught.value.__cause__ is local and caught.value.failed_rank == 1
    with pytest.raises(AgreedDistributedError) as caught:
        _raise_agreed([None, None, {"rank": 2, "usage": False, "message": "rank 2/3: out of memory"}], None)
    assert str(caught.value) == "rank 2/3: out of memory" and caught.value.__cause__ is None  # named once
    assert isinstance(caught.value, DistributedError) and not isinstance(caught.value, UsageError)
    _raise_agreed([None, None], None)  # nobody failed: nothing raised


def test_collectives_refuse_several_processes_without_a_group(monkeypatch):
    from attnlab.distributed import all_gather_bytes, all_sum, barrier

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for call in (lambda: all_sum([1.0], "the loss"), lambda: all_gather_bytes(b"x", "the loss"),
                 lambda: gather_to_main(b"x", "the loss"), lambda: barrier("the loss"),
                 lambda: broadcast_json(1, "the loss"), lambda: agree("the loss", lambda: 1),
                 lambda: sync_step(1.0, None, "the loss")):
        with pytest.raises(DistributedError, match=r"^rank 1/2: the loss needs the process group, but WORLD_SIZE "
                                                   r"> 1 and none runs"):
            call()


def test_rank_device_gives_each_rank_its_gpu_and_refuses_what_cannot_work(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device("cuda:1") == "cuda:1" and rank_device("cuda") == "cuda"  # one process: as given
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("cuda") == "cuda:1" and rank_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match=r"^--device cuda:0 under 4 processes would put every rank on GPU 0; "
                                          r"pass --device cuda"):
        rank_device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError, match=r"^rank 3/4 needs cuda:2 \(LOCAL_RANK 2\) but this machine has 2 GPU"):
        rank_device("cuda")


def test_the_timeout_and_the_fault_hook_are_read_from_the_environment(monkeypatch):
    from datetime import timedelta

    from attnlab.distributed import TIMEOUT, dist_timeout, fail_point

    monkeypatch.delenv("ATTNLAB_DIST_TIMEOUT", raising=False)
    assert dist_timeout() == TIMEOUT == timedelta(hours=6)
    monkeypatch.setenv("ATTNLAB_DIST_TIMEOUT", "90.5")
    assert dist_timeout() == timedelta(seconds=90.5)
    for bad in ("0", "-3", "soon", "inf"):
        monkeypatch.setenv("ATTNLAB_DIST_TIMEOUT", bad)
        with pytest.raises(ConfigError, match=f"^ATTNLAB_DIST_TIMEOUT must be a positive number of seconds, "
                                              f"got '{bad}'$"):
            dist_timeout()
    monkeypatch.setenv("ATTNLAB_TEST_KILL_RANK", "1:x")
    with pytest.raises(ConfigError, match=r"^ATTNLAB_TEST_KILL_RANK must be RANK:AFTER \(two integers, e\.g\. "
                                          r"1:3\), got '1:x'$"):
        fail_point(0)
    monkeypatch.setenv("ATTNLAB_TEST_KILL_RANK", "1:3")
    fail_point(5)  # rank 0 here: not the one to die


SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from attnlab.distributed import (agree, all_gather_bytes, all_gather_json, all_sum, broadcast_json,
                                     distributed, fail_point, gather_to_main, shard_range, sync_step)
    from attnlab.errors import AgreedDistributedError, AgreedUsageError, ConfigError, DistributedError

    def usage(rank):
        if rank == 1:
            raise ConfigError("--text t.txt: no such file")

    with distributed("cpu") as w:
        try:
            total = all_sum([w.rank + 1.0, 1.0])
            parts = all_gather_bytes(b"x" * (w.rank + 1))
            items = all_gather_json({"rank": w.rank, "shard": list(shard_range(5, w))})
            chosen = broadcast_json({"seed": 7} if w.is_main else {"seed": -1})
            mains = gather_to_main(b"y" * (w.rank + 2), "the states")
            count = sync_step(w.rank + 0.5)
            agreed = []
            try:
                agree("the set-up", lambda: usage(w.rank))
            except AgreedUsageError as error:
                agreed.append([str(error), type(error.__cause__).__name__])
            try:
                sync_step(1.0, RuntimeError("boom\\\\nmore") if w.is_main else None)
            except AgreedDistributedError as error:
                agreed.append([str(error), type(error.__cause__).__name__])
            fail_point(1)
            all_sum([1.0])
        except DistributedError as error:
            print("ERROR " + str(error), flush=True)
            sys.exit(1)
        print(json.dumps({"rank": w.rank, "total": total.tolist(), "parts": [len(p) for p in parts],
                          "items": items, "chosen": chosen, "mains": mains and [len(p) for p in mains],
                          "count": count, "agreed": agreed}), flush=True)
""")


def _script(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(SCRIPT)
    return script


def _results(stdout):
    return {result["rank"]: result for result in map(json.loads, (x for x in stdout.splitlines() if x[:1] == "{"))}


@pytest.mark.distributed
def test_collectives_on_two_gloo_processes(tmp_path):
    done = run_torchrun([_script(tmp_path)])
    assert done.returncode == 0, done.stderr[-2000:]
    results = _results(done.stdout)
    assert results[0]["total"] == results[1]["total"] == [3.0, 2.0]
    assert results[0]["parts"] == [1, 2]
    assert results[0]["items"] == [{"rank": 0, "shard": [0, 1, 2]}, {"rank": 1, "shard": [3, 4]}]
    assert results[0]["chosen"] == results[1]["chosen"] == {"seed": 7}
    assert results[0]["mains"] == [2, 3] and results[1]["mains"] is None  # rank 0 alone holds the gathered states
    assert results[0]["count"] == results[1]["count"] == 2.0
    usage, runtime = "rank 1/2: --text t.txt: no such file", "rank 0/2: boom"
    assert results[0]["agreed"] == [[usage, "NoneType"], [runtime, "RuntimeError"]]  # the failing rank chains
    assert results[1]["agreed"] == [[usage, "ConfigError"], [runtime, "NoneType"]]


@pytest.mark.distributed
def test_a_rank_that_dies_fails_the_run_with_a_line_naming_the_survivor(tmp_path):
    done = run_torchrun([_script(tmp_path)], env={"ATTNLAB_TEST_KILL_RANK": "1:1"})
    assert done.returncode != 0
    errors = [x for x in done.stdout.splitlines() if x.startswith("ERROR ")]
    # rank 0 is either told by gloo (our one line) or stopped by torchrun first; torchrun names the dead rank
    assert len(errors) <= 1 and all(x.startswith("ERROR rank 0/2: another rank failed during a sum")
                                    for x in errors), errors
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s+exitcode\s*:\s*17", done.stderr), done.stderr[-2000:]


def _raise(error):
    def call():
        raise error
    return call


def test_a_peer_error_keeps_only_the_useful_part_of_gloos_message():
    fail = _raise(RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                               "[127.0.0.1]:28310: Connection reset by peer. This is typically caused by a remote "
                               "worker hanging. GLHF!\nmore"))
    with pytest.raises(DistributedError) as caught:
        collective("a sum", fail)
    assert str(caught.value) == ("rank 0/1: another rank failed during a sum (Read error [127.0.0.1]:28310: "
                                 "Connection reset by peer); no results were written")


def test_only_transport_errors_are_blamed_on_another_rank():
    import torch.distributed as dist

    peers = [ConnectionResetError("Connection reset by peer"), RuntimeError("Connection closed by peer [::1]:7"),
             RuntimeError("Timed out waiting 5000ms for send operation to complete"),
             dist.DistNetworkError("failed to recv, got 0 bytes"),
             RuntimeError("NCCL error: remote process exited or there was a network error")]
    for error in peers:
        with pytest.raises(DistributedError, match=r"^rank 0/1: another rank failed during a sum \("):
            collective("a sum", _raise(error))
    local = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
    with pytest.raises(DistributedError) as caught:
        collective("training step 3", _raise(local))
    assert str(caught.value) == "rank 0/1: training step 3 failed: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert caught.value.__cause__ is local  # --debug shows the original
    with pytest.raises(DistributedError, match="^rank 0/1: a sum failed: NCCL error: invalid usage"):
        collective("a sum", _raise(dist.DistBackendError("NCCL error: invalid usage (two ranks on one GPU)")))
    own = ConfigError("--seq-len 9 is too short")
    with pytest.raises(ConfigError) as caught:
        collective("a sum", _raise(own))
    assert caught.value is own  # attnlab's own errors pass unchanged


def _guarded(error, capsys):
    from attnlab.cli.options import run_guarded

    with pytest.raises(typer.Exit) as exited:
        run_guarded(_raise(error), False)
    return exited.value.exit_code, capsys.readouterr().err


def test_cli_errors_print_on_the_rank_that_has_them_and_agreed_ones_on_rank_0(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _guarded(ConfigError("--text t.txt: no such file"), capsys) == (
        2, "error: rank 1/2: --text t.txt: no such file\n")  # only this rank may know it: it says it
    assert _guarded(RuntimeError("out of memory"), capsys) == (1, "error: rank 1/2: out of memory\n")
    assert _guarded(DistributedError("rank 1/2: another rank failed during x (y)"), capsys) == (
        1, "error: rank 1/2: another rank failed during x (y)\n")  # named once
    assert _guarded(AgreedUsageError("rank 1/2: --text t.txt: no such file"), capsys) == (2, "")  # rank 0 says it
    assert _guarded(AgreedDistributedError("rank 1/2: boom"), capsys) == (1, "")
    monkeypatch.setenv("RANK", "0")
    assert _guarded(AgreedUsageError("rank 1/2: --text t.txt: no such file"), capsys) == (
        2, "error: rank 1/2: --text t.txt: no such file\n")
    assert _guarded(ConfigError("--seq-len 9000 exceeds 128"), capsys) == (
        2, "error: rank 0/2: --seq-len 9000 exceeds 128\n")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert _guarded(ConfigError("--seq-len 9000 exceeds 128"), capsys) == (2, "error: --seq-len 9000 exceeds 128\n")


def test_commands_that_run_in_one_process_are_refused_under_torchrun(monkeypatch):
    from typer.testing import CliRunner

    from attnlab.cli.main import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    runner = CliRunner()
    for args in (["circuit", "--help"], ["render", "results.json"], ["app", "train", "--help"]):
        refused = runner.invoke(app, args)
        assert refused.exit_code == 2, refused.output
        assert refused.stderr == (f"error: rank 1/2: attnlab {args[0]} runs in one process, but torchrun started "
                                  "2; commands that run on several processes: report, probe, eval, train, sweep "
                                  "(and ls, models)\n")
    assert runner.invoke(app, ["ls", "edits"]).exit_code == 0
    assert runner.invoke(app, ["probe", "--help"]).exit_code == 0
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert runner.invoke(app, ["circuit", "--help"]).exit_code == 0


@pytest.mark.distributed
def test_two_launchers_as_two_machines_meet_at_one_address(tmp_path):
    """``--nnodes 2``: one torchrun per "machine" (both on localhost), ranks 0 and 1 meet at --master-addr."""
    import socket

    script = _script(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launchers = [start([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                        "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                        str(script)])
                 for node in (0, 1)]
    done = [finish(launcher) for launcher in launchers]
    assert [d.returncode for d in done] == [0, 0], done[0].stderr[-2000:] + done[1].stderr[-2000:]
    assert _results(done[0].stdout)[0]["items"] == [{"rank": 0, "shard": [0, 1, 2]}, {"rank": 1, "shard": [3, 4]}]
    assert list(_results(done[1].stdout)) == [1]  # each machine prints its own rank's line
