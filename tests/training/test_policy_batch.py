"""PolicyBatch image layouts (nemo_viper.models.batch): a rollout stores each prompt's images once for its n
responses, and every selection / micro-batch hands the model exactly the per-row images of the old layout."""

import pytest
import torch

from nemo_viper.models.batch import PolicyBatch, count_images
from nemo_viper.models.logprobs import _pad_rows
from nemo_viper.rewards import RewardBreakdown
from nemo_viper.rollout import GenerationRequest
from nemo_viper.rollout.interface import GenerationResponse
from nemo_viper.training.loop import assemble_rollout

VISION_START, IMAGE_PAD, PAD = 7, 8, 0
N = 3  # responses per prompt


def prompt(images: list[tuple[int, int]], seed: int) -> GenerationRequest:
    """A request whose token ids hold one <|vision_start|> per image; images [(h, w) in patches]."""
    generator = torch.Generator().manual_seed(seed)
    ids = [1, 2]
    for h, w in images:
        ids += [VISION_START] + [IMAGE_PAD] * (h * w // 4) + [9]
    ids += [3, 4]
    if not images:
        return GenerationRequest(ids, n=N)
    grid = torch.tensor([[1, h, w] for h, w in images])
    pixels = torch.randn(int(grid.prod(-1).sum()), 12, generator=generator)
    return GenerationRequest(ids, pixels, grid, n=N)


@pytest.fixture
def rollout():
    requests = [prompt([(2, 4)], 0), prompt([(4, 2), (2, 2)], 1), prompt([], 2), prompt([(4, 4)], 3)]
    responses = [
        [GenerationResponse([10 + j] * (1 + (i + j) % 3), "x", [0.0] * (1 + (i + j) % 3), "eos") for j in range(N)]
        for i in range(len(requests))
    ]
    rewards = [RewardBreakdown(total=0.5, format=1.0, correctness=0.5, precision=0.5, recall=0.5,
                               num_answer_sentences=1, best_similarity=[], truncated=False, note=None)] * (N * 4)
    return requests, assemble_rollout(requests, responses, rewards, ["a", "b", "c", "d"], PAD)


def per_row_reference(requests, sequences: PolicyBatch) -> PolicyBatch:
    """The same rows with every row's images copied into it (the layout the model takes), each row's image
    count read off its <|vision_start|> tokens."""
    with_images = [r for r in requests for _ in range(N) if r.pixel_values is not None]
    return PolicyBatch(sequences.input_ids, sequences.response_mask, torch.cat([r.pixel_values for r in with_images]),
                       torch.cat([r.image_grid_thw for r in with_images]),
                       images_per_row=count_images(sequences.input_ids, VISION_START))


def assert_same_model_inputs(a: PolicyBatch, b: PolicyBatch):
    a, b = a.model_inputs(torch.device("cpu")), b.model_inputs(torch.device("cpu"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] is None and b[key] is None) or torch.equal(a[key], b[key]), key


def test_a_rollout_stores_each_prompts_images_once(rollout):
    requests, batch = rollout
    unique_patches = sum(r.pixel_values.shape[0] for r in requests if r.pixel_values is not None)
    assert batch.sequences.pixel_values.shape[0] == unique_patches  # not N times
    assert batch.sequences.image_sets.tolist() == [0] * N + [1] * N + [-1] * N + [2] * N
    assert torch.equal(batch.sequences.images_per_row, count_images(batch.sequences.input_ids, VISION_START))
    assert_same_model_inputs(batch.sequences, per_row_reference(requests, batch.sequences))


@pytest.mark.parametrize("rows", [[0, 1, 2], [5, 3, 11, 6, 0], [6, 7, 8], [11], list(range(12))[::-1]])
def test_selections_keep_sharing_and_match_the_per_row_layout(rollout, rows):
    requests, batch = rollout
    reference = per_row_reference(requests, batch.sequences)
    rows = torch.tensor(rows)
    shared = batch.sequences.select(rows)
    assert_same_model_inputs(shared, reference.select(rows))
    shown = {int(s) for s in batch.sequences.image_sets[rows] if s >= 0}
    stored = shared.pixel_values.shape[0] if shared.pixel_values is not None else 0
    assert stored == sum(requests[[0, 1, 3][s]].pixel_values.shape[0] for s in shown)  # each shown set once


def test_micro_batches_and_padding_rows_match_the_per_row_layout(rollout):
    requests, batch = rollout
    reference = per_row_reference(requests, batch.sequences)
    for size in (1, 2, 4, 5):
        for shared, expected in zip(batch.sequences.split(size), reference.split(size)):
            assert_same_model_inputs(_pad_rows(shared, size, PAD), _pad_rows(expected, size, PAD))


def test_rows_of_one_image_set_must_show_the_same_number_of_images(rollout):
    _, batch = rollout
    sequences = batch.sequences
    broken = PolicyBatch(sequences.input_ids, sequences.response_mask, sequences.pixel_values,
                         sequences.image_grid_thw, torch.tensor([0] * N + [1] * N + [-1] * N + [1] * N),
                         sequences.images_per_row)
    with pytest.raises(ValueError, match="different numbers of images"):
        broken.model_inputs(torch.device("cpu"))
    with pytest.raises(ValueError, match="image_sets has shape"):
        PolicyBatch(sequences.input_ids, sequences.response_mask, sequences.pixel_values, sequences.image_grid_thw,
                    torch.zeros(3, dtype=torch.long), sequences.images_per_row)
    with pytest.raises(ValueError, match="images_per_row is required"):
        PolicyBatch(sequences.input_ids, sequences.response_mask, sequences.pixel_values, sequences.image_grid_thw,
                    sequences.image_sets)
    with pytest.raises(ValueError, match="images_per_row has shape"):
        PolicyBatch(sequences.input_ids, sequences.response_mask, sequences.pixel_values, sequences.image_grid_thw,
                    sequences.image_sets, torch.zeros(3, dtype=torch.long))


@pytest.fixture(scope="module")
def shared_images(tiny_hf_dir, tmp_path_factory):
    """One worker run (tests/workers/shared_images.py) for every check below: the policy without
    recomputation, with selective and with full recomputation (each with checkpointed vision blocks)."""
    from tests.launch import run_worker

    out = tmp_path_factory.mktemp("shared_images") / "shared.pt"
    run_worker("shared_images.py", "--hf", str(tiny_hf_dir), "--out", str(out), "--responses", "5",
               "--recompute", "none,selective,full", "--recompute-vision", timeout=900)  # three policies
    return torch.load(out)


def test_shared_images_run_the_vision_tower_once_with_the_per_row_gradients(shared_images):
    """float64 forward/backward of one micro-batch (3 prompts x 5 responses + a text-only row): sharing the
    images gives the per-row log-probs and gradients and saves fewer activations for the backward pass."""
    shared, per_row = shared_images["none"]["shared"], shared_images["none"]["per_row"]
    assert per_row["patches"] == 5 * shared["patches"]
    torch.testing.assert_close(shared["logprobs"], per_row["logprobs"], rtol=0, atol=1e-12)
    assert shared["grads"].keys() == per_row["grads"].keys()
    assert any(k.startswith("visual.") for k in shared["grads"])
    for name, grad in per_row["grads"].items():
        # HF's vision tower computes its norms, rotary embedding and softmax in float32 whatever the input
        # dtype: the tower's gradients, summed over 5 copies or taken once, agree to float32 rounding.
        tolerance = 1e-6 if name.startswith("visual.") else 1e-12
        torch.testing.assert_close(shared["grads"][name], grad, rtol=0, atol=tolerance * float(grad.abs().max()),
                                   msg=name)
    assert shared["saved_bytes"] < 0.8 * per_row["saved_bytes"]  # measured 0.75 with the tiny model (head dim 32)


# Measured on this batch (saved bytes relative to no recomputation): selective + vision 0.82, full + vision 0.25.
@pytest.mark.parametrize("recompute, saved_fraction", [("selective", 0.9), ("full", 0.3)])
def test_recomputation_keeps_the_gradients_and_saves_fewer_activations(shared_images, recompute, saved_fraction):
    """Megatron's recomputation of the language model and checkpointed vision blocks: the same float64
    log-probs and gradients as without, fewer bytes saved for the backward pass."""
    plain, recomputed = shared_images["none"]["shared"], shared_images[recompute]["shared"]
    torch.testing.assert_close(recomputed["logprobs"], plain["logprobs"], rtol=0, atol=1e-12)
    assert recomputed["grads"].keys() == plain["grads"].keys()
    for name, grad in plain["grads"].items():
        torch.testing.assert_close(recomputed["grads"][name], grad, rtol=0, atol=1e-10 * float(grad.abs().max()),
                                   msg=name)
    assert recomputed["saved_bytes"] < saved_fraction * plain["saved_bytes"]
