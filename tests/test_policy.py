"""The Megatron policy built through Megatron-Bridge against transformers' Qwen2.5-VL (the reference), and the
README's smoke run of the policy (scripts/tiny_demo.sh: tiny model, import at TP=2, score at TP=2, export).

Every layout (TP1, TP2, PP2 from HF; the demo's TP=2 checkpoint loaded at TP1) runs in one two-rank torchrun
job (gloo, CPU mode; ``forwards``), one layout after the other, then rank 0 alone in a process group of one
runs the freeze-option, bf16 and FP8-alignment checks; the reference runs in this process.
"""

import json
import subprocess

import pytest
import torch
from launch import REPO, run_cli, run_worker
from skimage import data

from nemo_viper.models.batch import count_images
from nemo_viper.models.processor import load_processor
from nemo_viper.models.vision_attention import VISION_ATTENTION

TOLERANCE = 1e-4
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tiny_hf_dir, tmp_path_factory):
    """A right-padded batch of two chats (one with one image, one with two) and HF's outputs on it."""
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = load_processor(tiny_hf_dir)
    processor.tokenizer.padding_side = "right"
    images = [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee()), Image.fromarray(data.chelsea())]
    prompts = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image in detail."}]}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What changed?"}]}],
    ]
    answers = ["<think>I look.</think><answer>The red car is on the left.</answer>", "Remove the cup."]
    prompt_texts = [processor.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
    prompt_lengths = processor(text=prompt_texts, images=images, padding=True, return_tensors="pt")["attention_mask"].sum(1)
    full_texts = [p + a + "<|im_end|>" for p, a in zip(prompt_texts, answers)]
    inputs = processor(text=full_texts, images=images, padding=True, return_tensors="pt")
    positions = torch.arange(inputs["input_ids"].shape[1])
    response_mask = (positions[None] >= prompt_lengths[:, None]) & inputs["attention_mask"].bool()

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    logprobs = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, inputs["input_ids"][:, 1:, None])[..., 0]
    logprobs = torch.cat([torch.zeros(2, 1, dtype=logprobs.dtype), logprobs], 1) * response_mask

    path = tmp_path_factory.mktemp("batch") / "inputs.pt"
    batch = {k: inputs[k] for k in ("input_ids", "pixel_values", "image_grid_thw")}
    batch["images_per_row"] = count_images(inputs["input_ids"], processor.tokenizer.convert_tokens_to_ids("<|vision_start|>"))
    torch.save({**batch, "response_mask": response_mask}, path)
    return {"path": path, "logits": logits, "logprobs": logprobs.float(), "valid": inputs["attention_mask"].bool()}


def assert_matches_reference(result_file, reference):
    result = torch.load(result_file)
    vocab = reference["logits"].shape[-1]
    valid = reference["valid"]
    logit_diff = (result["logits"][..., :vocab] - reference["logits"])[valid].abs().max().item()
    logprob_diff = (result["logprobs"] - reference["logprobs"]).abs().max().item()
    assert logit_diff <= TOLERANCE, f"logits differ from transformers by {logit_diff}"
    assert logprob_diff <= TOLERANCE, f"log-probs differ from log_softmax+gather on HF logits by {logprob_diff}"
    assert torch.count_nonzero(result["logprobs"]) == torch.count_nonzero(reference["logprobs"])


LAYOUTS = {"tp1": (1, 1, 2), "tp2": (2, 1, 1), "pp2": (1, 2, 1)}  # name: (TP, PP, micro-batch size)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The README's smoke run (scripts/tiny_demo.sh), run as the README says: its run directory and its output."""
    run = tmp_path_factory.mktemp("demo") / "demo"
    result = subprocess.run(["bash", "scripts/tiny_demo.sh", str(run)], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    return run, result.stdout


@pytest.fixture(scope="module")
def forwards(tiny_hf_dir, reference, demo, tmp_path_factory):
    """Outputs of every layout in LAYOUTS built from HF, and of the demo's TP=2 checkpoint loaded at TP1."""
    out = tmp_path_factory.mktemp("forwards")
    layouts = [f"{name}:hf:{tp}:{pp}:{mbs}" for name, (tp, pp, mbs) in LAYOUTS.items()] + ["ckpt_tp1:ckpt:1:1:1"]
    run_worker("policy_forward.py", "--hf", str(tiny_hf_dir), "--ckpt", str(demo[0] / "ckpt"), "--inputs",
               str(reference["path"]), "--out", str(out), *[arg for layout in layouts for arg in ("--layout", layout)],
               "--options-report", str(out / "options.json"), nproc=2, timeout=1200)  # four policies, then six alone
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_policy_matches_transformers(forwards, reference, layout):
    assert_matches_reference(forwards / f"{layout}.pt", reference)


def test_tiny_demo_imports_reshards_and_exports_bit_exact(tiny_hf_dir, reference, demo, forwards):
    """The demo imports at TP=2 and scores there; the checkpoint loads at TP=1 with the same logits; its export
    is every HF tensor bit-exact (the demo's tiny model is the one the other tests build)."""
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    run, stdout = demo
    assert (run / "hf" / "model.safetensors").read_bytes() == (tiny_hf_dir / "model.safetensors").read_bytes()
    assert "total log-prob of the response" in stdout
    metadata = json.loads((run / "ckpt" / "nemo_viper_checkpoint.json").read_text())
    assert metadata["saved_with"]["tensor_parallel"] == 2
    assert_matches_reference(forwards / "ckpt_tp1.pt", reference)

    exported = run / "hf_export"
    original, roundtrip = load_file(tiny_hf_dir / "model.safetensors"), load_file(exported / "model.safetensors")
    assert sorted(original) == sorted(roundtrip)
    for name, tensor in original.items():
        assert roundtrip[name].dtype == tensor.dtype and torch.equal(roundtrip[name], tensor), name
    Qwen2_5_VLForConditionalGeneration.from_pretrained(exported)  # transformers loads the export
    load_processor(exported)


def test_a_parameter_the_hf_load_leaves_unwritten_is_refused_by_name():
    """``build_policy`` skips random init when HF weights load; its hooks around Megatron-Bridge's (non-strict)
    load refuse a parameter the load did not write. The forwards above show the real load writes all."""
    from nemo_viper.errors import ConfigError
    from nemo_viper.models.policy import fill_parameters_with_nan, require_every_parameter_loaded

    chunks = [torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2)), torch.nn.Linear(2, 2)]
    fill_parameters_with_nan(chunks)
    for name, parameter in [*chunks[0].named_parameters(), *chunks[1].named_parameters()]:
        assert torch.isnan(parameter).all(), name
    with torch.no_grad():
        chunks[0][0].weight.zero_()
        chunks[0][0].bias.zero_()
        chunks[1].weight.zero_()
        chunks[1].bias.zero_()
        chunks[0][1].weight[0] = 1.0  # half written
    with pytest.raises(ConfigError, match=r"^/hf: the HF weights did not set '1.weight' \(2 parameters not loaded"):
        require_every_parameter_loaded("/hf", chunks)
    with torch.no_grad():
        chunks[0][1].weight.fill_(1.0)
        chunks[0][1].bias.zero_()
    assert require_every_parameter_loaded("/hf", chunks) is chunks


@pytest.fixture(scope="module")
def one_rank_report(forwards):
    """The freeze options, bf16 and FP8 token-alignment checks: rank 0 of the ``forwards`` launch, alone in a
    process group of one after the layouts (tests/workers/policy_options.py)."""
    return json.loads((forwards / "options.json").read_text())


def test_freeze_options_and_bf16(one_rank_report):
    report = one_rank_report
    assert report["freeze_vision_tower"] == {"vision_tower": False, "projector": True, "language_model": True}
    assert report["freeze_projector"] == {"vision_tower": True, "projector": False, "language_model": True}
    assert report["freeze_language_model"] == {"vision_tower": True, "projector": True, "language_model": False}
    assert report["bf16_param_dtype"] == "torch.bfloat16"
    assert report["vision_attention"] == VISION_ATTENTION  # its parity with transformers' sdpa: test_policy_matches_transformers
    assert 0 < report["bf16_max_logprob_diff"] < 0.1, report


def test_streaming_export_of_a_bf16_checkpoint_in_many_shards(tiny_bf16_checkpoint, tmp_path):
    """A bf16 checkpoint exported at TP=2 in ~0.1 MiB shards: HF's sharded layout, every tensor bit-exact."""
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    bf16_hf, ckpt = tiny_bf16_checkpoint
    original = load_file(bf16_hf / "model.safetensors")
    assert {t.dtype for t in original.values()} == {torch.bfloat16}
    exported = tmp_path / "exported"
    run_cli("convert", "export", "--ckpt", str(ckpt), "--out", str(exported), "--tp", "2", "--max-shard-mib", "0.1",
            nproc=2)
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    shards = sorted(exported.glob("model-*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert not list(exported.glob("*.partial"))
    roundtrip = {}
    for shard in shards:
        tensors = load_file(shard)
        assert sum(t.nbytes for t in tensors.values()) <= 0.1 * 2**20 or len(tensors) == 1
        roundtrip.update(tensors)
    assert sorted(roundtrip) == sorted(original) and index["metadata"]["total_size"] == sum(
        t.nbytes for t in original.values())
    for name, tensor in original.items():
        assert roundtrip[name].dtype == torch.bfloat16 and torch.equal(roundtrip[name], tensor), name
    Qwen2_5_VLForConditionalGeneration.from_pretrained(exported)


def test_shards_are_written_as_soon_as_they_are_full(tmp_path):
    """At most one shard's tensors (plus the one that overflows it) are alive while the exporter writes."""
    import gc
    import weakref

    from safetensors.torch import load_file

    from nemo_viper.models.checkpoint import _write_safetensors_shards

    alive = weakref.WeakSet()
    peak = 0

    def tensors():
        nonlocal peak
        for i in range(20):
            gc.collect()
            peak = max(peak, len(alive))
            tensor = torch.full((256,), float(i))  # 1 KiB
            alive.add(tensor)
            yield f"w{i}", tensor

    _write_safetensors_shards(tensors(), tmp_path, max_shard_bytes=4 * 1024)
    assert peak <= 4 + 1
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [f"model-0000{i}-of-00005.safetensors"
                                                                        for i in range(1, 6)]
    assert torch.equal(load_file(tmp_path / "model-00005-of-00005.safetensors")["w19"], torch.full((256,), 19.0))


def test_fp8_token_alignment_padding_changes_nothing(one_rank_report):
    """Micro-batches padded to 128 (blockwise), 32 (mxfp8), 16 columns: same log-probs, same loss gradient."""
    report = one_rank_report["token_alignment"]
    columns = report["columns"]
    for recipe, multiple in (("blockwise", 128), ("mxfp8", 32), ("tensorwise", 16)):
        assert report["forward_columns"][recipe] == [columns + (-columns % multiple)], report
        assert report["logprob_diff"][recipe] < 1e-5, report
        assert report["grad_diff"][recipe] < 1e-5, report
