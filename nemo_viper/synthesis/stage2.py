"""Stage 2, Visual-Operation Predicting data: hard entities -> edit operations -> edit -> filter.

Input: the stage-1 dataset (``caption_refine`` records and their original images). Per batch, each
sub-step is one batched call; a sample leaves at the first unusable output (counted by reason):

1. ``entities``: the policy lists the objects its refined caption mentions and/or a determiner rule
   finds them in the caption (``filters.entity_candidates``; filtered: ``no_entities``); the heuristic
   rules of :mod:`~nemo_viper.synthesis.entities` pick 1-``max_entities`` hard ones (filtered:
   ``no_hard_entities``);
2. ``operations``: the policy sees the original and writes one edit instruction per hard entity from the
   operation taxonomy (filtered: ``no_operations``);
3. ``edit``: the editing pipeline edits the ORIGINAL, resized to ``edit.pixels`` (sides multiples of 16),
   with the operations joined into one instruction (seeded per sample);
4. ``filter``: the changed-pixel fraction must lie in the band (filtered: ``edit_unchanged``,
   ``edit_replaced_image``);
5. ``verify`` (optional, ``filters.verify_operations``): per operation, the policy says whether it is
   visible; denied operations are dropped (filtered: ``operations_not_verified`` when none is left).

The record (``visual_op``) stores the editor's input and its output aligned to the same size, original
first. Sample ids are ``<stage-1 id>-op``. A stage-1 image that does not decode is skipped (``corrupt_image``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from PIL import Image

from nemo_viper.data.records import CaptionRefineRecord, VisualOpRecord
from nemo_viper.data.shards import CorruptImageError, ShardDataset
from nemo_viper.prompts import entity_messages, operation_messages, verify_messages
from nemo_viper.synthesis.chunks import ChunkStats
from nemo_viper.synthesis.config import SynthConfig
from nemo_viper.synthesis.diffusion import ImageEditor
from nemo_viper.synthesis.entities import caption_candidates, select_hard_entities
from nemo_viper.synthesis.filters import align, changed_fraction, edit_rejection
from nemo_viper.synthesis.parsers import parse_entities, parse_operations, parse_yes_no
from nemo_viper.synthesis.samples import Sample, sample_seed
from nemo_viper.synthesis.vlm import VLM, ChatPrompt

log = logging.getLogger(__name__)


def edit_input(image: Image.Image, pixels: int | None) -> Image.Image:
    """``image`` resized to about ``pixels`` pixels (its own area if ``None``), aspect ratio kept, both
    sides multiples of 16 (at least 16): the size latent-diffusion editors work at."""
    scale = 1.0 if pixels is None else (pixels / (image.width * image.height)) ** 0.5
    size = tuple(max(16, round(side * scale / 16) * 16) for side in image.size)
    return image if size == image.size else image.resize(size, Image.BICUBIC)


@dataclass
class _Work:
    id: str
    record: CaptionRefineRecord
    original: Image.Image
    entities: list[str] | None = None
    operations: list[str] | None = None
    edited: Image.Image | None = None


class VisualOpStage:
    """Turns batches of stage-1 dataset indices into ``visual_op`` samples."""

    task = VisualOpRecord.task

    def __init__(self, config: SynthConfig, vlm: VLM, editor: ImageEditor, stage1: ShardDataset, synth_ckpt: str):
        self.config = config
        self.vlm = vlm
        self.editor = editor
        self.stage1 = stage1
        self.synth_ckpt = synth_ckpt

    def seeds(self, work: list[_Work], step: str) -> list[int]:
        return [sample_seed(self.config.seed, w.id, step) for w in work]

    def process(self, items: list[tuple[int, int]], stats: ChunkStats) -> list[Sample]:
        stats.inputs += len(items)
        with stats.timed("load", len(items)):
            work = []
            for _, index in items:
                record = self.stage1.record(index)
                try:
                    image = self.stage1.images(index)[0]
                except CorruptImageError as e:
                    stats.skipped["corrupt_image"] += 1
                    log.warning("skipping stage-1 sample %s: %s", record.id, e)
                    continue
                work.append(_Work(f"{record.id}-op", record, edit_input(image, self.config.edit.pixels)))
        work = self._entities(work, stats)
        work = self._operations(work, stats)
        work = self._edit(work, stats)
        if self.config.filters.verify_operations:
            work = self._verify(work, stats)
        return [self._sample(w) for w in work]

    def _entities(self, work: list[_Work], stats: ChunkStats) -> list[_Work]:
        source = self.config.filters.entity_candidates
        asked = work if source in ("policy", "both") else []
        with stats.timed("entities", len(work)):
            prompts = [ChatPrompt(entity_messages(w.record.refined_caption)) for w in asked]
            answers = iter(self.vlm.complete(prompts, self.config.vlm.entity_tokens, self.seeds(asked, "entities")))
        kept = []
        for w in work:
            candidates = []
            if asked:
                parsed = parse_entities(next(answers), self.config.filters.language)
                stats.dropped_items.update({f"entity_{k}": v for k, v in parsed.dropped.items()})
                candidates += parsed.items
            if source in ("caption", "both"):
                candidates += caption_candidates(w.record.refined_caption)
            if not candidates:
                stats.filtered["no_entities"] += 1
                continue
            w.entities = select_hard_entities(candidates, w.record.refined_caption, list(w.record.refinements),
                                              self.config.filters.max_entities)
            stats.dropped_items["entity_not_selected"] += len(candidates) - len(w.entities)
            if w.entities:
                kept.append(w)
            else:
                stats.filtered["no_hard_entities"] += 1
        return kept

    def _operations(self, work: list[_Work], stats: ChunkStats) -> list[_Work]:
        with stats.timed("operations", len(work)):
            prompts = [
                ChatPrompt(operation_messages(w.record.refined_caption, w.entities), (w.original,)) for w in work
            ]
            answers = self.vlm.complete(prompts, self.config.vlm.operation_tokens, self.seeds(work, "operations"))
        kept = []
        for w, answer in zip(work, answers):
            parsed = parse_operations(answer, max_operations=len(w.entities))
            stats.dropped_items.update({f"operation_{k}": v for k, v in parsed.dropped.items()})
            if parsed.items:
                w.operations = parsed.items
                kept.append(w)
            else:
                stats.filtered["no_operations"] += 1
        return kept

    def _edit(self, work: list[_Work], stats: ChunkStats) -> list[_Work]:
        with stats.timed("edit", len(work)):
            instructions = [" ".join(w.operations) for w in work]
            edited = self.editor.edit([w.original for w in work], instructions, self.seeds(work, "edit"))
        filters, kept = self.config.filters, []
        with stats.timed("filter", len(work)):
            for w, image in zip(work, edited):
                fraction = changed_fraction(w.original, image, filters.pixel_threshold)
                reason = edit_rejection(fraction, filters.min_changed_fraction, filters.max_changed_fraction)
                if reason:
                    stats.filtered[reason] += 1
                else:
                    w.edited = align(image, w.original)
                    kept.append(w)
        return kept

    def _verify(self, work: list[_Work], stats: ChunkStats) -> list[_Work]:
        with stats.timed("verify", len(work)):
            pairs = [(w, op) for w in work for op in w.operations]
            prompts = [ChatPrompt(verify_messages(op), (w.original, w.edited)) for w, op in pairs]
            seeds = [sample_seed(self.config.seed, w.id, f"verify:{op}") for w, op in pairs]
            answers = self.vlm.complete(prompts, self.config.vlm.verify_tokens, seeds)
        confirmed: dict[str, list[str]] = {w.id: [] for w in work}
        for (w, op), answer in zip(pairs, answers):
            if parse_yes_no(answer):
                confirmed[w.id].append(op)
            else:
                stats.dropped_items["operation_unverified"] += 1
        kept = []
        for w in work:
            w.operations = confirmed[w.id]
            if w.operations:
                kept.append(w)
            else:
                stats.filtered["operations_not_verified"] += 1
        return kept

    def _sample(self, w: _Work) -> Sample:
        record = VisualOpRecord(
            id=w.id,
            images=["img0", "img1"],
            operations=w.operations,
            hard_entities=w.entities,
            source_caption=w.record.refined_caption,
            edit_pipeline=self.editor.name,
            synth_ckpt=self.synth_ckpt,
        )
        return Sample(record, (w.original, w.edited))
