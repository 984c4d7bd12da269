"""The default generation backend: batched, KV-cached sampling on the Megatron policy itself.

How a call to :meth:`MegatronGenerationBackend.generate` runs (requests sorted by prompt length, then
packed into batches of at most ``max_batch_size`` samples; a request's samples may be split over batches):

1. **Prefill once per prompt.** Prompts are right-padded; each prompt's images go through the vision
   tower once, and the columns all prompts of the batch have (the shortest prompt's length) fill a
   megatron-core ``StaticInferenceContext`` (the KV cache) once per prompt. Its cache rows, logits and
   positions are then repeated for the prompt's ``n`` samples.
2. **Step.** One column per step for every unfinished sample: a row whose prompt is longer is fed its
   next prompt token (with its image features and M-RoPE position), the others their last sampled
   token, against the cache. No row ever has a padding column, so attention needs no mask and is exact
   on every layer spec (local or Transformer Engine; see :mod:`nemo_viper.rollout.megatron_model`).
   M-RoPE positions of generated tokens continue from the prompt's largest position + 1, equal on the
   three axes (transformers' ``rope_deltas`` rule). The cost of a batch's prompt-length spread is one
   extra single-token step per column; sorting by length keeps it small.
3. **Sample** with :func:`nemo_viper.rollout.sampling.sample_tokens` (vocab-parallel, seeded per sample
   and generation step, so a sample does not depend on its batch).
4. **Stop** a sample at an EOS token, a stop string, ``max_new_tokens`` or the end of the context;
   finished samples leave the batch (their cache rows are dropped), so long samples do not pay for
   short ones.

Precision: bf16 or fp32 as the policy; an FP8-trained policy generates with bf16 GEMMs
(:func:`~nemo_viper.rollout.megatron_model.without_fp8`).

Tensor parallelism: every rank of the TP group calls ``generate`` with the same requests and returns
the same responses (logits stay vocab-sharded, see :mod:`nemo_viper.rollout.sampling`). Data-parallel
ranks generate independently. Pipeline and sequence parallelism are not supported (``ConfigError`` at
construction).

``use_kv_cache=False`` re-runs the decoder over the whole sequence at every step (the prompt's image
features are still computed once): a reference for tests and benchmarks, not for production.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nemo_viper.errors import ConfigError
from nemo_viper.models.hf_checkpoint import text_config
from nemo_viper.models.tiny import VISION_SPECIAL_TOKENS
from nemo_viper.rollout.interface import GenerationRequest, GenerationResponse, PromptTooLongError
from nemo_viper.rollout.megatron_model import (
    encode_prompts,
    generation_model,
    last_logits,
    right_pad,
    select_cache_rows,
    without_fp8,
)
from nemo_viper.rollout.sampling import SamplingControls, VocabShard, sample_tokens
from nemo_viper.rollout.stopping import SampleLog


@dataclass(frozen=True)
class MegatronGenerationConfig:
    """Settings of :class:`MegatronGenerationBackend`.

    - ``max_batch_size``: samples decoded together (bounds the KV cache: layers x 2 x batch x tokens).
    - ``max_context_length``: prompt + generated tokens per sample; ``None`` = the model's
      ``max_position_embeddings``. A longer prompt raises ``PromptTooLongError``; generation that
      reaches the limit ends with finish reason ``length``.
    - ``use_kv_cache``: ``False`` recomputes the whole sequence every step (reference/benchmark).
    - ``eos_token_ids``: tokens that end a sample; ``None`` = the tokenizer's EOS plus the EOS ids of
      ``generation_config.json``.
    - ``seed``: base of the seeds drawn for requests without one (with the data-parallel rank, so DP
      ranks differ); the same sequence of ``generate`` calls then gives the same samples.
    - ``top_p_candidates``: logits per TP rank gathered for top-p (see ``sampling``).
    """

    max_batch_size: int = 64
    max_context_length: int | None = None
    use_kv_cache: bool = True
    eos_token_ids: tuple[int, ...] | None = None
    seed: int = 0
    top_p_candidates: int = 64

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size={self.max_batch_size} must be >= 1")
        if self.max_context_length is not None and self.max_context_length < 2:
            raise ConfigError(f"max_context_length={self.max_context_length} must be >= 2")
        if self.top_p_candidates < 1:
            raise ConfigError(f"top_p_candidates={self.top_p_candidates} must be >= 1")


def default_eos_token_ids(hf_path: str | Path, tokenizer) -> tuple[int, ...]:
    """The tokenizer's EOS id plus those of ``generation_config.json`` (if the checkpoint has one)."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    path = Path(hf_path) / "generation_config.json"
    if path.is_file():
        configured = json.loads(path.read_text()).get("eos_token_id")
        ids += [configured] if isinstance(configured, int) else configured or []
    return tuple(dict.fromkeys(ids))


@dataclass(frozen=True)
class _Piece:
    """Samples ``first .. first + count - 1`` of request ``request``."""

    request: int
    first: int
    count: int


def plan_batches(sample_counts: Sequence[int], max_batch_size: int) -> list[list[_Piece]]:
    """Pack the samples of the requests, in order, into batches of at most ``max_batch_size`` samples."""
    batches, current, room = [], [], max_batch_size
    for request, count in enumerate(sample_counts):
        first = 0
        while first < count:
            if room == 0:
                batches.append(current)
                current, room = [], max_batch_size
            take = min(room, count - first)
            current.append(_Piece(request, first, take))
            first, room = first + take, room - take
    if current:
        batches.append(current)
    return batches


class MegatronGenerationBackend:
    """Generation on a :class:`~nemo_viper.models.policy.MegatronPolicy` (see the module doc).

    Always generates from the policy's current weights (no copy). ``tokenizer`` defaults to the one
    in the policy's HF directory.
    """

    def __init__(self, policy, config: MegatronGenerationConfig = MegatronGenerationConfig(), tokenizer=None):
        from megatron.core import parallel_state

        self.config = config
        self._model = generation_model(policy)
        if tokenizer is None:
            from nemo_viper.models.processor import load_processor

            tokenizer = load_processor(policy.config.hf_path).tokenizer
        self.tokenizer = tokenizer
        self._device = next(self._model.parameters()).device
        eos = config.eos_token_ids or default_eos_token_ids(policy.config.hf_path, tokenizer)
        if not eos:
            raise ConfigError("no EOS token id in the tokenizer or generation_config.json: set eos_token_ids")
        self._eos_token_ids = torch.tensor(eos, dtype=torch.long, device=self._device)
        self._pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        self.context_length = config.max_context_length or text_config(policy.hf_config)["max_position_embeddings"]

        # Tied embeddings (Qwen2.5-VL-3B): the output layer has no weight of its own; this is the one it uses.
        local_vocab = self._model.language_model.shared_embedding_or_output_weight().shape[0]
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self._shard = VocabShard(
            start=parallel_state.get_tensor_model_parallel_rank() * local_vocab,
            size=local_vocab,
            group=parallel_state.get_tensor_model_parallel_group() if tp_size > 1 else None,
        )
        vision_ids = [tokenizer.convert_tokens_to_ids(token) for token in VISION_SPECIAL_TOKENS]
        vision_ids = torch.tensor([i for i in vision_ids if i is not None], dtype=torch.long)
        local_ids = vision_ids - self._shard.start
        self._suppressed = torch.zeros(local_vocab, dtype=torch.bool, device=self._device)
        self._suppressed[local_ids[(local_ids >= 0) & (local_ids < local_vocab)].to(self._device)] = True
        self._seed_generator = torch.Generator().manual_seed(
            config.seed * 1_000_003 + parallel_state.get_data_parallel_rank()
        )

    def weights_updated(self) -> None:
        """Nothing to do: generation always reads the policy's current weights."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[GenerationResponse]]:
        """Sample ``request.n`` responses for every request (in eval mode; the model's mode is restored)."""
        for index, request in enumerate(requests):
            self._validate(index, request)
        seeds = [
            r.sampling.seed
            if r.sampling.seed is not None
            else int(torch.randint(0, 2**62, (), generator=self._seed_generator))
            for r in requests
        ]
        responses: list[list[GenerationResponse | None]] = [[None] * r.n for r in requests]
        was_training = self._model.training
        self._model.eval()
        # Batches of similar prompt lengths: a batch advances one column per step from its shortest prompt.
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_ids))
        try:
            with without_fp8(self._model):
                for planned in plan_batches([requests[i].n for i in order], self.config.max_batch_size):
                    pieces = [replace(piece, request=order[piece.request]) for piece in planned]
                    generated = iter(self._generate_batch(requests, pieces, seeds))
                    for piece in pieces:
                        for sample in range(piece.first, piece.first + piece.count):
                            responses[piece.request][sample] = next(generated)
        finally:
            self._model.train(was_training)
        return responses

    def _validate(self, index: int, request: GenerationRequest) -> None:
        length = len(request.prompt_ids)
        if length >= self.context_length:
            raise PromptTooLongError(
                f"request {index}: the prompt has {length} tokens but the context holds {self.context_length} "
                "(prompt + generated tokens; max_context_length or the model's max_position_embeddings)"
            )
        merge = self._model.config.vision_config.spatial_merge_size
        slots = int((request.prompt_ids == self._model.config.image_token_id).sum())
        features = 0 if request.image_grid_thw is None else int(request.image_grid_thw.prod(dim=-1).sum()) // merge**2
        if slots != features:
            raise ConfigError(
                f"request {index}: the prompt has {slots} image placeholder tokens but its images give {features} "
                "features; build prompts with the model's processor (GenerationRequest.from_chat)"
            )

    def _rows(self, requests, pieces: list[_Piece], seeds: list[int]):
        """Per sample of ``pieces``: its prompt's index in the batch, its sampling params and controls, and
        its token budget (``max_new_tokens`` capped by the context)."""
        counts = torch.tensor([p.count for p in pieces])
        row_prompt = torch.repeat_interleave(torch.arange(len(pieces)), counts).to(self._device)
        row_requests = [requests[p.request] for p in pieces for _ in range(p.count)]
        params = [r.sampling for r in row_requests]
        max_new = torch.tensor(
            [min(r.sampling.max_new_tokens, self.context_length - len(r.prompt_ids)) for r in row_requests]
        )
        controls = SamplingControls.from_params(
            params,
            seeds=torch.tensor([seeds[p.request] for p in pieces for _ in range(p.count)], dtype=torch.long),
            sample_index=torch.cat([torch.arange(p.first, p.first + p.count) for p in pieces]),
            steps=int(max_new.max()),
        ).to(self._device)
        return row_prompt, params, controls, max_new

    @torch.no_grad()
    def _generate_batch(self, requests, pieces: list[_Piece], seeds: list[int]) -> list[GenerationResponse]:
        """Generate the samples of ``pieces``; responses in piece order, then sample order."""
        from megatron.core.inference.contexts import StaticInferenceContext

        device, model, language_model = self._device, self._model, self._model.language_model
        row_prompt, params, controls, max_new = self._rows(requests, pieces, seeds)
        prompts = [requests[p.request] for p in pieces]
        with_images = [r for r in prompts if r.pixel_values is not None]
        ids, prompt_padding = right_pad([r.prompt_ids for r in prompts], self._pad_token_id)
        encoded = encode_prompts(
            model,
            ids,
            prompt_padding,
            torch.cat([r.pixel_values for r in with_images]) if with_images else None,
            torch.cat([r.image_grid_thw for r in with_images]) if with_images else None,
        )
        ids = ids.to(device)

        # Column c of a row: its prompt's token c while c < its prompt length L, else generated token c - L.
        row_length = encoded.lengths[row_prompt]
        columns = int((row_length.cpu() + max_new).max())
        column = torch.arange(columns, device=device)
        prompt_positions = torch.nn.functional.pad(encoded.positions, (0, columns - ids.shape[1]))[:, row_prompt]
        generated_positions = encoded.next_position[row_prompt, None] + column - row_length[:, None]
        positions = torch.where(column < row_length[:, None], prompt_positions, generated_positions[None])
        prompt_ids = torch.nn.functional.pad(ids, (0, columns - ids.shape[1]))[row_prompt]

        # Prefill the columns every prompt has, once per prompt; repeat its cache rows for its samples.
        first = int(encoded.lengths.min())
        prefix = encoded.embeddings[:first]
        if self.config.use_kv_cache:
            context = StaticInferenceContext(len(pieces), columns)
            logits = last_logits(language_model, prefix, encoded.positions[..., :first], context)
            context.increment_sequence_len_offset(first)
            select_cache_rows(context, row_prompt)
            history = None
        else:
            context = None
            logits = last_logits(language_model, prefix, encoded.positions[..., :first])
            history = prefix[:, row_prompt]
        logits = logits[row_prompt]

        log = SampleLog(params, max_new, self._eos_token_ids, self.tokenizer)
        active = torch.arange(len(params))  # rows still in the batch (SampleLog row ids)
        for at in range(first, columns):  # ``logits`` predict column ``at`` of the active rows
            generating = row_length <= at
            tokens = prompt_ids[:, at].clone()  # the rest of a longer prompt is fed, not sampled
            if bool(generating.any()):
                rows = generating.nonzero()[:, 0]
                sampled, logprobs = sample_tokens(
                    logits[rows], controls.select(rows), at - row_length[rows], self._shard, self._suppressed,
                    self.config.top_p_candidates,
                )
                tokens[rows] = sampled
                finished = torch.zeros_like(generating)
                finished[rows] = log.record(at - row_length[rows], active[rows.cpu()], sampled, logprobs).to(device)
                if bool(finished.all()):
                    break
                if bool(finished.any()):  # drop finished samples from the batch and the cache
                    kept = (~finished).nonzero()[:, 0]
                    active, tokens, generating = active[kept.cpu()], tokens[kept], generating[kept]
                    controls, row_length, row_prompt = controls.select(kept), row_length[kept], row_prompt[kept]
                    positions, prompt_ids = positions[:, kept], prompt_ids[kept]
                    if context is not None:
                        select_cache_rows(context, kept)
                    else:
                        history = history[:, kept]

            embedded = language_model.embedding(input_ids=tokens[:, None], position_ids=None)  # [1, B, H]
            from_prompt = encoded.embeddings[min(at, ids.shape[1] - 1), row_prompt][None]  # image features too
            embedded = torch.where(generating[None, :, None], embedded, from_prompt)
            if context is not None:
                logits = last_logits(language_model, embedded, positions[..., : at + 1], context)
                context.increment_sequence_len_offset(1)
            else:
                history = torch.cat([history, embedded])
                logits = last_logits(language_model, history, positions[..., : at + 1])
        return log.responses()
