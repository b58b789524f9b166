"""Several processes, one run: rank and world from the launcher, deterministic sharding, collectives.

``torchrun --nproc-per-node N`` and ``accelerate launch`` start one process per device and describe it in the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :func:`setup` reads it and
initialises ``torch.distributed`` (``env://``) when the world has more than one process and nobody has initialised
it yet: on CUDA the backend is ``"cpu:gloo,cuda:nccl"`` (tensors on the GPU go through NCCL, pickled objects through
Gloo in host memory) and the process takes the GPU of its ``LOCAL_RANK``; on the CPU it is Gloo. Without such an
environment every collective here is the identity, so single-process code paths stay as they are.

Work is sharded by index: item ``i`` belongs to rank ``i % world_size`` (:func:`shard`), so for a given world size an
item always lands on the same rank, and a rerun of a crashed run finds each rank's finished items where it left
them. :func:`gather_in_order` collects per-item results on every rank in index order, one round of
``all_gather_object`` per ``world_size`` items (bounded memory per collective); :func:`all_reduce_sum` sums count
tensors; writes that must happen once are guarded with :func:`is_main_process`.

Waiting: a rank that has finished its share waits in the next collective for the slowest rank (after a resume one
rank may hold much more remaining work than another), so the process group is created with a long timeout:
``MOE_FASTMASK_DIST_TIMEOUT`` seconds, default 6 hours.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Mapping

import torch

TIMEOUT_ENV = "MOE_FASTMASK_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 6 * 3600

_initialized_here = False
_object_group = None

# Modules with a ``group=dist.group.WORLD`` default argument. Imported after ``init_process_group`` (transformers
# imports the FSDP one when it loads a model), that default holds the default group past ``destroy_process_group``:
# its Gloo worker threads then outlive the interpreter and abort the process at exit. Imported first, they hold None.
_MODULES_DEFAULTING_TO_WORLD = (
    "torch.distributed.fsdp.sharded_grad_scaler",
    "torch.distributed.optim.zero_redundancy_optimizer",
    "torch.distributed.nn.functional",
)


@dataclass(frozen=True)
class DistState:
    """This process's place in the run. ``device``: where its model and count tensors live."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes shared files."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by the launcher (1 when not launched by torchrun / accelerate launch)."""
    return _env_int("WORLD_SIZE", 1)


def launched_rank() -> int:
    """``RANK`` set by the launcher (0 when not launched by torchrun / accelerate launch); readable before a process
    group is up and after it is torn down."""
    return _env_int("RANK", 0)


def is_initialized() -> bool:
    """True when a torch.distributed process group is up."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return torch.distributed.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """How many processes take part (1 without a process group)."""
    return torch.distributed.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and without a process group)."""
    return get_rank() == 0


def timeout() -> timedelta:
    """The collectives' timeout: ``MOE_FASTMASK_DIST_TIMEOUT`` seconds, 6 hours by default."""
    return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S))


def _resolve_device(device: str | None, local_rank: int, world_size: int) -> str:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world_size > 1:
        device = f"cuda:{local_rank}"  # one GPU per process; an explicit "cuda:N" is kept as given
    return device


def setup(device: str | None = None) -> DistState:
    """Join the process group the launcher described (initialising it if needed); idempotent.

    ``device``: ``None`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` (with several processes: the GPU of
    ``LOCAL_RANK``) or an explicit ``"cuda:N"``. Returns the rank, world size, local rank and resolved device.
    """
    global _initialized_here
    world_size = get_world_size() if is_initialized() else launched_world_size()
    local_rank = _env_int("LOCAL_RANK", 0)
    resolved = _resolve_device(device, local_rank, world_size)
    if world_size > 1 and not is_initialized():
        if not torch.distributed.is_available():
            raise RuntimeError(f"WORLD_SIZE={world_size} but this PyTorch build has no torch.distributed")
        for module in _MODULES_DEFAULTING_TO_WORLD:
            with contextlib.suppress(ImportError):
                importlib.import_module(module)
        if torch.device(resolved).type == "cuda":
            torch.cuda.set_device(torch.device(resolved))
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        torch.distributed.init_process_group(backend=backend, timeout=timeout())
        _initialized_here = True
    elif world_size > 1 and torch.device(resolved).type == "cuda":
        torch.cuda.set_device(torch.device(resolved))
    return DistState(rank=get_rank(), world_size=world_size, local_rank=local_rank, device=resolved)


def teardown(*, owned_only: bool = True) -> None:
    """Destroy the process group if :func:`setup` created it (the launcher's processes then exit cleanly).

    ``owned_only=False``: whoever initialised it (accelerate, for the Trainer) — for a command's entry point, which
    owns its process. A group left to interpreter shutdown can abort the process at exit (its Gloo worker threads
    may still be releasing work then).
    """
    global _initialized_here, _object_group
    if (_initialized_here or not owned_only) and is_initialized():
        torch.distributed.destroy_process_group()
    _initialized_here = False
    _object_group = None


def _objects_group():
    """A group for pickled objects in host memory: the default one if it has a CPU backend, else a Gloo group."""
    global _object_group
    if _object_group is None:
        if "gloo" in str(torch.distributed.get_backend()):  # "gloo" or "cpu:gloo,cuda:nccl"
            _object_group = torch.distributed.group.WORLD
        else:
            _object_group = torch.distributed.new_group(backend="gloo", timeout=timeout())
    return _object_group


# ------------------------------------------------------------------------------------------------------------
# Sharding
# ------------------------------------------------------------------------------------------------------------


def owner(index: int, world_size: int) -> int:
    """The rank that handles item ``index``."""
    return index % world_size


def shard(num_items: int, rank: int, world_size: int) -> list[int]:
    """The indices rank ``rank`` handles: ``rank, rank + world_size, ...`` (all of them for one process)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    return list(range(rank, num_items, world_size))


# ------------------------------------------------------------------------------------------------------------
# Collectives (each is the identity in a single process)
# ------------------------------------------------------------------------------------------------------------


def barrier() -> None:
    """Wait for every process (a no-op for one process)."""
    if get_world_size() > 1:
        torch.distributed.barrier(group=_objects_group())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=src, group=_objects_group())
    return holder[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    torch.distributed.all_gather_object(out, obj, group=_objects_group())
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. "I failed")."""
    if get_world_size() == 1:
        return bool(flag)
    return any(all_gather_object(bool(flag)))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place (on its device: NCCL for CUDA tensors, Gloo for CPU ones)."""
    if get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def gather_in_order(items: Mapping[int, Any], num_items: int) -> list:
    """All items ``0 .. num_items - 1`` on every rank, in index order; rank ``r`` holds those of :func:`shard`.

    Round ``k`` gathers item ``k * world_size + r`` from each rank ``r`` (one ``all_gather_object`` per round, so a
    collective never holds more than one item per rank). A rank missing one of its items raises on every rank.
    """
    world_size, rank = get_world_size(), get_rank()
    expected = shard(num_items, rank, world_size)
    missing = sorted(set(expected) - set(items))
    if any_rank(bool(missing)):
        raise RuntimeError(f"rank {rank} lacks items {missing}" if missing else "another rank lacks some of its items")
    if world_size == 1:
        return [items[index] for index in range(num_items)]
    out = []
    for start in range(0, num_items, world_size):
        index = start + rank
        gathered = all_gather_object(items[index] if index < num_items else None)
        out.extend(gathered[: min(world_size, num_items - start)])
    return out


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds shared files), the other ranks after it (reusing them)."""
    if get_world_size() == 1:
        yield
        return
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()


__all__ = [
    "DistState",
    "all_gather_object",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "broadcast_object",
    "gather_in_order",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "launched_world_size",
    "main_process_first",
    "owner",
    "setup",
    "shard",
    "teardown",
]
