"""How the policy is built, whatever its weights and layout (the run config's ``model`` section), and the
values each option takes. Torch-free: the launcher validates a run config with it."""

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
