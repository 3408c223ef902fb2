"""Step 3: RL of the SFT model against the reward model (InstructGPT / DeepSpeed-Chat step 3),
with PPO or the critic-free GRPO and RLOO (`--algorithm`).

PPO has four models: the actor (trained, from the SFT checkpoint), a frozen reference copy of
it, the critic (trained, from the reward model) and the frozen reward model; GRPO and RLOO load
no critic. Each step: rollout and experience (train/experience.py: group_size samples per
prompt, log-probs of actor and reference, critic values, reward-model scores, advantages), then
update epochs over minibatches (clipped policy loss, plus the k3 KL loss and the SFT loss of a
pretraining mix if asked; clipped value loss for PPO's critic), with the EMA updated after each
optimizer step. Every constant is an option in `PPOConfig`.

Simplified on purpose: advantages are whitened (ppo) or normalised (grpo) per rank, not across
ranks; the reference and reward model share the actor's tokenizer (checked); the critic is not
saved (final/ and ema/ hold the actor).
"""
from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from core.hardware import torch_dtype
from core.models import ModelError, load_causal_lm, load_tokenizer, resolve_model
from core.runs import RunInfo
from core.sampling import Sampling

from train import data, ds, loop, losses, models, tokens
from train.config import PPOConfig, parse_split
from train.experience import Experience, make_experience, response_logprobs, response_values, score
from train.plan import not_a_reward_model
from train.rollout import RolloutEngine, start_actor
from train.rundir import RunDir


@dataclass
class PPOModels:
    """The models of a step; load_models' record holds the actor and critic as plain modules
    and no rollout engine, start_engines' their DeepSpeed engines and the rollout engine."""
    actor: object            # DeepSpeed training engine of the policy (CausalLMWithLoss)
    rollout: RolloutEngine | None  # the actor's generation mode
    reference: object        # frozen copy of the initial actor
    critic: object | None    # DeepSpeed training engine of the value model; None for grpo and rloo
    reward_model: object     # frozen reward model (ValueHeadModel)
    reward_stats: dict | None  # the reward model's saved mean and std, for normalising scores


class KLController:
    """Fixed KL coefficient, or the adaptive controller of Ziegler et al. (2019)."""

    def __init__(self, cfg: PPOConfig):
        self.value, self.cfg = cfg.kl_coef, cfg

    def update(self, kl: float, n_steps: int) -> None:
        if self.cfg.adaptive_kl:
            error = min(max(kl / self.cfg.kl_target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.cfg.kl_horizon


# ---- data ------------------------------------------------------------------------------------------

def load_prompts(cfg: PPOConfig, tokenizer, log) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of training and held-out prompts (chat template, generation prompt added)."""
    weights = parse_split(cfg.data_split) if cfg.data_split else None
    records = data.load_data(cfg.data, "ppo", cfg.seed, weights, log=log)
    train_records, eval_records = data.holdout(records, cfg.eval_fraction, cfg.max_eval_samples)

    def encode(record):
        ids = tokenizer.apply_chat_template(record["prompt"], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        return ids[-cfg.max_prompt_len:]

    return [encode(r) for r in train_records], [encode(r) for r in eval_records]


def ptx_batches(cfg: PPOConfig, tokenizer, log):
    """An endless iterator of SFT batches for the pretraining mix, or None without --ptx-data."""
    if not cfg.ptx_data:
        return None
    records = data.load_data(cfg.ptx_data, "sft", cfg.seed, log=log)
    examples = tokens.encode_all(tokens.encode_sft_record, tokenizer, records, cfg.max_seq_len, log)
    rng = random.Random(cfg.seed)

    def batches():
        while True:
            rng.shuffle(examples)
            for start in range(0, len(examples) - cfg.batch_size + 1, cfg.batch_size):
                yield tokens.collate(examples[start:start + cfg.batch_size], tokenizer.pad_token_id)

    return batches()


# ---- update ------------------------------------------------------------------------------------

def ppo_update(m: PPOModels, exp: Experience, cfg: PPOConfig, kl_coef: float, ptx, ema, metrics) -> None:
    """`ppo_epochs` passes over one step's experience in minibatches: the first pass in the order
    the experience was scored (where the actor scored it, its first ratio is exactly 1; from
    log-probs recorded while sampling, within their measured gap), later passes shuffled."""
    actor, critic, width, rows = m.actor, m.critic, exp.prompt_width, len(exp.sequences)
    for epoch in range(cfg.ppo_epochs):
        order = torch.arange(rows) if epoch == 0 else torch.randperm(rows)
        for start in range(0, rows, cfg.batch_size):
            mb = exp.rows(order[start:start + cfg.batch_size])
            # policy loss (+ the KL loss, + the pretraining mix)
            logprobs, logits = response_logprobs(actor, mb.sequences, mb.attention_mask, width,
                                                 cfg.temperature)
            pg_loss, clipfrac, approx_kl = losses.policy_loss(logprobs, mb.logprobs, mb.advantages,
                                                              mb.action_mask, cfg.cliprange,
                                                              cfg.loss_aggregation)
            loss = pg_loss
            if cfg.kl_in_loss:
                kl_loss = losses.aggregate(losses.k3_kl(logprobs, mb.ref_logprobs, mb.action_mask),
                                           mb.action_mask, cfg.loss_aggregation)
                loss = loss + kl_coef * kl_loss
                metrics["kl_loss"].append(kl_loss.item())
            if ptx is not None:
                ptx_sum, ptx_count = actor(**loop.to_device(next(ptx)))
                ptx_loss = ptx_sum / ptx_count.clamp(min=1)
                loss = loss + cfg.ptx_coef * ptx_loss
                metrics["ptx_loss"].append(ptx_loss.item())
            optimizer_step = actor.is_gradient_accumulation_boundary()  # asked before step() counts it
            actor.backward(loss)
            actor.step()
            if ema is not None and optimizer_step:
                ema.update(actor.module)
            # value loss (ppo)
            if critic is not None:
                values = response_values(critic, mb.sequences, mb.attention_mask, width)
                vf_loss, vf_clipfrac = losses.value_loss(values, mb.values, mb.returns, mb.action_mask,
                                                         cfg.cliprange_value)
                critic.backward(vf_loss)
                critic.step()
                metrics["value_loss"].append(vf_loss.item())
                metrics["vf_clipfrac"].append(vf_clipfrac.item())
            with torch.no_grad():
                entropy = losses.masked_mean(losses.entropy(logits), mb.action_mask).item()
            for name, value in (("policy_loss", pg_loss), ("clipfrac", clipfrac), ("approx_kl", approx_kl),
                                ("entropy", entropy)):
                metrics[name].append(float(value.detach()) if torch.is_tensor(value) else value)


class EMA:
    """Exponential moving average of the actor's weights, in fp32 on the CPU."""

    def __init__(self, module, beta: float):
        self.beta, self.updates = beta, 0
        self.shadow = {name: value.detach().float().cpu().clone()
                       for name, value in _full_params(module).items()}

    @torch.no_grad()
    def update(self, module) -> None:
        self.updates += 1
        for name, value in _full_params(module).items():
            self.shadow[name].mul_(self.beta).add_(value.detach().float().cpu(), alpha=1 - self.beta)


def _full_params(module) -> dict:
    """Every parameter in full, gathered one at a time under ZeRO-3."""
    import deepspeed

    params = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            params[name] = param.data.clone() if hasattr(param, "ds_id") else param.data
    return params


# ---- evaluation and samples ---------------------------------------------------------------------------

def evaluate(m: PPOModels, prompts, cfg, tokenizer) -> dict:
    """Mean reward of greedy answers to held-out prompts (the number PPO should raise)."""
    rewards, lengths = [], []
    sampling = Sampling(cfg.max_new_tokens, 1.0, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id,
                        greedy=True)
    for start in range(0, len(prompts), cfg.rollout_batch_size):
        prompt_ids, prompt_mask, response_ids, action_mask, _ = m.rollout.rollout(
            prompts[start:start + cfg.rollout_batch_size], sampling)
        sequences = torch.cat([prompt_ids, response_ids], 1)
        rewards += score(m.reward_model, sequences, torch.cat([prompt_mask, action_mask], 1)).tolist()
        lengths += action_mask.sum(1).tolist()
    return {"eval_reward": round(sum(rewards) / len(rewards), 4),
            "eval_response_length": round(sum(lengths) / len(lengths), 1)}


def step_metrics(step: int, exp: Experience, group_size: int, update_metrics: dict, timer: dict) -> dict:
    """One metrics line: rewards (and their spread within groups), KL, lengths, the update's mean
    losses and the time split."""
    raw, kl = exp.raw_scores, losses.sequence_kl(exp.logprobs, exp.ref_logprobs, exp.action_mask)
    by_group = raw[exp.groups.argsort(stable=True)].view(-1, group_size)  # (G, K)
    return {"step": step, "reward": round(raw.mean().item(), 4),
            "reward_std": round(raw.std().item(), 4) if len(raw) > 1 else 0.0,
            "reward_group_std": round(by_group.std(dim=1).mean().item(), 4) if by_group.shape[1] > 1 else 0.0,
            "score": round(exp.scores.mean().item(), 4), "kl": round(kl.mean().item(), 4),
            "response_length": round(exp.action_mask.sum(1).mean().item(), 1),
            # the padded widths every forward of this step computes on
            "prompt_width": exp.prompt_width, "response_width": exp.action_mask.shape[1],
            **{k: round(sum(v) / len(v), 5) for k, v in update_metrics.items() if v},
            **{f"time_{k}_s": round(timer[k], 3) for k in ("generate", "score", "train", "switch")},
            "gen_tokens_per_s": round(timer["generated_tokens"] / max(timer["generate"], 1e-9), 1)}


def write_samples(run, step, exp: Experience, tokenizer, count: int = 2) -> None:
    if not run.writer:
        return
    with open(run.path / "samples.jsonl", "a") as handle:
        for row in range(min(count, len(exp.sequences))):
            prompt = exp.sequences[row, :exp.prompt_width][exp.attention_mask[row, :exp.prompt_width] > 0]
            response = exp.sequences[row, exp.prompt_width:][exp.action_mask[row] > 0]
            handle.write(json.dumps({"step": step, "prompt": tokenizer.decode(prompt),
                                     "response": tokenizer.decode(response, skip_special_tokens=True),
                                     "reward": round(exp.raw_scores[row].item(), 4)}) + "\n")


# ---- models ------------------------------------------------------------------------------------------

def load_models(cfg: PPOConfig, tokenizer, log) -> PPOModels:
    """Every model of the step, loaded and checked before the run folder is written (a model
    that cannot load leaves an earlier run there as it was): the actor and (ppo) critic as
    trainable modules that `start_engines` wraps, no rollout engine yet."""
    actor_path = resolve_model(cfg.actor)
    reward_path = resolve_model(cfg.reward)
    wrong_kind = not_a_reward_model(cfg.reward, RunInfo.load(Path(reward_path).parent))
    if wrong_kind:
        raise ModelError(wrong_kind)
    if load_tokenizer(reward_path).get_vocab() != tokenizer.get_vocab():
        raise ModelError(f"the reward model {cfg.reward} uses another tokenizer than the "
                          f"actor {cfg.actor}: train it from the same base model.")
    frozen_dtype = torch_dtype(ds.precision(cfg).name)
    actor = models.make_trainable(load_causal_lm(actor_path), cfg)
    critic = None
    if cfg.algorithm == "ppo":
        critic_path = resolve_model(cfg.critic) if cfg.critic else reward_path
        critic = models.load_value_model(critic_path)
        stats = models.reward_stats(critic_path)
        if cfg.normalize_reward and stats and models.reward_stats(reward_path):
            critic.normalise_output(stats["mean"], stats["std"])  # the scale of the scores
        critic.backbone = models.make_trainable(critic.backbone, cfg, task="FEATURE_EXTRACTION")
    else:
        log(f"{cfg.algorithm}: no critic; advantages from groups of {cfg.samples_per_prompt} "
            f"responses per prompt; KL to the reference in the {'loss' if cfg.kl_in_loss else 'reward'}")
    reference = models.CausalLMWithLoss(load_causal_lm(actor_path, frozen_dtype))
    reward_model = models.load_value_model(reward_path, frozen_dtype)
    return PPOModels(actor, None, reference, critic, reward_model, models.reward_stats(reward_path))


def start_engines(cfg: PPOConfig, loaded: PPOModels, total_steps: int, tensorboard_dir, log) -> PPOModels:
    """`loaded` (load_models') with the actor's and (ppo) critic's DeepSpeed engines for
    `total_steps` optimizer steps, the rollout engine, and the frozen models placed."""
    unused = [loaded.actor]

    def actor_lm():  # start_actor asks again for a fresh copy if DeepSpeed's Hybrid Engine fails
        if unused:
            return unused.pop()
        return models.make_trainable(load_causal_lm(resolve_model(cfg.actor)), cfg)

    actor, rollout = start_actor(cfg, actor_lm, total_steps, tensorboard_dir, log)
    critic = None
    if loaded.critic is not None:
        critic = ds.initialize(loaded.critic, cfg, total_steps, learning_rate=cfg.critic_learning_rate)
    reference, reward_model = loaded.reference, loaded.reward_model
    if cfg.zero_stage == 3:  # partition the frozen models too
        reference, reward_model = ds.inference_engine(reference, cfg), ds.inference_engine(reward_model, cfg)
    else:
        reference, reward_model = reference.to(ds.device()).eval(), reward_model.to(ds.device()).eval()
    return PPOModels(actor, rollout, reference, critic, reward_model, loaded.reward_stats)


def save_checkpoint(run, actor, critic, step, kl_ctl, ema, keep) -> None:
    state = {"step": step, "kl_coef": kl_ctl.value}
    ds.save_checkpoint(actor, run.checkpoints / "actor", step, state, keep)
    if critic is not None:
        ds.save_checkpoint(critic, run.checkpoints / "critic", step, state, keep)
    if ema is not None and run.writer:
        save_file(ema.shadow, run.checkpoints / "ema.safetensors")
    if run.writer:
        (run.checkpoints / "latest").write_text(f"step-{step:08d}")


# ---- main --------------------------------------------------------------------------------------------

def main(cfg: PPOConfig) -> RunDir:
    if not cfg.reward:
        raise ModelError("--reward is required: pass a reward model (an RM run's final/).")
    rank, world = ds.init_distributed()
    run = RunDir.prepare(cfg, "ppo", rank)
    torch.manual_seed(cfg.seed + rank)  # ranks sample different rollouts

    # data
    tokenizer = load_tokenizer(resolve_model(cfg.actor))
    train_prompts, eval_prompts = load_prompts(cfg, tokenizer, run.log)
    per_step = cfg.rollout_batch_size * world
    steps_per_epoch = len(train_prompts) // per_step
    if steps_per_epoch == 0:
        raise data.DataError(f"{len(train_prompts)} prompts make no PPO step of {cfg.rollout_batch_size} "
                             f"prompts x {world} processes: add prompts or lower --rollout-batch-size.")
    total_steps = cfg.max_steps or steps_per_epoch * cfg.num_epochs
    run.log(f"{cfg.algorithm}: {len(train_prompts)} train / {len(eval_prompts)} eval prompts, {world} "
            f"process(es), {total_steps} steps of {cfg.optimizer_steps_per_step} optimizer steps")
    loaded = load_models(cfg, tokenizer, run.log)
    run.start()  # inputs and models checked: the folder is written now (--resume: once the checkpoint loads)

    # engines: the schedules count optimizer steps
    m = start_engines(cfg, loaded, total_steps * cfg.optimizer_steps_per_step,
                      str(run.path / "tensorboard") if cfg.tensorboard else None, run.log)
    actor, critic = m.actor, m.critic
    if m.reward_stats is None and cfg.normalize_reward:
        run.log("the reward model has no saved statistics: rewards are not normalised")
    kl_ctl = KLController(cfg)
    ema = EMA(actor.module, cfg.ema_beta) if cfg.ema else None
    ptx = ptx_batches(cfg, tokenizer, run.log)
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, tokenizer.eos_token_id,
                        tokenizer.pad_token_id)
    step = 0
    if cfg.resume:
        client = ds.load_checkpoint(actor, run.checkpoints / "actor")
        if critic is not None:
            ds.load_checkpoint(critic, run.checkpoints / "critic")
        step, kl_ctl.value = client["step"], client["kl_coef"]
        if ema is not None and (run.checkpoints / "ema.safetensors").is_file():
            ema.shadow = load_file(run.checkpoints / "ema.safetensors")
        run.resumed(step)  # only now is the run folder written
    first_step = step
    stop = loop.STOP.install()  # SIGTERM/SIGINT: save a checkpoint and end as stopped
    bar = None
    try:
        if eval_prompts and step == 0:
            run.log(f"evaluating the starting model on {len(eval_prompts)} held-out prompts")
            run.metrics({"step": 0, **evaluate(m, eval_prompts, cfg, tokenizer)})
        bar = tqdm(total=total_steps, initial=step, desc=cfg.algorithm, disable=rank != 0,
                   dynamic_ncols=True)
        while step < total_steps and not stop.requested:
            tic = time.time()
            epoch, index = divmod(step, steps_per_epoch)
            order = list(range(len(train_prompts)))
            random.Random(cfg.seed + epoch).shuffle(order)
            batch = [train_prompts[i] for i in order[index * per_step:(index + 1) * per_step][rank::world]]

            # rollout and experience (train/experience.py)
            timer = dict.fromkeys(("generate", "switch", "score", "train", "generated_tokens"), 0.0)
            exp = make_experience(m, batch, sampling, cfg, kl_ctl.value, timer)

            # update epochs over minibatches
            tic_train, update_metrics = time.time(), defaultdict(list)
            ppo_update(m, exp, cfg, kl_ctl.value, ptx, ema, update_metrics)
            timer["train"] = time.time() - tic_train

            # metrics
            step += 1
            row = step_metrics(step, exp, cfg.samples_per_prompt, update_metrics, timer)
            kl_ctl.update(row["kl"], cfg.rollouts_per_step * world)
            row.update(kl_coef=round(kl_ctl.value, 5), step_time_s=round(time.time() - tic, 3),
                       lr=actor.get_lr()[0])
            run.metrics(row)
            if actor.monitor.enabled:
                actor.monitor.write_events([(f"ppo/{k}", v, step) for k, v in row.items() if k != "step"])
            if step % cfg.sample_every == 0:
                write_samples(run, step, exp, tokenizer)
            bar.update(1)
            bar.set_postfix(reward=row["reward"], kl=row["kl"])
            if eval_prompts and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                run.metrics({"step": step, **evaluate(m, eval_prompts, cfg, tokenizer)})
            run.progress(step, total_steps, first_step)
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                save_checkpoint(run, actor, critic, step, kl_ctl, ema, cfg.keep_checkpoints)
            stop.requested = ds.all_reduce_sum(stop.requested) > 0
        # final evaluation
        final = evaluate(m, eval_prompts, cfg, tokenizer) if eval_prompts and not stop.requested else None
    except loop.Stopping:  # asked to stop inside a rollout or an evaluation: that step is dropped
        stop.requested = True
    if bar is not None:
        bar.close()

    if stop.requested:
        save_checkpoint(run, actor, critic, step, kl_ctl, ema, cfg.keep_checkpoints)
        run.log(f"stopped at step {step}; continue with --resume")
        run.status("stopped", step=step, total_steps=total_steps)
        return run

    # save: final/ (actor) and, with --ema, ema/
    if final is not None:
        run.metrics({"step": step, **final})
        run.log("held-out: " + ", ".join(f"{k} {v}" for k, v in final.items()))
    loop.save_final(actor, run, cfg, tokenizer)
    if ema is not None and run.writer:
        models.save_hf(dict(ema.shadow), actor.module, tokenizer, run.path / "ema",
                       models.lora_scaling(cfg))
        run.log(f"saved {run.path / 'ema'}")
    run.status("done", step=step, total_steps=total_steps, eta_s=0)
    return run

