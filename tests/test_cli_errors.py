"""Bad input to the conversion CLI: one clear line on stderr, exit status 2, before any model is built."""

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
