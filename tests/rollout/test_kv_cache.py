"""The slot KV cache's attention against plain softmax attention over each sample's whole sequence."""

import math

import pytest
import torch

from nemo_viper.rollout.kv_cache import SlotKVCache

HEADS, GROUPS, DIM = 4, 2, 8


def reference(query, keys, values):
    """softmax(q k^T / sqrt(d)) v for one query [heads, d] over keys/values [t, groups, d] (GQA by repetition)."""
    keys = keys.repeat_interleave(HEADS // GROUPS, dim=1)
    values = values.repeat_interleave(HEADS // GROUPS, dim=1)
    weights = torch.softmax(torch.einsum("hd,thd->ht", query, keys) / math.sqrt(DIM), dim=-1)
    return torch.einsum("ht,thd->hd", weights, values).reshape(-1)


def test_prefill_refill_and_decode_attend_to_each_slots_own_tokens():
    torch.manual_seed(0)
    cache = SlotKVCache(slots=3, columns=12)
    scale = 1 / math.sqrt(DIM)
    sequences = {}  # slot -> (keys, values) of its tokens so far

    def prefill(lengths, assignments):
        """Right-padded prompts of ``lengths`` tokens; ``assignments``: (slot, prompt) pairs."""
        keys = torch.randn(max(lengths), len(lengths), GROUPS, DIM)
        values = torch.randn(max(lengths), len(lengths), GROUPS, DIM)
        query = torch.randn(max(lengths), len(lengths), HEADS, DIM)
        for slot, prompt in assignments:
            sequences[slot] = (keys[: lengths[prompt], prompt], values[: lengths[prompt], prompt])
        slots, sources = (torch.tensor(column) for column in zip(*assignments))
        with cache.prefill(slots, sources):
            out = cache.attend(0, query, keys, values, scale)
        for prompt, length in enumerate(lengths):
            for at in range(length):
                expected = reference(query[at, prompt], keys[: at + 1, prompt], values[: at + 1, prompt])
                torch.testing.assert_close(out[at, prompt], expected)

    def decode(rows):
        fill = torch.tensor([len(sequences[s][0]) if s in sequences else 0 for s in range(rows)])
        keys, values = torch.randn(1, rows, GROUPS, DIM), torch.randn(1, rows, GROUPS, DIM)
        query = torch.randn(1, rows, HEADS, DIM)
        for slot in list(sequences):
            if slot < rows:
                old_k, old_v = sequences[slot]
                sequences[slot] = (torch.cat([old_k, keys[:, slot]]), torch.cat([old_v, values[:, slot]]))
        with cache.decode(fill, int(fill.max()) + 1):
            out = cache.attend(0, query, keys, values, scale)
        for slot in sequences:
            if slot < rows:
                torch.testing.assert_close(out[0, slot], reference(query[0, slot], *sequences[slot]))

    prefill([3, 5], [(0, 0), (1, 1), (2, 0)])  # prompt 0 into two slots
    for _ in range(3):
        decode(3)
    # slot 1 finishes; a new 2-token prompt takes it while slots 0 and 2 are 6 tokens in
    del sequences[1]
    prefill([2], [(1, 0)])
    for _ in range(2):
        decode(3)
    # the last slot finishes: only slots 0..1 are computed
    del sequences[2]
    decode(2)


def test_attend_outside_a_plan_is_an_error():
    cache = SlotKVCache(slots=1, columns=4)
    with pytest.raises(RuntimeError, match="outside a prefill/decode block"):
        cache.attend(0, *(torch.zeros(1, 1, 2, DIM) for _ in range(3)), 1.0)


def test_decode_calls_sdpa_as_the_memory_efficient_kernel_can_run_it(monkeypatch):
    """CUDA's SDPA runs a boolean mask together with ``enable_gqa`` only on its math kernel (flash takes no mask,
    memory-efficient no grouped heads); CPU's kernels accept both, so the call itself is checked: decode passes
    its mask with as many query heads as key heads, contiguous last dimensions, and the result stays exact."""
    import nemo_viper.rollout.kv_cache as kv_cache

    calls = []
    real = kv_cache.scaled_dot_product_attention

    def recording(query, key, value, **kwargs):
        calls.append((query, key, value, kwargs))
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(kv_cache, "scaled_dot_product_attention", recording)
    torch.manual_seed(1)
    heads, groups, fill = 6, 2, torch.tensor([4, 1, 6])
    cache = SlotKVCache(slots=3, columns=8)
    history = torch.randn(2, 3, groups, 8, DIM)  # keys/values of the earlier tokens
    cache.layers[0] = tuple(h.clone() for h in history)
    query, key, value = torch.randn(1, 3, heads, DIM), torch.randn(1, 3, groups, DIM), torch.randn(1, 3, groups, DIM)
    with cache.decode(fill, int(fill.max()) + 1):
        out = cache.attend(0, query, key, value, 0.3)

    (q, k, v, kwargs), = calls
    assert kwargs.get("attn_mask") is not None and not kwargs.get("enable_gqa", False)
    assert q.shape[1] == k.shape[1] == v.shape[1] == groups
    assert all(t.stride(-1) == 1 for t in (q, k, v))
    for slot in range(3):
        keys = torch.cat([history[0, slot, :, : fill[slot]], key[0, slot, :, None]], dim=1).transpose(0, 1)
        values = torch.cat([history[1, slot, :, : fill[slot]], value[0, slot, :, None]], dim=1).transpose(0, 1)
        reps = heads // groups
        weights = torch.softmax(0.3 * torch.einsum("hd,thd->ht", query[0, slot], keys.repeat_interleave(reps, 1)), -1)
        expected = torch.einsum("ht,thd->hd", weights, values.repeat_interleave(reps, 1)).reshape(-1)
        torch.testing.assert_close(out[0, slot], expected)
