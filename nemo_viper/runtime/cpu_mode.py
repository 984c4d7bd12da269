"""Run megatron-core and Megatron-Bridge on a CPU-only machine (gloo), without editing site-packages.

megatron-core assumes CUDA in a handful of places that have nothing to do with the model maths:

1. ``torch.cuda.current_device()`` places RoPE ``inv_freq`` and attention scratch buffers;
2. the model-parallel RNG tracker saves/restores *CUDA* generator states;
3. the optimizer, grad clipping and schedules create ``device="cuda"`` tensors, call
   ``.cuda()`` / ``.to("cuda")`` and assert ``grad.type() == "torch.cuda.FloatTensor"``;
4. DDP grad sync and p2p use CUDA streams, events and ``torch.cuda.synchronize``.

:func:`activate` neutralises exactly these: (1) and (4) by replacing the ``torch.cuda`` entry points
with CPU equivalents, (2) by mapping the tracker onto the CPU default generator, (3) with one
process-wide :class:`~torch.overrides.TorchFunctionMode` that maps CUDA devices to the CPU.
``torch.cuda.is_available()`` stays ``False`` throughout.

:func:`activate_if_needed` is what the rest of the project calls; it switches CPU mode on only when
CUDA is unavailable (:func:`should_activate`). On a GPU nothing here runs.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_ACTIVE_MODE: TorchFunctionMode | None = None


def should_activate(cuda_available: bool) -> bool:
    """CPU mode is needed exactly when there is no usable CUDA device."""
    return not cuda_available


def is_active() -> bool:
    return _ACTIVE_MODE is not None


def activate_if_needed() -> bool:
    """Switch CPU mode on when CUDA is unavailable. Idempotent; returns whether CPU mode is active."""
    if should_activate(torch.cuda.is_available()):
        activate()
    return is_active()


def _cpu_device(device):
    """Map a CUDA device spec (``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")``, a CUDA index) to CPU."""
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str):
        return "cpu" if device.startswith("cuda") else device
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    return device


class CudaToCpuMode(TorchFunctionMode):
    """Redirect CUDA placements to the CPU and make ``Tensor.type()`` report CUDA type names.

    The type-name part satisfies megatron's ``grad.type() == 'torch.cuda.FloatTensor'`` asserts;
    ``Tensor.type(dtype)`` conversions are left untouched.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs:
            kwargs = dict(kwargs, device=_cpu_device(kwargs["device"]))
        if func is torch.Tensor.to and len(args) > 1 and not isinstance(args[1], (torch.Tensor, torch.dtype)):
            args = (args[0], _cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


class _NoOpEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _NoOpStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _NoOpEvent()


def _cpu_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(state)


def _seed_cpu_generator(seed: int) -> None:
    # Not torch.manual_seed: it calls torch.cuda.manual_seed_all, which would recurse if patched.
    torch.default_generator.manual_seed(int(seed))


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()


def activate() -> None:
    """Install the CPU shims for this process (idempotent)."""
    global _ACTIVE_MODE
    if _ACTIVE_MODE is not None:
        return
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.get_rng_state = _cpu_rng_state
    cuda.random.get_rng_state = _cpu_rng_state
    cuda.set_rng_state = _set_cpu_rng_state
    cuda.manual_seed = _seed_cpu_generator
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpEvent
    cuda.current_stream = lambda *a, **k: _NoOpStream()
    cuda.default_stream = lambda *a, **k: _NoOpStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.synchronize = lambda *a, **k: None

    import megatron.core.tensor_parallel.random as megatron_random

    megatron_random._get_cuda_rng_state = _cpu_rng_state
    megatron_random._set_cuda_rng_state = _set_cpu_rng_state
    # A torch-function mode is off inside its own handler, so the backward pass (entered through
    # ``Tensor.backward``) runs without it: the causal mask that activation recomputation rebuilds there
    # must not ask for "cuda".
    import megatron.core.fusions.fused_softmax as fused_softmax

    fused_softmax.get_default_causal_mask = _cpu_causal_mask

    mode = CudaToCpuMode()
    mode.__enter__()  # process-wide for the main thread; never exited
    _ACTIVE_MODE = mode
    log.info("CUDA unavailable: megatron-core CPU mode active (gloo, local layer spec)")
