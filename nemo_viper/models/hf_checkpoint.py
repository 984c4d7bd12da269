"""Checks on a Hugging Face Qwen2.5-VL checkpoint directory, done before anything expensive is built."""

from __future__ import annotations

import json
from pathlib import Path

from nemo_viper.errors import CheckpointError, ConfigError

QWEN25_VL_ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
QWEN25_VL_MODEL_TYPE = "qwen2_5_vl"


def read_qwen25_vl_config(path: str | Path) -> dict:
    """Return the ``config.json`` of a Qwen2.5-VL HF checkpoint dir as a dict, or raise a one-line error."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Hugging Face checkpoint directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from exc
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    if QWEN25_VL_ARCHITECTURE not in architectures or model_type != QWEN25_VL_MODEL_TYPE:
        raise CheckpointError(
            f"{path}: architecture {architectures or None} (model_type={model_type!r}) is not Qwen2.5-VL; "
            f"expected architectures=[{QWEN25_VL_ARCHITECTURE!r}], model_type={QWEN25_VL_MODEL_TYPE!r}"
        )
    return config


def text_config(config: dict) -> dict:
    """The language-model part of a Qwen2.5-VL config (transformers 5 nests it under ``text_config``)."""
    return config.get("text_config") or config


def mrope_section(config: dict) -> list[int]:
    """The multimodal-RoPE split of the rotary half-dimension, from either rope field spelling."""
    text = text_config(config)
    for key in ("rope_parameters", "rope_scaling"):
        rope = text.get(key) or config.get(key) or {}
        if "mrope_section" in rope:
            return list(rope["mrope_section"])
    raise CheckpointError("config.json has no mrope_section in rope_parameters/rope_scaling")


def check_parallel_layout(config: dict, tensor_parallel: int, pipeline_parallel: int) -> None:
    """Raise ``ConfigError`` if the model cannot be split this way (named key and value)."""
    text = text_config(config)
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads", heads)
    layers = text["num_hidden_layers"]
    if tensor_parallel < 1 or pipeline_parallel < 1:
        raise ConfigError(f"tensor_parallel={tensor_parallel} and pipeline_parallel={pipeline_parallel} must be >= 1")
    if heads % tensor_parallel:
        raise ConfigError(f"tensor_parallel={tensor_parallel} does not divide num_attention_heads={heads}")
    if kv_heads % tensor_parallel:
        raise ConfigError(f"tensor_parallel={tensor_parallel} does not divide num_key_value_heads={kv_heads}")
    if layers % pipeline_parallel:
        raise ConfigError(f"pipeline_parallel={pipeline_parallel} does not divide num_hidden_layers={layers}")
