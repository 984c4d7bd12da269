"""An lmms-eval model whose answers are scripted from each document: right on even doc ids, wrong on odd
(or as ``right(doc_id)`` says).

It reads the gold answer from the document in the benchmark's own schema and answers it (or a wrong
option), so the expected score of every task is known exactly. It records each task's generation
settings, to check that every task decodes greedily.
"""

from __future__ import annotations

from lmms_eval.api.model import lmms

LETTERS = "ABCDE"


def _other_letter(letter: str, choices: int = 4) -> str:
    return LETTERS[(LETTERS.index(letter) + 1) % choices]


def gold_answer(task: str, doc: dict) -> tuple[str, str]:
    """(right response, wrong response) for a document of ``task`` (BLINK subtasks: ``blink_*``)."""
    if task == "hallusion_bench_image":
        return ("Yes.", "No.") if doc["gt_answer"] == "1" else ("No.", "Yes.")
    if task.startswith("blink"):
        letter = doc["answer"].strip("()")
        return letter, _other_letter(letter, len(doc["choices"]))
    if task == "mantis":
        letter = doc["answer"].strip("()")
        return letter, _other_letter(letter)
    letter = doc["correct_option"] if task == "crpe_relation" else doc["answer"]
    return letter, _other_letter(letter)


class ScriptedModel(lmms):
    def __init__(self, right=lambda doc_id: doc_id % 2 == 0):
        super().__init__()
        self.right = right
        self.generation_kwargs: dict[str, list[dict]] = {}

    def generate_until(self, requests) -> list[str]:
        out = []
        for request in requests:
            _context, gen_kwargs, _visual, doc_id, task, split = request.args
            self.generation_kwargs.setdefault(task, []).append(dict(gen_kwargs))
            right, wrong = gold_answer(task, self.task_dict[task][split][doc_id])
            out.append(right if self.right(doc_id) else wrong)
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError

    def generate_until_multi_round(self, requests):
        raise NotImplementedError


class UnusableModel(ScriptedModel):
    """Fails any generation: passed where a result must be reused, not recomputed."""

    def generate_until(self, requests) -> list[str]:
        raise AssertionError("a reusable task result was recomputed")
