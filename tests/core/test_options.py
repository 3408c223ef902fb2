"""Option definitions (core/options.py) through a real stage config: flags, YAML, form values,
validation, and the command line that reproduces a config."""
import argparse

import pytest

from core import options
from core.options import ConfigError
from train.config import PPOConfig, SFTConfig


def parse(*argv, cls=SFTConfig):
    parser = argparse.ArgumentParser()
    options.add_arguments(parser, cls)
    return options.from_namespace(cls, parser.parse_args(list(argv)))


def test_defaults_come_from_the_dataclass():
    cfg = parse("--output", "runs/x")
    assert cfg.zero_stage == 0 and cfg.precision == "auto" and cfg.model == "default"
    assert cfg.data == ["prompts/sft.jsonl"]


@pytest.mark.parametrize("argv, option", [
    (["--zero-stage", "5"], "--zero-stage"),
    (["--learning-rate", "-1"], "--learning-rate"),
    (["--batch-size", "0"], "--batch-size"),
    (["--precision", "fp8"], "--precision"),
    (["--data-split", "2,4"], "--data-split"),
])
def test_out_of_range_values_name_the_option(argv, option):
    with pytest.raises(ConfigError, match=option):
        parse(*argv)


def test_zero_stage_message_gives_the_allowed_range():
    with pytest.raises(ConfigError, match="allowed 0 to 3"):
        parse("--zero-stage", "5")


def test_precision_flags_are_spellings_of_one_option():
    assert parse("--fp32").precision == "fp32"
    assert parse("--bf16").precision == "bf16"


def test_yaml_sets_values_and_command_line_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("zero_stage: 2\nbatch_size: 3\ndata: [a.jsonl, b.jsonl]\n")
    cfg = parse("--config", str(path), "--batch-size", "5")
    assert (cfg.zero_stage, cfg.batch_size, cfg.data) == (2, 5, ["a.jsonl", "b.jsonl"])


def test_yaml_with_unknown_option_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("zero_stag: 2\n")
    with pytest.raises(ConfigError, match="zero_stag"):
        parse("--config", str(path))


def test_argv_reproduces_the_config():
    cfg = parse("--output", "runs/a", "--zero-stage", "3", "--fp32", "--no-tensorboard",
                "--data", "x.jsonl", "y.json", "--learning-rate", "0.001")
    argv = options.to_argv(cfg)
    assert "--data=x.jsonl" in argv and "--data=y.json" in argv
    assert parse(*argv) == cfg


def test_a_value_that_looks_like_an_option_stays_a_value_or_is_refused():
    """A data entry of "--output" must never become the --output option (issue 14, item 1)."""
    cfg = options.build(SFTConfig, {"output": "runs/a", "data": ["x.jsonl"]})
    argv = options.to_argv(cfg) + ["--data=--overwrite"]  # what a hostile form entry becomes
    with pytest.raises(ConfigError, match="--data '--overwrite' looks like an option"):
        parse(*argv)
    with pytest.raises(ConfigError, match="looks like an option"):
        options.build(SFTConfig, {"data": ["x.jsonl", "--output", "elsewhere", "--overwrite"]})


def test_renamed_options_still_work_with_one_deprecation_line(capsys):
    assert parse("--generation", "hf", cls=PPOConfig).rollout_engine == "hf"
    assert parse("--no-hybrid-engine", cls=PPOConfig).rollout_engine == "fused"
    assert "--generation is deprecated" in capsys.readouterr().err
    assert options.build(PPOConfig, {"generation": "hybrid", "hybrid_engine": True}).rollout_engine == "auto"


def test_form_values_are_coerced_and_checked():
    cfg = options.build(SFTConfig, {"batch_size": 4.0, "offload": "true", "data": "one.jsonl"})
    assert (cfg.batch_size, cfg.offload, cfg.data) == (4, True, ["one.jsonl"])
    with pytest.raises(ConfigError, match="--batch-size"):
        options.build(SFTConfig, {"batch_size": "four"})
