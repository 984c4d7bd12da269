"""Typed records of the two synthesised tasks and their validation.

A record is what one sample's ``<key>.json`` holds inside a shard. :func:`parse_record` is the only way
from a JSON object to a record: it checks every field's presence, type and count and raises
:class:`RecordError` naming the field and the record id. ``to_dict`` is its inverse
(``parse_record(r.to_dict()) == r``).

Sequences are tuples (records are immutable values; lists given to a constructor are converted).
``images`` and ``recon_image`` hold entry names inside the sample (``"img0.png"``), which
:class:`~nemo_viper.data.shards.ShardWriter` assigns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from nemo_viper.errors import NemoViperError

SCHEMA_VERSION = 1
"""Version of the record schemas and the manifest layout; bump on any incompatible change."""

MAX_REFINEMENTS = 8
MAX_OPERATIONS = 3
MAX_HARD_ENTITIES = 3


class RecordError(NemoViperError):
    """A record that does not match its schema; the message names the record id and the field.

    ``reason`` is ``"missing"`` or ``"invalid"``; :attr:`skip_reason` is the counter key used when a
    reader skips the record (``"missing_field:refinements"``).
    """

    def __init__(self, record_id: str | None, field: str, reason: str, detail: str = ""):
        self.record_id = record_id
        self.field = field
        self.reason = reason
        shown_id = record_id if record_id is not None else "<no id>"
        message = f"record {shown_id!r}: {reason} field {field!r}"
        super().__init__(f"{message} ({detail})" if detail else message)

    @property
    def skip_reason(self) -> str:
        return f"{self.reason}_field:{self.field}"


@dataclass(frozen=True)
class CaptionRefineRecord:
    """Stage-1 sample: one image, the policy's caption and its corrections (the ground truth)."""

    task: ClassVar[str] = "caption_refine"
    num_images: ClassVar[int] = 1

    id: str
    images: tuple[str, ...]
    initial_caption: str
    refinements: tuple[str, ...]
    refined_caption: str
    source: str
    synth_ckpt: str
    recon_image: str | None = None

    def __post_init__(self) -> None:
        _freeze_sequences(self)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, **_json_fields(self)}


@dataclass(frozen=True)
class VisualOpRecord:
    """Stage-2 sample: the original and the edited image (original first) and the edit operations."""

    task: ClassVar[str] = "visual_op"
    num_images: ClassVar[int] = 2

    id: str
    images: tuple[str, ...]
    operations: tuple[str, ...]
    hard_entities: tuple[str, ...]
    source_caption: str
    edit_pipeline: str
    synth_ckpt: str

    def __post_init__(self) -> None:
        _freeze_sequences(self)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, **_json_fields(self)}


Record = CaptionRefineRecord | VisualOpRecord
RECORD_TYPES: dict[str, type[CaptionRefineRecord] | type[VisualOpRecord]] = {
    CaptionRefineRecord.task: CaptionRefineRecord,
    VisualOpRecord.task: VisualOpRecord,
}


def ground_truth(record: Record) -> list[str]:
    """The RL task's ground truth G: the refinements, or the operations."""
    if isinstance(record, CaptionRefineRecord):
        return list(record.refinements)
    return list(record.operations)


def parse_record(d: dict) -> Record:
    """Validate a JSON object and build its record; raises :class:`RecordError` on the first bad field.

    Required: ``task`` (a known task) and every field of that task's dataclass except ``recon_image``.
    Strings are non-empty except ``source`` and ``synth_ckpt``; ``images`` has exactly 1 (caption_refine)
    or 2 (visual_op) names; ``refinements`` 1–8, ``operations`` 1–3, ``hard_entities`` 1–3 non-empty
    strings. Unknown keys are invalid (the schema is versioned, see :data:`SCHEMA_VERSION`).
    """
    if not isinstance(d, dict):
        raise RecordError(None, "<record>", "invalid", f"expected a JSON object, got {type(d).__name__}")
    record_id = d.get("id") if isinstance(d.get("id"), str) else None
    check = _Checker(d, record_id)
    task = check.string("task")
    if task not in RECORD_TYPES:
        raise RecordError(record_id, "task", "invalid", f"unknown task {task!r}, expected {sorted(RECORD_TYPES)}")
    check.string("id")
    if task == CaptionRefineRecord.task:
        record: Record = CaptionRefineRecord(
            id=record_id,
            images=check.strings("images", CaptionRefineRecord.num_images, CaptionRefineRecord.num_images),
            initial_caption=check.string("initial_caption"),
            refinements=check.strings("refinements", 1, MAX_REFINEMENTS),
            refined_caption=check.string("refined_caption"),
            source=check.string("source", allow_empty=True),
            synth_ckpt=check.string("synth_ckpt", allow_empty=True),
            recon_image=check.optional_string("recon_image"),
        )
    else:
        record = VisualOpRecord(
            id=record_id,
            images=check.strings("images", VisualOpRecord.num_images, VisualOpRecord.num_images),
            operations=check.strings("operations", 1, MAX_OPERATIONS),
            hard_entities=check.strings("hard_entities", 1, MAX_HARD_ENTITIES),
            source_caption=check.string("source_caption"),
            edit_pipeline=check.string("edit_pipeline"),
            synth_ckpt=check.string("synth_ckpt", allow_empty=True),
        )
    unknown = sorted(set(d) - set(record.to_dict()))
    if unknown:
        raise RecordError(record_id, unknown[0], "invalid", "unknown field")
    return record


def _freeze_sequences(record: Record) -> None:
    for name, value in vars(record).items():
        if isinstance(value, list):
            object.__setattr__(record, name, tuple(value))


def _json_fields(record: Record) -> dict[str, Any]:
    return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(record).items()}


class _Checker:
    """Field accessors of one JSON object that raise :class:`RecordError` naming the field."""

    def __init__(self, d: dict, record_id: str | None):
        self.d = d
        self.record_id = record_id

    def _get(self, name: str) -> Any:
        if name not in self.d or self.d[name] is None:
            raise RecordError(self.record_id, name, "missing")
        return self.d[name]

    def string(self, name: str, allow_empty: bool = False) -> str:
        value = self._get(name)
        if not isinstance(value, str):
            raise RecordError(self.record_id, name, "invalid", f"expected a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise RecordError(self.record_id, name, "invalid", "empty string")
        return value

    def optional_string(self, name: str) -> str | None:
        return self.string(name) if self.d.get(name) is not None else None

    def strings(self, name: str, least: int, most: int) -> tuple[str, ...]:
        value = self._get(name)
        if not isinstance(value, list):
            raise RecordError(self.record_id, name, "invalid", f"expected a list, got {type(value).__name__}")
        if not least <= len(value) <= most:
            expected = f"{least}" if least == most else f"{least}..{most}"
            raise RecordError(self.record_id, name, "invalid", f"{len(value)} items, expected {expected}")
        for item in value:
            if not isinstance(item, str) or not item.strip():
                raise RecordError(self.record_id, name, "invalid", f"item {item!r} is not a non-empty string")
        return tuple(value)
