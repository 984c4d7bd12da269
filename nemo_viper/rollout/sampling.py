"""Drawing the next token from vocab-sharded logits, identically on every tensor-parallel rank.

The output layer leaves each TP rank with logits for its slice of the vocabulary ([B, V/TP]). Nothing
here gathers the full vocabulary in the common cases:

- **Sampling** is inverse-CDF sampling with one uniform number ``u`` per row and step. Each rank sums
  the (unnormalised) probabilities of its slice; one all-gather of those ``[B]`` masses tells every
  rank which slice holds the quantile ``u``; that rank finds the token with a ``searchsorted`` on its
  local cumulative sum, and an all-reduce of ``[B]`` ids hands it to all ranks. The CDF runs in
  global vocabulary order at every TP size, so a sample does not depend on the layout (up to float
  rounding at a bin edge). Greedy rows take the arg-max: per-rank maxima, one all-gather of ``[2, B]``.
- **Randomness** is counter-based: ``u`` is a hash of the row's stream key (from its seed and sample
  index) and the step. No generator state is shared or advanced, so a sample depends only on its
  seed, never on batch composition (a ``torch.Generator`` per sample would need a Python loop per step).
- **Top-k / top-p**: each rank contributes its ``C`` largest logits (``C`` = max top-k, and at least
  ``top_p_candidates`` when top-p is on); after an all-gather of ``[B, TP*C]`` candidates top-k and
  top-p are applied to them with the normaliser of the full distribution (all-reduced), and the
  inverse-CDF draw runs over the survivors. The first ``C`` sorted candidates are exactly the global
  top-``C``, so the nucleus is exact whenever it closes within them; if it does not for some row, the
  step is redone with every logit as a candidate (then the full vocabulary IS gathered).
- **Log-probs** of the drawn tokens are ``log softmax(logits / T)`` over the full, untruncated,
  unsuppressed vocabulary (max and sum of exponentials all-reduced), the quantity
  :func:`nemo_viper.models.logprobs.compute_logprobs` recomputes.

Order of the logit transforms, as in transformers: suppression, temperature, top-k, top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nemo_viper.rollout.interface import SamplingParams
from nemo_viper.runtime import collectives
from nemo_viper.runtime.collectives import ReduceOp

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1
_KEY_BASIS = 0x2545F491


@dataclass(frozen=True)
class VocabShard:
    """This rank's vocabulary slice ``[start, start + size)`` and the TP group (``None``: one rank)."""

    start: int
    size: int
    group: object | None = None

    @property
    def world_size(self) -> int:
        return 1 if self.group is None else collectives.world_size(self.group)


@dataclass
class SamplingControls:
    """Per-row sampling settings as tensors of length B (one row per sample being decoded)."""

    temperature: Tensor  # float32
    greedy: Tensor  # bool
    top_k: Tensor  # long, 0 = off
    top_p: Tensor  # float32, 1 = off
    suppress: Tensor  # bool: the row never draws the suppressed tokens
    uniform: Tensor  # [B, steps] float64: the row's random number for each decoding step

    @classmethod
    def from_params(
        cls, params: list[SamplingParams], seeds: Tensor, sample_index: Tensor, steps: int
    ) -> SamplingControls:
        """Controls for rows with ``params[i]`` and ``steps`` decoding steps; row ``i`` draws from the random
        stream ``(seeds[i], sample_index[i])``."""
        keys = stream_keys(seeds, sample_index)
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32),
            greedy=torch.tensor([p.greedy for p in params], dtype=torch.bool),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32),
            suppress=torch.tensor([p.suppress_vision_tokens for p in params], dtype=torch.bool),
            uniform=uniforms(_mix(keys[:, None], torch.arange(steps))),
        )

    def select(self, rows: Tensor) -> SamplingControls:
        return SamplingControls(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))

    def to(self, device) -> SamplingControls:
        return SamplingControls(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


@dataclass(frozen=True)
class SamplingBranches:
    """Which draws a batch of rows needs and its largest top-k, decided on the host from the rows'
    :class:`SamplingParams` (deciding from the device controls would cost a host sync per step).
    A superset is fine: a draw no row needs is computed and discarded."""

    greedy: bool
    plain: bool
    truncating: bool
    max_top_k: int

    @classmethod
    def of(cls, params: list[SamplingParams]) -> SamplingBranches:
        truncating = [not p.greedy and (p.top_k > 0 or p.top_p < 1) for p in params]
        return cls(
            greedy=any(p.greedy for p in params),
            plain=any(not p.greedy and not t for p, t in zip(params, truncating)),
            truncating=any(truncating),
            max_top_k=max((p.top_k for p in params), default=0),
        )


# ---- counter-based random numbers (32-bit integer hashing in int64 tensors, no overflow) ----


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32``, split in 16-bit halves so int64 never overflows."""
    return ((x & 0xFFFF) * c + (((x >> 16) * (c & 0xFFFF)) << 16)) & _MASK32


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection with full avalanche."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _mix(h: Tensor, value: Tensor | int) -> Tensor:
    return _fmix32(h ^ _mul32(torch.as_tensor(value) & _MASK32, _GOLDEN))


def stream_keys(seeds: Tensor, sample_index: Tensor) -> Tensor:
    """The random-stream key of each row from its (non-negative int64) seed and sample index."""
    h = _mix(torch.full_like(seeds, _KEY_BASIS), seeds & _MASK32)
    h = _mix(h, seeds >> 32)
    return _mix(h, sample_index)


def uniforms(step_keys: Tensor) -> Tensor:
    """One float64 uniform in (0, 1) with 52 random bits per key (any shape)."""
    high = _fmix32(step_keys ^ 0x5BD1E995)
    low = _fmix32(high ^ step_keys)
    return ((high << 20) + (low >> 12)).double().add(0.5).mul(2.0**-52)  # exact: below 2**52


def _inverse_cdf(cdf: Tensor, target: Tensor) -> Tensor:
    """Index of the first entry of the non-decreasing rows ``cdf`` [B, K] above ``target`` [B]; targets are
    kept strictly below the row total, so the index never lands on a zero-weight entry."""
    target = torch.minimum(target, torch.nextafter(cdf[:, -1], torch.zeros_like(cdf[:, -1])))
    return torch.searchsorted(cdf, target[:, None], right=True)[:, 0]


# ---- collectives over the TP group (identity on one rank) ----


def _all_gather(tensor: Tensor, shard: VocabShard) -> Tensor:
    """[W, *shape]: every rank's ``tensor``, in rank (= vocabulary) order."""
    if shard.world_size == 1:
        return tensor[None]
    return collectives.all_gather(tensor, shard.group)


def _all_reduce(tensor: Tensor, op, shard: VocabShard) -> Tensor:
    return tensor if shard.world_size == 1 else collectives.all_reduce(tensor, op, shard.group)


def _parallel_argmax(scores: Tensor, shard: VocabShard) -> Tensor:
    """Global token id of each row's maximum of sharded ``scores`` [B, V/TP]; ties go to the lowest id."""
    values, index = scores.max(dim=-1)
    packed = _all_gather(torch.stack([values.double(), (index + shard.start).double()]), shard)  # [W, 2, B]
    winner = packed[:, 0].argmax(dim=0)  # first maximum = lowest rank = lowest token id
    return packed[:, 1].gather(0, winner[None])[0].long()


def _parallel_sample(log_weights: Tensor, uniform: Tensor, shard: VocabShard) -> Tensor:
    """Global token id drawn with probability proportional to ``exp(log_weights)`` (sharded [B, V/TP], -inf
    allowed) at quantile ``uniform`` [B] of the CDF in global vocabulary order."""
    top = _all_reduce(log_weights.max(dim=-1).values, ReduceOp.MAX, shard)
    cdf = torch.exp(log_weights - top[:, None]).double().cumsum(dim=-1)
    masses = _all_gather(cdf[:, -1].contiguous(), shard)  # [W, B], rank = vocabulary order
    ends = masses.cumsum(dim=0)
    target = uniform * ends[-1]
    last_nonempty = (masses > 0).long().cumsum(dim=0).argmax(dim=0)  # first index reaching the final count
    owner = torch.minimum((ends <= target).sum(dim=0), last_nonempty)
    local = _inverse_cdf(cdf, target - (ends - masses).gather(0, owner[None])[0])
    rank = shard.start // shard.size
    return _all_reduce(torch.where(owner == rank, local + shard.start, 0), ReduceOp.SUM, shard)


def _parallel_logsumexp(scores: Tensor, shard: VocabShard) -> Tensor:
    top = _all_reduce(scores.max(dim=-1).values, ReduceOp.MAX, shard)
    total = _all_reduce(torch.exp(scores - top[:, None]).sum(dim=-1), ReduceOp.SUM, shard)
    return top + torch.log(total)


def token_logprobs(scaled: Tensor, tokens: Tensor, shard: VocabShard) -> Tensor:
    """``log softmax(scaled)[tokens]`` [B] from sharded ``scaled`` logits [B, V/TP] (two all-reduces)."""
    top = _all_reduce(scaled.max(dim=-1).values, ReduceOp.MAX, shard)
    local = tokens - shard.start
    owned = (local >= 0) & (local < shard.size)
    chosen = scaled.gather(-1, local.clamp(0, shard.size - 1)[:, None])[:, 0] - top
    sums = torch.stack([torch.exp(scaled - top[:, None]).sum(dim=-1), torch.where(owned, chosen, 0.0)])
    total, chosen = _all_reduce(sums, ReduceOp.SUM, shard)
    return chosen - torch.log(total)


def _truncated_draw(
    ranking: Tensor, controls: SamplingControls, uniform: Tensor, shard: VocabShard, candidates: int
) -> Tensor:
    """Top-k / top-p sampling over the gathered per-rank top-``candidates`` logits (``candidates`` >= every
    row's top-k; see the module doc)."""
    width = min(shard.size, candidates)
    values, index = ranking.topk(width, dim=-1)  # sorted, descending
    values = _all_gather(values, shard).permute(1, 0, 2).reshape(len(values), -1)  # [B, W*width]
    ids = _all_gather(index + shard.start, shard).permute(1, 0, 2).reshape(len(values), -1)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, order)

    position = torch.arange(values.shape[-1], device=values.device)
    top_k = controls.top_k[:, None]
    keep = (top_k == 0) | (position < top_k)
    # Top-p renormalises what top-k kept; without top-k that is the whole (suppressed) vocabulary.
    kept_lse = torch.logsumexp(values.masked_fill(~keep, float("-inf")), dim=-1)
    lse = torch.where(controls.top_k > 0, kept_lse, _parallel_logsumexp(ranking, shard))
    probs = torch.exp(values - lse[:, None]).masked_fill(~keep, 0.0)
    keep &= (probs.cumsum(dim=-1) - probs) < controls.top_p[:, None]

    if width < shard.size:
        needs_exact = (controls.top_k == 0) & (controls.top_p < 1)
        closed = probs[:, :width].sum(dim=-1) >= controls.top_p
        # A host sync, on steps with top-p rows only; the same decision on every rank (gathered data).
        if bool((needs_exact & ~closed).any()):
            return _truncated_draw(ranking, controls, uniform, shard, shard.size)

    cdf = probs.masked_fill(~keep, 0.0).double().cumsum(dim=-1)
    return ids.gather(-1, _inverse_cdf(cdf, uniform * cdf[:, -1])[:, None])[:, 0]


@torch.no_grad()
def sample_tokens(
    logits: Tensor,
    controls: SamplingControls,
    step: int | Tensor,
    shard: VocabShard,
    suppressed: Tensor,
    top_p_candidates: int = 64,
    branches: SamplingBranches | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one token per row from vocab-sharded ``logits`` [B, V/TP] at decoding ``step`` (one for all rows,
    or [B] long: each row's own step).

    ``suppressed`` [V/TP] (bool) marks this rank's tokens that rows with ``controls.suppress`` never
    draw. Returns ``(tokens [B] long, logprobs [B] float32)``, identical on every rank of the TP group
    (every rank must call this with the same controls and step). Log-probs: see the module doc.
    ``branches`` (the rows' :class:`SamplingBranches`) spares the host syncs of reading them from the
    controls; without top-p rows the call then never waits for the device.
    """
    logits = logits.float()
    scaled = logits / controls.temperature[:, None]
    ranking = torch.where(controls.greedy[:, None], logits, scaled)
    ranking = ranking.masked_fill(controls.suppress[:, None] & suppressed[None], float("-inf"))
    steps = torch.as_tensor(step, device=controls.uniform.device).long().expand(len(logits))
    uniform = controls.uniform.gather(1, steps[:, None])[:, 0]

    # Every rank takes the same branches: they depend on the controls only.
    truncating = ~controls.greedy & ((controls.top_k > 0) | (controls.top_p < 1))
    plain = ~controls.greedy & ~truncating
    if branches is None:
        branches = SamplingBranches(
            bool(controls.greedy.any()), bool(plain.any()), bool(truncating.any()), int(controls.top_k.max())
        )
    tokens = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    if branches.greedy:
        tokens = torch.where(controls.greedy, _parallel_argmax(ranking, shard), tokens)
    if branches.plain:
        tokens = torch.where(plain, _parallel_sample(ranking, uniform, shard), tokens)
    if branches.truncating:
        candidates = max(top_p_candidates, branches.max_top_k)
        tokens = torch.where(truncating, _truncated_draw(ranking, controls, uniform, shard, candidates), tokens)
    return tokens, token_logprobs(scaled, tokens, shard)
