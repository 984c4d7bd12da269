"""When a sample stops, and what it returns: EOS tokens, stop strings, token budgets.

Stop strings are matched on decoded text. While decoding, only the tail of each sample's tokens is
decoded: a stop string of ``c`` characters that first appears at this step lies within the text of the
last ``4c`` tokens (a byte-level BPE token holds at least one byte, a character at most four), so
:func:`stop_window` tokens are always enough (special tokens, which decode to nothing, are the one
exception: the window has slack for a few).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from nemo_viper.rollout.interface import GenerationResponse, SamplingParams

RUNNING, EOS, STOP, LENGTH = 0, 1, 2, 3
_REASONS = {EOS: "eos", STOP: "stop", LENGTH: "length"}


def stop_window(stop_strings: Sequence[str]) -> int:
    """How many trailing tokens to decode to find any of ``stop_strings`` completed by the last token."""
    return 4 * max((len(s) for s in stop_strings), default=0) + 8


def find_stop_strings(tokenizer, tails: list[list[int]], stop_strings: list[tuple[str, ...]]) -> list[bool]:
    """Whether the decoded tail ``tails[i]`` contains one of ``stop_strings[i]`` (one batched decode)."""
    texts = tokenizer.batch_decode(tails, skip_special_tokens=True)
    return [any(s in text for s in stops) for text, stops in zip(texts, stop_strings)]


def cut_at_stop_string(text: str, stop_strings: Sequence[str], include: bool) -> str:
    """``text`` up to its earliest stop string: before it, or through it when ``include``."""
    hits = [(text.find(s), len(s)) for s in stop_strings if s in text]
    if not hits:
        return text
    start, length = min(hits)
    return text[: start + length] if include else text[:start]


def response_texts(tokenizer, token_lists: list[list[int]], params: list[SamplingParams], stopped: list[bool]) -> list[str]:
    """The interface's text of each response: its tokens decoded at once (special tokens skipped), cut at its
    stop string when ``stopped`` at one (see :class:`~nemo_viper.rollout.config.SamplingParams`)."""
    texts = tokenizer.batch_decode(token_lists, skip_special_tokens=True)
    return [
        cut_at_stop_string(text, p.stop_strings, p.include_stop_string) if stop else text
        for text, p, stop in zip(texts, params, stopped)
    ]


class SampleLog:
    """The tokens and log-probs of a batch of samples as they are generated, and their stopping rules.

    Rows are samples (global row ids); ``max_new_tokens[row]`` is the row's budget (already capped by
    the context). A row stops at an EOS token (kept), a stop string, or its budget, checked in that
    order of precedence.
    """

    def __init__(self, params: list[SamplingParams], max_new_tokens: Tensor, eos_token_ids: Tensor, tokenizer):
        rows, steps = len(params), int(max_new_tokens.max())
        self.params, self.max_new_tokens, self.tokenizer = params, max_new_tokens, tokenizer
        self.eos_token_ids = eos_token_ids
        self.tokens = torch.zeros(rows, steps, dtype=torch.long)
        self.logprobs = torch.zeros(rows, steps, dtype=torch.float32)
        self.reasons = torch.zeros(rows, dtype=torch.long)
        self.lengths = torch.zeros(rows, dtype=torch.long)
        self.has_stop_strings = torch.tensor([bool(p.stop_strings) for p in params])
        self.window = stop_window([s for p in params for s in p.stop_strings])

    def record(self, step: int | Tensor, rows: Tensor, tokens: Tensor, logprobs: Tensor) -> Tensor:
        """Store the ``tokens`` / ``logprobs`` of ``rows`` (CPU long) at generation step ``step`` (one for all
        rows, or one per row); returns which of them stop."""
        steps = torch.as_tensor(step).cpu().long().expand(len(rows))
        self.tokens[rows, steps], self.logprobs[rows, steps] = tokens.cpu(), logprobs.cpu()
        code = torch.where(torch.isin(tokens, self.eos_token_ids).cpu(), EOS, RUNNING)
        code = torch.where((code == RUNNING) & (steps + 1 >= self.max_new_tokens[rows]), LENGTH, code)
        check = (self.has_stop_strings[rows] & (code != EOS)).nonzero()[:, 0]
        if len(check):
            checked = list(zip(rows[check].tolist(), steps[check].tolist()))
            tails = [self.tokens[row, max(0, at + 1 - self.window) : at + 1].tolist() for row, at in checked]
            hits = find_stop_strings(self.tokenizer, tails, [self.params[row].stop_strings for row, _ in checked])
            code[check[torch.tensor(hits, dtype=torch.bool)]] = STOP
        finished = code != RUNNING
        self.reasons[rows[finished]] = code[finished]
        self.lengths[rows[finished]] = steps[finished] + 1
        return finished

    def responses(self) -> list[GenerationResponse]:
        """One response per row, in row order (all rows must have stopped)."""
        token_lists = [self.tokens[row, :length].tolist() for row, length in enumerate(self.lengths.tolist())]
        reasons = self.reasons.tolist()
        texts = response_texts(self.tokenizer, token_lists, self.params, [reason == STOP for reason in reasons])
        return [
            GenerationResponse(tokens, text, self.logprobs[row, : len(tokens)].tolist(), _REASONS[reason])
            for row, (tokens, text, reason) in enumerate(zip(token_lists, texts, reasons))
        ]
