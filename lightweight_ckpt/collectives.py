"""Rank information and collective steps over the user's ``torch.distributed`` process group.

We add no launcher and no transport: everything here is a thin layer over the default process
group the user initialized (``torchrun`` / ``init_process_group``). Without one, the process is
rank 0 of a world of 1 and every function is a no-op or runs locally.

``run_on_all_ranks`` is the one way a strategy runs a step that may fail on some ranks: every rank
runs ``fn``, the ranks agree on whether all succeeded, and a failure anywhere raises on every rank
(never a hang, never a silent success on some).
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from lightweight_ckpt.errors import CheckpointError

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")


def is_distributed() -> bool:
    """Return True when a default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def global_rank() -> int:
    """Return this process's rank in the default group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Return the number of processes in the default group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if is_distributed() and world_size() > 1:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Return rank ``src``'s ``obj`` on every rank."""
    if not is_distributed() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@dataclass(frozen=True)
class _Sent:
    """Where a tensor was in a broadcast tree: its index in the sent list, shape and dtype."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype


STAGE_BYTES = 64 << 20
"""Under a backend without CPU tensors (NCCL), ``broadcast_tree`` sends each tensor through a
buffer of at most this many bytes on the current accelerator."""


def staging_device() -> torch.device | None:
    """Where ``broadcast_tree`` stages CPU tensors: None where the default group sends them.

    Gloo (and MPI, UCC, a ``"cpu:gloo,cuda:nccl"`` group) sends CPU tensors itself; NCCL sends
    only CUDA tensors, so they go through the current device (``torch.cuda.set_device``), a
    bounded buffer at a time. We stage rather than create a gloo side group: no extra group to
    create collectively and keep, and NCCL's links between GPUs and nodes are the fast ones.

    Raises:
        RuntimeError: the backend sends no CPU tensors and no accelerator is available.
    """
    backend = str(dist.get_backend())
    if ":" in backend:  # per device type: "cpu:gloo,cuda:nccl"
        devices = [entry.split(":", 1)[0] for entry in backend.split(",")]
    else:
        devices = list(dist.Backend.backend_capability.get(backend.lower(), ["cpu"]))
    if "cpu" in devices:
        return None
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None or accelerator.type not in devices:
        raise RuntimeError(
            f"the default process group's backend {backend!r} sends no CPU tensors and no "
            f"{'/'.join(devices)} device is available to stage them through"
        )
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def broadcast_tree(tree: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``tree`` (dicts, lists, tuples, CPU tensors, plain values) on all.

    The structure and plain values go as one pickled object; each tensor's bytes go by
    ``dist.broadcast`` into a fresh CPU tensor on the other ranks (a tensor that appears twice
    is sent once and stays shared). Every rank ends up holding its own copy. Under NCCL the
    bytes go through a bounded buffer on the current device (``staging_device``).
    """
    if not is_distributed() or world_size() == 1:
        return tree
    sent: list[torch.Tensor] = []
    seen: dict[int, _Sent] = {}
    skeleton = _map(tree, lambda t: _send(t, sent, seen)) if global_rank() == src else None
    skeleton = broadcast_object(skeleton, src)
    specs: dict[int, _Sent] = {}
    _map(skeleton, lambda spec: specs.setdefault(spec.index, spec))
    received = []
    stage = staging_device()
    for index in range(len(specs)):
        spec = specs[index]
        tensor = sent[index] if global_rank() == src else torch.empty(spec.shape, dtype=spec.dtype)
        if tensor.numel():
            tensor = tensor.contiguous()
            broadcast_bytes(tensor.reshape(-1).view(torch.uint8), src, stage)
        received.append(tensor)
    return tree if global_rank() == src else _map(skeleton, lambda spec: received[spec.index])


def broadcast_bytes(data: torch.Tensor, src: int, stage: torch.device | None) -> None:
    """Broadcast the uint8 CPU tensor ``data`` from ``src`` in place, staged through ``stage``.

    ``stage`` None: ``data`` itself is sent. Otherwise at most ``STAGE_BYTES`` at a time are
    copied to one buffer on ``stage``, broadcast, and copied back on the receiving ranks.
    """
    if stage is None:
        dist.broadcast(data, src=src)
        return
    sending = global_rank() == src
    buffer = torch.empty(min(STAGE_BYTES, data.numel()), dtype=torch.uint8, device=stage)
    for start in range(0, data.numel(), buffer.numel()):
        piece = data[start : start + buffer.numel()]
        chunk = buffer[: piece.numel()]
        if sending:
            chunk.copy_(piece)
        dist.broadcast(chunk, src=src)
        if not sending:
            piece.copy_(chunk)


def _send(tensor: torch.Tensor, sent: list[torch.Tensor], seen: dict[int, _Sent]) -> _Sent:
    if id(tensor) not in seen:
        seen[id(tensor)] = _Sent(len(sent), tuple(tensor.shape), tensor.dtype)
        sent.append(tensor.detach().cpu())
    return seen[id(tensor)]


def _map(tree: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to every tensor (or ``_Sent`` placeholder) leaf of ``tree``; copy the rest."""
    if isinstance(tree, (torch.Tensor, _Sent)):
        return fn(tree)
    if isinstance(tree, dict):
        out = copy.copy(tree)  # keeps the mapping's type (OrderedDict, defaultdict, ...)
        out.update((key, _map(value, fn)) for key, value in tree.items())
        return out
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a namedtuple
        return type(tree)(*(_map(value, fn) for value in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(value, fn) for value in tree)
    return tree


class RankFailedError(CheckpointError, RuntimeError):
    """Another rank failed the step this rank was part of.

    ``errors``: the failed ranks' exceptions, where they could be sent (``{rank: exception}``).
    """

    def __init__(self, message: str, errors: dict[int, BaseException] | None = None) -> None:
        super().__init__(message)
        self.errors = dict(errors or {})

    def checkpoint_error(self) -> CheckpointError:
        """Return the first failed rank's ``CheckpointError`` (damage, mismatch), else self.

        A checkpoint that is bad for one rank is then reported the same way on every rank.
        """
        for _, error in sorted(self.errors.items()):
            if isinstance(error, CheckpointError):
                return error
        return self


def run_on_all_ranks(
    step: str, fn: Callable[[], T], on_abort: Callable[[T], object] | None = None
) -> T:
    """Run ``fn`` on every rank; if it raised on any rank, raise on every rank.

    The rank that failed re-raises its own exception; the others raise ``RankFailedError`` naming
    the failed ranks and their messages, after handing their own result to ``on_abort`` (to
    release what it holds, e.g. an open reader).
    """
    error: BaseException | None = None
    result: T | None = None
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - every failure must reach the other ranks
        error = err
    if is_distributed() and world_size() > 1:
        outcome = None if error is None else (f"{type(error).__name__}: {error}", _sendable(error))
        outcomes: list[tuple[str, BaseException | None] | None] = [None] * world_size()
        dist.all_gather_object(outcomes, outcome)
        failed = {rank: out for rank, out in enumerate(outcomes) if out is not None}
        if failed and error is None:
            if on_abort is not None:
                on_abort(result)  # type: ignore[arg-type]
            messages = {rank: message for rank, (message, _) in failed.items()}
            errors = {rank: err for rank, (_, err) in failed.items() if err is not None}
            raise RankFailedError(f"{step} failed on rank(s) {sorted(failed)}: {messages}", errors)
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


def _sendable(error: BaseException) -> BaseException | None:
    """``error`` without its traceback if it pickles and unpickles as itself, else None."""
    try:
        copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes, just made
    except Exception:  # noqa: BLE001 - any exception may be unpicklable; its message still goes
        return None
    return copy if type(copy) is type(error) else None
