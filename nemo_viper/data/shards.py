"""Webdataset tar shards + ``manifest.json``: the format synthesis writes and RL training reads.

Layout of a dataset directory (details in ``docs/data_format.md``)::

    manifest.json              schema version, task, shards [{name, samples, sha256}], total, extras
    <prefix>-000000.tar        per sample: <key>.json, <key>.img0.png [, <key>.img1.png] [, <key>.recon.png]
                               (``.jpg`` for images given as JPEG bytes)
    <prefix>-000001.tar        ...

Shards and the manifest are written under a temporary name and renamed when complete, so a reader never
sees a partial file under a final name. :class:`ShardDataset` indexes the shards once (tar member offsets)
and then reads one sample's record or images by index with a seek, never a whole shard.

Bad data on reading: a missing, truncated or unreadable shard or a checksum mismatch is a
:class:`DatasetError` naming the shard; a bad sample is skipped, counted in ``ShardDataset.skipped`` and
logged with shard and key. Images are checked in two places: the image header at index time (cheap; a
zero-byte, garbage or non-image entry is skipped as ``corrupt_image``) and the full decode at read time
(:meth:`ShardDataset.images` raises :class:`CorruptImageError`, which the prompt source skips and counts).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import BinaryIO, NamedTuple, Sequence

from PIL import Image

from nemo_viper.data.decoding import decode_rgb
from nemo_viper.data.records import (
    RECORD_TYPES,
    SCHEMA_VERSION,
    CaptionRefineRecord,
    Record,
    RecordError,
    parse_record,
)
from nemo_viper.errors import NemoViperError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
_MANIFEST_FIELDS = ("schema_version", "task", "shards", "total_samples")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# webdataset's rule: the key is the member path up to the first dot of its base name, the rest is the field.
_KEY_AND_FIELD = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class DatasetError(NemoViperError):
    """A missing or invalid manifest, or a missing, truncated, unreadable or corrupt shard (named)."""


class CorruptImageError(NemoViperError):
    """An image entry that does not decode; names the shard, the sample key and the entry."""

    def __init__(self, shard: str, key: str, entry: str, detail: str):
        self.shard = shard
        self.key = key
        super().__init__(f"corrupt image {entry!r} of sample {key!r} in shard {shard}: {detail}")


@dataclass(frozen=True)
class ShardInfo:
    """One manifest entry: the shard's file name, its sample count and the sha256 of its bytes."""

    name: str
    samples: int
    sha256: str


def write_manifest(out_dir: str | Path, task: str, shards: Sequence[ShardInfo], extra: dict | None = None) -> dict:
    """Write ``manifest.json`` atomically and return it.

    ``extra`` holds the caller's fields (config hash, source checkpoint, skipped/filtered counts by reason,
    timings, ...); it must be JSON-serialisable and must not redefine a layout field.
    """
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_MANIFEST_FIELDS))
    if clash:
        raise ValueError(f"manifest extras must not redefine {clash}")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "task": task,
        "shards": [asdict(s) for s in shards],
        "total_samples": sum(s.samples for s in shards),
        **extra,
    }
    path = Path(out_dir) / MANIFEST_NAME
    _write_atomically(path, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())
    return manifest


class ShardWriter:
    """Writes records and their images into tar shards of ``samples_per_shard`` samples each.

    Shard ``i`` is ``<out_dir>/<shard_prefix>-<i:06d>.tar``, written as ``<name>.partial`` and renamed when
    full or at :meth:`finalize`; ``shards`` lists the completed ones. Sample keys are
    ``<shard:06d>_<position:06d>``. A process killed mid-shard leaves only a ``.partial`` file (and no
    manifest). Not thread-safe.
    """

    def __init__(self, out_dir: str | Path, shard_prefix: str, samples_per_shard: int, *, task: str):
        if task not in RECORD_TYPES:
            raise ValueError(f"unknown task {task!r}, expected one of {sorted(RECORD_TYPES)}")
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if not shard_prefix or "/" in shard_prefix or os.sep in shard_prefix:
            raise ValueError(f"shard_prefix must be a non-empty file name prefix, got {shard_prefix!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_prefix = shard_prefix
        self.samples_per_shard = samples_per_shard
        self.task = task
        self.shards: list[ShardInfo] = []
        self._file: BinaryIO | None = None
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0
        self._finalized = False

    def write(
        self, record: Record, images: Sequence[Image.Image | bytes], recon_image: Image.Image | bytes | None = None
    ) -> Record:
        """Add one sample; returns the record as stored (``images`` / ``recon_image`` = entry names).

        ``images`` are PIL images (stored as RGB PNG) or encoded PNG/JPEG bytes (stored unchanged), in
        the record's order (visual_op: original first). ``recon_image`` (caption_refine only) is the
        optional debug redraw. The record is validated (:func:`parse_record`) before anything is written.
        """
        if self._finalized:
            raise RuntimeError("ShardWriter.write after finalize")
        if record.task != self.task:
            raise ValueError(f"record {record.id!r} has task {record.task!r}, this writer writes {self.task!r}")
        if len(images) != record.num_images:
            raise ValueError(
                f"record {record.id!r} ({record.task}) needs {record.num_images} images, got {len(images)}"
            )
        entries = [_encode_image(image, f"img{i}", record.id) for i, image in enumerate(images)]
        names = [name for name, _ in entries]
        if isinstance(record, CaptionRefineRecord):
            recon = _encode_image(recon_image, "recon", record.id) if recon_image is not None else None
            stored: Record = replace(record, images=names, recon_image=recon[0] if recon else None)
            entries += [recon] if recon else []
        elif recon_image is not None:
            raise ValueError(f"record {record.id!r}: recon_image is only part of caption_refine samples")
        else:
            stored = replace(record, images=names)
        parse_record(stored.to_dict())

        if self._tar is None:
            self._open_shard()
        key = f"{len(self.shards):06d}_{self._in_shard:06d}"
        _add_member(self._tar, f"{key}.json", json.dumps(stored.to_dict(), ensure_ascii=False).encode())
        for name, data in entries:
            _add_member(self._tar, f"{key}.{name}", data)
        self._in_shard += 1
        if self._in_shard == self.samples_per_shard:
            self._close_shard()
        return stored

    def finalize(self, extra: dict | None = None) -> dict:
        """Close the open shard (if it holds samples), write the manifest (see :func:`write_manifest`)."""
        if self._finalized:
            raise RuntimeError("ShardWriter.finalize called twice")
        if self._tar is not None:
            self._close_shard()
        self._finalized = True
        return write_manifest(self.out_dir, self.task, self.shards, extra)

    def _shard_path(self) -> Path:
        return self.out_dir / f"{self.shard_prefix}-{len(self.shards):06d}.tar"

    def _open_shard(self) -> None:
        self._file = open(_partial(self._shard_path()), "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w")
        self._in_shard = 0

    def _close_shard(self) -> None:
        path = self._shard_path()
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._tar = self._file = None
        digest = _sha256(_partial(path))
        os.replace(_partial(path), path)
        self.shards.append(ShardInfo(path.name, self._in_shard, digest))


class _Span(NamedTuple):
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class _Sample:
    shard: int
    key: str
    record: _Span
    images: tuple[_Span, ...]
    image_names: tuple[str, ...]


class ShardDataset:
    """Random access to a dataset directory written by :class:`ShardWriter` (or anything with its layout).

    Opening reads the manifest, checks every listed shard (presence; sha256 when ``verify_checksums``,
    which reads every byte once; tar structure) and indexes the valid samples: per sample the shard and
    the byte spans of its record and images. Samples are in manifest shard order, then tar order.
    """

    def __init__(self, directory: str | Path, *, verify_checksums: bool = True):
        self.directory = Path(directory)
        self.manifest = _read_manifest(self.directory / MANIFEST_NAME)
        self.task: str = self.manifest["task"]
        self.skipped: Counter[str] = Counter()
        self._shard_paths: list[Path] = []
        self._samples: list[_Sample] = []
        for entry in self.manifest["shards"]:
            self._index_shard(ShardInfo(**entry), verify_checksums)

    def __len__(self) -> int:
        return len(self._samples)

    def record(self, i: int) -> Record:
        """The record of sample ``i`` (validated at index time)."""
        sample = self._samples[i]
        (data,) = self._read(sample, (sample.record,))
        return parse_record(json.loads(data))

    def image_bytes(self, i: int) -> list[bytes]:
        """The encoded images of sample ``i``, in record order (for decoders other than PIL)."""
        sample = self._samples[i]
        return self._read(sample, sample.images)

    def images(self, i: int) -> list[Image.Image]:
        """The decoded RGB images of sample ``i`` (:func:`~nemo_viper.data.decoding.decode_rgb`); raises :class:`CorruptImageError` if one does not decode."""
        decoded = []
        for position, data in enumerate(self.image_bytes(i)):
            try:
                decoded.append(decode_rgb(data))
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                raise self.corrupt_image_error(i, position, str(e) or type(e).__name__) from e
        return decoded

    def corrupt_image_error(self, i: int, image: int, detail: str) -> CorruptImageError:
        """The error for image ``image`` (position in the record) of sample ``i``, naming shard, key and entry."""
        sample = self._samples[i]
        return CorruptImageError(self._shard_paths[sample.shard].name, sample.key, sample.image_names[image], detail)

    def _read(self, sample: _Sample, spans: Sequence[_Span]) -> list[bytes]:
        """Bytes of ``spans`` of ``sample``'s shard; a shard removed or cut short since indexing is a
        :class:`DatasetError` naming it."""
        path = self._shard_paths[sample.shard]
        try:
            with open(path, "rb") as f:
                chunks = [_read_span(f, span) for span in spans]
        except OSError as e:
            raise DatasetError(f"shard {path.name} cannot be read any more ({e}); was it changed after indexing?") from e
        if any(len(chunk) != span.size for chunk, span in zip(chunks, spans)):
            raise DatasetError(f"shard {path.name} ({path}) is truncated: sample {sample.key!r} ends past its end")
        return chunks

    def _index_shard(self, info: ShardInfo, verify_checksum: bool) -> None:
        path = self.directory / info.name
        if not path.is_file():
            raise DatasetError(f"shard {info.name} listed in {self.directory / MANIFEST_NAME} is missing ({path})")
        if verify_checksum:
            digest = _sha256(path)
            if digest != info.sha256:
                raise DatasetError(
                    f"shard {path} does not match its manifest checksum (sha256 {digest}, expected {info.sha256}); "
                    "it is corrupt, truncated or was rewritten"
                )
        size = path.stat().st_size
        try:
            with tarfile.open(path, "r:") as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                for m in members:
                    if m.offset_data + m.size > size:
                        raise DatasetError(f"shard {path} is truncated: member {m.name} ends past the end of the file")
                groups = _group_by_key(path, members)
                if len(groups) != info.samples:
                    raise DatasetError(
                        f"shard {path} is truncated or was rewritten: it holds {len(groups)} samples, "
                        f"its manifest entry says {info.samples}"
                    )
                shard_index = len(self._shard_paths)
                self._shard_paths.append(path)
                for key, fields in groups:
                    sample = self._index_sample(tar, shard_index, key, fields)
                    if isinstance(sample, str):
                        self.skipped[sample] += 1
                    else:
                        self._samples.append(sample)
        except (tarfile.TarError, EOFError) as e:
            raise DatasetError(f"shard {path} is truncated or unreadable: {e}") from e

    def _index_sample(
        self, tar: tarfile.TarFile, shard_index: int, key: str, fields: dict[str, tarfile.TarInfo]
    ) -> _Sample | str:
        """The sample's index entry, or the skip reason (after logging a warning with shard and key)."""
        shard = self._shard_paths[shard_index].name

        def skip(reason: str, detail: str) -> str:
            log.warning("skipping sample %r in shard %s: %s (%s)", key, shard, reason, detail)
            return reason

        if "json" not in fields:
            return skip("missing_record", f"no {key}.json entry")
        try:
            record = parse_record(json.loads(tar.extractfile(fields["json"]).read()))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return skip("invalid_json", str(e))
        except RecordError as e:
            return skip(e.skip_reason, str(e))
        if record.task != self.task:
            return skip("invalid_field:task", f"task {record.task!r} in a {self.task!r} dataset")
        spans = []
        for name in record.images:
            if name not in fields:
                return skip("missing_image", f"record {record.id!r} lists {name!r}, the shard has no {key}.{name}")
            try:
                with Image.open(tar.extractfile(fields[name])):
                    pass
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                return skip("corrupt_image", f"{key}.{name}: {e}")
            spans.append(_Span(fields[name].offset_data, fields[name].size))
        record_span = _Span(fields["json"].offset_data, fields["json"].size)
        return _Sample(shard_index, key, record_span, tuple(spans), tuple(record.images))


def read_manifest(directory: str | Path) -> dict:
    """The checked manifest of the dataset ``directory`` (shards are not opened); :class:`DatasetError` if invalid."""
    return _read_manifest(Path(directory) / MANIFEST_NAME)


def _read_manifest(path: Path) -> dict:
    """Load and check the manifest's layout fields; :class:`DatasetError` naming ``path`` otherwise."""
    if not path.is_file():
        raise DatasetError(f"dataset manifest {path} is missing (not a dataset directory, or synthesis did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"dataset manifest {path} is not valid JSON: {e}") from e

    def bad(what: str) -> DatasetError:
        return DatasetError(f"dataset manifest {path}: {what}")

    if not isinstance(manifest, dict):
        raise bad("expected a JSON object")
    missing = [f for f in _MANIFEST_FIELDS if f not in manifest]
    if missing:
        raise bad(f"missing field(s) {missing}")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise bad(f"schema version {manifest['schema_version']!r}, this reader reads version {SCHEMA_VERSION}")
    if manifest["task"] not in RECORD_TYPES:
        raise bad(f"unknown task {manifest['task']!r}, expected one of {sorted(RECORD_TYPES)}")
    shards = manifest["shards"]
    if not isinstance(shards, list):
        raise bad("'shards' must be a list")
    for entry in shards:
        valid = (
            isinstance(entry, dict)
            and set(entry) == {"name", "samples", "sha256"}
            and isinstance(entry["name"], str)
            and entry["name"] == Path(entry["name"]).name
            and isinstance(entry["samples"], int)
            and entry["samples"] >= 0
            and isinstance(entry["sha256"], str)
        )
        if not valid:
            raise bad(f"invalid shard entry {entry!r} (expected {{name: file name, samples: int, sha256: str}})")
    if manifest["total_samples"] != sum(entry["samples"] for entry in shards):
        raise bad(f"total_samples {manifest['total_samples']!r} is not the sum of the shards' samples")
    return manifest


def _group_by_key(path: Path, members: list[tarfile.TarInfo]) -> list[tuple[str, dict[str, tarfile.TarInfo]]]:
    """Consecutive members with the same key form one sample (webdataset's grouping). A key that comes back
    after another key, or a member name repeated within a sample, is a :class:`DatasetError` naming the shard
    ``path``, the key and both members (webdataset would make two samples of one key, or keep either entry)."""
    groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    first_member: dict[str, tarfile.TarInfo] = {}
    for member in members:
        match = _KEY_AND_FIELD.match(member.name)
        if match is None:
            continue
        key, field = match.groups()
        if not groups or groups[-1][0] != key:
            if key in first_member:
                _duplicate_key(path, key, first_member[key], member)
            first_member[key] = member
            groups.append((key, {}))
        if field in groups[-1][1]:
            _duplicate_key(path, key, groups[-1][1][field], member)
        groups[-1][1][field] = member
    return groups


def _duplicate_key(path: Path, key: str, first: tarfile.TarInfo, second: tarfile.TarInfo):
    raise DatasetError(f"shard {path}: sample key {key!r} occurs twice, members {first.name!r} (at byte "
                       f"{first.offset}) and {second.name!r} (at byte {second.offset})")


def _encode_image(image: Image.Image | bytes, stem: str, record_id: str) -> tuple[str, bytes]:
    """``(entry name, bytes)``: a PIL image becomes an RGB PNG; PNG or JPEG bytes are kept unchanged."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        (image if image.mode == "RGB" else image.convert("RGB")).save(buffer, format="PNG")
        return f"{stem}.png", buffer.getvalue()
    if image.startswith(_PNG_MAGIC):
        return f"{stem}.png", bytes(image)
    if image.startswith(_JPEG_MAGIC):
        return f"{stem}.jpg", bytes(image)
    raise ValueError(f"record {record_id!r}: image {stem!r} must be a PIL image or PNG/JPEG bytes")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def _read_span(f: BinaryIO, span: _Span) -> bytes:
    f.seek(span.offset)
    return f.read(span.size)


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = _partial(path)
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
