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


# ---- PPO ------------------------------------------------------------------------------------------
# All tensors below are (B, T) over response positions; `mask` is 1 on real response tokens
# (up to and including each response's end-of-turn token) and 0 on padding after it.

def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to zero mean and unit variance over the masked entries."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def kl_rewards(logprobs, ref_logprobs, scores, mask, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * (logp - ref_logp) at every response token, plus the
    reward model's score (B,) at each response's last token."""
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    last = last_index(mask)
    return rewards.scatter_add(1, last.unsqueeze(1), scores.unsqueeze(1).to(rewards.dtype))


def gae(rewards, values, mask, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; returns (advantages, returns), both (B, T).
    Values after a response's end are zero, so its last token bootstraps from nothing."""
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0])
    width = rewards.shape[1]
    for t in reversed(range(width)):
        next_values = values[:, t + 1] if t + 1 < width else torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages[:, t] = lastgaelam
    advantages = advantages * mask
    return advantages, advantages + values


def policy_loss(logprobs, old_logprobs, advantages, mask, clip: float, aggregation: str = "token"):
    """PPO's clipped surrogate; returns (loss, clip fraction, approximate KL old -> new).
    `aggregation` averages the per-token losses as `aggregate` says."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = aggregate(torch.max(pg_loss1, pg_loss2), mask, aggregation)
    clipfrac = masked_mean((pg_loss2 > pg_loss1).float(), mask)
    approx_kl = masked_mean(0.5 * log_ratio ** 2, mask)
    return loss, clipfrac.detach(), approx_kl.detach()


def value_loss(values, old_values, returns, mask, clip: float):
    """Clipped value loss 0.5 * max((v - R)^2, (v_clipped - R)^2); returns (loss, clip fraction)."""
    values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    v_loss_unclipped = (values - returns) ** 2
    v_loss_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(v_loss_unclipped, v_loss_clipped), mask)
    clipfrac = masked_mean((v_loss_clipped > v_loss_unclipped).float(), mask)
    return loss, clipfrac.detach()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) log-probability of each taken token; logits (B, T, V) predict those tokens."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, T) entropy of each position's token distribution (for logging)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ---- critic-free RL (GRPO, RLOO) and loss aggregation -----------------------------------------
# Rewards of a group arrive as (G, K): G prompts, K sampled responses of each prompt.

def grpo_advantages(scores: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(G, K) GRPO advantages (Shao et al. 2024): each score minus its group's mean, over the
    group's standard deviation (unbiased, as TRL's); a group that scored alike gets 0."""
    mean = scores.mean(dim=1, keepdim=True)
    std = scores.std(dim=1, keepdim=True)
    return (scores - mean) / (std + eps)


def rloo_advantages(scores: torch.Tensor) -> torch.Tensor:
    """(G, K) RLOO advantages (Ahmadian et al. 2024): each score minus the mean score of the
    other K - 1 responses to the same prompt (its leave-one-out baseline)."""
    k = scores.shape[1]
    baseline = (scores.sum(dim=1, keepdim=True) - scores) / (k - 1)
    return scores - baseline


def sequence_kl(logprobs, ref_logprobs, mask) -> torch.Tensor:
    """(B,) the log-ratio to the reference summed over each response: a sample of its KL."""
    return ((logprobs - ref_logprobs) * mask).sum(dim=1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) per-token KL(policy || reference) estimate k3 = exp(ref - logp) - (ref - logp) - 1
    (Schulman 2020; GRPO's KL loss): unbiased under the policy's samples, never negative; 0 on
    padding (whose log-probs may be far apart)."""
    log_ratio = (ref_logprobs - logprobs) * mask
    return torch.exp(log_ratio) - log_ratio - 1.0


def aggregate(values: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """One number from (B, T) per-token losses. token: the mean over every response token of the
    batch, so each token weighs the same (DAPO; long answers weigh more); sequence: the mean
    within each response, then over responses, so each response weighs the same (the GRPO paper)."""
    if level == "token":
        return masked_mean(values, mask)
    per_response = (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return per_response.mean()


# ---- DPO ------------------------------------------------------------------------------------------
# Preference optimisation straight from pairs, without a reward model (Rafailov et al. 2023).
# Inputs are (B,) log-probabilities of each pair's chosen and rejected answer: summed over the
# answer's tokens for `sigmoid`/`robust`, averaged over them for `ipo`/`simpo` (as their papers
# do); `logratios` are policy minus frozen reference. Each loss returns (B,) per-pair losses.

def sequence_logprobs(hidden: torch.Tensor, labels: torch.Tensor, lm_head) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) summed log-probabilities of each row's labelled tokens, and (B,) their counts.

    hidden: (B, T) x H last hidden states; labels: (B, T) token ids, -100 where nothing is scored.
    As in `sft_loss`, the vocabulary projection runs only at positions that predict a label.
    """
    targets = labels[:, 1:]                                  # (B, T-1) token predicted at each position
    mask = targets != -100
    logits = lm_head(hidden[:, :-1][mask]).float()           # (N, V), rows in row-major order
    token_logps = -F.cross_entropy(logits, targets[mask], reduction="none")  # (N,)
    rows = mask.nonzero()[:, 0]                              # (N,) the row of each scored token
    sums = torch.zeros(len(labels), dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, rows, token_logps), mask.sum(1)


def dpo_loss(chosen_logratios, rejected_logratios, beta: float, label_smoothing: float = 0.0):
    """DPO's -log sigmoid(beta * h), h = chosen minus rejected log-ratio; with label smoothing e,
    conservative DPO: each label is wrong with probability e, so the flipped pair's loss weighs e."""
    h = chosen_logratios - rejected_logratios
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def robust_dpo_loss(chosen_logratios, rejected_logratios, beta: float, label_smoothing: float):
    """Robust DPO (Chowdhury et al. 2024): an unbiased loss under labels flipped with probability
    e = label_smoothing, ((1 - e) l(h) - e l(-h)) / (1 - 2e), l(h) = -log sigmoid(beta * h)."""
    h = chosen_logratios - rejected_logratios
    loss_kept, loss_flipped = -F.logsigmoid(beta * h), -F.logsigmoid(-beta * h)
    return ((1 - label_smoothing) * loss_kept - label_smoothing * loss_flipped) / (1 - 2 * label_smoothing)


def ipo_loss(chosen_logratios, rejected_logratios, beta: float):
    """IPO (Azar et al. 2023): (h - 1/(2 beta))^2 regresses the log-ratio gap to a fixed target
    instead of pushing it without bound; h on length-averaged log-probs."""
    h = chosen_logratios - rejected_logratios
    return (h - 1 / (2 * beta)) ** 2


def simpo_loss(chosen_avg_logps, rejected_avg_logps, beta: float, gamma: float,
               label_smoothing: float = 0.0):
    """SimPO (Meng et al. 2024), reference-free: -log sigmoid(beta * (avg_c - avg_r) - gamma) on
    length-averaged policy log-probs, gamma a target reward margin; label smoothing as in DPO."""
    logits = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def implicit_rewards(policy_logps, ref_logps, beta: float):
    """(B,) DPO's implicit reward beta * (log pi(y|x) - log pi_ref(y|x)); reference-free losses
    pass ref_logps=None and get beta * log pi(y|x)."""
    return beta * (policy_logps if ref_logps is None else policy_logps - ref_logps)
