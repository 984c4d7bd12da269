"""Typed configuration of ``nemo-viper synth`` and how it is assembled and hashed.

:func:`load_config` builds a :class:`SynthConfig` from, in order (later wins): the dataclass defaults,
the diffusion preset (``diffusion_preset``: ``qwen`` on a GPU, ``tiny`` on a CPU when ``auto``), a YAML
file, the command line's ``key=value`` overrides (OmegaConf dot-list syntax, e.g.
``redraw.call_kwargs.num_inference_steps=28``) and the explicit fields the CLI parses. Unknown keys and
wrongly typed values are a :class:`~nemo_viper.errors.ConfigError`.

:func:`config_hash` fingerprints everything that changes the samples (not where they are written, nor
which part of the job this process does): a rerun into the same output directory with another hash is
refused, so one dataset never mixes two configurations.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from nemo_viper.errors import ConfigError
from nemo_viper.prompts import SYNTH_PROMPT_VERSION
from nemo_viper.rollout.config import GenerationBackendConfig
from nemo_viper.structured import structured_defaults

# The diffusion pipelines that have a tiny random build (:mod:`nemo_viper.synthesis.tiny_diffusion`, ``model: tiny``).
TEXT_TO_IMAGE = "StableDiffusionPipeline"
EDITOR = "StableDiffusionInstructPix2PixPipeline"
TINY_PIPELINES = (TEXT_TO_IMAGE, EDITOR)

STAGES = (1, 2)
PRESETS = ("auto", "qwen", "tiny")
ENTITY_SOURCES = ("policy", "caption", "both")
RESIDENCY = ("together", "alternate")

# Diffusion presets, applied before the user's YAML and overrides. ``qwen`` is the paper's setting on GPUs;
# ``tiny`` is the embedded default on CPUs: random 64x64 pipelines built offline (see tiny_diffusion.py).
# Random-weight editors paint noise over the whole image, so the tiny preset opens the changed-pixel
# band to 100 %: the band only means something for trained editors.
DIFFUSION_PRESETS: dict[str, dict[str, Any]] = {
    "qwen": {
        "redraw": {
            "pipeline": "QwenImagePipeline",
            "model": "Qwen/Qwen-Image",
            "call_kwargs": {"num_inference_steps": 50, "true_cfg_scale": 4.0, "height": 1024, "width": 1024,
                            "negative_prompt": " "},
            "batch_size": 4,
        },
        "edit": {
            "pipeline": "QwenImageEditPipeline",
            "model": "Qwen/Qwen-Image-Edit",
            "call_kwargs": {"num_inference_steps": 50, "true_cfg_scale": 4.0, "negative_prompt": " "},
            "batch_size": 4,
            "pixels": 1024 * 1024,
        },
    },
    "tiny": {
        "redraw": {
            "pipeline": "StableDiffusionPipeline",
            "model": "tiny",
            "call_kwargs": {"num_inference_steps": 2, "height": 64, "width": 64},
            "batch_size": 8,
        },
        "edit": {
            "pipeline": "StableDiffusionInstructPix2PixPipeline",
            "model": "tiny",
            "call_kwargs": {"num_inference_steps": 2},
            "batch_size": 8,
            "pixels": 64 * 64,
        },
        "filters": {"max_changed_fraction": 1.0},
    },
}


@dataclass
class VLMConfig:
    """The policy that captions, critiques, rewrites and writes edit operations.

    ``policy``: a policy checkpoint (``nemo_viper_checkpoint.json``) or a Hugging Face Qwen2.5-VL dir.
    ``temperature`` 0 decodes greedily (captions greedy); > 0 samples with a seed per sample and
    step. ``max_pixels`` downscales images (aspect kept) before the processor; ``None`` leaves it to the
    processor's own budget. ``*_tokens`` bound each step's answer. ``generation``: the engine
    (:class:`~nemo_viper.rollout.config.GenerationBackendConfig`, as the RL stages' ``rollout``):
    ``generation.backend: megatron`` generates on the policy itself, ``vllm`` on a vLLM engine loaded once
    from the policy's weights (Megatron-Bridge's HF export, streamed; no refit afterwards: synthesis never
    updates the policy), each step's prompts of a chunk in one continuously batched call
    (:mod:`nemo_viper.rollout.vllm_backend`; needs ``vllm``).
    """

    policy: str = ""
    precision: str = "bf16"  # fp32 | bf16 | fp8 (generation itself runs bf16 GEMMs, see rollout.megatron_model)
    fp8_recipe: str = "blockwise"
    layer_spec: str = "auto"  # auto | transformer_engine | local
    tensor_parallel: int = 1
    generation: GenerationBackendConfig = field(default_factory=GenerationBackendConfig)
    max_pixels: int | None = 1280 * 28 * 28
    temperature: float = 0.0
    top_p: float = 1.0
    caption_tokens: int = 512
    critique_tokens: int = 512
    rewrite_tokens: int = 512
    entity_tokens: int = 128
    operation_tokens: int = 256
    verify_tokens: int = 8

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"vlm.temperature={self.temperature} must be >= 0 and vlm.top_p={self.top_p} in (0, 1]")
        if self.max_pixels is not None and self.max_pixels < 28 * 28:
            raise ConfigError(f"vlm.max_pixels={self.max_pixels} must be at least 28*28 (or null)")
        tokens = {k: v for k, v in vars(self).items() if k.endswith("_tokens")}
        if min(tokens.values()) < 1 or self.tensor_parallel < 1:
            raise ConfigError(f"vlm token limits and tensor_parallel must be >= 1: {tokens}")


@dataclass
class DiffusionConfig:
    """One diffusers pipeline: class, weights and call arguments.

    - ``pipeline``: a class name exported by ``diffusers`` (``QwenImagePipeline``, ``FluxPipeline``,
      ``StableDiffusion3Pipeline``, ``FluxKontextPipeline``, ``OmniGenPipeline``, ...) or a dotted path
      ``package.module.Class`` of any class with ``from_pretrained`` (e.g. OmniGen2's own pipeline).
    - ``model``: a local directory or hub id; ``tiny`` builds the tiny random pipeline of that class
      (StableDiffusion / InstructPix2Pix only) under ``<out>/tiny_diffusion/``.
    - ``call_kwargs``: passed to every call (steps, guidance, height/width, ...).
    - ``dtype``: ``auto`` = bf16 on a GPU, fp32 on a CPU; ``device``: ``auto`` = ``cuda`` when available.
    - ``batch_size``: prompts per pipeline call. ``cpu_offload``: diffusers' model CPU offload (GPU only).
    - Editing only: ``pixels`` = area the original is resized to before editing (aspect ratio kept, sides
      multiples of 16; ``None`` keeps its size); ``image_argument`` = the call's image keyword (``image``;
      ``input_images`` for OmniGen); ``nest_images`` passes each image as a one-element list (OmniGen).
    - ``prompt_template``: formats each prompt (``{prompt}``; OmniGen: ``<img><|image_1|></img> {prompt}``).
    """

    pipeline: str = ""
    model: str = ""
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = 4
    cpu_offload: bool = False
    pixels: int | None = None
    image_argument: str = "image"
    nest_images: bool = False
    prompt_template: str = "{prompt}"

    def __post_init__(self):
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"dtype={self.dtype!r} must be one of auto, bf16, fp16, fp32")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")
        if self.pixels is not None and self.pixels < 16 * 16:
            raise ConfigError(f"pixels={self.pixels} must be at least 16*16 (or null)")
        if "{prompt}" not in self.prompt_template:
            raise ConfigError(f"prompt_template={self.prompt_template!r} must contain {{prompt}}")


@dataclass
class FilterConfig:
    """Sample filters.

    Stage 1 keeps samples with ``min_refinements``..``max_refinements`` corrections after parsing. Stage 2
    takes up to ``max_entities`` hard entities and as many operations, and keeps an edit whose fraction of
    changed pixels (a pixel changed when some channel moved by more than ``pixel_threshold`` of 255, after
    resizing the edit to the original's size) lies in [``min_changed_fraction``, ``max_changed_fraction``].
    ``entity_candidates``: where the hard-entity rules take their candidates from: ``policy`` (the
    policy lists the caption's objects), ``caption`` (a determiner rule on the refined caption, no
    policy call) or ``both``. ``verify_operations`` asks the policy, per operation, whether it is visible in
    the edit and drops operations it denies. ``language``: the outputs' language check (``en``; ``null`` = off).
    """

    min_refinements: int = 1
    max_refinements: int = 8
    max_item_chars: int = 240
    language: str | None = "en"
    max_entities: int = 3
    entity_candidates: str = "policy"
    min_changed_fraction: float = 0.002
    max_changed_fraction: float = 0.40
    pixel_threshold: int = 32
    verify_operations: bool = False

    def __post_init__(self):
        if not 1 <= self.min_refinements <= self.max_refinements <= 8:
            raise ConfigError(f"need 1 <= min_refinements <= max_refinements <= 8, got "
                              f"{self.min_refinements}, {self.max_refinements}")
        if self.entity_candidates not in ENTITY_SOURCES:
            raise ConfigError(f"entity_candidates={self.entity_candidates!r} must be one of {ENTITY_SOURCES}")
        if not 1 <= self.max_entities <= 3:
            raise ConfigError(f"max_entities={self.max_entities} must be 1..3 (the visual_op schema's limit)")
        if not 0 <= self.min_changed_fraction < self.max_changed_fraction <= 1:
            raise ConfigError(f"need 0 <= min_changed_fraction < max_changed_fraction <= 1, got "
                              f"{self.min_changed_fraction}, {self.max_changed_fraction}")
        if not 0 <= self.pixel_threshold < 255:
            raise ConfigError(f"pixel_threshold={self.pixel_threshold} must be in 0..254")
        if self.language not in (None, "en"):
            raise ConfigError(f"language={self.language!r} must be 'en' or null (off)")


@dataclass
class SynthConfig:
    """One synthesis stage (or one part of it).

    - ``stage`` 1 reads ``images`` (a directory, a ``.txt``/``.jsonl`` list, webdataset ``.tar`` shards or a
      glob of them, or ``skimage`` = scikit-image's photos); stage 2 reads the stage-1 dataset ``stage1``.
    - The inputs are cut into chunks of ``chunk_size`` items in input order; chunk ``c`` is done by worker
      ``c mod (num_shards x data-parallel ranks)``; this process is shard ``shard_index`` of ``num_shards``.
      A chunk is the unit of atomic writing and resuming (``samples_per_shard`` bounds one tar's size).
    - ``batch_size``: images per step batch (each sub-step makes one batched call per batch).
    - ``seed``: base of every per-sample seed (redraw, edit, sampled VLM answers).
    - ``keep_redraw``: store the stage-1 redraw as the optional debug image ``recon``.
    - ``residency``: ``together`` keeps the policy and the diffusion pipeline on the GPU for the whole job;
      ``alternate`` never holds both: a chunk's captions (and critiques, rewrites, operations) are done by
      the policy on the GPU with the pipeline in host memory, then the two swap for the chunk's drawing.
    """

    stage: int = 1
    out: str = ""
    images: str = "skimage"
    stage1: str = ""
    shard_index: int = 0
    num_shards: int = 1
    chunk_size: int = 64
    samples_per_shard: int = 1000
    batch_size: int = 8
    seed: int = 0
    keep_redraw: bool = False
    residency: str = "together"
    diffusion_preset: str = "auto"
    vlm: VLMConfig = field(default_factory=VLMConfig)
    redraw: DiffusionConfig = field(default_factory=DiffusionConfig)
    edit: DiffusionConfig = field(default_factory=DiffusionConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ConfigError(f"stage={self.stage} must be 1 or 2")
        if not self.out:
            raise ConfigError("out: the output directory is required")
        if self.stage == 2 and not self.stage1:
            raise ConfigError("stage 2 needs stage1: the stage-1 dataset directory")
        if not self.vlm.policy:
            raise ConfigError("vlm.policy: the policy checkpoint (or HF Qwen2.5-VL directory) is required")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"shard_index={self.shard_index} must be in [0, num_shards={self.num_shards})")
        if self.residency not in RESIDENCY:
            raise ConfigError(f"residency={self.residency!r} must be one of {RESIDENCY}")
        for name in ("chunk_size", "samples_per_shard", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        name, step = ("redraw", self.redraw) if self.stage == 1 else ("edit", self.edit)
        if not step.pipeline or not step.model:
            raise ConfigError(f"{name}.pipeline and {name}.model are required")
        if step.model == "tiny" and step.pipeline not in TINY_PIPELINES:
            raise ConfigError(f"{name}.model=tiny exists only for {', '.join(TINY_PIPELINES)}, not {step.pipeline}; "
                              f"give {name}.model (a directory or hub id)")


def resolve_preset(preset: str, cuda_available: bool) -> str:
    if preset not in PRESETS:
        raise ConfigError(f"diffusion_preset={preset!r} must be one of {PRESETS}")
    if preset == "auto":
        return "qwen" if cuda_available else "tiny"
    return preset


def load_config(yaml_path: str | None = None, overrides: list[str] = (), **fields) -> SynthConfig:
    """Assemble a :class:`SynthConfig` (see the module docstring); ``fields`` are top-level or dotted keys
    set by the CLI (``None`` values are ignored). ``diffusion_preset`` may come from any layer; only ``auto``
    asks this machine whether it has CUDA (importing torch), so a launcher checks a named preset without it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        layers = [OmegaConf.load(yaml_path)] if yaml_path else []
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        layers.append(OmegaConf.create(_nested({k: v for k, v in fields.items() if v is not None})))
        user = OmegaConf.merge(*layers)
        requested = user.get("diffusion_preset", "auto")
        preset = resolve_preset(requested, requested == "auto" and _cuda_available())
        merged = OmegaConf.merge(structured_defaults(SynthConfig), DIFFUSION_PRESETS[preset], user,
                                 {"diffusion_preset": preset})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"synthesis config: {f'{key}: ' if key else ''}{str(e).splitlines()[0]}") from e
    except FileNotFoundError as e:
        raise ConfigError(f"synthesis config file not found: {yaml_path}") from e


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"vlm.policy": p}`` -> ``{"vlm": {"policy": p}}``."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested


def config_hash(config: SynthConfig, input_fingerprint: str) -> str:
    """16 hex digits over the sample-relevant config and the inputs' fingerprint (see the module docstring).

    Left out: the output path, the work split (shard index/count), the input's path (its fingerprint counts)
    batch sizes (seeds are per sample) and the VLM's generation engine and its settings, so a resumed job
    may change them.
    """
    relevant = asdict(config)
    for placement in ("out", "shard_index", "num_shards", "images", "stage1", "batch_size", "residency",
                      "edit" if config.stage == 1 else "redraw"):
        relevant.pop(placement)
    relevant["vlm"].pop("generation")  # the same model's samples; a resumed job may switch engines or batch sizes
    relevant["redraw" if config.stage == 1 else "edit"].pop("batch_size")
    relevant["vlm"]["policy"] = resolved_policy(config)
    relevant["inputs"] = input_fingerprint
    relevant["prompt_version"] = SYNTH_PROMPT_VERSION
    blob = json.dumps(relevant, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def resolved_policy(config: SynthConfig) -> str:
    """The policy as recorded in records (``synth_ckpt``), the manifest and the config hash: the checkpoint
    an RL run directory points to (``checkpoints/latest``), as an absolute path when it exists."""
    from nemo_viper.models.checkpoint_dir import resolve_checkpoint

    path = resolve_checkpoint(config.vlm.policy)
    return str(path.resolve()) if path.exists() else config.vlm.policy
