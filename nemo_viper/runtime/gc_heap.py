"""Import the big frameworks once, out of the cyclic garbage collector's way.

``import megatron.bridge`` creates ~0.7 M objects that the collector tracks (modules, classes, functions,
their dicts), and ``import vllm`` ~0.3 M more; they live until the process exits. CPython runs a full
collection each time the objects that survived earlier collections have grown by a quarter, so one
import of that size runs ~10-16 full collections, each walking every tracked object alive at the time, and
every later full collection (automatic ones, vLLM's explicit ones, the interpreter's at exit) walks them
all again. In a process that has imported torch and transformers already (every Megatron worker and phase),
most full collections have happened by then: measured on the test suite, the collector costs ~10 % of the
processes' CPU and this freeze saves 1-2 % of the suite on an idle machine, more where memory is slow
(docs/benchmarks.md, "Test suite cost").

:func:`import_long_lived` imports modules with automatic collection paused, then runs one full collection
(so no garbage is kept) and freezes every survivor (``gc.freeze``: moved to a generation that no later
collection walks; reference counting still frees a frozen object whose count drops to zero). vLLM freezes
its engine's startup heap the same way (``vllm.utils.gc_utils.freeze_gc_heap``).
"""

from __future__ import annotations

import gc
import importlib
import sys


def import_long_lived(*names: str) -> None:
    """Import ``names`` (no-op for those imported already) with automatic collection paused; then
    ``gc.collect()`` once and ``gc.freeze()`` everything alive. Restores the collector's enabled state."""
    missing = [name for name in names if name not in sys.modules]
    if not missing:
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for name in missing:
            importlib.import_module(name)
    finally:
        gc.collect()
        gc.freeze()
        if was_enabled:
            gc.enable()
