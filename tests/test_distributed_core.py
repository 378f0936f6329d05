"""attnlab.distributed: sharding, payloads, state files, and the collectives across two real gloo processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnlab.distributed import (World, decode_state, encode_state, read_state_file, shard_range, world,
                                 write_state_file)
from attnlab.errors import DistributedError


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


def test_state_file_is_written_atomically_and_bad_files_are_refused(tmp_path):
    path = write_state_file(tmp_path / "s" / "shard-0.safetensors", {"x": torch.ones(2)}, {"i": 0})
    assert sorted(p.name for p in path.parent.iterdir()) == ["shard-0.safetensors"]  # no temp file left
    tensors, meta = read_state_file(path)
    assert torch.equal(tensors["x"], torch.ones(2)) and meta == {"i": 0}
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DistributedError, match="not a readable attnlab state file"):
        read_state_file(path)


SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from attnlab.distributed import (all_gather_bytes, all_gather_json, all_sum, broadcast_json, distributed,
                                     fail_point, shard_range)
    from attnlab.errors import DistributedError
    with distributed("cpu") as w:
        try:
            total = all_sum([w.rank + 1.0, 1.0])
            parts = all_gather_bytes(b"x" * (w.rank + 1))
            items = all_gather_json({"rank": w.rank, "shard": list(shard_range(5, w))})
            chosen = broadcast_json({"seed": 7} if w.is_main else {"seed": -1})
            fail_point(1)
            all_sum([1.0])
        except DistributedError as error:
            print("ERROR " + str(error), flush=True)
            sys.exit(1)
        if w.is_main:
            print(json.dumps({"total": total.tolist(), "parts": [len(p) for p in parts], "items": items,
                              "chosen": chosen}), flush=True)
""")


def _torchrun(tmp_path, env_extra=None):
    script = tmp_path / "collectives.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(script)], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.distributed
def test_collectives_on_two_gloo_processes(tmp_path):
    import json

    done = _torchrun(tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("{")][0]
    result = json.loads(line)
    assert result["total"] == [3.0, 2.0]
    assert result["parts"] == [1, 2]
    assert result["items"] == [{"rank": 0, "shard": [0, 1, 2]}, {"rank": 1, "shard": [3, 4]}]
    assert result["chosen"] == {"seed": 7}


@pytest.mark.distributed
def test_a_rank_that_dies_fails_the_run_with_a_line_naming_the_survivor(tmp_path):
    done = _torchrun(tmp_path, {"ATTNLAB_TEST_KILL_RANK": "1:1"})
    assert done.returncode != 0
    errors = [x for x in done.stdout.splitlines() if x.startswith("ERROR ")]
    # rank 0 is either told by gloo (our one line) or stopped by torchrun first; torchrun names the dead rank
    assert all(x.startswith("ERROR rank 0/2: another rank failed during a sum") for x in errors), errors
    assert "rank" in done.stderr and ": 1 (local_rank: 1)" in done.stderr.replace("rank      ", "rank")


def test_a_peer_error_keeps_only_the_useful_part_of_gloos_message():
    from attnlab.distributed import collective

    def fail():
        raise RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                           "[127.0.0.1]:28310: Connection reset by peer. This is typically caused by a remote worker "
                           "hanging. GLHF!\nmore")

    with pytest.raises(DistributedError) as caught:
        collective("a sum", fail)
    assert str(caught.value) == ("rank 0/1: another rank failed during a sum (Read error [127.0.0.1]:28310: "
                                 "Connection reset by peer); no results were written")


@pytest.mark.distributed
def test_two_launchers_as_two_machines_meet_at_one_address(tmp_path):
    """``--nnodes 2``: one torchrun per "machine" (both on localhost), ranks 0 and 1 meet at --master-addr."""
    import json
    import socket

    script = tmp_path / "collectives.py"
    script.write_text(SCRIPT)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launchers = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                                   str(node), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                                   "--master-port", str(port), str(script)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for node in (0, 1)]
    outputs = [launcher.communicate(timeout=300) for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    line = [x for x in outputs[0][0].splitlines() if x.startswith("{")][0]
    assert json.loads(line)["items"] == [{"rank": 0, "shard": [0, 1, 2]}, {"rank": 1, "shard": [3, 4]}]
    assert not [x for x in outputs[1][0].splitlines() if x.startswith("{")]  # rank 1 prints nothing
