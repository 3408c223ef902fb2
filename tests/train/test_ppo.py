"""PPO: the pieces against hand-computed values, the generation path against Hugging Face, and
the whole step through the command line."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, read_jsonl, run_train
from core import models
from train.config import PPOConfig
from core.decoder import SlotDecoder
from core.sampling import Sampling
from train.rollout import decode_batch, generate
from train.ppo import EMA, KLController


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
    _, _, tokens, mask = decode_batch(decoder, [prompt] * 16, sampling, torch.Generator().manual_seed(0))
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
def test_real_ppo_raises_held_out_reward_with_bounded_kl(tmp_path, real_reward_model):
    """The built-in model is already instruction-tuned (it is its own SFT model here); PPO against
    a reward model trained on HH pairs must raise the reward of its greedy answers to held-out
    prompts (from the PPO part of the same 0,5,5 split) while staying near the reference."""
    from tests.conftest import HH, shared_file

    out = tmp_path / "ppo-real"
    done = run_train("ppo", "--actor", "default", "--reward", str(real_reward_model / "final"),
                     "--data", str(shared_file(HH)), "--data-split", "0,5,5", "--output", str(out),
                     "--max-steps", "16", "--rollout-batch-size", "16", "--batch-size", "8",
                     "--max-new-tokens", "48", "--learning-rate", "1e-5", "--critic-learning-rate", "1e-5",
                     "--kl-coef", "0.05", "--max-eval-samples", "48", "--save-every", "0", timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_jsonl(out / "metrics.jsonl")
    evals = [r["eval_reward"] for r in rows if "eval_reward" in r]
    kls = [r["kl"] for r in rows if "kl" in r]
    assert evals[-1] > evals[0] + 0.05, evals
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
    for mine, theirs in zip(ours, baseline):
        assert torch.equal(mine, theirs)
