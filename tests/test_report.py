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


def test_report_scores_the_starting_policy_and_every_round_on_the_fixed_set(tmp_path):
    """rounds=2: one table and one plot of base, round 1 and round 2 on the same sample ids, with the benchmark
    average where the loop evaluated a policy; a score on an earlier set (a superseded round-1 synthesis) is
    not shown."""
    from nemo_viper.evaluation.progress import FixedSet, write_score, write_set
    from nemo_viper.evaluation.results import summarise

    synth1 = tmp_path / "round1" / "synth1"
    synth1.mkdir(parents=True)
    (synth1 / "manifest.json").write_text('{"task": "caption_refine"}')
    fixed = FixedSet.of_dataset(synth1, ["s3", "s7", "s9"])
    write_set(tmp_path / "progress", fixed)
    stale = FixedSet(fixed.data, "an earlier manifest", ("s1", "s2", "s3"))
    for label, policy, total, scored_on in (("base", "base_model", 0.25, fixed),
                                            ("round1", "round1/rl2/checkpoints/step_0000008", 0.5, fixed),
                                            ("round2", "round2/rl2/checkpoints/step_0000008", 0.75, stale)):
        means = {"total": total, "format": 1.0, "correctness": total - 0.1, "recall": total}
        write_score(tmp_path / "progress", label, str(tmp_path / policy), "key", scored_on,
                    {"samples_per_prompt": 8, "prompts": 3, "greedy": means, "sampled": means, "examples": []})
    text = write_report(tmp_path, rounds=2, alert_gap=0.5).read_text()
    section = text.split("## Across rounds", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| base") or line.startswith("| round")]
    assert rows == ["| base | `base_model` | 0.250 | +0.000 | 0.250 | +0.000 | 0.150 | 1.000 | n/a |",
                    "| round1 | `round1/rl2/checkpoints/step_0000008` | 0.500 | +0.250 | 0.500 | +0.250 | 0.400 | "
                    "1.000 | n/a |"]
    assert "the same 3 prompts of `round1/synth1`" in section and "8 sampled answers" in section

    write_score(tmp_path / "progress", "round2", str(tmp_path / "round2/rl2/checkpoints/step_0000008"), "key", fixed,
                {"samples_per_prompt": 8, "prompts": 3, "greedy": {"total": 0.625, "format": 0.5, "correctness": 0.5,
                                                                   "recall": 0.5},
                 "sampled": {"total": 0.375, "format": 0.5, "correctness": 0.25, "recall": 0.25}, "examples": []})
    for name, average in (("base", 40.0), ("round2", 42.5)):
        (tmp_path / "eval" / name).mkdir(parents=True)
        (tmp_path / "eval" / name / "results.json").write_text(json.dumps(
            {**summarise({}, name), "scores": {"mmstar": average}, "average": average}))
    section = write_report(tmp_path, rounds=2, alert_gap=0.5).read_text().split("## Across rounds", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| base") or line.startswith("| round")]
    assert [row.split(" | ")[0] for row in rows] == ["| base", "| round1", "| round2"]
    assert rows[0].endswith("| 40.00 |") and rows[1].endswith("| n/a |")
    assert rows[2] == ("| round2 | `round2/rl2/checkpoints/step_0000008` | 0.625 | +0.375 | 0.375 | +0.125 | 0.250 | "
                       "0.500 | 42.50 |")
    assert "![across rounds](across_rounds.png)" in section and (tmp_path / "report" / "across_rounds.png").is_file()


def test_the_report_phase_writes_the_report_with_the_runs_own_settings(tmp_path):
    """The plan's last phase, ``nemo-viper report RUN_DIR`` (a Slurm job under ``launch``): it reads ``rounds``
    and the alert thresholds from the run's config files, and its output verifies only once written."""
    from nemo_viper.cli import main
    from nemo_viper.orchestration import plan, write_run_files
    from nemo_viper.recipes import recipe
    from nemo_viper.run_state import output_problem

    collapsing = [{"step": s, "reward/mean": 0.38 + 0.035 * s, "reward/format": 0.81 if s < 4 else 0.09}
                  for s in range(1, 9)]
    for r in (1, 2):
        write_stage(tmp_path / f"round{r}" / "rl2", collapsing)
    for overrides, alerted in ((["logger.alerts.part_drop=0.3"], True), (["logger.alerts.part_drop=0.9"], False)):
        config = recipe("tiny", f"run_dir={tmp_path}", "rounds=2", *overrides)
        write_run_files(config)
        report = plan(config)[-1]
        assert (report.name, report.kind, report.depends_on) == ("report", "report", ("export",))
        assert output_problem(report) == ("not started" if alerted else None)
        assert main(list(report.args)) == 0
        assert output_problem(report) is None
        text = (tmp_path / "report" / "report.md").read_text()
        assert "## Round 2" in text and ("**Alerts (rl2):**" in text) == alerted
