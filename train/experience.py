"""Step 3's experience: rollouts scored by the actor, the reference, the critic and the reward
model, turned into advantages for the policy update (train/ppo.py runs the loop around it).

One rollout batch is `rollout_batch_size` prompts, each sampled `group_size` times on the rollout
engine; a group's responses sit side by side. Advantages come from GAE over the critic's values
(ppo) or from the group alone (grpo: score minus the group's mean, over its std; rloo: score
minus the mean of the rest of the group), with the KL to the reference in the reward or left to
the loss (`--kl-penalty`).

Log-probs are taken from logits divided by the sampling temperature, so that the policy ratio
compares the distributions the rollouts were sampled from (as TRL and veRL do). The actor's ("old")
log-probs are those the rollout recorded while sampling where they equal the training forward's
(train/rollout.py: fused rollouts of an fp32 actor; the gap is under 3e-05, bench/grpo.py),
which saves one actor forward over every rollout; elsewhere (bf16 rollouts, the hf and deepspeed
engines, --rollout-logprobs forward) an actor forward scores them. Scoring runs `score_batch_size`
rollouts at a time (the full batch's (B, R, V) fp32 logits would take gigabytes) and, by default,
in exactly the minibatches the first update pass takes: same rows, same shapes, so where the actor
is scored the first minibatch's ratio is exactly 1. The batch is stored in that order.

Left out: sequences are not re-padded per micro-batch (every forward keeps the batch's width).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from train import losses


@dataclass
class Experience:
    sequences: torch.Tensor       # (B, P+R) left-padded prompt then right-padded response ids
    attention_mask: torch.Tensor  # (B, P+R) 1 on real prompt and response tokens
    action_mask: torch.Tensor     # (B, R) 1 on response tokens up to and including end-of-turn
    logprobs: torch.Tensor        # (B, R) actor log-probs of the response tokens at rollout time
                                  #   (recorded while sampling, or from an actor forward)
    ref_logprobs: torch.Tensor    # (B, R) reference log-probs of the same tokens
    values: torch.Tensor | None   # (B, R) critic values of the state before each token; None without a critic
    scores: torch.Tensor          # (B,) reward-model scores, normalised and clipped
    raw_scores: torch.Tensor      # (B,) reward-model scores as the model gives them
    rewards: torch.Tensor         # (B, R) ppo: -kl_coef * (logp - ref_logp) + the score at the end;
                                  #   grpo/rloo: each response's (KL-penalised) score on its last token
    advantages: torch.Tensor      # (B, R) GAE (ppo) or group-relative (grpo, rloo) advantages
    returns: torch.Tensor | None  # (B, R) advantages + values: the critic's targets; None without a critic
    groups: torch.Tensor          # (B,) index of the prompt each rollout answers (its group)

    @property
    def prompt_width(self) -> int:
        return self.sequences.shape[1] - self.action_mask.shape[1]

    def rows(self, index: torch.Tensor) -> "Experience":
        return Experience(**{k: None if v is None else v[index] for k, v in vars(self).items()})


# ---- forwards -----------------------------------------------------------------------------------

def response_logprobs(model, sequences, attention_mask, prompt_width, temperature: float):
    """(B, R) log-probs of the response tokens under the temperature they were sampled at, and
    the (B, R, V) temperature-scaled logits behind them."""
    logits = model(input_ids=sequences, attention_mask=attention_mask, response_start=prompt_width)
    logits = logits.float() / temperature
    return losses.token_logprobs(logits, sequences[:, prompt_width:]), logits


def response_values(critic, sequences, attention_mask, prompt_width):
    """(B, R) critic values of the state before each response token."""
    return critic(input_ids=sequences, attention_mask=attention_mask)[:, prompt_width - 1:-1]


@torch.no_grad()
def score(reward_model, sequences, attention_mask) -> torch.Tensor:
    """(B,) reward-model scores of whole conversations, as the model gives them."""
    return losses.sequence_rewards(reward_model(input_ids=sequences, attention_mask=attention_mask),
                                   attention_mask)


def normalised_scores(raw: torch.Tensor, reward_stats: dict | None, cfg) -> torch.Tensor:
    """(B,) scores normalised with the reward model's saved mean and std (if asked), clipped."""
    normalise = reward_stats and cfg.normalize_reward
    scores = (raw - reward_stats["mean"]) / reward_stats["std"] if normalise else raw
    return scores.clamp(-cfg.reward_clip, cfg.reward_clip)


def in_chunks(forward, order: torch.Tensor, size: int) -> torch.Tensor:
    """`forward(rows)` on consecutive chunks of `size` rows of `order`; the outputs, each (n, ...),
    put back in row order."""
    outputs = torch.cat([forward(order[start:start + size]) for start in range(0, len(order), size)])
    return outputs[order.argsort()]


# ---- experience ---------------------------------------------------------------------------------

@torch.no_grad()
def make_experience(m, prompts, sampling, cfg, kl_coef: float, timer: dict) -> Experience:
    """Roll out `prompts` (group_size samples each), score the rollouts (the actor only where the
    rollout recorded no log-probs), compute advantages. `m` is train/ppo.py's PPOModels; `timer`
    gathers the generate/switch/score seconds."""
    # rollout: a prompt's group_size samples side by side
    tic = time.time()
    group = cfg.samples_per_prompt
    repeated = [prompt for prompt in prompts for _ in range(group)]
    rollout = m.rollout.rollout(repeated, sampling)
    prompt_ids, prompt_mask, response_ids, action_mask = rollout[:4]
    timer["generate"] += time.time() - tic - m.rollout.switch_s
    timer["switch"] += m.rollout.switch_s
    timer["generated_tokens"] += action_mask.sum().item()

    # score, in the minibatches the first update pass takes (see the module docstring)
    tic = time.time()
    sequences = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, action_mask], dim=1)
    width = prompt_ids.shape[1]
    order = torch.randperm(len(sequences))
    chunk = cfg.score_batch_size or cfg.batch_size

    def chunked(forward):  # forward(sequences, attention_mask) of some rows -> (n, ...)
        return in_chunks(lambda rows: forward(sequences[rows], attention_mask[rows]), order, chunk)

    m.rollout.log_logprobs_source()  # where the old log-probs come from, and why (once)
    logprobs = rollout.logprobs  # recorded while sampling, where they equal the training forward's
    if logprobs is None:
        m.actor.eval()
        logprobs = chunked(lambda s, a: response_logprobs(m.actor, s, a, width, cfg.temperature)[0])
        m.actor.train()
    ref_logprobs = chunked(lambda s, a: response_logprobs(m.reference, s, a, width, cfg.temperature)[0])
    values = chunked(lambda s, a: response_values(m.critic, s, a, width)) if m.critic is not None else None
    raw_scores = chunked(lambda s, a: score(m.reward_model, s, a))
    scores = normalised_scores(raw_scores, m.reward_stats, cfg)
    mask = action_mask.float()
    timer["score"] += time.time() - tic

    # advantages
    penalty = 0.0 if cfg.kl_in_loss else kl_coef
    if cfg.algorithm == "ppo":
        rewards = losses.kl_rewards(logprobs, ref_logprobs, scores, mask, penalty)
        advantages, returns = losses.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = losses.masked_whiten(advantages, mask)
        values = values * mask
    else:
        rewards, advantages = group_advantages(logprobs, ref_logprobs, scores, mask, penalty,
                                               cfg.algorithm, group)
        returns = None
    groups = torch.arange(len(prompts)).repeat_interleave(group)
    exp = Experience(sequences, attention_mask, mask, logprobs, ref_logprobs, values,
                     scores, raw_scores, rewards, advantages, returns, groups)
    return exp.rows(order)  # the first update pass takes the rows in this order


def group_advantages(logprobs, ref_logprobs, scores, mask, kl_coef: float, algorithm: str,
                     group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """grpo/rloo: ((B, R) rewards, (B, R) advantages). A response's reward is its score less
    kl_coef times its summed log-ratio to the reference (0 when the KL is a loss term), on its
    last token; its advantage, relative to the rest of its group, on every one of its tokens."""
    sequence_rewards = scores - kl_coef * losses.sequence_kl(logprobs, ref_logprobs, mask)
    relative = losses.grpo_advantages if algorithm == "grpo" else losses.rloo_advantages
    advantages = relative(sequence_rewards.view(-1, group)).view(-1)       # (B,)
    rewards = torch.zeros_like(mask).scatter(1, losses.last_index(mask).unsqueeze(1),
                                             sequence_rewards.unsqueeze(1))
    return rewards, advantages.unsqueeze(1) * mask
