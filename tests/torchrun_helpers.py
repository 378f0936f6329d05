"""Launching several processes in tests: ``torchrun`` (or ``python -m attnlab``) in a session of its own, so that a
hung run is stopped with all its ranks, never left behind as orphans.

    done = run_attnlab(["probe", "--model", str(model), "--out", str(out)], nproc=2)   # torchrun, 2 ranks
    base = run_attnlab(["probe", "--model", str(model), "--out", str(out1)], nproc=1)  # plain python -m attnlab
    done = run_torchrun([str(script)], nproc=2, env={"ATTNLAB_TEST_KILL_RANK": "1:1"})
    launcher = start([...]); result = finish(launcher, timeout=120)                     # several launchers at once

Every run gets ``OMP_NUM_THREADS=1`` and this checkout's ``src`` first on ``PYTHONPATH``, then ``env`` on top.
Results are :class:`subprocess.CompletedProcess` (text stdout and stderr). A run that passes its ``timeout`` has
its whole process group stopped (SIGTERM, then SIGKILL after :data:`GRACE` seconds) and fails the test with the
tail of its stderr.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
GRACE = 10.0
"""Seconds between SIGTERM and SIGKILL when a run is stopped."""
TIMEOUT = 300.0
"""Default seconds a run may take."""


def launch_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a launched run: this one, ``OMP_NUM_THREADS=1``, ``src`` first on ``PYTHONPATH``, then
    ``env``."""
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}


def start(command: Sequence[str], env: Mapping[str, str] | None = None,
          cwd: str | os.PathLike[str] | None = None) -> subprocess.Popen[str]:
    """Start ``command`` in a new session (its own process group), stdout and stderr captured as text."""
    return subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=launch_env(env), cwd=cwd, start_new_session=True)


def _stop(process: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGTERM the process group, SIGKILL it after GRACE seconds; the output read so far."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            return process.communicate(timeout=GRACE)
        except subprocess.TimeoutExpired:
            continue
    return process.communicate()


def finish(process: subprocess.Popen[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Wait for a :func:`start` ed run; on ``timeout`` (or an interrupted test) stop its whole process group, and
    fail the test with the tail of its stderr when it timed out."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = _stop(process)
        pytest.fail(f"{' '.join(map(str, process.args))} ran past {timeout:.0f} s; its process group was "
                    f"stopped. stderr tail:\n{(stderr or '')[-3000:]}")
    except BaseException:
        _stop(process)
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_torchrun(args: Sequence[str], nproc: int = 2, env: Mapping[str, str] | None = None,
                 timeout: float = TIMEOUT, cwd: str | os.PathLike[str] | None = None
                 ) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node NPROC ARGS`` (``ARGS``: a script and its
    arguments, or ``-m module ...``), run to the end (see :func:`finish`)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               *map(str, args)]
    return finish(start(command, env, cwd), timeout)


def run_attnlab(args: Sequence[str], nproc: int = 2, env: Mapping[str, str] | None = None,
                timeout: float = TIMEOUT, cwd: str | os.PathLike[str] | None = None
                ) -> subprocess.CompletedProcess[str]:
    """``attnlab ARGS`` on ``nproc`` processes: torchrun for ``nproc`` > 1, a plain ``python -m attnlab`` (the
    one-process baseline, no launcher) for ``nproc == 1``."""
    if nproc == 1:
        return finish(start([sys.executable, "-m", "attnlab", *map(str, args)], env, cwd), timeout)
    return run_torchrun(["-m", "attnlab", *args], nproc, env, timeout, cwd)
