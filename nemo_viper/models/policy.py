"""The Qwen2.5-VL policy as a Megatron model, built from a Hugging Face checkpoint through Megatron-Bridge.

``AutoBridge`` maps the HF config to a ``Qwen25VLModelProvider`` (a megatron-core ``TransformerConfig``
plus a model factory): the language model is a megatron-core ``GPTModel`` with multimodal RoPE, the
vision tower is HF's Qwen2.5-VL vision transformer, replicated across tensor-parallel ranks.
:func:`build_policy` applies the project's :class:`PolicyConfig` (parallel sizes, precision, layer
spec, freezing) to that provider and instantiates the model chunks of this rank.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from nemo_viper.errors import ConfigError
from nemo_viper.models.hf_checkpoint import check_parallel_layout, mrope_section, read_qwen25_vl_config
from nemo_viper.models.config import FP8_RECIPES, LAYER_SPECS, PRECISIONS, PolicyOptions
from nemo_viper.models.vision_attention import use_packed_window_attention
from nemo_viper.runtime.distributed import ParallelLayout, init_model_parallel

log = logging.getLogger(__name__)

_CPU_UNFUSED = (
    "gradient_accumulation_fusion",
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "masked_softmax_fusion",
    "persist_layer_norm",
    "apply_rope_fusion",
    "cross_entropy_loss_fusion",
)


@dataclass(frozen=True, kw_only=True)
class PolicyConfig(PolicyOptions):
    """How to build the policy. ``hf_path`` is a local HF Qwen2.5-VL checkpoint directory."""

    hf_path: str
    tensor_parallel: int = 1
    pipeline_parallel: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.tensor_parallel < 1 or self.pipeline_parallel < 1:
            raise ConfigError(f"tensor_parallel={self.tensor_parallel} and pipeline_parallel="
                              f"{self.pipeline_parallel} must be >= 1")

    @property
    def token_alignment(self) -> int:
        """Multiple the token count of every forward pass is padded to (1 unless FP8)."""
        return FP8_TOKEN_ALIGNMENT[self.fp8_recipe] if self.precision == "fp8" else 1

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(self.tensor_parallel, self.pipeline_parallel)


# Token-count multiple the FP8 GEMMs of each recipe need (Transformer Engine): rows of the [tokens, hidden]
# activations; micro-batches are padded to it (nemo_viper.models.logprobs.pad_to_multiple).
FP8_TOKEN_ALIGNMENT = {"blockwise": 128, "mxfp8": 32, "tensorwise": 16, "delayed": 16}
# Compute capabilities each FP8 recipe runs on (Transformer Engine 2.x).
_FP8_ARCHITECTURES = {
    "blockwise": ((9, 0), (9, 9), "Hopper (sm90)"),
    "mxfp8": ((10, 0), (99, 9), "Blackwell (sm100+)"),
    "tensorwise": ((8, 9), (99, 9), "Ada, Hopper or Blackwell (sm89+)"),
    "delayed": ((8, 9), (99, 9), "Ada, Hopper or Blackwell (sm89+)"),
}


def transformer_engine_available() -> bool:
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


@dataclass(frozen=True)
class Accelerator:
    """What this process can run the policy on: a CUDA device, Transformer Engine, the GPU's compute capability."""

    cuda: bool
    transformer_engine: bool
    compute_capability: tuple[int, int] | None = None
    name: str = "CPU"

    @classmethod
    def detect(cls) -> Accelerator:
        if not torch.cuda.is_available():
            return cls(cuda=False, transformer_engine=transformer_engine_available())
        return cls(
            cuda=True,
            transformer_engine=transformer_engine_available(),
            compute_capability=tuple(torch.cuda.get_device_capability()),
            name=torch.cuda.get_device_name(),
        )


def resolve_layer_spec(requested: str, accelerator: Accelerator) -> str:
    """``auto`` picks Transformer Engine on a GPU that has it, the local (pure PyTorch) spec otherwise."""
    has_te = accelerator.cuda and accelerator.transformer_engine
    if requested == "auto":
        return "transformer_engine" if has_te else "local"
    if requested == "transformer_engine" and not has_te:
        raise ConfigError("layer_spec='transformer_engine' needs a CUDA GPU with Transformer Engine installed")
    return requested


def check_precision(precision: str, fp8_recipe: str, layer_spec: str, accelerator: Accelerator) -> str:
    """Validate precision x FP8 recipe x GPU architecture x layer spec before any work; returns the resolved
    layer spec. Each failure is a one-line :class:`ConfigError` naming the keys and what to change."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not one of {PRECISIONS}")
    if fp8_recipe not in FP8_RECIPES:
        raise ConfigError(f"fp8_recipe={fp8_recipe!r} is not one of {tuple(FP8_RECIPES)}")
    if layer_spec not in LAYER_SPECS:
        raise ConfigError(f"layer_spec={layer_spec!r} is not one of {LAYER_SPECS}")
    resolved = resolve_layer_spec(layer_spec, accelerator)
    capability = accelerator.compute_capability
    if precision == "bf16" and accelerator.cuda and capability is not None and capability < (8, 0):
        raise ConfigError(f"precision='bf16' needs an Ampere or newer GPU (sm80+); {accelerator.name} is "
                          f"sm{capability[0]}{capability[1]}: use precision='fp32'")
    if precision != "fp8":
        return resolved
    if not accelerator.cuda:
        raise ConfigError("precision='fp8' needs a CUDA GPU with Transformer Engine; use fp32 or bf16 on CPU")
    if resolved != "transformer_engine":
        raise ConfigError(f"precision='fp8' needs layer_spec='transformer_engine' (or 'auto' with Transformer "
                          f"Engine installed), got layer_spec={layer_spec!r} -> {resolved!r}")
    low, high, needs = _FP8_ARCHITECTURES[fp8_recipe]
    if capability is None or not low <= capability <= high:
        arch = "an unknown GPU" if capability is None else f"sm{capability[0]}{capability[1]} ({accelerator.name})"
        fits = [r for r, (lo, hi, _) in _FP8_ARCHITECTURES.items() if capability and lo <= capability <= hi]
        raise ConfigError(f"fp8_recipe={fp8_recipe!r} needs {needs}, this is {arch}: use fp8_recipe in {fits} "
                          "or precision='bf16'")
    return resolved


def mixed_precision_preset(config: PolicyConfig):
    """Megatron-Bridge's finalized mixed-precision preset for ``config`` (``None`` for fp32)."""
    if config.precision == "fp32":
        return None
    from megatron.bridge.training.mixed_precision import get_mixed_precision_config

    preset = get_mixed_precision_config(FP8_RECIPES[config.fp8_recipe] if config.precision == "fp8" else "bf16_mixed")
    preset.finalize()
    return preset


def apply_precision(config: PolicyConfig, model_config=None, ddp_config=None, optimizer_config=None) -> None:
    """Apply ``config.precision`` to the model provider, the DDP config and the optimizer config, as
    Megatron-Bridge's own training setup does (e.g. ``fp8_param_gather`` for mxfp8/tensorwise/delayed,
    ``grad_reduce_in_fp32``, bf16 ``params_dtype``); fp32 keeps every parameter and gradient in float32."""
    preset = mixed_precision_preset(config)
    if preset is None:
        for target in (model_config, optimizer_config):
            if target is not None:
                target.bf16 = target.fp16 = False
                target.params_dtype = torch.float32
        if model_config is not None:
            model_config.pipeline_dtype = torch.float32
        return
    preset.setup(model_config, optimizer_config=optimizer_config, ddp_config=ddp_config)
    if model_config is not None:
        model_config.pipeline_dtype = preset.pipeline_dtype or torch.bfloat16


@dataclass
class MegatronPolicy:
    """This rank's model chunks plus the bridge/provider that built them (needed for HF export)."""

    config: PolicyConfig
    bridge: object  # megatron.bridge.AutoBridge
    provider: object  # Qwen25VLModelProvider
    chunks: list  # [Qwen25VLModel] (one per virtual pipeline stage)
    hf_config: dict
    layer_spec: str  # the resolved spec: transformer_engine | local


def configure_provider(provider, config: PolicyConfig, hf_config: dict, layer_spec: str, cuda: bool) -> None:
    """Apply ``config`` (layout, freezing, resolved ``layer_spec``, precision) to Bridge's provider, as for a
    machine with (``cuda=True``) or without a GPU.

    Attention masks: the project never hands the model an explicit attention mask. Training batches are
    right-padded (padding only ever follows a row's real tokens, which causal attention never lets
    them see) and generation has no padding at all (:mod:`nemo_viper.rollout.megatron_model`), so every
    attention kernel (TE flash/fused attention, megatron's fused causal softmax) computes the exact
    result. On the local spec the fused masked softmax is still switched off, so that a mask, should one
    ever be passed, cannot be ignored by its causal kernel (which never reads the mask).
    """
    from megatron.bridge.models.gpt_provider import local_layer_spec, transformer_engine_layer_spec

    provider.tensor_model_parallel_size = config.tensor_parallel
    provider.pipeline_model_parallel_size = config.pipeline_parallel
    provider.mrope_section = mrope_section(hf_config)
    provider.freeze_vision_model = config.freeze_vision_tower
    provider.freeze_vision_projection = config.freeze_projector
    provider.freeze_language_model = config.freeze_language_model
    provider.transformer_layer_spec = local_layer_spec if layer_spec == "local" else transformer_engine_layer_spec
    if layer_spec == "local":
        provider.masked_softmax_fusion = False
    if config.recompute != "none":  # megatron-core: selective = the core attention ("core_attn") only
        provider.recompute_granularity = config.recompute
        if config.recompute == "full":
            provider.recompute_method, provider.recompute_num_layers = "uniform", 1
    if not cuda:
        for flag in _CPU_UNFUSED:
            setattr(provider, flag, False)
    apply_precision(config, model_config=provider)


def fill_parameters_with_nan(chunks: list) -> list:
    """Pre-load hook: every floating-point parameter set to NaN, so that one the HF load does not write is seen."""
    with torch.no_grad():
        for chunk in chunks:
            for parameter in chunk.parameters():
                if parameter.is_floating_point():
                    parameter.fill_(float("nan"))
    return chunks


def require_every_parameter_loaded(hf_path: str, chunks: list) -> list:
    """Post-load hook: a one-line :class:`ConfigError` naming the first parameter still holding NaN (Megatron-Bridge
    wrote nothing into it, or the checkpoint's tensor has NaN), and how many there are."""
    left = [name for chunk in chunks for name, parameter in chunk.named_parameters()
            if parameter.is_floating_point() and torch.isnan(parameter).any()]
    if left:
        raise ConfigError(f"{hf_path}: the HF weights did not set {left[0]!r} ({len(left)} parameters not loaded "
                          "or NaN): the checkpoint lacks them (another architecture) or holds NaN")
    return chunks


def configure_vision_tower(chunks: list, recompute: bool) -> None:
    """The vision tower of the first pipeline stage attends within its windows in one call per block
    (:mod:`nemo_viper.models.vision_attention`) and, with ``recompute``, checkpoints every block."""
    from megatron.core.utils import unwrap_model

    for chunk in chunks:
        visual = getattr(unwrap_model(chunk), "visual", None)  # first pipeline stage only
        if visual is None:
            continue
        use_packed_window_attention(visual)
        if recompute:
            visual.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_policy(config: PolicyConfig, load_weights: bool = True, wrap_with_ddp: bool = False, ddp_config=None,
                 initialize: bool = True):
    """Build this rank's part of the policy from ``config.hf_path``.

    With ``load_weights`` the HF weights are loaded into uninitialised parameters, as Megatron-Bridge intends
    (random initialisation would be overwritten, and on CPU its temporaries raise the host peak: 3B at TP1,
    7.2 -> 6.0 GB). That load is not strict, so every parameter is NaN before it and none may be NaN after it
    (:func:`require_every_parameter_loaded`). ``load_weights=False`` builds the architecture only (random
    init), e.g. before loading a Megatron checkpoint; with ``initialize=False`` too, the parameters are allocated but not initialised (megatron's
    ``perform_initialization``), for a caller that loads every weight next with a strict load
    (:func:`~nemo_viper.models.checkpoint.load_policy`): initialisation would be wasted time, and on CPU
    its float32 temporaries set the host peak (2-layer full-width 7B in bf16: 10.4 -> 3.4 GiB at build). ``wrap_with_ddp=True`` prepares the model for training: Megatron DDP with
    ``calculate_per_token_loss`` (gradients summed over DP ranks and divided by the global token count
    returned by the loss function, see :mod:`nemo_viper.models.training`). Validation (checkpoint dir, architecture, TP/PP divisibility) happens before any model
    or process group is created.
    """
    hf_config = read_qwen25_vl_config(config.hf_path)
    check_parallel_layout(hf_config, config.tensor_parallel, config.pipeline_parallel)
    accelerator = Accelerator.detect()
    layer_spec = check_precision(config.precision, config.fp8_recipe, config.layer_spec, accelerator)
    init_model_parallel(config.layout, config.seed)

    from megatron.bridge import AutoBridge
    from transformers import AutoConfig

    path = str(Path(config.hf_path))
    if load_weights:
        bridge = AutoBridge.from_hf_pretrained(path, dtype=torch.float32)
    else:
        bridge = AutoBridge.from_hf_config(AutoConfig.from_pretrained(path))
    provider = bridge.to_megatron_provider(load_weights=load_weights)
    configure_provider(provider, config, hf_config, layer_spec, accelerator.cuda)
    if ddp_config is not None:
        apply_precision(config, ddp_config=ddp_config)
    provider.calculate_per_token_loss = wrap_with_ddp
    provider.perform_initialization = initialize and not load_weights
    if load_weights:  # around Megatron-Bridge's HF-load hook: the load must write every parameter
        provider.register_pre_wrap_hook(fill_parameters_with_nan, prepend=True)
        provider.register_pre_wrap_hook(partial(require_every_parameter_loaded, path))
    provider.finalize()
    chunks = provider.provide_distributed_model(
        wrap_with_ddp=wrap_with_ddp,
        ddp_config=ddp_config,
        use_cpu_initialization=not accelerator.cuda,
    )
    configure_vision_tower(chunks, config.recompute_vision)
    log.info(
        "policy built: TP=%d PP=%d precision=%s layer_spec=%s",
        config.tensor_parallel,
        config.pipeline_parallel,
        config.precision,
        layer_spec,
    )
    return MegatronPolicy(config=config, bridge=bridge, provider=provider, chunks=chunks, hf_config=hf_config,
                          layer_spec=layer_spec)
