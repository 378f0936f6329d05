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

A collective that fails because another rank died raises :class:`attnlab.errors.DistributedError` with a one-line
message naming this rank (:func:`collective`); ``torchrun`` then stops the remaining ranks and exits non-zero.
"""

from __future__ import annotations

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

from attnlab.errors import DistributedError

__all__ = [
    "World", "all_gather_bytes", "all_gather_json", "all_sum", "barrier", "broadcast_json", "collective",
    "decode_state", "distributed", "encode_state", "fail_point", "rank_device", "read_state_file", "shard_range",
    "world", "write_state_file",
]

T = TypeVar("T")
TIMEOUT = timedelta(minutes=30)
"""How long a collective waits for a rank that is alive but slow (a dead rank's closed socket fails it at once)."""


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


def launched() -> bool:
    """True when a launcher asked for more than one process (``WORLD_SIZE`` > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


@contextmanager
def distributed(device: str | torch.device = "cpu") -> Iterator[World]:
    """Run the body inside the process group ``torchrun`` asked for; yields this process's :class:`World`.

    Starts the group when ``WORLD_SIZE`` > 1 and none is running (backend ``nccl`` for a CUDA ``device``, with this
    rank's GPU ``cuda:LOCAL_RANK`` made current; ``gloo`` otherwise) and destroys it on the way out. A single
    process, or a group someone else started (a test, an outer command), is used as it is. Nested use is a no-op.

    Raises:
        DistributedError: the group cannot start (a missing ``MASTER_ADDR``, an unreachable rendezvous).
    """
    import torch.distributed as dist

    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield world()
        return
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    except (RuntimeError, ValueError) as error:
        raise DistributedError(f"rank {_env_int('RANK', 0)}: cannot start the process group: "
                               f"{_first_line(error)}") from None
    try:
        yield world()
    finally:
        dist.destroy_process_group()


def rank_device(device: str) -> str:
    """The device this rank computes on: a bare ``"cuda"`` becomes ``cuda:LOCAL_RANK`` when several processes run
    (one GPU each); anything else is returned as given."""
    current = world()
    if device == "cuda" and current.active:
        return f"cuda:{current.local_rank}"
    return device


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


def collective(what: str, call: Callable[[], T]) -> T:
    """Run one collective call; a failure (another rank died or timed out) becomes a one-line
    :class:`DistributedError` that names this rank and ``what`` was being exchanged."""
    try:
        return call()
    except (RuntimeError, ConnectionError) as error:
        if isinstance(error, DistributedError):
            raise
        current = world()
        raise DistributedError(f"{current.label()}: another rank failed during {what} "
                               f"({_peer_error(error)}); no results were written") from None


def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: Tensor | list[float], what: str = "a sum") -> Tensor:
    """The elementwise sum of ``values`` over all ranks (float64, on the CPU); ``values`` itself when one process
    runs. Every rank must call it with the same shape."""
    import torch.distributed as dist

    tensor = torch.as_tensor(values, dtype=torch.float64).detach().clone()
    if not world().active or not dist.is_initialized():
        return tensor.cpu()
    moved = tensor.to(_comm_device())
    collective(what, lambda: dist.all_reduce(moved, op=dist.ReduceOp.SUM))
    return moved.cpu()


def all_gather_bytes(data: bytes, what: str = "results") -> list[bytes]:
    """Every rank's ``data``, in rank order, on every rank (``[data]`` when one process runs).

    Sizes may differ: the lengths are exchanged first, then the payloads padded to the longest."""
    import torch.distributed as dist

    current = world()
    if not current.active or not dist.is_initialized():
        return [data]
    device = _comm_device()
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(current.size)]
    collective(what, lambda: dist.all_gather(sizes, size))
    longest = max(int(s.item()) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    if data:
        mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    gathered = [torch.zeros_like(mine) for _ in range(current.size)]
    collective(what, lambda: dist.all_gather(gathered, mine))
    return [bytes(t[:int(s.item())].cpu().numpy().tobytes()) for t, s in zip(gathered, sizes)]


def all_gather_json(value: Any, what: str = "results") -> list[Any]:
    """Every rank's JSON-serialisable ``value``, in rank order, on every rank (floats round-trip exactly)."""
    return [json.loads(part) for part in all_gather_bytes(json.dumps(value).encode(), what)]


def broadcast_json(value: Any, what: str = "settings") -> Any:
    """Rank 0's JSON-serialisable ``value`` on every rank (other ranks' ``value`` is ignored)."""
    return all_gather_json(value if world().is_main else None, what)[0]


def barrier(what: str = "a barrier") -> None:
    """Wait until every rank gets here (nothing when one process runs)."""
    import torch.distributed as dist

    if world().active and dist.is_initialized():
        collective(what, dist.barrier)


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
    """Write an :func:`encode_state` payload to ``path`` atomically (a temp file beside it, then a rename): a
    reader sees the whole file or none."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    temp.write_bytes(encode_state(tensors, meta))
    os.replace(temp, target)
    return target


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


def fail_point(done: int) -> None:
    """Die here if :data:`FAIL_ENV` names this rank and ``done`` units of work are complete (tests only)."""
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return
    rank, _, after = spec.partition(":")
    if int(rank) == world().rank and done >= int(after or 0):
        os._exit(17)
