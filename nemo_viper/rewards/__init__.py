"""The ViPER reward, framework-free: ``R = 0.05·R_format + 0.95·R_correct``.

- :mod:`~nemo_viper.rewards.format`: the ``<think>…</think><answer>…</answer>`` check and answer extraction;
- :mod:`~nemo_viper.rewards.sentences`: the sentence splitter shared by answers and ground truth;
- :mod:`~nemo_viper.rewards.config`: :class:`RewardConfig` (torch-free);
- :mod:`~nemo_viper.rewards.semantic`: embedding-based, length-weighted correctness and the batched
  :class:`ViperReward`.

Only torch (and sentence-transformers for the default embedder, imported when a model is loaded).
"""

from nemo_viper.lazy_exports import lazy_getattr

# Each public name -> the submodule defining it; loaded on first access (PEP 562), so that importing
# ``nemo_viper.rewards.config`` (the launcher) loads no torch.
_SOURCES = {
    "MODES": "config",
    "RewardConfig": "config",
    "packaged_minilm_path": "config",
    "ParsedResponse": "format",
    "parse_response": "format",
    "Embedder": "semantic",
    "GroundTruthCache": "semantic",
    "RewardBreakdown": "semantic",
    "SentenceTransformerEmbedder": "semantic",
    "ViperReward": "semantic",
    "split_sentences": "sentences",
}

__all__ = sorted(_SOURCES)

__getattr__ = lazy_getattr(__name__, _SOURCES)
