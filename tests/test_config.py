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


def test_a_group_override_swaps_the_recipes_part():
    """``parallel=h100_tp1`` replaces the recipe's ``parallel: h100_tp2`` (Hydra's group override), so the 7B
    recipe then has the 3B layout; the recipe's own keys and later key overrides still apply on top."""
    swapped = recipe("qwen25vl_7b", "parallel=h100_tp1", "parallel.cpu_ranks=3", "reward=minilm")
    assert swapped.parallel == recipe("qwen25vl_3b", "parallel.cpu_ranks=3").parallel
    assert swapped.parallel.nodes == 1 and swapped.reward.threshold == 0.7  # conf/reward/minilm.yaml
    assert swapped.model.hf_path.endswith("7B-Instruct") and swapped.model.recompute == "selective"
    with pytest.raises(ConfigError, match=r"parallel=nope: parallel has no part 'nope' \(parts: cpu, h100_tp1, h100_tp2\)"):
        recipe("tiny", "parallel=nope")


def test_the_config_command_prints_the_resolved_tree(capsys, tmp_path):
    from nemo_viper.cli import main

    overrides = ["parallel=h100_tp1", "rl.steps=3"]
    assert main(["config", "--recipe", "qwen25vl_7b", *overrides]) == 0
    (tmp_path / "viper.yaml").write_text(capsys.readouterr().out)
    printed = compose(tmp_path / "viper.yaml")
    assert printed.parallel.tensor == 1 and printed.rl.steps == 3
    expected = recipe("qwen25vl_7b", *overrides)
    assert printed == ViperConfig(**{**expected.__dict__, "run_dir": printed.run_dir})
    assert main(["config", "--recipe", "tiny", "rl.grpo.loss.eps_low=1.5"]) == 2
    assert "rl.grpo.loss.eps_low=1.5 must be < 1" in capsys.readouterr().err


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
        (["parallel.pipeline=2", "parallel.cpu_ranks=2"], "parallel.pipeline=2 needs rollout.backend=vllm"),
        (["rollout.megatron.max_batch_size=0"], "rollout.megatron.max_batch_size=0 must be >= 1"),
        (["rollout.vllm.gpu_memory_utilization=2"], "rollout.vllm.gpu_memory_utilization=2.0 must be in (0, 1]"),
        (["rollout.vllm.image_micro_batch_size=0"], "rollout.vllm.image_micro_batch_size=0 must be >= 1"),
        (["eval.batch_size=0"], "eval.batch_size=0 must be >= 1"),
        (["eval.tasks=[foo]"], "eval.tasks='foo': unknown"),
        (["eval.heldout.count=-1"], "eval.heldout.count=-1 must be >= 0"),
        (["eval.backend=x"], "eval.backend='x' is not one of"),
        # Non-finite numbers pass range checks (inf > 0): refused by name, the synthesis section's strings too.
        (["rl.grpo.optimizer.lr=inf"], "rl.grpo.optimizer.lr=inf is not a finite number"),
        (["rl.grpo.loss.kl_beta=inf"], "rl.grpo.loss.kl_beta=inf is not a finite number"),
        (["rl.grpo.loss.dual_clip_c=inf"], "rl.grpo.loss.dual_clip_c=inf is not a finite number"),
        (["synthesis.vlm.temperature=inf"], "synthesis.vlm.temperature='inf' is not a finite number"),
        (["synthesis.filters.max_changed_fraction=-Infinity"], "is not a finite number"),
        # Account and partition are pasted into #SBATCH lines: a space or newline would add or cut options.
        (["cluster.account='acct --qos=high'"], "cluster.account='acct --qos=high' is not a Slurm account name"),
        (["cluster.account='acct\nX'"], "is not a Slurm account name"),
        (["cluster.partition='gpu --exclusive'"], "is not a Slurm partition name"),
        (["cluster.exit_signal=URGENT"], "cluster.exit_signal='URGENT' is not a signal name"),
        (["cluster.exit_signal_lead_s=0"], "cluster.exit_signal_lead_s=0 must be in [1, 65535]"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as exc:
        validate(recipe("tiny", *overrides))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_a_merge_error_names_the_override_or_file_it_comes_from(tmp_path):
    """An unknown or mistyped override is named as typed, not blamed on the recipe file; a bad key written in a
    recipe file names that file."""
    for override, message in [("rl.nonsense=3", "rl.nonsense=3: Key 'nonsense' not in 'RLConfig'"),
                              ("cluster.options.rl.sbatch=[a,b]", "cluster.options.rl.sbatch=[a,b]: Cannot merge")]:
        with pytest.raises(ConfigError) as exc:
            recipe("tiny", override)
        assert str(exc.value).startswith(message) and "tiny.yaml" not in str(exc.value), str(exc.value)
    bad = tmp_path / "mine.yaml"
    bad.write_text("rl:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: Key 'stepz' not in 'RLConfig'"):
        compose(bad, ["rl.steps=2"])


def test_a_partition_list_and_plain_names_pass():
    validate(recipe("tiny", "cluster.account=proj-a.b_1", "cluster.partition=gpu,gpu_long"))


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="recipe='qwen99' is not one of"):
        recipe("qwen99")


def _leaves(data: dict, prefix: str = ""):
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _at(data, key: str):
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return KeyError  # not a key of the reference: nothing repeated
        data = data[part]
    return data


def test_no_yaml_in_conf_repeats_a_default():
    """Each default is written once, in its dataclass: a part of ``conf/<group>/`` states only what differs from
    the section's dataclass (``synthesis``: :class:`SynthConfig`, less the keys the plan passes as flags), and a
    recipe's own keys only what differs from its parts."""
    from omegaconf import OmegaConf

    from nemo_viper.config import CONF_DIR, schema
    from nemo_viper.synthesis.config import SynthConfig

    defaults = OmegaConf.to_container(schema())
    defaults["synthesis"] = OmegaConf.to_container(OmegaConf.structured(SynthConfig))
    for key in ("images", "num_shards"):  # the synth jobs' flags (config.synthesis_settings), set by each part
        defaults["synthesis"].pop(key)
    repeated = []
    for path in sorted(CONF_DIR.glob("*/*.yaml")):
        data = OmegaConf.to_container(OmegaConf.load(path)) or {}
        if path.parent.name == "recipes":
            parts = {group: name for part in data.pop("defaults") for group, name in part.items()}
            reference = OmegaConf.to_container(OmegaConf.merge(schema(), *(
                {group: OmegaConf.load(CONF_DIR / group / f"{name}.yaml")} for group, name in parts.items())))
            reference["synthesis"] = {**defaults["synthesis"], **reference["synthesis"]}
        else:
            reference = defaults[path.parent.name]
        repeated += [f"{path.relative_to(CONF_DIR)}: {key}={value!r}" for key, value in _leaves(data)
                     if _at(reference, key) == value]
    assert repeated == [], "YAML keys that repeat the value they already have"
