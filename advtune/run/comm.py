"""Communicators: a no-op one for a single process, torch.distributed for torchrun.

``torchrun --nproc-per-node N -m advtune evaluate ...`` runs N copies of the CLI. Each
reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment and
:func:`init_comm` joins the process group (NCCL on CUDA with device
``cuda:LOCAL_RANK``, gloo on the CPU) plus a gloo *control* group for advtune's small
messages (counts, status, rows), so control traffic never touches the GPUs.

The run loop (:func:`advtune.run.run`) talks to a :class:`Communicator` only: the
single-process one answers every collective with the identity, so one loop serves one
process and N. Device strings (``--device``) are parsed by
:func:`advtune.runtime.parse_device` (re-exported here).
"""

from __future__ import annotations

import datetime
import inspect
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from advtune.errors import UserError
from advtune.runtime import parse_device

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "CommunicationError",
    "Communicator",
    "DistributedRunError",
    "PeerFailed",
    "TorchCommunicator",
    "env_world",
    "init_comm",
    "parse_device",
    "shard",
    "shutdown",
]

#: Seconds a collective may wait for the other ranks (``init_process_group(timeout=)``).
#: Ranks move in step batch by batch, so waits are short (one batch, model loading at
#: start); the default is generous so a slow first download or a large ``--data`` listing
#: on one node never trips it.
TIMEOUT_ENV = "ADVTUNE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 3 * 3600


class DistributedRunError(RuntimeError):
    """Another rank failed (or could not be reached); this rank stopped too.

    The CLI prints it as one line and exits with code 1 on every surviving rank.
    """


class PeerFailed(Exception):
    """Raised inside a rank's batch loop when another rank reported a failure.

    Args:
        ranks: the ranks that failed.
    """

    def __init__(self, ranks: Sequence[int]) -> None:
        self.ranks = sorted(ranks)
        super().__init__(f"rank(s) {', '.join(map(str, self.ranks))} failed")


class CommunicationError(RuntimeError):
    """A collective failed: a peer died or the timeout passed."""


# --------------------------------------------------------------------------- communicators


class Communicator:
    """A single process: rank 0 of 1; every collective is the identity.

    Attributes:
        rank: global rank (``RANK``).
        world_size: number of processes (``WORLD_SIZE``).
        local_rank: rank on this node (``LOCAL_RANK``): the CUDA device index.
        device: this process's device.
        backend: ``"nccl"`` or ``"gloo"``; ``None`` without a process group.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.rank = 0
        self.world_size = 1
        self.local_rank = 0
        self.device = device
        self.backend: str | None = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        return obj

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        return [obj]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0; ``None`` on the others."""
        return [obj]

    def sum(self, values: Sequence[int]) -> list[int]:
        """Element-wise sum of every rank's integers."""
        return [int(v) for v in values]

    def barrier(self) -> None:
        """Wait until every rank got here."""

    def close(self) -> None:
        """Leave the process group (nothing to leave here)."""

    def describe(self) -> dict[str, Any] | None:
        """The job's shape for ``report.json`` (``world_size``, ``backend``); ``None``
        for a single process, whose report has no ``distributed`` block."""
        return None

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run by rank 0 only, its result on every rank.

        A :class:`~advtune.errors.UserError` of rank 0's is raised on every rank, so all
        ranks stop with the same one line (here: ``fn``'s own error).
        """
        return fn()

    def require_same(self, value: Any, *, label: str, what: str, hint: str) -> None:
        """Raise a :class:`~advtune.errors.UserError` unless every rank has ``value``.

        Args:
            value: compared between ranks (picklable, with ``==``).
            label: this rank's value for a person (``"5 images"``), shown per rank.
            what, hint: the message: ``"the ranks list different {what} (...); {hint}"``.
        """


def _collective(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # gloo raises RuntimeError/DistBackendError on a dead peer
        raise CommunicationError(f"{type(e).__name__}: {e}") from e


class TorchCommunicator(Communicator):
    """One rank of a torchrun job; collectives go through the gloo control group.

    Args:
        rank, world_size, local_rank: from :func:`env_world`.
        device: this rank's device (``cuda:LOCAL_RANK`` or ``cpu``).
        backend: the default group's backend.
        group: the gloo control group.
    """

    def __init__(
        self, *, rank: int, world_size: int, local_rank: int, device: str, backend: str,
        group: Any,
    ) -> None:  # fmt: skip
        super().__init__(device)
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.backend = backend
        self.group = group

    def broadcast(self, obj: Any) -> Any:
        box = [obj if self.is_main else None]
        _collective(torch.distributed.broadcast_object_list, box, src=0, group=self.group)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        _collective(torch.distributed.all_gather_object, out, obj, group=self.group)
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        _collective(torch.distributed.gather_object, obj, out, dst=0, group=self.group)
        return out

    def sum(self, values: Sequence[int]) -> list[int]:
        tensor = torch.tensor([int(v) for v in values], dtype=torch.int64)
        _collective(torch.distributed.all_reduce, tensor, group=self.group)
        return [int(v) for v in tensor.tolist()]

    def barrier(self) -> None:
        self.broadcast(None)

    def describe(self) -> dict[str, Any] | None:
        return {"world_size": self.world_size, "backend": self.backend}

    def on_main(self, fn: Callable[[], Any]) -> Any:
        value = message = None
        if self.is_main:
            try:
                value = fn()
            except UserError as e:  # the others wait in broadcast: tell them, all raise
                message = str(e)
        value, message = self.broadcast((value, message))
        if message is not None:
            raise UserError(message)
        return value

    def require_same(self, value: Any, *, label: str, what: str, hint: str) -> None:
        seen = self.all_gather((value, label, socket.gethostname()))
        if len({repr(v) for v, _, _ in seen}) > 1:
            shown = ", ".join(f"rank {r} ({host}): {lab}" for r, (_, lab, host) in enumerate(seen))
            raise UserError(f"the ranks list different {what} ({shown}); {hint}")

    def close(self) -> None:
        shutdown()


def env_world(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment variables.

    Missing variables mean a single process: ``(0, 1, 0)``.

    Raises:
        UserError: a variable that is not a non-negative integer, or a rank outside
            ``[0, world_size)``.
    """
    env = os.environ if environ is None else environ

    def read(name: str, default: int) -> int:
        text = env.get(name)
        if text is None or text.strip() == "":
            return default
        try:
            value = int(text)
        except ValueError:
            raise UserError(f"{name} must be an integer, got {text!r}") from None
        if value < 0:
            raise UserError(f"{name} must be >= 0, got {value}")
        return value

    world = read("WORLD_SIZE", 1)
    if world < 1:
        raise UserError(f"WORLD_SIZE must be >= 1, got {world}")
    rank = read("RANK", 0)
    local = read("LOCAL_RANK", 0)
    if rank >= world:
        raise UserError(f"RANK {rank} is out of range for WORLD_SIZE {world}")
    return rank, world, local


def _timeout() -> datetime.timedelta:
    text = os.environ.get(TIMEOUT_ENV)
    if text is None or text.strip() == "":
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
    if not seconds > 0:
        raise UserError(f"{TIMEOUT_ENV} must be > 0 seconds, got {text!r}")
    return datetime.timedelta(seconds=seconds)


_JOINED: TorchCommunicator | None = None


def init_comm(device: str = "auto") -> Communicator:
    """The communicator for this process, joining the torchrun job if there is one.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) this creates no process group and
    returns a :class:`Communicator` on ``parse_device(device)``. Idempotent.

    Raises:
        UserError: bad environment, a device that cannot be used, or ``cuda:N`` under
            torchrun.
    """
    global _JOINED
    rank, world, local = env_world()
    if world == 1:
        return Communicator(parse_device(device))
    if _JOINED is not None:
        return _JOINED
    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; run a single process")
    dev = parse_device(device, local_rank=local)
    backend, group = _join(dev, _timeout())
    _JOINED = TorchCommunicator(
        rank=rank, world_size=world, local_rank=local, device=dev, backend=backend, group=group
    )
    return _JOINED


def _accepts_device_id(init_process_group: Callable[..., Any]) -> bool:
    # init_process_group(device_id=...) exists from torch 2.3 on; torch 2.2 (supported)
    # raises TypeError on the keyword.
    try:
        return "device_id" in inspect.signature(init_process_group).parameters
    except (TypeError, ValueError):
        return False


def _join(dev: str, timeout: datetime.timedelta) -> tuple[str, Any]:
    """Join the default process group for this rank's device; make the control group.

    Returns:
        ``(backend, control group)``: every collective advtune runs goes through the
        control group, which is gloo (CPU tensors and pickled objects only), also when
        the default group is NCCL: NCCL cannot carry CPU tensors.
    """
    import torch.distributed as dist

    backend = "nccl" if dev.startswith("cuda") else "gloo"
    if backend == "nccl":
        # Before anything touches CUDA: the current device is what NCCL, the data
        # loader's pin-memory thread and unindexed "cuda" tensors use.
        torch.cuda.set_device(torch.device(dev))
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if backend == "nccl" and _accepts_device_id(dist.init_process_group):
            # Binds the communicator to this rank's GPU up front (no device guessing).
            kwargs["device_id"] = torch.device(dev)
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    if backend == "gloo":
        return backend, dist.group.WORLD
    # Control messages (counts, rows, status) go through gloo on the CPU: no GPU sync
    # per batch, and object collectives need no device juggling.
    return backend, dist.new_group(backend="gloo", timeout=timeout)


def shutdown() -> None:
    """Leave the process group created by :func:`init_comm` (no-op without one)."""
    global _JOINED
    if _JOINED is None:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _JOINED = None


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s share: ``indices[rank::world_size]``.

    Every index goes to exactly one rank (no padding: unlike a ``DistributedSampler``
    nothing is duplicated to even out the shards).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return list(indices[rank::world_size])
