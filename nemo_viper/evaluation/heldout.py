"""Held-out self-evaluation: a cheap learning signal that needs no benchmark data.

Each stage's synthesised dataset keeps a deterministic held-out split: the samples whose
``sha256(f"{seed}:{sample_id}")`` ranks lowest, ``count`` of them (or ``round(fraction x size)`` when
``count`` is 0), never more than all but one. The RL stage never trains on them; before its first step and
after its last, the policy answers their prompts and the ViPER reward scores the answers:

- ``greedy``: one greedy answer per prompt (mean reward, format, correctness, recall);
- ``sampled``: ``samples`` answers per prompt at the RL sampling temperature (mean over all of them).

Same prompts, same reward, same generation backend as the RL stage itself; only the data is unseen.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from nemo_viper.errors import ConfigError


@dataclass
class HeldoutConfig:
    """``count`` > 0 wins over ``fraction``; both 0 (the default) = no held-out split. ``samples`` = 0: the RL
    group size ``n``."""

    count: int = 0
    fraction: float = 0.0
    samples: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.count < 0:
            raise ConfigError(f"count={self.count} must be >= 0")
        if not 0.0 <= self.fraction < 1.0:
            raise ConfigError(f"fraction={self.fraction} must lie in [0, 1)")
        if self.samples < 0:
            raise ConfigError(f"samples={self.samples} must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.count > 0 or self.fraction > 0


def heldout_indices(sample_ids: Sequence[str], config: HeldoutConfig) -> list[int]:
    """Indices of the held-out samples among ``sample_ids`` (sorted); independent of their order."""
    size = len(sample_ids)
    wanted = config.count if config.count > 0 else round(config.fraction * size)
    wanted = max(0, min(wanted, size - 1))
    rank = sorted(range(size), key=lambda i: hashlib.sha256(f"{config.seed}:{sample_ids[i]}".encode()).hexdigest())
    return sorted(rank[:wanted])


def mean_breakdown(rewards: Sequence) -> dict[str, float]:
    """Mean total / format / correctness / recall of :class:`~nemo_viper.rewards.RewardBreakdown` s."""
    count = max(len(rewards), 1)
    return {key: sum(getattr(r, key) for r in rewards) / count for key in ("total", "format", "correctness", "recall")}


def score_prompts(generator, reward_model, processor, prompts: Sequence, sampling, samples: int, seed: int) -> dict:
    """Rewards of greedy answers (one per prompt) and of ``samples`` sampled answers per prompt.

    Returns ``{"greedy": [RewardBreakdown per prompt], "sampled": [... per answer], "greedy_answers": [text per
    prompt]}`` (lists, so data-parallel ranks can pool them before averaging).
    """
    from nemo_viper.rollout.interface import GenerationRequest

    out = {}
    for name, n, params in (("greedy", 1, replace(sampling, greedy=True)), ("sampled", samples, sampling)):
        requests = [GenerationRequest.from_chat(processor, p.messages, p.images, n,
                                                replace(params, seed=seed * 7919 + i)) for i, p in enumerate(prompts)]
        responses = generator.generate(requests) if requests else []
        texts = [s.text for group in responses for s in group]
        truths = [p.ground_truth for p in prompts for _ in range(n)]
        ids = [p.sample_id for p in prompts for _ in range(n)]
        truncated = [s.truncated for group in responses for s in group]
        out[name] = reward_model.score(texts, truths, ids, truncated) if texts else []
        out[f"{name}_answers"] = texts
    return out


def answer_examples(prompts: Sequence, scores: dict, count: int) -> list[dict]:
    """The first ``count`` prompts' greedy answers with their rewards and ground truth (what the report shows
    as "What the policy says"). ``scores``: :func:`score_prompts`' result for ``prompts``."""
    from nemo_viper.data.task_prompt import prompt_text

    return [{"sample_id": p.sample_id, "prompt": prompt_text(p.messages), "ground_truth": list(p.ground_truth),
             "answer": answer, "reward": r.total, "format": r.format, "correctness": r.correctness}
            for p, answer, r in zip(prompts[:count], scores["greedy_answers"], scores["greedy"])]


def summarise_scores(pooled: dict) -> dict:
    """``{"prompts": k, "greedy": means, "sampled": means}`` from pooled :func:`score_prompts` lists."""
    return {"prompts": len(pooled["greedy"]), "greedy": mean_breakdown(pooled["greedy"]),
            "sampled": mean_breakdown(pooled["sampled"])}


def read_record(path: str | Path) -> dict:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def write_record(path: str | Path, key: str, value: dict) -> None:
    """Set ``key`` (``before`` / ``after``) in the stage's ``heldout.json``, atomically."""
    record = read_record(path)
    record[key] = value
    write_json(path, record)


def write_json(path: str | Path, data: dict) -> None:
    """``data`` as ``path`` (JSON), atomically: a reader sees the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
