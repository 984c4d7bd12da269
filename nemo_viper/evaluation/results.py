"""Benchmark results like the paper's table: per-task scores, their average, MMStar's sub-domains; compare.

Pure functions over lmms-eval's result dicts (``results[task]["<metric>,<filter>"]``) and the summaries
they produce; the only side effects are :func:`write_summary` and :func:`write_comparison` (JSON, Markdown,
PNG). A benchmark's score is the mean of its :attr:`~nemo_viper.evaluation.benchmarks.Benchmark.score_metrics`
in percent; the average is the plain mean of the task scores present (``complete`` says whether all seven
are), as in the paper.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from nemo_viper.evaluation.benchmarks import BENCHMARKS, MMSTAR_DOMAINS, TASKS


def metric_value(task_results: dict, metric: str) -> float | None:
    """The value of ``metric`` under any filter (``"exact_match,flexible-extract"``), None if absent/N/A."""
    for key, value in task_results.items():
        if key.split(",")[0] == metric and isinstance(value, (int, float)) and not math.isnan(value):
            return float(value)
    return None


def task_score(task: str, results: dict) -> float | None:
    """The benchmark score (percent) of ``task`` from lmms-eval's ``results`` dict, None if not computed."""
    benchmark = BENCHMARKS[task]
    values = [metric_value(results.get(task, {}), m) for m in benchmark.score_metrics]
    if not values or any(v is None for v in values):
        return None
    return benchmark.scale * sum(values) / len(values)


def mmstar_domains(results: dict) -> dict[str, float | None]:
    """MMStar's six sub-domain scores (percent) as lmms-eval aggregates them: each the mean of its
    sub-categories' (``l2_category``) accuracies; None for a domain without questions."""
    mmstar = results.get("mmstar", {})
    return {d: (None if (v := metric_value(mmstar, d)) is None else 100.0 * v) for d in MMSTAR_DOMAINS}


def summarise(task_files: dict[str, dict], model: str) -> dict:
    """One checkpoint's summary from the per-task files (``{"results": lmms-eval results, ...}``)."""
    scores, notes, runs = {}, {}, {}
    domains = {d: None for d in MMSTAR_DOMAINS}
    for task in TASKS:
        if task not in task_files:
            continue
        data = task_files[task]
        scores[task] = task_score(task, data["results"])
        if task == "mmstar":
            domains = mmstar_domains(data["results"])
        if BENCHMARKS[task].notes:
            notes[task] = BENCHMARKS[task].notes
        runs[task] = {"model": data.get("model"), **data.get("key", {})}  # what produced it (provenance.run_key)
    present = [s for s in scores.values() if s is not None]
    return {
        "model": model,
        "scores": scores,
        "average": sum(present) / len(present) if present else None,
        "complete": len(present) == len(TASKS),
        "mmstar_domains": domains,
        "notes": notes,
        "runs": runs,
    }


def _fmt(value: float | str | None) -> str:
    return "n/a" if value is None else value if isinstance(value, str) else f"{value:.1f}"


def smoke_settings(run: dict) -> str | None:
    """``"max_new_tokens cap 8, limit 1"`` for a task run with a cap or a document limit, else None."""
    cap = (run.get("generation") or {}).get("max_new_tokens_cap")
    parts = ([f"max_new_tokens cap {cap}"] if cap else []) + ([f"limit {run['limit']}"] if run.get("limit") else [])
    return ", ".join(parts) or None


def summary_markdown(summary: dict) -> str:
    lines = [f"# Benchmarks: {summary['model']}", "", "| benchmark | score |", "|---|---|"]
    for task in TASKS:
        if task in summary["scores"]:
            lines.append(f"| {BENCHMARKS[task].title} | {_fmt(summary['scores'][task])} |")
    scored = sum(score is not None for score in summary["scores"].values())
    average = "average" if summary["complete"] else f"average of {scored} of {len(TASKS)}"
    lines += [f"| **{average}** | **{_fmt(summary['average'])}** |", ""]
    if "mmstar" in summary["scores"]:
        lines += ["MMStar sub-domains (each: mean over its sub-categories, as lmms-eval aggregates):", "",
                  "| " + " | ".join(MMSTAR_DOMAINS) + " |", "|" + "---|" * len(MMSTAR_DOMAINS),
                  "| " + " | ".join(_fmt(summary["mmstar_domains"][d]) for d in MMSTAR_DOMAINS) + " |", ""]
    smoke = {t: text for t, r in summary["runs"].items() if (text := smoke_settings(r))}
    if summary["notes"] or smoke:
        lines.append("Notes:")
        lines += [f"- {BENCHMARKS[t].title}: {note}" for t, note in summary["notes"].items()]
        lines += [f"- {BENCHMARKS[t].title}: run with {text} (not comparable to full runs)" for t, text in smoke.items()]
        lines.append("")
    return "\n".join(lines)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_summary(out: str | Path, summary: dict) -> dict:
    out = Path(out)
    _write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    _write_text(out / "results.md", summary_markdown(summary))
    return summary


def load_summary(path: str | Path) -> dict:
    """A summary from an eval output dir (``results.json`` inside) or the JSON file itself."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        from nemo_viper.errors import ConfigError

        raise ConfigError(f"{path}: no results.json (run nemo-viper eval --out {path} first)")
    return json.loads(file.read_text())


MISSING = "missing"  # a comparison cell for a task one result does not have (None: run, but no score)


def common_tasks(summaries: list[tuple[str, dict]]) -> list[str]:
    """The tasks every summary scored (the comparison's average is over these)."""
    return [t for t in TASKS if all(s["scores"].get(t) is not None for _, s in summaries)]


def comparison_rows(summaries: list[tuple[str, dict]]) -> list[tuple[str, list]]:
    """``(row name, value per checkpoint)`` for each task, the average over the common tasks and each MMStar
    sub-domain; a value is a score, None (run, not scored) or :data:`MISSING` (not run)."""
    def cell(summary: dict, task: str, value):
        return value if task in summary["scores"] else MISSING

    rows = [(BENCHMARKS[t].title, [cell(s, t, s["scores"].get(t)) for _, s in summaries])
            for t in TASKS if any(t in s["scores"] for _, s in summaries)]
    common = common_tasks(summaries)
    every = all(set(s["scores"]) == set(TASKS) for _, s in summaries) and len(common) == len(TASKS)
    name = "average" if every else f"average of the {len(common)} task{'s' * (len(common) != 1)} all have"
    rows.append((name, [sum(s["scores"][t] for t in common) / len(common) if common else None for _, s in summaries]))
    if any("mmstar" in s["scores"] for _, s in summaries):
        rows += [(f"MMStar {d}", [cell(s, "mmstar", s["mmstar_domains"].get(d)) for _, s in summaries])
                 for d in MMSTAR_DOMAINS]
    return rows


def _differing(summaries: list[tuple[str, dict]], task: str, field: str) -> bool:
    values = [json.dumps(s["runs"][task].get(field), sort_keys=True) for _, s in summaries if task in s.get("runs", {})]
    return len(set(values)) > 1


def comparison_notes(summaries: list[tuple[str, dict]]) -> list[str]:
    """What makes the columns not like for like: task sets, limits, backends, decoding settings, data."""
    notes = []
    tasks = [t for t in TASKS if any(t in s["scores"] for _, s in summaries)]
    for label, summary in summaries:
        if missing := [BENCHMARKS[t].title for t in tasks if t not in summary["scores"]]:
            notes.append(f"task sets differ: {label} has no {', '.join(missing)}")
    shared = [t for t in tasks if all(t in s["scores"] for _, s in summaries)]
    for field, what in (("limit", "document limits"), ("backend", "backends"), ("generation", "decoding settings"),
                        ("dataset_sha256", "datasets (dataset_sha256)"), ("lmms_eval_version", "lmms-eval versions")):
        if differing := [t for t in shared if _differing(summaries, t, field)]:
            values = "; ".join(f"{label}: {_run_field(s, differing[0], field)}" for label, s in summaries)
            notes.append(f"{what} differ for {', '.join(BENCHMARKS[t].title for t in differing)} ({values})")
    if unkeyed := [label for label, s in summaries if any("model_sha256" not in r for r in s.get("runs", {}).values())]:
        notes.append(f"{', '.join(unkeyed)}: results without a run key (written before results were keyed); "
                     "settings and data cannot be compared")
    if len(common_tasks(summaries)) < len(tasks):
        notes.append(f"the average is over the {len(common_tasks(summaries))} tasks every result scored, not each "
                     "result's own average")
    return notes


def _run_field(summary: dict, task: str, field: str) -> str:
    value = summary.get("runs", {}).get(task, {}).get(field)
    if field == "dataset_sha256" and value:
        return value[:12]
    return "none" if value is None else json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)


def comparison_markdown(summaries: list[tuple[str, dict]]) -> str:
    """Checkpoints side by side; each column after the first also shows its delta to the first (only where
    both have a score); then what differs between the results."""
    labels = [label for label, _ in summaries]
    header = "| benchmark | " + " | ".join([labels[0]] + [f"{label} (Δ vs {labels[0]})" for label in labels[1:]]) + " |"
    lines = [header, "|---|" + "---|" * len(labels)]
    for name, values in comparison_rows(summaries):
        cells = [_fmt(values[0])]
        for value in values[1:]:
            both = all(isinstance(v, float) for v in (value, values[0]))
            cells.append(_fmt(value) + (f" ({value - values[0]:+.1f})" if both else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if notes := comparison_notes(summaries):
        lines += ["", "Not like for like:", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def plot_comparison(summaries: list[tuple[str, dict]], out: str | Path) -> Path:
    """Grouped bars: one group per benchmark (and the average), one bar per checkpoint; a missing or unscored
    result has no bar but a mark ("missing" / "n/a") on the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in comparison_rows(summaries) if not r[0].startswith("MMStar ")]
    width = 0.8 / len(summaries)
    figure, axis = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 3.5))
    for i, (label, _) in enumerate(summaries):
        xs = [x + i * width for x in range(len(rows))]
        values = [r[1][i] for r in rows]
        axis.bar(xs, [v if isinstance(v, float) else math.nan for v in values], width, label=label)
        for x, value in zip(xs, values):
            if not isinstance(value, float):
                axis.text(x, 0.5, _fmt(value), rotation=90, ha="center", va="bottom", fontsize=6)
    axis.set_xticks([x + width * (len(summaries) - 1) / 2 for x in range(len(rows))], [r[0] for r in rows],
                    rotation=20, ha="right", fontsize=8)
    axis.set_ylabel("score (%)")
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    out = Path(out)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


SHOWN_CHANGES = 20  # changed samples listed per pair in compare.md (all of them in changed_samples.jsonl)


def changed_samples_markdown(first: str, label: str, changes: list[dict], compared: list[str]) -> list[str]:
    """Per task, how many verdicts went right -> wrong and wrong -> right, and the first changes."""
    if not compared:
        return [f"{label} vs {first}: no per-sample logs on both sides (results written before sample logging)", ""]
    lines = [f"### Samples whose verdict changed: {label} vs {first}", "",
             "| task | right -> wrong | wrong -> right |", "|---|---|---|"]
    for task in sorted({c["task"] for c in changes}):
        mine = [c for c in changes if c["task"] == task]
        lost = sum(c["before"]["score"] > c["after"]["score"] for c in mine)
        lines.append(f"| {task} | {lost} | {len(mine) - lost} |")
    lines += ["", f"Tasks compared: {', '.join(compared)}; {len(changes)} changed"
              + (f", the first {SHOWN_CHANGES} below" if len(changes) > SHOWN_CHANGES else "") + ":", "",
              f"| task | question | gold | {first}: extracted (score) | {label}: extracted (score) |",
              "|---|---|---|---|---|"]
    lines += [f"| {c['task']} | {c['question_id']} | {c['gold']} | {c['before']['extracted']} "
              f"({c['before']['score']:g}) | {c['after']['extracted']} ({c['after']['score']:g}) |"
              for c in changes[:SHOWN_CHANGES]]
    return lines + [""]


def write_comparison(summaries: list[tuple[str, dict]], out: str | Path, dirs: list[str | Path] | None = None) -> Path:
    """``out/compare.md`` (+ ``compare.json``, ``compare.png``); returns the Markdown path. With the results'
    output ``dirs``: also the samples whose verdict changed against the first, per result
    (``out/changed_samples.jsonl``, each line with ``label``; counts and the first ones in compare.md)."""
    from nemo_viper.evaluation.samples import changed_verdicts

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "compare.json", json.dumps([{"label": l, **s} for l, s in summaries], indent=2) + "\n")
    plot_comparison(summaries, out / "compare.png")
    sections, changed = [], []
    for (label, _), path in zip(summaries[1:], (dirs or [])[1:]):
        changes, compared = changed_verdicts(dirs[0], path)
        changed += [{"label": label, **change} for change in changes]
        sections += changed_samples_markdown(summaries[0][0], label, changes, compared)
    if dirs:
        _write_text(out / "changed_samples.jsonl", "".join(json.dumps(c, default=str) + "\n" for c in changed))
    _write_text(out / "compare.md", "# Benchmark comparison\n\n" + comparison_markdown(summaries)
                + "\n![comparison](compare.png)\n\n" + "\n".join(sections))
    return out / "compare.md"


def check_drop(previous: dict, current: dict, max_drop: float) -> float:
    """``current.average - previous.average``; raises :class:`EvalGuardStop` if it is below ``-max_drop``.

    Both summaries must cover the same tasks (an average over different tasks is no signal).
    """
    from nemo_viper.errors import ConfigError, EvalGuardStop

    if set(previous["scores"]) != set(current["scores"]):
        raise ConfigError(f"eval guard: tasks differ ({sorted(previous['scores'])} vs {sorted(current['scores'])})")
    if previous["average"] is None or current["average"] is None:
        raise ConfigError("eval guard: a summary has no average score")
    delta = current["average"] - previous["average"]
    if delta < -max_drop:
        raise EvalGuardStop(f"benchmark average dropped {previous['average']:.2f} -> {current['average']:.2f} "
                            f"({delta:+.2f} points, more than eval.guard_max_drop={max_drop}): stopping further rounds")
    return delta


def eval_output_problem(kind: str, out: Path, args: tuple[str, ...]) -> str | None:
    """What is missing from a loop phase's outputs (:func:`nemo_viper.run_state.output_problem`), or None.

    ``eval_data``: a local copy of every benchmark under ``out``. ``eval``: with ``--tasks`` (shard jobs), a
    result file per task; with ``--collect``, ``results.json`` covering the task files present.
    """
    from nemo_viper.errors import ConfigError
    from nemo_viper.evaluation.benchmarks import check_datasets, parse_tasks

    out = Path(out)
    if not out.exists():
        return "not started"
    if kind == "eval_data":
        try:
            check_datasets(TASKS, out)
        except ConfigError as exc:
            return str(exc)
        return None
    if "--tasks" in args:
        tasks = parse_tasks(args[args.index("--tasks") + 1])
        missing = [t for t in tasks if not (out / "tasks" / f"{t}.json").is_file()]
        return f"partial: no results yet for {', '.join(missing)}" if missing else None
    if not (out / "results.json").is_file():
        return f"{out}: no results.json"
    done = {p.stem for p in (out / "tasks").glob("*.json")}
    return None if set(load_summary(out)["scores"]) == done else f"{out}/results.json does not cover {sorted(done)}"
