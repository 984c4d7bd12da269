"""The offline tiny checkpoint is a complete Qwen2.5-VL HF checkpoint that transformers loads."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                          Qwen2VLImageProcessorPil)

from nemo_viper.cli import main
from nemo_viper.models.processor import load_processor
from nemo_viper.models.tiny import write_tiny_checkpoint
from nemo_viper.models.tokens import QWEN_SPECIAL_TOKENS


def test_transformers_loads_every_component(tiny_hf_dir):
    config = json.loads((tiny_hf_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_hf_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    assert isinstance(Qwen2VLImageProcessorPil.from_pretrained(tiny_hf_dir), Qwen2VLImageProcessorPil)
    for token in QWEN_SPECIAL_TOKENS:
        (token_id,) = tokenizer.encode(token, add_special_tokens=False)
        assert token_id < model.config.text_config.vocab_size
    assert tokenizer.decode(tokenizer.encode("The red car is on the left.")) == "The red car is on the left."

    processor = load_processor(tiny_hf_dir)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n"
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 60, 3), dtype=np.uint8))
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    grid = inputs["image_grid_thw"][0]
    assert grid[1] % 2 == 0 and grid[2] % 2 == 0
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == int(grid.prod()) // 4
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()


def test_auto_processor_builds_the_full_qwen_processor(tiny_hf_dir):
    """lmms-eval's qwen2_5_vl model and vLLM load ``AutoProcessor``: it must expand images as ours does, not
    fall back to the bare tokenizer (which leaves one image placeholder and no pixels)."""
    processor = AutoProcessor.from_pretrained(tiny_hf_dir)
    assert type(processor) is Qwen2_5_VLProcessor
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 60, 3), dtype=np.uint8))
    ours = load_processor(tiny_hf_dir)
    expected = ours(text=[ours.apply_chat_template(chat, add_generation_prompt=True)], images=[image])
    got = processor(text=[processor.apply_chat_template(chat, add_generation_prompt=True)], images=[image])
    assert list(got["input_ids"][0]) == list(expected["input_ids"][0])
    assert got["pixel_values"].shape == expected["pixel_values"].shape


def test_export_carries_every_processor_file(tiny_hf_dir):
    """An exported checkpoint is evaluated through ``AutoProcessor`` too: import/export must copy every
    non-weight file it reads (the video processor's config included)."""
    from fnmatch import fnmatch

    from nemo_viper.models.checkpoint import HF_ASSET_PATTERNS
    from nemo_viper.models.tiny import RECIPE_FILE

    assets = [f.name for f in tiny_hf_dir.iterdir() if not f.name.startswith("model") and f.name != RECIPE_FILE]
    assert "video_preprocessor_config.json" in assets
    assert [name for name in assets if not any(fnmatch(name, p) for p in HF_ASSET_PATTERNS)] == []


def test_same_seed_same_weights(tmp_path):
    from safetensors.torch import load_file

    first = load_file(write_tiny_checkpoint(tmp_path / "a") / "model.safetensors")
    second = load_file(write_tiny_checkpoint(tmp_path / "b") / "model.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_cli_writes_checkpoint_skips_it_when_done_and_refuses_another(tmp_path, capsys):
    assert main(["tiny-model", "--out", str(tmp_path / "tiny")]) == 0
    assert (tmp_path / "tiny" / "model.safetensors").is_file()
    assert not (tmp_path / ".tiny.partial").exists(), "temporary directory left behind"
    written = (tmp_path / "tiny" / "model.safetensors").stat().st_mtime_ns
    assert main(["tiny-model", "--out", str(tmp_path / "tiny")]) == 0  # a rerun of a finished job: nothing to do
    assert (tmp_path / "tiny" / "model.safetensors").stat().st_mtime_ns == written
    capsys.readouterr()
    assert main(["tiny-model", "--out", str(tmp_path / "tiny"), "--seed", "1"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'tiny'} exists and is not the tiny checkpoint "
                                               "this command writes; choose another --out or remove it")
