"""What a generation backend takes and returns; every backend (Megatron, vLLM) implements it.

A :class:`GenerationRequest` is one prompt (token ids with its images already processed) plus ``n`` and
its :class:`SamplingParams`; :meth:`GenerationBackend.generate` returns, per request and in request
order, ``n`` :class:`GenerationResponse` objects (sample order).

Log-probabilities. ``GenerationResponse.logprobs[i]`` is ``log softmax(logits / T)[token_ids[i]]`` with
``T = SamplingParams.temperature``, taken on the full vocabulary BEFORE any truncation (top-k, top-p) or
token suppression: the distribution the trainer recomputes with
:func:`nemo_viper.models.logprobs.compute_logprobs` at the same temperature (GRPO's ``log pi_old``).
Truncation and suppression only decide which token is drawn. Greedy samples report the same quantity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor

from nemo_viper.data.images import PromptImages, check_patches
from nemo_viper.errors import ConfigError, NemoViperError
from nemo_viper.rollout.config import SamplingParams

FinishReason = Literal["eos", "stop", "length"]


class PromptTooLongError(NemoViperError, ValueError):
    """A prompt does not fit into the model's context; the message names the request and both lengths."""


@dataclass
class GenerationRequest:
    """One prompt and how many samples to draw from it.

    ``prompt_ids`` are the prompt's token ids (1-D; a list is converted), image placeholders already
    expanded to one ``<|image_pad|>`` per merged patch, as the Qwen2.5-VL processor writes them.
    ``pixel_values`` / ``image_grid_thw`` are the processor's outputs for this prompt's images, in order
    (both ``None`` for a text-only prompt). :meth:`from_chat` makes one from chat messages and images.
    """

    prompt_ids: Tensor
    pixel_values: Tensor | None = None
    image_grid_thw: Tensor | None = None
    n: int = 1
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self):
        self.prompt_ids = torch.as_tensor(self.prompt_ids, dtype=torch.long)
        if self.prompt_ids.dim() != 1 or self.prompt_ids.numel() == 0:
            raise ConfigError(f"prompt_ids must be a non-empty 1-D sequence, got shape {tuple(self.prompt_ids.shape)}")
        if self.n < 1:
            raise ConfigError(f"n={self.n} must be >= 1")
        check_patches(self.pixel_values, self.image_grid_thw)

    @classmethod
    def from_chat(
        cls,
        processor,
        messages: list[dict],
        images: Sequence | PromptImages = (),
        n: int = 1,
        sampling: SamplingParams | None = None,
    ) -> GenerationRequest:
        """A request for the assistant's reply to ``messages`` (chat-template format, one ``{"type": "image"}``
        part per image) through the model's ``processor``.

        ``images`` are either PIL images, in order, which the processor's image processor prepares here,
        or the prompt's already preprocessed :class:`~nemo_viper.data.images.PromptImages` (from
        :class:`~nemo_viper.data.images.QwenImagePreprocessor`), used as they are: the request shares
        their tensors. Either way each image is resized into its ``[min_pixels, max_pixels]`` budget
        (aspect ratio kept, sides multiples of 28) and its placeholder expands into one ``<|image_pad|>``
        per merged patch.
        """
        from nemo_viper.models.processor import prompt_token_ids

        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        if isinstance(images, PromptImages):
            pixel_values, image_grid_thw = images.pixel_values, images.image_grid_thw
        elif images:
            features = processor.image_processor(list(images), return_tensors="pt")
            pixel_values, image_grid_thw = features["pixel_values"], features["image_grid_thw"]
        else:
            pixel_values = image_grid_thw = None
        return cls(
            prompt_ids=prompt_token_ids(processor, text, image_grid_thw),
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            n=n,
            sampling=sampling or SamplingParams(),
        )


@dataclass
class GenerationResponse:
    """One sample: generated token ids (EOS included when generated), decoded text (special tokens
    skipped, cut at a stop string), the sampling-time log-prob of each token, and why it ended."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason

    @property
    def truncated(self) -> bool:
        """Cut at ``max_new_tokens`` (what the format reward and overlong filtering treat as truncated)."""
        return self.finish_reason == "length"


class GenerationBackend(Protocol):
    """Anything that turns requests into samples: ``generate(requests)[i][j]`` is sample ``j`` of request ``i``.

    ``weights_updated()`` tells the backend that the policy's weights changed (after an optimizer step or
    a checkpoint load): the next ``generate`` samples from the new weights. A backend that generates from
    the policy's own parameters (Megatron) has nothing to do; one with its own copy (vLLM) refits it.
    """

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[GenerationResponse]]: ...

    def weights_updated(self) -> None: ...


def request_seeds(requests: Sequence[GenerationRequest], generator: torch.Generator) -> list[int]:
    """Each request's seed: its own, or one drawn from ``generator`` (reproducible for the same calls)."""
    return [
        r.sampling.seed if r.sampling.seed is not None else int(torch.randint(0, 2**62, (), generator=generator))
        for r in requests
    ]


def check_prompt(index: int, request: GenerationRequest, context_length: int, context_key: str,
                 image_token_id: int, spatial_merge_size: int) -> None:
    """A one-line error unless request ``index``'s prompt fits the context (``context_key`` names the limit)
    and has one image placeholder per merged image patch."""
    length = len(request.prompt_ids)
    if length >= context_length:
        raise PromptTooLongError(
            f"request {index}: the prompt has {length} tokens but the context holds {context_length} "
            f"(prompt + generated tokens; {context_key} or the model's max_position_embeddings)"
        )
    slots = int((request.prompt_ids == image_token_id).sum())
    grid = request.image_grid_thw
    features = 0 if grid is None else int(grid.prod(dim=-1).sum()) // spatial_merge_size**2
    if slots != features:
        raise ConfigError(
            f"request {index}: the prompt has {slots} image placeholder tokens but its images give {features} "
            "features; build prompts with the model's processor (GenerationRequest.from_chat)"
        )


def by_request(samples: Sequence[GenerationResponse], requests: Sequence[GenerationRequest]):
    """Responses listed sample by sample, request by request, regrouped as ``[request][sample]``."""
    flat = iter(samples)
    return [[next(flat) for _ in range(r.n)] for r in requests]
