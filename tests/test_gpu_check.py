"""``benchmarks/gpu_check.py`` (``scripts/gpu_check.sh``) on the CPU: its dry run takes the 3B stage-2 GRPO step,
Megatron generation (math attention kernel disabled) and the kernel checks through the same functions as on the
GPU, at small shapes, so that the check cannot rot; its time budget skips parts and still prints the table; and
the step's shape is the recipe's unless the memory plan says it cannot fit the GPU."""

import json
import sys

import pytest

from launch import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import grpo_step_check  # noqa: E402

from nemo_viper.planning.memory import GIB, Architecture, Layout, training_phase  # noqa: E402
from nemo_viper.planning.recipe import PUBLISHED  # noqa: E402
from nemo_viper.recipes import qwen25vl_3b  # noqa: E402


@pytest.mark.slow
def test_dry_run_runs_the_step_generation_and_kernels(tmp_path, capsys):
    rows = gpu_check.main(["--dry-run", "--work", str(tmp_path)])
    results = {row["check"]: row for row in rows}
    step = next(row for check, row in results.items() if check.startswith("RL stage 2 GRPO step"))
    assert step["result"] == "PASS", rows
    assert "2 prompts x n=3" in step["check"], step  # the dry run's recipe overrides
    assert results["Megatron generation without the math attention kernel"]["result"] == "PASS", rows
    assert "FLOP per step" in results["GRPO step MFU (model FLOPs / step time / dense bf16 peak)"]["value"]
    assert results["decode attention without the math kernel"]["result"] == "PASS", rows
    skipped = [row["check"] for row in rows if row["result"] == "SKIP"]
    assert skipped == [f"part {name}" for name in ("context", "checkpoint", "parity", "grpo", "encoder", "pytest")]
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == rows
    assert "| RL stage 2 GRPO step" in capsys.readouterr().out


def test_spent_budget_skips_every_part_and_prints_the_table(tmp_path, capsys):
    rows = gpu_check.main(["--dry-run", "--work", str(tmp_path), "--budget", "0"])
    assert [(row["check"], row["result"]) for row in rows if "time budget" in row["value"]] == [
        ("part step", "SKIP"), ("part kernels", "SKIP")]
    assert capsys.readouterr().out.startswith("| check | result | value | seconds |")


def test_step_shape_is_the_recipes_unless_the_plan_says_it_cannot_fit():
    arch = Architecture.from_hf_config(PUBLISHED["Qwen2.5-VL-3B"])
    recipe = grpo_step_check.recipe_step_shape(qwen25vl_3b())
    assert recipe.images_per_prompt == 2 and recipe.reward_params == 0  # stage 2; no reward model in the check
    layout = Layout(1, 1, 1)
    h200 = 143771 * 2**20  # total_memory of the H100 / H200 (nvidia-smi)
    assert grpo_step_check.fit_device(arch, layout, recipe, h200) == (recipe, [])
    h100 = 81559 * 2**20
    shape, changes = grpo_step_check.fit_device(arch, layout, recipe, h100)
    assert changes == ["micro_batch_size=1", "recompute=full"]
    assert (shape.micro_batch_size, shape.recompute) == (1, "full")
    assert training_phase(arch, layout, shape).total <= h100 < training_phase(arch, layout, recipe).total
    assert training_phase(arch, layout, recipe).total / GIB > 100  # one GPU holds the whole optimizer state


def test_peak_flops_by_device_name():
    assert grpo_step_check.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert grpo_step_check.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert grpo_step_check.peak_flops("NVIDIA H200") == 989e12
    assert grpo_step_check.peak_flops("Tesla T4") is None
