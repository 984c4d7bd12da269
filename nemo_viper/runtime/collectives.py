"""The project's only door to ``torch.distributed`` collectives: tensors travel on the group's device.

NCCL communicates CUDA tensors only and gloo (in this project) CPU tensors. Metric values, token
counts and other host-side numbers are naturally CPU tensors, so a collective called with them on an
NCCL group fails, typically after a whole rollout. Every function here therefore

1. moves the tensor to the device the group's backend communicates on (:func:`group_device`),
2. runs the collective there,
3. returns the result on the caller's device and dtype (the argument itself is never modified).

Single-rank groups skip the communication. Object collectives (``all_gather_object``,
``broadcast_object``) pickle through torch, which already places its byte tensors per backend; they
live here so that ``tests/test_collectives.py`` can check that no other module calls
``torch.distributed`` collectives directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ReduceOp

__all__ = [
    "DataParallel",
    "ReduceOp",
    "all_gather",
    "all_gather_object",
    "all_reduce",
    "backend_device_types",
    "barrier",
    "broadcast",
    "broadcast_object",
    "group_device",
    "world_size",
]

# Device type each single backend communicates on; "gloo" also accepts CUDA tensors, but staging
# them through the host is what it does anyway, and the project's gloo groups carry CPU data.
_BACKEND_DEVICE_TYPE = {"nccl": "cuda", "gloo": "cpu", "mpi": "cpu", "ucc": "cuda", "xccl": "xpu"}


def backend_device_types(backend: str) -> tuple[str, ...]:
    """Device types a backend string communicates on: ``"nccl"`` -> ``("cuda",)``, ``"gloo"`` ->
    ``("cpu",)``, a per-device backend ``"cpu:gloo,cuda:nccl"`` -> ``("cpu", "cuda")``."""
    backend = str(backend).lower()
    if ":" in backend:
        return tuple(part.split(":", 1)[0].strip() for part in backend.split(","))
    if backend not in _BACKEND_DEVICE_TYPE:
        raise ValueError(f"unknown torch.distributed backend {backend!r}")
    return (_BACKEND_DEVICE_TYPE[backend],)


def group_device(group=None, tensor: Tensor | None = None) -> torch.device:
    """The device a collective on ``group`` runs on: ``tensor``'s own device when the backend takes it,
    else the backend's first device type (CUDA = this rank's current device)."""
    types = backend_device_types(dist.get_backend(group))
    if tensor is not None and tensor.device.type in types:
        return tensor.device
    if types[0] == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(types[0])


def world_size(group=None) -> int:
    """Ranks in ``group`` (1 when torch.distributed is not initialised)."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _on_group_device(tensor: Tensor, group) -> Tensor:
    return tensor.to(group_device(group, tensor)).contiguous()


def all_reduce(tensor: Tensor, op=ReduceOp.SUM, group=None) -> Tensor:
    """``op`` over the ranks of ``group`` of ``tensor``; returned on ``tensor``'s device."""
    if world_size(group) == 1:
        return tensor
    work = _on_group_device(tensor, group)
    if work is tensor:
        work = tensor.clone()
    dist.all_reduce(work, op=op, group=group)
    return work.to(tensor.device)


def all_gather(tensor: Tensor, group=None) -> Tensor:
    """``[world, *tensor.shape]``: every rank's ``tensor`` in group-rank order, on ``tensor``'s device."""
    size = world_size(group)
    if size == 1:
        return tensor[None]
    work = _on_group_device(tensor, group)
    parts = [torch.empty_like(work) for _ in range(size)]
    dist.all_gather(parts, work, group=group)
    return torch.stack(parts).to(tensor.device)


def broadcast(tensor: Tensor, src: int, group=None) -> Tensor:
    """Global rank ``src``'s ``tensor`` on every rank (same shape and dtype everywhere), on ``tensor``'s device."""
    if world_size(group) == 1:
        return tensor
    work = _on_group_device(tensor, group)
    if work is tensor:
        work = tensor.clone()
    dist.broadcast(work, src=src, group=group)
    return work.to(tensor.device)


def all_gather_object(obj, group=None) -> list:
    """Every rank's picklable ``obj``, in group-rank order."""
    size = world_size(group)
    if size == 1:
        return [obj]
    gathered = [None] * size
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def broadcast_object(obj, src: int, group=None):
    """Global rank ``src``'s picklable ``obj`` on every rank."""
    if world_size(group) == 1:
        return obj
    payload = [obj]
    dist.broadcast_object_list(payload, src=src, group=group)
    return payload[0]


def barrier(group=None) -> None:
    """Wait for every rank of ``group`` (no-op without torch.distributed)."""
    if world_size(group) > 1:
        dist.barrier(group=group)


@dataclass(frozen=True)
class DataParallel:
    """This rank's place among the data-parallel replicas: what framework-free code (the GRPO step, the RL
    loop) needs to combine work over them. Built by the policy (:mod:`nemo_viper.models.training`) from
    Megatron's parallel state; ``DataParallel()`` is a single replica. ``group``: the torch.distributed
    group of the replicas (model-parallel peers are in different groups)."""

    rank: int = 0
    size: int = 1
    group: object = None

    def all_reduce(self, tensor: Tensor, op=ReduceOp.SUM) -> Tensor:
        """``op`` over the replicas (the tensor itself when there is one)."""
        return tensor if self.size == 1 else all_reduce(tensor, op, self.group)

    def all_gather_object(self, obj) -> list:
        """Every replica's ``obj``, in replica order."""
        return [obj] if self.size == 1 else all_gather_object(obj, self.group)
