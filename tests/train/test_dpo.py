"""DPO: its losses against values computed by hand, the batch and the cached reference on a tiny
model, and the step through the command line (tiny model; the real-model run is in
tests/train/test_report.py, beside the report that judges it)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from core import ratings
from core.models import load_causal_lm, load_tokenizer
from core.runs import RunInfo
from tests.conftest import ROOT, read_jsonl, run_train
from train import dpo, losses, models, tokens
from train.config import DPOConfig


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ---- losses, by hand ---------------------------------------------------------------------------

def test_dpo_loss_is_log_sigmoid_of_the_scaled_log_ratio_gap():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    loss = losses.dpo_loss(chosen, rejected, beta=0.5)
    expected = [-logsig(1.0), math.log(2), -logsig(-1.0)]   # beta * h = 1, 0, -1
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)


def test_label_smoothing_weighs_the_flipped_pair_conservative_and_robust():
    chosen, rejected = torch.tensor([2.0]), torch.tensor([0.0])
    kept, flipped = -logsig(1.0), -logsig(-1.0)              # 0.31326, 1.31326
    conservative = losses.dpo_loss(chosen, rejected, beta=0.5, label_smoothing=0.1)
    assert conservative.item() == pytest.approx(0.9 * kept + 0.1 * flipped, abs=1e-6)
    robust = losses.robust_dpo_loss(chosen, rejected, beta=0.5, label_smoothing=0.1)
    assert robust.item() == pytest.approx((0.9 * kept - 0.1 * flipped) / 0.8, abs=1e-6)
    assert losses.robust_dpo_loss(chosen, rejected, 0.5, 0.0).item() == pytest.approx(kept, abs=1e-6)


def test_ipo_regresses_the_gap_to_one_over_two_beta():
    rejected = torch.zeros(3)
    loss = losses.ipo_loss(torch.tensor([2.0, 1.0, 0.0]), rejected, beta=0.5)  # target gap 1
    assert loss.tolist() == pytest.approx([1.0, 0.0, 1.0])


def test_simpo_is_reference_free_with_a_target_margin():
    loss = losses.simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.5]), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(-logsig(2.0 * 0.5 - 0.5), abs=1e-6)


def test_the_losses_fall_as_the_chosen_answer_gains():
    chosen = torch.tensor([0.0], requires_grad=True)
    for loss in (losses.dpo_loss(chosen, torch.zeros(1), 0.1),
                 losses.robust_dpo_loss(chosen, torch.zeros(1), 0.1, 0.2),
                 losses.ipo_loss(chosen, torch.zeros(1), 0.1),
                 losses.simpo_loss(chosen, torch.zeros(1), 2.0, 0.5, 0.1)):
        grad, = torch.autograd.grad(loss.sum(), chosen)
        assert grad.item() < 0


def test_sequence_logprobs_sum_the_labelled_tokens_of_each_row():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 5, 8)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, 1, -100, -100]])
    sums, counts = losses.sequence_logprobs(hidden, labels, head)
    logp = torch.log_softmax(head(hidden), dim=-1)
    expected = [sum(logp[0, t - 1, labels[0, t]] for t in (2, 3, 4)),
                sum(logp[1, t - 1, labels[1, t]] for t in (1, 2))]
    torch.testing.assert_close(sums, torch.stack(expected).detach())
    assert counts.tolist() == [3, 2]


def test_implicit_rewards_and_averaged_losses_use_each_answers_length():
    logps, ref, counts = torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -6.0]), torch.tensor([2, 3])
    summed = DPOConfig(beta=0.5)
    assert dpo.implicit_rewards(summed, logps, ref, counts).tolist() == [1.0, -1.5]
    ipo = DPOConfig(beta=0.5, loss="ipo")
    assert dpo.implicit_rewards(ipo, logps, ref, counts).tolist() == [0.5, -0.5]  # 0.5*(-2+3), 0.5*(-3+2)
    assert dpo.pair_losses(ipo, logps, ref, counts).tolist() == pytest.approx([(2.0 - 1.0) ** 2])
    simpo = DPOConfig(beta=2.0, loss="simpo", simpo_gamma=0.5)
    assert dpo.implicit_rewards(simpo, logps, ref, counts).tolist() == [-4.0, -6.0]
    assert dpo.pair_losses(simpo, logps, None, counts).item() == pytest.approx(-logsig(2.0 * 1.0 - 0.5))


def test_ipo_with_label_smoothing_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match="--label-smoothing does not apply to --loss ipo"):
        DPOConfig(loss="ipo", label_smoothing=0.1)


# ---- batch and reference on the tiny model ---------------------------------------------------------

PAIR = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello there, friend.", "rejected": "Go."}


def test_pair_batch_labels_only_the_answers_with_their_end_of_turn(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    example, _ = tokens.encode_pair(tokenizer, PAIR, 128)
    batch = dpo.collate_pairs([example], tokenizer.pad_token_id)
    start = example["prompt_len"]
    chosen_labels, rejected_labels = batch["labels"]
    assert (chosen_labels[:start] == -100).all() and (rejected_labels[:start] == -100).all()
    assert chosen_labels[start:len(example["chosen_ids"])].tolist() == example["chosen_ids"][start:]
    assert chosen_labels[len(example["chosen_ids"]) - 1] == tokenizer.eos_token_id
    assert (rejected_labels[len(example["rejected_ids"]):] == -100).all()   # padding scores nothing
    assert batch["pairs"] == [example]


class CountingModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, **batch):
        self.calls += 1
        return self.inner(**batch)


def test_reference_log_probs_are_computed_once_per_pair_and_match_a_direct_pass(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    examples = [tokens.encode_pair(tokenizer, PAIR, 128)[0],
                tokens.encode_pair(tokenizer, {**PAIR, "chosen": "Hi!", "rejected": "No."}, 128)[0]]
    model = CountingModel(models.CausalLMWithLoss(load_causal_lm(str(tiny_model))).eval())
    reference = dpo.Reference(model)
    first = reference.logps(dpo.collate_pairs(examples, tokenizer.pad_token_id))
    again = reference.logps(dpo.collate_pairs(examples[::-1], tokenizer.pad_token_id))  # another batch
    assert model.calls == 1
    torch.testing.assert_close(again, first[[1, 0, 3, 2]])
    alone = dpo.collate_pairs(examples[:1], tokenizer.pad_token_id)
    with torch.no_grad():
        direct, _ = model.inner(alone["input_ids"], alone["attention_mask"], alone["labels"], per_sequence=True)
    torch.testing.assert_close(first[[0, 2]], direct, atol=1e-4, rtol=0)


def test_before_the_first_step_the_policys_own_log_probs_serve_as_the_reference(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    batch = dpo.collate_pairs([tokens.encode_pair(tokenizer, PAIR, 128)[0]], tokenizer.pad_token_id)
    model = CountingModel(models.CausalLMWithLoss(load_causal_lm(str(tiny_model))).eval())
    untrained = torch.tensor([-3.0, -5.0])
    assert dpo.Reference(model).logps(batch, untrained).tolist() == [-3.0, -5.0]
    assert model.calls == 0 and batch["pairs"][0]["ref_logps"] == (-3.0, -5.0)
    other = dpo.collate_pairs([tokens.encode_pair(tokenizer, PAIR, 128)[0]], tokenizer.pad_token_id)
    dpo.Reference(model, is_start=False).logps(other, untrained)   # --reference elsewhere: computed
    assert model.calls == 1 and other["pairs"][0]["ref_logps"] != (-3.0, -5.0)


def test_with_lora_the_reference_is_the_model_with_its_adapters_disabled(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    cfg = DPOConfig(lora_dim=4, lora_alpha=8.0)
    policy = models.CausalLMWithLoss(models.make_trainable(load_causal_lm(str(tiny_model)), cfg)).eval()
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # the adapters move the policy away from the base
    base = models.CausalLMWithLoss(load_causal_lm(str(tiny_model))).eval()
    batch = dpo.collate_pairs([tokens.encode_pair(tokenizer, PAIR, 128)[0]], tokenizer.pad_token_id)
    ref = dpo.Reference(policy, policy.lm.disable_adapter).logps(batch)
    with torch.no_grad():
        expected, _ = base(batch["input_ids"], batch["attention_mask"], batch["labels"], per_sequence=True)
        moved, _ = policy(batch["input_ids"], batch["attention_mask"], batch["labels"], per_sequence=True)
    torch.testing.assert_close(ref, expected, atol=1e-4, rtol=0)
    assert (moved - expected).abs().max() > 1e-2


# ---- the step through the command line ------------------------------------------------------------

DPO_FAST = ("--batch-size", "4", "--fp32", "--save-every", "0", "--no-tensorboard")


def test_dpo_learns_a_separable_set_and_saves_a_chat_model(tmp_path, tiny_model, separable_pairs):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "runs" / "dpo"
    done = run_train("dpo", "--model", str(tiny_model), "--data", str(separable_pairs), "--output", str(out),
                     "--max-steps", "12", "--learning-rate", "2e-3", "--eval-fraction", "0.2",
                     "--eval-every", "6", *DPO_FAST)
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(out / "metrics.jsonl")
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert evals[0]["eval_accuracy"] == 0.0 and evals[0]["eval_margin"] == 0.0  # policy = reference
    assert evals[-1]["eval_accuracy"] == 1.0 and evals[-1]["eval_margin"] > 0.5
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    train_rows = [r for r in rows if "loss" in r]
    assert {"accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp",
            "lr", "tokens_per_s"} <= set(train_rows[0])
    log = (out / "train.log").read_text()
    assert "reference: a frozen copy of" in log and "held-out chosen log-prob per token" in log
    # final/ is a chat model the server and the Chat tab take
    assert RunInfo.load(out).stage == "dpo"
    from chat.conversation import chat_checkpoints
    assert "runs/dpo/final" in chat_checkpoints(tmp_path / "runs", tmp_path)
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(final.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_dpo_with_lora_and_simpo_run_and_save_merged_weights(tmp_path, tiny_model, separable_pairs):
    from safetensors.torch import load_file

    for loss, extra in (("sigmoid", ["--lora-dim", "4", "--label-smoothing", "0.1"]), ("simpo", ["--beta", "2"])):
        out = tmp_path / loss
        done = run_train("dpo", "--model", str(tiny_model), "--data", str(separable_pairs),
                         "--output", str(out), "--loss", loss, "--max-steps", "2", "--learning-rate", "1e-3",
                         "--eval-fraction", "0.1", *extra, *DPO_FAST)
        assert done.returncode == 0, done.stderr
        log = (out / "train.log").read_text()
        weights = load_file(out / "final" / "model.safetensors")
        assert not any("lora" in name for name in weights)
        assert ("LoRA adapters disabled" in log) if loss == "sigmoid" else ("reference: none" in log)


def test_dpo_trains_on_decisive_votes_of_the_ratings_store(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))
    for i in range(6):
        prompt = [{"role": "user", "content": f"Say something kind about number {i}."}]
        ratings.add_comparison(prompt, f"{i} is a lovely number.", "No.", "m1", "m2", "A", round=1)
        ratings.add_comparison(prompt, "Go away.", f"Number {i} is great!", "m1", "m2", "B", round=1)
        ratings.add_comparison(prompt, "Fine.", "Fine!", "m1", "m2", "tie", round=1)
        ratings.add_comparison(prompt, "Ugh.", "Meh.", "m1", "m2", "both_bad", round=1)
    out = tmp_path / "dpo"
    done = run_train("dpo", "--model", str(tiny_model), "--data", "ratings:", "--output", str(out),
                     "--max-steps", "2", "--eval-fraction", "0", *DPO_FAST)
    assert done.returncode == 0, done.stderr
    assert "data ratings:: 12 records" in (out / "train.log").read_text()  # ties and both-bad left out


def test_dpo_with_a_reference_of_another_tokenizer_is_one_sentence(tmp_path, tiny_model, separable_pairs):
    other = tmp_path / "other"
    tokenizer = load_tokenizer(str(tiny_model))
    load_causal_lm(str(tiny_model)).save_pretrained(other)
    tokenizer.add_tokens(["<brand-new-token>"])
    tokenizer.save_pretrained(other)
    done = run_train("dpo", "--model", str(tiny_model), "--reference", str(other), "--data", str(separable_pairs),
                     "--output", str(tmp_path / "dpo"), "--max-steps", "1", *DPO_FAST)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "uses another tokenizer" in done.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_two_rank_zero3_dpo_run_finishes(tmp_path, tiny_model, separable_pairs):
    """Under ZeRO-3 the reference's forward is collective: ranks must join it together."""
    out = tmp_path / "dpo-z3"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29543",
           "--module", "train", "dpo", "--model", str(tiny_model), "--data", str(separable_pairs),
           "--output", str(out), "--zero-stage", "3", "--max-steps", "3", "--eval-fraction", "0.1",
           "--num-epochs", "2", *DPO_FAST]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((out / "status.json").read_text())["state"] == "done"
    assert "2 process(es)" in (out / "train.log").read_text()
    assert (out / "final" / "model.safetensors").is_file()
