"""Run megatron-core and Megatron-Bridge on a CPU-only machine (gloo), without editing site-packages.

megatron-core assumes CUDA in a handful of places that have nothing to do with the model maths:

1. ``torch.cuda.current_device()`` places RoPE ``inv_freq`` and attention scratch buffers;
2. the model-parallel RNG tracker saves/restores *CUDA* generator states;
3. the optimizer, grad clipping and schedules create ``device="cuda"`` tensors, call
   ``.cuda()`` / ``.to("cuda")`` and assert ``grad.type() == "torch.cuda.FloatTensor"``;
4. DDP grad sync and p2p use CUDA streams, events and ``torch.cuda.synchronize``.

:func:`enabled` neutralises exactly these for the duration of a ``with`` block: (1) and (4) by replacing
the ``torch.cuda`` entry points with CPU equivalents, (3) with a :class:`~torch.overrides.TorchFunctionMode`
that maps CUDA devices to the CPU, and (2), once Megatron is about to run (:func:`require`), by mapping
Megatron's tracker onto the CPU default generator. On exit every replaced function is restored and the
mode is exited. ``torch.cuda.is_available()`` stays ``False`` throughout, and :func:`enabled` refuses to
run where it is ``True``.

CPU mode is switched on explicitly, by entry points only (the CLI's Megatron commands, the test workers,
the benchmarks), through :func:`unless_cuda`; library code calls :func:`require`, which fails with one
line when Megatron is about to run on a CUDA-less machine outside CPU mode.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

from nemo_viper.errors import NemoViperError

log = logging.getLogger(__name__)

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


class CpuModeError(NemoViperError):
    """CPU mode asked for where CUDA is available, or Megatron run without CUDA outside CPU mode."""


_depth = 0  # nesting depth of :func:`enabled` (inner blocks are no-ops)
_replaced: list[tuple[object, str, object]] = []  # (owner, attribute, original) the outermost block restores
_megatron_shimmed = False
_logged = False


def is_active() -> bool:
    return _depth > 0


def _replace(shims: list[tuple[object, str, object]]) -> None:
    for owner, name, replacement in shims:
        _replaced.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)


def _torch_shims() -> list[tuple[object, str, object]]:
    """``(owner, attribute, replacement)`` for the ``torch.cuda`` functions CPU mode replaces."""
    cuda = torch.cuda
    no_op_stream = lambda *a, **k: _NoOpStream()  # noqa: E731
    return [
        (cuda, "current_device", lambda: torch.device("cpu")),
        (cuda, "get_rng_state", _cpu_rng_state),
        (cuda.random, "get_rng_state", _cpu_rng_state),
        (cuda, "set_rng_state", _set_cpu_rng_state),
        (cuda, "manual_seed", _seed_cpu_generator),
        (cuda, "Stream", _NoOpStream),
        (cuda, "Event", _NoOpEvent),
        (cuda, "current_stream", no_op_stream),
        (cuda, "default_stream", no_op_stream),
        (cuda, "stream", lambda *a, **k: contextlib.nullcontext()),
        (cuda, "synchronize", lambda *a, **k: None),
    ]


def _megatron_shims() -> list[tuple[object, str, object]]:
    """The same for megatron-core's private CUDA functions (imported only when Megatron is about to run)."""
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.tensor_parallel.random as megatron_random

    return [
        (megatron_random, "_get_cuda_rng_state", _cpu_rng_state),
        (megatron_random, "_set_cuda_rng_state", _set_cpu_rng_state),
        # A torch-function mode is off inside its own handler, so the backward pass (entered through
        # ``Tensor.backward``) runs without it: the causal mask that activation recomputation rebuilds
        # there must not ask for "cuda".
        (fused_softmax, "get_default_causal_mask", _cpu_causal_mask),
    ]


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """CPU mode for the ``with`` block (main thread); raises :class:`CpuModeError` where CUDA is available.

    Entering replaces the ``torch.cuda`` functions and enters the mode; megatron-core's functions are
    replaced by :func:`require`, when Megatron is about to run (so entering costs no Megatron import).
    Nested blocks are no-ops; the outermost one restores every replaced function and exits the mode.
    """
    global _depth, _logged, _megatron_shimmed
    if torch.cuda.is_available():
        raise CpuModeError("CPU mode is for machines without CUDA, and CUDA is available here: "
                           "run Megatron on the GPU (do not enter nemo_viper.runtime.cpu_mode.enabled())")
    if _depth:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    mode = CudaToCpuMode()
    try:
        _replace(_torch_shims())
        mode.__enter__()
        _depth = 1
        if not _logged:
            log.info("no CUDA device: megatron-core CPU mode on (gloo, local layer spec)")
            _logged = True
        yield
    finally:
        if _depth:
            _depth = 0
            mode.__exit__(None, None, None)
        while _replaced:
            owner, name, original = _replaced.pop()
            setattr(owner, name, original)
        _megatron_shimmed = False


def unless_cuda() -> contextlib.AbstractContextManager:
    """What an entry point that runs Megatron enters: :func:`enabled` without CUDA, nothing with it."""
    return contextlib.nullcontext() if torch.cuda.is_available() else enabled()


def require() -> None:
    """Megatron is about to run: without CUDA, CPU mode must be on (else one line), and megatron-core's
    CUDA functions are replaced for the rest of the block. Call after the TE import guard is installed."""
    global _megatron_shimmed
    if torch.cuda.is_available():
        return
    if not is_active():
        raise CpuModeError("no CUDA device and CPU mode is off: run Megatron through an entry point that "
                           "enters nemo_viper.runtime.cpu_mode.unless_cuda() (the nemo-viper CLI does)")
    if not _megatron_shimmed:
        _replace(_megatron_shims())
        _megatron_shimmed = True
