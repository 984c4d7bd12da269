"""Settings of rollout generation, torch-free (the launcher validates a run config with them): how samples
are drawn (:class:`SamplingParams`, the run config's ``rl.sampling``) and which engine draws them
(:class:`GenerationBackendConfig`, the run config's ``rollout`` section and synthesis's ``vlm.generation``),
with each engine's own settings under its name."""

from __future__ import annotations

from dataclasses import dataclass, field

from nemo_viper.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How the samples of one request are drawn.

    - ``temperature`` > 0 scales the logits; ``greedy=True`` takes the argmax instead of sampling (the
      reported log-probs still use ``temperature``).
    - ``top_k`` = 0 and ``top_p`` = 1.0 switch truncation off. Order as in transformers: suppression,
      temperature, top-k, then top-p on the renormalised remainder.
    - Generation ends at an EOS token (finish reason ``eos``; the token is kept), at a stop string
      (``stop``), or after ``max_new_tokens`` tokens or at the end of the context (``length``).
    - Stop strings are matched on the decoded text. The response's tokens end with the token that
      completed the stop string; its text ends before the stop string, or right after it with
      ``include_stop_string=True`` (characters of that last token beyond the stop string are dropped).
    - ``seed``: sample ``j`` of the request draws from a random stream keyed by ``(seed, j)`` only, so
      it does not depend on batch composition or the tensor-parallel layout. Requests that share a
      seed share their streams (their samples are correlated): give independent prompts distinct
      seeds, or ``None``, for which the backend draws one (reproducible for the same sequence of calls).
    - ``suppress_vision_tokens``: never sample ``<|vision_start|>``, ``<|image_pad|>`` and the other vision
      special tokens (a randomly initialised model would otherwise emit them).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    max_new_tokens: int = 256
    stop_strings: tuple[str, ...] = ()
    include_stop_string: bool = False
    seed: int | None = None
    suppress_vision_tokens: bool = True

    def __post_init__(self):
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0 (use greedy=True for argmax decoding)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if isinstance(self.stop_strings, str) or any(not s for s in self.stop_strings):
            raise ConfigError(f"stop_strings={self.stop_strings!r} must be a tuple of non-empty strings")
        if self.seed is not None and self.seed < 0:
            raise ConfigError(f"seed={self.seed} must be >= 0")


@dataclass(frozen=True)
class MegatronGenerationConfig:
    """Settings of :class:`~nemo_viper.rollout.megatron_backend.MegatronGenerationBackend`.

    - ``max_batch_size``: at most this many samples decode together (slots); ``None`` = as many as fit
      (below). Either way never more than the call's samples, nor more than fit.
    - ``kv_cache_memory_fraction``: share of the memory free at the start of a ``generate`` call (GPU:
      :func:`~nemo_viper.rollout.megatron_backend.free_memory_bytes`) the slots may take: each slot costs its KV cache
      (layers x 2 x KV heads/TP x head dim x the call's longest prompt + budget, in the policy's dtype)
      plus ~40 bytes per vocabulary entry of this rank's shard (logits and sampler).
    - ``max_context_length``: prompt + generated tokens per sample; ``None`` = the model's
      ``max_position_embeddings``. A longer prompt raises ``PromptTooLongError``; generation that
      reaches the limit ends with finish reason ``length``.
    - ``use_kv_cache``: ``False`` recomputes the whole sequence every step (reference/benchmark).
    - ``eos_token_ids``: tokens that end a sample; ``None`` = the tokenizer's EOS plus the EOS ids of
      ``generation_config.json``.
    - ``top_p_candidates``: logits per TP rank gathered for top-p (see ``sampling``).
    """

    max_batch_size: int | None = None
    kv_cache_memory_fraction: float = 0.5
    max_context_length: int | None = None
    use_kv_cache: bool = True
    eos_token_ids: tuple[int, ...] | None = None
    top_p_candidates: int = 64

    def __post_init__(self):
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size={self.max_batch_size} must be >= 1 (or None: from memory)")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ConfigError(f"kv_cache_memory_fraction={self.kv_cache_memory_fraction} must be in (0, 1]")
        if self.max_context_length is not None and self.max_context_length < 2:
            raise ConfigError(f"max_context_length={self.max_context_length} must be >= 2")
        if self.top_p_candidates < 1:
            raise ConfigError(f"top_p_candidates={self.top_p_candidates} must be >= 1")


@dataclass(frozen=True)
class VLLMGenerationConfig:
    """Settings of :class:`~nemo_viper.rollout.vllm_backend.VLLMGenerationBackend`.

    - ``max_model_len``: prompt + generated tokens per sample; ``None`` = the model's
      ``max_position_embeddings``.
    - ``gpu_memory_utilization``: share of the GPU vLLM may take when awake (weights + KV cache); the
      trainer's weights, gradients and optimizer states stay resident beside it, so 0.4 (not vLLM's 0.9):
      the largest share with which the 3B and 7B recipes' rollouts fit 80 GB (``nemo-viper plan``).
    - ``cpu_kv_cache_gib``: KV-cache size on CPU (``VLLM_CPU_KVCACHE_SPACE``).
    - ``enable_sleep_mode``: release weights and KV cache between rollouts (GPU only; ignored on CPU).
    - ``enforce_eager``: no CUDA graphs (always eager on CPU).
    - ``max_num_seqs``: sequences vLLM schedules at once (continuous batching over all requests).
    - ``image_micro_batch_size``: images per vision-tower pass when computing the prompts' image features.
    """

    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.4
    cpu_kv_cache_gib: int = 1
    enable_sleep_mode: bool = True
    enforce_eager: bool = False
    max_num_seqs: int = 256
    image_micro_batch_size: int = 16

    def __post_init__(self):
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        for key in ("cpu_kv_cache_gib", "max_num_seqs", "image_micro_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len={self.max_model_len} must be >= 2")


BACKENDS = ("megatron", "vllm")


@dataclass(frozen=True)
class GenerationBackendConfig:
    """``backend``: ``megatron`` (generates on the policy's own weights; no extra memory) or ``vllm`` (a
    colocated vLLM engine per data-parallel rank, loaded from the policy and refitted after every update;
    needs ``vllm``). ``megatron`` / ``vllm``: that engine's settings (the other's are not used)."""

    backend: str = "megatron"
    megatron: MegatronGenerationConfig = field(default_factory=MegatronGenerationConfig)
    vllm: VLLMGenerationConfig = field(default_factory=VLLMGenerationConfig)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend={self.backend!r} is not one of {BACKENDS}")


def check_rollout_layout(backend: str, pipeline_parallel: int) -> None:
    """The generation backend can serve a policy split into ``pipeline_parallel`` stages: the Megatron backend
    generates on the policy's own modules, so on one stage only; vLLM holds the whole model per engine,
    refitted from every stage. A one-line ``ConfigError`` otherwise (checked before any job starts)."""
    if pipeline_parallel > 1 and backend != "vllm":
        raise ConfigError(f"parallel.pipeline={pipeline_parallel} needs rollout.backend=vllm (rollout.backend="
                          f"{backend} generates on the policy's own layers, which pipeline parallelism splits)")
