"""Runs over many processes: the rank and world size, the process group, sharding, and the few collectives attnlab
needs, all on ``torch.distributed`` (gloo on CPU, NCCL on CUDA) as launched by ``torchrun``.

    torchrun --nproc-per-node 2 -m attnlab report --out run      # two processes on this machine
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 4 --rdzv-endpoint host:29500 -m attnlab report --out run

A command runs its work inside :func:`distributed`, which starts the process group when ``torchrun`` set
``WORLD_SIZE`` > 1 (and does nothing otherwise); :func:`shard_range` gives each rank a contiguous, balanced slice of
the windows (or items, or jobs); the ranks' additive states come together on every rank through
:func:`all_gather_bytes` (a safetensors payload per rank, :func:`encode_state`) or :func:`all_sum`, and rank 0
writes the results. Nothing here pickles: payloads are safetensors tensors plus a JSON header, the same format as
the per-shard state files a ``--resume`` reads (:func:`write_state_file`).

Errors. A collective that fails because another rank died raises :class:`attnlab.errors.DistributedError` with a
one-line message naming this rank (:func:`collective`); ``torchrun`` then stops the remaining ranks and exits
non-zero. An error that one rank raises while the others are well is made known to every rank by :func:`agree`
(around a phase: set-up, writing) or :func:`sync_step` (folded into the per-step count), so every rank stops with
the same one-line message naming the failing rank instead of waiting in the next collective.

Timeout. A collective waits ``ATTNLAB_DIST_TIMEOUT`` seconds (default 6 hours: :data:`TIMEOUT`) for a rank that
is alive but slower (uneven work is normal: the last shard, the longest sweep job). A *dead* peer does not need the
timeout: on gloo its closed socket fails the collective at once, and on one machine ``torchrun`` stops the
surviving ranks as soon as one exits non-zero. Only a rank that hangs, or a dead NCCL peer on another machine
(no agent stops the other machines' workers), waits for the whole timeout; lower it for such runs.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from attnlab.errors import (AgreedDistributedError, AgreedUsageError, ConfigError, DistributedError,
                            UsageError)

__all__ = [
    "World", "agree", "all_gather_bytes", "all_gather_json", "all_sum", "barrier", "broadcast_json", "collective",
    "decode_state", "dist_timeout", "distributed", "encode_state", "fail_point", "gather_to_main", "rank_device",
    "read_state_file", "shard_range", "sync_step", "world", "write_state_file",
]

T = TypeVar("T")
TIMEOUT = timedelta(hours=6)
"""How long a collective waits for a rank that is alive but slow, unless ``ATTNLAB_DIST_TIMEOUT`` (seconds) says
otherwise (:func:`dist_timeout`); a dead gloo peer's closed socket fails a collective at once."""
TIMEOUT_ENV = "ATTNLAB_DIST_TIMEOUT"


@dataclass(frozen=True)
class World:
    """Where this process sits: ``rank`` in ``0..size-1``, ``local_rank`` on its machine (the GPU it uses)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes results and shows progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when more than one process takes part."""
        return self.size > 1

    def label(self) -> str:
        """``"rank 1/4"`` (for messages)."""
        return f"rank {self.rank}/{self.size}"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise DistributedError(f"environment variable {name} must be an integer, got {value!r}") from None


def world() -> World:
    """This process's :class:`World`: from the process group when one is running, else from the variables
    ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), else a single process (rank 0 of 1)."""
    import torch.distributed as dist

    local = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), local)
    return World(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), local)


def dist_timeout() -> timedelta:
    """The process group's timeout: ``ATTNLAB_DIST_TIMEOUT`` seconds (a positive number) or :data:`TIMEOUT`.

    Raises:
        ConfigError: the variable is set but not a positive number of seconds.
    """
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return timedelta(seconds=seconds)


def launched() -> bool:
    """True when a launcher asked for more than one process (``WORLD_SIZE`` > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


@contextmanager
def distributed(device: str | torch.device = "cpu") -> Iterator[World]:
    """Run the body inside the process group ``torchrun`` asked for; yields this process's :class:`World`.

    Starts the group when ``WORLD_SIZE`` > 1 and none is running (backend ``nccl`` for a CUDA ``device``, with this
    rank's GPU ``cuda:LOCAL_RANK`` made current; ``gloo`` otherwise; timeout :func:`dist_timeout`) and destroys it
    on the way out. A single process, or a group someone else started (a test, an outer command), is used as it
    is. Nested use is a no-op.

    Raises:
        ConfigError: a bad ``ATTNLAB_DIST_TIMEOUT``, or a CUDA ``device`` this rank cannot take (:func:`rank_device`).
        DistributedError: the group cannot start (a missing ``MASTER_ADDR``, an unreachable rendezvous).
    """
    import torch.distributed as dist

    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield world()
        return
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = torch.device(device).type == "cuda"
    timeout = dist_timeout()
    if cuda:
        torch.cuda.set_device(torch.device(rank_device(str(device))))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    except (RuntimeError, ValueError) as error:
        raise DistributedError(f"rank {_env_int('RANK', 0)}: cannot start the process group: "
                               f"{_first_line(error)}") from None
    try:
        yield world()
    finally:
        dist.destroy_process_group()


def rank_device(device: str) -> str:
    """The device this rank computes on: under several processes a bare ``"cuda"`` becomes ``cuda:LOCAL_RANK``
    (one GPU each); anything else (and everything in one process) is returned as given.

    Raises:
        ConfigError: under several processes, an explicit ``cuda:K`` (every rank would use GPU K), or a
            ``LOCAL_RANK`` with no GPU of that number on this machine.
    """
    current = world()
    try:
        kind = torch.device(device)
    except (RuntimeError, ValueError):
        return device  # not a device name: the loader says so
    if not current.active or kind.type != "cuda":
        return device
    if kind.index is not None:
        raise ConfigError(f"--device {device} under {current.size} processes would put every rank on GPU "
                          f"{kind.index}; pass --device cuda (each rank takes cuda:LOCAL_RANK)")
    count = torch.cuda.device_count()
    if current.local_rank >= count:
        raise ConfigError(f"{current.label()} needs cuda:{current.local_rank} (LOCAL_RANK {current.local_rank}) "
                          f"but this machine has {count} GPU(s); start at most {count} processes per machine")
    return f"cuda:{current.local_rank}"


def shard_range(count: int, current: World | None = None) -> range:
    """This rank's contiguous slice of ``range(count)``: balanced, the first ``count % size`` ranks take one more.

    Deterministic in ``(count, rank, size)``; the slices of all ranks, in rank order, are ``range(count)``. A rank
    may get an empty range (more ranks than items)."""
    current = current or world()
    base, extra = divmod(count, current.size)
    start = current.rank * base + min(current.rank, extra)
    return range(start, start + base + (current.rank < extra))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _peer_error(error: BaseException) -> str:
    """The useful part of a backend's message: gloo's ``[path/pair.cc:537] Read error [addr]: Connection reset by
    peer. This is typically caused by ...`` becomes ``Read error [addr]: Connection reset by peer``."""
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", _first_line(error))
    return text.split(". ", 1)[0].rstrip(".")


_PEER_SIGNS = re.compile(r"connection (?:reset|closed|refused)|broken pipe|timed out|remote process exited|"
                         r"communicator was aborted|socket closed|end of file|no route to host", re.IGNORECASE)
_LOCAL_SIGNS = re.compile(r"invalid usage|invalid argument|out of memory", re.IGNORECASE)


def _is_peer_failure(error: BaseException) -> bool:
    """True for a transport failure (another rank died, hung or cut the connection): a ``ConnectionError``, a
    ``torch.distributed.DistError`` (backend, network, store) that is not a local NCCL usage or memory error, or
    a message with a gloo/NCCL peer signature (``Connection reset by peer``, ``Timed out``, ``remote process
    exited``)."""
    import torch.distributed as dist

    text = str(error)
    if isinstance(error, ConnectionError):
        return True
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error) and not _LOCAL_SIGNS.search(text):
        return True
    return bool(_PEER_SIGNS.search(text))


def collective(what: str, call: Callable[[], T]) -> T:
    """Run one collective call (or a call that contains one, such as DDP's ``backward``).

    Raises:
        DistributedError: a transport failure (:func:`_is_peer_failure`) becomes ``rank 0/2: another rank failed
            during WHAT (<the backend's line>); no results were written``; any other ``RuntimeError`` (a CUDA
            out-of-memory, an autograd error, an NCCL usage error) becomes ``rank 0/2: WHAT failed: <its first
            line>``, chained to it. attnlab's own errors pass unchanged.
    """
    try:
        return call()
    except (RuntimeError, ConnectionError) as error:
        if isinstance(error, DistributedError):
            raise
        current = world()
        if _is_peer_failure(error):
            raise DistributedError(f"{current.label()}: another rank failed during {what} "
                                   f"({_peer_error(error)}); no results were written") from None
        raise DistributedError(f"{current.label()}: {what} failed: {_first_line(error)}") from error


def _group_running(what: str) -> bool:
    """True when a process group of several ranks runs; False for one process.

    Raises:
        DistributedError: ``WORLD_SIZE`` > 1 but no process group runs (the results would be this rank's alone).
    """
    import torch.distributed as dist

    current = world()
    if not current.active:
        return False
    if dist.is_available() and dist.is_initialized():
        return True
    raise DistributedError(f"{current.label()}: {what} needs the process group, but WORLD_SIZE > 1 and none runs; "
                           "run the work inside attnlab.distributed.distributed()")


def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: Tensor | list[float], what: str = "a sum") -> Tensor:
    """The elementwise sum of ``values`` over all ranks (float64, on the CPU); ``values`` itself when one process
    runs. Every rank must call it with the same shape.

    Raises:
        DistributedError: a peer failed (:func:`collective`), or several processes but no group (:func:`distributed`).
    """
    import torch.distributed as dist

    tensor = torch.as_tensor(values, dtype=torch.float64).detach().clone()
    if not _group_running(what):
        return tensor.cpu()
    moved = tensor.to(_comm_device())
    collective(what, lambda: dist.all_reduce(moved, op=dist.ReduceOp.SUM))
    return moved.cpu()


def _padded(data: bytes, what: str) -> tuple[list[int], Tensor]:
    """Every rank's payload length (rank order) and this rank's ``data`` as a uint8 tensor padded to the longest."""
    import torch.distributed as dist

    device = _comm_device()
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world().size)]
    collective(what, lambda: dist.all_gather(sizes, size))
    lengths = [int(s.item()) for s in sizes]
    mine = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    if data:
        mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    return lengths, mine


def all_gather_bytes(data: bytes, what: str = "results") -> list[bytes]:
    """Every rank's ``data``, in rank order, on every rank (``[data]`` when one process runs).

    Sizes may differ: the lengths are exchanged first, then the payloads padded to the longest. Memory per rank
    is ``size × longest``: use :func:`gather_to_main` when only rank 0 needs them."""
    import torch.distributed as dist

    if not _group_running(what):
        return [data]
    lengths, mine = _padded(data, what)
    gathered = [torch.zeros_like(mine) for _ in lengths]
    collective(what, lambda: dist.all_gather(gathered, mine))
    return [bytes(t[:n].cpu().numpy().tobytes()) for t, n in zip(gathered, lengths)]


def gather_to_main(data: bytes, what: str = "results") -> list[bytes] | None:
    """Every rank's ``data`` in rank order on rank 0 (``None`` on the other ranks); ``[data]`` in one process.

    The lengths are exchanged, then one ``dist.gather`` of the padded payloads to rank 0 (gloo and NCCL): only rank
    0 holds ``size × longest`` bytes.

    Raises:
        DistributedError: a peer failed (:func:`collective`), or several processes but no group.
    """
    import torch.distributed as dist

    if not _group_running(what):
        return [data]
    lengths, mine = _padded(data, what)
    main = world().is_main
    gathered = [torch.zeros_like(mine) for _ in lengths] if main else None
    collective(what, lambda: dist.gather(mine, gather_list=gathered, dst=0))
    if gathered is None:
        return None
    return [bytes(t[:n].cpu().numpy().tobytes()) for t, n in zip(gathered, lengths)]


def all_gather_json(value: Any, what: str = "results") -> list[Any]:
    """Every rank's JSON-serialisable ``value``, in rank order, on every rank (floats round-trip exactly)."""
    return [json.loads(part) for part in all_gather_bytes(json.dumps(value).encode(), what)]


def broadcast_json(value: Any, what: str = "settings") -> Any:
    """Rank 0's JSON-serialisable ``value`` on every rank (other ranks' ``value`` is ignored): its length, then its
    bytes, by ``dist.broadcast``. One process gets ``value`` back through JSON (tuples become lists)."""
    import torch.distributed as dist

    data = json.dumps(value).encode() if world().is_main else b""
    if not _group_running(what):
        return json.loads(data)
    device = _comm_device()
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    collective(what, lambda: dist.broadcast(size, src=0))
    payload = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if data:
        payload[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    collective(what, lambda: dist.broadcast(payload, src=0))
    return json.loads(bytes(payload.cpu().numpy().tobytes()))


def barrier(what: str = "a barrier") -> None:
    """Wait until every rank gets here (nothing when one process runs).

    Raises:
        DistributedError: a peer failed, or several processes but no group.
    """
    import torch.distributed as dist

    if _group_running(what):
        collective(what, dist.barrier)


def _outcome(error: BaseException) -> dict[str, Any]:
    """What a rank tells the others about its failure: its rank (the failing rank's, for an already agreed
    error), whether it is a usage error, and its one-line message."""
    if getattr(error, "agreed", False):
        return {"rank": error.failed_rank, "usage": isinstance(error, UsageError),  # type: ignore[attr-defined]
                "message": error.detail}  # type: ignore[attr-defined]
    return {"rank": world().rank, "usage": isinstance(error, UsageError), "message": _first_line(error)}


def _raise_agreed(outcomes: list[dict[str, Any] | None], local: BaseException | None) -> None:
    """Raise on every rank the first failing rank's outcome (lowest rank) as an agreed error; nothing if none
    failed. Usage errors stay usage errors (exit 2), the rest become :class:`AgreedDistributedError` (exit 1)."""
    failed = [outcome for outcome in outcomes if outcome is not None]
    if not failed:
        return
    first = min(failed, key=lambda outcome: outcome["rank"])
    label = f"rank {first['rank']}/{len(outcomes)}: "
    detail = first["message"][len(label):] if first["message"].startswith(label) else first["message"]
    kind = AgreedUsageError if first["usage"] else AgreedDistributedError
    agreed = kind(label + detail)
    agreed.failed_rank, agreed.detail = first["rank"], detail  # type: ignore[attr-defined]
    if local is not None:
        raise agreed from local
    raise agreed


def agree(what: str, work: Callable[[], T]) -> T:
    """``work()`` on every rank, then one exchange of the outcomes: if any rank raised, every rank raises.

    One process: ``work()`` as it is (its exceptions unchanged). Several: each rank runs ``work()`` (catching
    ``Exception`` only: Ctrl-C and ``SystemExit`` pass through), then one :func:`all_gather_json` of
    ``{"rank", "usage", "message"}`` (or ``None``). When a rank failed, every rank raises the *first* failing
    rank's message as ``rank R/N: <its first line>``: an :class:`attnlab.errors.AgreedUsageError` (exit 2) when it
    was a usage error, else an :class:`attnlab.errors.AgreedDistributedError` (exit 1); both have ``agreed =
    True`` (the CLI prints them on rank 0 only), and the failing rank chains its own exception (``from``).

        out_dir = agree("checking --out", lambda: check_out_dir(out, force=force))

    Raises:
        AgreedUsageError, AgreedDistributedError: as above.
        DistributedError: the exchange itself failed (a peer died: :func:`collective`).
    """
    if not world().active:
        return work()
    _group_running(what)
    try:
        result, error = work(), None
    except Exception as caught:  # noqa: BLE001 - every failure is told to the other ranks, then raised
        result, error = None, caught
    _raise_agreed(all_gather_json(_outcome(error) if error is not None else None, what), error)
    return result  # type: ignore[return-value]


def sync_step(done: float, error: BaseException | None = None, what: str = "the progress count") -> float:
    """The per-step exchange: the sum of ``done`` over all ranks, and any rank's error raised on every rank.

    Call it once per step on every rank (the same number of steps everywhere), passing the exception this rank's
    step raised, if any. One process: returns ``done``, or raises ``error`` itself. Several: one
    :func:`all_gather_json` of ``{"done", "error"}``; if any rank passed an error, every rank (that one included)
    raises as :func:`agree` does; else the sum over ranks (in rank order, so the same float everywhere).
    """
    if not world().active:
        if error is not None:
            raise error
        return float(done)
    sent = {"done": float(done), "error": _outcome(error) if error is not None else None}
    received = all_gather_json(sent, what)
    _raise_agreed([part["error"] for part in received], error)
    return float(sum(part["done"] for part in received))


def encode_state(tensors: dict[str, Tensor], meta: dict[str, Any] | None = None) -> bytes:
    """A safetensors payload of ``tensors`` (moved to the CPU, made contiguous) with ``meta`` (JSON) in its header
    under ``"attnlab"``; :func:`decode_state` reads it back."""
    from safetensors.torch import save

    cpu = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors.items()}
    return save(cpu, metadata={"attnlab": json.dumps(meta or {})})


def _header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise DistributedError(f"a state payload of {len(data)} bytes is too short for a safetensors header")
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length])


def decode_state(data: bytes) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` from an :func:`encode_state` payload (CPU tensors)."""
    from safetensors.torch import load

    meta = _header(data).get("__metadata__", {}).get("attnlab", "{}")
    return load(data), json.loads(meta)


def write_state_file(path: str | os.PathLike[str], tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write an :func:`encode_state` payload to ``path`` atomically (:func:`attnlab.io_utils.atomic_write_bytes`:
    a temp file beside it, fsync, rename): a reader sees the old file or the whole new one, never a part.

    Raises:
        ConfigError: the folder cannot be created or written.
    """
    from attnlab.io_utils import atomic_write_bytes

    return atomic_write_bytes(path, encode_state(tensors, meta))


def read_state_file(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` from a file :func:`write_state_file` wrote.

    Raises:
        DistributedError: the file is not a complete state file (cut short, not safetensors).
    """
    try:
        return decode_state(Path(path).read_bytes())
    except (ValueError, OSError, struct.error, json.JSONDecodeError) as error:
        raise DistributedError(f"{path}: not a readable attnlab state file ({_first_line(error)})") from None


FAIL_ENV = "ATTNLAB_TEST_KILL_RANK"
"""Fault injection for tests: ``RANK:AFTER`` makes that rank exit abruptly (``os._exit(17)``, no message, no
clean-up: as if it were killed) once ``AFTER`` units of work are done (:func:`fail_point`)."""


@functools.lru_cache(maxsize=8)
def _fail_spec(spec: str) -> tuple[int, int]:
    """``(rank, after)`` from a :data:`FAIL_ENV` value (parsed once per value); ConfigError if malformed."""
    rank, sep, after = spec.partition(":")
    try:
        return int(rank), int(after) if sep else 0
    except ValueError:
        raise ConfigError(f"{FAIL_ENV} must be RANK:AFTER (two integers, e.g. 1:3), got {spec!r}") from None


def fail_point(done: int) -> None:
    """Die here if :data:`FAIL_ENV` names this rank and ``done`` units of work are complete (tests only).

    Raises:
        ConfigError: :data:`FAIL_ENV` is set but not ``RANK:AFTER``.
    """
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return
    rank, after = _fail_spec(spec)
    if rank == world().rank and done >= after:
        os._exit(17)
