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
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from nemo_viper.errors import ConfigError
from nemo_viper.models.hf_checkpoint import check_parallel_layout, mrope_section, read_qwen25_vl_config
from nemo_viper.runtime.distributed import ParallelLayout, init_model_parallel

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp8")
# FP8 scaling recipe -> Megatron-Bridge mixed-precision preset (FP8 GEMMs, bf16 elsewhere).
FP8_RECIPES = {
    "blockwise": "bf16_with_fp8_subchannel_scaling_mixed",  # Hopper (H100/H200)
    "mxfp8": "bf16_with_mxfp8_mixed",  # Blackwell
    "tensorwise": "bf16_with_fp8_current_scaling_mixed",  # Ada/Hopper/Blackwell
    "delayed": "bf16_with_fp8_delayed_scaling_mixed",
}
LAYER_SPECS = ("auto", "transformer_engine", "local")
_CPU_UNFUSED = (
    "gradient_accumulation_fusion",
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "masked_softmax_fusion",
    "persist_layer_norm",
    "apply_rope_fusion",
    "cross_entropy_loss_fusion",
)


@dataclass(frozen=True)
class PolicyOptions:
    """How the policy is built, whatever its weights and layout: the run config's ``model`` section.

    ``precision``: fp32 | bf16 | fp8 (FP8 GEMMs through Transformer Engine with ``fp8_recipe``);
    ``layer_spec``: auto (TE on a GPU that has it) | transformer_engine | local; ``freeze_*``: parts kept
    frozen (SPEC §7: vision tower trainable by default); ``seed``: Megatron's model-parallel RNG seed.
    """

    precision: str = "bf16"
    fp8_recipe: str = "blockwise"
    layer_spec: str = "auto"
    freeze_vision_tower: bool = False
    freeze_projector: bool = False
    freeze_language_model: bool = False
    seed: int = 1234

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} is not one of {PRECISIONS}")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ConfigError(f"fp8_recipe={self.fp8_recipe!r} is not one of {tuple(FP8_RECIPES)}")
        if self.layer_spec not in LAYER_SPECS:
            raise ConfigError(f"layer_spec={self.layer_spec!r} is not one of {LAYER_SPECS}")

    def options(self) -> dict:
        """The :class:`PolicyOptions` fields of this object (e.g. of a subclass) as keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(PolicyOptions)}


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
    def layout(self) -> ParallelLayout:
        return ParallelLayout(self.tensor_parallel, self.pipeline_parallel)


def transformer_engine_available() -> bool:
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def resolve_layer_spec(requested: str, cuda_available: bool, te_available: bool) -> str:
    """``auto`` picks Transformer Engine on a GPU that has it, the local (pure PyTorch) spec otherwise."""
    if requested == "auto":
        return "transformer_engine" if cuda_available and te_available else "local"
    if requested == "transformer_engine" and not (cuda_available and te_available):
        raise ConfigError("layer_spec='transformer_engine' needs a CUDA GPU with Transformer Engine installed")
    return requested


@dataclass
class MegatronPolicy:
    """This rank's model chunks plus the bridge/provider that built them (needed for HF export)."""

    config: PolicyConfig
    bridge: object  # megatron.bridge.AutoBridge
    provider: object  # Qwen25VLModelProvider
    chunks: list  # [Qwen25VLModel] (one per virtual pipeline stage)
    hf_config: dict


def _configure_provider(provider, config: PolicyConfig, hf_config: dict, layer_spec: str) -> None:
    from megatron.bridge.models.gpt_provider import local_layer_spec

    provider.tensor_model_parallel_size = config.tensor_parallel
    provider.pipeline_model_parallel_size = config.pipeline_parallel
    provider.mrope_section = mrope_section(hf_config)
    provider.freeze_vision_model = config.freeze_vision_tower
    provider.freeze_vision_projection = config.freeze_projector
    provider.freeze_language_model = config.freeze_language_model
    if layer_spec == "local":
        provider.transformer_layer_spec = local_layer_spec
    if not torch.cuda.is_available():
        for flag in _CPU_UNFUSED:
            setattr(provider, flag, False)

    if config.precision == "fp32":
        provider.bf16 = provider.fp16 = False
        provider.params_dtype = torch.float32
        provider.pipeline_dtype = torch.float32
    else:
        if config.precision == "fp8" and layer_spec != "transformer_engine":
            raise ConfigError("precision='fp8' needs the Transformer Engine layer spec (a CUDA GPU with TE)")
        from megatron.bridge.training.mixed_precision import get_mixed_precision_config

        preset = FP8_RECIPES[config.fp8_recipe] if config.precision == "fp8" else "bf16_mixed"
        mixed = get_mixed_precision_config(preset)
        mixed.finalize()
        mixed.setup(provider)
        provider.pipeline_dtype = torch.bfloat16


def build_policy(config: PolicyConfig, load_weights: bool = True, wrap_with_ddp: bool = False, ddp_config=None):
    """Build this rank's part of the policy from ``config.hf_path``.

    ``load_weights=False`` builds the architecture only (random init), e.g. before loading a Megatron
    checkpoint. ``wrap_with_ddp=True`` prepares the model for training: Megatron DDP with
    ``calculate_per_token_loss`` (gradients summed over DP ranks and divided by the global token count
    returned by the loss function, see :mod:`nemo_viper.training.grpo`). Validation (checkpoint dir, architecture, TP/PP divisibility) happens before any model
    or process group is created.
    """
    hf_config = read_qwen25_vl_config(config.hf_path)
    check_parallel_layout(hf_config, config.tensor_parallel, config.pipeline_parallel)
    layer_spec = resolve_layer_spec(config.layer_spec, torch.cuda.is_available(), transformer_engine_available())
    if config.precision == "fp8" and not torch.cuda.is_available():
        raise ConfigError("precision='fp8' needs a CUDA GPU with Transformer Engine; use fp32 or bf16 on CPU")
    init_model_parallel(config.layout, config.seed)

    from megatron.bridge import AutoBridge
    from transformers import AutoConfig

    path = str(Path(config.hf_path))
    if load_weights:
        bridge = AutoBridge.from_hf_pretrained(path, dtype=torch.float32)
    else:
        bridge = AutoBridge.from_hf_config(AutoConfig.from_pretrained(path))
    provider = bridge.to_megatron_provider(load_weights=load_weights)
    _configure_provider(provider, config, hf_config, layer_spec)
    provider.calculate_per_token_loss = wrap_with_ddp
    provider.finalize()
    chunks = provider.provide_distributed_model(
        wrap_with_ddp=wrap_with_ddp,
        ddp_config=ddp_config,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    log.info(
        "policy built: TP=%d PP=%d precision=%s layer_spec=%s",
        config.tensor_parallel,
        config.pipeline_parallel,
        config.precision,
        layer_spec,
    )
    return MegatronPolicy(config=config, bridge=bridge, provider=provider, chunks=chunks, hf_config=hf_config)
