"""The run report (nemo_viper.report) from crafted run files: the alerts of each stage's metrics history and
"What the policy says" (held-out answers before and after each stage)."""

from __future__ import annotations

import json

from nemo_viper.report import write_report
from nemo_viper.training.alerts import AlertConfig


def write_stage(stage_dir, records, examples=None):
    stage_dir.mkdir(parents=True)
    (stage_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if examples:
        summary = {"prompts": 2, "greedy": {"total": 0.5, "format": 1.0, "correctness": 0.4, "recall": 0.3},
                   "sampled": {"total": 0.4, "format": 1.0, "correctness": 0.3, "recall": 0.3}}
        (stage_dir / "heldout.json").write_text(json.dumps(
            {when: {"step": step, "samples_per_prompt": 2, **summary, "examples": examples[when]}
             for when, step in (("before", 0), ("after", len(records)))}))


def example(sample_id, answer, reward, form):
    return {"sample_id": sample_id, "prompt": "<image>\n<image>\nWhat changed?", "ground_truth": ["x"],
            "answer": answer, "reward": reward, "format": form, "correctness": reward}


def test_report_lists_each_stages_alerts_and_what_the_policy_says(tmp_path):
    healthy = [{"step": s, "reward/mean": 0.3 + 0.02 * s, "reward/format": 0.9} for s in range(1, 9)]
    # stage 2 as the embedded default ran it: the mean reward climbs while the format reward collapses
    collapsing = [{"step": s, "reward/mean": 0.38 + 0.035 * s, "reward/format": 0.81 if s < 4 else 0.09}
                  for s in range(1, 9)]
    write_stage(tmp_path / "round1" / "rl1", healthy)
    write_stage(tmp_path / "round1" / "rl2", collapsing, {
        "before": [example("a", "<think>look</think><answer>A red cup was added.</answer>", 0.61, 1.0),
                   example("b", "<think>x</think><answer>The sky | darkened.</answer>", 0.4, 1.0)],
        "after": [example("b", "The sky darkened.\nAnd more.", 0.55, 0.0),
                  example("a", "A red cup was added.", 0.7, 0.0)]})

    text = write_report(tmp_path, rounds=1, alert_gap=0.5).read_text()

    assert "**Alerts (rl1):**" not in text
    alerts = text.split("**Alerts (rl2):**", 1)[1].split("\n\n", 2)[1]
    assert alerts.splitlines() == [
        "- step 4, `reward/format`: reward/format fell by 0.36 over 4 steps from step 4 while reward/mean rose: "
        "the policy trades this part of the reward for the others"]
    says = text.split("What the policy says", 1)[1]
    rows = [line for line in says.splitlines() if line.startswith("| `")]
    assert rows == [
        "| `b`: <image> ⏎ <image> ⏎ What changed? | <think>x</think><answer>The sky \\| darkened.</answer> "
        "(0.40, 1, 0.40) | The sky darkened. ⏎ And more. (0.55, 0, 0.55) |",
        "| `a`: <image> ⏎ <image> ⏎ What changed? | <think>look</think><answer>A red cup was added.</answer> "
        "(0.61, 1, 0.61) | A red cup was added. (0.70, 0, 0.70) |"]
    # thresholds come from the run's logger.alerts
    quiet = write_report(tmp_path, rounds=1, alert_gap=0.5, alerts=AlertConfig(part_drop=0.9)).read_text()
    assert "**Alerts" not in quiet
