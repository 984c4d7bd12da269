"""A complete, tiny Qwen2.5-VL Hugging Face checkpoint built offline.

No model hub is reachable from CI, so the embedded default policy is made here from nothing:

- a byte-level BPE tokenizer trained in well under a second on a small built-in corpus of
  image-description sentences, wrapped as ``Qwen2Tokenizer`` with Qwen's special tokens;
- ``Qwen2VLImageProcessor`` settings (patch 14, merge 2, temporal patch 2) with a small pixel budget, and
  the matching ``Qwen2VLVideoProcessor`` (``video_preprocessor_config.json``, as real checkpoints have;
  vLLM loads the full processor);
- a Qwen2.5-VL chat template (system/user/assistant turns, images as
  ``<|vision_start|><|image_pad|><|vision_end|>``);
- a ``Qwen2_5_VLConfig`` (with ``architectures``) and random weights from a fixed seed.

The directory loads with ``transformers``' ``from_pretrained`` (model, tokenizer, image processor) and
with :func:`nemo_viper.models.processor.load_processor`, exactly like a real Qwen2.5-VL-Instruct dir.
"""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nemo_viper.errors import NemoViperError
from nemo_viper.models.tokens import QWEN_SPECIAL_TOKENS

if TYPE_CHECKING:
    from nemo_viper.models.tiny_warmstart import WarmStartConfig

CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{ message['content'] }}"
    "{%- else %}{% for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{%- endfor %}{% endif %}"
    "{{- '<|im_end|>\\n' }}{% endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_COLOURS = ("red", "blue", "green", "yellow", "white", "black", "brown", "grey", "orange", "purple")
_OBJECTS = ("car", "cat", "dog", "cup", "sign", "tree", "person", "bicycle", "table", "window", "rocket", "book")
_PLACES = ("on the left", "on the right", "in the centre", "in the background", "near the top", "below the sign")
_PHRASES = (
    "Describe this image in detail.",
    "The caption says the {c} {o} is {p}, but it is not.",
    "Change the color of the {o} from {c} to {c2}.",
    "Remove the {o} {p}.",
    "Add a {c} {o} {p}.",
    "There are {n} {o}s {p}.",
    "The text on the sign reads OPEN.",
    "<think>I compare both images carefully.</think><answer>The {o} is {c}.</answer>",
)


def training_corpus() -> list[str]:
    """A few hundred short sentences in the domain of the two ViPER tasks (deterministic)."""
    numbers = ("two", "three", "four")
    combos = itertools.product(_COLOURS, _OBJECTS, _PLACES)
    lines = []
    for i, (colour, obj, place) in enumerate(combos):
        phrase = _PHRASES[i % len(_PHRASES)]
        lines.append(
            phrase.format(c=colour, c2=_COLOURS[(i + 3) % len(_COLOURS)], o=obj, p=place, n=numbers[i % 3])
        )
    return lines


@dataclass(frozen=True)
class TinyModelConfig:
    """Sizes of the tiny policy. Defaults: ~0.5 M parameters, TP=2 and PP=2 compatible, grouped-query
    attention, head dim 32 (the smallest vLLM's CPU attention kernels support).

    ``vocab_size`` is the model's vocabulary (embedding rows, a multiple of 64 like real Qwen checkpoints'
    padded vocabularies); the tokenizer's BPE trains up to that many tokens (478 with Qwen's special tokens:
    the corpus runs out of merges), and every token id must fit."""

    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    vision_depth: int = 2
    vision_hidden_size: int = 32
    vision_heads: int = 2
    vision_intermediate_size: int = 64
    tie_word_embeddings: bool = False  # True as in Qwen2.5-VL-3B (the output layer reuses the embedding)
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 28 * 28 * 64
    seed: int = 0

    @property
    def mrope_section(self) -> list[int]:
        """Split of the rotary half-dimension into temporal/height/width parts (Qwen's 2:3:3 ratio)."""
        half = self.hidden_size // self.num_attention_heads // 2
        t = half // 4
        h = (half - t) // 2
        return [t, h, half - t - h]

    def hf_sizes(self) -> dict:
        """The sizes in the checkpoint's ``config.json`` (``text_config``, ``vision_config``,
        ``tie_word_embeddings``): what :func:`build_hf_config` builds the model from, and all that
        ``nemo-viper plan`` needs to count its parameters without building it (no torch, no transformers)."""
        return {
            "text_config": dict(
                vocab_size=self.vocab_size,
                hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size,
                num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_attention_heads,
                num_key_value_heads=self.num_key_value_heads,
                max_position_embeddings=self.max_position_embeddings,
            ),
            "vision_config": dict(
                depth=self.vision_depth,
                hidden_size=self.vision_hidden_size,
                intermediate_size=self.vision_intermediate_size,
                num_heads=self.vision_heads,
                out_hidden_size=self.hidden_size,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=56,
                fullatt_block_indexes=[self.vision_depth - 1],
                in_channels=3,
            ),
            "tie_word_embeddings": self.tie_word_embeddings,
        }


def build_tokenizer(vocab_size: int):
    """Train a byte-level BPE on :func:`training_corpus` and wrap it as ``Qwen2Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(training_corpus(), trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=state["vocab"],
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    tokenizer.add_tokens([QWEN_SPECIAL_TOKENS[0]], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 32768
    return tokenizer


def build_hf_config(config: TinyModelConfig, tokenizer):
    """``Qwen2_5_VLConfig`` of :meth:`TinyModelConfig.hf_sizes` with the tokenizer's special token ids;
    ``NemoViperError`` when the tokenizer has more tokens than ``config.vocab_size``."""
    from transformers import Qwen2_5_VLConfig

    sizes = config.hf_sizes()
    if len(tokenizer) > config.vocab_size:
        raise NemoViperError(f"the tiny tokenizer has {len(tokenizer)} tokens > vocab_size={config.vocab_size}")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config=dict(
            **sizes["text_config"],
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": config.rope_theta,
                "mrope_section": config.mrope_section,
            },
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=sizes["vision_config"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=sizes["tie_word_embeddings"],
        architectures=["Qwen2_5_VLForConditionalGeneration"],
    )


RECIPE_FILE = "nemo_viper_tiny.json"


def write_tiny_checkpoint(
    out_dir: str | Path, config: TinyModelConfig = TinyModelConfig(), warm_start: WarmStartConfig | None = None
) -> Path:
    """Write the tiny checkpoint (warm-started if ``warm_start``) to ``out_dir``; returns the path.

    Everything, warm start included, happens in ``.<name>.partial`` next to ``out_dir``, which is renamed
    to ``out_dir`` only when complete (``nemo_viper_tiny.json``, the recipe, written last): a job killed at
    any moment leaves either nothing under ``out_dir`` or the complete checkpoint, and a rerun redoes the
    partial directory. An existing ``out_dir`` written with the same recipe is returned as it is; a
    non-empty one holding anything else is a :class:`~nemo_viper.errors.NemoViperError`.
    """
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from nemo_viper.models.processor import ImageOnlyQwen25VLProcessor, save_processor

    out = Path(out_dir)
    recipe = {"model": asdict(config), "warm_start": asdict(warm_start) if warm_start else None}
    if out.exists() and any(out.iterdir()):
        written = read_tiny_recipe(out)
        if written is not None and {key: written.get(key) for key in recipe} == recipe:
            return out
        raise NemoViperError(f"{out} exists and is not the tiny checkpoint this command writes; choose another "
                             "--out or remove it")
    tokenizer = build_tokenizer(config.vocab_size)
    hf_config = build_hf_config(config, tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = Qwen2_5_VLForConditionalGeneration(hf_config).eval()
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels},
    )
    processor = ImageOnlyQwen25VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    generation_config = GenerationConfig(
        bos_token_id=hf_config.text_config.bos_token_id,
        eos_token_id=[hf_config.text_config.eos_token_id],
        pad_token_id=hf_config.text_config.pad_token_id,
        do_sample=False,
    )

    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed attempt left
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    save_processor(processor, tmp)
    generation_config.save_pretrained(tmp)
    del model
    final_loss = None
    if warm_start is not None:
        from nemo_viper.models.tiny_warmstart import warm_start as run_warm_start

        final_loss = run_warm_start(tmp, warm_start)
    (tmp / RECIPE_FILE).write_text(json.dumps({**recipe, "warm_start_final_loss": final_loss}, indent=2) + "\n")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def read_tiny_recipe(directory: str | Path) -> dict | None:
    """What :func:`write_tiny_checkpoint` recorded in ``directory`` (``model``, ``warm_start``,
    ``warm_start_final_loss``), or ``None``."""
    try:
        return json.loads((Path(directory) / RECIPE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
