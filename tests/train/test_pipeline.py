"""`python -m train all`: the steps in a row through their run folders, a judge on a disjoint
half, the report at the end, and finished steps reused."""
import json

from tests.conftest import run_train
from train import data
from train.pipeline import halves_of_rm_part

REPORT_YAML = "max_samples: 4\nmax_new_tokens: 6\nbootstrap: 200\n"


def test_the_judge_and_the_reward_model_split_the_rm_part_in_two_disjoint_halves():
    rm_split, judge_split = halves_of_rm_part("2,4,4")
    assert (rm_split, judge_split) == ("2,2,6", "4,2,4")
    records = [{"prompt": [{"role": "user", "content": str(i)}], "chosen": "a", "rejected": "b"}
               for i in range(101)]
    part = lambda split, phase: {r["prompt"][0]["content"] for r in data.split_part(  # noqa: E731
        records, [float(w) for w in split.split(",")], phase, 1, "src")}
    rm, judge, whole = part(rm_split, "rm"), part(judge_split, "rm"), part("2,4,4", "rm")
    assert rm and judge and not rm & judge and rm | judge == whole
    assert part(rm_split, "sft") == part("2,4,4", "sft") and part(judge_split, "ppo") == part("2,4,4", "ppo")


def test_all_runs_sft_rm_judge_ppo_and_the_report_then_reuses_them(tmp_path, tiny_model):
    ppo_yaml = tmp_path / "ppo.yaml"
    ppo_yaml.write_text("max_new_tokens: 8\nrollout_batch_size: 8\nbatch_size: 4\nema: true\n"
                        "tensorboard: false\nmax_eval_samples: 4\n")
    report_yaml = tmp_path / "report.yaml"
    report_yaml.write_text(REPORT_YAML)
    out = tmp_path / "demo"
    args = ["all", "--actor-model", str(tiny_model), "--reward-model", str(tiny_model), "--output", str(out),
            "--sft-max-steps", "2", "--rm-max-steps", "2", "--ppo-max-steps", "1", "--ppo-config", str(ppo_yaml),
            "--report-config", str(report_yaml)]
    first = run_train(*args)
    assert first.returncode == 0, first.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [row["step"] for row in summary] == ["sft", "rm", "judge", "ppo", "report"]
    assert all(row["wall_s"] > 0 for row in summary)
    assert "eval_accuracy" in summary[1] and "reward" in summary[3] and summary[3]["ema"].endswith("ema")
    assert "win_rate" in summary[4] and summary[4]["checkpoint"].endswith("report.md")
    assert "sft" in first.stdout and "checkpoint" in first.stdout  # the closing table
    ppo_config = (out / "ppo" / "config.yaml").read_text()
    assert f"actor: {out / 'sft' / 'final'}" in ppo_config and "data_split: 2,4,4" in ppo_config
    assert "data_split: 2,2,6" in (out / "rm" / "config.yaml").read_text()
    assert "data_split: 4,2,4" in (out / "judge" / "config.yaml").read_text()
    report = json.loads((out / "ppo" / "report.json").read_text())
    assert report["judge"] == str(out / "judge" / "final") and report["prompts"] == 4

    again = run_train(*args)
    assert again.returncode == 0, again.stderr
    assert [row["wall_s"] for row in json.loads((out / "summary.json").read_text())] == [None] * 5
    assert "reused" in again.stdout


def test_all_with_dpo_trains_dpo_on_the_third_part_and_reports_it(tmp_path, tiny_model):
    report_yaml = tmp_path / "report.yaml"
    report_yaml.write_text(REPORT_YAML)
    dpo_yaml = tmp_path / "dpo.yaml"
    dpo_yaml.write_text("batch_size: 4\ntensorboard: false\neval_fraction: 0.2\nlearning_rate: 1.0e-4\n")
    out = tmp_path / "demo-dpo"
    done = run_train("all", "--rl", "dpo", "--actor-model", str(tiny_model), "--reward-model", str(tiny_model),
                     "--output", str(out), "--sft-max-steps", "1", "--rm-max-steps", "1", "--dpo-max-steps", "2",
                     "--dpo-config", str(dpo_yaml), "--report-config", str(report_yaml), "--no-judge")
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [row["step"] for row in summary] == ["sft", "rm", "dpo", "report"]
    assert "eval_accuracy" in summary[2] and "win_rate" not in summary[3]   # no judge, no win rate
    dpo_config = (out / "dpo" / "config.yaml").read_text()
    assert f"model: {out / 'sft' / 'final'}" in dpo_config and "data_split: 2,4,4" in dpo_config
    report = json.loads((out / "dpo" / "report.json").read_text())
    assert report["stage"] == "dpo" and "DPO implicit reward" in report["figures"]["proxy"]["kind"]
    assert {"eval_accuracy", "chosen_logp"} <= set(report["figures"])


def test_all_never_resumes_or_writes_into_folders_that_are_not_its_runs(tmp_path, tiny_model, sft_file):
    """Issue 14 (third probe, F1 through `train all`): a step folder holding checkpoints/latest
    was resumed into whether or not it was a run of ours; nor may the pipeline's own folder be
    someone's."""
    out = tmp_path / "demo"
    (out / "sft" / "checkpoints").mkdir(parents=True)
    (out / "run.json").write_text('{"stage": "all"}')
    (out / "sft" / "checkpoints" / "latest").write_text("my-ckpt")
    (out / "sft" / "config.yaml").write_text("my: experiment")
    args = ["all", "--actor-model", str(tiny_model), "--reward-model", str(tiny_model), "--data",
            str(sft_file), "--sft-max-steps", "1", "--rm-max-steps", "1", "--ppo-max-steps", "1"]
    done = run_train(*args, "--output", str(out))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{out / 'sft'} is not a run folder" in done.stderr.splitlines()[-1]
    assert sorted(p.name for p in (out / "sft").rglob("*")) == ["checkpoints", "config.yaml", "latest"]
    assert (out / "sft" / "config.yaml").read_text() == "my: experiment"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.yaml").write_text("my: experiment")
    done = run_train(*args, "--output", str(theirs))
    assert done.returncode == 2 and "is not a run folder" in done.stderr.splitlines()[-1]
    assert [p.name for p in theirs.iterdir()] == ["config.yaml"]


def test_all_never_writes_through_a_pipeline_copied_as_links(tmp_path, tiny_model, sft_file):
    """Probe 7, F4: `train all` on a copy made with cp -as rewrote the original pipeline's
    config.yaml and appended to its train.log."""
    original = tmp_path / "pipe"
    original.mkdir()
    files = {"run.json": '{"stage": "all"}', "config.yaml": "output: pipe\n", "train.log": "line\n",
             "status.json": '{"state": "failed"}'}
    for name, text in files.items():
        (original / name).write_text(text)
    copy = tmp_path / "pipe-copy"
    copy.mkdir()
    for name in files:
        (copy / name).symlink_to(original / name)
    done = run_train("all", "--actor-model", str(tiny_model), "--data", str(sft_file), "--output", str(copy),
                     "--sft-max-steps", "1")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "is a link to" in done.stderr.splitlines()[-1]
    assert {name: (original / name).read_text() for name in files} == files


def test_a_step_config_that_is_not_text_is_one_sentence(tmp_path, tiny_model, sft_file):
    """Probe 7, F8: `--sft-config` naming a binary file ended in a bare UnicodeDecodeError."""
    binary = tmp_path / "b.bin"
    binary.write_bytes(bytes(range(224, 256)) * 8)
    done = run_train("all", "--actor-model", str(tiny_model), "--data", str(sft_file), "--output",
                     str(tmp_path / "demo"), "--sft-config", str(binary), "--sft-max-steps", "1")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: config file {binary} is not UTF-8 text (byte 0xe0 at offset 0): pass the path of "
        "a YAML file.")
