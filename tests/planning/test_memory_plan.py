"""The memory plan's arithmetic (nemo_viper.planning) on known configurations, and `nemo-viper plan` / `launch`."""

import subprocess
import sys

import pytest

from nemo_viper.errors import ConfigError
from nemo_viper.planning.memory import (
    GIB,
    Architecture,
    Layout,
    TrainingShape,
    distinct_images,
    lm_activations,
    model_states,
    rank_params,
    training_phase,
)
from nemo_viper.planning.recipe import PUBLISHED, plan_recipe, refuse_if_not_fitting
from nemo_viper.recipes import recipe

SEVEN_B = Architecture.from_hf_config(PUBLISHED["Qwen2.5-VL-7B"])


def test_parameter_counts_match_the_models():
    """Counted from sizes = the HF model's own count (tiny), and the published totals (3B: 3.75B, 7B: 8.29B)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from nemo_viper.models.tiny import TinyModelConfig, build_hf_config, build_tokenizer

    config = TinyModelConfig()
    hf_config = build_hf_config(config, build_tokenizer(config.vocab_size))
    model = Qwen2_5_VLForConditionalGeneration(hf_config)
    arch = Architecture.from_hf_config(hf_config.to_dict())
    assert arch.total_params == sum(p.numel() for p in model.parameters())
    assert arch.vision_params == sum(p.numel() for p in model.model.visual.parameters())
    assert round(SEVEN_B.total_params / 1e9, 2) == 8.29
    assert round(Architecture.from_hf_config(PUBLISHED["Qwen2.5-VL-3B"]).total_params / 1e9, 2) == 3.75


def test_model_states_of_the_7b_at_tp2_with_the_distributed_optimizer():
    lm, vision = rank_params(SEVEN_B, Layout(tensor=2, data=8))
    assert lm == (28 * SEVEN_B.layer_params + 2 * 152064 * 3584) // 2  # untied embedding and output layer
    assert vision == SEVEN_B.vision_params  # replicated on every TP rank
    states = model_states(SEVEN_B, Layout(tensor=2, data=8), "bf16")
    params = lm + vision
    assert states == {"weights": 2 * params, "gradients": 4 * params, "optimizer": 12 * params / 8}
    whole = model_states(SEVEN_B, Layout(tensor=2, data=8, distributed_optimizer=False), "fp32")
    assert whole["optimizer"] == 8 * params and whole["weights"] == 4 * params


def test_activation_terms_by_hand():
    """One layer of a small config, worked out by hand, and how recomputation and sharing scale it."""
    arch = Architecture(hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, vocab=1000, tied_embeddings=False,
                        vision_depth=2, vision_hidden=32, vision_ffn=64)
    shape = TrainingShape(micro_batch_size=2, prompt_text_tokens=10, max_pixels=28 * 28 * 4, max_new_tokens=20,
                          images_per_prompt=1, precision="bf16", fused_attention=True)
    seq = 10 + (4 + 2) + 20  # text + image tokens (4) + vision start/end + new tokens
    assert shape.sequence_length(arch) == seq
    tokens = 2 * seq
    per_layer = 2 * tokens * (4 * 64 + (2 * 64 + 2 * 2 * 16) + 3 * 128)
    assert lm_activations(arch, Layout(), shape) == 2 * per_layer
    unfused = TrainingShape(**{**vars(shape), "fused_attention": False})
    assert lm_activations(arch, Layout(), unfused) == 2 * (per_layer + 2 * 2 * 2 * 4 * seq * seq)
    full = TrainingShape(**{**vars(shape), "recompute": "full"})
    assert lm_activations(arch, Layout(), full) == 2 * 2 * tokens * 64 + per_layer
    # 4 rows of prompts with 5 responses each straddle at most 2 prompts; per row: 4 copies
    assert distinct_images(TrainingShape(micro_batch_size=4)) == 2
    assert distinct_images(TrainingShape(micro_batch_size=4, shared_images=False)) == 4


def test_recipes_fit_80gb_and_a_too_large_micro_batch_gets_the_smallest_change():
    for name in ("qwen25vl_3b", "qwen25vl_7b"):
        assert plan_recipe(recipe(name)).plan.all_fit, name
    big = recipe("qwen25vl_7b", "rl.grpo.micro_batch_size=8")
    result = plan_recipe(big)
    assert not result.plan.all_fit
    assert result.suggestion == "rl.grpo.micro_batch_size=2"
    assert plan_recipe(recipe("qwen25vl_7b", "rl.grpo.micro_batch_size=8", result.suggestion)).plan.all_fit
    with pytest.raises(ConfigError, match="RL stage 1 training step .* do not fit 80 GiB .* rl.grpo.micro_batch_size=2"):
        refuse_if_not_fitting(big)
    unrecomputed = plan_recipe(recipe("qwen25vl_7b", "model.recompute=none", "model.recompute_vision=false"))
    assert unrecomputed.suggestion == "model.recompute=selective model.recompute_vision=true"
    training = [p for p in unrecomputed.plan.phases if p.name == "RL stage 2 training step"][0]
    assert training.total > 80 * GIB


def test_the_vllm_engine_takes_its_share_of_the_gpu_beside_the_resident_trainer():
    def phase(result, name):
        return next(p for p in result.plan.phases if p.name == name)

    for name in ("qwen25vl_3b", "qwen25vl_7b"):
        megatron, vllm = plan_recipe(recipe(name)), plan_recipe(recipe(name, "rollout.backend=vllm"))
        assert vllm.plan.all_fit, name  # at the default share
        rollout = phase(vllm, "RL stage 2 rollout")
        assert rollout.terms["vLLM engine"] == 0.4 * 80 * GIB and "KV cache" not in rollout.terms
        assert rollout.total - rollout.terms["vLLM engine"] == pytest.approx(
            sum(v for k, v in phase(megatron, "RL stage 2 rollout").terms.items()
                if k not in ("KV cache", "prefill temporaries")))
        # asleep during the step (the default), the engine adds nothing to it; awake, its whole share
        assert phase(vllm, "RL stage 2 training step").total == phase(megatron, "RL stage 2 training step").total
        awake = plan_recipe(recipe(name, "rollout.backend=vllm", "rollout.vllm.enable_sleep_mode=false"))
        assert phase(awake, "RL stage 2 training step").terms["vLLM engine"] == 0.4 * 80 * GIB
    greedy = plan_recipe(recipe("qwen25vl_7b", "rollout.backend=vllm", "rollout.vllm.gpu_memory_utilization=0.9"))
    assert not greedy.plan.all_fit and greedy.suggestion == "rollout.vllm.gpu_memory_utilization=0.4"


def test_plan_and_launch_commands():
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "nemo_viper.cli", *args], capture_output=True, text=True)

    for name in ("qwen25vl_3b", "qwen25vl_7b"):
        done = cli("plan", "--recipe", name)
        assert done.returncode == 0, done.stderr
        assert "every phase fits 80 GiB" in done.stdout and "RL stage 2 training step" in done.stdout
    refused = cli("launch", "--recipe", "qwen25vl_7b", "--dry-run", "cluster.account=a", "rl.grpo.micro_batch_size=8")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("error: memory plan: ")
    forced = cli("launch", "--recipe", "qwen25vl_7b", "--dry-run", "--ignore-memory-plan", "cluster.account=a",
                 "rl.grpo.micro_batch_size=8")
    assert forced.returncode == 0, forced.stderr
    assert "nemo_viper.cli train --stage 2 --data" in forced.stdout  # the RL jobs are submitted (the value
    # reaches them through the run config: tests/test_config_keys.py)


def test_pipeline_parallelism_is_what_fits_the_7b_on_32gb_and_the_engine_holds_every_layer():
    """The 7B with vLLM rollouts on 32 GiB GPUs: TP=4 (the most its 4 KV heads allow) with every cheaper change
    still does not fit; splitting the layers over 2 stages does. The suggestion, applied, fits; the plan says
    that PP made it fit. The engine's term never drops below the whole model's weights over TP (not PP)."""
    from nemo_viper.planning.memory import rollout_phase, vllm_engine_minimum
    from nemo_viper.planning.recipe import format_plan

    on_vllm = ["rollout.backend=vllm", "rollout.vllm.gpu_memory_utilization=0.25"]
    result = plan_recipe(recipe("qwen25vl_7b", *on_vllm), 32)
    assert result.suggestion.endswith("parallel.tensor=4 parallel.pipeline=2"), result.suggestion
    assert plan_recipe(recipe("qwen25vl_7b", *on_vllm, *result.suggestion.split()), 32).plan.all_fit
    without_pp = result.suggestion.replace(" parallel.pipeline=2", "").split()
    assert not plan_recipe(recipe("qwen25vl_7b", *on_vllm, *without_pp), 32).plan.all_fit
    assert "pipeline parallelism is what makes it fit" in format_plan(result, "qwen25vl_7b")
    assert "pipeline parallelism" not in format_plan(plan_recipe(recipe("qwen25vl_7b", "rl.grpo.micro_batch_size=8")),
                                                     "qwen25vl_7b")
    # from the recipe's Megatron backend, the pipeline change brings vLLM (the Megatron backend refuses PP), at a
    # share of the GPU that fits; each key once
    megatron = plan_recipe(recipe("qwen25vl_7b"), 32).suggestion
    assert "parallel.tensor=4 parallel.pipeline=2 rollout.backend=vllm rollout.vllm.gpu_memory_utilization=" in megatron
    assert plan_recipe(recipe("qwen25vl_7b", *megatron.split()), 32).plan.all_fit
    assert len({item.split("=")[0] for item in megatron.split()}) == len(megatron.split())

    shape = TrainingShape(vllm_memory_fraction=0.01)
    split, whole = Layout(tensor=2, pipeline=4), Layout(tensor=2)
    minimum = vllm_engine_minimum(SEVEN_B, split, shape)
    assert minimum == vllm_engine_minimum(SEVEN_B, whole, shape) > 2 * SEVEN_B.total_params / 2
    assert rollout_phase(SEVEN_B, split, shape, 80 * GIB).terms["vLLM engine"] == minimum
