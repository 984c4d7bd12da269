"""Recipes compose from conf/ YAML; config errors are reported before any work, naming the key."""

import pytest
from omegaconf import OmegaConf

from nemo_viper.config import ViperConfig, validate
from nemo_viper.errors import ConfigError
from recipes import RECIPES, recipe


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


def test_yaml_form_round_trips():
    config = recipe("qwen25vl_7b", "rl.steps=7")
    again = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ViperConfig), OmegaConf.create(OmegaConf.to_yaml(config))))
    assert again == config and again.rl.steps == 7


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["rl.stepz=3"], "Key 'stepz' not in 'RLSection'; full_key: rl.stepz"),
        (["parallel.tensor=two"], "Value 'two' of type 'str' could not be converted to Integer; full_key: parallel.tensor"),
        (["parallel.tensor=3", "parallel.cpu_ranks=3"],
         "parallel.tensor/parallel.pipeline: tensor_parallel=3 does not divide num_attention_heads=4"),
        (["parallel.tensor=2", "parallel.cpu_ranks=3"],
         "parallel.tensor x parallel.pipeline = 2 x 1 does not divide the 3 ranks"),
        (["synthesis.images=/no/such/images"], "synthesis.images='/no/such/images' does not exist"),
        (["model.hf_path=/no/such/model"], "model.hf_path: Hugging Face checkpoint directory not found: /no/such/model"),
        (["model.precision=fp4"], "model.precision='fp4' is not one of"),
        (["model.layer_spec=te"], "model.layer_spec='te' is not one of"),
        (["synthesis.vlm.bogus=1"], "synthesis: Key 'bogus' not in 'VLMConfig'; full_key: vlm.bogus"),
        (["rl.prompts_per_step=3", "parallel.cpu_ranks=2"], "rl.prompts_per_step=3 is not divisible"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as exc:
        validate(recipe("tiny", *overrides))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="recipe='qwen99' is not one of"):
        recipe("qwen99")
