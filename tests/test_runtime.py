"""CPU mode: explicit, scoped (restored on exit), refused where CUDA is available, required by Megatron;
the TE import guard makes Megatron-Bridge importable; long-lived imports are frozen out of the collector."""

import os
import subprocess
import sys

import pytest
import torch
from launch import REPO

from nemo_viper.runtime import cpu_mode


def test_cpu_mode_refuses_a_cuda_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(cpu_mode.CpuModeError, match="CUDA is available"):
        with cpu_mode.enabled():
            pass
    assert not cpu_mode.is_active()
    with cpu_mode.unless_cuda():  # what entry points enter: nothing on a GPU machine
        assert not cpu_mode.is_active()
    cpu_mode.require()  # Megatron may run: there is CUDA


@pytest.mark.cpu
def test_building_a_policy_outside_cpu_mode_fails_in_one_line(tiny_hf_dir, monkeypatch):
    import torch.distributed as dist

    from nemo_viper.models.policy import PolicyConfig, build_policy
    from nemo_viper.runtime import distributed

    started = []  # refused before any process group is joined (another test of this process may own one)
    monkeypatch.setattr(distributed, "init_process_group", lambda: started.append("nemo_viper"))
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: started.append("torch"))
    with pytest.raises(cpu_mode.CpuModeError) as error:
        build_policy(PolicyConfig(hf_path=str(tiny_hf_dir)))
    assert "\n" not in str(error.value) and "CPU mode is off" in str(error.value)
    assert started == []


SUBPROCESS_CHECK = r"""
import importlib.util, logging, pathlib, sys, torch
import megatron.core.fusions.fused_softmax as fused_softmax
import megatron.core.tensor_parallel.random as megatron_random
from nemo_viper.runtime import cpu_mode
from nemo_viper.runtime.distributed import prepare_megatron
from nemo_viper.runtime.te_import_guard import MissingTransformerEngine

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
replaced = [(torch.cuda, n) for n in ("current_device", "get_rng_state", "set_rng_state", "manual_seed", "Stream",
            "Event", "current_stream", "default_stream", "stream", "synchronize")]
replaced += [(torch.cuda.random, "get_rng_state"), (megatron_random, "_get_cuda_rng_state"),
             (megatron_random, "_set_cuda_rng_state"), (fused_softmax, "get_default_causal_mask")]
originals = [getattr(owner, name) for owner, name in replaced]

def cuda_fails(make):
    try:
        make()
    except (RuntimeError, AssertionError):
        return True
    return False

assert cuda_fails(lambda: torch.ones(2, device="cuda")) and cuda_fails(torch.cuda.current_device)
for _ in range(2):  # entered twice: the second time behaves as the first (nothing left over)
    with cpu_mode.enabled():
        with cpu_mode.enabled():  # nested: a no-op, the outer block still owns the shims
            prepare_megatron()  # what build_policy calls first: replaces megatron-core's CUDA functions
        assert cpu_mode.is_active() and not torch.cuda.is_available()
        assert all(getattr(owner, name) is not original for (owner, name), original in zip(replaced, originals))
        assert torch.cuda.current_device() == torch.device("cpu")
        x = torch.ones(2, device="cuda") + torch.tensor([1.0]).cuda()   # CUDA placements land on the CPU
        assert x.device.type == "cpu" and x.type() == "torch.cuda.FloatTensor"
        assert x.to("cuda:0").device.type == "cpu" and x.to(torch.float64).dtype == torch.float64
        torch.cuda.manual_seed(7)                       # the tracker's CUDA generator is the CPU generator
        state = megatron_random._get_cuda_rng_state()
        first = torch.rand(3)
        megatron_random._set_cuda_rng_state(state)
        assert torch.equal(torch.rand(3), first) and torch.equal(torch.cuda.get_rng_state(), torch.get_rng_state())
        torch.cuda.manual_seed(7)
        assert torch.equal(torch.rand(3), first)
        stream = torch.cuda.current_stream()
        stream.wait_stream(torch.cuda.Stream()); torch.cuda.Event().record(); torch.cuda.synchronize()
        with torch.cuda.stream(stream):
            pass
        assert fused_softmax.get_default_causal_mask(3).device.type == "cpu"
    assert not cpu_mode.is_active()
    assert all(getattr(owner, name) is original for (owner, name), original in zip(replaced, originals))
    assert cuda_fails(lambda: torch.ones(2, device="cuda")) and cuda_fails(torch.cuda.current_device)
    assert torch.ones(2).type() == "torch.FloatTensor"

with cpu_mode.enabled():  # the TE import guard: Megatron-Bridge imports without Transformer Engine
    prepare_megatron()
    from megatron.bridge import AutoBridge
    import megatron.bridge.peft.lora_layers as lora
assert isinstance(lora.te, MissingTransformerEngine)
assert "transformer_engine" not in sys.modules
source = pathlib.Path(importlib.util.find_spec("megatron.bridge.peft.lora_layers").origin).read_text()
assert "\nimport transformer_engine.pytorch as te\n" in source  # site-packages untouched
try:
    lora.te.ops.Sequential()
except ImportError as exc:
    assert "Transformer Engine" in str(exc)
else:
    raise AssertionError("placeholder did not fail")
import gc  # prepare_megatron imported Megatron-Bridge outside the collector's walks (gc_heap)
assert gc.isenabled() and gc.get_freeze_count() > 300_000, gc.get_freeze_count()
print("OK")
"""


@pytest.mark.cpu  # a GPU machine has CUDA (CPU mode refuses it) and Transformer Engine (no placeholder)
def test_cpu_mode_patches_while_entered_and_restores_on_exit():
    result = subprocess.run([sys.executable, "-c", SUBPROCESS_CHECK], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-4000:]
    # logged once, although entered three times
    assert result.stdout.count("CPU mode on") == 1, result.stdout


GC_HEAP_CHECK = r"""
import gc, sys, weakref
from nemo_viper.runtime.gc_heap import import_long_lived

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)

garbage = cycle()  # unreachable, kept alive only by its cycle
full = []
gc.callbacks.append(lambda phase, info: phase == "start" and full.append(info["generation"]))
before = gc.get_freeze_count()
import_long_lived("heavy_module")
assert full == [2], full                       # no automatic collection during the import, then one full one
assert garbage() is None                       # that collection freed the garbage alive before the call
frozen = gc.get_freeze_count() - before
assert frozen > len(sys.modules["heavy_module"].TABLE), frozen   # the import's objects are frozen
assert gc.isenabled()
import_long_lived("heavy_module")              # imported already: nothing collected or frozen
assert full == [2] and gc.get_freeze_count() == before + frozen
gc.disable()
import_long_lived("json")                      # the collector's state is restored, not switched on
assert not gc.isenabled()
print("OK")
"""


def test_import_long_lived_imports_without_collecting_then_freezes(tmp_path):
    """The module's ~300 k containers would trigger automatic full collections (gen 2) while it imports."""
    (tmp_path / "heavy_module.py").write_text("TABLE = [[i] for i in range(300_000)]\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", GC_HEAP_CHECK], capture_output=True, text=True, timeout=60,
                            env=env, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() == "OK", result.stderr[-2000:]
