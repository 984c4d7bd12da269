"""Choosing a generation backend: one config and one factory for RL, synthesis and the held-out evaluation.

:class:`~nemo_viper.rollout.config.GenerationBackendConfig` is the run config's ``rollout`` section and
synthesis's ``vlm.generation``: ``backend`` names the engine, and each engine's own settings sit under its
name, as its config class names them (``megatron``: :class:`~nemo_viper.rollout.config.MegatronGenerationConfig`;
``vllm``: :class:`~nemo_viper.rollout.config.VLLMGenerationConfig`, vLLM's engine-argument names).
:func:`build_backend` builds the chosen one on a policy; the held-out evaluation of an RL stage scores
with the stage's generator.
"""

from __future__ import annotations

from dataclasses import replace

from nemo_viper.rollout.config import GenerationBackendConfig
from nemo_viper.rollout.interface import GenerationBackend
from nemo_viper.rollout.vllm_backend import require_vllm

def check_installed(config: GenerationBackendConfig, key: str) -> None:
    """Before any work: a one-line error naming ``key`` (the backend's config key) when the chosen engine's
    package is missing."""
    if config.backend == "vllm":
        require_vllm(key)


def build_backend(config: GenerationBackendConfig, policy, seed: int,
                  context_length: int | None = None) -> GenerationBackend:
    """The generation backend ``config.backend`` on ``policy`` (a built
    :class:`~nemo_viper.models.policy.MegatronPolicy`). ``seed``: the base of the seeds drawn for requests
    without one (the job's seed). ``context_length``: prompt + response tokens the job needs (from its
    budgets), the vLLM engine's ``max_model_len`` unless ``vllm.max_model_len`` is set; ``None``: the
    model's ``max_position_embeddings``. Collective under ``torchrun`` (every rank builds its engine)."""
    if config.backend == "vllm":
        from nemo_viper.rollout.vllm_backend import VLLMGenerationBackend

        settings = config.vllm
        if settings.max_model_len is None and context_length is not None:
            settings = replace(settings, max_model_len=context_length)
        return VLLMGenerationBackend(policy, settings, seed=seed)
    from nemo_viper.rollout.megatron_backend import MegatronGenerationBackend

    return MegatronGenerationBackend(policy, config.megatron, seed=seed)
