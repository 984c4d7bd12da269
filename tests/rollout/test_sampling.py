"""Vocab-parallel sampling on one rank (no process group): distributions, truncation, seeds, log-probs.

The same code at TP=2 is checked end to end in test_megatron_generation.py (identical samples at TP=1 and TP=2).
"""

import pytest
import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper

from nemo_viper.rollout import SamplingParams
from nemo_viper.rollout.sampling import SamplingControls, VocabShard, sample_tokens, stream_keys, uniforms

VOCAB = 6
LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0])
DRAWS = 40_000


def draw(params: SamplingParams, logits=LOGITS, rows=DRAWS, step=0, suppressed=None, candidates=64, seed=7):
    controls = SamplingControls.from_params(
        [params] * rows, seeds=torch.full((rows,), seed), sample_index=torch.arange(rows), steps=step + 1
    )
    suppressed = torch.zeros(len(logits), dtype=torch.bool) if suppressed is None else suppressed
    return sample_tokens(logits.expand(rows, -1), controls, step, VocabShard(0, len(logits)), suppressed, candidates)


def frequencies(tokens, vocab=VOCAB):
    return torch.bincount(tokens, minlength=vocab).double() / len(tokens)


def test_uniforms_are_uniform_and_keyed():
    keys = stream_keys(torch.full((50_000,), 5), torch.arange(50_000))
    assert len(keys.unique()) == 50_000
    u = uniforms(keys)
    assert u.dtype == torch.float64 and bool(((u > 0) & (u < 1)).all())
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    assert torch.equal(uniforms(keys[:10]), u[:10])
    assert not torch.equal(uniforms(stream_keys(torch.full((10,), 6), torch.arange(10))), u[:10])


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_follows_the_tempered_softmax(temperature):
    tokens, logprobs = draw(SamplingParams(temperature=temperature, suppress_vision_tokens=False))
    expected = torch.softmax(LOGITS.double() / temperature, -1)
    assert (frequencies(tokens) - expected).abs().max() < 0.012
    assert torch.allclose(logprobs.double(), expected.log()[tokens], atol=1e-6)


def test_greedy_takes_the_argmax_and_reports_tempered_logprobs():
    tokens, logprobs = draw(SamplingParams(greedy=True, temperature=2.0), rows=3)
    assert tokens.tolist() == [0, 0, 0]
    assert torch.allclose(logprobs, torch.log_softmax(LOGITS / 2.0, -1)[0].expand(3))


def test_suppressed_tokens_are_never_drawn_but_logprobs_are_untruncated():
    suppressed = torch.tensor([True, False, False, False, False, True])
    tokens, logprobs = draw(SamplingParams(), suppressed=suppressed)
    assert not suppressed[tokens].any()
    assert torch.allclose(logprobs, torch.log_softmax(LOGITS, -1)[tokens], atol=1e-6)
    expected = torch.softmax(LOGITS.masked_fill(suppressed, float("-inf")).double(), -1)
    assert (frequencies(tokens) - expected).abs().max() < 0.012
    greedy, _ = draw(SamplingParams(greedy=True), rows=1, suppressed=suppressed)
    assert greedy.item() == 1
    unsuppressed, _ = draw(SamplingParams(greedy=True, suppress_vision_tokens=False), rows=1, suppressed=suppressed)
    assert unsuppressed.item() == 0


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.8), (4, 0.7)])
def test_truncation_matches_transformers_warpers(top_k, top_p):
    tokens, logprobs = draw(SamplingParams(top_k=top_k, top_p=top_p))
    scores = LOGITS[None].clone()
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    expected = torch.softmax(scores[0].double(), -1)
    assert set(tokens.unique().tolist()) == set(expected.nonzero()[:, 0].tolist())
    assert (frequencies(tokens) - expected).abs().max() < 0.012
    assert torch.allclose(logprobs, torch.log_softmax(LOGITS, -1)[tokens], atol=1e-6)  # before truncation


def test_top_p_candidates_fallback_is_exact():
    """With one candidate per rank the nucleus of a flat distribution does not close: the full-vocabulary
    retry must give exactly the draws of a full candidate set."""
    logits = torch.linspace(0.3, 0.0, 40)
    params = SamplingParams(top_p=0.9)
    few, _ = draw(params, logits=logits, rows=500, candidates=1)
    many, _ = draw(params, logits=logits, rows=500, candidates=40)
    assert torch.equal(few, many)
    assert len(few.unique()) > 20


def test_samples_depend_only_on_seed_sample_and_step():
    """A row's draw is a function of (logits, its params, seed, sample index, step): not of its batch."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    no_suppression = torch.zeros(50, dtype=torch.bool)
    plain, top_k = SamplingParams(), SamplingParams(top_k=5)
    controls = SamplingControls.from_params(
        [plain, top_k, plain, plain], seeds=torch.tensor([3, 3, 9, 3]), sample_index=torch.tensor([1, 1, 1, 2]), steps=5
    )
    batch, _ = sample_tokens(logits, controls, 4, VocabShard(0, 50), no_suppression)
    for row in range(4):
        alone, _ = sample_tokens(
            logits[row : row + 1], controls.select(torch.tensor([row])), 4, VocabShard(0, 50), no_suppression
        )
        assert alone.item() == batch[row].item()

    reference = draw(plain, rows=64, seed=1)[0]
    assert torch.equal(draw(plain, rows=64, seed=1)[0], reference)
    assert not torch.equal(draw(plain, rows=64, seed=2)[0], reference)
    assert not torch.equal(draw(plain, rows=64, seed=1, step=1)[0], reference)
