"""``nemo-viper plan``: the memory plan of a recipe (adapter from :class:`~nemo_viper.config.ViperConfig` to
:mod:`nemo_viper.planning.memory`), its verdict for a GPU size, and the smallest change that fits.

The architecture comes from ``model.hf_path``'s ``config.json`` when the directory exists here, else from
the published config of the Qwen2.5-VL checkpoint its name matches (the recipes' paths are cluster paths);
``tiny`` from the tiny model's sizes, without building it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from nemo_viper.errors import ConfigError, NemoViperError
from nemo_viper.planning.memory import (
    GIB,
    Architecture,
    Layout,
    Plan,
    SynthesisShape,
    TrainingShape,
    plan_memory,
    prompt_tokens,
    training_changes,
)
from nemo_viper.planning.synthesis_time import DiffusionWork, TaskTime, task_time

# The published config.json values the plan needs (huggingface.co/Qwen/Qwen2.5-VL-{3B,7B}-Instruct).
_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "patch_size": 14,
           "spatial_merge_size": 2, "temporal_patch_size": 2}
PUBLISHED = {
    "Qwen2.5-VL-3B": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                      "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                      "tie_word_embeddings": True, "vision_config": _VISION},
    "Qwen2.5-VL-7B": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                      "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                      "tie_word_embeddings": False, "vision_config": _VISION},
}
# Parameters of the diffusion pipelines of the presets: (all components, largest component = the transformer,
# transformer hidden size, latent tokens per 1024^2 image, transformer layers). Qwen-Image: 20.4B MMDiT of 60
# blocks + Qwen2.5-VL-7B text encoder + VAE; the editor's tokens are the target's and the reference image's.
PIPELINES = {"Qwen/Qwen-Image": (28.85e9, 20.43e9, 3072, 4096, 60),
             "Qwen/Qwen-Image-Edit": (28.85e9, 20.43e9, 3072, 8192, 60)}
# Reward embedding models: parameters (float32 on the GPU).
REWARD_MODELS = {"bge-m3": 568e6, "": 22.7e6}  # "" = the packaged all-MiniLM-L6-v2
PROMPT_TEMPLATE_TOKENS = 160  # chat template + task text of the RL prompts (nemo_viper.prompts), rounded up
# max_batch_size null: the Megatron backend fills half the free memory with decode slots, which the plan cannot
# know before the job runs; it counts this many samples decoding together instead
UNSET_DECODE_BATCH = 64
DEFAULT_GPU, DEFAULT_GPU_GIB = "H100", 80  # the GPU the plan checks against unless told (model, GiB)
DEFAULT_MARGIN = 0.10  # kept free: the estimator measured up to 10 % low on CPU (docs/benchmarks.md)


def architecture(hf_path: str) -> tuple[Architecture, str]:
    """The checkpoint's sizes and where they came from."""
    if hf_path == "tiny":
        from nemo_viper.models.tiny import TinyModelConfig

        return Architecture.from_hf_config(TinyModelConfig().hf_sizes()), "the tiny model"
    path = Path(hf_path) / "config.json"
    if path.is_file():
        return Architecture.from_hf_config(json.loads(path.read_text())), str(path)
    for name, config in PUBLISHED.items():
        if name.lower() in hf_path.lower():
            return Architecture.from_hf_config(config), f"published {name}-Instruct config ({hf_path} is not here)"
    raise ConfigError(f"model.hf_path={hf_path!r}: no config.json here and not a published Qwen2.5-VL-3B/7B name")


def _reward_params(embedding_model: str | None) -> float:
    """Parameters of ``reward.embedding_model`` (unset: the packaged model)."""
    embedding_model = embedding_model or ""
    for name, params in REWARD_MODELS.items():
        if name and name in embedding_model.lower():
            return params
    if embedding_model and Path(embedding_model).is_dir():
        return sum(f.stat().st_size for f in Path(embedding_model).rglob("*.safetensors")) / 4
    return REWARD_MODELS[""]


def stage_prompt_budget(stage: int, caption_tokens: int) -> dict:
    """The recipe's prompt budget of RL stage ``stage`` (``TrainingShape`` fields): stage 1 shows one image
    and a synthesised caption of at most ``caption_tokens`` tokens, stage 2 two images."""
    if stage == 1:
        return {"prompt_text_tokens": PROMPT_TEMPLATE_TOKENS + caption_tokens, "images_per_prompt": 1}
    return {"prompt_text_tokens": PROMPT_TEMPLATE_TOKENS, "images_per_prompt": 2}


def caption_tokens(synthesis: dict) -> int:
    """The synthesis section's caption budget (stage-1 prompts show the caption)."""
    from nemo_viper.synthesis.config import VLMConfig

    return synthesis.get("vlm", {}).get("caption_tokens", VLMConfig.caption_tokens)


def rl_context_length(stage: int, caption_budget: int, max_pixels: int, max_new_tokens: int, hf_config: dict) -> int:
    """Prompt + response tokens of the longest sample RL stage ``stage`` allows: its prompt budget (every
    image at ``max_pixels``) plus ``max_new_tokens`` (the vLLM engine's ``max_model_len``)."""
    budget = stage_prompt_budget(stage, caption_budget)
    arch = Architecture.from_hf_config(hf_config)
    return prompt_tokens(arch, budget["prompt_text_tokens"], budget["images_per_prompt"], max_pixels) + max_new_tokens


def training_shapes(config) -> dict[str, TrainingShape]:
    """The two RL stages' shapes (:func:`stage_prompt_budget`), every setting read from ``config``."""
    from nemo_viper.models.config import ENTROPY_CHUNK_ROWS

    rl, parallel = config.rl, config.parallel
    rollout = config.rollout
    rows_per_rank = rl.prompts_per_step * rl.n // (rl.grpo.num_minibatches * parallel.data_parallel)
    settings = dict(
        micro_batch_size=rl.grpo.micro_batch_size,
        responses_per_prompt=rl.n,
        micro_batches_per_minibatch=max(1, rows_per_rank // rl.grpo.micro_batch_size),
        max_pixels=rl.max_pixels,
        max_new_tokens=rl.sampling.max_new_tokens,
        generation_batch_size=rollout.megatron.max_batch_size or UNSET_DECODE_BATCH,
        vllm_memory_fraction=rollout.vllm.gpu_memory_utilization if rollout.backend == "vllm" else 0.0,
        vllm_sleep_mode=rollout.vllm.enable_sleep_mode,
        precision=config.model.precision,
        recompute=config.model.recompute,
        recompute_vision=config.model.recompute_vision,
        reward_params=int(_reward_params(config.reward.embedding_model)),
        entropy_chunk=ENTROPY_CHUNK_ROWS,
    )
    captions = caption_tokens(config.synthesis)
    return {f"RL stage {stage}": TrainingShape(**settings, **stage_prompt_budget(stage, captions)) for stage in (1, 2)}


def pipeline_sizes(model: str) -> tuple | None:
    """:data:`PIPELINES` entry of a hub id or of a local directory named as the model (``/models/Qwen-Image``)."""
    name = Path(model).name.lower()
    return next((sizes for hub_id, sizes in PIPELINES.items() if hub_id.rpartition("/")[2].lower() == name), None)


def synthesis_config(config):
    """The recipe's :class:`~nemo_viper.synthesis.config.SynthConfig` on a GPU (its preset applied)."""
    from omegaconf import OmegaConf

    from nemo_viper.structured import structured_defaults
    from nemo_viper.synthesis.config import DIFFUSION_PRESETS, SynthConfig, resolve_preset

    preset = resolve_preset(config.synthesis.get("diffusion_preset", "auto"), cuda_available=True)
    merged = OmegaConf.merge(structured_defaults(SynthConfig), DIFFUSION_PRESETS[preset], config.synthesis,
                             {"out": "plan", "vlm": {"policy": config.model.hf_path}})
    return OmegaConf.to_object(merged)


def count_synthesis_inputs(config) -> int | None:
    """Input images of a synthesis round (``synthesis.images``), when they can be listed here."""
    from nemo_viper.synthesis.inputs import list_inputs

    try:
        return len(list_inputs(config.synthesis.get("images", "skimage")))
    except (NemoViperError, OSError):
        return None


def synthesis_task_times(config, gpu: str, images: int | None) -> list[TaskTime]:
    """Each synthesis stage's array task on ``gpu`` for ``images`` inputs per round (``None``: unknown), against
    ``cluster.time.synth``; stages whose pipeline the plan does not know are left out."""
    synth = synthesis_config(config)
    times = []
    for stage, diffusion in (("synthesis stage 1", synth.redraw), ("synthesis stage 2", synth.edit)):
        if not pipeline_sizes(diffusion.model):
            continue
        _, transformer, hidden, tokens, layers = pipeline_sizes(diffusion.model)
        kwargs = diffusion.call_kwargs
        true_cfg = kwargs.get("true_cfg_scale", 1.0) > 1 and kwargs.get("negative_prompt") is not None
        work = DiffusionWork(transformer, layers, hidden, tokens, kwargs.get("num_inference_steps", 50), true_cfg)
        times.append(task_time(stage, work, gpu, images, synth.num_shards, config.cluster.synthesis_gpus_per_task,
                               config.cluster.time.synth))
    return times


def refuse_if_synthesis_exceeds_time(config, gpu: str, images: int | None) -> None:
    """``ConfigError`` (one line) when a synthesis task cannot finish within ``cluster.time.synth``, naming the
    shard count that would."""
    for task in synthesis_task_times(config, gpu, images):
        if not task.fits:
            raise ConfigError(
                f"synthesis time: {task.stage} draws {task.images_per_worker} images per task at ~"
                f"{task.seconds_per_image:.0f} s each on {gpu} ({task.seconds / 3600:.1f} h) > cluster.time.synth="
                f"{config.cluster.time.synth}; set synthesis.num_shards={task.shards_needed(images)} (or raise "
                "cluster.time.synth); or launch with --ignore-time-plan")


DIFFUSION_SECTIONS = ("redraw", "edit")  # the synthesis sections that configure a diffusion pipeline


def known_diffusion_sections(synth) -> dict[str, object]:
    """The diffusion sections (name -> :class:`~nemo_viper.synthesis.config.DiffusionConfig`) whose pipeline
    the plan knows (:data:`PIPELINES`)."""
    sections = {name: getattr(synth, name) for name in DIFFUSION_SECTIONS}
    return {name: d for name, d in sections.items() if pipeline_sizes(d.model)}


def synthesis_shape(config) -> SynthesisShape | None:
    """The heavier of the two synthesis stages' pipelines with the policy; ``None`` for pipelines the plan
    does not know (the tiny ones: a few MB)."""
    synth = synthesis_config(config)
    known = [(pipeline_sizes(d.model), d) for d in known_diffusion_sections(synth).values()]
    if not known:
        return None
    (total, largest, hidden, tokens, _), diffusion = max(known, key=lambda item: item[0][3])
    return SynthesisShape(
        vlm_batch_size=synth.vlm.generation.megatron.max_batch_size or UNSET_DECODE_BATCH,
        vlm_tokens=max(synth.vlm.caption_tokens, synth.vlm.critique_tokens) + PROMPT_TEMPLATE_TOKENS,
        vlm_pixels=synth.vlm.max_pixels or config.rl.max_pixels,
        pipeline_params=int(total), largest_component_params=int(largest), pipeline_hidden=hidden,
        pipeline_tokens=tokens, pipeline_batch_size=diffusion.batch_size, cpu_offload=diffusion.cpu_offload,
        residency=synth.residency,
    )


@dataclass
class RecipePlan:
    plan: Plan
    architecture: Architecture
    source: str
    layout: Layout
    suggestion: str | None  # the smallest change that makes every phase fit, when some phase does not
    synthesis_times: list[TaskTime]
    gpu: str
    synthesis_images: int | None


def plan_recipe(config, gpu_gib: float = DEFAULT_GPU_GIB, margin: float = DEFAULT_MARGIN, gpu: str = DEFAULT_GPU,
                synthesis_images: int | None = None) -> RecipePlan:
    """Memory of every phase on ``gpu_gib`` GPUs, and the synthesis tasks' time on ``gpu`` for
    ``synthesis_images`` inputs per round (default: ``synthesis.images`` counted, when it is readable here)."""
    if synthesis_images is None:
        synthesis_images = count_synthesis_inputs(config)
    times = synthesis_task_times(config, gpu, synthesis_images)
    arch, source = architecture(config.model.hf_path)
    parallel = config.parallel
    gpus = parallel.world_size
    layout = Layout(parallel.tensor, parallel.pipeline, parallel.data_parallel,
                    distributed_optimizer=parallel.gpus_per_node > 0)
    shapes, synth = training_shapes(config), synthesis_shape(config)
    plan = plan_memory(arch, layout, shapes, synth, gpu_gib * GIB, margin)
    offload_keys = [f"synthesis.{name}.cpu_offload"
                    for name, d in known_diffusion_sections(synthesis_config(config)).items() if not d.cpu_offload]
    suggestion = None if plan.all_fit else _smallest_change(arch, layout, shapes, synth, plan, gpus,
                                                            config.rollout.vllm.gpu_memory_utilization, offload_keys)
    return RecipePlan(plan, arch, source, layout, suggestion, times, gpu, synthesis_images)


def _smallest_change(arch, layout, shapes, synth, plan: Plan, gpus: int, vllm_share: float,
                     offload_keys: list[str]) -> str:
    """The synthesis switches the synthesis phase needs (``offload_keys``: the config keys of the diffusion
    sections' CPU offload), then the first RL candidate (in order of cost) that makes every phase fit alone,
    else the RL candidates applied one after another until they do."""
    changes = []
    if synth is not None and not plan.fits(plan.phases[0]):
        switches = [("residency", "alternate", ["synthesis.residency"])]
        if offload_keys:
            switches.append(("cpu_offload", True, offload_keys))
        for field_name, value, keys in switches:
            if getattr(synth, field_name) == value:  # already set: nothing to suggest
                continue
            synth = replace(synth, **{field_name: value})
            changes += [f"{key}={str(value).lower()}" for key in keys]
            if plan_memory(arch, layout, {}, synth, plan.gpu_bytes, plan.margin).all_fit:
                break

    def fit(candidate_shapes, candidate_layout):
        return plan_memory(arch, candidate_layout, candidate_shapes, synth, plan.gpu_bytes, plan.margin).all_fit

    base = next(iter(shapes.values()))
    if fit(shapes, layout):
        return " ".join(changes)
    candidates = list(training_changes(base, layout, arch, gpus, vllm_share))
    for description, candidate, candidate_layout in candidates:
        if fit({k: _apply(s, candidate, base) for k, s in shapes.items()}, candidate_layout):
            return " ".join([*changes, _as_key(description)])
    current, current_layout = dict(shapes), layout
    for description, candidate, candidate_layout in candidates:
        current = {k: _apply(s, candidate, base) for k, s in current.items()}
        current_layout = _apply(current_layout, candidate_layout, layout)
        changes.append(_as_key(description))
        if fit(current, current_layout):
            return _last_values(changes)
    return "no change found: " + _last_values(changes) + " still does not fit"


def _apply(current, candidate, base):
    """``current`` (a shape or layout) with the fields that ``candidate`` changed relative to ``base``; the
    data-parallel size follows the model-parallel ones."""
    changed = {k: v for k, v in vars(candidate).items() if getattr(base, k) != v}
    result = replace(current, **changed)
    if isinstance(result, Layout) and changed:
        result = replace(result, data=base.tensor * base.pipeline * base.data // (result.tensor * result.pipeline))
    return result


_KEYS = {"recompute": "model.recompute", "recompute_vision": "model.recompute_vision",
         "micro_batch_size": "rl.grpo.micro_batch_size", "generation_batch_size": "rollout.megatron.max_batch_size",
         "vllm_memory_fraction": "rollout.vllm.gpu_memory_utilization",
         "vllm_sleep_mode": "rollout.vllm.enable_sleep_mode"}


def _last_values(changes: list[str]) -> str:
    """Space-separated ``key=value`` items, each key once with its last value, in order of first mention."""
    values = {}
    for item in " ".join(changes).split():
        key, _, value = item.partition("=")
        values[key] = value
    return " ".join(f"{key}={value}" for key, value in values.items())


def _as_key(description: str) -> str:
    """The config keys of a candidate's description (``name=value`` items, space-separated)."""
    items = (item.partition("=") for item in description.split())
    return " ".join(f"{_KEYS.get(key, key)}={value}" for key, _, value in items)


def refuse_if_not_fitting(config, gpu_gib: float = DEFAULT_GPU_GIB) -> None:
    """``ConfigError`` (one line) naming the phases that do not fit and the smallest change that does."""
    result = plan_recipe(config, gpu_gib)
    if result.plan.all_fit:
        return
    failing = ", ".join(f"{p.name} {p.total / GIB:.0f} GiB" for p in result.plan.phases if not result.plan.fits(p))
    raise ConfigError(f"memory plan: {failing} do not fit {gpu_gib:g} GiB GPUs (nemo-viper plan --recipe "
                      f"{config.name}); try {result.suggestion}; or launch with --ignore-memory-plan")


def format_plan(result: RecipePlan, name: str) -> str:
    """The table printed by ``nemo-viper plan``: one column per phase, GiB per term, totals and verdicts."""
    plan, layout = result.plan, result.layout
    terms = list(dict.fromkeys(t for p in plan.phases for t in p.terms))
    width = max(len(t) for t in terms + ["total"]) + 2
    header = f"{'':<{width}}" + "".join(f"{p.name:>26}" for p in plan.phases)
    params = result.architecture.total_params
    count = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.2f}M"
    lines = [f"memory plan of recipe {name}: {count} parameters "
             f"({result.source}); TP={layout.tensor} PP={layout.pipeline} DP={layout.data}; "
             f"GPU {plan.gpu_bytes / GIB:.0f} GiB, {plan.margin:.0%} kept free", "", header]
    for term in terms:
        cells = "".join(f"{p.terms[term] / GIB:>26.2f}" if term in p.terms else f"{'-':>26}" for p in plan.phases)
        lines.append(f"{term:<{width}}{cells}")
    lines.append(f"{'total (GiB)':<{width}}" + "".join(f"{p.total / GIB:>26.2f}" for p in plan.phases))
    lines.append(f"{'verdict':<{width}}" + "".join(f"{'fits' if plan.fits(p) else 'DOES NOT FIT':>26}"
                                                  for p in plan.phases))
    lines.append("")
    if plan.all_fit:
        lines.append(f"every phase fits {plan.gpu_bytes / GIB:.0f} GiB")
    else:
        lines.append(f"does not fit {plan.gpu_bytes / GIB:.0f} GiB; smallest change that fits: {result.suggestion}")
        if "parallel.pipeline=" in result.suggestion and not result.suggestion.startswith("no change found"):
            lines.append("pipeline parallelism is what makes it fit: no cheaper change does; each stage holds its "
                         "share of the layers' weights, gradients and optimizer state, and rollouts run on vLLM")
    return "\n".join(lines + [format_task_time(task, result) for task in result.synthesis_times])


def format_task_time(task: TaskTime, result: RecipePlan) -> str:
    """One line: a synthesis task's estimated time against its limit, and the shard count that fits."""
    head = f"{task.stage} on {result.gpu}: ~{task.seconds_per_image:.0f} s per image"
    if task.seconds is None:
        return (f"{head}; the inputs are not readable here: one task of the limit holds "
                f"{task.images_within_limit} images per GPU (synthesis.num_shards >= inputs / "
                f"{task.images_within_limit * task.workers_per_shard}; nemo-viper plan --synthesis-images N)")
    verdict = "fits" if task.fits else f"DOES NOT FIT: synthesis.num_shards={task.shards_needed(result.synthesis_images)}"
    return (f"{head}, {task.images_per_worker} per GPU task: {task.seconds / 3600:.1f} h against "
            f"{task.limit_seconds / 3600:.1f} h ({verdict})")
