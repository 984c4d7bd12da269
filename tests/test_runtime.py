"""CPU mode switches on only without CUDA; the TE import guard makes Megatron-Bridge importable."""

import subprocess
import sys

import pytest
import torch

from nemo_viper.runtime import cpu_mode


def test_cpu_mode_only_without_cuda():
    assert cpu_mode.should_activate(cuda_available=False) is True
    assert cpu_mode.should_activate(cuda_available=True) is False


def test_activate_if_needed_leaves_a_cuda_machine_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_mode, "activate", lambda: calls.append("activate"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_mode.activate_if_needed() is False
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu_mode.activate_if_needed()
    assert calls == ["activate"]


SUBPROCESS_CHECK = r"""
import importlib.util, pathlib, sys, torch
from nemo_viper.runtime.distributed import prepare_megatron
prepare_megatron()
from megatron.bridge import AutoBridge
import megatron.bridge.peft.lora_layers as lora
from nemo_viper.runtime import cpu_mode
from nemo_viper.runtime.te_import_guard import MissingTransformerEngine
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
assert cpu_mode.is_active() and not torch.cuda.is_available()
x = torch.ones(2, device="cuda") + torch.tensor([1.0]).cuda()   # CUDA placements land on the CPU
assert x.device.type == "cpu" and x.type() == "torch.cuda.FloatTensor"
assert x.to(torch.float64).dtype == torch.float64
print("OK")
"""


@pytest.mark.cpu  # a GPU machine has Transformer Engine: the placeholder path cannot be exercised there
def test_megatron_bridge_imports_without_transformer_engine():
    result = subprocess.run([sys.executable, "-c", SUBPROCESS_CHECK], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-4000:]
