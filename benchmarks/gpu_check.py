"""The one-shot GPU check (``scripts/gpu_check.sh`` runs it): the GPU path end to end on one GPU, no downloads,
within ``--budget`` seconds (default 8 minutes).

Parts, most important first (each in its own process with its own time limit, and never past what is left of
the budget; a failing, timed-out or skipped part becomes a FAIL/SKIP row, the others run, and the table is
printed whatever happens):

1. the CUDA context of a fresh process, before any tensor, against the memory plan's reserve;
2. ``benchmarks/grpo_step_check.py``: a full-size Qwen2.5-VL-3B RL stage-2 GRPO step at the 3B recipe's
   shapes (random weights initialised on the GPU, local spec, bf16): step time, ``max_memory_reserved``
   against the plan, MFU; Megatron generation on a ViPER-shaped batch with the math attention kernel
   disabled (tokens/s); the context after both;
3. the attention kernels at the 3B's sizes (``benchmarks/kernel_check.py``): the vision tower's time per image
   with transformers' per-window SDPA and with the packed windows, and decode attention with PyTorch's math
   kernel disabled;
4. a random-weight Qwen2.5-VL-7B checkpoint at full width, ``--layers`` LM layers, published on-disk format,
   and the transformers reference in fp32 on the CPU (logits, response log-probs, greedy ``generate``);
5. the Megatron policy on the GPU on the Transformer Engine spec in fp32, bf16 and FP8 (``--fp8-recipe``,
   blockwise on Hopper; the local spec in fp32 and bf16 without TE): max |Δ log-prob| against the reference
   (tolerances: fp32 1e-3; bf16 0.1, about 25 bf16 ulps of a log-prob of order 1 after a few layers; FP8
   0.5) and greedy generation parity (required in fp32, reported otherwise: bf16/FP8 rounding can flip
   near-ties);
6. one GRPO step of the 7B checkpoint (bf16, and FP8 with TE): finite loss and gradient norm;
7. BGE-M3-size encoder throughput (random XLM-RoBERTa-large through the reward's embedder);
8. ``pytest -m gpu`` (includes the DALI mixed-decoder parity test).

``--dry-run`` runs parts 2 and 3 on the CPU at small shapes through the same code (the test suite does, so
that the check cannot rot) and skips the others. Prints one table and, with ``--write-docs``, writes it into
``docs/benchmarks.md`` (device, date, versions).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench_docs import machine_line, write_section

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "full_size.py"
SECTION = "## GPU check (scripts/gpu_check.sh)"
TOLERANCE = {"fp32": 1e-3, "bf16": 0.1, "fp8": 0.5}
MIN_PART_SECONDS = 20  # a part that would get less than this of the budget is skipped


@dataclass
class Budget:
    """The check's wall-clock budget: each part runs for at most its own limit and what is left."""

    seconds: float
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)

    def limit(self, part_seconds: float) -> int:
        return int(max(0.0, min(part_seconds, self.left())))


def run(args: list[str], timeout: int, gpu: bool = True, env: dict | None = None) -> tuple[bool, str, float]:
    """``args`` in a subprocess of at most ``timeout`` seconds (``env``: more variables): ``(succeeded, last
    output line, seconds)``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(ROOT / "benchmarks"), *filter(None, [os.environ.get("PYTHONPATH")])]), **(env or {}))
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    started = time.perf_counter()
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s", time.perf_counter() - started
    tail = (done.stdout + done.stderr).strip().splitlines()
    return done.returncode == 0, (tail[-1] if tail else "")[-160:], time.perf_counter() - started


def seconds_left(deadline: float) -> int:
    """Whole seconds until ``deadline`` (``time.monotonic``), at least 1."""
    return max(1, int(deadline - time.monotonic()))


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", *args]


def single_rank() -> dict:
    """The variables ``torchrun`` gives the one rank of a one-process job, without its launcher's cost."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def json_rows(name: str, command: list[str], out: Path, timeout: int, gpu: bool = True,
              env: dict | None = None) -> list[dict]:
    """The rows a part's script wrote to ``out`` (JSON), and a FAIL row if it failed or wrote none."""
    out.unlink(missing_ok=True)
    ok, tail, seconds = run(command, timeout, gpu, env)
    rows = json.loads(out.read_text()) if out.is_file() else []
    if not ok or not rows:
        rows.append({"check": name, "result": "FAIL", "value": tail, "seconds": seconds})
    return rows


def context_rows(work: Path, timeout: int) -> list[dict]:
    out = work / "context.json"
    return json_rows("CUDA context (grpo_step_check.py --context-only)",
                     [sys.executable, str(ROOT / "benchmarks" / "grpo_step_check.py"), "--context-only", "--out",
                      str(out)], out, timeout)


def step_rows(work: Path, timeout: int, dry_run: bool) -> list[dict]:
    """The 3B stage-2 GRPO step and Megatron generation (``grpo_step_check.py``; dry run: the tiny model)."""
    from nemo_viper.models.published import write_random_checkpoint
    from nemo_viper.models.tiny import write_tiny_checkpoint

    model = work / ("tiny" if dry_run else "qwen25vl_3b_architecture")
    if not (model / "config.json").is_file():
        write_tiny_checkpoint(model) if dry_run else write_random_checkpoint(model, "3b", with_weights=False)
    out = work / "grpo_step.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "grpo_step_check.py"), "--model", str(model), "--out", str(out)]
    if dry_run:
        command += ["--dry-run", "--warmup", "1", "--steps", "1", "--generation-prompts", "2"]
    return json_rows("3B stage-2 GRPO step and generation (grpo_step_check.py)", command, out, timeout,
                     gpu=not dry_run, env={**single_rank(), **({"OMP_NUM_THREADS": "1"} if dry_run else {})})


def te_importable() -> bool:
    done = subprocess.run([sys.executable, "-c", "import transformer_engine.pytorch"], capture_output=True)
    return done.returncode == 0


def parity_rows(work: Path, reference: dict, fp8_recipe: str, timeout: int) -> list[dict]:
    rows = []
    runs = [("fp32", "transformer_engine"), ("bf16", "transformer_engine"), ("fp8", "transformer_engine")]
    if not te_importable():
        runs = [("fp32", "local"), ("bf16", "local")]
        rows.append({"check": "Transformer Engine", "result": "SKIP", "value": "not importable: local spec only"})
    deadline = time.monotonic() + timeout
    for precision, spec in runs:
        out = work / f"megatron_{precision}.pt"
        ok, tail, seconds = run(torchrun(str(WORKER), "megatron", "--hf", str(work / "hf"), "--inputs",
                                         str(work / "reference.pt"), "--out", str(out), "--precision", precision,
                                         "--layer-spec", spec, "--fp8-recipe", fp8_recipe), seconds_left(deadline))
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
    deadline = time.monotonic() + timeout
    for precision in ("bf16", "fp8") if te_importable() else ("bf16",):
        out = work / f"grpo_{precision}"
        ok, tail, seconds = run(torchrun(str(ROOT / "tests" / "workers" / "grpo_step.py"), "--hf", str(work / "hf"),
                                         "--out", str(out), "--case", "token-mean:4", "--precision", precision,
                                         "--fp8-recipe", fp8_recipe, "--metrics-only"), seconds_left(deadline))
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


def kernel_rows(timeout: int, dry_run: bool) -> list[dict]:
    """The rows of ``benchmarks/kernel_check.py`` (its own process: one JSON row per line)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, str(ROOT / "benchmarks" / "kernel_check.py"), *(["--dry-run"] if dry_run else [])]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
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


# Each part's time limit in seconds (and below it, its expected time on one H100, estimated from its work:
# process start and imports ~15 s, Megatron ~10 s more). The default budget (8 minutes) holds the parts in
# this order down to the 7B parity runs; what does not fit is skipped, not cut short mid-table.
PART_LIMITS = {
    "context": 60,  # ~15: torch import, CUDA init
    "step": 240,  # ~130: Megatron import, 3B build on the GPU ~20, 4 steps of 10 rows x ~3.6k tokens ~15,
    #               generation of 65 samples x 1024 tokens ~60
    "kernels": 120,  # ~50: the 3B tower fwd+bwd 6 times with each attention, 6 decode steps
    "checkpoint": 180,  # ~90 (CPU): a 4-layer 7B drawn and saved, transformers' fp32 reference
    "parity": 240,  # ~40 per precision: Megatron import and build, forward, greedy generation
    "grpo": 150,  # ~60 per precision
    "encoder": 90,  # ~30: a 560M-parameter encoder saved and loaded, 8192 sentences
    "pytest": 150,  # ~60
}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/gpu_check")
    parser.add_argument("--budget", type=float, default=480, help="seconds the whole check may take")
    parser.add_argument("--layers", type=int, default=4, help="language-model layers of the 7B checkpoint")
    parser.add_argument("--fp8-recipe", default="blockwise")
    parser.add_argument("--sentences", type=int, default=8192)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="the parts that have one, small on the CPU")
    parser.add_argument("--wait-for", help="a file that appears when a background Transformer Engine build ends")
    parser.add_argument("--max-wait", type=int, default=300, help="seconds to wait for --wait-for")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU (or --dry-run)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget)
    hf = work / "hf"

    def reference_rows(timeout: int) -> list[dict]:
        deadline = time.monotonic() + timeout
        rows = []
        if not (hf / "config.json").is_file():
            ok, tail, seconds = run([sys.executable, str(WORKER), "write", "--size", "7b", "--layers",
                                     str(args.layers), "--out", str(hf)], timeout, gpu=False)
            rows.append({"check": f"write random 7B checkpoint ({args.layers} LM layers)",
                         "result": "PASS" if ok else "FAIL", "value": "" if ok else tail, "seconds": seconds})
        ok, tail, seconds = run([sys.executable, str(WORKER), "reference", "--hf", str(hf), "--out",
                                 str(work / "reference.pt")], seconds_left(deadline), gpu=False)
        return rows + [{"check": "transformers reference (fp32, CPU)", "result": "PASS" if ok else "FAIL",
                        "value": "" if ok else tail, "seconds": seconds}]

    def te_parity_rows(timeout: int) -> list[dict]:
        if args.wait_for:  # the TE build, started before this process, while the parts above ran
            deadline = time.monotonic() + min(args.max_wait, timeout / 2)
            while not Path(args.wait_for).exists() and time.monotonic() < deadline:
                time.sleep(5)
        if not (work / "reference.pt").is_file():
            return [{"check": "log-probs vs transformers", "result": "SKIP", "value": "no transformers reference"}]
        reference = torch.load(work / "reference.pt", weights_only=False)
        return parity_rows(work, reference, args.fp8_recipe, timeout)

    def encoder_part(timeout: int) -> list[dict]:
        return [encoder_row(work, args.sentences)]

    def pytest_rows(timeout: int) -> list[dict]:
        ok, tail, seconds = run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"], timeout)
        return [{"check": "pytest -m gpu (DALI mixed-decoder parity, TE-spec tests)", "result": "PASS" if ok else "FAIL",
                 "value": tail, "seconds": seconds}]

    parts = {
        "context": lambda timeout: context_rows(work, timeout),
        "step": lambda timeout: step_rows(work, timeout, args.dry_run),
        "kernels": lambda timeout: kernel_rows(timeout, args.dry_run),
        "checkpoint": reference_rows,
        "parity": te_parity_rows,
        "grpo": lambda timeout: grpo_rows(work, args.fp8_recipe, timeout),
        "encoder": encoder_part,
        "pytest": pytest_rows,
    }
    dry_run_parts = ("step", "kernels")
    rows = []
    try:
        for name, part in parts.items():
            limit = budget.limit(PART_LIMITS[name])
            if args.dry_run and name not in dry_run_parts:
                rows.append({"check": f"part {name}", "result": "SKIP", "value": "no CPU dry run"})
            elif limit < MIN_PART_SECONDS:
                rows.append({"check": f"part {name}", "result": "SKIP",
                             "value": f"time budget spent ({budget.left():.0f} s of {args.budget:.0f} s left)"})
            else:
                try:
                    rows += part(limit)
                except Exception as error:  # noqa: BLE001 - reported as a row; the other parts still run
                    rows.append({"check": f"part {name}", "result": "FAIL", "value": repr(error)[:160]})
    finally:
        report(rows, work, args.write_docs and not args.dry_run)
    if any(r["result"] == "FAIL" for r in rows):
        raise SystemExit(1)
    return rows


def report(rows: list[dict], work: Path, write_docs: bool) -> None:
    """Print the table, save the rows as JSON and, with ``write_docs``, put the table into docs/benchmarks.md."""
    table = ["| check | result | value | seconds |", "|---|---|---|---:|"]
    table += [f"| {r['check']} | {r['result']} | {r.get('value', '')} | {r.get('seconds', 0):.0f} |" for r in rows]
    text = "\n".join(table)
    print(text, flush=True)
    (work / "gpu_check.json").write_text(json.dumps(rows, indent=2) + "\n")
    if write_docs:
        write_section(SECTION, f"{SECTION}\n\n{machine_line()}; {versions()}.\n\n{text}\n\n"
                               f"```\nbash scripts/gpu_check.sh\n```\n")


if __name__ == "__main__":
    main()
