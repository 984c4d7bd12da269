"""The schema check of each benchmark's local copy, before any model loads.

lmms-eval reads a task's columns only while it builds prompts or scores answers, so a missing split,
column or an answer of another type fails after the model has loaded, or after all generation (a
``KeyError`` hours into a run), or scores silently wrong (HallusionBench's rule scorer compares
``gt_answer`` with the strings ``"0"``/``"1"``: an integer column scores 0.0). :func:`check_schemas`
opens the split of each local ``save_to_disk`` copy (memory-mapped; its Arrow files are checked structurally,
only the answer column is read) and raises one :class:`~nemo_viper.errors.ConfigError` line naming the task,
the directory, the file, split or column and the problem: each file (``dataset_dict.json``, the split's
``dataset_info.json``, ``state.json`` and Arrow files) present and readable, split present, non-empty, each of
:attr:`~nemo_viper.evaluation.benchmarks.Benchmark.columns` present with its kind, and every answer in :attr:`~nemo_viper.evaluation.benchmarks.Benchmark.answers`.
"""

from __future__ import annotations

import json
from pathlib import Path

from nemo_viper.errors import ConfigError
from nemo_viper.evaluation.benchmarks import BENCHMARKS, Benchmark, check_datasets, dataset_dirs


def feature_kind(feature) -> str:
    """``string``, ``int``, ``image``, ``list of <kind>``, or the feature's own dtype/type name."""
    import datasets

    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, datasets.Value):
        if feature.dtype in ("string", "large_string"):
            return "string"
        return "int" if feature.dtype.startswith(("int", "uint")) else feature.dtype
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        return f"list of {feature_kind(feature.feature)}"
    if isinstance(feature, list) and len(feature) == 1:
        return f"list of {feature_kind(feature[0])}"
    return type(feature).__name__


def copy_problem(benchmark: Benchmark, path: Path) -> str | None:
    """What is wrong with the local copy at ``path`` (``split …, column …: problem``), or None."""
    import datasets

    split = benchmark.split
    file = path / "dataset_dict.json"
    try:
        splits = json.loads(file.read_text())["splits"]
        if split in splits:
            file = path / split / "dataset_info.json"
            json.loads(file.read_text())
            file = path / split / "state.json"
            data_files = [path / split / entry["filename"] for entry in json.loads(file.read_text())["_data_files"]]
            for file in data_files:
                validate_arrow_file(file)
            file = path / split
            rows = datasets.load_from_disk(str(file)) if data_files else None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        detail = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        return f"{file.relative_to(path)} is missing or corrupt ({detail}): write the copy again"
    if split not in splits:
        return f"split {split!r} missing (found {splits})"
    if rows is None or rows.num_rows == 0:  # datasets cannot load a split saved without rows
        return f"split {split!r}: no rows"
    for column, kind in benchmark.columns.items():
        if column not in rows.features:
            return f"split {split!r}, column {column!r}: missing (columns: {', '.join(rows.column_names)})"
        found = feature_kind(rows.features[column])
        if found != kind:
            return f"split {split!r}, column {column!r}: {found}, expected {kind}"
    if benchmark.answers:
        column = benchmark.answer_column
        values = rows.select_columns([column])[column]
        bad = next(((row, value) for row, value in enumerate(values) if value not in benchmark.answers), None)
        if bad is not None:
            return (f"split {split!r}, column {column!r}: row {bad[0]} holds {bad[1]!r}, expected one of "
                    f"{', '.join(benchmark.answers)}")
    return None


def validate_arrow_file(file: Path) -> None:
    """Read the Arrow IPC stream ``file`` (how ``datasets`` saves a split; memory-mapped) and check every
    offset and length in it (``validate(full=True)``): a corrupt file raises ``ArrowInvalid`` here instead of
    crashing or reading garbage when a column is read. Raises ``OSError`` for a missing file."""
    import pyarrow as pa

    with pa.memory_map(str(file)) as source:
        pa.ipc.open_stream(source).read_all().validate(full=True)


def check_schemas(tasks: tuple[str, ...], root: str | Path) -> None:
    """Every local copy of ``tasks`` under ``root`` present and in its benchmark's schema, or one line."""
    check_datasets(tasks, root)
    for task in tasks:
        benchmark = BENCHMARKS[task]
        for path in dataset_dirs(benchmark, root).values():
            if problem := copy_problem(benchmark, path):
                raise ConfigError(f"eval task {task}: {path}: {problem}")
