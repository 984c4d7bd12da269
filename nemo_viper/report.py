"""The run report: ``run_dir/report/report.md`` with PNG plots, from the files the phases wrote.

Per round: reward and its breakdown (format, correctness, recall) per step for both RL stages, precision
against recall and answer-sentence counts, response length, clip fractions, the samples each RL stage
skipped (by reason); the alerts of each stage's metrics history (:mod:`nemo_viper.training.alerts`: a reward
part falling while the total rises, precision far above recall, entropy collapse, clipping, log-prob
mismatch, growing truncation), each with the step it began; "What the policy says": the greedy answers to a
few held-out prompts before and after each stage; the synthesis manifests' counts (inputs, samples
written, skipped and filtered by reason) and time per sub-step; the held-out self-evaluation of both stages
(reward before/after, greedy and sampled, table + plot). Across rounds: the starting policy and every round's
final policy on one fixed held-out set (:mod:`nemo_viper.evaluation.progress`), with their benchmark averages
when the loop evaluated them (table + plot). With benchmark phases: the benchmark table of the base model and
of every round side by side, with deltas and a plot (:mod:`nemo_viper.evaluation.results`).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

from nemo_viper.training.alerts import AlertConfig, detect_alerts
from nemo_viper.training.metrics_log import read_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REWARD_KEYS = ("reward/mean", "reward/format", "reward/correctness", "reward/recall")
PANELS = {
    "reward": REWARD_KEYS,
    "precision_vs_recall": ("reward/precision", "reward/recall"),
    "answer_sentences": ("reward/answer_sentences",),
    "response_length": ("response_length/mean",),
    "clip_fractions": ("train/clip_frac_low", "train/clip_frac_high"),
}


def _metrics(run_dir: Path) -> list[dict]:
    return [record for _, record in read_metrics(run_dir / "metrics.jsonl")]


def _manifest(dataset: Path) -> dict | None:
    path = dataset / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _plot(stages: dict[str, list[dict]], keys: tuple[str, ...], title: str, out: Path) -> None:
    figure, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.2), squeeze=False)
    for axis, (stage, records) in zip(axes[0], stages.items()):
        steps = [r["step"] for r in records]
        for key in keys:
            axis.plot(steps, [r.get(key, float("nan")) for r in records], marker="o", markersize=3, label=key)
        axis.set_title(f"{stage}: {title}")
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def _plot_synthesis(manifests: dict[str, dict], out: Path) -> None:
    figure, axis = plt.subplots(figsize=(8, 3.2))
    labels, values = [], []
    for name, manifest in manifests.items():
        labels.append(f"{name}: written")
        values.append(manifest.get("total_samples", 0))
        for kind in ("skipped", "filtered"):
            for reason, count in sorted((manifest.get(kind) or {}).items()):
                labels.append(f"{name}: {kind} {reason}")
                values.append(count)
    axis.barh(labels, values)
    axis.set_xlabel("samples")
    axis.set_title("synthesis counts")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def _skipped(records: list[dict]) -> str:
    """The run's skipped-sample total by reason, from its last metrics record (``data/skipped/<reason>``)."""
    last = records[-1] if records else {}
    reasons = {k.rsplit("/", 1)[1]: int(v) for k, v in last.items() if k.startswith("data/skipped/") and v}
    return f"{int(last.get('data/skipped', 0))} {json.dumps(reasons)}" if "data/skipped" in last else "n/a"


def _last(records: list[dict], key: str) -> str:
    return f"{records[-1][key]:.3f}" if records and key in records[-1] else "n/a"


def _heldout(round_dir: Path) -> dict[str, dict]:
    from nemo_viper.evaluation.heldout import read_record

    records = {name: read_record(round_dir / name / "heldout.json") for name in ("rl1", "rl2")}
    return {name: r for name, r in records.items() if "before" in r and "after" in r}


def _plot_heldout(records: dict[str, dict], out: Path) -> None:
    figure, axis = plt.subplots(figsize=(6, 3.2))
    labels = [f"{stage} {kind}" for stage in records for kind in ("greedy", "sampled")]
    for offset, when in ((-0.2, "before"), (0.2, "after")):
        values = [records[stage][when][kind]["total"] for stage in records for kind in ("greedy", "sampled")]
        axis.bar([i + offset for i in range(len(labels))], values, 0.4, label=when)
    axis.set_xticks(range(len(labels)), labels, fontsize=8)
    axis.set_ylabel("held-out reward")
    axis.set_title("held-out self-evaluation")
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def _heldout_section(records: dict[str, dict], r: int, out: Path) -> list[str]:
    lines = ["Held-out self-evaluation (ViPER reward on each stage's held-out split, never trained on):", "",
             "| stage | prompts | greedy before | greedy after | Δ | sampled before | sampled after | Δ | "
             "correctness before → after (sampled) |", "|---|---|---|---|---|---|---|---|---|"]
    for stage, rec in records.items():
        b, a = rec["before"], rec["after"]
        lines.append(
            f"| {stage} | {a['prompts']} | {b['greedy']['total']:.3f} | {a['greedy']['total']:.3f} | "
            f"{a['greedy']['total'] - b['greedy']['total']:+.3f} | {b['sampled']['total']:.3f} | "
            f"{a['sampled']['total']:.3f} | {a['sampled']['total'] - b['sampled']['total']:+.3f} | "
            f"{b['sampled']['correctness']:.3f} → {a['sampled']['correctness']:.3f} |")
    _plot_heldout(records, out / f"round{r}_heldout.png")
    return lines + ["", f"![held-out](round{r}_heldout.png)", ""]


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` as one table cell: newlines shown as ``⏎``, pipes escaped, cut at ``limit`` characters."""
    text = text.strip().replace("\n", " ⏎ ").replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + " …"


def _policy_says_section(records: dict[str, dict]) -> list[str]:
    """The greedy answers to the same held-out prompts before and after each stage, with their rewards."""
    lines = []
    for stage, rec in records.items():
        before = {e["sample_id"]: e for e in rec["before"].get("examples", [])}
        after = [e for e in rec["after"].get("examples", []) if e["sample_id"] in before]
        if not after:
            continue
        if not lines:
            lines = ["What the policy says (greedy answers to held-out prompts; reward = total, format, "
                     "correctness):", ""]
        lines += [f"| {stage}: prompt | before | after |", "|---|---|---|"]
        for example in after:
            old = before[example["sample_id"]]
            cells = [f"`{example['sample_id']}`: {_one_line(example['prompt'], 160)}"]
            for e in (old, example):
                cells.append(f"{_one_line(e['answer'])} ({e['reward']:.2f}, {e['format']:.0f}, {e['correctness']:.2f})")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _benchmark_average(run_dir: Path, label: str) -> float | None:
    from nemo_viper.evaluation.results import load_summary

    path = run_dir / "eval" / label
    return load_summary(path)["average"] if (path / "results.json").is_file() else None


def _plot_across_rounds(records: list[dict], averages: list[float | None], out: Path) -> None:
    panels = 2 if any(a is not None for a in averages) else 1
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.2), squeeze=False)
    labels = [r["label"] for r in records]
    for kind in ("greedy", "sampled"):
        axes[0][0].plot(labels, [r[kind]["total"] for r in records], marker="o", label=f"{kind} reward")
    axes[0][0].plot(labels, [r["sampled"]["correctness"] for r in records], marker="o", linestyle="--",
                    label="sampled correctness")
    axes[0][0].set_title("fixed held-out set")
    axes[0][0].set_ylabel("ViPER reward")
    if panels == 2:
        axes[0][1].plot(labels, [float("nan") if a is None else a for a in averages], marker="o")
        axes[0][1].set_title("benchmark average")
    for axis in axes[0]:
        axis.set_xlabel("policy")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def _across_rounds_section(run_dir: Path, rounds: int, out: Path) -> list[str]:
    """The starting policy and every round's final policy on the run's fixed held-out set
    (:mod:`nemo_viper.evaluation.progress`), with the benchmark average where the loop evaluated them."""
    from nemo_viper.evaluation.progress import scores_across_rounds

    fixed, records = scores_across_rounds(run_dir / "progress", rounds)
    if not records:
        return []
    averages = [_benchmark_average(run_dir, r["label"]) for r in records]
    start = records[0]
    data = Path(fixed.data)
    source = data.relative_to(run_dir.absolute()) if data.is_relative_to(run_dir.absolute()) else data
    lines = ["## Across rounds", "",
             f"The starting policy and each round's final policy on one fixed held-out set: the same "
             f"{len(fixed.sample_ids)} prompts of `{source}` for every row (chosen once, recorded by sample id in "
             f"`progress/heldout_set.json`), never trained on; ViPER reward of one greedy answer and of "
             f"{start['samples_per_prompt']} sampled answers per prompt. Δ: against the first row.", "",
             "| policy | checkpoint | greedy | Δ | sampled | Δ | sampled correctness | greedy format | "
             "benchmark average |", "|---|---|---|---|---|---|---|---|---|"]
    for record, average in zip(records, averages):
        policy = Path(record["policy"])
        shown = policy.relative_to(run_dir.absolute()) if policy.is_relative_to(run_dir.absolute()) else policy
        greedy, sampled = record["greedy"]["total"], record["sampled"]["total"]
        lines.append(f"| {record['label']} | `{shown}` | {greedy:.3f} | {greedy - start['greedy']['total']:+.3f} | "
                     f"{sampled:.3f} | {sampled - start['sampled']['total']:+.3f} | "
                     f"{record['sampled']['correctness']:.3f} | {record['greedy']['format']:.3f} | "
                     f"{'n/a' if average is None else f'{average:.2f}'} |")
    _plot_across_rounds(records, averages, out / "across_rounds.png")
    return lines + ["", "![across rounds](across_rounds.png)", ""]


def _benchmark_section(run_dir: Path, rounds: int, out: Path) -> list[str]:
    from nemo_viper.evaluation.results import comparison_markdown, load_summary, plot_comparison, smoke_settings

    names = ["base"] + [f"round{r}" for r in range(1, rounds + 1)]
    summaries = [(n, load_summary(run_dir / "eval" / n)) for n in names if (run_dir / "eval" / n / "results.json").is_file()]
    if not summaries:
        return []
    plot_comparison(summaries, out / "benchmarks.png")
    lines = ["## Benchmarks", "", comparison_markdown(summaries), "![benchmarks](benchmarks.png)", ""]
    notes = {note for _, s in summaries for note in s["notes"].values()}
    capped = [n for n, s in summaries if any(smoke_settings(r) for r in s["runs"].values())]
    lines += [f"- {note}" for note in sorted(notes)]
    lines.append("- per-sample logs (prompt, answer, extracted answer, gold, score): " + ", ".join(
        f"[{n}](../eval/{n}/samples/)" for n, _ in summaries))
    if capped:
        lines.append(f"- {', '.join(capped)}: run with a max_new_tokens cap or a document limit (not comparable to "
                     "full runs)")
    from nemo_viper.orchestration import stopped_after_round

    if stopped_after_round(run_dir) is not None:
        lines.append(f"- the benchmark guard (eval.guard_max_drop) stopped the loop after round "
                     f"{stopped_after_round(run_dir)}")
    return lines + [""]


def write_report(run_dir: str | Path, rounds: int, alert_gap: float, alerts: AlertConfig | None = None) -> Path:
    """Write the report for ``rounds`` rounds of the run in ``run_dir``; returns ``report.md``'s path.

    ``alert_gap``: the run's ``reward.alert_gap``; ``alerts``: its ``logger.alerts`` thresholds."""
    from nemo_viper.orchestration import RunPaths

    alerts = alerts or AlertConfig()
    run_dir = Path(run_dir)
    out = RunPaths(run_dir).report  # the report phase's output, which its record verifies
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# ViPER run report: {run_dir.name}", ""]
    for r in range(1, rounds + 1):
        round_dir = run_dir / f"round{r}"
        stages = {name: _metrics(round_dir / name) for name in ("rl1", "rl2")}
        stages = {name: records for name, records in stages.items() if records}
        manifests = {name: _manifest(round_dir / name) for name in ("synth1", "synth2")}
        manifests = {name: m for name, m in manifests.items() if m}
        lines += [f"## Round {r}", ""]
        heldout = _heldout(round_dir)
        if heldout:
            lines += _heldout_section(heldout, r, out)
            lines += _policy_says_section(heldout)
        if manifests:
            _plot_synthesis(manifests, out / f"round{r}_synthesis.png")
            lines += ["| dataset | inputs | samples | skipped | filtered | time per sub-step (s) |", "|---|---|---|---|---|---|"]
            for name, m in manifests.items():
                timings = ", ".join(f"{k} {v:.1f}" for k, v in (m.get("timings_s") or {}).items())
                lines.append(f"| {name} | {m.get('inputs', 'n/a')} | {m.get('total_samples', 0)} | "
                             f"{json.dumps(m.get('skipped') or {})} | {json.dumps(m.get('filtered') or {})} | {timings} |")
            lines += ["", f"![synthesis](round{r}_synthesis.png)", ""]
        if stages:
            lines += ["| stage | steps | reward (last) | format | correctness | recall | response length | "
                      "samples skipped |", "|---|---|---|---|---|---|---|---|"]
            for name, records in stages.items():
                lines.append(f"| {name} | {len(records)} | {_last(records, 'reward/mean')} | "
                             f"{_last(records, 'reward/format')} | {_last(records, 'reward/correctness')} | "
                             f"{_last(records, 'reward/recall')} | {_last(records, 'response_length/mean')} | "
                             f"{_skipped(records)} |")
            lines.append("")
            for name, records in stages.items():
                found = detect_alerts(records, alerts, alert_gap)
                if found:
                    lines += [f"**Alerts ({name}):**", ""]
                    lines += [f"- step {a.step}, `{a.metric}`: {a.message}" for a in found] + [""]
            for panel, keys in PANELS.items():
                _plot(stages, keys, panel.replace("_", " "), out / f"round{r}_{panel}.png")
                lines += [f"![{panel}](round{r}_{panel}.png)", ""]
    lines += _across_rounds_section(run_dir, rounds, out)
    lines += _benchmark_section(run_dir, rounds, out)
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
