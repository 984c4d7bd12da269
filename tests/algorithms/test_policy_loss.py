"""Clipped policy loss: golden values (peers.md §4.7), gradients, micro-batch/DP exactness, KL."""

import math

import pytest
import torch

from nemo_viper.algorithms import AGGREGATIONS, ClippedPolicyLoss, LossNormalizer, PolicyLossConfig
from nemo_viper.runtime.metrics import combine

# peers.md §4.7 token-loss example; eps_low 0.2, eps_high 0.28 (the defaults).
RATIOS_A = [1.10, 1.35, 0.70]  # A = +1.0
RATIOS_B = [0.90, 0.75, 1.20, 3.50, 1.00]  # A = -0.5
GOLDEN = {  # aggregation: (no dual-clip, dual-clip c = 3)
    "token-mean": (0.0775, 0.04625),
    "seq-mean-token-mean": (-0.143333, -0.168333),
    "seq-mean-token-sum": (0.31, 0.185),
    "seq-mean-token-sum-norm": (0.062, 0.037),
}


def _golden_batch():
    ratios = torch.ones(2, 5)
    ratios[0, :3] = torch.tensor(RATIOS_A)
    ratios[1] = torch.tensor(RATIOS_B)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :3] = True
    mask[1] = True
    logprobs = torch.log(ratios).requires_grad_()
    return logprobs, torch.zeros(2, 5), torch.tensor([1.0, -0.5]), mask


def _config(aggregation, **kw):
    return PolicyLossConfig(aggregation=aggregation, max_response_length=5, **kw)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("dual", [False, True], ids=["no-dual", "dual-c3"])
def test_golden_loss(aggregation, dual):
    logprobs, old, adv, mask = _golden_batch()
    loss_fn = ClippedPolicyLoss(_config(aggregation, dual_clip_c=3.0 if dual else None))
    loss, _ = loss_fn(logprobs, old, adv, mask, LossNormalizer.from_masks([mask]))
    assert loss.item() == pytest.approx(GOLDEN[aggregation][dual], abs=1e-6)


def test_golden_metrics_split_over_micro_batches():
    logprobs, old, adv, mask = _golden_batch()
    loss_fn = ClippedPolicyLoss(_config("token-mean", dual_clip_c=3.0))
    norm = LossNormalizer.from_masks([mask])
    assert (norm.num_tokens, norm.num_sequences) == (8, 2)
    rows = (slice(0, 1), slice(1, 2))  # one sequence per micro-batch
    parts = [loss_fn(logprobs[r], old[r], adv[r], mask[r], norm)[1] for r in rows]
    combined = {k: combine([p[k] for p in parts]).value for k in parts[0]}  # by each metric's declared reduction
    assert combined["clip_frac_low"] == pytest.approx(1 / 8)  # ratio 0.75 with A < 0
    assert combined["clip_frac_high"] == pytest.approx(1 / 8)  # ratio 1.35 with A > 0
    assert combined["dual_clip_frac"] == pytest.approx(1 / 8)  # ratio 3.5 > c with A < 0
    assert combined["ratio_mean"] == pytest.approx(10.5 / 8)
    assert combined["ratio_max"] == pytest.approx(3.5)
    assert "kl_mean" not in combined


def _random_batch(seed, batch=8, length=12, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[-1] = 0  # one all-padding row: must count for nothing
    mask = torch.arange(length)[None, :] < lengths[:, None]
    old = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    log_ratio = torch.randn(batch, length, generator=gen, dtype=torch.float64) * 0.4
    log_ratio[0, 0], log_ratio[1, 0] = math.log(4.0), math.log(5.0)  # beyond a dual-clip bound of 3
    ref = old + torch.randn(batch, length, generator=gen, dtype=torch.float64) * 0.3
    adv = torch.randn(batch, generator=gen, dtype=torch.float64)
    adv[1] = -abs(adv[1])
    logprobs = (old + log_ratio).to(dtype)
    return logprobs, old.to(dtype), adv.to(dtype), mask, ref.to(dtype)


def _reference_loss(logprobs, old, adv, mask, ref, *, aggregation, eps_low, eps_high, c, beta, L):
    """The loss written out directly in float64, independent of the module under test."""
    r = torch.exp(logprobs - old)
    a = adv[:, None]
    loss = torch.maximum(-a * r, -a * torch.clamp(r, 1 - eps_low, 1 + eps_high))
    if c is not None:
        loss = torch.where(a < 0, torch.minimum(loss, -a * c), loss)
    if beta:
        d = ref - logprobs
        loss = loss + beta * (torch.exp(d) - d - 1)
    m = mask.double()
    per_seq = (loss * m).sum(dim=1)
    n_seq = (m.sum(dim=1) > 0).sum()
    if aggregation == "token-mean":
        return per_seq.sum() / m.sum()
    if aggregation == "seq-mean-token-mean":
        return (per_seq / m.sum(dim=1).clamp(min=1)).sum() / n_seq
    if aggregation == "seq-mean-token-sum":
        return per_seq.sum() / n_seq
    return per_seq.sum() / (n_seq * L)


CASES = [
    {"c": None, "beta": 0.0},
    {"c": 3.0, "beta": 0.0},
    {"c": 3.0, "beta": 0.05},
]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("case", CASES, ids=["plain", "dual", "dual+kl"])
def test_loss_and_grad_match_float64_reference(aggregation, case):
    logprobs, old, adv, mask, ref = _random_batch(seed=1)
    logprobs.requires_grad_()
    cfg = _config(aggregation, dual_clip_c=case["c"], kl_beta=case["beta"])
    norm = LossNormalizer.from_masks([mask])
    loss, _ = ClippedPolicyLoss(cfg)(logprobs, old, adv, mask, norm, ref_logprobs=ref)
    (grad,) = torch.autograd.grad(loss, logprobs)

    lp64 = logprobs.detach().double().requires_grad_()
    expected = _reference_loss(
        lp64, old.double(), adv.double(), mask, ref.double(), aggregation=aggregation,
        eps_low=0.2, eps_high=0.28, c=case["c"], beta=case["beta"], L=5,
    )
    (expected_grad,) = torch.autograd.grad(expected, lp64)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-7)


def test_token_mean_grad_matches_closed_form():
    """d loss / d logp = −A·r / N_tok where the unclipped branch is active, else 0."""
    logprobs, old, adv, mask, _ = _random_batch(seed=2, dtype=torch.float64)
    logprobs.requires_grad_()
    norm = LossNormalizer.from_masks([mask])
    loss, _ = ClippedPolicyLoss(PolicyLossConfig())(logprobs, old, adv, mask, norm)
    (grad,) = torch.autograd.grad(loss, logprobs)
    r = torch.exp(logprobs.detach() - old)
    a = adv[:, None].expand_as(r)
    active = ((a > 0) & (r <= 1.28)) | ((a < 0) & (r >= 0.8))
    expected = torch.where(active & mask, -a * r, torch.zeros_like(r)) / mask.sum()
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)


def _split_loss_and_grad(loss_fn, batch, splits):
    logprobs, old, adv, mask, ref = batch
    leaf = logprobs.detach().clone().requires_grad_()
    chunks = list(zip(*(t.chunk(splits) for t in (leaf, old, adv, mask, ref))))
    norm = LossNormalizer.from_masks([c[3] for c in chunks])
    total = torch.zeros(())
    for lp, o, a, m, rf in chunks:
        loss, _ = loss_fn(lp, o, a, m, norm, ref_logprobs=rf)
        loss.backward()
        total = total + loss.detach()
    return total, leaf.grad


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batch_invariance(aggregation):
    batch = _random_batch(seed=3)
    loss_fn = ClippedPolicyLoss(_config(aggregation, dual_clip_c=3.0, kl_beta=0.05))
    loss1, grad1 = _split_loss_and_grad(loss_fn, batch, 1)
    for splits in (2, 4):
        loss_k, grad_k = _split_loss_and_grad(loss_fn, batch, splits)
        assert loss_k.item() == pytest.approx(loss1.item(), rel=1e-6)
        torch.testing.assert_close(grad_k, grad1, rtol=1e-6, atol=1e-6 * grad1.abs().max().item())


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_data_parallel_contract(aggregation):
    """2 ranks × 2 micro-batches, all-reduced counts, loss × dp_size, DDP-averaged grads = 1 process."""
    logprobs, old, adv, mask, ref = _random_batch(seed=4)
    gen = torch.Generator().manual_seed(5)
    features = torch.randn(*logprobs.shape, generator=gen)
    loss_fn = ClippedPolicyLoss(_config(aggregation, dual_clip_c=3.0))

    def grad_of_shared_param(row_groups, normalizer, scale):
        theta = torch.zeros(logprobs.shape[1], requires_grad=True)  # one parameter shared by all rows
        for rows in row_groups:
            lp = logprobs[rows] + theta * features[rows]
            loss, _ = loss_fn(lp, old[rows], adv[rows], mask[rows], normalizer)
            (loss * scale).backward()
        return theta.grad

    single = grad_of_shared_param([slice(0, 8)], LossNormalizer.from_masks([mask]), 1.0)
    ranks = [[slice(0, 2), slice(2, 4)], [slice(4, 6), slice(6, 8)]]
    local = [LossNormalizer.from_masks([mask[r] for r in rows]) for rows in ranks]
    global_norm = LossNormalizer(  # what a SUM all-reduce of the local counts gives
        num_tokens=sum(n.num_tokens for n in local), num_sequences=sum(n.num_sequences for n in local)
    )
    dp_size = len(ranks)
    rank_grads = [grad_of_shared_param(rows, global_norm, dp_size) for rows in ranks]
    ddp_grad = sum(rank_grads) / dp_size  # Megatron DDP averages over data-parallel ranks
    torch.testing.assert_close(ddp_grad, single, rtol=1e-6, atol=1e-6 * single.abs().max().item())


def test_padding_values_never_reach_loss_or_grad():
    logprobs, old, adv, mask = _golden_batch()
    poisoned = logprobs.detach().clone()
    poisoned[0, 3:] = math.nan
    poisoned[0, 4] = math.inf
    poisoned.requires_grad_()
    norm = LossNormalizer.from_masks([mask])
    loss, metrics = ClippedPolicyLoss(PolicyLossConfig())(poisoned, old, adv, mask, norm)
    loss.backward()
    assert loss.item() == pytest.approx(GOLDEN["token-mean"][0], abs=1e-6)
    assert torch.isfinite(poisoned.grad).all()
    assert all(torch.isfinite(m.value) for m in metrics.values())


def test_advantages_per_token_equal_broadcast():
    logprobs, old, adv, mask = _golden_batch()
    loss_fn = ClippedPolicyLoss(PolicyLossConfig())
    norm = LossNormalizer.from_masks([mask])
    per_seq, _ = loss_fn(logprobs, old, adv, mask, norm)
    per_token, _ = loss_fn(logprobs, old, adv[:, None].expand(2, 5).clone(), mask, norm)
    assert per_token.item() == per_seq.item()


# ---- KL --------------------------------------------------------------------------------------


def _one_token(logp, ref, beta, estimator):
    cfg = PolicyLossConfig(kl_beta=beta, kl_estimator=estimator)
    mask = torch.ones(1, 1, dtype=torch.bool)
    lp = torch.tensor([[logp]])
    ref_lp = None if ref is None else torch.tensor([[ref]])
    # Zero advantage: the loss is the KL term alone.
    return ClippedPolicyLoss(cfg)(lp, lp, torch.zeros(1), mask, LossNormalizer(1, 1), ref_logprobs=ref_lp)


def test_kl_off_needs_no_reference():
    loss, metrics = _one_token(-1.0, None, 0.0, "k3")
    assert loss.item() == 0.0
    assert "kl_mean" not in metrics


def test_kl_on_without_reference_is_an_error():
    with pytest.raises(ValueError, match="ref_logprobs"):
        _one_token(-1.0, None, 0.1, "k3")


def test_k3_value():
    # logp = -1.0, ref = -1.5: d = ref - logp = -0.5, k3 = exp(-0.5) + 0.5 - 1.
    k3 = math.exp(-0.5) + 0.5 - 1
    loss, metrics = _one_token(-1.0, -1.5, 0.1, "k3")
    assert loss.item() == pytest.approx(0.1 * k3, rel=1e-6)
    assert metrics["kl_mean"].value.item() == pytest.approx(k3, rel=1e-6)


def test_k3_is_capped_as_verl_caps_it_at_large_divergence():
    """verl's low_var_kl: d = clamp(ref - logp, ±20), k3 = clamp(exp(d) - d - 1, ±10); loss and gradient match it
    from |d| = 0 to beyond the log-ratio limit (a capped token adds no KL gradient)."""
    d = torch.tensor([[-25.0, -20.0, -5.0, -0.5, 0.0, 0.5, 2.0, 2.7, 5.0, 20.0, 25.0]], dtype=torch.float64)
    logp = torch.full_like(d, -30.0, requires_grad=True)
    mask = torch.ones_like(d, dtype=torch.bool)
    config = PolicyLossConfig(kl_beta=0.5)
    loss, _ = ClippedPolicyLoss(config)(logp, logp.detach(), torch.zeros(1), mask, LossNormalizer.from_masks([mask]),
                                        ref_logprobs=logp.detach() + d)
    (grad,) = torch.autograd.grad(loss, logp)

    lp64 = logp.detach().clone().requires_grad_()
    kl = (logp.detach() + d - lp64).clamp(-20, 20)
    expected = 0.5 * (torch.exp(kl) - kl - 1).clamp(-10, 10).mean()
    (expected_grad,) = torch.autograd.grad(expected, lp64)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=0)
    assert expected_grad[0, -4:].abs().max() == 0  # d >= 2.7: k3 > 10, capped


def test_k1_value():
    loss, _ = _one_token(-1.0, -1.5, 0.1, "k1")
    assert loss.item() == pytest.approx(0.1 * 0.5, rel=1e-6)


# ---- configuration and input errors ----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"aggregation": "token-sum"},
        {"aggregation": "seq-mean-token-sum-norm", "max_response_length": 0},
        {"dual_clip_c": 1.0},
        {"dual_clip_c": 0.5},
        {"kl_estimator": "k2"},
        {"kl_beta": -0.1},
        {"eps_low": -0.1},
        {"eps_high": -0.1},
        {"eps_low": 1.0},
    ],
)
def test_bad_config_is_an_error(kwargs):
    with pytest.raises(ValueError):
        PolicyLossConfig(**kwargs)


def test_sum_norm_needs_its_length_constant():
    with pytest.raises(ValueError, match="needs max_response_length"):
        ClippedPolicyLoss(PolicyLossConfig(aggregation="seq-mean-token-sum-norm"))


def test_bad_normalizer_is_an_error():
    with pytest.raises(ValueError, match="positive"):
        LossNormalizer.from_masks([torch.zeros(2, 3, dtype=torch.bool)])


def test_shape_mismatch_is_an_error():
    logprobs, old, adv, mask = _golden_batch()
    loss_fn = ClippedPolicyLoss(PolicyLossConfig())
    norm = LossNormalizer.from_masks([mask])
    with pytest.raises(ValueError, match="same|share"):
        loss_fn(logprobs, old[:, :4], adv, mask, norm)
    with pytest.raises(ValueError, match="advantages"):
        loss_fn(logprobs, old, adv[:1], mask, norm)
