"""Requests shared by the generation-backend tests, and transformers' greedy continuations of them."""

import pytest
import torch
from PIL import Image
from skimage import data

from nemo_viper.models.processor import load_processor
from nemo_viper.models.tokens import VISION_SPECIAL_TOKENS
from nemo_viper.rollout import GenerationRequest

GREEDY_TOKENS = 24


def greedy_inputs(hf_dir, out_dir) -> dict:
    """A one-image, a two-image and a text-only prompt saved for the workers (``path``), and transformers'
    greedy continuations of them (one batch, ``hf_greedy``)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = load_processor(hf_dir)
    images = [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee()), Image.fromarray(data.chelsea())]
    chats = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image in detail."}]}],
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What changed?"}],
            }
        ],
        [{"role": "user", "content": "Remove the red car on the left."}],
    ]
    requests = [
        GenerationRequest.from_chat(processor, chats[0], images[:1]),
        GenerationRequest.from_chat(processor, chats[1], images[1:]),
        GenerationRequest.from_chat(processor, chats[2]),
    ]

    processor.tokenizer.padding_side = "left"
    texts = [processor.apply_chat_template(chat, add_generation_prompt=True) for chat in chats]
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    suppress = processor.tokenizer.convert_tokens_to_ids(list(VISION_SPECIAL_TOKENS))
    output = model.generate(**batch, do_sample=False, max_new_tokens=GREEDY_TOKENS, suppress_tokens=suppress)
    eos = set(model.generation_config.eos_token_id)
    expected = []
    for row in output[:, batch["input_ids"].shape[1] :].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        expected.append(row[:end])

    path = out_dir / "requests.pt"
    torch.save({"requests": requests}, path)
    return {"path": path, "hf_greedy": expected}


@pytest.fixture(scope="session")
def inputs(tiny_hf_dir, tmp_path_factory):
    return greedy_inputs(tiny_hf_dir, tmp_path_factory.mktemp("rollout"))
