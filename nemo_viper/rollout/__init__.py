"""Rollout generation: the backend interface and the default Megatron backend (KV-cached, TP-aware).

Import the Megatron backend from :mod:`nemo_viper.rollout.megatron_backend` (it needs megatron-core);
this package's top level only carries the backend-independent interface and settings
(:mod:`~nemo_viper.rollout.config`, torch-free).
"""

from nemo_viper.lazy_exports import lazy_getattr

# Each public name -> the submodule defining it; loaded on first access (PEP 562), so that importing
# ``nemo_viper.rollout.config`` (the launcher) loads no torch.
_SOURCES = {
    "GenerationBackendConfig": "config",
    "SamplingParams": "config",
    "FinishReason": "interface",
    "GenerationBackend": "interface",
    "GenerationRequest": "interface",
    "GenerationResponse": "interface",
    "PromptTooLongError": "interface",
}

__all__ = sorted(_SOURCES)

__getattr__ = lazy_getattr(__name__, _SOURCES)
