"""lmms-eval's ``vllm`` chat model, given the inputs and decoding rules of lmms-eval's ``qwen2_5_vl`` model (adapter).

Images: lmms-eval's ``qwen2_5_vl`` model resizes every image with ``qwen_vl_utils.fetch_image`` (its default
bounds: each side rounded to a multiple of 28, PIL bicubic) before the transformers processor resizes it again
to the image budget; its ``vllm`` model sends the original image, which vLLM's processor resizes once. From the
same image the two then see different grids (150x100: 15x18 vs 14x20 merged patches, so different prompt token
ids) or the same grid with other pixels (a second resampling). :class:`Qwen25VLVLLM` applies the same
``fetch_image`` to each image before lmms-eval encodes it (PNG, lossless) for vLLM.

Decoding: ``qwen2_5_vl`` calls ``generate(eos_token_id=tokenizer.eos_token_id, ...)``, so transformers stops at
the tokenizer's EOS only and applies the rest of the checkpoint's ``generation_config.json`` (e.g. its
``repetition_penalty``). vLLM, given explicit sampling parameters, stops at every ``eos_token_id`` of that file
and applies no repetition penalty. :class:`Qwen25VLVLLM` starts vLLM on a copy of the generation config whose
``eos_token_id`` is the tokenizer's EOS, and sends the config's ``repetition_penalty`` with every request.
"""

from __future__ import annotations

import tempfile
from types import SimpleNamespace

from lmms_eval.models.chat.vllm import VLLM
from qwen_vl_utils import fetch_image


def qwen2_5_vl_images(messages: list[dict]) -> list[dict]:
    """lmms-eval chat ``messages`` with every image as ``qwen2_5_vl``'s ``process_vision_info`` passes it to
    the processor (``fetch_image`` of the image alone: no per-image bounds, as that model gives none)."""
    return [{**message, "content": [{**part, "url": fetch_image({"image": part["url"]})}
                                    if isinstance(part, dict) and part.get("type") == "image" else part
                                    for part in message["content"]]}
            if isinstance(message.get("content"), list) else message
            for message in messages]


def transformers_generation_config(model: str):
    """The generation config ``qwen2_5_vl``'s ``generate`` decodes with: the checkpoint's (transformers'
    defaults without one), its ``eos_token_id`` replaced by the tokenizer's EOS as that model passes it."""
    from transformers import AutoTokenizer, GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model)
    except OSError:  # no generation_config.json
        config = GenerationConfig()
    config.eos_token_id = AutoTokenizer.from_pretrained(model).eos_token_id
    return config


class Qwen25VLVLLM(VLLM):
    """lmms-eval's ``vllm`` chat model with :func:`qwen2_5_vl_images` and :func:`transformers_generation_config`."""

    def __init__(self, model: str, **kwargs):
        generation = transformers_generation_config(model)
        self._generation_dir = tempfile.TemporaryDirectory(prefix="vllm_generation_config_")
        generation.save_pretrained(self._generation_dir.name)
        self.repetition_penalty = generation.repetition_penalty or 1.0  # transformers: None = no penalty
        super().__init__(model=model, generation_config=self._generation_dir.name, **kwargs)

    def make_one_request(self, request):
        ctx, doc_to_messages, *rest = request.arguments
        aligned = SimpleNamespace(arguments=(ctx, lambda doc: qwen2_5_vl_images(doc_to_messages(doc)), *rest))
        messages, params = super().make_one_request(aligned)
        return messages, {**params, "repetition_penalty": self.repetition_penalty}
