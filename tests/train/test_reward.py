"""The reward model: where rewards are read, that it learns, that it saves and reloads exactly,
and eval-rm as users run it."""
import json

import pytest
import torch

from core.models import load_tokenizer
from tests.conftest import read_jsonl, run_train
from train import data, losses, models, tokens
from train.reward import score_pairs


def test_last_index_is_right_for_left_and_right_padding_and_mixed_lengths():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert losses.last_index(right).tolist() == [2, 4, 0]
    assert losses.last_index(left).tolist() == [4, 4, 4]
    values = torch.arange(15, dtype=torch.float).reshape(3, 5)
    assert losses.sequence_rewards(values, right).tolist() == [2.0, 9.0, 10.0]
    assert losses.sequence_rewards(values, left).tolist() == [4.0, 9.0, 14.0]


def test_pairwise_loss_values_and_margin():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    expected = torch.tensor([-torch.nn.functional.logsigmoid(torch.tensor(2.0)).item(), 0.6931472])
    torch.testing.assert_close(losses.pairwise_loss(chosen, rejected), expected)
    assert losses.pairwise_loss(chosen, rejected, margin=2.0)[0] == pytest.approx(0.6931472)


def test_pair_batch_reads_each_answer_at_its_end_of_turn_token(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    record = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello there, friend.",
              "rejected": "Go."}
    example, _ = tokens.encode_pair(tokenizer, record, 128)
    batch = tokens.collate_pairs([example], tokenizer.pad_token_id)
    ends = losses.last_index(batch["attention_mask"])
    assert batch["input_ids"][0, ends[0]] == tokenizer.eos_token_id
    assert batch["input_ids"][1, ends[1]] == tokenizer.eos_token_id
    assert ends[0] > ends[1]  # the longer answer ends later; padding is not read


def test_saved_reward_model_reloads_to_identical_scores(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    model = models.load_value_model(str(tiny_model)).eval()
    torch.nn.init.normal_(model.v_head.weight)
    records = data.read_source("prompts/preferences.jsonl").records[:6]
    examples = [tokens.encode_pair(tokenizer, r, 256)[0] for r in records]
    before = score_pairs(model, examples, tokenizer.pad_token_id, batch_size=4)
    models.save_hf(dict(model.state_dict()), model, tokenizer, tmp_path / "rm", None,
                   extra_files={models.REWARD_STATS_FILE: json.dumps({"mean": 1.0, "std": 2.0})})
    reloaded = models.load_value_model(str(tmp_path / "rm")).eval()
    assert score_pairs(reloaded, examples, tokenizer.pad_token_id, batch_size=4) == before
    assert models.reward_stats(str(tmp_path / "rm")) == {"mean": 1.0, "std": 2.0}


def test_reward_model_learns_a_separable_set_and_eval_rm_agrees(tmp_path, tiny_model, separable_pairs):
    out = tmp_path / "rm"
    done = run_train("rm", "--model", str(tiny_model), "--data", str(separable_pairs), "--output", str(out),
                     "--max-steps", "16", "--batch-size", "4", "--learning-rate", "2e-3", "--fp32",
                     "--eval-fraction", "0.2", "--eval-every", "8", "--save-every", "0", "--no-tensorboard")
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(out / "metrics.jsonl")
    train_loss = [r["loss"] for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    assert sum(train_loss[-4:]) / 4 < sum(train_loss[:4]) / 4 - 0.2
    assert evals[-1]["eval_accuracy"] == 1.0 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    stats = json.loads((out / "final" / "reward_stats.json").read_text())
    assert stats["count"] > 0 and stats["std"] > 0

    scored = run_train("eval-rm", "--reward", str(out / "final"), "--data", str(separable_pairs),
                       "prompts/preferences.jsonl", "--per-source", "--fp32")
    assert scored.returncode == 0, scored.stderr
    result = json.loads(scored.stdout)
    assert set(result) >= {"accuracy", "mean_chosen", "mean_rejected", "mean_margin", "count"}
    assert result["per_source"][str(separable_pairs)]["accuracy"] == 1.0
    assert result["count"] == 48 + 100
    assert result["mean_margin"] == pytest.approx(result["mean_chosen"] - result["mean_rejected"], abs=1e-3)


def test_eval_rm_without_a_reward_model_is_one_clear_sentence(tmp_path):
    done = run_train("eval-rm", "--reward", str(tmp_path / "missing" / "rm"), "--data", "prompts/preferences.jsonl")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: model")


def test_ratings_export_record_is_a_preference_record():
    """The record the ratings store exports (chat/ratings.py) is ours plus provenance fields."""
    exported = {"id": "r-1", "source": "ratings", "prompt": [{"role": "user", "content": "Hi"}],
                "chosen": "Hello! How can I help?", "rejected": "What.", "verdict": "A",
                "chosen_model": "runs/ppo1/ema", "rejected_model": "runs/sft1/final"}
    record = data.normalise(exported, "ratings, row 0")[0]
    assert data.phase_records([record], "rm") == [record]
    assert record["chosen"] == "Hello! How can I help?" and record["id"] == "r-1"


@pytest.mark.slow
def test_real_reward_model_on_hh_beats_chance_on_held_out_pairs(real_reward_model):
    evals = [r for r in read_jsonl(real_reward_model / "metrics.jsonl") if "eval_accuracy" in r]
    # two runs of these settings (the fixture's): 0.65 at step 12 and 0.62 at step 16 on 111
    # held-out pairs (standard error about 0.046), from 0.44 at the start
    assert evals[-1]["eval_accuracy"] >= 0.57, evals
    assert evals[-1]["eval_accuracy"] > evals[0]["eval_accuracy"]
    stats = models.reward_stats(str(real_reward_model / "final"))
    assert stats["std"] > 0 and stats["count"] == 128  # --stats-samples 64 pairs, two answers each
