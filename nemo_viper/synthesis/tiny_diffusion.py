"""Tiny random diffusers pipelines built offline: the CPU tests' and the embedded default's diffusion models.

No model hub is reachable here, so both pipelines are made from nothing, with fixed seeds:

- a CLIP BPE tokenizer (``</w>`` word suffix) trained in well under a second on the tiny policy's corpus;
- a 2-layer CLIP text encoder (hidden size 32), a UNet with blocks (32, 64) and one layer per block
  (4 input channels for text-to-image, 8 for InstructPix2Pix: the image latent is concatenated), a
  2-block VAE with 4 latent channels;
- ``StableDiffusionPipeline`` with ``DDIMScheduler`` and ``StableDiffusionInstructPix2PixPipeline`` with
  ``EulerAncestralDiscreteScheduler``, no safety checker.

Each is ~6.5 MB and runs 2-4 steps at 64x64 in about 0.1-0.6 s on a CPU core. With random weights the
images are noise: they prove the plumbing (batching, seeds, sizes, decoding), not the content.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from nemo_viper.errors import ConfigError
from nemo_viper.synthesis.config import TEXT_TO_IMAGE, TINY_PIPELINES



def build_clip_tokenizer():
    """A CLIP tokenizer from a BPE trained on the tiny policy's corpus (lower-cased, ``</w>`` suffix)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    from nemo_viper.models.tiny import training_corpus

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-")
    corpus = list(training_corpus())
    # The trainer creates each word-final token ("e</w>") the first time it meets it in a hash map, so their ids,
    # and the merges that tie on counts (broken by id), changed from one build to the next: another tokenizer,
    # other images, other shards for the same seed. Reserved up front, in sorted order, their ids are fixed.
    characters = sorted(set(alphabet) | set(bpe.normalizer.normalize_str("".join(corpus))) - set(" \t\n"))
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|startoftext|>", "<|endoftext|>", *(f"{c}</w>" for c in characters)],
        end_of_word_suffix="</w>",
        initial_alphabet=alphabet,
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = CLIPTokenizer(vocab=state["vocab"], merges=merges)
    tokenizer.model_max_length = 77
    return tokenizer


def build_tiny_pipeline(name: str, seed: int = 0):
    """The tiny random pipeline ``name`` (one of :data:`TINY_PIPELINES`)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerAncestralDiscreteScheduler,
        StableDiffusionInstructPix2PixPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    if name not in TINY_PIPELINES:
        raise ConfigError(f"no tiny random build of {name!r}; tiny pipelines: {', '.join(TINY_PIPELINES)}")
    tokenizer = build_clip_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=8, out_channels=4,
            in_channels=4 if name == TEXT_TO_IMAGE else 8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=32,
        )
        vae = AutoencoderKL(
            block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=64,
        )
    components = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, safety_checker=None,
                      feature_extractor=None, requires_safety_checker=False)
    if name == TEXT_TO_IMAGE:
        return StableDiffusionPipeline(scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), **components)
    return StableDiffusionInstructPix2PixPipeline(scheduler=EulerAncestralDiscreteScheduler(), **components)


def ensure_tiny_pipeline(name: str, root: str | Path) -> Path:
    """``root/<name>``, building and saving the tiny pipeline there first if it is missing.

    Written to a temporary directory and renamed, so concurrent workers never see a partial pipeline
    (the loser of a race discards its copy).
    """
    out = Path(root) / name
    if out.is_dir():
        return out
    pipeline = build_tiny_pipeline(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out.parent))
    try:
        pipeline.save_pretrained(tmp)
        tmp.rename(out)
    except OSError:
        if not out.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_tiny_pipelines(out_dir: str | Path) -> list[Path]:
    """Write both tiny pipelines under ``out_dir`` (``nemo-viper tiny-diffusion``); returns their directories."""
    return [ensure_tiny_pipeline(name, out_dir) for name in TINY_PIPELINES]
