"""NeMo-style recipes: each a function returning one :class:`~nemo_viper.config.ViperConfig`.

Every recipe has a YAML form, ``conf/recipes/<name>.yaml``, composed from the parts in ``conf/``; the
function composes it and applies ``key=value`` overrides. ``recipe("qwen25vl_7b", "rl.steps=50")``.
"""

from __future__ import annotations

from nemo_viper.config import CONF_DIR, ViperConfig, compose
from nemo_viper.errors import ConfigError


def tiny(*overrides: str) -> ViperConfig:
    """CPU embedded default: tiny offline policy, tiny diffusion pipelines, packaged MiniLM, skimage photos."""
    return compose(CONF_DIR / "recipes" / "tiny.yaml", list(overrides))


def qwen25vl_3b(*overrides: str) -> ViperConfig:
    """Qwen2.5-VL-3B-Instruct, Qwen-Image + Qwen-Image-Edit, BGE-M3, TP1 on 8 H100s, bf16 (FP8 switch)."""
    return compose(CONF_DIR / "recipes" / "qwen25vl_3b.yaml", list(overrides))


def qwen25vl_7b(*overrides: str) -> ViperConfig:
    """Qwen2.5-VL-7B-Instruct, as the 3B recipe with TP2 over 2 nodes of 8 H100s."""
    return compose(CONF_DIR / "recipes" / "qwen25vl_7b.yaml", list(overrides))


RECIPES = {"tiny": tiny, "qwen25vl_3b": qwen25vl_3b, "qwen25vl_7b": qwen25vl_7b}


def recipe(name: str, *overrides: str) -> ViperConfig:
    if name not in RECIPES:
        raise ConfigError(f"recipe={name!r} is not one of {sorted(RECIPES)}")
    return RECIPES[name](*overrides)
