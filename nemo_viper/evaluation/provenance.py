"""What produced a task result: content digests of the model and the task's data, and the run key.

A task result is reused only when its :func:`run_key` equals the current one: the SHA-256 of the model's
files (not its path), the backend, the decoding settings, ``limit``, the SHA-256 of the task's local data
files and the lmms-eval version. A tree's digest is the SHA-256 of ``"<relative path>\\t<file sha256>\\n"``
over its files in sorted order (dot-files left out: caches and stamps, not content). File digests are cached
per ``(path, size, mtime_ns)`` in a JSON file, so a rerun over tens of GB of weights and images re-reads
only files that changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path


class DigestCache:
    """File SHA-256 digests keyed by ``(resolved path, size, mtime_ns)``, persisted in ``path`` (JSON)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.entries: dict[str, list] = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.entries = {}
        self.changed = False

    def file_digest(self, file: Path) -> str:
        stat = file.stat()
        name = str(file.resolve())
        stamp = [stat.st_size, stat.st_mtime_ns]
        cached = self.entries.get(name)
        if cached and cached[:2] == stamp:
            return cached[2]
        with open(file, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        self.entries[name] = [*stamp, digest]
        self.changed = True
        return digest

    def tree_digest(self, root: str | Path) -> str:
        """SHA-256 over ``root``'s files (a single file: that file's digest)."""
        root = Path(root)
        if root.is_file():
            return self.file_digest(root)
        lines = []
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            relative = file.relative_to(root)
            if not any(part.startswith(".") for part in relative.parts):
                lines.append(f"{relative.as_posix()}\t{self.file_digest(file)}\n")
        return hashlib.sha256("".join(lines).encode()).hexdigest()

    def save(self) -> None:
        """Write the cache atomically (concurrent shard jobs: the last writer wins, a lost entry is re-read)."""
        if not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(self.entries))
        os.replace(tmp, self.path)
        self.changed = False


def dataset_digest(cache: DigestCache, dirs: dict[str, Path]) -> str:
    """SHA-256 over the (sub)task names and the digests of their local ``save_to_disk`` directories."""
    return hashlib.sha256("".join(f"{name}\t{cache.tree_digest(path)}\n"
                                  for name, path in sorted(dirs.items())).encode()).hexdigest()


def run_key(*, model_sha256: str, backend: str, generation: dict, limit: int | None, dataset_sha256: str,
            lmms_eval_version: str) -> dict:
    """The fields a task result must match to be reused (stored with it and in ``results.json``)."""
    return {"model_sha256": model_sha256, "backend": backend, "generation": generation, "limit": limit,
            "dataset_sha256": dataset_sha256, "lmms_eval_version": lmms_eval_version}


def key_differences(stored: dict | None, current: dict) -> list[str]:
    """The names of the key fields in which ``stored`` differs from ``current`` (all of them if none stored)."""
    if not stored:
        return list(current)
    return [name for name, value in current.items() if json.loads(json.dumps(stored.get(name))) !=
            json.loads(json.dumps(value))]
