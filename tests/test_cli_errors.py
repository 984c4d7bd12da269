"""Bad input to the CLI: one clear line on stderr, exit status 2, before any model is built (and, for the cheap
checks, before any heavy import)."""

import io
import json

import pytest

from nemo_viper.cli import main


def run_main(capsys, *argv):
    status = main(list(argv))
    err = capsys.readouterr().err.strip()
    return status, err


def test_missing_checkpoint_dir(capsys, tmp_path):
    status, err = run_main(capsys, "convert", "export", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert status == 2 and err == f"error: checkpoint directory not found: {tmp_path / 'nope'}"


def test_not_a_policy_checkpoint(capsys, tmp_path):
    status, err = run_main(capsys, "convert", "export", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o"))
    assert status == 2 and "is not a nemo_viper policy checkpoint" in err and str(tmp_path) in err


def test_hf_dir_without_config(capsys, tmp_path):
    status, err = run_main(capsys, "convert", "import", "--hf", str(tmp_path), "--out", str(tmp_path / "o"))
    assert status == 2 and err == f"error: {tmp_path} has no config.json: not a Hugging Face checkpoint directory"


def test_tp_not_dividing_heads(capsys, tiny_hf_dir, tmp_path):
    status, err = run_main(capsys, "convert", "import", "--hf", str(tiny_hf_dir), "--out", str(tmp_path / "o"), "--tp", "3")
    assert status == 2 and err == "error: tensor_parallel=3 does not divide num_attention_heads=4"


def test_non_qwen25_vl_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    status, err = run_main(capsys, "convert", "import", "--hf", str(tmp_path), "--out", str(tmp_path / "o"))
    assert status == 2 and "is not Qwen2.5-VL" in err and "LlamaForCausalLM" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("argv", [["convert"], ["convert", "import", "--hf", "x"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


# Modules a cheap check must not need: each costs seconds to import (megatron ~10 CPU-s, transformers ~5).
HEAVY = ("megatron", "transformers", "diffusers", "vllm", "nvidia.dali", "nemo_run", "torchvision", "lmms_eval")
# Runs the CLI's main() on each case in one fresh process and reports, per case, its exit status, its stderr
# and which heavy modules had been imported by then.
_CASES_SCRIPT = """
import contextlib, io, json, sys
from nemo_viper.cli import main
heavy = json.loads(sys.argv[2])
report = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(argv)
    report.append([status, err.getvalue(), sorted({m.split('.')[0] for m in sys.modules for h in heavy
                                                   if m == h or m.startswith(h + '.')})])
print(json.dumps(report))
"""


def fake_checkpoint(path, hf_dir, files):
    """A directory laid out like a policy checkpoint with a crafted ``model/.metadata`` (never unpickled)."""
    import shutil

    from nemo_viper.models.checkpoint_dir import FILES_KEY, FORMAT, METADATA_FILE

    (path / "model").mkdir(parents=True)
    (path / "model" / ".metadata").write_bytes(b"crafted")
    shutil.copytree(hf_dir, path / "hf", ignore=shutil.ignore_patterns("*.safetensors"))
    (path / METADATA_FILE).write_text(json.dumps({"format": FORMAT, **({FILES_KEY: files} if files else {})}))
    return path


def test_cheap_checks_fail_before_any_heavy_import(tiny_hf_dir, tmp_path):
    """Bad paths, untrusted checkpoints, bad config values and unusable datasets are refused by ``train``,
    ``synth``, ``convert``, ``eval``, ``launch`` and ``run`` with one line, before megatron, transformers or
    any other heavy package is imported (each of those costs seconds: #17 item 9)."""
    import hashlib
    import tarfile

    import skimage.data
    from launch import run_ranks
    from PIL import Image

    from nemo_viper.data import CaptionRefineRecord, ShardWriter
    from nemo_viper.data.shards import ShardInfo, write_manifest

    data = tmp_path / "stage1"
    writer = ShardWriter(data, "stage1", samples_per_shard=2, task="caption_refine")
    image = Image.fromarray(skimage.data.astronaut()).resize((32, 32))
    writer.write(CaptionRefineRecord(id="cap-0", images=["img"], initial_caption="A photo.", refinements=["It is."],
                                     refined_caption="A photo.", source="skimage:astronaut", synth_ckpt="tiny"), [image])
    writer.finalize()
    invalid = tmp_path / "invalid"
    invalid.mkdir()
    with tarfile.open(invalid / "bad-000000.tar", "w") as tar:
        body = b"not json"
        info = tarfile.TarInfo("s0.json")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    write_manifest(invalid, "caption_refine",
                   [ShardInfo("bad-000000.tar", 1, hashlib.sha256((invalid / "bad-000000.tar").read_bytes()).hexdigest())])
    unlisted = fake_checkpoint(tmp_path / "unlisted", tiny_hf_dir, files=None)
    tampered = fake_checkpoint(tmp_path / "tampered", tiny_hf_dir, files={"model/.metadata": "0" * 64})
    out, hf = str(tmp_path / "out"), str(tiny_hf_dir)
    train = ["train", "--stage", "1", "--out", out]
    cases = {  # argv -> a part of the expected one-line error
        (*train, "--data", str(tmp_path / "nope"), "--policy", hf): f"dataset manifest {tmp_path / 'nope'}/manifest.json is missing",
        (*train, "--data", str(invalid), "--policy", hf): f"dataset {invalid} holds no usable sample",
        ("train", "--stage", "2", "--out", out, "--data", str(data), "--policy", hf): "stage 2 trains on 'visual_op' data",
        (*train, "--data", str(data), "--policy", str(tmp_path / "nope")): "checkpoint directory not found",
        (*train, "--data", str(data), "--policy", str(unlisted)): f"{unlisted} has no file manifest",
        (*train, "--data", str(data), "--policy", str(tampered)): f"{tampered} does not match its file manifest",
        (*train, "--data", str(data), "--policy", hf, "rl.grpo.loss.eps_low=1.5"): "rl.grpo.loss.eps_low=1.5 must be < 1",
        (*train, "--data", str(data), "--policy", hf, "--tp", "3"): "tensor_parallel=3 does not divide",
        ("convert", "export", "--ckpt", str(tmp_path / "nope"), "--out", out): "checkpoint directory not found",
        ("convert", "export", "--ckpt", str(tampered), "--out", out): f"{tampered} does not match its file manifest",
        ("synth", "--stage", "1", "--policy", hf, "--out", out, "--images", str(tmp_path / "nope")): "does not exist",
        ("synth", "--stage", "1", "--policy", str(unlisted), "--out", out): f"{unlisted} has no file manifest",
        ("synth", "--stage", "1", "--policy", hf, "--out", out, "vlm.precision=fp7"): "precision='fp7' is not one of",
        ("synth", "--stage", "2", "--policy", hf, "--out", out, "--stage1", str(tmp_path / "nope")): "manifest.json is missing",
        ("eval", "--model", hf, "--dataset-root", str(tmp_path / "nope"), "--out", out): "no local dataset at",
        ("launch", "--recipe", "tiny", "--dry-run", "rl.steps=0"): "rl.steps=0 must be >= 1",
        ("run", "--recipe", "tiny", f"run_dir={out}", "rl.nope=1"): "Key 'nope' not in 'RLConfig'",
    }
    result = run_ranks(["-c", _CASES_SCRIPT, json.dumps(list(cases)), json.dumps(HEAVY)], timeout=120)
    for (argv, expected), (status, err, heavy) in zip(cases.items(), json.loads(result.stdout.splitlines()[-1])):
        assert not heavy, f"{' '.join(argv[:2])} imported {heavy} before failing with: {err.strip()}"
        assert status == 2 and err.startswith("error: ") and expected in err and err.count("\n") == 1, (argv, err)
