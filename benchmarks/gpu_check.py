"""The one-shot GPU check (``scripts/gpu_check.sh`` runs it): the GPU path end to end on one GPU, no downloads.

Steps (each in its own process; a failing or impossible step becomes a FAIL/SKIP row, the others run):

1. a random-weight Qwen2.5-VL-7B checkpoint at full width, ``--layers`` LM layers, published on-disk format;
2. the transformers reference in fp32 on the CPU (logits, response log-probs, greedy ``generate``);
3. the Megatron policy on the GPU on the Transformer Engine spec in fp32, bf16 and FP8 (``--fp8-recipe``,
   blockwise on Hopper): max |Δ log-prob| against the reference (tolerances: fp32 1e-3; bf16 0.1, about
   25 bf16 ulps of a log-prob of order 1 after a few layers; FP8 0.5) and greedy generation parity
   (required in fp32, reported otherwise: bf16/FP8 rounding can flip near-ties);
4. one GRPO step (bf16 and FP8): finite loss and gradient norm;
5. BGE-M3-size encoder throughput (random XLM-RoBERTa-large through the reward's embedder);
6. the attention kernels at the 3B's sizes (``benchmarks/kernel_check.py``): the vision tower's time per image
   with transformers' per-window SDPA and with the packed windows, and decode attention with PyTorch's math
   kernel disabled;
7. ``pytest -m gpu`` (includes the DALI mixed-decoder parity test).

Prints one table and writes it into ``docs/benchmarks.md`` (device, date, versions).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench_docs import machine_line, write_section

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "full_size.py"
SECTION = "## GPU check (scripts/gpu_check.sh)"
TOLERANCE = {"fp32": 1e-3, "bf16": 0.1, "fp8": 0.5}


def run(args: list[str], timeout: int, gpu: bool = True) -> tuple[bool, str, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    started = time.perf_counter()
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s", time.perf_counter() - started
    tail = (done.stdout + done.stderr).strip().splitlines()
    return done.returncode == 0, (tail[-1] if tail else "")[-160:], time.perf_counter() - started


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", *args]


def te_importable() -> bool:
    done = subprocess.run([sys.executable, "-c", "import transformer_engine.pytorch"], capture_output=True)
    return done.returncode == 0


def parity_rows(work: Path, reference: dict, fp8_recipe: str, timeout: int) -> list[dict]:
    rows = []
    runs = [("fp32", "transformer_engine"), ("bf16", "transformer_engine"), ("fp8", "transformer_engine")]
    if not te_importable():
        runs = [("fp32", "local"), ("bf16", "local")]
        rows.append({"check": "Transformer Engine", "result": "SKIP", "value": "not importable: local spec only"})
    for precision, spec in runs:
        out = work / f"megatron_{precision}.pt"
        ok, tail, seconds = run(torchrun(str(WORKER), "megatron", "--hf", str(work / "hf"), "--inputs",
                                         str(work / "reference.pt"), "--out", str(out), "--precision", precision,
                                         "--layer-spec", spec, "--fp8-recipe", fp8_recipe), timeout)
        name = f"log-probs vs transformers, {spec}, {precision}" + (f" ({fp8_recipe})" if precision == "fp8" else "")
        if not ok:
            rows.append({"check": name, "result": "FAIL", "value": tail, "seconds": seconds})
            continue
        result = torch.load(out, map_location="cpu", weights_only=False)
        diff = (result["logprobs"] - reference["logprobs"]).abs().max().item()
        rows.append({"check": name, "result": "PASS" if diff <= TOLERANCE[precision] else "FAIL",
                     "value": f"max |Δ| {diff:.2e} (tolerance {TOLERANCE[precision]:g})", "seconds": seconds})
        same = result["greedy"] == reference["greedy"]
        rows.append({"check": f"greedy generation parity, {spec}, {precision}",
                     "result": "PASS" if same else ("FAIL" if precision == "fp32" else "INFO"),
                     "value": "identical" if same else f"ours {result['greedy']} vs HF {reference['greedy']}"})
    return rows


def grpo_rows(work: Path, fp8_recipe: str, timeout: int) -> list[dict]:
    rows = []
    for precision in ("bf16", "fp8") if te_importable() else ("bf16",):
        out = work / f"grpo_{precision}"
        ok, tail, seconds = run(torchrun(str(ROOT / "tests" / "workers" / "grpo_step.py"), "--hf", str(work / "hf"),
                                         "--out", str(out), "--case", "token-mean:4", "--precision", precision,
                                         "--fp8-recipe", fp8_recipe, "--metrics-only"), timeout)
        name = f"one GRPO step, {precision}"
        if not ok:
            rows.append({"check": name, "result": "FAIL", "value": tail, "seconds": seconds})
            continue
        metrics = torch.load(out / "token-mean_mbs4.pt", weights_only=False)["metrics"]
        finite = all(math.isfinite(metrics[k]) for k in ("train/loss", "train/grad_norm"))
        rows.append({"check": name, "result": "PASS" if finite else "FAIL", "seconds": seconds,
                     "value": f"loss {metrics['train/loss']:.4f}, grad norm {metrics['train/grad_norm']:.3g}"})
    return rows


def encoder_row(work: Path, sentences: int) -> dict:
    """BGE-M3-size (XLM-RoBERTa-large: 24 layers, hidden 1024, vocab 250002) random encoder, CLS pooling."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from nemo_viper.models.tiny import build_tokenizer
    from nemo_viper.rewards.semantic import SentenceTransformerEmbedder

    path = work / "bge_m3_size"
    config = XLMRobertaConfig(vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                              intermediate_size=4096, max_position_embeddings=8194, type_vocab_size=1)
    XLMRobertaModel(config).save_pretrained(path / "transformer")
    build_tokenizer(1024).save_pretrained(path / "transformer")
    transformer = models.Transformer(str(path / "transformer"), max_seq_length=512)
    SentenceTransformer(modules=[transformer, models.Pooling(1024, pooling_mode="cls")]).save(str(path))
    embedder = SentenceTransformerEmbedder(path, device="cuda")
    texts = [f"The {c} car number {i} is parked on the left of the red sign." for i, c in
             zip(range(sentences), ["red", "blue", "green", "white"] * sentences)]
    embedder.encode(texts[:256])  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    embedder.encode(texts)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"check": "BGE-M3-size encoder throughput (reward embedder)", "result": "INFO", "seconds": seconds,
            "value": f"{sentences / seconds:.0f} sentences/s ({sentences} sentences of ~16 tokens, batch 256)"}


def kernel_rows(timeout: int) -> list[dict]:
    """The rows of ``benchmarks/kernel_check.py`` (its own process: one JSON row per line)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    try:
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_check.py")], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return [{"check": "attention kernels (kernel_check.py)", "result": "FAIL", "value": f"timed out after {timeout} s"}]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0:
        rows.append({"check": "attention kernels (kernel_check.py)", "result": "FAIL",
                     "value": (done.stderr.strip().splitlines() or [""])[-1][-160:]})
    return rows


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "transformers", "megatron-core", "megatron-bridge", "transformer-engine",
                 "transformer_engine_torch", "nvidia-dali-cuda120", "nvidia-dali-cuda130", "sentence-transformers"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/gpu_check")
    parser.add_argument("--layers", type=int, default=4, help="language-model layers of the 7B checkpoint")
    parser.add_argument("--fp8-recipe", default="blockwise")
    parser.add_argument("--sentences", type=int, default=8192)
    parser.add_argument("--step-timeout", type=int, default=240)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--wait-for", help="a file that appears when a background Transformer Engine build ends")
    parser.add_argument("--max-wait", type=int, default=300, help="seconds to wait for --wait-for")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        ok, tail, seconds = run([sys.executable, str(WORKER), "write", "--size", "7b", "--layers", str(args.layers),
                                 "--out", str(hf)], args.step_timeout, gpu=False)
        rows.append({"check": f"write random 7B checkpoint ({args.layers} LM layers)", "result": "PASS" if ok else "FAIL",
                     "value": "" if ok else tail, "seconds": seconds})
    ok, tail, seconds = run([sys.executable, str(WORKER), "reference", "--hf", str(hf), "--out",
                             str(work / "reference.pt")], args.step_timeout, gpu=False)
    rows.append({"check": "transformers reference (fp32, CPU)", "result": "PASS" if ok else "FAIL",
                 "value": "" if ok else tail, "seconds": seconds})
    if args.wait_for:
        deadline = time.monotonic() + args.max_wait
        while not Path(args.wait_for).exists() and time.monotonic() < deadline:
            time.sleep(5)
    if ok:
        reference = torch.load(work / "reference.pt", weights_only=False)
        rows += parity_rows(work, reference, args.fp8_recipe, args.step_timeout)
    rows += grpo_rows(work, args.fp8_recipe, args.step_timeout)
    try:
        rows.append(encoder_row(work, args.sentences))
    except Exception as error:  # noqa: BLE001 - reported as a row; the other checks still count
        rows.append({"check": "BGE-M3-size encoder throughput", "result": "FAIL", "value": repr(error)[:160]})
    rows += kernel_rows(args.step_timeout)
    ok, tail, seconds = run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
                            args.step_timeout)
    rows.append({"check": "pytest -m gpu (DALI mixed-decoder parity, TE-spec tests)", "result": "PASS" if ok else "FAIL",
                 "value": tail, "seconds": seconds})

    table = ["| check | result | value | seconds |", "|---|---|---|---:|"]
    table += [f"| {r['check']} | {r['result']} | {r.get('value', '')} | {r.get('seconds', 0):.0f} |" for r in rows]
    text = "\n".join(table)
    print(text)
    (work / "gpu_check.json").write_text(json.dumps(rows, indent=2) + "\n")
    if args.write_docs:
        write_section(SECTION, f"{SECTION}\n\n{machine_line()}; {versions()}.\n\n{text}\n\n"
                               f"```\nbash scripts/gpu_check.sh\n```\n")
    if any(r["result"] == "FAIL" for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
