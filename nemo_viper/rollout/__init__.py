"""Rollout generation: the backend interface and the default Megatron backend (KV-cached, TP-aware).

Import the Megatron backend from :mod:`nemo_viper.rollout.megatron_backend` (it needs megatron-core);
this package's top level only carries the backend-independent interface.
"""

from nemo_viper.rollout.interface import (
    FinishReason,
    GenerationBackend,
    GenerationRequest,
    GenerationResponse,
    PromptTooLongError,
    SamplingParams,
)

__all__ = [
    "FinishReason",
    "GenerationBackend",
    "GenerationRequest",
    "GenerationResponse",
    "PromptTooLongError",
    "SamplingParams",
]
