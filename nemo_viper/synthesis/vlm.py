"""The policy as the synthesis VLM: chat prompts in, answer texts out, one batched ``generate`` per call.

:class:`VLM` turns chat prompts (messages + images) into :class:`~nemo_viper.rollout.GenerationRequest`
objects with the policy's processor and hands them to any
:class:`~nemo_viper.rollout.GenerationBackend` in one call; :func:`load_megatron_vlm` builds it on the
Megatron policy from a checkpoint given on the command line (the current checkpoint makes the
next round's data), generating on the backend ``vlm.generation`` chooses
(:func:`~nemo_viper.rollout.backends.build_backend`: the Megatron backend or a vLLM engine).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from PIL import Image

from nemo_viper.data.decoding import fit_pixels
from nemo_viper.rollout.interface import GenerationBackend, GenerationRequest, SamplingParams
from nemo_viper.synthesis.config import VLMConfig


@dataclass(frozen=True)
class ChatPrompt:
    """Chat messages (one ``{"type": "image"}`` part per image) and their images, in order."""

    messages: list[dict]
    images: tuple[Image.Image, ...] = ()


class VLM:
    """Chat completion on a generation backend.

    ``complete(prompts, max_new_tokens, seeds)`` returns one answer text per prompt. With
    ``config.temperature == 0`` answers are greedy; otherwise each prompt samples with its own seed
    (``seeds[i]``), so an answer does not depend on which other prompts share the batch.
    """

    def __init__(self, backend: GenerationBackend, processor, config: VLMConfig, modules: Sequence = ()):
        self.backend = backend
        self.processor = processor
        self.config = config
        self.modules = list(modules)  # the torch modules holding the policy's weights (GPU residency)

    def complete(self, prompts: Sequence[ChatPrompt], max_new_tokens: int, seeds: Sequence[int]) -> list[str]:
        if not prompts:
            return []
        greedy = self.config.temperature == 0
        base = SamplingParams(
            temperature=1.0 if greedy else self.config.temperature,
            top_p=self.config.top_p,
            greedy=greedy,
            max_new_tokens=max_new_tokens,
        )
        requests = [
            GenerationRequest.from_chat(
                self.processor,
                prompt.messages,
                [fit_pixels(image, self.config.max_pixels) for image in prompt.images],
                sampling=replace(base, seed=seed),
            )
            for prompt, seed in zip(prompts, seeds, strict=True)
        ]
        return [samples[0].text for samples in self.backend.generate(requests)]


def check_policy(config: VLMConfig) -> tuple[Path, Path | None]:
    """``(hf_dir, policy checkpoint or None)`` of ``config.policy``, validated without building anything: a
    one-line :class:`~nemo_viper.errors.CheckpointError` for a missing or wrong directory, a
    :class:`~nemo_viper.errors.ConfigError` for a tensor-parallel size the model does not divide or a
    precision / FP8 recipe / layer spec this machine cannot run."""
    from nemo_viper.models.checkpoint_dir import read_checkpoint_metadata
    from nemo_viper.models.hf_checkpoint import check_parallel_layout, read_qwen25_vl_config
    from nemo_viper.models.policy import Accelerator, check_precision
    from nemo_viper.models.checkpoint_dir import policy_paths
    from nemo_viper.rollout.backends import check_installed as check_backend_installed

    check_precision(config.precision, config.fp8_recipe, config.layer_spec, Accelerator.detect())
    hf_dir, checkpoint = policy_paths(config.policy)
    if checkpoint is not None:
        read_checkpoint_metadata(checkpoint)
    check_parallel_layout(read_qwen25_vl_config(hf_dir), config.tensor_parallel, 1)
    check_backend_installed(config.generation, "vlm.generation.backend")
    return hf_dir, checkpoint


def load_megatron_vlm(config: VLMConfig, seed: int) -> VLM:
    """Build the Megatron policy from ``config.policy`` (a policy checkpoint or an HF directory) and the
    generation backend ``config.generation`` on it: the KV-cached Megatron backend, or a vLLM engine
    loaded from the policy's weights. Collective under ``torchrun`` (all ranks call it)."""
    from nemo_viper.models.checkpoint import load_policy
    from nemo_viper.models.policy import PolicyConfig, build_policy
    from nemo_viper.models.processor import load_processor
    from nemo_viper.rollout.backends import build_backend

    hf_dir, checkpoint = check_policy(config)
    layout = dict(tensor_parallel=config.tensor_parallel, precision=config.precision, fp8_recipe=config.fp8_recipe,
                  layer_spec=config.layer_spec)
    if checkpoint is not None:
        policy = load_policy(checkpoint, **layout)
    else:
        policy = build_policy(PolicyConfig(hf_path=str(hf_dir), **layout))
    for chunk in policy.chunks:
        chunk.eval()
    return VLM(build_backend(config.generation, policy, seed), load_processor(hf_dir), config, policy.chunks)
