"""An image-only Qwen2.5-VL processor.

The stock ``Qwen2_5_VLProcessor`` also builds a video processor, which needs torchvision (installed only
as the build paired with torch, for vLLM and the evaluation harness). ViPER only feeds images, so this
processor keeps the tokenizer, the image processor and the chat template and leaves the video
processor out. It loads real Qwen2.5-VL checkpoints as well as the tiny offline one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Qwen2_5_VLProcessor


class ImageOnlyQwen25VLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


def save_processor(processor: ImageOnlyQwen25VLProcessor, out_dir: str | Path) -> None:
    """Save ``processor`` to ``out_dir`` as a released Qwen2.5-VL checkpoint declares it.

    ``save_pretrained`` records the saving class (``processor_class``) in ``processor_config.json`` and
    ``tokenizer_config.json``; ``AutoProcessor`` cannot resolve this project's class name and would silently
    return the bare tokenizer (lmms-eval's ``qwen2_5_vl`` model would then drop every image). The stock name
    makes ``AutoProcessor`` build transformers' ``Qwen2_5_VLProcessor``, whose video processor reads
    ``video_preprocessor_config.json`` (written here with the image settings, as JSON: building a video
    processor needs torchvision, reading the file does not). :func:`load_processor` is unaffected.
    """
    out = Path(out_dir)
    processor.save_pretrained(out)
    for name in ("processor_config.json", "tokenizer_config.json"):
        config = json.loads((out / name).read_text())
        config["processor_class"] = Qwen2_5_VLProcessor.__name__
        (out / name).write_text(json.dumps(config, indent=2) + "\n")
    image = processor.image_processor
    video = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        **{flag: True for flag in ("do_convert_rgb", "do_resize", "do_rescale", "do_normalize")},
        "do_sample_frames": False,
        "image_mean": list(image.image_mean),
        "image_std": list(image.image_std),
        "rescale_factor": image.rescale_factor,
        "resample": int(image.resample),
        "patch_size": image.patch_size,
        "merge_size": image.merge_size,
        "temporal_patch_size": image.temporal_patch_size,
        "min_frames": 4,
        "max_frames": 768,
        "size": {"shortest_edge": image.size.shortest_edge, "longest_edge": image.size.longest_edge},
    }
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")


def load_processor(path: str | Path) -> ImageOnlyQwen25VLProcessor:
    """Load tokenizer + image processor + chat template from a local HF checkpoint directory.

    The image processor is always the PIL one (``Qwen2VLImageProcessorPil``, the reference of the DALI
    preprocessor), whether or not torchvision is installed (transformers would then pick its torchvision one).
    """
    return ImageOnlyQwen25VLProcessor.from_pretrained(str(path), backend="pil")


def prompt_token_ids(processor: Qwen2_5_VLProcessor, text: str, image_grid_thw: torch.Tensor | None) -> torch.Tensor:
    """Token ids of a chat-templated ``text`` whose images are already processed, as the processor's
    own call would return them: the ``k``-th image token expands to ``t*h*w / merge_size**2`` copies,
    ``(t, h, w) = image_grid_thw[k]`` (one per merged patch)."""
    parts = text.split(processor.image_token)
    images = 0 if image_grid_thw is None else len(image_grid_thw)
    if len(parts) - 1 != images:
        raise ValueError(f"the prompt has {len(parts) - 1} image placeholders but {images} processed images")
    if images:
        merge = processor.image_processor.merge_size**2
        tokens = [processor.image_token * (int(thw.prod()) // merge) for thw in image_grid_thw]
        text = parts[0] + "".join(token + part for token, part in zip(tokens, parts[1:]))
    return torch.tensor(processor.tokenizer(text)["input_ids"], dtype=torch.long)
