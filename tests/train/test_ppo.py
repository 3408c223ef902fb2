"""PPO, GRPO and RLOO: the pieces against hand-computed values, the generation path against
Hugging Face, experience and update in this process on a tiny model, and the whole step through
the command line."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, read_jsonl, run_train
from core import models
from train.config import PPOConfig
from core.decoder import SlotDecoder
from core.sampling import Sampling
from train.rollout import decode_batch, generate
from train.ppo import EMA, KLController
from core.options import ConfigError


def test_ema_after_two_updates():
    module = torch.nn.Linear(1, 1, bias=False)
    module.weight.data.fill_(1.0)
    ema = EMA(module, beta=0.9)
    module.weight.data.fill_(2.0)
    ema.update(module)                      # 0.9 * 1 + 0.1 * 2 = 1.1
    module.weight.data.fill_(3.0)
    ema.update(module)                      # 0.9 * 1.1 + 0.1 * 3 = 1.29
    assert ema.shadow["weight"].item() == pytest.approx(1.29)


def test_adaptive_kl_controller_moves_towards_the_target():
    fixed = KLController(PPOConfig(kl_coef=0.1))
    fixed.update(kl=100.0, n_steps=16)
    assert fixed.value == 0.1
    adaptive = KLController(PPOConfig(kl_coef=0.1, adaptive_kl=True, kl_target=6.0, kl_horizon=100))
    adaptive.update(kl=12.0, n_steps=10)    # error clipped to 0.2: 0.1 * (1 + 0.2 * 10 / 100)
    assert adaptive.value == pytest.approx(0.102)
    adaptive.update(kl=3.0, n_steps=10)     # error -0.2 (clipped from -0.5)
    assert adaptive.value == pytest.approx(0.102 * 0.98)


def test_each_response_stops_at_its_end_of_turn_token(tiny_model):
    tokenizer = models.load_tokenizer(str(tiny_model))
    lm = models.load_causal_lm(str(tiny_model)).eval()
    eos = tokenizer.eos_token_id
    def favour_end_of_turn(module, inputs, logits):  # about 1 in 10 per step: varied stops
        logits[..., eos] += 8.6
        return logits

    lm.lm_head.register_forward_hook(favour_end_of_turn)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    sampling = Sampling(40, 1.0, 1.0, eos, tokenizer.pad_token_id)
    decoder = SlotDecoder(lm, 16, len(prompt) + 40, fused=False)  # the model's forward, so the hook works
    _, _, tokens, mask, _ = decode_batch(decoder, [prompt] * 16, sampling, torch.Generator().manual_seed(0))
    lengths = mask.sum(1)
    assert lengths.min() < tokens.shape[1]            # some stopped early
    for row, length in enumerate(lengths.tolist()):
        if length < tokens.shape[1]:
            assert tokens[row, length - 1] == eos     # the last kept token is the end of turn
            assert (tokens[row, length:] == tokenizer.pad_token_id).all()
        assert eos not in tokens[row, :length - 1].tolist()


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("rm") / "rm"
    done = run_train("rm", "--model", str(tiny_model), "--output", str(out), "--max-steps", "2",
                     "--batch-size", "4", "--save-every", "0", "--no-tensorboard", "--eval-fraction", "0")
    assert done.returncode == 0, done.stderr
    return out / "final"


def test_ppo_step_through_the_command_line(tmp_path, tiny_model, tiny_reward_model):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ppo"
    done = run_train("ppo", "--actor", str(tiny_model), "--reward", str(tiny_reward_model), "--output", str(out),
                     "--max-steps", "2", "--rollout-batch-size", "8", "--batch-size", "4",
                     "--max-new-tokens", "12", "--ema", "--ema-beta", "0.5", "--ptx-data", "prompts/sft.jsonl",
                     "--learning-rate", "1e-3", "--max-eval-samples", "4", "--no-tensorboard", "--save-every", "0")
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    expected = {"reward", "reward_std", "kl", "kl_coef", "response_length", "policy_loss", "value_loss",
                "clipfrac", "approx_kl", "entropy", "ptx_loss", "time_generate_s", "time_score_s",
                "time_train_s", "time_switch_s", "gen_tokens_per_s"}
    assert expected <= set(steps[0])
    assert [r["step"] for r in rows if "eval_reward" in r] == [0, 2]
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 4 and all({"prompt", "response", "reward"} <= set(s) for s in samples)
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    ema = AutoModelForCausalLM.from_pretrained(out / "ema")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    weight = lambda m: m.model.layers[0].mlp.up_proj.weight.float()  # noqa: E731
    assert not torch.equal(weight(final), weight(base))
    assert not torch.equal(weight(ema), weight(final))   # the average lags the last weights


def test_ppo_without_a_reward_model_is_one_clear_sentence(tmp_path, tiny_model):
    done = run_train("ppo", "--actor", str(tiny_model), "--output", str(tmp_path / "p"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--reward is required" in done.stderr


def test_a_reward_that_is_a_chat_run_is_refused_before_the_run_folder_is_written(tmp_path, tiny_model):
    """Probe 7, F9: `--reward runs/dpo-done/final` (a DPO policy) trained to the end, rc 0; the
    sentence is the one the app's form gives (train/plan.py check_model)."""
    import shutil

    dpo = tmp_path / "dpo-done"
    shutil.copytree(tiny_model, dpo / "final")
    (dpo / "run.json").write_text(json.dumps({"stage": "dpo"}))
    (dpo / "status.json").write_text(json.dumps({"state": "done"}))
    out = tmp_path / "grpo"
    done = run_train("ppo", "--algorithm", "grpo", "--actor", str(tiny_model), "--reward",
                     str(dpo / "final"), "--output", str(out), "--max-steps", "1", "--max-new-tokens", "4",
                     "--no-tensorboard")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {dpo / 'final'} is the dpo run dpo-done, not a reward model: pick a reward-model "
        "run's final/.")
    assert not out.exists()


def test_a_stop_inside_a_rollout_saves_a_checkpoint_and_resume_finishes(tmp_path, tiny_model, tiny_reward_model):
    """SIGTERM (the app's Stop) while rollouts are being generated: the step is dropped, a
    checkpoint of the last whole step is saved, the run ends `stopped` (exit 0, no traceback),
    and --resume finishes it."""
    out = tmp_path / "ppo"
    args = ["ppo", "--actor", str(tiny_model), "--reward", str(tiny_reward_model), "--output", str(out),
            "--max-steps", "3", "--rollout-batch-size", "4", "--batch-size", "4", "--max-new-tokens", "8",
            "--max-eval-samples", "2", "--no-tensorboard", "--save-every", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "train", *args, "--max-new-tokens", "4000",
                             "--max-steps", "400"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300  # stopped in the starting evaluation's long greedy rollouts
    while time.time() < deadline and "evaluating" not in _text(out / "train.log") and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    tic = time.time()
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    assert time.time() - tic < 30
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "stopped" and (out / "checkpoints" / "latest").is_file()
    assert "Traceback" not in (out / "train.log").read_text()

    resumed = run_train(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "status.json").read_text())["state"] == "done"
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "reward" in r] == [1, 2, 3]


def _text(path):
    return path.read_text() if path.is_file() else ""


@pytest.mark.slow
def test_two_rank_zero3_ppo_run_finishes(tmp_path, tiny_model, tiny_reward_model):
    out = tmp_path / "ppo-z3"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29541",
           "--module", "train", "ppo", "--actor", str(tiny_model), "--reward", str(tiny_reward_model),
           "--output", str(out), "--zero-stage", "3", "--max-steps", "2", "--rollout-batch-size", "4",
           "--batch-size", "2", "--max-new-tokens", "8", "--max-eval-samples", "2", "--no-tensorboard",
           "--save-every", "0", "--ema"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((out / "status.json").read_text())["state"] == "done"
    assert "2 process(es)" in (out / "train.log").read_text()
    assert (out / "final" / "model.safetensors").is_file() and (out / "ema" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.skip(reason="not reliable at CI size: 4 PPO steps of 8 rollouts moved the held-out reward "
                         "(mean of steps 2 and 4 minus the start) by +0.43, +0.30, +0.04 and -0.23 "
                         "(end only) on 3 data splits, and lr 5e-5 by -0.36 and +0.06 at step 2 "
                         "(2026-11-26, AVX512 without bf16); settings to be chosen from more runs")
def test_real_ppo_raises_held_out_reward_with_bounded_kl(tmp_path, real_reward_model):
    """The built-in model is already instruction-tuned (it is its own SFT model here); PPO against
    a reward model trained on HH pairs must raise the reward of its greedy answers to held-out
    prompts (from the PPO part of the same 0,5,5 split) while staying near the reference."""
    from tests.conftest import HH, shared_file

    # CI-sized: short prompts (last 96 tokens) and answers (32) keep a step near half a minute on
    # 2 cores in fp32. Two evaluations after the start, averaged, damp the noise of 4 small steps:
    # a run of these settings (AVX512 without bf16, fp32) went 3.76 -> 4.23 at step 2 and 4.14 at
    # step 4; one before the critic started on the scores' scale, 3.76 -> 4.08 and 4.04
    out = tmp_path / "ppo-real"
    done = run_train("ppo", "--actor", "default", "--reward", str(real_reward_model / "final"),
                     "--data", str(shared_file(HH)), "--data-split", "0,5,5", "--output", str(out),
                     "--max-steps", "4", "--rollout-batch-size", "8", "--batch-size", "8",
                     "--max-new-tokens", "32", "--max-prompt-len", "96", "--learning-rate", "2e-5",
                     "--critic-learning-rate", "2e-5", "--kl-coef", "0.05", "--max-eval-samples", "32",
                     "--eval-every", "2", "--save-every", "0", "--no-tensorboard", timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_jsonl(out / "metrics.jsonl")
    evals = [r["eval_reward"] for r in rows if "eval_reward" in r]
    kls = [r["kl"] for r in rows if "kl" in r]
    assert len(evals) == 3, evals
    assert sum(evals[1:]) / 2 > evals[0] + 0.05, evals
    assert max(kls) < 8.0, kls


def test_hugging_face_baseline_path_gives_the_same_greedy_rollouts(tiny_model):
    from train.rollout import hf_generate

    tokenizer = models.load_tokenizer(str(tiny_model))
    lm = models.load_causal_lm(str(tiny_model)).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for text in ("Hi", "Name two rivers.")]
    sampling = Sampling(10, 1.0, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=True)
    ours = generate(lm, prompts, sampling)
    baseline = hf_generate(lm, prompts, sampling)
    for mine, theirs in zip(ours[:4], baseline[:4]):  # ids and masks (hf_generate records no log-probs)
        assert torch.equal(mine, theirs)


# ---- experience and update in this process (tiny model) ------------------------------------------

@pytest.fixture(scope="module")
def build_ppo(tmp_path_factory, tiny_model, tiny_reward_model):
    """build(**options) -> (cfg, PPOModels, sampling) on the tiny actor and reward model."""
    from train import ds
    from train.ppo import load_models, start_engines

    ds.init_distributed()  # a group of one, as `python -m train ppo` makes
    tokenizer = models.load_tokenizer(str(tiny_model))

    def build(optimizer_steps: int = 8, **options):
        cfg = PPOConfig(actor=str(tiny_model), reward=str(tiny_reward_model), tensorboard=False,
                        max_new_tokens=6, **options)
        m = start_engines(cfg, load_models(cfg, tokenizer, print), optimizer_steps, None, print)
        sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, tokenizer.eos_token_id,
                            tokenizer.pad_token_id)
        return cfg, m, sampling

    return build


def chat_prompts(tiny_model, count: int) -> list[list[int]]:
    tokenizer = models.load_tokenizer(str(tiny_model))
    texts = ["Hi", "Name two rivers.", "What is 2 + 2?", "Write a haiku about tea.", "Why is the sky blue?",
             "Say something kind.", "Count to five.", "What is a verb?"]
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for t in texts[:count]]


def experience(m, cfg, sampling, prompts, seed: int = 0):
    from train.experience import make_experience

    torch.manual_seed(seed)
    timer = dict.fromkeys(("generate", "switch", "score", "train", "generated_tokens"), 0.0)
    return make_experience(m, prompts, sampling, cfg, cfg.kl_coef, timer)


def test_log_probs_are_taken_at_the_sampling_temperature(build_ppo, tiny_model):
    from train.models import CausalLMWithLoss

    cfg, m, sampling = build_ppo(temperature=0.5, rollout_batch_size=4, batch_size=2)
    exp = experience(m, cfg, sampling, chat_prompts(tiny_model, 4))
    initial = CausalLMWithLoss(models.load_causal_lm(str(tiny_model))).eval()  # the actor has not moved
    with torch.no_grad():
        logits = initial(exp.sequences, exp.attention_mask, response_start=exp.prompt_width)
    tokens = exp.sequences[:, exp.prompt_width:].unsqueeze(-1)
    sampled_at = torch.log_softmax(logits / 0.5, -1).gather(-1, tokens).squeeze(-1) * exp.action_mask
    plain = torch.log_softmax(logits, -1).gather(-1, tokens).squeeze(-1) * exp.action_mask
    torch.testing.assert_close(exp.logprobs * exp.action_mask, sampled_at, atol=1e-4, rtol=0)
    torch.testing.assert_close(exp.ref_logprobs * exp.action_mask, sampled_at, atol=1e-4, rtol=0)
    assert (exp.logprobs * exp.action_mask - plain).abs().max() > 0.1


def test_a_critic_from_the_reward_model_starts_on_the_scale_of_the_normalised_scores(build_ppo, tiny_model):
    from train.experience import score

    cfg, m, sampling = build_ppo(rollout_batch_size=4, batch_size=2)
    assert m.reward_stats and cfg.normalize_reward
    exp = experience(m, cfg, sampling, chat_prompts(tiny_model, 4))
    mean, std = m.reward_stats["mean"], m.reward_stats["std"]
    from_critic = score(m.critic, exp.sequences, exp.attention_mask)  # same weights, last token
    torch.testing.assert_close(from_critic, (exp.raw_scores - mean) / std, atol=1e-4, rtol=1e-4)
    assert abs(mean) > 0.01 or abs(std - 1) > 0.01  # so raw values would fail the check above


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_micro_batched_scoring_equals_one_batch(build_ppo, tiny_model, algorithm):
    cfg, m, sampling = build_ppo(algorithm=algorithm, group_size=2, rollout_batch_size=4, batch_size=2)
    prompts = chat_prompts(tiny_model, 4)
    micro = experience(m, cfg, sampling, prompts)
    cfg.score_batch_size = 8                                # all 4 x 2 rollouts in one forward
    whole = experience(m, cfg, sampling, prompts)
    assert torch.equal(micro.sequences, whole.sequences)   # same rollouts, same row order
    for name in ("logprobs", "ref_logprobs", "values", "raw_scores", "scores", "rewards", "advantages",
                 "returns"):
        if getattr(whole, name) is not None:
            torch.testing.assert_close(getattr(micro, name), getattr(whole, name), atol=1e-4, rtol=1e-4)
    assert (micro.values is None) == (algorithm != "ppo")


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_first_minibatch_of_the_first_epoch_has_ratio_one(build_ppo, tiny_model, algorithm):
    """Where the actor scores the rollouts (--rollout-logprobs forward; tests/train/test_experience.py
    covers the log-probs recorded while sampling), it takes them in the update's first
    minibatches, at the same temperature: approx_kl and clipfrac are exactly 0 before the policy
    first moves, and not after."""
    from collections import defaultdict

    from train.ppo import ppo_update

    cfg, m, sampling = build_ppo(algorithm=algorithm, group_size=2, rollout_batch_size=4, batch_size=2,
                                 ppo_epochs=2, temperature=0.7, learning_rate=3e-3, warmup_ratio=0.0,
                                 rollout_logprobs="forward")
    exp = experience(m, cfg, sampling, chat_prompts(tiny_model, 4))
    metrics = defaultdict(list)
    ppo_update(m, exp, cfg, cfg.kl_coef, None, None, metrics)
    assert len(metrics["approx_kl"]) == 8                  # 2 epochs x 4 minibatches
    assert metrics["approx_kl"][0] == 0.0 and metrics["clipfrac"][0] == 0.0
    assert min(metrics["approx_kl"][1:]) > 0.0             # the policy moved after the first step
    assert ("kl_loss" in metrics) == (algorithm == "grpo") and ("value_loss" in metrics) == (algorithm == "ppo")


def test_gradient_accumulation_steps_the_optimizer_and_ema_once_per_accumulation(build_ppo, tiny_model):
    from collections import defaultdict

    from train.ppo import ppo_update

    cfg, m, sampling = build_ppo(rollout_batch_size=4, batch_size=1, gradient_accumulation_steps=2,
                                 ema=True)
    assert cfg.optimizer_steps_per_step == 2               # 4 micro-batches, 2 per optimizer step
    ema = EMA(m.actor.module, 0.5)
    ppo_update(m, experience(m, cfg, sampling, chat_prompts(tiny_model, 4)), cfg, cfg.kl_coef, None, ema,
               defaultdict(list))
    assert m.actor.global_steps == 2 and m.critic.global_steps == 2 and ema.updates == 2


def test_group_advantages_by_hand():
    from train.experience import group_advantages

    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    logprobs = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, -1.0, -1.0], [-2.0, 0.0, 0.0], [-1.0, -1.0, 0.0]])
    ref_logprobs = logprobs - torch.tensor([[0.5, 0.0, 0.0], [0.0] * 3, [0.0] * 3, [0.0] * 3])
    scores = torch.tensor([1.0, 3.0, 0.0, 2.0])            # two prompts, two responses each
    # rloo, KL in the reward (coef 2): rewards 1 - 2 * 0.5 = 0 and 3; 0 and 2
    rewards, advantages = group_advantages(logprobs, ref_logprobs, scores, mask, 2.0, "rloo", 2)
    torch.testing.assert_close(advantages, torch.tensor([[-3.0, -3.0, 0.0], [3.0, 3.0, 3.0],
                                                         [-2.0, 0.0, 0.0], [2.0, 2.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 3.0],
                                                      [0.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
    # grpo, KL as a loss (coef 0 here): (score - mean) / (std + 1e-4), std of two = |a - b| / sqrt 2
    _, advantages = group_advantages(logprobs, ref_logprobs, scores, mask, 0.0, "grpo", 2)
    unit = 1.0 / (2 ** 0.5 + 1e-4)
    torch.testing.assert_close(advantages[:, 0], torch.tensor([-unit, unit, -unit, unit]))


def test_critic_free_options_are_checked():
    assert PPOConfig(algorithm="grpo").samples_per_prompt == 4 and PPOConfig().samples_per_prompt == 1
    assert PPOConfig(algorithm="rloo").kl_in_loss and not PPOConfig().kl_in_loss
    assert not PPOConfig(algorithm="grpo", kl_penalty="reward").kl_in_loss
    with pytest.raises(ConfigError, match="--group-size"):
        PPOConfig(algorithm="grpo", group_size=1)
    with pytest.raises(ConfigError, match="--gradient-accumulation-steps 3 must divide the 2 micro-batches"):
        PPOConfig(rollout_batch_size=16, batch_size=8, gradient_accumulation_steps=3)


def test_grpo_and_rloo_through_the_command_line(tmp_path, tiny_model, tiny_reward_model):
    """No critic is built or saved; metrics carry the group spread; gradient accumulation sizes
    the schedule in optimizer steps (linear decay to 0 over 2 steps x 2 optimizer steps)."""
    from transformers import AutoModelForCausalLM

    common = ("--actor", str(tiny_model), "--reward", str(tiny_reward_model), "--max-steps", "2",
              "--max-new-tokens", "8", "--learning-rate", "1e-3", "--max-eval-samples", "2",
              "--no-tensorboard", "--save-every", "1")
    grpo, rloo = tmp_path / "grpo", tmp_path / "rloo"
    done = run_train("ppo", *common, "--output", str(grpo), "--algorithm", "grpo", "--group-size", "2",
                     "--rollout-batch-size", "4", "--batch-size", "2", "--gradient-accumulation-steps", "2",
                     "--lr-scheduler", "linear", "--warmup-ratio", "0")
    assert done.returncode == 0, done.stderr
    steps = [r for r in read_jsonl(grpo / "metrics.jsonl") if "reward" in r]
    assert [r["lr"] for r in steps] == pytest.approx([5e-4, 0.0])
    assert {"reward_group_std", "kl_loss", "kl", "policy_loss", "time_score_s"} <= set(steps[0])
    assert "value_loss" not in steps[0]
    assert (grpo / "checkpoints" / "actor").is_dir() and not (grpo / "checkpoints" / "critic").exists()
    assert "grpo: no critic" in (grpo / "train.log").read_text()

    done = run_train("ppo", *common, "--output", str(rloo), "--algorithm", "rloo", "--group-size", "3",
                     "--rollout-batch-size", "2", "--batch-size", "3", "--kl-penalty", "reward",
                     "--loss-aggregation", "sequence")
    assert done.returncode == 0, done.stderr
    steps = [r for r in read_jsonl(rloo / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2] and "kl_loss" not in steps[0]
    assert all(r["reward_group_std"] > 0 for r in steps)
    weight = lambda path: AutoModelForCausalLM.from_pretrained(path).model.layers[0].mlp.up_proj.weight  # noqa: E731
    assert not torch.equal(weight(rloo / "final"), weight(tiny_model))
