"""Sampling settings, picking the next token from logits, and padding token lists into batches.
Shared by PPO rollouts (train/rollout.py) and the server's scheduler (serving/scheduler.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    eos_token_id: int
    pad_token_id: int
    greedy: bool = False


def sample_tokens(logits: torch.Tensor, sampling: Sampling, generator=None) -> torch.Tensor:
    """(B,) next tokens from (B, V) logits: greedy, or temperature and nucleus (top-p) sampling."""
    if sampling.greedy:
        return logits.argmax(-1)
    return sample_with_logprobs(logits, sampling, generator)[0]


def sample_with_logprobs(logits: torch.Tensor, sampling: Sampling,
                         generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """((B,) next tokens as `sample_tokens` draws them, (B,) float32 log-probs of those tokens under
    the full distribution at the sampling temperature): log_softmax(logits / temperature), greedy
    included, over every token, not over the top-p nucleus the token was drawn from (what a
    training forward at that temperature gives the same token).

    Sampling inverts each row's cumulative distribution at one uniform draw: a cumsum and a
    binary search, several times cheaper on a CPU than `torch.multinomial` over a 49k vocabulary.
    The log-prob of a drawn token is the log of its probability, already at hand (a drawn token's
    probability is never near fp32's underflow)."""
    scaled = logits.float() / sampling.temperature
    if sampling.greedy:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(scaled, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    full = torch.softmax(scaled, dim=-1)
    probs, order = full, None
    if sampling.top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        outside = probs.cumsum(-1) - probs > sampling.top_p  # keep the first token over p
        probs = probs.masked_fill(outside, 0.0)
    cdf = probs.cumsum(-1)
    draw = torch.rand((len(cdf), 1), generator=generator, device=cdf.device) * cdf[:, -1:]
    # right=True: the first index whose cdf exceeds the draw, so a zero-probability token
    # (an empty interval) is never picked
    tokens = torch.searchsorted(cdf, draw, right=True).clamp(max=cdf.shape[-1] - 1)
    tokens = tokens if order is None else order.gather(-1, tokens)  # (B, 1)
    return tokens.squeeze(-1), full.gather(-1, tokens).squeeze(-1).log()


def pad(sequences: list[list[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token ids padded with `value` on the right (or the left) and their (B, T) mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        ids[row, span] = torch.tensor(sequence, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask
