import argparse

import pytest

from train import config
from train.config import ConfigError, SFTConfig


def parse(*argv):
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, SFTConfig)
    return config.from_namespace(SFTConfig, parser.parse_args(list(argv)))


def test_defaults_come_from_the_dataclass():
    cfg = parse("--output", "runs/x")
    assert cfg.zero_stage == 0 and cfg.precision == "bf16" and cfg.model == "default"
    assert cfg.data == ["prompts/sft.jsonl"]


@pytest.mark.parametrize("argv, option", [
    (["--zero-stage", "5"], "--zero-stage"),
    (["--learning-rate", "-1"], "--learning-rate"),
    (["--batch-size", "0"], "--batch-size"),
    (["--precision", "fp16"], "--precision"),
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
    argv = config.to_argv("sft", cfg)
    assert argv[0] == "sft"
    assert parse(*argv[1:]) == cfg


def test_form_values_are_coerced_and_checked():
    cfg = config.build(SFTConfig, {"batch_size": 4.0, "offload": "true", "data": "one.jsonl"})
    assert (cfg.batch_size, cfg.offload, cfg.data) == (4, True, ["one.jsonl"])
    with pytest.raises(ConfigError, match="--batch-size"):
        config.build(SFTConfig, {"batch_size": "four"})
