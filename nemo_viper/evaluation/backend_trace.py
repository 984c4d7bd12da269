"""What each eval backend is fed and what it generates, per document (adapter: instruments lmms-eval's models).

:func:`recording` wraps, for one ``evaluate`` call in this process, lmms-eval's chat models ``qwen2_5_vl``
(transformers ``generate``) and ``vllm`` (``LLM.chat``) so that every document's generation leaves a
:class:`Trace`: the prompt token ids, the image tensor the vision tower receives (``pixel_values``) and its
grid, the dtype the model computes in, the stop token ids, token budget and repetition penalty, the generated
token ids and the top log-probabilities of the raw logits at each generated position (decoding stays greedy:
asking for them does not change the chosen token). Requests are handed to the wrapped model one at a time
(batch size 1), so each generation is tied to its document. :mod:`~nemo_viper.evaluation.backend_agreement`
compares two such traces.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

LOGPROBS = 5  # log-probs kept per generated position (the top k)


@dataclass
class Trace:
    """One document's generation by one backend."""

    doc_id: int
    prompt_ids: list[int] = field(default_factory=list)
    pixel_values: torch.Tensor | None = None  # float32, rescaled and normalised, as the vision tower gets them
    image_grid_thw: list[list[int]] = field(default_factory=list)
    dtype: str = ""
    stop_ids: list[int] = field(default_factory=list)
    max_new_tokens: int = 0
    repetition_penalty: float = 1.0
    generated_ids: list[int] = field(default_factory=list)  # up to and including the stop token, no padding
    top_logprobs: list[dict[int, float]] = field(default_factory=list)  # per generated position, raw logits


class _Recorder:
    def __init__(self):
        self.traces: dict[int, Trace] = {}
        self.current: Trace | None = None

    def one_at_a_time(self, generate_until):
        """``generate_until`` of an lmms-eval model, called with one request at a time (its doc's trace open)."""

        def wrapped(model, requests):
            results = []
            for request in requests:
                self.current = self.traces.setdefault(int(request.doc_id), Trace(int(request.doc_id)))
                results.extend(generate_until(model, [request]))
            self.current = None
            return results

        return wrapped


def _top_logprobs(logits: torch.Tensor) -> dict[int, float]:
    values, tokens = torch.log_softmax(logits.float(), dim=-1).topk(LOGPROBS)
    return dict(zip(tokens.tolist(), values.tolist()))


def _hf_generate(recorder: _Recorder, generate):
    def wrapped(model, *args, **kwargs):
        trace = recorder.current
        if trace is None:
            return generate(model, *args, **kwargs)
        result = generate(model, *args, **kwargs, output_logits=True, return_dict_in_generate=True)
        prompt = kwargs["input_ids"][0]
        eos = kwargs.get("eos_token_id", model.generation_config.eos_token_id)
        trace.prompt_ids = prompt.tolist()
        trace.pixel_values = kwargs["pixel_values"].detach().float().cpu()
        trace.image_grid_thw = kwargs["image_grid_thw"].tolist()
        trace.dtype = str(model.dtype).removeprefix("torch.")
        trace.stop_ids = sorted({eos} if isinstance(eos, int) else set(eos))
        trace.max_new_tokens = int(kwargs["max_new_tokens"])
        trace.repetition_penalty = float(kwargs.get("repetition_penalty")
                                         or model.generation_config.repetition_penalty or 1.0)
        new = result.sequences[0, prompt.numel():].tolist()
        ends = [i for i, token in enumerate(new) if token in trace.stop_ids]
        trace.generated_ids = new[: ends[0] + 1] if ends else new
        trace.top_logprobs = [_top_logprobs(step[0]) for step in result.logits[: len(trace.generated_ids)]]
        return result.sequences

    return wrapped


def _vllm_chat(recorder: _Recorder, chat):
    def wrapped(llm, *args, sampling_params, **kwargs):
        for params in sampling_params:
            params.logprobs = LOGPROBS
        outputs = chat(llm, *args, sampling_params=sampling_params, **kwargs)
        trace = recorder.current
        if trace is not None:
            (output,), (params,) = outputs, sampling_params
            completion = output.outputs[0]
            trace.prompt_ids = list(output.prompt_token_ids)
            trace.dtype = str(llm.llm_engine.model_config.dtype).removeprefix("torch.")
            trace.max_new_tokens = int(params.max_tokens)
            trace.repetition_penalty = float(params.repetition_penalty)
            trace.generated_ids = list(completion.token_ids)
            trace.top_logprobs = [{token: lp.logprob for token, lp in position.items()}
                                  for position in completion.logprobs or ()]
        return outputs

    return wrapped


def _vllm_stop_ids(recorder: _Recorder, update_from_tokenizer):
    """vLLM completes a request's stop ids (generation config, tokenizer EOS) on its own copy of the
    sampling parameters, right before ``update_from_tokenizer``: read them there."""

    def wrapped(params, *args, **kwargs):
        if recorder.current is not None:
            recorder.current.stop_ids = sorted(set(params.all_stop_token_ids) | set(params.stop_token_ids or ()))
        return update_from_tokenizer(params, *args, **kwargs)

    return wrapped


def _vllm_image_input(recorder: _Recorder, process_image_input):
    def wrapped(model, image_input):
        trace = recorder.current
        if trace is not None and image_input["type"] == "pixel_values":
            # vLLM hands raw pixels to the model and rescales/normalises them there (its input norm, fp32 math)
            normalised = model.visual.input_norm(image_input["pixel_values"].to(model.visual.device), torch.float32)
            trace.pixel_values = normalised.detach().float().cpu()
            trace.image_grid_thw = image_input["image_grid_thw"].tolist()
        return process_image_input(model, image_input)

    return wrapped


@contextlib.contextmanager
def recording(backend: str):
    """Within the block, ``evaluate`` of one task with ``backend`` (``qwen2_5_vl`` or ``vllm``) records a
    :class:`Trace` per document; yields the ``{doc_id: Trace}`` dict it fills (doc ids are per task)."""
    from unittest import mock

    recorder = _Recorder()
    if backend == "vllm":
        import vllm
        from lmms_eval.models.chat.vllm import VLLM
        from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as VllmQwen

        patches = [mock.patch.object(VLLM, "generate_until", recorder.one_at_a_time(VLLM.generate_until)),
                   mock.patch.object(vllm.LLM, "chat", _vllm_chat(recorder, vllm.LLM.chat)),
                   mock.patch.object(vllm.SamplingParams, "update_from_tokenizer",
                                     _vllm_stop_ids(recorder, vllm.SamplingParams.update_from_tokenizer)),
                   mock.patch.object(VllmQwen, "_process_image_input",
                                     _vllm_image_input(recorder, VllmQwen._process_image_input))]
    else:
        from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL
        from transformers import Qwen2_5_VLForConditionalGeneration as HfQwen

        patches = [mock.patch.object(Qwen2_5_VL, "generate_until", recorder.one_at_a_time(Qwen2_5_VL.generate_until)),
                   mock.patch.object(HfQwen, "generate", _hf_generate(recorder, HfQwen.generate))]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield recorder.traces
