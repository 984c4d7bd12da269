"""Every leaf key of the run config reaches a job: changing it changes what some phase's job is given.

"What a job is given" is computed as the job computes it: the run files are written, each phase task's
command line is parsed by the real CLI parser and turned into the job's config object by the same function
the command runs (``train_config``, ``synth_config``; the parsed arguments of the other commands), together
with the phase's placement (nodes, ranks, GPUs, tasks) and the sbatch script the launcher renders for each
phase (NeMo-Run's random torchrun ``--rdzv-id`` masked). A key that reaches none of these, neither on the base
run (CPU ranks) nor on the same run with GPUs, is dead: the test fails naming it. Keys read only at launch time
are listed in ``READ_AT_LAUNCH`` with their reader.

Each item of what is given (:class:`Given`) is computed when a comparison first asks for it, and a comparison
stops at the first item that differs; the item that told the previous key of the same section apart is asked
first (:class:`Hints`). A key is dead only after every item was compared, so the order saves work and decides
nothing.

A new key needs nothing here unless its value cannot be perturbed by the generic rule (bool: flipped,
number: changed, str: "x" appended, list/dict: one entry added) into a valid one; then give it a valid
alternative in ``ALTERNATIVES``.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import asdict
from collections.abc import Iterator

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from nemo_viper.cli import build_parser, synth_config, train_config
from nemo_viper.config import SYNTHESIS_PLAN_KEYS, PhaseJobOptions, ViperConfig, build, schema, validate
from nemo_viper.orchestration import plan, write_run_files
from nemo_viper.synthesis.config import SynthConfig
from nemo_viper.recipes import recipe

BASE = ("cluster.executor=slurm", "cluster.account=acct", "cluster.container_image=/images/viper.sqsh",
        "cluster.env.HF_HUB_OFFLINE=0", "parallel.cpu_ranks=4",  # online jobs: hub ids are valid model sources
        "eval.enabled=true", "eval.num_shards=2", "eval.guard_max_drop=1.0", "rounds=2")  # every eval phase kind

# Valid alternatives where the generic perturbation would be invalid (enums, layouts, paths, nulls).
ALTERNATIVES = {
    "name": "other",
    "model.hf_path": "{tmp}/hf",  # a directory; paths are not checked here
    "model.precision": "bf16",
    "model.fp8_recipe": "mxfp8",
    "model.layer_spec": "local",
    "model.recompute": "selective",
    "parallel.tensor": 2,
    "parallel.pipeline": 2,
    "parallel.nodes": 2,
    "parallel.gpus_per_node": 4,
    "parallel.cpu_ranks": 2,
    "rl.prompts_per_step": 8,
    "rl.image_backend": "pil",
    "rl.min_pixels": 784,  # the tiny recipe sets min = max (56x56): a larger min is invalid
    "rl.sampling.top_p": 0.9,
    "rl.sampling.stop_strings": ["</answer>"],
    "rl.grpo.loss.aggregation": "seq-mean-token-mean",
    "rl.grpo.loss.dual_clip_c": 3.0,
    "rl.grpo.loss.max_response_length": 512,
    "rl.grpo.loss.kl_estimator": "k1",
    "rl.grpo.optimizer.distributed_optimizer": True,
    "rl.grpo.optimizer.adam_beta1": 0.8,
    "logger.wandb.mode": "offline",
    "rl.grpo.optimizer.adam_beta2": 0.99,
    "rl.grpo.importance_sampling_cap": 2.0,
    "rollout.backend": "vllm",
    "rollout.megatron.max_batch_size": 16,  # default null: as many decode slots as fit
    "rollout.megatron.max_context_length": 4096,  # default null: the model's
    "rollout.megatron.eos_token_ids": [151645],  # default null: the tokenizer's
    "rollout.vllm.max_model_len": 4096,  # default null: the stage's prompt and response budgets
    "reward.mode": "f1",
    "reward.threshold": 0.8,
    "reward.embedding_model": "/models/other",
    "reward.device": "cpu",
    "cluster.executor": "local",
    "cluster.time.prepare": "00:45:00",
    "cluster.time.synth": "05:00:00",
    "cluster.time.rl": "1-00:00:00",
    "cluster.time.export": "02:00:00",
    "cluster.time.eval": "09:00:00",
    "cluster.time.eval_data": "00:40:00",
    "cluster.time.report": "00:20:00",
    "cluster.code": "package",
    "eval.tasks": ["mmstar"],
    "eval.backend": "vllm",
    "eval.limit": 2,
    "synthesis.images": "{tmp}/images",
    "synthesis.diffusion_preset": "qwen",
    "synthesis.redraw.pipeline": "StableDiffusionInstructPix2PixPipeline",  # tiny exists for these two
    "synthesis.edit.pipeline": "StableDiffusionPipeline",
    "synthesis.redraw.dtype": "bf16",
    "synthesis.redraw.device": "cpu",
    "synthesis.redraw.pixels": 512 * 512,
    "synthesis.redraw.prompt_template": "a photo: {prompt}",
    "synthesis.edit.dtype": "bf16",
    "synthesis.edit.device": "cpu",
    "synthesis.edit.pixels": 512 * 512,
    "synthesis.edit.prompt_template": "edit: {prompt}",
    "synthesis.vlm.precision": "bf16",
    "synthesis.vlm.max_pixels": 512 * 28 * 28,
    "synthesis.vlm.top_p": 0.9,
    "synthesis.vlm.generation.backend": "vllm",
    "synthesis.vlm.generation.megatron.max_batch_size": 8,
    "synthesis.vlm.generation.megatron.max_context_length": 4096,
    "synthesis.vlm.generation.megatron.eos_token_ids": [151645],
    "synthesis.vlm.generation.vllm.max_model_len": 4096,
    "synthesis.residency": "alternate",
    "synthesis.filters.min_refinements": 2,
    "synthesis.filters.max_refinements": 7,
    "synthesis.filters.language": None,
    "synthesis.filters.max_entities": 2,
    "synthesis.filters.entity_candidates": "policy",
    "synthesis.filters.min_changed_fraction": 0.01,
    "synthesis.filters.max_changed_fraction": 0.5,
    "cluster.container_image": None,  # jobs without a container
    "cluster.exit_signal": "USR2",
    **{f"cluster.options.{kind}.{key}": value
       for kind in vars(PhaseJobOptions())  # every kind of phase
       for key, value in (("qos", "high"), ("constraint", "a100"), ("gres", "gpu:1"), ("gpus_per_node", 2),
                          ("mem", "100G"), ("cpus_per_task", 4))},
}


def leaf_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in node:
        child = node._get_node(key)
        path = f"{prefix}{key}"
        if isinstance(child, DictConfig) and child._metadata.object_type not in (dict, None):
            keys += leaf_keys(child, f"{path}.")
        else:
            keys.append(path)
    return keys


def all_leaf_keys() -> list[str]:
    keys = [k for k in leaf_keys(schema()) if k != "synthesis"]
    synthesis = leaf_keys(OmegaConf.structured(SynthConfig), "synthesis.")
    return keys + [k for k in synthesis if k.removeprefix("synthesis.") not in SYNTHESIS_PLAN_KEYS]


def perturbed(key: str, value, tmp) -> object:
    if key in ALTERNATIVES:
        alternative = ALTERNATIVES[key]
        return alternative.replace("{tmp}", str(tmp)) if isinstance(alternative, str) else alternative
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(value, str):
        return f"{value}x"
    if isinstance(value, list):
        return [*value, "extra:/extra"]
    if isinstance(value, dict):
        return {**value, "EXTRA": "1"}
    raise AssertionError(f"{key}: no generic perturbation of {value!r}; add it to ALTERNATIVES")


@functools.cache
def cli_parser():
    return build_parser()  # parsing leaves the parser as it was: one serves every job


JOB_CONFIGS = {"train": train_config, "synth": synth_config}  # the rest: the parsed arguments themselves


class Given:
    """What the jobs and sbatch scripts of one run config are given, item by item, each computed as the job and
    the launcher compute it when first asked for (a comparison stops at the first difference):

    - ``("placement", phase)``: nodes, ranks, GPUs and tasks of the phase;
    - ``("job", phase, task)``: the task's command line parsed by the real CLI parser and turned into the job's
      config by the function the command runs, from the run files (written before the first job is built);
    - ``("script", phase)``: the phase's sbatch script, NeMo-Run's torchrun ``--rdzv-id`` (``random.randint`` per
      render) made constant: otherwise two renders of one config differ and every key would seem to reach it.

    Each given's ``run_dir`` is its own; values name it ``RUN_DIR``. With ``check_renders`` every script is
    rendered twice and must come out the same (else no key could be found dead)."""

    def __init__(self, data: dict, run_dir: str, check_renders: bool = False):
        self.data, self.run_dir, self.check_renders = data, run_dir, check_renders
        self.config = build(ViperConfig, set_key(data, "run_dir", run_dir))
        validate(self.config, check_paths=False)
        self.phases = plan(self.config)
        self.layout = [(phase.name, phase.tasks) for phase in self.phases]
        self.items = ([("placement", phase.name) for phase in self.phases]
                      + [("job", phase.name, index) for phase in self.phases for index in range(phase.tasks)]
                      + [("script", phase.name) for phase in self.phases])
        self.values: dict[tuple, str] = {}
        self.files_written = False

    def __getitem__(self, item: tuple) -> str:
        if item not in self.values:
            self.values[item] = self.compute(*item).replace(self.run_dir, "RUN_DIR")
        return self.values[item]

    def compute(self, kind: str, name: str, task: int = 0) -> str:
        phase = next(phase for phase in self.phases if phase.name == name)
        if kind == "placement":
            return repr((phase.distributed, phase.nodes, phase.ranks_per_node, phase.gpus_per_node, phase.tasks))
        if kind == "job":
            if not self.files_written:
                write_run_files(self.config)
                self.files_written = True
            args = cli_parser().parse_args(list(phase.task_args(task)))
            job_config = JOB_CONFIGS.get(args.command)
            return repr(job_config(args) if job_config else sorted(vars(args).items(), key=str))
        if self.config.cluster.executor != "slurm":
            return "no sbatch script: cluster.executor=local"
        script = self.render(phase)
        if self.check_renders:
            assert self.render(phase) == script, "two renders of one config differ: no key could be found dead"
        return script

    def render(self, phase) -> str:
        from nemo_viper.launcher.nemo_run_jobs import sbatch_script

        return re.sub(r"--rdzv-id \d+", "--rdzv-id ID", sbatch_script(self.config, phase, self.phases))

    def difference(self, other: Given, hint: tuple | None) -> tuple | None:
        """The first item whose value differs from ``other``'s (the phases themselves: ``("layout",)``), or
        None. Asked first: the free placements, ``hint``, the other items of its kind; then the rest in plan
        order. The order only saves work: every item is compared before None is returned."""
        if self.layout != other.layout:
            return ("layout",)
        hint_kind = hint[0] if hint else None
        order = sorted(self.items, key=lambda item: (item[0] != "placement", item != hint, item[0] != hint_kind))
        return next((item for item in order if self[item] != other[item]), None)


class Hints:
    """The item that told the last key of each section apart: the likeliest for the next key of the section."""

    def __init__(self):
        self.items: dict[str, tuple] = {}

    def sections(self, key: str) -> list[str]:
        parts = key.split(".")
        return [".".join(parts[:n]) for n in range(len(parts) - 1, -1, -1)]  # nearest first, "" last

    def __getitem__(self, key: str) -> tuple | None:
        return next((self.items[s] for s in self.sections(key) if s in self.items), None)

    def record(self, key: str, item: tuple) -> None:
        self.items.update(dict.fromkeys(self.sections(key), item))


@pytest.fixture(autouse=True)
def no_stdin(monkeypatch, tmp_path):
    import io

    import nemo_run

    monkeypatch.setattr("sys.stdin", io.StringIO())  # NeMo-Run's local tunnel reads stdin
    packager = nemo_run.GitArchivePackager  # cluster.code=package: render it from a checkout with local edits too
    monkeypatch.setattr(nemo_run, "GitArchivePackager",
                        lambda **kwargs: packager(**{**kwargs, "check_uncommitted_changes": False}))
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemorun"))


def set_key(data: dict, key: str, value) -> dict:
    data = copy.deepcopy(data)
    *parents, leaf = key.split(".")
    node = data
    for parent in parents:
        node = node.setdefault(parent, {})
    node[leaf] = value
    return data


# Keys read at launch time, outside any job and any sbatch script; what reads them is named.
READ_AT_LAUNCH = {
    "cluster.code": "the NeMo-Run packager that ships the code (launcher.nemo_run_jobs._slurm_executor)",
    "cluster.min_free_disk_gb": "the preflight disk check before submission (doctor.check)",
    **{f"cluster.ssh.{key}": "NeMo-Run's SSHTunnel to the login node (launcher.nemo_run_jobs._tunnel; each one is "
       "needed by the connection in tests/test_ssh_launch.py)" for key in ("host", "user", "port", "identity")},
}
# Keys that only act on GPU phases; checked on the base run with GPUs when the CPU base shows no change.
GPU_BASE = {"parallel.gpus_per_node": 4}
# Keys whose perturbed value is valid only beside another setting: checked against a base that has it.
COMPANIONS = {"parallel.pipeline": ("rollout.backend", "vllm")}  # PP generates on vLLM only


@pytest.mark.slow
def test_every_leaf_key_reaches_a_job(tmp_path):
    base_config = recipe("tiny", *BASE, f"run_dir={tmp_path}/run")
    base_data = OmegaConf.to_container(OmegaConf.structured(base_config))
    base_tree, synthesis_defaults = OmegaConf.create(base_data), OmegaConf.structured(SynthConfig)
    base = Given(base_data, f"{tmp_path}/base", check_renders=True)
    gpu_data = functools.reduce(lambda data, setting: set_key(data, *setting), GPU_BASE.items(), base_data)
    gpu_base = functools.cache(lambda: Given(gpu_data, f"{tmp_path}/base_gpu", check_renders=True))

    def references(key: str) -> Iterator[Given]:
        if key in COMPANIONS:
            yield Given(set_key(base_data, *COMPANIONS[key]), f"{tmp_path}/base_{key}", check_renders=True)
        else:
            yield base
        if key not in GPU_BASE:
            yield gpu_base()

    def difference(key: str, value) -> tuple | None:
        """The first item of a reference's given that setting ``key`` to ``value`` changes (raises if invalid)."""
        for reference in references(key):
            changed = Given(set_key(reference.data, key, value), f"{tmp_path}/run_{key}")
            item = changed.difference(reference, hints[key])
            if item is not None:
                return item
        return None

    hints, dead, invalid = Hints(), [], []
    for key in all_leaf_keys():
        if key == "run_dir" or key in READ_AT_LAUNCH:
            continue  # every path of every job lies under run_dir
        current = OmegaConf.select(base_tree, key)
        if current is None and key.startswith("synthesis."):
            current = OmegaConf.select(synthesis_defaults, key.removeprefix("synthesis."))
        if isinstance(current, (DictConfig, ListConfig)):
            current = OmegaConf.to_container(current)
        value = perturbed(key, current, tmp_path)
        try:
            item = difference(key, value)
        except Exception as exc:  # noqa: BLE001 - reported below with the key
            invalid.append(f"{key}={value!r}: {exc}")
            continue
        if item is None:
            dead.append(key)
        else:
            hints.record(key, item)
    assert set(READ_AT_LAUNCH) <= set(all_leaf_keys()), "READ_AT_LAUNCH names a key the schema no longer has"
    assert not invalid and not dead, (f"config keys that change no job (dead keys): {dead}\n"
                                      "perturbation rejected; give these keys a valid value in ALTERNATIVES:\n"
                                      + "\n".join(invalid))


def test_leaf_keys_cover_the_library_configs():
    keys = set(all_leaf_keys())
    for key in ("model.freeze_vision_tower", "model.fp8_recipe", "rl.grpo.optimizer.weight_decay",
                "rl.grpo.optimizer.clip_grad", "rl.grpo.loss.dual_clip_c", "rl.grpo.advantage.normalize_by_std",
                "rl.grpo.overlong_filtering", "rl.grpo.loss.kl_beta", "reward.threshold", "reward.one_to_one",
                "reward.format_weight", "reward.correctness_weight", "synthesis.batch_size", "synthesis.num_shards",
                "model.recompute", "model.recompute_vision", "rl.min_pixels", "rl.max_pixels",
                "rl.grpo.importance_sampling_cap", "rollout.backend", "rollout.megatron.max_batch_size",
                "rollout.vllm.gpu_memory_utilization", "rollout.vllm.cpu_kv_cache_gib",
                "rollout.vllm.enable_sleep_mode", "rollout.vllm.max_model_len", "rollout.vllm.image_micro_batch_size",
                "synthesis.residency", "synthesis.vlm.generation.backend",
                "synthesis.vlm.generation.vllm.max_num_seqs"):
        assert key in keys, key


def test_train_flags_carry_no_default_and_each_reaches_its_key(tmp_path):
    """``train`` with no flag builds the dataclasses' defaults (no flag has an argparse default of its own);
    each flag at a value other than the default sets exactly its key; ``--help`` names the dataclass default."""
    from nemo_viper.cli import TRAIN_FLAGS, TRAIN_SWITCHES

    parser = build_parser()
    required = ["train", "--stage", "1", "--data", "d", "--policy", "p", "--out", "o"]
    defaults = asdict(ViperConfig())
    assert train_config(parser.parse_args(required)).run_config == defaults

    def value_at(tree: dict, key: str):
        for part in key.split("."):
            tree = tree[part]
        return tree

    for flag, key in {**TRAIN_FLAGS, **TRAIN_SWITCHES}.items():
        key, _, switched = key.partition("=")
        default = value_at(defaults, key)
        if flag in TRAIN_SWITCHES:
            value = switched != "false"
        else:  # ALTERNATIVES differ from the recipes' values; model.precision's is the dataclass default
            value = "fp32" if key == "model.precision" else perturbed(key, default, tmp_path)
        argv = [flag, str(value)] if flag in TRAIN_FLAGS else [flag]
        companion = ["rollout.backend=vllm"] if key == "parallel.pipeline" else []  # PP generates on vLLM only
        config = train_config(parser.parse_args(required + argv + companion)).run_config
        expected = pytest.approx(value) if isinstance(value, float) else value
        assert value_at(config, key) == expected, flag
        assert value_at(config, key) != default, flag
        changed = [k for k in all_leaf_keys() if not k.startswith("synthesis.")
                   and value_at(config, k) != value_at(defaults, k)]
        assert set(changed) == {key, *(item.partition("=")[0] for item in companion)}, (flag, changed)

    help_text = " ".join(parser._subparsers._group_actions[0].choices["train"].format_help().split())
    assert f"sets rl.steps (default {ViperConfig().rl.steps})" in help_text
    assert "sets rl.grpo.advantage.normalize_by_std=false (default True)" in help_text
