"""Random-weight Qwen2.5-VL checkpoints with the published 3B / 7B architectures, offline.

:func:`write_random_checkpoint` writes a directory in the on-disk format of the published
``Qwen/Qwen2.5-VL-{3B,7B}-Instruct`` checkpoints: their flat ``config.json`` (the values below, copied
from the published files; ``rope_scaling`` with ``mrope_section``, ``tie_word_embeddings``, bf16), bf16
safetensors shards with the published tensor names and an index, a Qwen2-VL image processor with the
published pixel budget, and ``generation_config.json``. Everything is full width (hidden sizes, heads,
GQA groups, the 151936 / 152064 vocabularies, the 32-block vision tower with windowed attention); only
the number of language-model layers (``num_layers``) and of vision blocks (``vision_depth``) can be cut to
fit a test or a quick GPU check.

The tokenizer is the tiny checkpoint's (:func:`nemo_viper.models.tiny.build_tokenizer`): its special
tokens get small ids, written into the config in place of the published ones. That changes no shape.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch

_VISION = {
    "depth": 32,
    "hidden_act": "silu",
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_chans": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "spatial_patch_size": 14,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "temporal_patch_size": 2,
}
_COMMON = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "use_cache": True,
    "use_sliding_window": False,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "torch_dtype": "bfloat16",
}
PUBLISHED_CONFIGS = {
    "3b": {
        **_COMMON,
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_attention_heads": 16,
        "num_hidden_layers": 36,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
        "vocab_size": 151936,
        "vision_config": {**_VISION, "out_hidden_size": 2048},
    },
    "7b": {
        **_COMMON,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
        "vocab_size": 152064,
        "vision_config": {**_VISION, "out_hidden_size": 3584},
    },
}
PUBLISHED_PIXELS = {"min_pixels": 3136, "max_pixels": 12845056}


def published_config(size: str, num_layers: int | None = None, token_ids: dict | None = None,
                     vision_depth: int | None = None) -> dict:
    """The published ``config.json`` of ``size`` (``3b`` / ``7b``), optionally with fewer LM layers, fewer
    vision blocks and other special-token ids (keys: ``bos``, ``eos``, ``pad``, ``image``, ``video``,
    ``vision_start``, ``vision_end``).

    A cut vision tower keeps the published attention pattern (full attention in the last block of every
    group of 8, windowed attention elsewhere) and ends in a full-attention block: ``vision_depth=2`` is one
    windowed block then one full-attention block; 32 gives the published ``[7, 15, 23, 31]``."""
    if size not in PUBLISHED_CONFIGS:
        raise ValueError(f"size={size!r} is not one of {tuple(PUBLISHED_CONFIGS)}")
    config = copy.deepcopy(PUBLISHED_CONFIGS[size])
    if num_layers is not None:
        config["num_hidden_layers"] = num_layers
    if vision_depth is not None:
        if vision_depth < 2:
            raise ValueError(f"vision_depth={vision_depth}: needs a windowed and a full-attention block (>= 2)")
        config["vision_config"]["depth"] = vision_depth
        config["vision_config"]["fullatt_block_indexes"] = [
            i for i in range(vision_depth) if i % 8 == 7 or i == vision_depth - 1]
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("image", "image_token_id"),
                      ("video", "video_token_id"), ("vision_start", "vision_start_token_id"),
                      ("vision_end", "vision_end_token_id"), ("pad", "pad_token_id")):
        if token_ids and key in token_ids:
            config[name] = token_ids[key]
    return config


def write_random_checkpoint(out_dir: str | Path, size: str, num_layers: int | None = None, seed: int = 0,
                            max_shard_bytes: int = 2**30, vision_depth: int | None = None,
                            with_weights: bool = True) -> Path:
    """Write a random-weight checkpoint of the published ``size`` architecture (see the module doc) to
    ``out_dir`` atomically. Weights: normal with std 0.02 from ``seed`` (transformers' initializer range),
    norm weights 1 + N(0, 0.1) so that a wrongly mapped norm shows. Peak memory: the bf16 model.

    ``with_weights=False`` writes everything but the weights (config, processor, generation config): the
    architecture for a policy that Megatron initialises at random on its own device
    (:func:`~nemo_viper.models.training.build_policy_worker` with ``hf_weights=False``), in a second instead of
    the minutes a full-size checkpoint takes to draw on the CPU and load."""
    from transformers import (AutoConfig, GenerationConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLImageProcessorPil)

    from transformers.initialization import no_init_weights

    from nemo_viper.models.processor import ImageOnlyQwen25VLProcessor, save_processor
    from nemo_viper.models.tiny import CHAT_TEMPLATE, build_tokenizer

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    tokenizer = build_tokenizer(1024)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("bos", "<|endoftext|>"), ("pad", "<|endoftext|>"), ("eos", "<|im_end|>"), ("image", "<|image_pad|>"),
        ("video", "<|video_pad|>"), ("vision_start", "<|vision_start|>"), ("vision_end", "<|vision_end|>"))}
    config = published_config(size, num_layers, ids, vision_depth)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if with_weights:
            hf_config = AutoConfig.from_pretrained(tmp)
            with no_init_weights():
                model = Qwen2_5_VLForConditionalGeneration._from_config(hf_config, dtype=torch.bfloat16).eval()
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    is_norm = "norm" in name or "ln_q" in name
                    parameter.normal_(1.0 if is_norm else 0.0, 0.1 if is_norm else 0.02, generator=generator)
            state = model.state_dict()
            if config["tie_word_embeddings"]:  # as published: one matrix, no lm_head.weight (else transformers unties)
                del state["lm_head.weight"]
            model.save_pretrained(tmp, state_dict=state, max_shard_size=max_shard_bytes)
            del model
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")  # the published flat form
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=14, merge_size=2, temporal_patch_size=2,
            size={"shortest_edge": PUBLISHED_PIXELS["min_pixels"], "longest_edge": PUBLISHED_PIXELS["max_pixels"]},
        )
        save_processor(ImageOnlyQwen25VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                                  chat_template=CHAT_TEMPLATE), tmp)
        GenerationConfig(bos_token_id=ids["bos"], eos_token_id=[ids["eos"]], pad_token_id=ids["pad"],
                         do_sample=False).save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
