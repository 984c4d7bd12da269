"""Tiny offline copies of the seven benchmarks, each in its hub dataset's own schema.

A few rows per task with generated images (coloured shapes on a plain background: the question asks
about the shape's colour, so a model that reads images can answer). They are laid out exactly like real
local copies (:mod:`nemo_viper.evaluation.benchmarks`), so the same lmms-eval tasks, prompts and scorers
run on them: tests, and the embedded default's in-loop benchmark phase (``eval.dataset_root: tiny``).
"""

from __future__ import annotations

import base64
import io
import random
from pathlib import Path

from PIL import Image, ImageDraw

from nemo_viper.evaluation.benchmarks import BENCHMARKS, BLINK_SUBTASKS, MMSTAR_DOMAINS, dataset_dirs

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")
LETTERS = "ABCD"
MMSTAR_SUBDOMAINS = {
    "coarse perception": "image scene and topic", "fine-grained perception": "recognition",
    "instance reasoning": "single-instance reasoning", "logical reasoning": "common reasoning",
    "science & technology": "geography & earth science & agriculture", "math": "numeric commonsense and calculation",
}


def shape_image(colour: str, shape: str, size: tuple[int, int] = (56, 56)) -> Image.Image:
    """A ``size`` = (width, height) image: a coloured shape on a plain background."""
    width, height = size
    image = Image.new("RGB", size, (245, 245, 245))
    draw = ImageDraw.Draw(image)
    box = (width // 5, height // 5, width - width // 5, height - height // 5)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _question(rng: random.Random, size: tuple[int, int] = (56, 56)) -> tuple[Image.Image, list[str], str, str]:
    """An image of ``size``, four colour options, the right letter and the colour."""
    colour = rng.choice(sorted(COLOURS))
    options = sorted(COLOURS)
    rng.shuffle(options)
    return shape_image(colour, rng.choice(SHAPES), size), options, LETTERS[options.index(colour)], colour


def _options_text(options: list[str]) -> str:
    return "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options))


def _rows(task: str, rows: int, rng: random.Random, image_sizes: tuple[tuple[int, int], ...]) -> list[dict]:
    out = []
    for i in range(rows):
        image, options, letter, colour = _question(rng, image_sizes[i % len(image_sizes)])
        ask = "What colour is the shape?"
        if task == "mmstar":
            domain = MMSTAR_DOMAINS[i % len(MMSTAR_DOMAINS)]
            out.append({"index": i, "question": f"{ask}\nOptions: " + ", ".join(
                f"{l}: {o}" for l, o in zip(LETTERS, options)), "image": image, "answer": letter,
                "category": domain, "l2_category": MMSTAR_SUBDOMAINS[domain],
                "meta_info": {"source": "tiny", "split": "val", "image_path": f"{i}.png"}})
        elif task == "realworldqa":
            out.append({"image": image, "question": f"{ask}\n{_options_text(options)}\nPlease answer directly with "
                        "only the letter of the correct option and nothing else.", "answer": letter})
        elif task == "mmerealworld":
            sub = ("Remote Sensing", "Monitoring", "Autonomous_Driving", "Diagram and Table")[i % 4]
            out.append({"index": i, "question_id": f"tiny/{i}", "question": ask,
                        "multi-choice options": [f"({l}) {o}" for l, o in zip(LETTERS, options)],
                        "answer": letter, "bytes": _png_base64(image),
                        "category": f"{'Perception' if i % 2 == 0 else 'Reasoning'}/{sub}",
                        "l2-category": "color"})
        elif task == "mantis":
            other = shape_image(rng.choice(sorted(COLOURS)), rng.choice(SHAPES))
            out.append({"id": f"tiny-{i}", "question_type": "multi-choice",
                        "question": "What colour is the shape in the first image?", "images": [image, other],
                        "options": [f"({l}) {o}" for l, o in zip(LETTERS, options)],
                        "answer": f"({letter})", "data_source": "tiny", "category": "colour"})
        elif task == "hallusion_bench_image":
            asked = colour if i % 2 == 0 else next(c for c in sorted(COLOURS) if c != colour)
            out.append({"category": "VD" if i % 2 == 0 else "VS", "subcategory": "colour", "visual_input": "1",
                        "set_id": str(i // 2), "figure_id": "1", "sample_note": "tiny", "question_id": str(i),
                        "question": f"Is the shape {asked}? Please answer yes or no.",
                        "gt_answer_details": f"The shape is {colour}.", "gt_answer": "1" if asked == colour else "0",
                        "filename": f"{i}.png", "image": image})
        elif task == "crpe_relation":
            out.append({"question_id": i, "text": f"{ask}\n{_options_text(options)}", "image": image,
                        "correct_option": letter, "category": "relation"})
    return out


def _blink_rows(subtask: str, rows: int, rng: random.Random) -> list[dict]:
    out = []
    for i in range(rows):
        image, options, letter, colour = _question(rng)
        choices = options[:2] if letter in "AB" else options[2:]
        letter = "AB"[choices.index(colour)]
        prompt = f"What colour is the shape?\nSelect from the following choices.\n(A) {choices[0]}\n(B) {choices[1]}"
        out.append({"idx": f"val_{subtask}_{i}", "question": "What colour is the shape?", "sub_task": subtask,
                    "image_1": image, "image_2": None, "image_3": None, "image_4": None, "choices": choices,
                    "answer": f"({letter})", "prompt": prompt, "explanation": ""})
    return out


def _save(rows: list[dict], split: str, path: Path, optional_images: tuple[str, ...] = ()) -> None:
    """``DatasetDict({split: rows}).save_to_disk(path)``; ``optional_images``: Image columns that may be None."""
    import datasets

    features = None
    if optional_images:  # infer the schema from a row with every image present
        probe = {**rows[0], **{column: rows[0]["image_1"] for column in optional_images}}
        features = datasets.Dataset.from_list([probe]).features
    datasets.DatasetDict({split: datasets.Dataset.from_list(rows, features=features)}).save_to_disk(str(path))


def write_tiny_datasets(root: str | Path, tasks=tuple(BENCHMARKS), rows: int = 5, seed: int = 0,
                        image_sizes: tuple[tuple[int, int], ...] = ((56, 56),)) -> Path:
    """Write ``rows`` rows per task (MMStar: at least one per sub-domain; BLINK: 2 per subtask) under ``root``
    in the local layout; returns ``root``. Row ``i``'s question image is ``image_sizes[i % len]`` (width,
    height) large (BLINK's and Mantis' other images: 56x56)."""
    root = Path(root)
    for task in tasks:
        benchmark = BENCHMARKS[task]
        rng = random.Random(f"{seed}-{task}")
        if task == "blink":
            for name, (subtask, path) in zip(BLINK_SUBTASKS, dataset_dirs(benchmark, root).items()):
                _save(_blink_rows(name, 2, rng), benchmark.split, path, ("image_2", "image_3", "image_4"))
        else:
            count = max(rows, len(MMSTAR_DOMAINS)) if task == "mmstar" else rows  # one question per sub-domain
            _save(_rows(task, count, rng, image_sizes), benchmark.split, benchmark.local_dir(root))
    return root
