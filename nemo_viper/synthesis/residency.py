"""GPU residency of the synthesis models: the policy and the diffusion pipeline, together or in turn.

With ``residency: alternate`` the policy (7B: ~16 GB bf16) and the diffusion pipeline (Qwen-Image: ~58 GB
bf16) are never on the GPU at the same time. Each model is wrapped so that calling it first makes it the
GPU's resident: the other is moved to host memory, then this one to the GPU. A stage step batch calls the
policy (caption, critique, rewrite, operations), the pipeline (redraw or edit) and the policy again, so a
batch costs two swaps (each moves both models over PCIe: seconds) against minutes of drawing; a larger
``batch_size`` (up to ``chunk_size``) amortises them further. The GPU stays busy with one model at a time
instead of idling on memory the other holds. ``together`` (the default) keeps both resident.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)


class GpuResidency:
    """At most one of the registered models on ``device``; :meth:`activate` swaps them."""

    def __init__(self, device: torch.device):
        self.device = device
        self._movers: dict[str, Callable[[torch.device], None]] = {}
        self.active: str | None = None
        self.swaps: list[str] = []  # the models made resident, in order (for logs and tests)

    def register(self, name: str, move: Callable[[torch.device], None]) -> None:
        """``move(device)`` puts the model ``name`` on ``device`` (its weights and buffers)."""
        self._movers[name] = move

    def activate(self, name: str) -> None:
        if self.active == name:
            return
        for other, move in self._movers.items():
            if other != name:
                move(torch.device("cpu"))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed blocks back before the next model arrives
        self._movers[name](self.device)
        self.active = name
        self.swaps.append(name)
        log.debug("GPU resident: %s", name)


def move_modules(modules: Sequence[torch.nn.Module]) -> Callable[[torch.device], None]:
    def move(device: torch.device) -> None:
        for module in modules:
            module.to(device)

    return move


class Resident:
    """``target`` (a VLM, painter or editor) whose method calls first make ``name`` the GPU's resident."""

    def __init__(self, target, residency: GpuResidency, name: str):
        self._target, self._residency, self._name = target, residency, name

    def __getattr__(self, attribute):
        value = getattr(self._target, attribute)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            self._residency.activate(self._name)
            return value(*args, **kwargs)

        return call
