"""`python -m train all`: three steps in a row through their run folders, reusing finished ones."""
import json

from tests.conftest import run_train


def test_all_runs_three_steps_then_reuses_them(tmp_path, tiny_model):
    ppo_yaml = tmp_path / "ppo.yaml"
    ppo_yaml.write_text("max_new_tokens: 8\nrollout_batch_size: 8\nbatch_size: 4\nema: true\n"
                        "tensorboard: false\nmax_eval_samples: 4\n")
    out = tmp_path / "demo"
    args = ["all", "--actor-model", str(tiny_model), "--reward-model", str(tiny_model), "--output", str(out),
            "--sft-max-steps", "2", "--rm-max-steps", "2", "--ppo-max-steps", "1", "--ppo-config", str(ppo_yaml)]
    first = run_train(*args)
    assert first.returncode == 0, first.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [row["step"] for row in summary] == ["sft", "rm", "ppo"]
    assert all(row["wall_s"] > 0 for row in summary)
    assert "eval_accuracy" in summary[1] and "reward" in summary[2] and summary[2]["ema"].endswith("ema")
    assert "sft" in first.stdout and "checkpoint" in first.stdout  # the closing table
    ppo_config = (out / "ppo" / "config.yaml").read_text()
    assert f"actor: {out / 'sft' / 'final'}" in ppo_config and "data_split: 2,4,4" in ppo_config

    again = run_train(*args)
    assert again.returncode == 0, again.stderr
    assert [row["wall_s"] for row in json.loads((out / "summary.json").read_text())] == [None, None, None]
    assert "reused" in again.stdout
