"""Settings of the policy, torch-free (the launcher validates a run config with them): how it is built,
whatever its weights and layout (:class:`PolicyOptions`, the run config's ``model`` section, and the values
each option takes), and how it is optimised (:class:`OptimizerSettings`, ``rl.grpo.optimizer``)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from nemo_viper.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp8")
# FP8 scaling recipe -> Megatron-Bridge mixed-precision preset (FP8 GEMMs, bf16 elsewhere).
FP8_RECIPES = {
    "blockwise": "bf16_with_fp8_subchannel_scaling_mixed",  # Hopper (H100/H200)
    "mxfp8": "bf16_with_mxfp8_mixed",  # Blackwell
    "tensorwise": "bf16_with_fp8_current_scaling_mixed",  # Ada/Hopper/Blackwell
    "delayed": "bf16_with_fp8_delayed_scaling_mixed",
}
LAYER_SPECS = ("auto", "transformer_engine", "local")
RECOMPUTE = ("none", "selective", "full")
# Positions per float32 chunk of the entropy metric (:mod:`nemo_viper.models.logprobs`; the memory plan counts it).
ENTROPY_CHUNK_ROWS = 1024


@dataclass(frozen=True)
class PolicyOptions:
    """How the policy is built, whatever its weights and layout: the run config's ``model`` section.

    ``precision``: fp32 | bf16 | fp8 (FP8 GEMMs through Transformer Engine with ``fp8_recipe``);
    ``layer_spec``: auto (TE on a GPU that has it) | transformer_engine | local; ``freeze_*``: parts kept
    frozen (vision tower trainable by default); ``seed``: Megatron's model-parallel RNG seed.
    """

    precision: str = "bf16"
    fp8_recipe: str = "blockwise"
    layer_spec: str = "auto"
    freeze_vision_tower: bool = False
    freeze_projector: bool = False
    freeze_language_model: bool = False
    recompute: str = "none"  # LM activations: none | selective (core attention) | full (each layer's input only)
    recompute_vision: bool = False  # checkpoint every vision-tower block (recomputed in the backward pass)
    seed: int = 1234

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} is not one of {PRECISIONS}")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ConfigError(f"fp8_recipe={self.fp8_recipe!r} is not one of {tuple(FP8_RECIPES)}")
        if self.layer_spec not in LAYER_SPECS:
            raise ConfigError(f"layer_spec={self.layer_spec!r} is not one of {LAYER_SPECS}")
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"recompute={self.recompute!r} is not one of {RECOMPUTE}")

    def options(self) -> dict:
        """The :class:`PolicyOptions` fields of this object (e.g. of a subclass) as keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(PolicyOptions)}


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW with decoupled weight decay and global-norm gradient clipping (the paper's defaults).

    ``distributed_optimizer=None`` (auto) shards optimizer state over data-parallel ranks on GPU and
    keeps it whole on CPU: without apex/Transformer Engine, megatron-core 0.19 falls back to torch's
    Adam, whose per-parameter ``step`` tensor its distributed-optimizer checkpoint loader cannot
    restore (it trains, but cannot resume).
    """

    lr: float = 1e-6
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    distributed_optimizer: bool | None = None

    def __post_init__(self):
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        for name in ("weight_decay", "clip_grad"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0 (0 = off)")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if not self.adam_eps > 0:
            raise ConfigError(f"adam_eps={self.adam_eps} must be > 0")

    @property
    def use_distributed_optimizer(self) -> bool:
        import torch

        return torch.cuda.is_available() if self.distributed_optimizer is None else self.distributed_optimizer
