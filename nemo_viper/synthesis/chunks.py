"""Distributed, resumable synthesis jobs: chunks of the input, atomic commits, and the final merge.

The input list (``N`` items, in input order) is cut into chunks of ``chunk_size`` items; chunk ``c`` is
done by worker ``c mod W`` (``W`` = shard tasks x data-parallel ranks), so Slurm array tasks and torchrun
ranks split the work without talking to each other. A chunk is the unit of atomicity:

1. its samples are written by a :class:`~nemo_viper.data.ShardWriter` into ``<out>/.staging/c<c>/``;
2. on completion its shards are renamed into ``<out>/`` (``<task>-c<c:06d>-<k:06d>.tar``) and then its
   marker ``<out>/chunks/c<c:06d>.json`` (shards with checksums, counts, timings, config hash) is written
   atomically. The marker is the commit: a chunk without one is redone from scratch on a rerun (its
   staging directory and any of its shards already renamed are removed first), a chunk with one is
   skipped. A process killed at any moment therefore loses at most its unfinished chunks, and a rerun
   neither loses nor duplicates a sample (nor leaves a temporary file of the killed attempt behind).
3. When every chunk has a marker, :meth:`ChunkStore.merge` writes ``manifest.json`` over all of them
   (shards in chunk order, counts summed), under a file lock so concurrent workers cannot interleave.

Markers of another configuration (a different config hash) make the store refuse to run.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter

from nemo_viper.data.shards import ShardInfo, ShardWriter, write_manifest
from nemo_viper.errors import ConfigError
from nemo_viper.runtime.locks import hold


@dataclass(frozen=True)
class Chunk:
    """Items ``start .. stop - 1`` of the input list."""

    index: int
    start: int
    stop: int


def plan_chunks(num_items: int, chunk_size: int) -> list[Chunk]:
    return [Chunk(i, start, min(start + chunk_size, num_items))
            for i, start in enumerate(range(0, num_items, chunk_size))]


def assigned_chunks(chunks: list[Chunk], worker: int, num_workers: int) -> list[Chunk]:
    """The chunks of worker ``worker`` of ``num_workers`` (round robin)."""
    return [c for c in chunks if c.index % num_workers == worker]


@dataclass
class ChunkStats:
    """What happened to a chunk's items: ``inputs`` = ``written`` + skipped + filtered (by reason), item-level
    drops of the parsers (``dropped_items``), seconds per sub-step (``timings``) and how many samples went
    through each sub-step (``step_samples``; samples leave at the first step whose output is unusable)."""

    inputs: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)
    dropped_items: Counter = field(default_factory=Counter)
    timings: Counter = field(default_factory=Counter)
    step_samples: Counter = field(default_factory=Counter)

    @contextmanager
    def timed(self, step: str, samples: int):
        """Add the block's duration to ``timings[step]`` and ``samples`` to ``step_samples[step]``."""
        self.step_samples[step] += samples
        start = perf_counter()
        try:
            yield
        finally:
            self.timings[step] += perf_counter() - start

    def to_dict(self) -> dict:
        return {
            "inputs": self.inputs,
            "written": self.written,
            "skipped": dict(sorted(self.skipped.items())),
            "filtered": dict(sorted(self.filtered.items())),
            "dropped_items": dict(sorted(self.dropped_items.items())),
            "timings_s": {k: round(v, 6) for k, v in sorted(self.timings.items())},
            "step_samples": dict(sorted(self.step_samples.items())),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ChunkStats":
        return cls(d["inputs"], d["written"], Counter(d["skipped"]), Counter(d["filtered"]),
                   Counter(d["dropped_items"]), Counter(d["timings_s"]), Counter(d["step_samples"]))

    def __iadd__(self, other: "ChunkStats") -> "ChunkStats":
        self.inputs += other.inputs
        self.written += other.written
        for mine, theirs in ((self.skipped, other.skipped), (self.filtered, other.filtered),
                             (self.dropped_items, other.dropped_items), (self.timings, other.timings),
                             (self.step_samples, other.step_samples)):
            mine.update(theirs)
        return self


class ChunkStore:
    """The chunk markers, staging and merge of one output directory (see the module docstring)."""

    def __init__(self, out: str | Path, task: str, config_hash: str, samples_per_shard: int):
        self.out = Path(out)
        self.task = task
        self.config_hash = config_hash
        self.samples_per_shard = samples_per_shard
        self.markers = self.out / "chunks"
        self.staging = self.out / ".staging"
        self.markers.mkdir(parents=True, exist_ok=True)

    def check_config(self) -> None:
        """Refuse an output directory holding chunks of another configuration."""
        for path in sorted(self.markers.glob("c*.json")):
            found = json.loads(path.read_text())["config_hash"]
            if found != self.config_hash:
                raise ConfigError(
                    f"{self.out} holds chunks of another synthesis configuration (config hash {found}, this run "
                    f"{self.config_hash}); use a new --out or the same configuration and inputs"
                )

    def _marker(self, chunk: Chunk) -> Path:
        return self.markers / f"c{chunk.index:06d}.json"

    def _prefix(self, chunk: Chunk) -> str:
        return f"{self.task}-c{chunk.index:06d}"

    def is_done(self, chunk: Chunk) -> bool:
        return self._marker(chunk).is_file()

    def open(self, chunk: Chunk) -> ShardWriter:
        """A fresh writer for ``chunk``, after removing what an interrupted attempt left behind."""
        staging = self.staging / f"c{chunk.index:06d}"
        shutil.rmtree(staging, ignore_errors=True)
        for stale in (*self.out.glob(f"{self._prefix(chunk)}-*.tar"),
                      *self.markers.glob(f".{self._marker(chunk).name}.*.partial")):  # (_write_json_atomically)
            stale.unlink()
        return ShardWriter(staging, self._prefix(chunk), self.samples_per_shard, task=self.task)

    def commit(self, chunk: Chunk, writer: ShardWriter, stats: ChunkStats) -> None:
        """Close the chunk's last shard, move its shards into the dataset, then write its marker."""
        staged = writer.finalize()  # the chunk's own manifest, inside its staging directory
        for shard in staged["shards"]:
            os.replace(writer.out_dir / shard["name"], self.out / shard["name"])
        marker = {"chunk": chunk.index, "start": chunk.start, "stop": chunk.stop, "config_hash": self.config_hash,
                  "shards": staged["shards"], "stats": stats.to_dict()}
        _write_json_atomically(self._marker(chunk), marker)
        shutil.rmtree(writer.out_dir, ignore_errors=True)

    def merge(self, chunks: list[Chunk], extra: dict) -> dict | None:
        """Write ``manifest.json`` over all chunks if every one is committed; returns it, else ``None``.

        The manifest's extras: ``extra`` plus ``chunks`` (count), ``inputs``, ``written``, ``skipped``,
        ``filtered``, ``dropped_items``, ``timings_s`` and ``step_samples`` summed over the chunks.
        """
        with hold(self.out / ".merge.lock", wait=True):
            if not all(self.is_done(c) for c in chunks):
                return None
            shards, total = [], ChunkStats()
            for chunk in chunks:
                marker = json.loads(self._marker(chunk).read_text())
                shards += [ShardInfo(**s) for s in marker["shards"]]
                total += ChunkStats.from_dict(marker["stats"])
            shutil.rmtree(self.staging, ignore_errors=True)
            return write_manifest(self.out, self.task, shards, {**extra, "chunks": len(chunks), **total.to_dict()})


def _write_json_atomically(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(temporary, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
