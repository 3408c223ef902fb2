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
