"""Warm-start the tiny policy so the CPU embedded default produces outputs that parse.

A randomly initialised policy answers every prompt with token noise, which the synthesis parsers rightly
reject, so a closed loop on it would produce no data. Real runs start from Qwen2.5-VL-Instruct, which
follows these prompts out of the box. For the tiny default, :func:`warm_start` runs a short supervised
fine-tune on templated examples of every prompt the loop asks (caption, critique, rewrite, entity list,
edit operations, and both RL task answers in the ``<think>…</think><answer>…</answer>`` format): the
model learns the *formats* and a small vocabulary of colours, objects and places, not facts about the
images (the templates' content is random). Images are scikit-image's photos at the tiny pixel budget.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from nemo_viper import prompts

COLOURS = ("red", "blue", "green", "yellow", "white", "black", "brown", "grey", "orange", "purple")
OBJECTS = ("car", "cat", "dog", "cup", "sign", "tree", "person", "bicycle", "table", "window", "rocket", "book")
PLACES = ("on the left", "on the right", "in the centre", "in the background", "near the top")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field")


@dataclass(frozen=True)
class WarmStartConfig:
    steps: int = 150
    batch_size: int = 8
    pool_size: int = 160  # examples encoded once, then sampled into batches
    lr: float = 3e-3
    seed: int = 0


def _fact(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(COLOURS), rng.choice(OBJECTS), rng.choice(PLACES)


def _sentence(fact) -> str:
    colour, obj, place = fact
    return f"The {colour} {obj} is {place}."


def _example(rng: random.Random, photos: list) -> tuple[list[dict], list, str]:
    """One (messages, images, assistant answer) triple for a random task."""
    facts = [_fact(rng) for _ in range(rng.randint(2, 3))]
    caption = " ".join(_sentence(f) for f in facts)
    corrections = [_sentence((rng.choice(COLOURS), obj, place)) for _, obj, place in facts[: rng.randint(1, 2)]]
    entities = [f"{colour} {obj} {place}" for colour, obj, place in facts[:2]]
    operations = [f"Change the color of the {obj} from {colour} to {rng.choice(COLOURS)}." for colour, obj, _ in facts[:2]]
    image, other = rng.sample(photos, 2)
    task = rng.randrange(7)
    if task == 0:
        return prompts.caption_messages(), [image], caption
    if task == 1:
        return prompts.critique_messages(caption), [image, other], "\n".join(corrections)
    if task == 2:
        return prompts.rewrite_messages(caption, corrections), [], " ".join(corrections + [_sentence(facts[-1])])
    if task == 3:
        return prompts.entity_messages(caption), [], "\n".join(entities)
    if task == 4:
        return prompts.operation_messages(caption, entities), [image], "\n".join(operations)
    answer = "\n".join(corrections if task == 5 else operations)
    messages = prompts.caption_refine_messages(caption) if task == 5 else prompts.visual_op_messages()
    images = [image] if task == 5 else [image, other]
    return messages, images, f"<think>I compare the image with the text.</think><answer>{answer}</answer>"


def _encode(processor, example) -> dict:
    """Token ids, labels (the assistant answer and its end-of-turn token; -100 elsewhere) and images."""
    messages, images, answer = example
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt + answer + "<|im_end|>"], images=images or None, return_tensors="pt")
    prompt_length = processor(text=[prompt], images=images or None, return_tensors="pt")["input_ids"].shape[1]
    labels = inputs["input_ids"][0].clone()
    labels[:prompt_length] = -100
    return {"input_ids": inputs["input_ids"][0], "labels": labels,
            "pixel_values": inputs.get("pixel_values"), "image_grid_thw": inputs.get("image_grid_thw")}


def _collate(encoded: list[dict], pad_token_id: int) -> dict:
    """Right-pad a list of encoded examples into one batch (images concatenated in order)."""
    length = max(len(e["input_ids"]) for e in encoded)
    batch = {
        "input_ids": torch.full((len(encoded), length), pad_token_id),
        "labels": torch.full((len(encoded), length), -100),
        "attention_mask": torch.zeros((len(encoded), length), dtype=torch.long),
    }
    for row, example in enumerate(encoded):
        n = len(example["input_ids"])
        batch["input_ids"][row, :n] = example["input_ids"]
        batch["labels"][row, :n] = example["labels"]
        batch["attention_mask"][row, :n] = 1
    with_images = [e for e in encoded if e["pixel_values"] is not None]
    if with_images:
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images])
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in with_images])
    return batch


def warm_start(hf_dir: str | Path, config: WarmStartConfig = WarmStartConfig()) -> float:
    """Fine-tune the checkpoint in ``hf_dir`` in place; returns the final training loss."""
    from PIL import Image
    from skimage import data
    from transformers import Qwen2_5_VLForConditionalGeneration

    from nemo_viper.models.processor import load_processor

    processor = load_processor(hf_dir)
    side = int(processor.image_processor.size["shortest_edge"] ** 0.5)  # the minimum pixel budget
    photos = [Image.fromarray(getattr(data, name)()).convert("RGB").resize((side, side)) for name in PHOTOS]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    pool = [_encode(processor, _example(rng, photos)) for _ in range(config.pool_size)]
    pad = processor.tokenizer.pad_token_id
    loss = torch.tensor(float("nan"))
    for _ in range(config.steps):
        loss = model(**_collate(rng.sample(pool, config.batch_size), pad)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(hf_dir)
    return loss.item()
