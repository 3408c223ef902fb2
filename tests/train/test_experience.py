"""Step 3's experience (train/experience.py) in this process on a tiny GRPO setup (the actor
itself as the reward model's backbone, no critic): the old log-probs come from sampling, with no
actor scoring forward, where the rollouts' numerics are training's (fused, fp32), and from an
actor forward elsewhere; train.log says which, once."""
import dataclasses
from collections import defaultdict

import pytest
import torch

from core import hardware, models
from core.sampling import Sampling
from train import rollout
from train.config import PPOConfig


@pytest.fixture(scope="module")
def build(tmp_path_factory, tiny_model):
    """build(**options) -> (cfg, PPOModels, sampling, run folder) for grpo on the tiny model."""
    from train import ds
    from train.ppo import load_models, start_engines
    from train.rundir import RunDir

    ds.init_distributed()  # a group of one, as `python -m train ppo` makes
    tokenizer = models.load_tokenizer(str(tiny_model))

    def build(**options):
        cfg = PPOConfig(actor=str(tiny_model), reward=str(tiny_model), algorithm="grpo", group_size=2,
                        rollout_batch_size=4, batch_size=4, max_new_tokens=8, temperature=0.7,
                        tensorboard=False, **options)
        run = RunDir(tmp_path_factory.mktemp("experience"))
        m = start_engines(cfg, load_models(cfg, tokenizer, run.log), 8, None, run.log)
        sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, tokenizer.eos_token_id,
                            tokenizer.pad_token_id)
        return cfg, m, sampling, run

    return build


def prompts(tiny_model) -> list[list[int]]:
    tokenizer = models.load_tokenizer(str(tiny_model))
    return [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
            for text in ("Hi", "Name two rivers.", "What is 2 + 2?", "Count to five.")]


def experience_counting_actor_forwards(m, cfg, sampling, batch):
    """(make_experience's Experience, how many forwards the actor ran meanwhile)."""
    from train.experience import make_experience

    forwards = []
    hook = m.actor.module.register_forward_hook(lambda *args: forwards.append(1))
    try:
        timer = dict.fromkeys(("generate", "switch", "score", "train", "generated_tokens"), 0.0)
        exp = make_experience(m, batch, sampling, cfg, cfg.kl_coef, timer)
    finally:
        hook.remove()
    return exp, len(forwards)


def source_lines(run) -> list[str]:
    return [line.split(" ", 2)[2] for line in (run.path / "train.log").read_text().splitlines()
            if "old log-probs" in line]


def test_fused_fp32_rollouts_skip_the_actor_scoring_forward(build, tiny_model):
    """Two steps' experience without one actor forward; their log-probs are the forward's, the
    first update's policy ratio is 1 to within the measured gap, and train.log says so once."""
    from train.experience import response_logprobs
    from train.ppo import ppo_update

    cfg, m, sampling, run = build()
    assert m.rollout.kind == "fused"
    for _ in range(2):
        exp, forwards = experience_counting_actor_forwards(m, cfg, sampling, prompts(tiny_model))
        assert forwards == 0
    assert source_lines(run) == ["old log-probs: from sampling (fused decoder, fp32 = training precision)"]

    m.actor.eval()
    with torch.no_grad():
        forward, _ = response_logprobs(m.actor, exp.sequences, exp.attention_mask, exp.prompt_width,
                                       cfg.temperature)
    torch.testing.assert_close(exp.logprobs, forward * exp.action_mask, atol=1e-4, rtol=0)
    m.actor.train()
    metrics = defaultdict(list)
    ppo_update(m, exp, cfg, cfg.kl_coef, None, None, metrics)
    assert metrics["clipfrac"][0] == 0.0 and metrics["approx_kl"][0] < 1e-9


@pytest.mark.parametrize("case", ["hf engine", "bf16 rollouts", "asked for the forward"])
def test_rollouts_whose_numerics_differ_are_scored_by_an_actor_forward(build, tiny_model, monkeypatch, case):
    if case == "bf16 rollouts":  # as on a CPU with native bf16, training in fp32 (--precision fp32)
        native = dataclasses.replace(hardware.hardware(), native_bf16=True)
        monkeypatch.setattr(rollout, "hardware", lambda: native)
    options = {"hf engine": {"rollout_engine": "hf"}, "bf16 rollouts": {"precision": "fp32"},
               "asked for the forward": {"rollout_logprobs": "forward"}}[case]
    cfg, m, sampling, run = build(**options)
    exp, forwards = experience_counting_actor_forwards(m, cfg, sampling, prompts(tiny_model))
    assert forwards == 2  # 4 prompts x 2 samples, 4 rollouts per scoring forward
    assert exp.logprobs.shape == exp.action_mask.shape
    why = {"hf engine": "the hf engine: Hugging Face generate records none",
           "bf16 rollouts": "rollouts in bf16, training in fp32",
           "asked for the forward": "--rollout-logprobs forward"}[case]
    assert source_lines(run) == [f"old log-probs: from an actor forward ({why})"]
