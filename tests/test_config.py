"""Recipes compose from conf/ YAML; config errors are reported before any work, naming the key."""

import pytest
from nemo_viper.config import ViperConfig, compose, to_yaml, validate
from nemo_viper.errors import ConfigError
from nemo_viper.recipes import RECIPES, recipe


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_composes_and_validates(name):
    config = recipe(name)
    assert isinstance(config, ViperConfig) and config.name == name
    validate(config, check_paths=(name == "tiny"))  # the cluster recipes point at cluster paths


def test_3b_to_7b_switches_tensor_parallel_and_keeps_batch_arithmetic():
    small, large = recipe("qwen25vl_3b"), recipe("qwen25vl_7b")
    assert (small.parallel.tensor, large.parallel.tensor) == (1, 2)
    assert small.parallel.data_parallel == large.parallel.data_parallel == 8
    assert large.model.hf_path.endswith("Qwen2.5-VL-7B-Instruct")
    assert recipe("qwen25vl_3b", "parallel.tensor=2", "parallel.nodes=2").parallel == large.parallel


def test_tiny_recipe_shows_images_at_the_warm_start_size():
    """The tiny policy is warm-started on images at its checkpoint's minimum pixel budget (56x56, 4 image
    tokens); at a larger budget its stage-1 answers were noise (docs/evaluation.md, "The embedded default
    learns"), so RL, synthesis and the benchmark phases must all show it images of exactly that size."""
    from nemo_viper.models.tiny import TinyModelConfig

    config, budget = recipe("tiny"), TinyModelConfig().min_pixels
    assert config.rl.min_pixels == config.rl.max_pixels == budget
    assert config.synthesis["vlm"]["max_pixels"] == budget
    assert int(config.eval.model_args["min_pixels"]) == int(config.eval.model_args["max_pixels"]) == budget


def test_yaml_form_round_trips(tmp_path):
    config = recipe("qwen25vl_7b", "rl.steps=7", "rl.sampling.stop_strings=[</answer>]")
    (tmp_path / "viper.yaml").write_text(to_yaml(config))
    again = compose(tmp_path / "viper.yaml")
    assert again == config and again.rl.steps == 7 and again.rl.sampling.stop_strings == ("</answer>",)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["rl.stepz=3"], "Key 'stepz' not in 'RLConfig'; full_key: rl.stepz"),
        (["parallel.tensor=two"], "Value 'two' of type 'str' could not be converted to Integer; full_key: parallel.tensor"),
        (["parallel.tensor=3", "parallel.cpu_ranks=3"],
         "parallel.tensor/parallel.pipeline: tensor_parallel=3 does not divide num_attention_heads=4"),
        (["parallel.tensor=2", "parallel.cpu_ranks=3"],
         "parallel.tensor x parallel.pipeline = 2 x 1 does not divide the 3 ranks"),
        (["synthesis.images=/no/such/images"], "synthesis.images='/no/such/images' does not exist"),
        (["model.hf_path=/no/such/model"], "model.hf_path: Hugging Face checkpoint directory not found: /no/such/model"),
        (["model.precision=fp4"], "model.precision='fp4' is not one of"),
        (["model.layer_spec=te"], "model.layer_spec='te' is not one of"),
        (["synthesis.vlm.bogus=1"], "synthesis: vlm.bogus: Key 'bogus' not in 'VLMConfig'"),
        (["rl.prompts_per_step=3", "parallel.cpu_ranks=2"], "rl.prompts_per_step=3 is not divisible"),
        # The hostile-input probe of issue 16: each value fails validation, naming its key, before any work.
        (["rl.grpo.loss.eps_low=1.5"], "rl.grpo.loss.eps_low=1.5 must be < 1"),
        (["rl.grpo.loss.eps_low=-0.5"], "rl.grpo.loss.eps_low=-0.5 must be >= 0"),
        (["rl.n=1"], "rl.n=1 must be >= 2"),
        (["rl.n=0"], "rl.n=0 must be >= 2"),
        (["rl.grpo.micro_batch_size=0"], "rl.grpo.micro_batch_size=0 must be >= 1"),
        (["reward.threshold=7"], "reward.threshold=7.0 must lie in [-1, 1]"),
        (["parallel.cpu_ranks=0"], "parallel.cpu_ranks=0 must be >= 1"),
        (["parallel.cpu_ranks=-2"], "parallel.cpu_ranks=-2 must be >= 1"),
        (["parallel.gpus_per_node=-8"], "parallel.gpus_per_node=-8 must be >= 0"),
        (["rl.steps=-5"], "rl.steps=-5 must be >= 1"),
        (["rl.grpo.optimizer.lr=-1"], "rl.grpo.optimizer.lr=-1.0 must be > 0"),
        (["rl.save_every=0"], "rl.save_every=0 must be >= 1"),
        (["rl.prompts_per_step=-4"], "rl.prompts_per_step=-4 must be >= 1"),
        (["rl.sampling.max_new_tokens=-1"], "rl.sampling.max_new_tokens=-1 must be >= 1"),
        (["rl.sampling.temperature=-1"], "rl.sampling.temperature=-1.0 must be > 0"),
        (["rl.grpo.loss.dual_clip_c=0.5"], "rl.grpo.loss.dual_clip_c=0.5 must be > 1"),
        (["rl.grpo.advantage.eps=0"], "rl.grpo.advantage.eps=0.0 must be > 0"),
        (["reward.mode=accuracy"], "reward.mode='accuracy' is not one of"),
        (["rl.image_backend=cv2"], "rl.image_backend='cv2' is not one of"),
        (["model.fp8_recipe=fp4"], "model.fp8_recipe='fp4' is not one of"),
        (["cluster.executor=k8s"], "cluster.executor='k8s' is not one of"),
        (["rounds=0"], "rounds=0 must be >= 1"),
        (["synthesis.batch_size=-1"], "synthesis: batch_size=-1 must be >= 1"),
        (["synthesis.num_shards=0"], "synthesis.num_shards=0 must be an integer >= 1"),
        (["synthesis.filters.max_entities=9"], "synthesis: max_entities=9 must be 1..3"),
        (["model.recompute=x"], "model.recompute='x' is not one of"),
        (["rl.min_pixels=10"], "rl.min_pixels=10 must be >= 784"),
        (["rl.grpo.importance_sampling_cap=0"], "rl.grpo.importance_sampling_cap=0.0 must be > 0"),
        (["rollout.backend=x"], "rollout.backend='x' is not one of"),
        (["rollout.megatron.max_batch_size=0"], "rollout.megatron.max_batch_size=0 must be >= 1"),
        (["rollout.vllm.gpu_memory_utilization=2"], "rollout.vllm.gpu_memory_utilization=2.0 must be in (0, 1]"),
        (["rollout.vllm.image_micro_batch_size=0"], "rollout.vllm.image_micro_batch_size=0 must be >= 1"),
        (["eval.batch_size=0"], "eval.batch_size=0 must be >= 1"),
        (["eval.tasks=[foo]"], "eval.tasks='foo': unknown"),
        (["eval.heldout.count=-1"], "eval.heldout.count=-1 must be >= 0"),
        (["eval.backend=x"], "eval.backend='x' is not one of"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as exc:
        validate(recipe("tiny", *overrides))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="recipe='qwen99' is not one of"):
        recipe("qwen99")
