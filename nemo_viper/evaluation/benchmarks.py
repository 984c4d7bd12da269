"""The paper's seven benchmarks as lmms-eval tasks read from local dataset copies.

Each :class:`Benchmark` names the lmms-eval task, where its local copy lives under the dataset root, the
split the task reads, and which lmms-eval metric is the benchmark's score. :func:`write_task_overrides`
writes one lmms-eval task YAML per (sub)task into an ``--include_path`` directory: it ``include``\\ s the
installed lmms-eval task YAML (prompts, parsers and metrics stay lmms-eval's) and replaces only

- ``dataset_path`` with the local copy and ``dataset_kwargs`` with ``load_from_disk: true`` (never a hub);
- the scorer where lmms-eval's default calls an external judge: HallusionBench's GPT-4 aggregation is
  replaced by lmms-eval's own rule-based yes/no aggregation (``*_intern``);
- the generation settings where a task samples: Mantis-Eval's ``temperature: 0.2, do_sample: true``
  becomes greedy (temperature 0), so every task decodes greedily;
- a generation budget where the task states none (MMStar: 128, lmms-eval qwen2_5_vl's default), so every
  backend decodes the same number of tokens (lmms-eval's vllm model has no per-task default).

Local layout (``datasets.DatasetDict.save_to_disk`` of the hub dataset, see docs/evaluation.md)::

    ROOT/mmstar/  ROOT/realworldqa/  ROOT/mmerealworld/  ROOT/mantis/  ROOT/hallusion_bench_image/
    ROOT/crpe_relation/  ROOT/blink/<Subtask>/   (the 14 BLINK configs, e.g. ROOT/blink/Counting/)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nemo_viper.errors import ConfigError

GREEDY = {"temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False}

BLINK_SUBTASKS = (
    "Art_Style", "Counting", "Forensic_Detection", "Functional_Correspondence", "IQ_Test", "Jigsaw",
    "Multi-view_Reasoning", "Object_Localization", "Relative_Depth", "Relative_Reflectance",
    "Semantic_Correspondence", "Spatial_Relation", "Visual_Correspondence", "Visual_Similarity",
)

MMSTAR_DOMAINS = (
    "coarse perception", "fine-grained perception", "instance reasoning", "logical reasoning",
    "science & technology", "math",
)


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: lmms-eval ``task`` (a group for BLINK), its YAML, split, local dir and score metric(s).

    ``score_metrics``: the lmms-eval metric(s) whose mean is the benchmark's score; ``scale`` turns it into
    percent. ``notes``: what differs from lmms-eval's default task (shown with the results). ``columns``: the
    columns lmms-eval's task reads and their kind (``string``, ``int``, ``image``, ``list of string``,
    ``list of image``; checked by :mod:`~nemo_viper.evaluation.schema` before any model loads);
    ``answers``: the values its answer column may hold (empty: any).
    """

    task: str
    title: str
    lmms_yaml: str  # relative to lmms_eval/tasks
    split: str
    score_metrics: tuple[str, ...]
    columns: dict[str, str]
    answer_column: str = "answer"
    answers: tuple[str, ...] = ()
    scale: float = 100.0
    overrides: dict = field(default_factory=dict)
    notes: str = ""

    def local_dir(self, root: str | Path) -> Path:
        return Path(root) / self.task


HB_RULES = "lmms_eval.tasks.hallusion_bench.evaluate_hb"

BENCHMARKS: dict[str, Benchmark] = {b.task: b for b in (
    Benchmark("mmstar", "MMStar", "mmstar/mmstar.yaml", "val", ("average",),  # states no budget: qwen2_5_vl's 128
              columns={"index": "int", "question": "string", "image": "image", "answer": "string",
                       "category": "string", "l2_category": "string"},
              answers=tuple("ABCD"),
              overrides={"generation_kwargs": {"max_new_tokens": 128, **GREEDY}}),
    Benchmark("realworldqa", "RealWorldQA", "realworldqa/realworldqa.yaml", "test", ("exact_match",),
              columns={"image": "image", "question": "string", "answer": "string"}),  # letters, numbers, words
    Benchmark("mmerealworld", "MME-RealWorld (en)", "mme_realworld/mme_realworld.yaml", "train",
              ("mme_realworld_score",),
              columns={"index": "int", "question": "string", "multi-choice options": "list of string",
                       "answer": "string", "bytes": "string", "category": "string", "l2-category": "string"},
              answers=tuple("ABCDE")),
    Benchmark("blink", "BLINK", "blink/blink.yaml", "val", ("blink_acc",),
              columns={"idx": "string", "question": "string", "sub_task": "string", "image_1": "image",
                       "choices": "list of string", "answer": "string", "prompt": "string"},
              answers=tuple(f"({letter})" for letter in "ABCDE")),
    Benchmark("mantis", "Mantis-Eval", "mantis/mantis.yaml", "test", ("mantis_score",),
              columns={"id": "string", "question_type": "string", "question": "string", "images": "list of image",
                       "options": "list of string", "answer": "string"},
              overrides={"generation_kwargs": {"max_new_tokens": 64, **GREEDY}},
              notes="greedy decoding (lmms-eval samples at temperature 0.2)"),
    Benchmark("hallusion_bench_image", "HallusionBench", "hallusion_bench/hallusion_bench_image.yaml", "image",
              ("aAcc", "fAcc", "qAcc"),
              columns={"category": "string", "subcategory": "string", "set_id": "string", "figure_id": "string",
                       "question_id": "string", "question": "string", "gt_answer_details": "string",
                       "gt_answer": "string", "image": "image"},
              answer_column="gt_answer", answers=("0", "1"),  # the rule scorer compares with the strings "0"/"1"
              overrides={"metric_list": [
                  {"metric": m, "aggregation": f"!function {HB_RULES}.hb_aggregation_result_{m}_intern",
                   "higher_is_better": True} for m in ("aAcc", "fAcc", "qAcc")]},
              notes="rule-based yes/no scorer (lmms-eval's *_intern aggregation) instead of the GPT-4 judge; "
                    "score = mean of aAcc, fAcc, qAcc"),
    Benchmark("crpe_relation", "CRPE (relation)", "crpe_relation/crpe_relation.yaml", "test", ("exact_match",),
              columns={"text": "string", "image": "image", "correct_option": "string"},
              answer_column="correct_option", answers=tuple("ABCD")),
)}

TASKS = tuple(BENCHMARKS)


def parse_tasks(tasks: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """``"mmstar,blink"`` / a list / None (all seven) -> task names, checked against :data:`BENCHMARKS`."""
    if tasks is None or tasks == "all":
        return TASKS
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    unknown = [t for t in names if t not in BENCHMARKS]
    if unknown or not names:
        raise ConfigError(f"tasks={','.join(names)!r}: unknown {unknown or 'empty'}; choose from {','.join(TASKS)}")
    return tuple(names)


def dataset_dirs(benchmark: Benchmark, root: str | Path) -> dict[str, Path]:
    """lmms-eval (sub)task name -> the local ``save_to_disk`` directory it reads."""
    base = benchmark.local_dir(root)
    if benchmark.task == "blink":
        return {f"blink_{name.lower().replace('-', '_')}": base / name for name in BLINK_SUBTASKS}
    return {benchmark.task: base}


def check_datasets(tasks: tuple[str, ...], root: str | Path) -> None:
    """One-line error naming the task and the expected path for the first missing local dataset (cheap: no
    dataset is opened; :func:`nemo_viper.evaluation.schema.check_schemas` checks their contents)."""
    for task in tasks:
        for subtask, path in dataset_dirs(BENCHMARKS[task], root).items():
            if not (path / "dataset_dict.json").is_file():
                raise ConfigError(
                    f"eval task {task}: no local dataset at {path} (expected a datasets.save_to_disk directory "
                    f"with split {BENCHMARKS[task].split!r}; see docs/evaluation.md)")


def lmms_tasks_dir() -> Path:
    import lmms_eval.tasks

    return Path(lmms_eval.tasks.__file__).parent


class _FunctionTag(str):
    """A string YAML writes as ``!function module.name`` (lmms-eval's tag for a Python callable)."""


yaml.SafeDumper.add_representer(_FunctionTag, lambda d, v: d.represent_scalar("!function", str(v)))


def _tagged(value):
    if isinstance(value, str) and value.startswith("!function "):
        return _FunctionTag(value.removeprefix("!function "))
    if isinstance(value, dict):
        return {k: _tagged(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_tagged(v) for v in value]
    return value


def write_task_overrides(tasks: tuple[str, ...], root: str | Path, out_dir: str | Path) -> Path:
    """Write the include-path YAMLs for ``tasks`` reading local copies under ``root``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lmms = lmms_tasks_dir()
    for task in tasks:
        benchmark = BENCHMARKS[task]
        for subtask, path in dataset_dirs(benchmark, root).items():
            source = lmms / (benchmark.lmms_yaml if subtask == task else f"blink/{subtask}.yaml")
            config = {"include": str(source), "task": subtask, "dataset_path": str(Path(path).resolve()),
                      "dataset_kwargs": {"load_from_disk": True}, **_tagged(benchmark.overrides)}
            (out_dir / f"{subtask}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        if task == "blink":
            group = {"group": "blink", "task": sorted(dataset_dirs(benchmark, root)),
                     "aggregate_metric_list": [{"metric": "blink_acc", "weight_by_size": True}]}
            (out_dir / "blink.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    return out_dir
