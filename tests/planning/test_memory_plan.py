"""The memory plan's arithmetic (nemo_viper.planning) on known configurations, and `nemo-viper plan` / `launch`."""

import math
import subprocess
import sys

import pytest

from nemo_viper.errors import ConfigError
from nemo_viper.planning.memory import (
    CUDA_CONTEXT_BYTES,
    GIB,
    NCCL_COMMUNICATOR_BYTES,
    Architecture,
    Layout,
    TrainingShape,
    distinct_images,
    lm_activations,
    model_states,
    rank_params,
    rollout_phase,
    training_phase,
)
from nemo_viper.planning.recipe import (
    PUBLISHED,
    architecture,
    plan_recipe,
    refuse_if_not_fitting,
    refuse_if_synthesis_exceeds_time,
    synthesis_shape,
    synthesis_task_times,
)
from nemo_viper.planning.synthesis_time import (
    DIFFUSION_EFFICIENCY,
    NON_DIFFUSION_SHARE,
    DiffusionWork,
    slurm_seconds,
    task_time,
)
from nemo_viper.recipes import recipe

SEVEN_B = Architecture.from_hf_config(PUBLISHED["Qwen2.5-VL-7B"])
# the inputs of the by-hand shapes, each test changing what it works out
HAND_SHAPE = dict(micro_batch_size=4, responses_per_prompt=5, micro_batches_per_minibatch=8, prompt_text_tokens=256,
                  images_per_prompt=1, max_pixels=1280 * 28 * 28, max_new_tokens=1024, precision="bf16",
                  recompute="none", recompute_vision=False, generation_batch_size=64, vllm_memory_fraction=0.0,
                  vllm_sleep_mode=True, reward_params=0, entropy_chunk=1024)


def hand_shape(**changes) -> TrainingShape:
    return TrainingShape(**{**HAND_SHAPE, **changes})
UNSIZED_DIFFUSION = ("synthesis.redraw.model=/models/small-diffusion", "synthesis.edit.model=/models/small-diffusion")


@pytest.mark.parametrize("sizes", [{}, {"tie_word_embeddings": True, "num_layers": 3, "vision_depth": 3,
                                         "vision_hidden_size": 48, "vocab_size": 576}], ids=["default", "resized"])
def test_parameter_counts_match_the_models(sizes):
    """Counted from sizes = the HF model's own count (the tiny model at its default sizes, which ``plan`` counts
    without building it, and resized), and the published totals (3B: 3.75B, 7B: 8.29B)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from nemo_viper.models.tiny import TinyModelConfig, build_hf_config, build_tokenizer

    config = TinyModelConfig(**sizes)
    model = Qwen2_5_VLForConditionalGeneration(build_hf_config(config, build_tokenizer(config.vocab_size)))
    arch = architecture("tiny")[0] if not sizes else Architecture.from_hf_config(config.hf_sizes())
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
    shape = hand_shape(micro_batch_size=2, prompt_text_tokens=10, max_pixels=28 * 28 * 4, max_new_tokens=20,
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
    assert distinct_images(hand_shape(micro_batch_size=4)) == 2
    assert distinct_images(hand_shape(micro_batch_size=4, shared_images=False)) == 4


def test_the_reward_model_pixel_values_and_context_are_counted_in_every_rl_phase():
    """Worked by hand at non-default sizes: TP2 x PP2 (two communicators), a 1,000-parameter fp16 reward model,
    two 4-patch images per prompt and micro-batches of 3 rows with 2 responses per prompt (2 distinct prompts)."""
    arch = Architecture(hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, vocab=1000, tied_embeddings=False,
                        vision_depth=2, vision_hidden=32, vision_ffn=64)
    shape = hand_shape(micro_batch_size=3, responses_per_prompt=2, images_per_prompt=2, max_pixels=28 * 28,
                       prompt_text_tokens=10, max_new_tokens=20, generation_batch_size=4, reward_params=1000,
                       reward_bytes_per_param=2)
    layout = Layout(tensor=2, pipeline=2, data=1)
    patch_values = 4 * 3 * 2 * 14 * 14  # patches x (channels x temporal patch x patch^2)
    context = CUDA_CONTEXT_BYTES + 2 * NCCL_COMMUNICATOR_BYTES
    training = training_phase(arch, layout, shape)
    assert training.terms["reward model"] == 2000 and training.terms["CUDA/NCCL context"] == context
    assert training.terms["pixel values"] == 2 * 2 * patch_values * (4 + 2)  # float32 + the saved bf16 copy
    rollout = rollout_phase(arch, layout, shape, 80 * GIB)
    assert rollout.terms["reward model"] == 2000 and rollout.terms["CUDA/NCCL context"] == context
    assert rollout.terms["pixel values"] == 2 * 2 * patch_values * 4  # the prefill's 2 prompts, float32
    single = training_phase(arch, Layout(), shape)
    assert single.terms["CUDA/NCCL context"] == CUDA_CONTEXT_BYTES  # one GPU: no communicator


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
                if k not in ("KV cache", "prefill temporaries", "pixel values")))  # the engine's own
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


def test_pipeline_parallelism_is_what_fits_the_7b_on_36gb_and_the_engine_holds_every_layer():
    """The 7B with vLLM rollouts on 36 GiB GPUs (with diffusion pipelines the plan does not size: Qwen-Image's
    20B transformer alone exceeds 36 GiB): TP=4 (the most its 4 KV heads allow) with every cheaper change
    still does not fit; splitting the layers over 2 stages does. The suggestion, applied, fits; the plan says
    that PP made it fit. The engine's term never drops below the whole model's weights over TP (not PP)."""
    from nemo_viper.planning.memory import rollout_phase, vllm_engine_minimum
    from nemo_viper.planning.recipe import format_plan

    on_vllm = ["rollout.backend=vllm", "rollout.vllm.gpu_memory_utilization=0.25", *UNSIZED_DIFFUSION]
    result = plan_recipe(recipe("qwen25vl_7b", *on_vllm), 36)
    assert result.suggestion.endswith("parallel.tensor=4 parallel.pipeline=2"), result.suggestion
    assert plan_recipe(recipe("qwen25vl_7b", *on_vllm, *result.suggestion.split()), 36).plan.all_fit
    without_pp = result.suggestion.replace(" parallel.pipeline=2", "").split()
    assert not plan_recipe(recipe("qwen25vl_7b", *on_vllm, *without_pp), 36).plan.all_fit
    assert "pipeline parallelism is what makes it fit" in format_plan(result, "qwen25vl_7b")
    assert "pipeline parallelism" not in format_plan(plan_recipe(recipe("qwen25vl_7b", "rl.grpo.micro_batch_size=8")),
                                                     "qwen25vl_7b")
    # from the recipe's Megatron backend, the pipeline change brings vLLM (the Megatron backend refuses PP), down
    # to the smallest share the plan tries; each key once, every one accepted by the config
    megatron = plan_recipe(recipe("qwen25vl_7b", *UNSIZED_DIFFUSION), 32).suggestion
    assert "parallel.tensor=4 parallel.pipeline=2 rollout.backend=vllm rollout.vllm.gpu_memory_utilization=0.2" in megatron
    items = [item for item in megatron.split() if "=" in item]
    assert len({item.split("=")[0] for item in items}) == len(items)
    assert plan_recipe(recipe("qwen25vl_7b", *UNSIZED_DIFFUSION, *items), 32).layout.pipeline == 2

    shape = hand_shape(vllm_memory_fraction=0.01)
    split, whole = Layout(tensor=2, pipeline=4), Layout(tensor=2)
    minimum = vllm_engine_minimum(SEVEN_B, split, shape)
    assert minimum == vllm_engine_minimum(SEVEN_B, whole, shape) > 2 * SEVEN_B.total_params / 2
    assert rollout_phase(SEVEN_B, split, shape, 80 * GIB).terms["vLLM engine"] == minimum


def test_synthesis_task_time_by_hand_and_the_shard_count_a_limit_needs():
    """A 1e9-parameter, 2-layer transformer of hidden 100 over 1,000 tokens: 2.0008e12 FLOP per pass; 10 steps
    with true CFG on an A100 (312 TFLOPS at 45 %), plus the non-diffusion share."""
    work = DiffusionWork(params=1e9, layers=2, hidden=100, tokens=1000, steps=10, true_cfg=True)
    assert work.flops_per_image == (2e12 + 4 * 2 * 1000**2 * 100) * 20
    per_image = work.flops_per_image / (312e12 * DIFFUSION_EFFICIENCY) * (1 + NON_DIFFUSION_SHARE)
    assert work.seconds_per_image("A100") == pytest.approx(per_image)
    assert DiffusionWork(1e9, 2, 100, 1000, 10, False).flops_per_image == work.flops_per_image / 2
    task = task_time("s", work, "A100", images=1000, shards=3, workers_per_shard=2, limit="0:30")  # 30 s
    assert task.images_per_worker == 167 and task.images_within_limit == int(30 // per_image)
    assert not task.fits and task.shards_needed(1000) == math.ceil(1000 / (int(30 // per_image) * 2))
    wide = task_time("s", work, "A100", 1000, task.shards_needed(1000), 2, "0:30")
    assert wide.fits
    assert [slurm_seconds(t) for t in ("45", "01:30", "04:00:00", "1-02", "1-00:00:30")] == \
        [2700, 90, 14400, 93600, 86430]


def test_the_qwen_image_recipes_get_refused_time_limits_and_the_shard_count_that_fits():
    """Qwen-Image at 50 steps with true CFG: ~40 s of drawing per 1024^2 image on an H100 (the calibration);
    500 images per task exceed 04:00:00, and the named shard count fits. Stage 2 edits twice the tokens."""
    config = recipe("qwen25vl_7b")
    stage1, stage2 = synthesis_task_times(config, "H100", 64 * 500)
    assert stage1.seconds_per_image / (1 + NON_DIFFUSION_SHARE) == pytest.approx(40, rel=0.02)
    assert stage2.seconds_per_image > 2 * stage1.seconds_per_image  # attention grows with the square of the tokens
    assert stage1.images_per_worker == 500 and not stage1.fits
    with pytest.raises(ConfigError, match=rf"synthesis stage 1 draws 500 images .* synthesis.num_shards="
                                          rf"{stage1.shards_needed(64 * 500)} "):
        refuse_if_synthesis_exceeds_time(config, "H100", 64 * 500)
    shards = max(stage1.shards_needed(64 * 500), stage2.shards_needed(64 * 500))
    refuse_if_synthesis_exceeds_time(recipe("qwen25vl_7b", f"synthesis.num_shards={shards}"), "H100", 64 * 500)
    # fewer steps without CFG, a faster GPU, a longer limit: each moves the verdict
    fast = recipe("qwen25vl_7b", "synthesis.redraw.call_kwargs.num_inference_steps=20",
                  "synthesis.redraw.call_kwargs.true_cfg_scale=1.0")
    assert synthesis_task_times(fast, "H100", 64 * 500)[0].seconds == pytest.approx(stage1.seconds / 5)
    assert synthesis_task_times(config, "B200", 64 * 500)[0].seconds < stage1.seconds / 2
    assert synthesis_task_times(recipe("qwen25vl_7b", "cluster.time.synth=1-00:00:00"), "H100", 64 * 500)[1].fits
    assert synthesis_task_times(config, "H100", None)[0].fits  # inputs unknown here: nothing to refuse


def test_the_tiny_recipe_plans_with_the_packaged_reward_model():
    """``reward.embedding_model`` unset (the packaged model) is planned, not a crash."""
    from nemo_viper.planning.recipe import REWARD_MODELS

    result = plan_recipe(recipe("tiny"))
    assert result.plan.all_fit and result.source == "the tiny model"
    for phase in result.plan.phases:
        assert phase.terms["reward model"] == int(REWARD_MODELS[""]) * 4


def test_every_key_the_plan_suggests_is_accepted_by_the_config():
    """The synthesis switches name the keys of each diffusion section; applied through the recipe overrides,
    they reach the plan (its synthesis shape offloads) and are not suggested again."""
    result = plan_recipe(recipe("qwen25vl_7b"), 68)
    assert "synthesis.redraw.cpu_offload=true synthesis.edit.cpu_offload=true" in result.suggestion
    items = [item for item in result.suggestion.split() if "=" in item]
    applied = plan_recipe(recipe("qwen25vl_7b", *items), 68)
    suggested_again = applied.suggestion.split() if applied.suggestion else []
    assert not any(item.startswith("synthesis.") for item in suggested_again), applied.suggestion
    assert synthesis_shape(recipe("qwen25vl_7b", *items)).cpu_offload


def test_the_plan_reads_every_setting_from_the_config():
    """The shapes carry no default of a setting: each field is the config's value, here at non-default ones
    (the only defaults left are the plan's own assumptions, which no key sets)."""
    from dataclasses import MISSING, fields

    from nemo_viper.planning.memory import SynthesisShape
    from nemo_viper.planning.recipe import PROMPT_TEMPLATE_TOKENS, training_shapes

    assumptions = {f.name for f in fields(TrainingShape) if f.default is not MISSING}
    assert assumptions == {"reward_bytes_per_param", "fused_attention", "shared_images"}
    assert all(f.default is MISSING for f in fields(SynthesisShape))

    config = recipe("qwen25vl_7b", "rl.grpo.micro_batch_size=2", "rl.n=3", "rl.max_pixels=200704",
                    "rl.sampling.max_new_tokens=300", "rollout.megatron.max_batch_size=24", "model.precision=fp32",
                    "model.recompute=full", "model.recompute_vision=false", "synthesis.vlm.caption_tokens=100",
                    "synthesis.vlm.critique_tokens=150", "synthesis.vlm.max_pixels=50176",
                    "synthesis.vlm.generation.megatron.max_batch_size=12", "synthesis.edit.batch_size=3",
                    "synthesis.residency=alternate", "synthesis.edit.cpu_offload=true")
    stage1, stage2 = training_shapes(config).values()
    assert (stage1.micro_batch_size, stage1.responses_per_prompt, stage1.max_pixels, stage1.max_new_tokens,
            stage1.generation_batch_size, stage1.precision, stage1.recompute, stage1.recompute_vision) == (
        2, 3, 200704, 300, 24, "fp32", "full", False)
    assert stage1.prompt_text_tokens == PROMPT_TEMPLATE_TOKENS + 100 and stage2.images_per_prompt == 2
    synth = synthesis_shape(config)  # the edit pipeline: the heavier of the two
    assert (synth.vlm_batch_size, synth.vlm_tokens, synth.vlm_pixels, synth.pipeline_batch_size, synth.residency,
            synth.cpu_offload) == (12, 150 + PROMPT_TEMPLATE_TOKENS, 50176, 3, "alternate", True)
