"""Self-evolution across rounds: the starting policy and every round's final policy on one fixed held-out set.

Each RL stage's held-out self-evaluation (:mod:`nemo_viper.evaluation.heldout`) scores that stage's own new
data, so it cannot say whether round 2's policy beats round 1's. One set serves the whole run instead: the
job that scores the starting policy (round 1's stage 1) chooses it, its own held-out split, and records it by
sample id with the dataset it comes from in ``run_dir/progress/heldout_set.json``. Every later job, and a
resumed one, reads that file, so every policy answers the same prompts, scored like the held-out split (greedy
and sampled ViPER reward, same reward and generation backend). A set is replaced only when the dataset it was
drawn from changed (its manifest's sha256): a rerun of round 1's synthesis.

Scores go to ``progress/<label>.json`` (``base``, ``round<r>``, as the benchmark results in ``eval/``), each
keyed to the checkpoint it scored (:func:`~nemo_viper.models.checkpoint_dir.policy_identity`) and to the set
(:attr:`FixedSet.digest`): a job skips a policy whose record carries both keys, so a rerun never recomputes a
finished round's score, and replaces a record of a superseded checkpoint or set.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nemo_viper.errors import NemoViperError
from nemo_viper.evaluation.heldout import read_record, write_json

SET_FILE = "heldout_set.json"
START_LABEL = "base"


def round_label(r: int) -> str:
    """The label of round ``r``'s final policy (as its benchmark results dir, ``eval/round<r>``)."""
    return f"round{r}"


@dataclass(frozen=True)
class FixedSet:
    """The run's fixed held-out set: ``sample_ids`` of the dataset ``data`` whose manifest hashes to
    ``manifest_sha256``."""

    data: str
    manifest_sha256: str
    sample_ids: tuple[str, ...]

    @classmethod
    def of_dataset(cls, data: str | Path, sample_ids: Sequence[str]) -> FixedSet:
        from nemo_viper.data.shards import MANIFEST_NAME

        manifest = Path(data) / MANIFEST_NAME
        return cls(str(Path(data).absolute()), hashlib.sha256(manifest.read_bytes()).hexdigest(), tuple(sample_ids))

    @property
    def digest(self) -> str:
        """What a score is keyed to: the dataset's manifest digest and the sample ids."""
        return hashlib.sha256(json.dumps([self.manifest_sha256, list(self.sample_ids)]).encode()).hexdigest()

    def indices(self, dataset_ids: Sequence[str]) -> list[int]:
        """The positions of the set's samples among ``dataset_ids`` (the dataset's sample ids, in order)."""
        position = {sample_id: i for i, sample_id in enumerate(dataset_ids)}
        missing = [s for s in self.sample_ids if s not in position]
        if missing:
            raise NemoViperError(f"the fixed held-out set names {len(missing)} samples that {self.data} does not "
                                 f"hold (e.g. {missing[0]!r}): the dataset changed after the set was chosen")
        return [position[s] for s in self.sample_ids]


def read_set(progress_dir: str | Path) -> FixedSet | None:
    record = read_record(Path(progress_dir) / SET_FILE)
    if not record:
        return None
    return FixedSet(record["data"], record["manifest_sha256"], tuple(record["sample_ids"]))


def choose_set(existing: FixedSet | None, candidate: FixedSet) -> FixedSet:
    """The run's set: ``existing`` when it was drawn from the dataset ``candidate`` comes from (same manifest),
    else ``candidate`` (the starting job's held-out split)."""
    if existing is not None and existing.manifest_sha256 == candidate.manifest_sha256:
        return existing
    return candidate


def write_set(progress_dir: str | Path, fixed: FixedSet) -> None:
    write_json(Path(progress_dir) / SET_FILE, {"data": fixed.data, "manifest_sha256": fixed.manifest_sha256,
                                               "sample_ids": list(fixed.sample_ids)})


def read_score(progress_dir: str | Path, label: str) -> dict:
    return read_record(Path(progress_dir) / f"{label}.json")


def is_scored(record: dict, policy_key: str, fixed: FixedSet) -> bool:
    """Whether ``record`` (:func:`read_score`) scored the checkpoint ``policy_key`` on ``fixed``."""
    return record.get("policy_key") == policy_key and record.get("set") == fixed.digest


def write_score(progress_dir: str | Path, label: str, policy: str, policy_key: str, fixed: FixedSet,
                summary: dict) -> None:
    """``summary`` (:func:`~nemo_viper.evaluation.heldout.summarise_scores`, pooled over ranks) of ``policy``
    on ``fixed`` as ``progress/<label>.json``, atomically."""
    write_json(Path(progress_dir) / f"{label}.json", {"label": label, "policy": str(Path(policy).absolute()),
                                                      "policy_key": policy_key, "set": fixed.digest,
                                                      "sample_ids": list(fixed.sample_ids), **summary})


def scores_across_rounds(progress_dir: str | Path, rounds: int) -> tuple[FixedSet | None, list[dict]]:
    """The run's set and the scores on it, starting policy first, then rounds 1..``rounds`` (those scored;
    records of an earlier set are left out)."""
    fixed = read_set(progress_dir)
    if fixed is None:
        return None, []
    labels = [START_LABEL] + [round_label(r) for r in range(1, rounds + 1)]
    records = [read_score(progress_dir, label) for label in labels]
    return fixed, [r for r in records if r.get("set") == fixed.digest]
