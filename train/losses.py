"""Pure loss functions of the three steps (tensors in, tensors out; no models, no DeepSpeed)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sft_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over labelled positions, and their count.

    hidden: (B, T, H) last hidden states; labels: (B, T) token ids, -100 where nothing is learned.
    The vocabulary projection runs only at positions that predict a label (responses are a
    fraction of each sequence), which saves most of the largest matrix product and its memory.
    """
    targets = labels[:, 1:]                                 # (B, T-1) token predicted at each position
    mask = targets != -100
    logits = lm_head(hidden[:, :-1][mask]).float()          # (N, V) for the N labelled positions
    loss_sum = F.cross_entropy(logits, targets[mask], reduction="sum")
    return loss_sum, mask.sum()


def last_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last real token, whether the batch is left- or right-padded."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.flip(1).float().argmax(dim=1)


def sequence_rewards(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) the value-head output at each sequence's last real token (its end-of-turn token).

    values: (B, T) one scalar per position; attention_mask: (B, T) 1 on real tokens.
    """
    return values.gather(1, last_index(attention_mask).unsqueeze(1)).squeeze(1)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """(B,) Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin) of each pair."""
    return -F.logsigmoid(chosen - rejected - margin)
