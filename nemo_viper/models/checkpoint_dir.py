"""The files of a policy checkpoint directory, checked without torch or Megatron: format, file manifest,
``latest`` pointer (layout: :mod:`nemo_viper.models.checkpoint`).

Every command that loads a checkpoint runs these checks first, so a missing, incomplete, foreign or tampered
checkpoint is refused with one line in about a second, before any heavy import or model build.

**Checkpoints are code.** Loading one unpickles parts of it (torch's distributed-checkpoint ``.metadata``,
non-tensor objects in the ``.distcp`` files): a crafted checkpoint runs arbitrary code. Load only checkpoints
you trust. ``nemo_viper_checkpoint.json`` lists the sha256 of every other file of the checkpoint
(``files``); loading refuses a checkpoint whose files differ from that list, or that has none, before
anything is unpickled, unless the user passes ``--trust-checkpoint``. The list detects changes made after
the checkpoint was written and checkpoints from elsewhere; it is no signature: whoever can rewrite the whole
directory can rewrite the list too (``docs/reliability.md``, trust boundaries).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from nemo_viper.errors import CheckpointError
from nemo_viper.models.hf_checkpoint import read_qwen25_vl_config

log = logging.getLogger(__name__)

FORMAT = "nemo_viper.policy/1"
METADATA_FILE = "nemo_viper_checkpoint.json"


def resolve_checkpoint(path: str | Path) -> Path:
    """A policy checkpoint dir as given, or the latest checkpoint of an RL run dir (:func:`latest_checkpoint`
    of ``checkpoints/``)."""
    path = Path(path)
    if not (path / METADATA_FILE).is_file() and (path / "checkpoints").is_dir():
        return latest_checkpoint(path / "checkpoints") or path
    return path


LATEST_POINTER = "latest"
STEP_DIR = re.compile(r"step_(\d+)")


def policy_paths(policy: str | Path) -> tuple[Path, Path | None]:
    """``(hf_dir, megatron_checkpoint or None)`` for a policy checkpoint, an RL run dir (its latest
    checkpoint) or an HF directory."""
    policy = resolve_checkpoint(policy)
    if (policy / METADATA_FILE).is_file():
        return policy / "hf", policy
    return policy, None


def policy_identity(policy: str | Path) -> str:
    """What a score of ``policy`` is keyed to, without reading its weights: for a policy checkpoint (or an RL
    run dir's latest) the sha256 of its metadata file, which lists the sha256 of every file; for a Hugging Face
    dir the sha256 of its files' relative paths, sizes and modification times."""
    policy = resolve_checkpoint(policy)
    if (policy / METADATA_FILE).is_file():
        return "checkpoint:" + hashlib.sha256((policy / METADATA_FILE).read_bytes()).hexdigest()
    listing = sorted((path.relative_to(policy).as_posix(), path.stat().st_size, path.stat().st_mtime_ns)
                     for path in policy.rglob("*") if path.is_file())
    return "hf-files:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint ``root/latest`` names, or, if it names no complete checkpoint (a missing directory, a
    torn or empty pointer), the newest complete ``root/step_N`` with a warning; ``None`` if there is none.

    Complete: renamed into place, so its metadata file (written last) is there."""
    root = Path(root)
    pointer = root / LATEST_POINTER
    named = pointer.read_text(errors="replace").strip() if pointer.is_file() else ""
    if STEP_DIR.fullmatch(named) and (root / named / METADATA_FILE).is_file():
        return root / named
    complete = [p for p in root.glob("step_*") if STEP_DIR.fullmatch(p.name) and (p / METADATA_FILE).is_file()]
    newest = max(complete, key=lambda p: int(STEP_DIR.fullmatch(p.name)[1]), default=None)
    if newest is not None:
        log.warning("%s names %r, which is not a complete checkpoint; using the newest complete one instead: %s",
                    pointer, named, newest)
    return newest


FILES_KEY = "files"
_trust_unverified = False
_verified: dict[Path, dict] = {}  # per process: checkpoint dir -> its checked metadata


def trust_unverified_checkpoints() -> None:
    """Load checkpoints whose files do not match (or have no) manifest: ``--trust-checkpoint``."""
    global _trust_unverified
    _trust_unverified = True


def forget_verified(ckpt_dir: str | Path) -> None:
    """Drop ``ckpt_dir`` from the per-process cache of checked checkpoints (it is being rewritten)."""
    _verified.pop(Path(ckpt_dir).resolve(), None)


def _checkpoint_files(ckpt_dir: Path) -> list[Path]:
    """Every file under ``ckpt_dir`` but the metadata file. A checkpoint this project writes holds no symbolic
    link, and a link would take its target out of the manifest's reach (a linked ``model/`` is not walked, a
    linked file can change after hashing), so one anywhere, ``ckpt_dir`` itself included, is refused."""
    if ckpt_dir.is_symlink():
        raise CheckpointError(f"{ckpt_dir} is a symbolic link (to {os.readlink(ckpt_dir)}); a checkpoint is "
                              "verified only as a real directory: give its own path, or pass --trust-checkpoint")
    files = []
    for parent, dirs, names in os.walk(ckpt_dir):
        for name in (*dirs, *names):
            path = Path(parent, name)
            if path.is_symlink():
                raise CheckpointError(
                    f"{ckpt_dir} contains a symbolic link, {path.relative_to(ckpt_dir)} -> {os.readlink(path)}: "
                    "its target is outside the file manifest; pass --trust-checkpoint only if you trust it")
        files += [Path(parent, name) for name in names if name != METADATA_FILE or Path(parent) != ckpt_dir]
    return sorted(files)


def file_hashes(ckpt_dir: Path) -> dict[str, str]:
    """sha256 of every file under ``ckpt_dir`` but the metadata file, by relative path (up to 8 threads);
    a symbolic link in it is a :class:`CheckpointError` (:func:`_checkpoint_files`)."""
    from concurrent.futures import ThreadPoolExecutor

    files = _checkpoint_files(ckpt_dir)

    def digest(path: Path) -> str:
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                sha.update(block)  # releases the GIL: files hash concurrently
        return sha.hexdigest()

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip((p.relative_to(ckpt_dir).as_posix() for p in files), pool.map(digest, files)))


def _check_manifest(ckpt: Path, metadata: dict) -> None:
    """Refuse a checkpoint that has no file manifest (not written by this project) or whose files differ from
    it (tampered, truncated, foreign files): loading it would unpickle its contents. ``--trust-checkpoint``
    skips this (:func:`trust_unverified_checkpoints`). Every rank checks for itself (no collective)."""
    if _trust_unverified:
        return
    expected = metadata.get(FILES_KEY)
    if not isinstance(expected, dict):
        raise CheckpointError(
            f"{ckpt} has no file manifest (not written by nemo_viper, or by an older version); loading a checkpoint "
            "can run code it contains: pass --trust-checkpoint only if you trust its origin"
        )
    found = file_hashes(ckpt)
    changed = sorted(set(expected) ^ set(found) | {name for name in expected if found.get(name) != expected[name]})
    if changed:
        raise CheckpointError(
            f"{ckpt} does not match its file manifest ({len(changed)} files differ, e.g. {changed[0]}): it was "
            "modified after it was written; loading a checkpoint can run code it contains: pass "
            "--trust-checkpoint only if you trust it"
        )


def read_checkpoint_metadata(ckpt_dir: str | Path) -> dict:
    """Metadata of a policy checkpoint whose files match its manifest (:func:`_check_manifest`; once per
    process and directory), or a one-line error naming what is missing or wrong. Every load calls this
    before unpickling anything."""
    ckpt = Path(ckpt_dir)
    if ckpt.resolve() in _verified:
        return _verified[ckpt.resolve()]
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt}")
    meta_file = ckpt / METADATA_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{ckpt} is not a nemo_viper policy checkpoint (no {METADATA_FILE})")
    try:
        metadata = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file} is not valid JSON ({e}): damaged checkpoint") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        metadata = metadata if isinstance(metadata, dict) else {}
        raise CheckpointError(f"{meta_file}: unsupported format {metadata.get('format')!r} (expected {FORMAT!r})")
    if not (ckpt / "model").is_dir():
        raise CheckpointError(f"{ckpt} has no model/ directory (incomplete checkpoint)")
    _check_manifest(ckpt, metadata)
    read_qwen25_vl_config(ckpt / "hf")
    _verified[ckpt.resolve()] = metadata
    return metadata


def _causes(error: BaseException):
    """``error``, its causes and contexts, and the per-rank failures of a torch ``CheckpointException``."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [current.__cause__, current.__context__]
        for failure in getattr(current, "failures", {}).values():  # rank -> (exception, stack summary)
            pending.append(failure[0] if isinstance(failure, tuple) else failure)


def out_of_space(error: BaseException, directory: str | Path, needed_bytes: int) -> bool:
    """Whether ``error``, raised while a checkpoint was written under ``directory``, means the disk is full:
    an ``OSError`` ENOSPC or EDQUOT anywhere in it, or fewer than ``needed_bytes`` free on the file system of
    ``directory`` (measured once the partial checkpoint is removed). The second case covers torch's stream
    writer, which reports a short write as ``unexpected pos A vs B`` and which megatron-core's writer wraps in
    a ``CheckpointException`` naming only a worker failure."""
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in _causes(error)):
        return True
    return free_bytes(directory) < needed_bytes


def free_bytes(directory: str | Path) -> int:
    """Free bytes on the file system of ``directory`` (or of its nearest existing parent)."""
    existing = next(p for p in (Path(directory), *Path(directory).parents) if p.exists())
    return shutil.disk_usage(existing).free


def no_space_error(directory: str | Path, needed_bytes: int) -> CheckpointError:
    """The one line for a checkpoint that did not fit (sizes in GB, three significant digits)."""
    return CheckpointError(f"no space left on {directory} (needs ~{needed_bytes / 1e9:.3g} GB, "
                           f"{free_bytes(directory) / 1e9:.3g} GB free): free space or write elsewhere, then resume")
