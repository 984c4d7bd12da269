"""Stage 1, Caption Self-Refining data: caption -> redraw -> self-critique -> refinements -> rewrite.

Per batch of source images, each sub-step is one batched call, and a sample leaves the batch at the
first step whose output is unusable (counted by reason in :class:`~nemo_viper.synthesis.chunks.ChunkStats`):

1. ``caption``: the policy describes the image (greedy by default) -> ``C_g``
   (filtered: ``caption_<empty|too_short|overlong|wrong_language>``);
2. ``redraw``: the text-to-image pipeline draws ``C_g`` (seeded per sample);
3. ``critique``: the policy sees the original, the redraw and ``C_g`` and lists corrections about the
   original; they are parsed (:func:`~nemo_viper.synthesis.parsers.parse_list`) and the sample is kept if
   ``min_refinements <= k <= max_refinements`` (filtered: ``no_refinements``, ``too_few_refinements``,
   ``too_many_refinements``);
4. ``rewrite``: the policy rewrites ``C_g`` with the corrections -> ``C_ref``
   (filtered: ``refined_caption_<reason>``).

The record (``caption_refine``) stores the original image (its PNG/JPEG bytes unchanged, else PNG), and the
redraw as the debug image ``recon`` when ``keep_redraw``. Sample ids are ``s1-<input index:07d>``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from PIL import Image

from nemo_viper.data.records import CaptionRefineRecord
from nemo_viper.prompts import caption_messages, critique_messages, rewrite_messages
from nemo_viper.synthesis.chunks import ChunkStats
from nemo_viper.synthesis.config import SynthConfig
from nemo_viper.synthesis.diffusion import TextToImage
from nemo_viper.synthesis.inputs import InputItem, LoadedImage, load_image
from nemo_viper.synthesis.parsers import ItemRules, parse_list, parse_text
from nemo_viper.synthesis.samples import Sample, sample_seed
from nemo_viper.synthesis.vlm import VLM, ChatPrompt

log = logging.getLogger(__name__)


@dataclass
class _Work:
    id: str
    source: str
    loaded: LoadedImage
    caption: str = ""
    redraw: Image.Image | None = None
    refinements: tuple[str, ...] = ()


class CaptionRefineStage:
    """Turns batches of ``(input index, InputItem)`` into ``caption_refine`` samples."""

    task = CaptionRefineRecord.task

    def __init__(self, config: SynthConfig, vlm: VLM, painter: TextToImage, synth_ckpt: str):
        self.config = config
        self.vlm = vlm
        self.painter = painter
        self.synth_ckpt = synth_ckpt
        filters = config.filters
        self.item_rules = ItemRules(max_chars=filters.max_item_chars, language=filters.language)

    def seeds(self, work: list[_Work], step: str) -> list[int]:
        return [sample_seed(self.config.seed, w.id, step) for w in work]

    def process(self, items: list[tuple[int, InputItem]], stats: ChunkStats) -> list[Sample]:
        stats.inputs += len(items)
        with stats.timed("load", len(items)):
            work = []
            for index, item in items:
                loaded = load_image(item, self.config.vlm.max_pixels)
                if isinstance(loaded, str):
                    stats.skipped[loaded] += 1
                    log.warning("skipping input %s: %s", item.source, loaded)
                else:
                    work.append(_Work(f"s1-{index:07d}", item.source, loaded))
        work = self._caption(work, stats)
        with stats.timed("redraw", len(work)):
            for w, image in zip(work, self.painter.generate([w.caption for w in work], self.seeds(work, "redraw"))):
                w.redraw = image
        work = self._critique(work, stats)
        return self._rewrite(work, stats)

    def _caption(self, work: list[_Work], stats: ChunkStats) -> list[_Work]:
        with stats.timed("caption", len(work)):
            prompts = [ChatPrompt(caption_messages(), (w.loaded.image,)) for w in work]
            answers = self.vlm.complete(prompts, self.config.vlm.caption_tokens, self.seeds(work, "caption"))
        kept = []
        for w, answer in zip(work, answers):
            parsed = parse_text(answer, language=self.config.filters.language)
            if parsed.rejected:
                stats.filtered[f"caption_{parsed.rejected}"] += 1
            else:
                w.caption = parsed.text
                kept.append(w)
        return kept

    def _critique(self, work: list[_Work], stats: ChunkStats) -> list[_Work]:
        with stats.timed("critique", len(work)):
            prompts = [ChatPrompt(critique_messages(w.caption), (w.loaded.image, w.redraw)) for w in work]
            answers = self.vlm.complete(prompts, self.config.vlm.critique_tokens, self.seeds(work, "critique"))
        filters, kept = self.config.filters, []
        for w, answer in zip(work, answers):
            parsed = parse_list(answer, self.item_rules)
            stats.dropped_items.update({f"refinement_{k}": v for k, v in parsed.dropped.items()})
            count = len(parsed.items)
            if count == 0:
                stats.filtered["no_refinements"] += 1
            elif count < filters.min_refinements:
                stats.filtered["too_few_refinements"] += 1
            elif count > filters.max_refinements:
                stats.filtered["too_many_refinements"] += 1
            else:
                w.refinements = tuple(parsed.items)
                kept.append(w)
        return kept

    def _rewrite(self, work: list[_Work], stats: ChunkStats) -> list[Sample]:
        with stats.timed("rewrite", len(work)):
            prompts = [ChatPrompt(rewrite_messages(w.caption, list(w.refinements))) for w in work]
            answers = self.vlm.complete(prompts, self.config.vlm.rewrite_tokens, self.seeds(work, "rewrite"))
        samples = []
        for w, answer in zip(work, answers):
            parsed = parse_text(answer, language=self.config.filters.language)
            if parsed.rejected:
                stats.filtered[f"refined_caption_{parsed.rejected}"] += 1
                continue
            record = CaptionRefineRecord(
                id=w.id,
                images=["img0"],
                initial_caption=w.caption,
                refinements=w.refinements,
                refined_caption=parsed.text,
                source=w.source,
                synth_ckpt=self.synth_ckpt,
            )
            image = w.loaded.encoded if w.loaded.encoded is not None else w.loaded.image
            samples.append(Sample(record, (image,), w.redraw if self.config.keep_redraw else None))
        return samples
