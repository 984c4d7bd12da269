"""Per-GPU memory of each phase of the closed loop, from sizes alone (no torch, no GPU).

Terms, in bytes, for one GPU (one rank of the ``tensor x pipeline x data`` layout):

- **weights**: parameters of this rank (LM layers, embedding and output layer split over TP and PP;
  the HF vision tower replicated on every TP rank of the first stage), 2 bytes (bf16/fp8 runs keep bf16
  weights) or 4 (fp32);
- **gradients**: Megatron's DDP buffer, float32 (``grad_reduce_in_fp32``): 4 bytes per parameter;
- **optimizer**: Adam ``m``, ``v`` and the float32 master copy (bf16 runs): 12 bytes (8 in fp32 runs)
  per parameter, divided by the data-parallel size with the distributed optimizer;
- **LM activations** of one micro-batch of ``T = b x S`` tokens, per layer (SwiGLU, GQA, no sequence
  parallelism, ``e`` bytes per element): ``e·T·(4h + (2h + 2·g·d)/t + 3f/t)`` (norm and linear inputs,
  q/k/v, attention output, gate/up/activation), plus the unfused attention's probabilities
  ``2·e·b·(a/t)·S²`` when attention is not a fused kernel and is not recomputed (``selective``).
  ``full`` recomputation keeps ``e·T·h`` per layer plus one layer's activations. With pipeline
  parallelism the first stage holds ``min(p, micro-batches)`` micro-batches of its ``L/p`` layers (1F1B):
  as many activations as one stage-less micro-batch, so PP saves model states, not activations;
- **vision activations** per patch and block: ``34·hv + 6·fv`` bytes in bf16 (the bf16 inputs of the
  norms, qkv, attention, projection and MLP, and HF's float32 norm and rotary copies; measured ~62 KB
  for the 7B tower), over the *distinct* images of the micro-batch (shared image sets: one copy per
  prompt, not per response); checkpointing the blocks keeps ``2·hv`` per patch and block plus one block;
- **logits and loss**: ``T·V/t`` elements: bf16 logits (2), the float32 softmax the cross entropy saves
  (4) and one float32 temporary (4); the entropy metric adds three float32 temporaries of a span of
  ``min(S, entropy_chunk)`` positions of one row;
- **KV cache** of a rollout batch: ``2·L/p·B·S·(g/t)·d·e``, plus the prefill's largest temporary
  (MLP activations and unfused attention scores of the prompts of one batch);
- **vLLM engine** (``rollout.backend: vllm``): its share of the GPU, at least the whole model's weights
  over TP (every pipeline stage's rank holds all layers) and one full-length sequence of KV cache;
- **pixel values**: the float32 patches of the images the step holds on the GPU (``3·tp·p²`` values per
  patch), plus their bf16 copy that the patch embedding saves for its weight gradient (training);
- **reward model**: its weights, resident for the whole RL job (rollout and training step);
- **CUDA/NCCL context**: memory the caching allocator never sees: the CUDA context with cuBLAS/cuDNN
  workspaces and loaded kernels (:data:`CUDA_CONTEXT_BYTES`) and NCCL's buffers for each process group
  of more than one rank that runs collectives (tensor, pipeline, data parallel;
  :data:`NCCL_COMMUNICATOR_BYTES` each);
- **diffusion pipeline**: its weights and its transformer activations (``16·batch·tokens·hidden``
  bytes, an unvalidated rule of thumb).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

GIB = 2**30
CUDA_CONTEXT_BYTES = 1.0 * GIB  # CUDA context, cuBLAS/cuDNN workspaces, lazily loaded kernels (torch on Hopper)
NCCL_COMMUNICATOR_BYTES = 0.5 * GIB  # one communicator's channel buffers (NCCL_BUFFSIZE x channels x peers)


@dataclass(frozen=True)
class Architecture:
    """Sizes of a Qwen2.5-VL checkpoint (language model + vision tower)."""

    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    vision_depth: int
    vision_hidden: int
    vision_ffn: int
    patch: int = 14
    merge: int = 2
    temporal_patch: int = 2

    @classmethod
    def from_hf_config(cls, config: dict) -> Architecture:
        """From a Qwen2.5-VL ``config.json`` (text keys at top level or under ``text_config``)."""
        text = {**config, **config.get("text_config", {})}
        vision = config["vision_config"]
        return cls(
            hidden=text["hidden_size"], ffn=text["intermediate_size"], layers=text["num_hidden_layers"],
            heads=text["num_attention_heads"], kv_heads=text["num_key_value_heads"], vocab=text["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            vision_depth=vision["depth"], vision_hidden=vision["hidden_size"],
            vision_ffn=vision["intermediate_size"], patch=vision.get("patch_size", 14),
            merge=vision.get("spatial_merge_size", 2), temporal_patch=vision.get("temporal_patch_size", 2),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        """One decoder layer: q/o (h x h, q bias), k/v (h x g·d, biases), SwiGLU MLP, two norms."""
        kv = self.kv_heads * self.head_dim
        return 2 * self.hidden * self.hidden + self.hidden + 2 * (self.hidden * kv + kv) + 3 * self.hidden * self.ffn \
            + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def vision_params(self) -> int:
        """Patch embedding, blocks (qkv, proj, SwiGLU MLP with biases, two norms) and the patch merger."""
        hv, fv = self.vision_hidden, self.vision_ffn
        block = 3 * hv * hv + 3 * hv + hv * hv + hv + 3 * hv * fv + 2 * fv + hv + 2 * hv
        merged = hv * self.merge**2
        merger = hv + merged * merged + merged + merged * self.hidden + self.hidden
        return 3 * self.temporal_patch * self.patch**2 * hv + self.vision_depth * block + merger

    @property
    def total_params(self) -> int:
        output = 0 if self.tied_embeddings else self.embedding_params
        return self.layers * self.layer_params + self.embedding_params + output + self.hidden + self.vision_params

    def image_patches(self, pixels: int) -> int:
        """Patches of an image of ``pixels`` pixels (at most: the resize keeps it within the budget)."""
        return pixels // self.patch**2

    def image_tokens(self, pixels: int) -> int:
        return self.image_patches(pixels) // self.merge**2


@dataclass(frozen=True)
class Layout:
    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    distributed_optimizer: bool = True


def prompt_tokens(arch: Architecture, text_tokens: int, images: int, max_pixels: int) -> int:
    """Tokens of a prompt of ``text_tokens`` text tokens and ``images`` images of at most ``max_pixels`` pixels
    (each image's tokens between its vision start and end tokens)."""
    return text_tokens + images * (arch.image_tokens(max_pixels) + 2)


@dataclass(frozen=True, kw_only=True)
class TrainingShape:
    """What one RL job holds: batch sizes, sequence and image budgets, memory switches. The settings come from
    the run config (:func:`nemo_viper.planning.recipe.training_shapes`); the defaults here are the plan's own
    assumptions, which no config key sets."""

    micro_batch_size: int
    responses_per_prompt: int  # rows sharing one image set
    micro_batches_per_minibatch: int
    prompt_text_tokens: int  # chat template + task text (+ the stage-1 caption)
    images_per_prompt: int
    max_pixels: int
    max_new_tokens: int
    precision: str  # fp32 | bf16 | fp8 (weights and activations as bf16)
    recompute: str  # LM: none | selective (core attention) | full (every layer's input only)
    recompute_vision: bool  # checkpoint every vision block
    generation_batch_size: int  # samples decoded together (Megatron generation backend)
    vllm_memory_fraction: float  # rollout.backend=vllm: the engine's share of the GPU when awake; 0: Megatron
    vllm_sleep_mode: bool  # the vLLM engine releases its weights and KV cache while the trainer steps
    reward_params: int
    entropy_chunk: int | None  # positions of the entropy metric's float32 chunk (None: unchunked)
    reward_bytes_per_param: int = 4  # the reward model runs in float32
    fused_attention: bool = False  # Transformer Engine / flash attention: no S x S probabilities saved
    shared_images: bool = True  # vision tower once per image set (False: once per row)

    def sequence_length(self, arch: Architecture) -> int:
        return self.prompt_length(arch) + self.max_new_tokens

    def prompt_length(self, arch: Architecture) -> int:
        return prompt_tokens(arch, self.prompt_text_tokens, self.images_per_prompt, self.max_pixels)

    @property
    def element_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2


@dataclass(frozen=True, kw_only=True)
class SynthesisShape:
    """One synthesis task (one GPU): the policy captions/critiques, a diffusion pipeline draws. Every field
    comes from the synthesis config and the pipeline's sizes (:func:`nemo_viper.planning.recipe.synthesis_shape`)."""

    vlm_batch_size: int
    vlm_tokens: int  # generated + prompt text tokens per sample
    vlm_pixels: int
    pipeline_params: int
    pipeline_batch_size: int
    pipeline_tokens: int  # latent image tokens (+ text) per sample: (1024 / 16)^2 for Qwen-Image
    pipeline_hidden: int
    residency: str  # together | alternate (policy and pipeline never on the GPU at once)
    cpu_offload: bool  # diffusers' model CPU offload: one pipeline component on the GPU at a time
    largest_component_params: int


@dataclass
class PhaseMemory:
    """One phase's per-GPU breakdown (bytes by term)."""

    name: str
    terms: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.terms.values())


def rank_params(arch: Architecture, layout: Layout) -> tuple[int, int]:
    """``(LM parameters, vision parameters)`` on the rank that holds the most (the first stage; with
    PP = 1 also the output layer). Megatron pads nothing here: the vocabulary divides TP for Qwen."""
    layers = math.ceil(arch.layers / layout.pipeline)
    lm = layers * arch.layer_params // layout.tensor + arch.embedding_params // layout.tensor
    if layout.pipeline == 1 and not arch.tied_embeddings:
        lm += arch.embedding_params // layout.tensor
    return lm, arch.vision_params


def model_states(arch: Architecture, layout: Layout, precision: str, trainable: bool = True) -> dict[str, float]:
    """Weights, gradient buffer and optimizer state of one rank (only weights when not trainable)."""
    lm, vision = rank_params(arch, layout)
    params = lm + vision
    weight_bytes = 4 if precision == "fp32" else 2
    terms = {"weights": params * weight_bytes}
    if trainable:
        terms["gradients"] = params * 4
        optimizer = params * (8 if precision == "fp32" else 12)
        terms["optimizer"] = optimizer / layout.data if layout.distributed_optimizer else optimizer
    return terms


def lm_activations(arch: Architecture, layout: Layout, shape: TrainingShape) -> float:
    """Saved activations of the language model for the micro-batches in flight on the first stage."""
    e, t = shape.element_bytes, layout.tensor
    seq = shape.sequence_length(arch)
    tokens = shape.micro_batch_size * seq
    h, f, d = arch.hidden, arch.ffn, arch.head_dim
    layer = e * tokens * (4 * h + (2 * h + 2 * arch.kv_heads * d) / t + 3 * f / t)
    if not shape.fused_attention and shape.recompute == "none":
        layer += 2 * e * shape.micro_batch_size * (arch.heads / t) * seq * seq
    layers = math.ceil(arch.layers / layout.pipeline)
    if shape.recompute == "full":
        per_micro_batch = layers * e * tokens * h
        recompute_buffer = layer
    else:
        per_micro_batch, recompute_buffer = layers * layer, 0.0
    in_flight = min(layout.pipeline, shape.micro_batches_per_minibatch)
    return in_flight * per_micro_batch + recompute_buffer


def distinct_images(shape: TrainingShape) -> int:
    """Images the vision tower encodes for one micro-batch (at most: the rows may straddle prompts)."""
    if not shape.shared_images:
        return shape.micro_batch_size * shape.images_per_prompt
    prompts = min(shape.micro_batch_size, math.ceil((shape.micro_batch_size - 1) / shape.responses_per_prompt) + 1)
    return prompts * shape.images_per_prompt


def vision_activation_bytes_per_patch_block(arch: Architecture, precision: str) -> float:
    """Saved bytes per patch and vision block (see the module docstring); fp32 doubles the bf16 part."""
    bf16_part = 2 * (9 * arch.vision_hidden + 3 * arch.vision_ffn)
    fp32_part = 4 * 4 * arch.vision_hidden  # norms' and rotary's float32 copies
    return bf16_part * (2 if precision == "fp32" else 1) + fp32_part


def vision_activations(arch: Architecture, layout: Layout, shape: TrainingShape) -> float:
    patches = distinct_images(shape) * arch.image_patches(shape.max_pixels)
    per_block = vision_activation_bytes_per_patch_block(arch, shape.precision) * patches
    if shape.recompute_vision:
        return arch.vision_depth * patches * arch.vision_hidden * shape.element_bytes + per_block
    return arch.vision_depth * per_block * min(layout.pipeline, shape.micro_batches_per_minibatch)


def loss_temporaries(arch: Architecture, layout: Layout, shape: TrainingShape) -> dict[str, float]:
    """Logits, the log-prob cross entropy's float32 copies, and the entropy metric's float32 temporaries."""
    seq = shape.sequence_length(arch)
    vocab_shard = arch.vocab / layout.tensor
    rows = shape.micro_batch_size * seq
    # the metric works row by row, on spans of ``entropy_chunk`` positions
    entropy_rows = rows if shape.entropy_chunk is None else min(seq, shape.entropy_chunk)
    return {
        "logits + loss": rows * vocab_shard * (shape.element_bytes + 4 + 4),
        "entropy metric": entropy_rows * vocab_shard * 4 * 3,  # shifted, exp, exp * shifted
    }


def pixel_value_bytes(arch: Architecture, images: int, pixels: int, copy_bytes: int = 0) -> float:
    """The float32 ``pixel_values`` of ``images`` images of at most ``pixels`` pixels, each value ``4 +
    copy_bytes`` bytes (``copy_bytes``: a lower-precision copy kept alongside)."""
    return images * arch.image_patches(pixels) * 3 * arch.temporal_patch * arch.patch**2 * (4 + copy_bytes)


def context_reserve(layout: Layout) -> float:
    """CUDA context plus one NCCL communicator per parallel dimension of more than one rank."""
    groups = sum(size > 1 for size in (layout.tensor, layout.pipeline, layout.data))
    return CUDA_CONTEXT_BYTES + groups * NCCL_COMMUNICATOR_BYTES


def resident_terms(layout: Layout, shape: TrainingShape) -> dict[str, float]:
    """What an RL job holds in every phase besides the policy: the reward model and the context."""
    return {"reward model": shape.reward_params * shape.reward_bytes_per_param,
            "CUDA/NCCL context": context_reserve(layout)}


def training_phase(arch: Architecture, layout: Layout, shape: TrainingShape) -> PhaseMemory:
    phase = PhaseMemory("RL training step", model_states(arch, layout, shape.precision))
    phase.terms["LM activations"] = lm_activations(arch, layout, shape)
    phase.terms["vision activations"] = vision_activations(arch, layout, shape)
    phase.terms["pixel values"] = pixel_value_bytes(arch, distinct_images(shape), shape.max_pixels,
                                                    copy_bytes=shape.element_bytes)
    phase.terms.update(loss_temporaries(arch, layout, shape))
    phase.terms.update(resident_terms(layout, shape))
    return phase


def kv_cache(arch: Architecture, layout: Layout, batch: int, tokens: int, element_bytes: int) -> float:
    kv_heads = max(1, arch.kv_heads // layout.tensor)
    layers = math.ceil(arch.layers / layout.pipeline)
    return 2 * layers * batch * tokens * kv_heads * arch.head_dim * element_bytes


def prefill_temporaries(arch: Architecture, layout: Layout, prompts: int, prompt_tokens: int, pixels: int,
                        images_per_prompt: int, element_bytes: int, fused_attention: bool) -> float:
    """The largest no-grad temporaries of one prefill: a layer's MLP (gate, up, product) or the unfused
    attention's scores and probabilities, and the vision tower's widest block over all the batch's images."""
    tokens = prompts * prompt_tokens
    mlp = 3 * tokens * arch.ffn / layout.tensor * element_bytes
    attention = 0 if fused_attention else 2 * prompts * arch.heads / layout.tensor * prompt_tokens**2 * element_bytes
    patches = prompts * images_per_prompt * arch.image_patches(pixels)
    vision = patches * 3 * arch.vision_ffn * element_bytes
    return max(mlp + attention, vision)


def rollout_phase(arch: Architecture, layout: Layout, shape: TrainingShape, gpu_bytes: float) -> PhaseMemory:
    """Generation in the RL job: the trainer's states stay resident, plus the generator — Megatron's: the KV
    cache of one batch, the prefill temporaries and its prompts' pixel values; vLLM's: the engine's whole
    share of the GPU (``gpu_memory_utilization`` x GPU: its weights, KV cache and activations) — and the
    reward model and the context."""
    phase = PhaseMemory("RL rollout", model_states(arch, layout, shape.precision))
    e = shape.element_bytes
    if shape.vllm_memory_fraction:
        phase.terms["vLLM engine"] = max(shape.vllm_memory_fraction * gpu_bytes, vllm_engine_minimum(arch, layout, shape))
    else:
        phase.terms["KV cache"] = kv_cache(arch, layout, shape.generation_batch_size, shape.sequence_length(arch), e)
        prompts = math.ceil(shape.generation_batch_size / shape.responses_per_prompt)
        phase.terms["prefill temporaries"] = prefill_temporaries(
            arch, layout, prompts, shape.prompt_length(arch), shape.max_pixels, shape.images_per_prompt, e,
            shape.fused_attention)
        phase.terms["pixel values"] = pixel_value_bytes(arch, prompts * shape.images_per_prompt, shape.max_pixels)
    phase.terms.update(resident_terms(layout, shape))
    return phase


def vllm_engine_minimum(arch: Architecture, layout: Layout, shape: TrainingShape) -> float:
    """What a vLLM engine needs at least: the whole model's weights split over TP only (the engine does not
    follow the trainer's pipeline stages: every rank holds all layers) and one full-length sequence of KV
    cache. Below it vLLM refuses to start, so the engine takes this much whatever its share says."""
    whole = Layout(layout.tensor, 1, layout.data, layout.distributed_optimizer)
    weights = (arch.total_params - arch.vision_params) / layout.tensor + arch.vision_params
    return weights * shape.element_bytes + kv_cache(arch, whole, 1, shape.sequence_length(arch), shape.element_bytes)


def synthesis_phase(name: str, arch: Architecture, synth: SynthesisShape) -> PhaseMemory:
    """One synthesis task on one GPU: the bf16 policy (TP1) generating, and the diffusion pipeline."""
    single = Layout(1, 1, 1, False)
    policy = model_states(arch, single, "bf16", trainable=False)["weights"]
    tokens = arch.image_tokens(synth.vlm_pixels) + synth.vlm_tokens
    policy_work = kv_cache(arch, single, synth.vlm_batch_size, tokens, 2) + prefill_temporaries(
        arch, single, synth.vlm_batch_size, tokens, synth.vlm_pixels, 1, 2, fused_attention=False)
    resident_pipeline = synth.largest_component_params if synth.cpu_offload else synth.pipeline_params
    pipeline = resident_pipeline * 2
    pipeline_work = 16 * synth.pipeline_batch_size * synth.pipeline_tokens * synth.pipeline_hidden
    context = {"CUDA/NCCL context": context_reserve(single)}
    if synth.residency == "alternate":
        if policy + policy_work >= pipeline + pipeline_work:
            return PhaseMemory(name, {"policy weights": policy, "policy KV cache + prefill": policy_work, **context})
        return PhaseMemory(name, {"diffusion pipeline": pipeline, "diffusion activations": pipeline_work, **context})
    return PhaseMemory(name, {"policy weights": policy, "policy KV cache + prefill": policy_work,
                              "diffusion pipeline": pipeline, "diffusion activations": pipeline_work, **context})


@dataclass(frozen=True)
class Plan:
    phases: list[PhaseMemory]
    gpu_bytes: float
    margin: float  # fraction of the GPU kept free for what the estimate does not see

    def fits(self, phase: PhaseMemory) -> bool:
        return phase.total <= self.gpu_bytes * (1 - self.margin)

    @property
    def all_fit(self) -> bool:
        return all(self.fits(p) for p in self.phases)


def plan_memory(arch: Architecture, layout: Layout, shapes: dict[str, TrainingShape], synth: SynthesisShape | None,
                gpu_bytes: float, margin: float) -> Plan:
    """Every phase: each RL stage's rollout and training step (``shapes``: stage name -> shape), and the
    synthesis stages when ``synth`` is given."""
    phases = []
    if synth is not None:
        phases.append(synthesis_phase("synthesis", arch, synth))
    for stage, shape in shapes.items():
        rollout, training = rollout_phase(arch, layout, shape, gpu_bytes), training_phase(arch, layout, shape)
        if shape.vllm_memory_fraction and not shape.vllm_sleep_mode:  # an awake engine keeps its share
            training.terms["vLLM engine"] = shape.vllm_memory_fraction * gpu_bytes
        rollout.name, training.name = f"{stage} rollout", f"{stage} training step"
        phases += [rollout, training]
    return Plan(phases, gpu_bytes, margin)


def training_changes(shape: TrainingShape, layout: Layout, arch: Architecture, gpus: int, vllm_share: float = 0.4):
    """Candidate single changes to an RL job, cheapest first: ``(description, shape, layout)``. The last ones
    double the pipeline stages (each holds half the layers' weights, gradients and optimizer state); a
    pipeline-parallel policy generates on vLLM (from the Megatron backend: at ``vllm_share`` of the GPU,
    the configured share, then smaller ones)."""
    if shape.recompute == "none":
        yield "recompute=selective", replace(shape, recompute="selective"), layout
    if not shape.recompute_vision:
        yield "recompute_vision=true", replace(shape, recompute_vision=True), layout
    size = shape.micro_batch_size // 2
    while size >= 1:
        yield f"micro_batch_size={size}", replace(shape, micro_batch_size=size), layout
        size //= 2
    if shape.recompute != "full":
        yield "recompute=full", replace(shape, recompute="full"), layout
    if shape.vllm_memory_fraction and not shape.vllm_sleep_mode:
        yield "vllm_sleep_mode=true", replace(shape, vllm_sleep_mode=True), layout
    for tenths in range(math.ceil(shape.vllm_memory_fraction * 10) - 1, 1, -1):  # the engine's share, 0.1 less each
        yield f"vllm_memory_fraction={tenths / 10}", replace(shape, vllm_memory_fraction=tenths / 10), layout
    if not shape.vllm_memory_fraction and shape.generation_batch_size > 8:
        yield (f"generation_batch_size={shape.generation_batch_size // 2}",
               replace(shape, generation_batch_size=shape.generation_batch_size // 2), layout)
    tensor = layout.tensor * 2
    if arch.heads % tensor == 0 and arch.kv_heads % tensor == 0 and gpus % (tensor * layout.pipeline) == 0:
        yield f"parallel.tensor={tensor}", shape, replace(layout, tensor=tensor, data=gpus // (tensor * layout.pipeline))
    pipeline = layout.pipeline * 2
    if arch.layers % pipeline == 0 and gpus % (layout.tensor * pipeline) == 0:
        split = replace(layout, pipeline=pipeline, data=gpus // (layout.tensor * pipeline))
        if shape.vllm_memory_fraction:
            yield f"parallel.pipeline={pipeline}", shape, split
            return
        shares = [vllm_share] + [t / 10 for t in range(math.ceil(vllm_share * 10) - 1, 1, -1)]
        for share in shares:  # the Megatron backend refuses PP: vLLM at the configured share, then 0.1 less each
            yield (f"parallel.pipeline={pipeline} rollout.backend=vllm vllm_memory_fraction={share}",
                   replace(shape, vllm_memory_fraction=share), split)
