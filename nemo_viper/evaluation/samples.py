"""Per-sample logs from lmms-eval's own sample logging, and the samples whose verdict changed.

lmms-eval (``log_samples=True``) returns, per (sub)task, one logged sample per document: the document
(without media), the prompt (``arguments[0]``), the raw and filtered responses and the per-document
metric values its task's ``process_results`` returned. :func:`sample_record` turns one into a flat record::

    {"task", "doc_id", "question_id", "prompt", "response", "extracted", "gold", "score"}

``extracted`` is the answer the scorer compared (from the per-document metric where the task logs it,
otherwise from lmms-eval's own extractor or filter) and ``score`` the document's 0/1 verdict. The harness
writes them to ``OUT/samples/<task>.jsonl`` (BLINK: all 14 subtasks in ``blink.jsonl``).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from nemo_viper.evaluation.benchmarks import BENCHMARKS

LETTERS = ["A", "B", "C", "D"]


def benchmark_of(subtask: str) -> str:
    """The benchmark an lmms-eval (sub)task belongs to (``blink_counting`` -> ``blink``)."""
    return next(task for task in BENCHMARKS if subtask == task or subtask.startswith(f"{task}_"))


def _mcq_letter(response: str) -> str | None:
    from lmms_eval.tasks._task_utils.mcq_extract import extract_mcq_answer

    return extract_mcq_answer(response, choices=LETTERS)


def _verdict(subtask: str, sample: dict, response: str) -> tuple[object, str, object, float]:
    """``(question id, gold, extracted answer, score)`` from one logged sample of ``subtask``."""
    task, doc = benchmark_of(subtask), sample["doc"]
    if task == "mmstar":  # its scorer: lmms-eval's MCQ letter extractor against the answer letter
        metric = sample["average"]
        return metric["question_id"], sample["target"], _mcq_letter(response), float(metric["score"])
    if task == "realworldqa":  # letters as MMStar; open answers compared as the lower-cased response
        gold = sample["target"]
        extracted = _mcq_letter(response) if gold.strip().upper() in LETTERS else sample["filtered_resps"][0]
        return sample["doc_id"], gold, extracted, float(sample["exact_match"])
    if task == "mmerealworld":
        metric = sample["mme_realworld_score"]
        return metric["question_id"], metric["answer"], metric["pred_answer"], float(
            metric["pred_answer"] == metric["answer"])
    if task == "blink":
        metric = sample["blink_acc"]
        return metric["id"], metric["gt_content"], metric["pred_parsed"], float(metric["is_correct"])
    if task == "mantis":
        metric = sample["mantis_score"]
        return metric["question_id"], metric["answer"], metric["pred_answer"], float(metric["correct"])
    if task == "hallusion_bench_image":  # lmms-eval's rule scorer (*_intern): "yes" anywhere -> "1"
        metric = sample["aAcc"]
        extracted = "1" if "yes" in metric["model_prediction"].lower() else "0"
        question = "/".join(str(metric[k]) for k in ("category", "subcategory", "set_id", "figure_id", "question_id"))
        return question, metric["gt_answer"], extracted, float(extracted == metric["gt_answer"])
    # crpe_relation: lmms-eval's flexible-extract filter, exact match against the correct option
    return doc.get("question_id", sample["doc_id"]), sample["target"], sample["filtered_resps"][0], float(
        sample["exact_match"])


def sample_record(subtask: str, sample: dict) -> dict:
    """The flat record of one lmms-eval logged sample (module docstring)."""
    response = sample["resps"][0]
    response = response[0] if isinstance(response, list) else response
    question_id, gold, extracted, score = _verdict(subtask, sample, response)
    return {"task": subtask, "doc_id": sample["doc_id"], "question_id": question_id, "prompt": sample["arguments"][0],
            "response": response, "extracted": extracted, "gold": gold, "score": score}


def samples_path(out: str | Path, task: str) -> Path:
    return Path(out) / "samples" / f"{task}.jsonl"


def write_samples(out: str | Path, task: str, logged: dict[str, list[dict]]) -> Path:
    """Write the records of ``task``'s (sub)tasks from lmms-eval's ``results["samples"]`` (atomically)."""
    path = samples_path(out, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [sample_record(subtask, sample) for subtask, samples in sorted(logged.items())
               if benchmark_of(subtask) == task for sample in sorted(samples, key=lambda s: s["doc_id"])]
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text("".join(json.dumps(record, default=str) + "\n" for record in records))
    os.replace(tmp, path)
    return path


def read_samples(out: str | Path, task: str) -> list[dict] | None:
    path = samples_path(out, task)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else None


def changed_verdicts(before: str | Path, after: str | Path) -> tuple[list[dict], list[str]]:
    """``(changes, tasks compared)``: the samples (matched by task and question id) whose score differs
    between two eval output dirs, over the tasks both logged; each change holds the question, the gold
    answer, and each side's response, extracted answer and score."""
    changes, compared = [], []
    for task in BENCHMARKS:
        old, new = read_samples(before, task), read_samples(after, task)
        if old is None or new is None:
            continue
        compared.append(task)
        new_by_id = {(r["task"], str(r["question_id"])): r for r in new}
        for record in old:
            other = new_by_id.get((record["task"], str(record["question_id"])))
            if other is not None and other["score"] != record["score"]:
                changes.append({"task": record["task"], "question_id": record["question_id"], "gold": record["gold"],
                                "prompt": record["prompt"],
                                "before": {k: record[k] for k in ("response", "extracted", "score")},
                                "after": {k: other[k] for k in ("response", "extracted", "score")}})
    return changes, compared
