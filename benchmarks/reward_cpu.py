"""ViPER reward throughput (batched vs one call per response) and the policy loss's share of an update step.

Reward: the default ``RewardConfig()`` (packaged all-MiniLM-L6-v2) on 128 prompts x 5 responses, each a
well-formed ``<think>…</think><answer>…</answer>`` with 5-8 answer sentences (one per line) drawn
deterministically from a small vocabulary of image-description sentences; 2-6 ground-truth sentences
per prompt. Batched = one ``ViperReward.score`` call on all responses with a fresh reward object (cold
ground-truth cache), then the same call again (warm cache); loop = one ``score`` call per response with
a fresh reward object per repeat. All share one loaded embedder.

Loss: ``ClippedPolicyLoss`` forward + backward (gradient w.r.t. the log-probs only) on the mini-batch
of ``tests/workers/grpo_step.py`` and on larger tensors, plain and under CPU mode's
``CudaToCpuMode`` (the step runs the loss under it). The step itself is measured by running that
worker in a subprocess (it prints its metrics, ``time/update`` among them).

All parts are timed in alternation, once per repeat, so that a busy machine slows all alike.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reward_cpu.py [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_docs import DOCS, machine_line, reproduce_command, write_section

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Reward throughput and loss cost (CPU)"
STEP_WORKER = "tests/workers/grpo_step.py"

COLOURS = ("red", "blue", "green", "yellow", "white", "black", "brown", "grey", "orange", "purple")
OBJECTS = ("car", "cat", "dog", "cup", "sign", "tree", "person", "bicycle", "table", "window", "rocket", "book")
PLACES = ("on the left", "on the right", "in the centre", "in the background", "near the top", "below the sign")
TEMPLATES = (  # paraphrases of one fact (colour, object, place)
    "The {c} {o} is {p}.",
    "A {c} {o} can be seen {p}.",
    "There is a {c} {o} {p}.",
    "The {o} {p} is {c}.",
)


def reward_batch(prompts: int, responses_per_prompt: int, seed: int = 0):
    """(responses, ground truths, sample ids). Each prompt has a scene of 8 facts; its ground truth states
    2-6 of them; each response states 5-8 sentences, about two thirds scene facts (any template), the rest
    invented facts."""
    rng = random.Random(seed)

    def fact() -> tuple[str, str, str]:
        return rng.choice(COLOURS), rng.choice(OBJECTS), rng.choice(PLACES)

    def say(f: tuple[str, str, str], template: int) -> str:
        return TEMPLATES[template].format(c=f[0], o=f[1], p=f[2])

    responses, ground_truths, sample_ids = [], [], []
    for p in range(prompts):
        scene = [fact() for _ in range(8)]
        truth = [say(f, 0) for f in scene[: rng.randint(2, 6)]]
        for _ in range(responses_per_prompt):
            facts = [rng.choice(scene) if rng.random() < 2 / 3 else fact() for _ in range(rng.randint(5, 8))]
            answer = "\n".join(say(f, rng.randrange(len(TEMPLATES))) for f in facts)
            responses.append(f"<think>I look at the objects and their colours.</think><answer>{answer}</answer>")
            ground_truths.append(truth)
            sample_ids.append(f"prompt{p}")
    return responses, ground_truths, sample_ids


def loss_inputs(lengths: list[int], width: int, generator: torch.Generator):
    """Log-probs (requiring grad), old log-probs, per-sequence advantages and a left-aligned mask."""
    shape = (len(lengths), width)
    logprobs = (-3 * torch.rand(shape, generator=generator)).requires_grad_()
    old = logprobs.detach() + 0.1 * torch.randn(shape, generator=generator)
    advantages = torch.randn(len(lengths), generator=generator)
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    return logprobs, old, advantages, mask


def loss_case(micro_batches: list[tuple], iters: int):
    """A run that does ``iters`` loss forward+backward passes over ``micro_batches`` (one mini-batch) and
    returns seconds per pass."""
    from nemo_viper.algorithms.policy_loss import ClippedPolicyLoss, LossNormalizer, PolicyLossConfig

    loss_fn = ClippedPolicyLoss(PolicyLossConfig())
    normalizer = LossNormalizer.from_masks([mb[3] for mb in micro_batches])

    def run() -> float:
        start = time.perf_counter()
        for _ in range(iters):
            for logprobs, old, advantages, mask in micro_batches:
                logprobs.grad = None
                loss, _ = loss_fn(logprobs, old, advantages, mask, normalizer)
                loss.backward()
        return (time.perf_counter() - start) / iters

    return run


def run_step_worker(hf_dir: Path, out: Path, threads: int) -> float:
    """``time/update`` of one GRPO step of the test worker (a fresh process: builds the tiny Megatron policy)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", STEP_WORKER,
               "--hf", str(hf_dir), "--out", str(out), "--case", "token-mean:4"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    metrics = next(json.loads(line) for line in reversed(result.stdout.splitlines()) if line.startswith("{"))
    return metrics["time/update"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--n", type=int, default=5, help="responses per prompt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loss-iters", type=int, default=200, help="loss passes per timed repeat")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in the step worker")
    parser.add_argument("--write-docs", action="store_true", help=f"replace this benchmark's section in {DOCS.name}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))

    from nemo_viper.models.tiny import write_tiny_checkpoint
    from nemo_viper.rewards.format import parse_response
    from nemo_viper.rewards.semantic import RewardConfig, ViperReward
    from nemo_viper.rewards.sentences import split_sentences
    from nemo_viper.runtime.cpu_mode import CudaToCpuMode
    from tests.workers.grpo_step import rollout_batch

    # Reward.
    config = RewardConfig()
    embedder = ViperReward(config).embedder
    responses, ground_truths, sample_ids = reward_batch(args.prompts, args.n)
    ViperReward(config, embedder).score(responses, ground_truths, sample_ids)  # warm-up

    # Loss: the step worker's mini-batch (2 micro-batches of 4, full-sequence width), its response-only
    # shape, and a large one.
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = write_tiny_checkpoint(Path(tmp) / "hf")
        step_mask = rollout_batch(str(hf_dir), [0, 1]).sequences.response_mask
        step_lengths = step_mask.sum(1).tolist()
        width = step_mask.shape[1]
        big_lengths = torch.randint(16, 65, (640,), generator=generator).tolist()
        loss_shapes = {
            f"step mini-batch: 2 micro-batches x [4, {width}]": [
                loss_inputs(step_lengths[s : s + 4], width, generator) for s in (0, 4)],
            f"step responses only: [8, {max(step_lengths)}]": [
                loss_inputs(step_lengths, max(step_lengths), generator)],
            "[640, 64]": [loss_inputs(big_lengths, 64, generator)],
        }
        loss_runs = {name: loss_case(mbs, args.loss_iters) for name, mbs in loss_shapes.items()}
        for run in loss_runs.values():  # warm-up
            run()

        seconds = {key: [] for key in ("batched", "warm", "loop")}
        loss_seconds = {(name, mode): [] for name in loss_runs for mode in (False, True)}
        update_seconds = []
        for _ in range(args.repeats):
            reward = ViperReward(config, embedder)
            for key in ("batched", "warm"):
                start = time.perf_counter()
                batched = reward.score(responses, ground_truths, sample_ids)
                seconds[key].append(time.perf_counter() - start)
            reward = ViperReward(config, embedder)
            start = time.perf_counter()
            looped = [reward.score([r], [g], [i])[0] for r, g, i in zip(responses, ground_truths, sample_ids)]
            seconds["loop"].append(time.perf_counter() - start)
            for name, run in loss_runs.items():
                loss_seconds[name, False].append(run())
                with CudaToCpuMode():
                    loss_seconds[name, True].append(run())
            update_seconds.append(run_step_worker(hf_dir, Path(tmp) / "step", args.threads))

    # Reward table, with the number of texts each path sends to the embedder (as ViperReward._embed does).
    answers = [split_sentences(parse_response(r).answer) for r in responses]
    truths = {i: split_sentences("\n".join(g)) for i, g in zip(sample_ids, ground_truths)}
    first_of_prompt = [k == 0 or sample_ids[k - 1] != i for k, i in enumerate(sample_ids)]
    encoded = {
        "batched": len({s for a in answers for s in a} | {s for t in truths.values() for s in t}),
        "warm": len({s for a in answers for s in a}),
        "loop": sum(len(set(a) | set(truths[i] if first else [])) for a, i, first in
                    zip(answers, sample_ids, first_of_prompt)),
    }
    sentences = sum(b.num_answer_sentences for b in batched)
    max_diff = max(abs(a.total - b.total) for a, b in zip(batched, looped))
    loop_median = statistics.median(seconds["loop"])
    rows = [("batched: one `score` call, cold ground-truth cache", "batched"),
            ("batched: same call again, warm cache", "warm"),
            ("loop: one `score` call per response", "loop")]
    lines = ["| path | texts encoded | median (s) | min (s) | responses/s | answer sentences/s | loop / this |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, key in rows:
        median = statistics.median(seconds[key])
        lines.append(f"| {label} | {encoded[key]} | {median:.2f} | {min(seconds[key]):.2f} | "
                     f"{len(responses) / median:.0f} | {sentences / median:.0f} | {loop_median / median:.2f}x |")
    reward_table = "\n".join(lines)
    reward_notes = (
        f"{len(responses)} responses ({args.prompts} prompts x {args.n}), {sentences} answer sentences, "
        f"{sum(map(len, truths.values()))} ground-truth sentences; max |batched - loop| reward: {max_diff:.1e}"
    )

    # Loss table.
    update = statistics.median(update_seconds)
    lines = ["| loss tensors | fwd+bwd plain (ms) | fwd+bwd under CPU mode (ms) | CPU-mode time / step `time/update` |",
             "|---|---:|---:|---:|"]
    for name in loss_runs:
        plain, mode = (statistics.median(loss_seconds[name, m]) for m in (False, True))
        share = f"{100 * mode / update:.2f}%" if name.startswith("step") else "n/a"
        lines.append(f"| {name} | {1e3 * plain:.2f} | {1e3 * mode:.2f} | {share} |")
    loss_table = "\n".join(lines)
    step_notes = (
        f"step `time/update` of `{STEP_WORKER}` (8 sequences x {width} tokens, {sum(step_lengths)} response "
        f"tokens, micro-batch 4): median {1e3 * update:.0f} ms (min {1e3 * min(update_seconds):.0f}, max "
        f"{1e3 * max(update_seconds):.0f}) over {len(update_seconds)} runs"
    )
    print(reward_table, reward_notes, loss_table, step_notes, sep="\n\n")
    print(f"raw seconds: {seconds}; update: {update_seconds}")

    if args.write_docs:
        command = reproduce_command()
        step_command = (f"OMP_NUM_THREADS={args.threads} PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python -m "
                        "torch.distributed.run --standalone "
                        f"--nproc-per-node 1 {STEP_WORKER} --hf TINY_DIR --out DIR --case token-mean:4")
        write_section(
            SECTION,
            f"{SECTION}\n\n"
            f"{machine_line()} (with 2, an earlier run's per-response loop swung by "
            "more than 10x between repeats on this shared machine). Medians over "
            f"{args.repeats} repeats; reward, loss and step runs alternate within each repeat.\n\n"
            "### Reward throughput (`ViperReward`, default `RewardConfig()`: packaged all-MiniLM-L6-v2, CPU)\n\n"
            "Each response is a well-formed `<think>…</think><answer>…</answer>` with 5-8 answer sentences, one "
            f"per line, drawn deterministically from a small vocabulary ({len(COLOURS)} colours x {len(OBJECTS)} "
            f"objects x {len(PLACES)} places x {len(TEMPLATES)} paraphrase templates). Each prompt has a scene "
            "of 8 facts; its ground truth, shared by its 5 responses, states 2-6 of them in the first template; "
            "about two thirds of a response's sentences restate scene facts in any template, the rest are "
            "invented. Batched: one `score` call on all responses, fresh `ViperReward` (cold ground-truth "
            "cache), then the same call again on that object (warm cache). Loop: a fresh `ViperReward` per "
            "repeat, then one `score([r], [gt], [id])` call per response. All share one loaded embedder "
            "(encode batch size 256).\n\n"
            "Texts encoded: distinct strings sent to the embedder per repeat. `score` deduplicates within a "
            "call, so the batched call encodes a sentence repeated across responses once, and ground-truth "
            "sentences that also occur in answers cost nothing extra (hence the small cold/warm difference with "
            "this vocabulary). Rates are computed from the medians.\n\n"
            f"{reward_table}\n\n{reward_notes}.\n\n"
            "### Policy loss forward + backward vs a tiny-model update step\n\n"
            "`ClippedPolicyLoss` (token-mean, default clip) forward + backward of the gradient w.r.t. the "
            "log-probs, nothing else, on random log-probs with the step worker's response masks and on a "
            "[640, 64] batch (response lengths 16-64); "
            f"per mini-batch, median of {args.loss_iters}-pass means. In the step the loss runs under CPU mode's "
            "`CudaToCpuMode` (a process-wide `TorchFunctionMode`), so it is timed with and without it.\n\n"
            f"{loss_table}\n\n"
            f"The last column divides by the {step_notes}; each run is a fresh process (builds the tiny Megatron "
            "policy, one GRPO step). That update time includes the model forward and backward of both "
            "micro-batches, the log-prob and entropy computations and the optimizer step, so the share is that "
            "of the loss function's own operations only. No step of the [640, 64] size was run, so that row "
            "has no share.\n\n"
            "The throughput of a BGE-M3-size embedder (XLM-R, 568M parameters, fp16 on GPU) is not measured "
            "(no GPU).\n\n"
            f"```\n{command}\n# the step runs, one per repeat, with a tiny checkpoint made in a temporary "
            f"directory:\n{step_command}\n```\n"
        )
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
