"""What one rollout step hands to the trainer: P prompts x n responses, flattened to N = P*n rows."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from nemo_viper.models.batch import PolicyBatch


@dataclass
class RolloutBatch:
    """Sequences (prompt + response, right-padded, each row with its prompt's images) and their scores.

    ``group_index[i]`` is the prompt of row ``i`` (its GRPO group); ``sample_ids[i]`` names that prompt's
    data sample (used in error messages); ``truncated[i]`` marks a response cut at the length limit.
    ``reward_metrics`` carries batch means of the reward breakdown (format, correctness, recall, ...).
    ``sampler_logprobs`` [rows, columns] holds the generation backend's log-prob of each response token
    (0 elsewhere), for the sampler-vs-trainer mismatch metric and its correction; ``None`` if not kept.
    """

    sequences: PolicyBatch
    group_index: Tensor
    rewards: Tensor
    sample_ids: list[str]
    truncated: Tensor
    reward_metrics: dict[str, float] = field(default_factory=dict)
    sampler_logprobs: Tensor | None = None

    def __post_init__(self):
        rows = self.sequences.input_ids.shape[0]
        sizes = {
            "group_index": len(self.group_index),
            "rewards": len(self.rewards),
            "sample_ids": len(self.sample_ids),
            "truncated": len(self.truncated),
        }
        wrong = {name: size for name, size in sizes.items() if size != rows}
        if wrong:
            raise ValueError(f"rollout batch has {rows} sequences but " + ", ".join(f"{k}={v}" for k, v in wrong.items()))

    @property
    def response_lengths(self) -> Tensor:
        return self.sequences.response_mask.sum(dim=1)

    def select(self, rows: Tensor) -> RolloutBatch:
        """The rows ``rows`` (1-D index tensor), with their images."""
        return RolloutBatch(
            sequences=self.sequences.select(rows),
            group_index=self.group_index[rows],
            rewards=self.rewards[rows],
            sample_ids=[self.sample_ids[i] for i in rows.tolist()],
            truncated=self.truncated[rows],
            reward_metrics=self.reward_metrics,
            sampler_logprobs=None if self.sampler_logprobs is None else self.sampler_logprobs[rows],
        )
