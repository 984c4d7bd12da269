"""Per-document agreement of two eval backends and the first cause of each disagreement (pure; no lmms-eval).

Given each backend's :class:`~nemo_viper.evaluation.backend_trace.Trace` and per-sample record
(``OUT/samples/<task>.jsonl``) of the same documents, :func:`compare_document` checks, in the order a
generation depends on them: the prompt token ids, the image grid and pixel values, the compute dtype, the
stop token ids and token budget, the repetition penalty, then the generated tokens. The first input that
differs is the cause. With equal inputs the generations part at the first position where the greedy tokens
differ, and each backend's log-probability margin there (its token's log-prob minus that of the token the
other backend chose; the gap to its k-th token when that one is not in its top k) says how close the choice
was: a near-tie is flipped by kernel rounding, not by a different input. Equal tokens with different text
are a detokenization difference.
"""

from __future__ import annotations

from dataclasses import dataclass

PIXEL_TOLERANCE = 1e-4  # normalised pixel values (unit ~ 1/255 / std): equal up to float rounding


@dataclass(frozen=True)
class DocumentAgreement:
    """One document under two backends (``a``, ``b``)."""

    doc_id: int
    answers_equal: bool
    verdicts_equal: bool
    cause: str  # "" when the generated tokens agree; otherwise the first difference found
    prompt_diff_at: int | None  # first differing prompt position (None: equal)
    pixel_max_abs_diff: float | None  # None: different grids or a missing image record
    diverge_at: int | None  # first differing generated position (None: equal tokens)
    margin_a: float | None  # a's log-prob of its token minus of b's token at diverge_at (None: unknown)
    margin_b: float | None  # the same in b's log-probs, for b's token over a's


def first_difference(a: list, b: list) -> int | None:
    """The first index where the sequences differ (the shorter length if one is a prefix), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def logprob_margin(top_logprobs: list[dict[int, float]], at: int, chosen: int, other: int) -> float | None:
    """``log p(chosen) - log p(other)`` at generated position ``at`` from vLLM's top-k log-probs; when
    ``other`` is not among them, the gap to the k-th (a lower bound on the margin)."""
    if at >= len(top_logprobs):
        return None
    position = top_logprobs[at]
    if chosen not in position:
        return None
    floor = position.get(other, min(position.values()))
    return position[chosen] - floor


def compare_document(doc_id: int, a, b, sample_a: dict, sample_b: dict) -> DocumentAgreement:
    """Agreement of trace ``a`` and trace ``b`` on one document (``sample_*``: its per-sample records)."""
    prompt_diff = first_difference(a.prompt_ids, b.prompt_ids)
    pixel_diff = None
    if a.pixel_values is not None and b.pixel_values is not None and a.image_grid_thw == b.image_grid_thw \
            and a.pixel_values.shape == b.pixel_values.shape:
        pixel_diff = float((a.pixel_values - b.pixel_values).abs().max())
    diverge = first_difference(a.generated_ids, b.generated_ids)
    margin_a = margin_b = None
    if diverge is not None and diverge < min(len(a.generated_ids), len(b.generated_ids)):
        token_a, token_b = a.generated_ids[diverge], b.generated_ids[diverge]
        margin_a = logprob_margin(a.top_logprobs, diverge, token_a, token_b)
        margin_b = logprob_margin(b.top_logprobs, diverge, token_b, token_a)
    if prompt_diff is not None:
        cause = "prompt"
    elif a.image_grid_thw != b.image_grid_thw:
        cause = "image size"
    elif pixel_diff is None or pixel_diff > PIXEL_TOLERANCE:
        cause = "image pixels"
    elif a.dtype != b.dtype:
        cause = "dtype"
    elif a.stop_ids != b.stop_ids or a.max_new_tokens != b.max_new_tokens:
        cause = "stopping settings"
    elif a.repetition_penalty != b.repetition_penalty:
        cause = "repetition penalty"
    elif diverge is None:
        cause = "" if sample_a["response"] == sample_b["response"] else "detokenization"
    elif diverge >= min(len(a.generated_ids), len(b.generated_ids)):
        cause = "stopping"
    else:
        cause = "numerics"
    return DocumentAgreement(doc_id, sample_a["response"] == sample_b["response"],
                             sample_a["score"] == sample_b["score"], cause, prompt_diff, pixel_diff, diverge, margin_a,
                             margin_b)
