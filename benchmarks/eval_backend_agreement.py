"""``nemo-viper eval`` with the ``qwen2_5_vl`` (transformers) and ``vllm`` backends on the same documents:
per-document agreement, and the first cause of each disagreement.

One checkpoint, one MMStar-schema local dataset (``tiny_datasets``: a coloured shape, four colour options;
images of the ``--image-sizes`` in turn), greedy decoding, each backend in its own process (``evaluate``
under ``backend_trace.recording``). Prints the agreement table (documents, equal generated tokens, equal
answers, equal verdicts, both scores) and, per disagreeing document, the cause
(``backend_agreement.compare_document``): prompt ids, image grid / pixels, dtype, stop settings, repetition
penalty, or -- with all inputs equal -- the first diverging token and each backend's log-prob margin there.

``--dtype float32`` runs both backends in fp32 instead of the harness's bf16 (vLLM: ``dtype`` model arg;
transformers: lmms-eval's ``qwen2_5_vl`` always loads bf16, so its ``from_pretrained`` is patched here), to
see which disagreements bf16 rounding causes.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/eval_backend_agreement.py --work /tmp/agree [--model HF_DIR]
        [--rows 42] [--image-sizes 56x56,150x100,333x250,640x427] [--dtype float32] [--warm-start-steps 150]

Without ``--model`` it builds the tiny checkpoint warm-started for ``--warm-start-steps`` (the tiny recipe's
starting policy) into ``WORK/model``. Results: ``WORK/agreement.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import torch

BACKENDS = ("qwen2_5_vl", "vllm")


@contextlib.contextmanager
def transformers_dtype(dtype: str):
    """lmms-eval's ``qwen2_5_vl`` loads the model with ``torch_dtype="bfloat16"``; load it in ``dtype``."""
    from transformers import Qwen2_5_VLForConditionalGeneration as HfQwen

    load = HfQwen.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        return load(cls, *args, **{**kwargs, "torch_dtype": dtype})

    with mock.patch.object(HfQwen, "from_pretrained", classmethod(from_pretrained)):
        yield


def run_backend(backend: str, model: Path, data: Path, out: Path, limit: int, dtype: str) -> None:
    """``evaluate`` MMStar with ``backend`` in ``dtype``, its traces saved to ``out/traces.pt``."""
    import shutil
    from dataclasses import asdict

    from nemo_viper.evaluation.backend_trace import recording
    from nemo_viper.evaluation.harness import EvalConfig, evaluate

    shutil.rmtree(out / "tasks", ignore_errors=True)  # generate again: the traces come from generating
    model_args = {"dtype": dtype} if backend == "vllm" else {}
    with contextlib.ExitStack() as stack:
        if backend != "vllm" and dtype != "bfloat16":
            stack.enter_context(transformers_dtype(dtype))
        traces = stack.enter_context(recording(backend))
        evaluate(EvalConfig(model=str(model), out=str(out), dataset_root=str(data), tasks=("mmstar",),
                            backend=backend, model_args=model_args, limit=limit, device="cpu"))
    torch.save({doc: asdict(trace) for doc, trace in traces.items()}, out / "traces.pt")


def fill_repeated_images(traces: dict[int, dict], data: Path) -> int:
    """vLLM's encoder cache skips the vision tower for an image it has already encoded: give such a document
    the pixel record of an earlier document with the same image (by content). Returns how many were filled."""
    import datasets

    digests = [hashlib.sha256(row["image"].tobytes()).hexdigest()
               for row in datasets.load_from_disk(str(data / "mmstar"))["val"]]
    seen = {digests[doc]: trace for doc, trace in sorted(traces.items()) if trace["pixel_values"] is not None}
    missing = [doc for doc, trace in traces.items() if trace["pixel_values"] is None and digests[doc] in seen]
    for doc in missing:
        traces[doc] = {**traces[doc], **{key: seen[digests[doc]][key] for key in ("pixel_values", "image_grid_thw")}}
    return len(missing)


def _samples(out: Path) -> dict[int, dict]:
    rows = (json.loads(line) for line in (out / "samples" / "mmstar.jsonl").read_text().splitlines())
    return {int(row["doc_id"]): row for row in rows}


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3g}"


def report(work: Path) -> dict:
    """Print the agreement table and the per-document causes; write ``work/agreement.json``."""
    from nemo_viper.evaluation.backend_agreement import compare_document
    from nemo_viper.evaluation.backend_trace import Trace

    traces = {b: torch.load(work / b / "traces.pt", weights_only=False) for b in BACKENDS}
    samples = {b: _samples(work / b) for b in BACKENDS}
    scores = {b: json.loads((work / b / "results.json").read_text())["scores"]["mmstar"] for b in BACKENDS}
    hf, vl = (traces[b] for b in BACKENDS)
    filled = fill_repeated_images(vl, work / "data")
    rows = [compare_document(d, Trace(**hf[d]), Trace(**vl[d]), samples["qwen2_5_vl"][d], samples["vllm"][d])
            for d in sorted(samples["qwen2_5_vl"])]
    causes: dict[str, int] = {}
    for r in rows:
        if r.cause:
            causes[r.cause] = causes.get(r.cause, 0) + 1
    summary = {"documents": len(rows), "tokens_equal": sum(r.diverge_at is None for r in rows),
               "answers_equal": sum(r.answers_equal for r in rows),
               "verdicts_equal": sum(r.verdicts_equal for r in rows), "scores": scores, "causes": causes,
               "dtypes": {b: sorted({t["dtype"] for t in traces[b].values()}) for b in BACKENDS},
               "differing": [{"doc": r.doc_id, "cause": r.cause, "diverge_at": r.diverge_at, "margin_hf": r.margin_a,
                              "margin_vllm": r.margin_b, "verdicts_equal": r.verdicts_equal} for r in rows if r.cause]}
    print("| documents | equal generated tokens | equal answers | equal verdicts | MMStar hf | MMStar vllm |")
    print("|---|---|---|---|---|---|")
    print(f"| {summary['documents']} | {summary['tokens_equal']} | {summary['answers_equal']} | "
          f"{summary['verdicts_equal']} | {scores['qwen2_5_vl']:.1f} | {scores['vllm']:.1f} |")
    print(f"\ncauses of differing generations: {causes or 'none'}; dtypes {summary['dtypes']}; vLLM pixels of "
          f"{filled} repeated images taken from their first document (its encoder cache)\n")
    print("| doc | cause | verdict equal | prompt diff at | max abs pixel diff | diverges at token | "
          "hf log-prob margin | vLLM log-prob margin | hf answer | vllm answer |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.cause:
            print(f"| {r.doc_id} | {r.cause} | {r.verdicts_equal} | {_fmt(r.prompt_diff_at)} | "
                  f"{_fmt(r.pixel_max_abs_diff)} | {_fmt(r.diverge_at)} | {_fmt(r.margin_a)} | {_fmt(r.margin_b)} | "
                  f"{samples['qwen2_5_vl'][r.doc_id]['response']!r} | {samples['vllm'][r.doc_id]['response']!r} |")
    (work / "agreement.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="HF dir (default: the warm-started tiny checkpoint)")
    parser.add_argument("--rows", type=int, default=42, help="MMStar-schema documents")
    parser.add_argument("--image-sizes", default="56x56,150x100,333x250,640x427",
                        help="WxH,... of the documents' images, in turn")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--warm-start-steps", type=int, default=150)
    parser.add_argument("--backend", choices=BACKENDS, help=argparse.SUPPRESS)  # one backend's child process
    args = parser.parse_args()
    model = args.model or args.work / "model"
    data = args.work / "data"
    if args.backend:
        run_backend(args.backend, model, data, args.work / args.backend, args.rows, args.dtype)
        return
    if args.model is None:
        from nemo_viper.models.tiny import write_tiny_checkpoint
        from nemo_viper.models.tiny_warmstart import WarmStartConfig

        write_tiny_checkpoint(model, warm_start=WarmStartConfig(steps=args.warm_start_steps)
                              if args.warm_start_steps else None)
    if not data.exists():
        from nemo_viper.evaluation.tiny_datasets import write_tiny_datasets

        sizes = tuple(tuple(int(v) for v in size.split("x")) for size in args.image_sizes.split(","))
        write_tiny_datasets(data, tasks=("mmstar",), rows=args.rows, image_sizes=sizes)
    for backend in BACKENDS:
        subprocess.run([sys.executable, __file__, "--work", str(args.work), "--model", str(model), "--rows",
                        str(args.rows), "--dtype", args.dtype, "--backend", backend], check=True)
    report(args.work)


if __name__ == "__main__":
    main()
