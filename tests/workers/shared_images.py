"""Worker: one micro-batch forward/backward of the tiny policy in float64 with the images per row and shared.

The batch: 3 prompts (two with one image each, at different sizes, one with two images) x ``--responses``,
plus a text-only row; row ``i`` of prompt ``p`` has its own response tokens. The loss is a fixed random
weighting of the response tokens' log-probs. One policy is built per ``--recompute`` mode (a comma list; every
mode but ``none`` also checkpoints the vision blocks with ``--recompute-vision``), all in this one process.
Saves ``{mode: {layout: result}}``: for each layout (``shared``, and ``per_row`` for ``none``) the log-probs,
the gradient of every parameter and the bytes of tensors autograd saved for the backward pass.
"""

import argparse

import torch

from nemo_viper.models.batch import PolicyBatch
from nemo_viper.models.logprobs import forward_micro_batch
from nemo_viper.models.policy import PolicyConfig, build_policy

IMAGES = [[(4, 6)], [(6, 4)], [(4, 4), (2, 4)]]  # per prompt: (h, w) of each image in patches


def shared_batch(provider, n: int, vocab: int) -> PolicyBatch:
    generator = torch.Generator().manual_seed(0)
    rows, sets, pixels, grids, counts = [], [], [], [], []
    for p, images in enumerate(IMAGES):
        prompt = [1, 2]
        for h, w in images:
            prompt += [provider.vision_start_token_id] + [provider.image_token_id] * (h * w // 4)
            prompt += [provider.vision_end_token_id]
            grids.append([1, h, w])
            pixels.append(torch.randn(h * w, 3 * 2 * 14 * 14, generator=generator))
        for _ in range(n):
            response = torch.randint(20, vocab - 40, (int(torch.randint(2, 6, (1,), generator=generator)),),
                                     generator=generator).tolist()
            rows.append((prompt, response))
            sets.append(p)
            counts.append(len(images))
    rows.append(([1, 2, 3], [25, 26]))
    sets.append(-1)
    counts.append(0)
    length = max(len(a) + len(b) for a, b in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, (prompt, response) in enumerate(rows):
        ids[i, : len(prompt) + len(response)] = torch.tensor(prompt + response)
        mask[i, len(prompt) : len(prompt) + len(response)] = True
    return PolicyBatch(ids, mask, torch.cat(pixels), torch.tensor(grids), torch.tensor(sets), torch.tensor(counts))


def per_row(batch: PolicyBatch) -> PolicyBatch:
    inputs = batch.model_inputs(torch.device("cpu"))
    return PolicyBatch(batch.input_ids, batch.response_mask, inputs["pixel_values"], inputs["image_grid_thw"],
                       images_per_row=batch.images_per_row)


def saved_bytes(run) -> tuple[object, int]:
    """``run()`` and the bytes of the distinct tensors autograd saved for backward while it ran."""
    seen = {}

    def pack(tensor):
        if tensor.requires_grad or tensor.grad_fn is not None or tensor.is_floating_point():
            seen[(tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))] = tensor.nbytes
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, sum(seen.values())


def run_mode(hf: str, responses: int, recompute: str, recompute_vision: bool) -> dict:
    policy = build_policy(PolicyConfig(hf_path=hf, precision="fp32", recompute=recompute,
                                       recompute_vision=recompute_vision))
    (model,) = policy.chunks
    model.double().train()
    provider = policy.provider
    shared = shared_batch(provider, responses, provider.vocab_size)
    layouts = {"shared": shared}
    if recompute == "none":
        layouts["per_row"] = per_row(shared)
    weights = torch.rand(shared.input_ids[:, 1:].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = {}
    for name, batch in layouts.items():
        model.zero_grad(set_to_none=True)

        def forward(batch=batch):
            return forward_micro_batch(model, batch, torch.device("cpu"))

        logits, saved = saved_bytes(forward)
        # float64 end to end (the project's log-prob kernel works in float32): TP1, so the full vocabulary
        logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
        logprobs = logprobs * batch.response_mask[:, 1:]
        (logprobs * weights).sum().backward()
        result[name] = {
            "logprobs": logprobs.detach(),
            "grads": {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
            "saved_bytes": saved,
            "patches": int(batch.pixel_values.shape[0]),
        }
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--responses", type=int, default=5)
    parser.add_argument("--recompute", default="none", help="comma-separated modes: none, selective, full")
    parser.add_argument("--recompute-vision", action="store_true")
    args = parser.parse_args()
    torch.save({mode: run_mode(args.hf, args.responses, mode, args.recompute_vision and mode != "none")
                for mode in args.recompute.split(",")}, args.out)


if __name__ == "__main__":
    from nemo_viper.runtime import cpu_mode

    with cpu_mode.unless_cuda():
        main()
