"""The ViPER reward, framework-free: ``R = 0.05·R_format + 0.95·R_correct``.

- :mod:`~nemo_viper.rewards.format`: the ``<think>…</think><answer>…</answer>`` check and answer extraction;
- :mod:`~nemo_viper.rewards.sentences`: the sentence splitter shared by answers and ground truth;
- :mod:`~nemo_viper.rewards.semantic`: embedding-based, length-weighted correctness and the batched
  :class:`ViperReward`.

Only torch (and sentence-transformers for the default embedder, imported when a model is loaded).
"""

from nemo_viper.rewards.format import ParsedResponse, parse_response
from nemo_viper.rewards.semantic import (
    MODES,
    Embedder,
    GroundTruthCache,
    RewardBreakdown,
    RewardConfig,
    SentenceTransformerEmbedder,
    ViperReward,
    packaged_minilm_path,
)
from nemo_viper.rewards.sentences import split_sentences

__all__ = [
    "MODES",
    "Embedder",
    "GroundTruthCache",
    "ParsedResponse",
    "RewardBreakdown",
    "RewardConfig",
    "SentenceTransformerEmbedder",
    "ViperReward",
    "packaged_minilm_path",
    "parse_response",
    "split_sentences",
]
