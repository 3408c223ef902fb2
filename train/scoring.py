"""What the report (train/report.py) computes with model weights: greedy answers of two
checkpoints, log-probs of answers, reward-model scores of answers and of preference pairs, and a
reward model's agreement with the human votes of the ratings store.

Answers are scored as text, rendered through each model's own chat template exactly as training
data is (train/tokens.py), so a judge reads an answer as it read its training pairs. Models are
frozen and evaluated without gradients, in the precision --precision resolves to.
"""
from __future__ import annotations

import torch

from core.hardware import resolve_precision, torch_dtype
from core.models import ModelError, load_causal_lm, load_tokenizer, resolve_model
from core.sampling import Sampling, pad

from train import losses, models, tokens
from train.rollout import generate


def dtype(cfg):
    return torch_dtype(resolve_precision(cfg.precision).name)


def render(tokenizer, prompt: list[dict], answer: str, max_prompt_len: int) -> tuple[list[int], list[int]]:
    """(prompt ids cut to max_prompt_len from the left, answer ids ending with end-of-turn)."""
    prompt_ids, answer_ids = tokens.render(tokenizer, prompt, answer, max_prompt_len)
    return prompt_ids[-max_prompt_len:], answer_ids


class Policies:
    """A run's starting checkpoint ("before") and its result ("after"), loaded once."""

    def __init__(self, before: str, after: str, cfg):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(resolve_model(after))
        if load_tokenizer(resolve_model(before)).get_vocab() != self.tokenizer.get_vocab():
            raise ModelError(f"{before} and {after} use different tokenizers: a report compares a "
                             "run's checkpoint with the model it started from.")
        self.models = {name: load_causal_lm(resolve_model(path), dtype(cfg)).eval()
                       for name, path in (("before", before), ("after", after))}

    @torch.no_grad()
    def answer(self, which: str, prompts: list[list[dict]]) -> list[str]:
        """Greedy answers of one checkpoint to each prompt, as text."""
        tok, cfg = self.tokenizer, self.cfg
        sampling = Sampling(cfg.max_new_tokens, 1.0, 1.0, tok.eos_token_id, tok.pad_token_id, greedy=True)
        encoded = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                           return_dict=False)[-cfg.max_prompt_len:] for p in prompts]
        texts = []
        for start in range(0, len(encoded), cfg.batch_size):
            rollout = generate(self.models[which], encoded[start:start + cfg.batch_size], sampling)
            texts += [tok.decode(ids[keep > 0], skip_special_tokens=True).strip()
                      for ids, keep in zip(rollout.response_ids.cpu(), rollout.response_mask.cpu())]
        return texts

    def answer_tokens(self, prompts, answers) -> list[list[int]]:
        return [render(self.tokenizer, p, a, self.cfg.max_prompt_len)[1] for p, a in zip(prompts, answers)]

    def logps(self, which: str, prompts, answers) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) summed log-probs of each answer under one checkpoint, and (N,) answer lengths."""
        return answer_logps(self.models[which], self.tokenizer, prompts, answers, self.cfg)

    def reference_logps(self, path: str, prompts, answers: dict) -> dict:
        """{side: (logps, lengths)} under another frozen model (a DPO run's --reference)."""
        lm = load_causal_lm(resolve_model(path), dtype(self.cfg)).eval()
        return {side: answer_logps(lm, self.tokenizer, prompts, texts, self.cfg)
                for side, texts in answers.items()}


@torch.no_grad()
def answer_logps(lm, tokenizer, prompts, answers, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    model = models.CausalLMWithLoss(lm)
    logps, counts = [], []
    for start in range(0, len(prompts), cfg.batch_size):
        rows, labels = [], []
        for prompt, answer in zip(prompts[start:start + cfg.batch_size], answers[start:start + cfg.batch_size]):
            prompt_ids, answer_ids = render(tokenizer, prompt, answer, cfg.max_prompt_len)
            rows.append(prompt_ids + answer_ids)
            labels.append([-100] * len(prompt_ids) + answer_ids)
        input_ids, attention_mask = pad(rows, tokenizer.pad_token_id)
        sums, count = model(input_ids, attention_mask, pad(labels, -100)[0], per_sequence=True)
        logps.append(sums.float())
        counts.append(count)
    return torch.cat(logps), torch.cat(counts)


@torch.no_grad()
def reward_scores(path: str, prompts, answer_sets: dict[str, list[str]], cfg) -> dict[str, list[float]]:
    """{side: reward of each (prompt, answer)} from the reward model in `path`."""
    folder = resolve_model(path)
    reward_model = models.load_value_model(folder, dtype(cfg)).eval()
    tokenizer = load_tokenizer(folder)
    scores = {}
    for side, answers in answer_sets.items():
        scores[side] = []
        for start in range(0, len(prompts), cfg.batch_size):
            rows = [sum(render(tokenizer, p, a, cfg.max_prompt_len), [])
                    for p, a in zip(prompts[start:start + cfg.batch_size], answers[start:start + cfg.batch_size])]
            input_ids, attention_mask = pad(rows, tokenizer.pad_token_id)
            values = reward_model(input_ids=input_ids, attention_mask=attention_mask)
            scores[side] += losses.sequence_rewards(values, attention_mask).tolist()
    return scores


def pair_margins(path: str, pairs: list[dict], cfg, max_seq_len: int) -> list[float]:
    """r(chosen) - r(rejected) of each preference pair that fits `max_seq_len`."""
    from train.reward import score_pairs

    folder = resolve_model(path)
    reward_model = models.load_value_model(folder, dtype(cfg)).eval()
    tokenizer = load_tokenizer(folder)
    examples = tokens.encode_all(tokens.encode_pair, tokenizer, pairs, max_seq_len, log=lambda _: None)
    return [c - r for c, r in score_pairs(reward_model, examples, tokenizer.pad_token_id, cfg.batch_size)]


def spearman(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    rank = lambda v: torch.tensor(v, dtype=torch.float64).argsort().argsort().double()  # noqa: E731
    rx, ry = rank(xs), rank(ys)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return round(float((rx * ry).sum() / ((rx.norm() * ry.norm()) or 1.0)), 4)


def vote_agreement(path: str, cfg) -> dict | None:
    """How often the reward model prefers the answer people voted for (A/B votes of the ratings
    store), and how its mean reward per checkpoint ranks the voted checkpoints against the human
    Bradley-Terry leaderboard (Spearman); None when the store holds no decisive vote."""
    from core import leaderboard, ratings
    from train.report import wilson_interval

    votes = [r for r in ratings.rows() if r["kind"] == "comparison" and r["verdict"] in ("A", "B")]
    if not votes:
        return None
    prompts = [v["conversation"] for v in votes]
    scores = reward_scores(path, prompts, {"a": [v["answer_a"] for v in votes],
                                           "b": [v["answer_b"] for v in votes]}, cfg)
    agree = sum((a > b) == (v["verdict"] == "A") for a, b, v in zip(scores["a"], scores["b"], votes))
    low, high = wilson_interval(agree, len(votes))
    per_model: dict[str, list[float]] = {}
    for vote, a, b in zip(votes, scores["a"], scores["b"]):
        per_model.setdefault(vote["model_a"], []).append(a)
        per_model.setdefault(vote["model_b"], []).append(b)
    board = leaderboard.leaderboard(leaderboard.votes_from_ratings(votes), bootstrap=0)
    names = [row["model"] for row in board]
    return {"votes": len(votes), "agreement": round(agree / len(votes), 4), "low": low, "high": high,
            "models": [{"model": row["model"], "human_strength": round(row["strength"], 4),
                        "rm_mean_reward": round(sum(per_model[row["model"]]) / len(per_model[row["model"]]), 4)}
                       for row in board],
            "rank_correlation": spearman([row["strength"] for row in board],
                                         [sum(per_model[n]) / len(per_model[n]) for n in names])}
