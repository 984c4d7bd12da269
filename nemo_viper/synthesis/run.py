"""``nemo-viper synth``: one synthesis stage (or this worker's part of it) as a resumable job.

:func:`run_synthesis` lists the inputs, fingerprints the configuration, finds this worker's unfinished
chunks (:mod:`~nemo_viper.synthesis.chunks`), builds the policy and the diffusion pipeline only if there
is work, runs the stage batch by batch with a progress bar, commits every chunk atomically, and writes
the manifest when all chunks of the job are committed (by whichever worker finishes last).

Workers: this process is shard task ``shard_index`` of ``num_shards`` (e.g. a Slurm array task); under
``torchrun`` each data-parallel rank is a worker too (worker = shard_index x DP + DP rank, with
Megatron's rank order, tensor-parallel fastest). Tensor-parallel ranks of one policy run the same batches
together (generation is collective) and only their first rank writes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from nemo_viper.data.shards import DatasetError, ShardDataset
from nemo_viper.errors import ConfigError
from nemo_viper.prompts import SYNTH_PROMPT_VERSION
from nemo_viper.synthesis.chunks import Chunk, ChunkStats, ChunkStore, assigned_chunks, plan_chunks
from nemo_viper.synthesis.config import SynthConfig, config_hash, resolved_policy
from nemo_viper.synthesis.diffusion import ImageEditor, TextToImage
from nemo_viper.synthesis.inputs import fingerprint, list_inputs
from nemo_viper.synthesis.vlm import VLM, check_policy

log = logging.getLogger(__name__)


@dataclass
class Components:
    """The models a stage calls: the policy (always), the redraw pipeline (stage 1), the editor (stage 2)."""

    vlm: VLM
    painter: TextToImage | None = None
    editor: ImageEditor | None = None


@dataclass(frozen=True)
class Placement:
    """Which worker this process is, whether it writes (first tensor-parallel rank), and the world size."""

    worker: int
    num_workers: int
    writes: bool
    world_size: int

    @classmethod
    def from_env(cls, config: SynthConfig) -> "Placement":
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        tp = config.vlm.tensor_parallel
        if world % tp:
            raise ConfigError(f"vlm.tensor_parallel={tp} does not divide the world size {world}")
        dp_world, dp_rank = world // tp, rank // tp
        return cls(config.shard_index * dp_world + dp_rank, config.num_shards * dp_world, rank % tp == 0, world)


def build_components(config: SynthConfig) -> Components:
    """The Megatron policy and this stage's diffusers pipeline, from the configuration; with
    ``residency: alternate`` both wrapped so that only the one being called is on the GPU."""
    from nemo_viper.synthesis.diffusion import DiffusersEditor, DiffusersTextToImage
    from nemo_viper.synthesis.vlm import load_megatron_vlm

    tiny_root = Path(config.out) / "tiny_diffusion"
    pipeline = DiffusersTextToImage(config.redraw, tiny_root) if config.stage == 1 else DiffusersEditor(
        config.edit, tiny_root)
    if config.residency == "alternate" and not pipeline.config.cpu_offload:
        pipeline.pipe.to("cpu")  # before the policy arrives
    vlm = load_megatron_vlm(config.vlm, config.seed)
    if config.residency == "alternate":
        vlm, pipeline = alternate_residency(vlm, pipeline)
    if config.stage == 1:
        return Components(vlm, painter=pipeline)
    return Components(vlm, editor=pipeline)


def alternate_residency(vlm, pipeline):
    """``(vlm, pipeline)`` wrapped in one :class:`~nemo_viper.synthesis.residency.GpuResidency`, the policy
    resident; the pipeline's own model offload (``cpu_offload``) already keeps it off the GPU between calls."""
    from nemo_viper.synthesis.residency import GpuResidency, Resident, move_modules

    device = next(vlm.modules[0].parameters()).device
    residency = GpuResidency(device)
    residency.register("policy", move_modules(vlm.modules))
    residency.register("pipeline", (lambda _: None) if pipeline.config.cpu_offload else pipeline.pipe.to)
    residency.activate("policy")
    return Resident(vlm, residency, "policy"), Resident(pipeline, residency, "pipeline")


def run_synthesis(config: SynthConfig, components: Components | None = None) -> dict | None:
    """Run (or resume) this worker's part of the stage; returns the manifest if it was written now.

    ``components`` replaces the models built from the configuration (tests inject small deterministic ones).
    Raises :class:`~nemo_viper.errors.NemoViperError` subclasses for a bad policy path, inputs or
    configuration before any model is built.
    """
    check_policy(config.vlm)
    if config.stage == 1:
        items = list(enumerate(list_inputs(config.images)))
        input_fingerprint = fingerprint([item for _, item in items])
        stage1 = None
    else:
        stage1 = ShardDataset(config.stage1)
        if stage1.task != "caption_refine":
            raise ConfigError(f"stage 2 reads caption_refine data but {config.stage1} holds {stage1.task!r}")
        if len(stage1) == 0:
            raise DatasetError(f"stage-1 dataset {config.stage1} holds no samples")
        items = [(i, i) for i in range(len(stage1))]
        input_fingerprint = "+".join(s["sha256"][:16] for s in stage1.manifest["shards"])

    digest = config_hash(config, input_fingerprint)
    task = "caption_refine" if config.stage == 1 else "visual_op"
    store = ChunkStore(config.out, task, digest, config.samples_per_shard)
    store.check_config()
    chunks = plan_chunks(len(items), config.chunk_size)
    placement = Placement.from_env(config)
    pending = [c for c in assigned_chunks(chunks, placement.worker, placement.num_workers) if not store.is_done(c)]

    if pending or placement.world_size > 1:  # ranks of one torchrun job build the policy together
        components = components or build_components(config)
    if pending:
        stage = _build_stage(config, components, stage1)
        _run_chunks(config, stage, store, pending, items, placement.writes)
    if not placement.writes:
        return None
    extra = {
        "stage": config.stage,
        "config_hash": digest,
        "source_checkpoint": resolved_policy(config),
        "prompt_version": SYNTH_PROMPT_VERSION,
        "input": config.images if config.stage == 1 else str(Path(config.stage1).resolve()),
        "input_fingerprint": input_fingerprint,
        "config": {k: v for k, v in asdict(config).items() if k not in ("out", "shard_index", "num_shards")},
    }
    manifest = store.merge(chunks, extra)
    if manifest is None:
        done = sum(store.is_done(c) for c in chunks)
        log.warning("%d of %d chunks committed; the manifest is written when all are", done, len(chunks))
    return manifest


def _build_stage(config: SynthConfig, components: Components, stage1: ShardDataset | None):
    synth_ckpt = resolved_policy(config)
    if config.stage == 1:
        from nemo_viper.synthesis.stage1 import CaptionRefineStage

        return CaptionRefineStage(config, components.vlm, components.painter, synth_ckpt)
    from nemo_viper.synthesis.stage2 import VisualOpStage

    return VisualOpStage(config, components.vlm, components.editor, stage1, synth_ckpt)


def _run_chunks(config: SynthConfig, stage, store: ChunkStore, pending: list[Chunk], items: list, writes: bool) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn(f"synth stage {config.stage}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("kept {task.fields[kept]} · filtered {task.fields[filtered]} · skipped {task.fields[skipped]}"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )
    total = ChunkStats()
    with Progress(*columns, disable=not writes) as progress:
        bar = progress.add_task("items", total=sum(c.stop - c.start for c in pending), kept=0, filtered=0, skipped=0)
        for chunk in pending:
            writer = store.open(chunk) if writes else None
            stats = ChunkStats()
            for start in range(chunk.start, chunk.stop, config.batch_size):
                batch = items[start : min(start + config.batch_size, chunk.stop)]
                samples = stage.process(batch, stats)
                if writer is not None:
                    with stats.timed("write", len(samples)):
                        for sample in samples:
                            writer.write(sample.record, sample.images, recon_image=sample.recon)
                stats.written += len(samples)
                progress.update(bar, advance=len(batch), kept=total.written + stats.written,
                                filtered=sum(total.filtered.values()) + sum(stats.filtered.values()),
                                skipped=sum(total.skipped.values()) + sum(stats.skipped.values()))
            if writer is not None:
                store.commit(chunk, writer, stats)
            total += stats
