"""The default generation backend: continuously batched, KV-cached sampling on the Megatron policy itself.

How a call to :meth:`MegatronGenerationBackend.generate` runs. All samples of all requests wait in one
queue (shortest prompts first); the decoder has ``slots`` rows (from memory, see
:class:`MegatronGenerationConfig`), each with its own KV cache and length
(:mod:`nemo_viper.rollout.kv_cache`).

1. **Admit.** Whenever slots are free, the next waiting samples take them: their distinct prompts are
   encoded (each prompt's images through the vision tower once; M-RoPE positions from HF's
   ``get_rope_index``) and prefilled in one right-padded forward whose keys/values go straight into
   the slots of all of the prompt's admitted samples (a prompt is computed once for its ``n`` samples).
2. **Sample** one token for every slot with :func:`nemo_viper.rollout.sampling.sample_tokens`
   (vocab-parallel, seeded per sample and generation step, so a sample depends neither on its slot nor
   on its neighbours).
3. **Wait for the device once**: the step's tokens and log-probs come to the host in one transfer;
   :class:`~nemo_viper.rollout.stopping.SampleLog` records them and decides, on the host, which samples
   stop (EOS, stop string, ``max_new_tokens``, end of the context). A finished sample's slot is free
   for step 1 of the next round: nothing is copied or compacted (finished rows are simply overwritten).
4. **Decode** the other slots one token each (written at each slot's own column; M-RoPE positions of
   generated tokens continue from the prompt's largest position + 1, equal on the three axes:
   transformers' ``rope_deltas`` rule). Only slots ``0 .. last busy`` are computed (admission fills the
   lowest free slots first), so the batch shrinks as the queue drains.

Host syncs: one per decode step (3), plus, on steps that admit samples, those of prompt encoding (the
vision tower, ``get_rope_index``), and on steps with top-p rows one more in the sampler (its exact-nucleus
check). Everything else the host needs (slot lengths, widths, which sampling branches run) it tracks
itself.

Precision: bf16 or fp32 as the policy; an FP8-trained policy generates with bf16 GEMMs
(:func:`~nemo_viper.rollout.megatron_model.without_fp8`).

Tensor parallelism: every rank of the TP group calls ``generate`` with the same requests and returns
the same responses (logits stay vocab-sharded, see :mod:`nemo_viper.rollout.sampling`; the slot count
is the minimum over the group). Data-parallel ranks generate independently. Pipeline and sequence
parallelism are not supported (``ConfigError`` at construction).

``use_kv_cache=False`` re-runs the decoder (megatron's own attention, causal, no mask) over every slot's
whole sequence at every step (the prompt's image features are still computed once): an independent
reference for tests and benchmarks, not for production.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor

from nemo_viper.errors import ConfigError
from nemo_viper.models.hf_checkpoint import text_config
from nemo_viper.models.tokens import VISION_SPECIAL_TOKENS
from nemo_viper.rollout.config import MegatronGenerationConfig
from nemo_viper.rollout.interface import (
    GenerationRequest,
    GenerationResponse,
    by_request,
    check_prompt,
    request_seeds,
)
from nemo_viper.rollout.kv_cache import SlotKVCache, slot_attention
from nemo_viper.rollout.megatron_model import encode_prompts, generation_model, right_pad, row_logits, without_fp8
from nemo_viper.rollout.sampling import SamplingBranches, SamplingControls, VocabShard, sample_tokens
from nemo_viper.rollout.stopping import SampleLog
from nemo_viper.runtime import collectives
from nemo_viper.runtime.collectives import ReduceOp

# Bytes per slot and vocabulary entry (this rank's shard) for the step's logits and the sampler's temporaries
# (float32 logits, scaled and ranked copies, a float64 cumulative sum, ...): part of a slot's memory.
_SAMPLER_BYTES_PER_VOCAB_ENTRY = 40


def free_memory_bytes(device: torch.device) -> int:
    """Memory a new allocation on ``device`` can take. GPU: the driver's free memory
    (``torch.cuda.mem_get_info``) plus what PyTorch's caching allocator holds reserved but unused (after a
    training step that is the activations' blocks, which the driver counts as used); CPU: available RAM."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    import psutil

    return psutil.virtual_memory().available


def default_eos_token_ids(hf_path: str | Path, tokenizer) -> tuple[int, ...]:
    """The tokenizer's EOS id plus those of ``generation_config.json`` (if the checkpoint has one)."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    path = Path(hf_path) / "generation_config.json"
    if path.is_file():
        configured = json.loads(path.read_text()).get("eos_token_id")
        ids += [configured] if isinstance(configured, int) else configured or []
    return tuple(dict.fromkeys(ids))


class _CachedDecoder:
    """Prefill and decode through :class:`~nemo_viper.rollout.kv_cache.SlotKVCache` (attention swapped in
    by the caller with :func:`~nemo_viper.rollout.kv_cache.slot_attention`)."""

    def __init__(self, language_model, slots: int, columns: int):
        self.language_model, self.cache = language_model, SlotKVCache(slots, columns)

    def prefill(self, slots: Tensor, sources: Tensor, embeddings: Tensor, positions: Tensor, last: Tensor) -> Tensor:
        with self.cache.prefill(slots, sources):
            return row_logits(self.language_model, embeddings, positions, last)

    def decode(self, embedded: Tensor, positions: Tensor, fill: Tensor, width: int) -> Tensor:
        with self.cache.decode(fill, width):
            return row_logits(self.language_model, embedded, positions, torch.zeros_like(fill))


class _RecomputingDecoder:
    """The reference: every slot's input embeddings and positions are kept, and each step re-runs the decoder
    over all of them (right-padded, causal)."""

    def __init__(self, language_model, slots: int, columns: int):
        self.language_model, self.slots, self.columns = language_model, slots, columns
        self.embeddings = self.positions = None

    def prefill(self, slots: Tensor, sources: Tensor, embeddings: Tensor, positions: Tensor, last: Tensor) -> Tensor:
        if self.embeddings is None:
            self.embeddings = embeddings.new_zeros(self.columns, self.slots, embeddings.shape[-1])
            self.positions = positions.new_zeros(3, self.slots, self.columns)
        length = embeddings.shape[0]
        self.embeddings[:length, slots] = embeddings[:, sources]
        self.positions[:, slots, :length] = positions[:, sources]
        return row_logits(self.language_model, embeddings, positions, last)

    def decode(self, embedded: Tensor, positions: Tensor, fill: Tensor, width: int) -> Tensor:
        rows, fill = torch.arange(len(fill), device=fill.device), fill.clamp(max=width - 1)
        self.embeddings[fill, rows] = embedded[0]
        self.positions[:, rows, fill] = positions[:, :, 0]
        return row_logits(
            self.language_model, self.embeddings[:width, : len(rows)], self.positions[:, : len(rows), :width], fill
        )


class MegatronGenerationBackend:
    """Generation on a :class:`~nemo_viper.models.policy.MegatronPolicy` (see the module doc).

    Always generates from the policy's current weights (no copy). ``tokenizer`` defaults to the one
    in the policy's HF directory. ``seed``: base of the seeds drawn for requests without one (with the
    data-parallel rank, so DP ranks differ); the same sequence of ``generate`` calls gives the same samples.
    """

    def __init__(self, policy, config: MegatronGenerationConfig = MegatronGenerationConfig(), tokenizer=None,
                 seed: int = 0):
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
        self._eos_token_ids = torch.tensor(eos, dtype=torch.long)  # stopping is decided on the host
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
            seed * 1_000_003 + parallel_state.get_data_parallel_rank()
        )

    def weights_updated(self) -> None:
        """Nothing to do: generation always reads the policy's current weights."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[GenerationResponse]]:
        """Sample ``request.n`` responses for every request (in eval mode; the model's mode is restored)."""
        merge = self._model.config.vision_config.spatial_merge_size
        for index, request in enumerate(requests):
            check_prompt(index, request, self.context_length, "max_context_length", self._model.config.image_token_id,
                         merge)
        seeds = request_seeds(requests, self._seed_generator)
        was_training = self._model.training
        self._model.eval()
        try:
            with without_fp8(self._model):
                responses = self._generate(requests, seeds)
        finally:
            self._model.train(was_training)
        return by_request(responses, requests)

    def slot_count(self, samples: int, columns: int) -> int:
        """Samples decoded together for a call with ``samples`` samples of up to ``columns`` tokens: the
        configured maximum, capped by what ``kv_cache_memory_fraction`` of the free memory holds (the same
        on every TP rank: the group's minimum)."""
        language_model = self._model.language_model
        dtype = next(language_model.parameters()).dtype
        if self.config.use_kv_cache:
            sequence = SlotKVCache.bytes_per_slot(language_model.config, self._shard.world_size, columns, dtype)
        else:
            sequence = columns * language_model.config.hidden_size * torch.empty((), dtype=dtype).element_size()
        per_slot = sequence + _SAMPLER_BYTES_PER_VOCAB_ENTRY * self._shard.size
        free = free_memory_bytes(self._device)
        budget = int(free * self.config.kv_cache_memory_fraction)
        fit = torch.tensor([budget // per_slot], device=self._device)
        if self._shard.world_size > 1:
            fit = collectives.all_reduce(fit, ReduceOp.MIN, self._shard.group)
        fit = int(fit)
        if fit < 1:
            raise ConfigError(
                f"kv_cache_memory_fraction={self.config.kv_cache_memory_fraction}: {budget} free bytes hold no "
                f"generation slot ({per_slot} bytes for {columns} tokens); free memory or shorten max_new_tokens"
            )
        return min(samples, fit, self.config.max_batch_size or samples)

    def _to_device(self, values) -> Tensor:
        """A small host tensor on the device without waiting for it (pinned, asynchronous copy on CUDA)."""
        tensor = torch.as_tensor(values)
        if self._device.type == "cuda":
            return tensor.pin_memory().to(self._device, non_blocking=True)
        return tensor.to(self._device)

    @torch.no_grad()
    def _generate(self, requests: Sequence[GenerationRequest], seeds: list[int]) -> list[GenerationResponse]:
        """All samples through the slots (module doc); responses in request order, then sample order."""
        device, language_model = self._device, self._model.language_model
        owner = torch.tensor([i for i, r in enumerate(requests) for _ in range(r.n)])  # sample -> request
        index = torch.cat([torch.arange(r.n) for r in requests])  # sample -> its index in the request
        params = [requests[i].sampling for i in owner.tolist()]
        prompt_length = torch.tensor([len(requests[i].prompt_ids) for i in owner.tolist()])
        max_new = torch.minimum(torch.tensor([p.max_new_tokens for p in params]), self.context_length - prompt_length)
        columns = int((prompt_length + max_new).max())
        controls = SamplingControls.from_params(
            params, seeds=torch.tensor(seeds)[owner], sample_index=index, steps=int(max_new.max())
        ).to(device)
        branches = SamplingBranches.of(params)
        log = SampleLog(params, max_new, self._eos_token_ids, self.tokenizer)

        slots = self.slot_count(len(params), columns)
        decoder = (_CachedDecoder if self.config.use_kv_cache else _RecomputingDecoder)(language_model, slots, columns)
        waiting = sorted(range(len(params)), key=lambda k: int(prompt_length[k]))  # stable: request order
        # Per slot, on the host and (for what the device computes with) on the device: its sample (-1 = free),
        # its generation step (the index of the token it samples next) and its filled columns.
        slot_sample = torch.full((slots,), -1, dtype=torch.long)
        slot_fill = torch.zeros(slots, dtype=torch.long)
        step = torch.zeros(slots, dtype=torch.long, device=device)
        fill = torch.zeros(slots, dtype=torch.long, device=device)
        next_position = torch.zeros(slots, dtype=torch.long, device=device)
        sample_of_slot = torch.zeros(slots, dtype=torch.long, device=device)
        logits = torch.zeros(slots, self._shard.size, dtype=torch.float32, device=device)
        slot_controls = controls.select(sample_of_slot)

        swap = slot_attention(language_model, decoder.cache) if self.config.use_kv_cache else nullcontext()
        with swap:
            while waiting or bool((slot_sample >= 0).any()):
                free = (slot_sample < 0).nonzero()[:, 0]
                if waiting and len(free):
                    admitted, waiting = waiting[: len(free)], waiting[len(free) :]
                    targets = free[: len(admitted)]
                    self._prefill(requests, owner, admitted, targets, decoder, logits, fill, next_position)
                    slot_sample[targets], slot_fill[targets] = torch.tensor(admitted), prompt_length[admitted]
                    targets_device = self._to_device(targets)
                    step[targets_device] = 0
                    sample_of_slot[targets_device] = self._to_device(admitted)
                    slot_controls = controls.select(sample_of_slot)

                busy = (slot_sample >= 0).nonzero()[:, 0]
                rows = int(busy.max()) + 1  # slots 0 .. the last busy one
                last_step = controls.uniform.shape[1] - 1  # free slots' steps run on; they draw junk
                tokens, logprobs = sample_tokens(
                    logits[:rows], slot_controls.select(slice(0, rows)), step[:rows].clamp(max=last_step), self._shard,
                    self._suppressed, self.config.top_p_candidates, branches,
                )
                drawn = torch.stack([tokens.double(), logprobs.double()]).cpu()  # the step's one host sync
                steps = slot_fill[busy] - prompt_length[slot_sample[busy]]
                finished = log.record(steps, slot_sample[busy], drawn[0, busy].long(), drawn[1, busy].float())
                slot_sample[busy[finished]] = -1
                going_on = busy[~finished]
                if not len(going_on):
                    continue
                rows = int(going_on.max()) + 1
                width = int(slot_fill[going_on].max()) + 1
                embedded = language_model.embedding(input_ids=tokens[:rows, None], position_ids=None)  # [1, rows, H]
                positions = (next_position[:rows] + step[:rows])[None, :, None].expand(3, -1, -1)
                logits[:rows] = decoder.decode(embedded, positions, fill[:rows], width).float()
                step[:rows] += 1
                fill[:rows] += 1
                slot_fill[:rows] += 1
        return log.responses()

    def _prefill(self, requests, owner: Tensor, admitted: list[int], targets: Tensor, decoder, logits: Tensor,
                 fill: Tensor, next_position: Tensor) -> None:
        """Encode the distinct prompts of the ``admitted`` samples once, prefill them into slots ``targets``
        (one per sample) and leave each slot's first logits, fill and next position."""
        prompt_of = {}  # request -> its row in the prefill batch
        for sample in admitted:
            prompt_of.setdefault(int(owner[sample]), len(prompt_of))
        prompts = [requests[i] for i in prompt_of]
        with_images = [r for r in prompts if r.pixel_values is not None]
        ids, padding = right_pad([r.prompt_ids for r in prompts], self._pad_token_id)
        encoded = encode_prompts(
            self._model,
            ids,
            padding,
            torch.cat([r.pixel_values for r in with_images]) if with_images else None,
            torch.cat([r.image_grid_thw for r in with_images]) if with_images else None,
        )
        sources = self._to_device([prompt_of[int(owner[sample])] for sample in admitted])
        slots = self._to_device(targets)
        first = decoder.prefill(slots, sources, encoded.embeddings, encoded.positions, encoded.lengths - 1)
        logits[slots] = first[sources].float()
        fill[slots] = encoded.lengths[sources]
        next_position[slots] = encoded.next_position[sources]
