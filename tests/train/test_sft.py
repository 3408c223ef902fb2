"""SFT through the command line, as users run it: a tiny random model for the mechanics, the
real default model (slow) for real behaviour."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from core.runs import RunInfo
from tests.conftest import ROOT, read_jsonl, run_train, shared_file

FAST = ["--batch-size", "4", "--max-seq-len", "64", "--learning-rate", "3e-3", "--eval-fraction",
        "0.1", "--save-every", "0", "--no-tensorboard"]


def losses(folder):
    return {r["step"]: r["loss"] for r in read_jsonl(folder / "metrics.jsonl") if "loss" in r}


def test_tiny_run_trains_evaluates_and_saves_a_loadable_model(tmp_path, tiny_model, sft_file):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    done = run_train("sft", "--model", str(tiny_model), "--data", str(sft_file), "--output", str(out),
                     "--max-steps", "12", "--eval-every", "6", *FAST)
    assert done.returncode == 0, done.stderr
    status = json.loads((out / "status.json").read_text())
    assert (status["state"], status["step"], status["total_steps"]) == ("done", 12, 12)
    rows = read_jsonl(out / "metrics.jsonl")
    train = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(train) == 12 and all(r["tokens_per_s"] > 0 for r in rows if "loss" in r)
    assert sum(train[-3:]) / 3 < sum(train[:3]) / 3 - 1.0
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert RunInfo.load(out).stage == "sft"
    assert "# precision auto (" in (out / "config.yaml").read_text()
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight,
                           base.model.layers[0].mlp.up_proj.weight.to(model.dtype))


def test_lora_weights_are_merged_into_the_saved_model(tmp_path, tiny_model, sft_file):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    done = run_train("sft", "--model", str(tiny_model), "--data", str(sft_file), "--output", str(out),
                     "--max-steps", "4", "--lora-dim", "4", "--fp32", *FAST)
    assert done.returncode == 0, done.stderr
    saved = AutoModelForCausalLM.from_pretrained(out / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not any("lora" in name for name in saved.state_dict())
    assert not torch.allclose(saved.model.layers[0].self_attn.q_proj.weight,
                              base.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(saved.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_stop_then_resume_continues_the_same_loss_curve(tmp_path, tiny_model, sft_file):
    common = ["--model", str(tiny_model), "--data", str(sft_file), "--max-steps", "16", "--fp32",
              "--eval-fraction", "0", "--batch-size", "4", "--max-seq-len", "64",
              "--learning-rate", "3e-3", "--no-tensorboard", "--save-every", "0"]
    reference = tmp_path / "straight"
    assert run_train("sft", *common, "--output", str(reference)).returncode == 0

    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "train", "sft", *common, "--output", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(losses(out) if (out / "metrics.jsonl").exists() else {}) < 4:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    status = json.loads((out / "status.json").read_text())
    stopped_at = status["step"]
    assert status["state"] == "stopped" and 4 <= stopped_at < 16

    resumed = run_train("sft", *common, "--output", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    curve, straight = losses(out), losses(reference)
    assert sorted(curve) == list(range(1, 17))  # no step repeated or skipped
    for step in range(stopped_at + 1, 17):  # the resumed steps match an uninterrupted run
        assert curve[step] == pytest.approx(straight[step], rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("case", ["malformed line", "missing file", "unknown model", "zero stage 5",
                                  "finished run", "resume without checkpoint", "config list",
                                  "data device", "data fifo", "nan split", "inf split",
                                  "config fifo", "config binary"])
def test_bad_input_ends_in_one_clear_sentence(case, tmp_path, tiny_model, sft_file):
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "run.json").write_text('{"stage": "sft"}')
    (finished / "config.yaml").write_text("model: x\n")
    (finished / "status.json").write_text('{"state": "done"}')
    (finished / "final").mkdir()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "response": "ok"}\n{"prompt": "hi" "response": "ok"}\n')
    listed = tmp_path / "listed.yaml"
    listed.write_text("overwrite: [false]\n")  # was read as true: the finished run was replaced
    os.mkfifo(tmp_path / "fifo.jsonl")
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "binary.yaml").write_bytes(b"model: \xe0\xff\n")
    args = {"malformed line": ["--data", str(bad)],
            "missing file": ["--data", str(tmp_path / "nope.jsonl")],
            "unknown model": ["--model", str(tmp_path / "no-model")],
            "zero stage 5": ["--zero-stage", "5"],
            "finished run": [],
            "resume without checkpoint": ["--resume"],
            "config list": ["--config", str(listed)],
            "data device": ["--data", "/dev/zero"],
            "data fifo": ["--data", str(tmp_path / "fifo.jsonl")],
            "nan split": ["--data-split", "1,nan,2"],
            "inf split": ["--data-split", "1,inf,2"],
            "config fifo": ["--config", str(tmp_path / "fifo.yaml")],
            "config binary": ["--config", str(tmp_path / "binary.yaml")]}[case]
    in_finished = ("finished run", "resume without checkpoint", "config list")
    output = str(finished) if case in in_finished else str(tmp_path / "o")
    defaults = ["--model", str(tiny_model), "--data", str(sft_file), "--output", output]
    done = run_train("sft", *defaults, *args, "--max-steps", "1")
    expected = {"malformed line": "bad.jsonl, line 2: invalid JSON",
                "missing file": "nope.jsonl does not exist",
                "unknown model": "not found",
                "zero stage 5": "--zero-stage 5 is out of range",
                # probe 5, N4: it also offered --resume, which a finished run refuses
                "finished run": "already holds a finished run: pass --overwrite to replace it "
                                "(this deletes its final/), or choose another --output.",
                "resume without checkpoint": "holds a finished run: nothing to resume",
                "config list": "--overwrite (overwrite in a config file) must be one value (bool), not [False]",
                "data device": "/dev/zero is not a regular file",
                "data fifo": "fifo.jsonl is not a regular file",
                # probe 5, N4: nan ended in ValueError (exit 1), the FIFO was "does not exist"
                "nan split": "--data-split '1,nan,2' must be three finite non-negative weights",
                "inf split": "--data-split '1,inf,2' must be three finite non-negative weights",
                "config fifo": "fifo.yaml is not a regular file",
                # probe 7, F8: a bare UnicodeDecodeError
                "config binary": "binary.yaml is not UTF-8 text (byte 0xe0 at offset 7)"}[case]
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and lines[-1].startswith("error: ")
    assert expected in lines[-1]
    # what was already saved stays as it was
    assert json.loads((finished / "status.json").read_text()) == {"state": "done"}
    assert (finished / "final").is_dir()


def test_overwrite_replaces_a_finished_run(tmp_path, tiny_model, sft_file):
    out = tmp_path / "run"
    args = ["--model", str(tiny_model), "--data", str(sft_file), "--output", str(out), "--max-steps", "2", *FAST]
    assert run_train("sft", *args).returncode == 0
    assert run_train("sft", *args).returncode == 2
    again = run_train("sft", *args, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert len(losses(out)) == 2


@pytest.mark.slow
def test_two_rank_zero3_run_saves_full_weights(tmp_path, tiny_model, sft_file):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "z3"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           "29533", "--module", "train", "sft", "--model", str(tiny_model), "--data", str(sft_file),
           "--output", str(out), "--zero-stage", "3", "--max-steps", "4", *FAST]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "world size 2" in (out / "train.log").read_text() or "2 process(es)" in (out / "train.log").read_text()
    saved = AutoModelForCausalLM.from_pretrained(out / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    for name, tensor in base.state_dict().items():
        assert saved.state_dict()[name].shape == tensor.shape, name
    assert not torch.equal(saved.model.layers[1].mlp.down_proj.weight,
                           base.model.layers[1].mlp.down_proj.weight.to(saved.dtype))


@pytest.mark.slow
def test_real_sft_on_the_default_model_learns_and_changes_its_answers(tmp_path, default_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "real"
    done = run_train("sft", "--model", "default", "--data", str(shared_file("llamafactory_alpaca_en_demo.json")),
                     "--output", str(out), "--max-steps", "16", "--batch-size", "8", "--max-seq-len", "256",
                     "--learning-rate", "5e-5", "--eval-every", "0", "--max-eval-samples", "32",
                     "--eval-fraction", "0.05", "--save-every", "0", timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_jsonl(out / "metrics.jsonl")
    train = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert sum(train[-8:]) / 8 < sum(train[:8]) / 8
    assert evals[-1] < evals[0]

    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Give three tips for staying healthy."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answers = []
    for folder in (default_model, out / "final"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        generated = model.generate(**prompt, max_new_tokens=40, do_sample=False)
        answers.append(tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True))
    assert answers[1].strip() and answers[0] != answers[1]


@pytest.mark.parametrize("files", [{"thesis.tex": "years of work"},
                                   {"config.yaml": "my: experiment", "status.json": '{"phase": 1}',
                                    "final/paper.tex": "draft", "train.log": "mine"}])
def test_overwrite_never_empties_a_folder_that_is_not_a_run(tmp_path, tiny_model, sft_file, files):
    """Issue 14, item 2: `--overwrite` emptied any folder before anything was validated; a
    second probe found one holding a config.yaml and a status.json of the user's taken for ours."""
    folder = tmp_path / "some" / "folder"
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    done = run_train("sft", "--model", str(tiny_model), "--data", str(sft_file), "--output",
                     str(folder), "--overwrite", "--max-steps", "1", *FAST)
    assert done.returncode == 2 and "is not a run folder" in done.stderr.splitlines()[-1]
    assert {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*") if p.is_file()} == files


def test_overwrite_validates_first_and_removes_only_what_a_run_writes(tmp_path, tiny_model, sft_file):
    out = tmp_path / "run"
    args = ["--model", str(tiny_model), "--output", str(out), "--max-steps", "2", *FAST]
    assert run_train("sft", *args, "--data", str(sft_file)).returncode == 0
    (out / "my-notes.txt").write_text("keep")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    failed = run_train("sft", *args, "--data", str(empty), "--overwrite")
    assert failed.returncode == 2 and "holds no usable records" in failed.stderr
    assert (out / "final" / "config.json").is_file()  # the finished run is still whole
    assert json.loads((out / "status.json").read_text())["state"] == "done"
    again = run_train("sft", *args, "--data", str(sft_file), "--overwrite")
    assert again.returncode == 0, again.stderr
    assert (out / "my-notes.txt").read_text() == "keep"
    assert len(losses(out)) == 2  # the earlier run's metrics were replaced, not appended to


def files_of(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_resume_never_writes_into_a_folder_that_is_not_a_run(tmp_path, tiny_model, sft_file):
    """Issue 14 (third probe, F1): --resume wrote into someone's folder holding a
    checkpoints/latest (config.yaml replaced, run.json added), so --overwrite then deleted it."""
    mine = tmp_path / "mine"
    for name, text in {"checkpoints/latest": "my-ckpt", "checkpoints/my-ckpt/w.bin": "weights",
                       "config.yaml": "my: experiment", "train.log": "mine"}.items():
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_text(text)
    before = files_of(mine)
    args = ["--model", str(tiny_model), "--data", str(sft_file), "--output", str(mine),
            "--max-steps", "1", *FAST]
    for flag in ("--resume", "--overwrite"):
        done = run_train("sft", *args, flag)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert "is not a run folder (no run.json)" in done.stderr.splitlines()[-1]
        assert files_of(mine) == before and sorted(p.name for p in mine.iterdir()) == \
            ["checkpoints", "config.yaml", "train.log"]


def test_a_damaged_checkpoint_of_our_run_is_one_sentence(tmp_path, tiny_model, sft_file):
    """F1's second half: resuming from a checkpoint folder without DeepSpeed's states ended in
    "error: AssertionError: " (an assert with no message inside DeepSpeed)."""
    ours = stopped_run(tmp_path / "ours", {"model": str(tiny_model)})
    before = files_of(ours)
    done = run_train("sft", "--model", str(tiny_model), "--data", str(sft_file), "--output",
                     str(ours), "--resume", "--max-steps", "1", *FAST)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the checkpoint in") and "cannot be loaded (AssertionError)" in last
    # probe 4, finding 3: the failed resume had rewritten config.yaml and marked the run failed,
    # and its hint (--overwrite) said nothing of what that deletes
    assert files_of(ours) == before
    assert "--overwrite instead of --resume (which deletes what the run wrote, any final/" in last


def stopped_run(folder, options):
    """A stopped sft run of ours with a checkpoint folder (DeepSpeed's states left out)."""
    (folder / "checkpoints" / "step-00000003").mkdir(parents=True)
    (folder / "checkpoints" / "latest").write_text("step-00000003")
    (folder / "run.json").write_text('{"stage": "sft"}')
    (folder / "status.json").write_text('{"state": "stopped", "step": 3}')
    (folder / "config.yaml").write_text("".join(f"{k}: {v}\n" for k, v in options.items()))
    return folder


def test_a_stopped_run_without_flags_is_offered_resume_and_overwrite(tmp_path, tiny_model, sft_file):
    ours = stopped_run(tmp_path / "ours", {"model": str(tiny_model)})
    before = files_of(ours)
    done = run_train("sft", "--model", str(tiny_model), "--data", str(sft_file), "--output",
                     str(ours), "--max-steps", "1", *FAST)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(
        "already holds a run (state: stopped): pass --overwrite to replace it, --resume to continue "
        "it, or choose another --output.")
    assert files_of(ours) == before


def test_a_finished_run_is_never_resumed(tmp_path, tiny_model, sft_file):
    """Issue 14 (fourth probe, finding 3): --resume on a finished run retrained from its last
    checkpoint over final/, or, with other options, failed after rewriting config.yaml and
    marking the run failed."""
    out = tmp_path / "done"
    args = ["--model", str(tiny_model), "--data", str(sft_file), "--output", str(out), *FAST]
    assert run_train("sft", *args, "--max-steps", "4", "--save-every", "2").returncode == 0
    assert (out / "checkpoints" / "latest").is_file() and (out / "final").is_dir()
    before = files_of(out)
    for extra in ([], ["--lora-dim", "8", "--max-steps", "6"]):
        again = run_train("sft", *args, "--resume", *extra)
        assert again.returncode == 2 and "Traceback" not in again.stderr
        last = again.stderr.strip().splitlines()[-1]
        assert "holds a finished run: nothing to resume, and its final/ stays as it is" in last
        assert "would train it again from the start and delete its final/" in last
        assert files_of(out) == before


def test_a_resume_with_options_its_checkpoint_was_not_made_with_is_refused(tmp_path, tiny_model, sft_file):
    ours = stopped_run(tmp_path / "ours", {"model": str(tiny_model), "lora_dim": 0, "zero_stage": 0})
    before = files_of(ours)
    done = run_train("sft", "--model", str(tiny_model), "--data", str(sft_file), "--output",
                     str(ours), "--resume", "--lora-dim", "8", "--max-steps", "6", *FAST)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "was started with --lora-dim 0, not --lora-dim 8: its checkpoint holds that state" in last
    assert files_of(ours) == before
    (ours / "checkpoints" / "latest").unlink()
    done = run_train("sft", "--model", str(tiny_model), "--data", str(sft_file), "--output",
                     str(ours), "--resume", "--max-steps", "6", *FAST)
    assert done.returncode == 2 and "has no checkpoint to resume from" in done.stderr.splitlines()[-1]


def test_a_resume_takes_the_precision_its_checkpoint_trained_in_however_it_is_asked(
        tmp_path, tiny_model, sft_file, monkeypatch):
    """`--precision auto` that trained in fp32 resumes with `--precision fp32` (it was refused as
    another precision); a precision the checkpoint was not made in is still refused."""
    monkeypatch.setenv("RLHF_FORCE_CPU_CAPABILITY", "avx2")  # the runs below: auto means fp32
    ours = stopped_run(tmp_path / "ours", {"model": str(tiny_model), "precision": "auto"})
    (ours / "run.json").write_text('{"stage": "sft", "precision": "fp32"}')
    before = files_of(ours)
    args = ["--model", str(tiny_model), "--data", str(sft_file), "--output", str(ours), "--resume",
            "--max-steps", "6", *FAST]
    refused = run_train("sft", *args, "--precision", "bf16")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "trained in fp32 (started with --precision auto), and --precision bf16 means bf16 here" \
        in refused.stderr.strip().splitlines()[-1]
    assert files_of(ours) == before
    # fp32 passes the options check and goes on to load the checkpoint (which this test leaves out)
    passed = run_train("sft", *args, "--precision", "fp32")
    last = passed.stderr.strip().splitlines()[-1]
    assert passed.returncode == 2 and "precision" not in last and "Traceback" not in passed.stderr
    assert "checkpoint" in last


def truncated_copy(model, folder):
    """`model` with its weights cut short, as a copy interrupted part-way leaves it."""
    shutil.copytree(model, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    return folder


def test_a_failed_overwrite_leaves_the_finished_run_as_it_was(tmp_path, tiny_model, sft_file):
    """Probe 5 (N2): --overwrite removed a finished run's final/ and checkpoints/ before it found
    that the model's weights were cut short or that --lora-targets matched nothing."""
    out = tmp_path / "done"
    args = ["--data", str(sft_file), "--output", str(out), *FAST]
    assert run_train("sft", "--model", str(tiny_model), *args, "--max-steps", "2").returncode == 0
    before = files_of(out)
    assert "final/model.safetensors" in before
    cut = truncated_copy(tiny_model, tmp_path / "cut")
    for model, extra, says in [(tiny_model, ["--lora-dim", "8", "--lora-targets", "q_projj"],
                                "--lora-targets 'q_projj' does not match this model"),
                               (cut, [], f"could not load model {cut}")]:
        done = run_train("sft", "--model", str(model), *args, "--overwrite", *extra)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert says in done.stderr.strip().splitlines()[-1]
        assert files_of(out) == before


@pytest.mark.parametrize("stage, data", [("rm", "prompts/preferences.jsonl"),
                                         ("dpo", "prompts/preferences.jsonl"),
                                         ("ppo", "prompts/prompts.jsonl")])
def test_every_stage_checks_its_models_before_an_overwrite_removes_anything(tmp_path, tiny_model,
                                                                            stage, data):
    """Probe 5 (N2) in the other stages: the models load (LoRA on them too) before the run folder
    is touched, so a run that --overwrite would replace stays whole when one cannot."""
    out = tmp_path / "earlier"
    (out / "final").mkdir(parents=True)
    (out / "final" / "model.safetensors").write_text("the earlier run's weights")
    (out / "run.json").write_text(json.dumps({"stage": stage}))
    (out / "status.json").write_text('{"state": "done"}')
    before = files_of(out)
    model = "--actor" if stage == "ppo" else "--model"
    extra = ["--reward", str(tiny_model), "--rollout-batch-size", "2"] if stage == "ppo" else []
    done = run_train(stage, model, str(tiny_model), "--data", str(ROOT / data), "--output", str(out),
                     "--overwrite", "--lora-dim", "8", "--lora-targets", "q_projj", "--max-steps", "1",
                     *extra, *FAST)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "--lora-targets 'q_projj' does not match this model" in done.stderr.strip().splitlines()[-1]
    assert files_of(out) == before


def test_a_run_copied_as_links_is_not_resumed_through_them(tmp_path, tiny_model, sft_file):
    """Probe 5 (N7): `cp -as run copy` then --resume of the copy appended the copy's metrics
    and log to the original run's files and rewrote its config.yaml; `cp -al` (hard links)
    would do the same."""
    original = tmp_path / "original"
    args = ["--model", str(tiny_model), "--data", str(sft_file), *FAST]
    assert run_train("sft", *args, "--output", str(original), "--max-steps", "2",
                     "--save-every", "1").returncode == 0
    (original / "status.json").write_text('{"state": "stopped", "step": 2}')  # as if stopped there
    before = files_of(original)
    for flags in ("-as", "-al"):  # symbolic links; hard links (probe 6)
        copy = tmp_path / f"copy{flags}"
        subprocess.run(["cp", flags, str(original), str(copy)], check=True)
        done = run_train("sft", *args, "--output", str(copy), "--resume", "--max-steps", "4")
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert "is a link to" in done.stderr.strip().splitlines()[-1]
        assert files_of(original) == before


def test_a_run_is_never_put_inside_another_nor_removed_with_it(tmp_path, tiny_model, sft_file):
    """Issue 14 (third probe, F3): a run inside another run's folder was accepted, and the
    outer run's --overwrite then deleted it."""
    outer = tmp_path / "outer"
    (outer / "final").mkdir(parents=True)
    (outer / "run.json").write_text('{"stage": "sft"}')
    (outer / "status.json").write_text('{"state": "done"}')
    args = ["--model", str(tiny_model), "--data", str(sft_file), "--max-steps", "1", *FAST]
    nested = run_train("sft", *args, "--output", str(outer / "final" / "nested"))
    assert nested.returncode == 2 and "Traceback" not in nested.stderr
    assert "lies inside the run folder" in nested.stderr.splitlines()[-1]
    assert not (outer / "final" / "nested").exists()
    # one put there some other way (an older version, a move) survives the outer --overwrite
    (outer / "final" / "moved").mkdir()
    (outer / "final" / "moved" / "run.json").write_text('{"stage": "sft"}')
    replaced = run_train("sft", *args, "--output", str(outer), "--overwrite")
    assert replaced.returncode == 2 and "Traceback" not in replaced.stderr
    assert "holds another run in" in replaced.stderr.splitlines()[-1]
    assert (outer / "final" / "moved" / "run.json").is_file()
    assert json.loads((outer / "status.json").read_text()) == {"state": "done"}


def test_a_live_run_is_not_resumed_or_overwritten_by_a_second_process(tmp_path, tiny_model, sft_file):
    """Issue 14, item 13 (command line): two processes on one run folder."""
    out = tmp_path / "live"
    common = ["--model", str(tiny_model), "--data", str(sft_file), "--output", str(out), *FAST]
    proc = subprocess.Popen([sys.executable, "-m", "train", "sft", *common, "--max-steps", "400"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.2)
        second = run_train("sft", *common, "--overwrite", "--max-steps", "2")
        assert second.returncode == 2 and "still going" in second.stderr.splitlines()[-1]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def test_a_model_folder_of_pickles_is_one_sentence(tmp_path, tiny_model, sft_file):
    """Issue 14, item 12: no multi-line UnpicklingError suggesting weights_only=False."""
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model / "config.json").read_text())
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    done = run_train("sft", "--model", str(folder), "--data", str(sft_file), "--output",
                     str(tmp_path / "o"), "--max-steps", "1", *FAST)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "only pickled weights" in done.stderr.splitlines()[-1]
    assert "weights_only" not in done.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_stop_during_a_default_size_evaluation_ends_the_run_within_10_s(tmp_path):
    """Issue 13, item 5: the stop is honoured between evaluation batches, not after the pass."""
    out = tmp_path / "stop-in-eval"
    data = shared_file("llamafactory_alpaca_en_demo.json")
    proc = subprocess.Popen([sys.executable, "-m", "train", "sft", "--model", "default", "--data",
                             str(data), "--output", str(out), "--max-steps", "5", "--eval-fraction",
                             "0.2", "--no-tensorboard"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    log = out / "train.log"
    while time.time() < deadline and "evaluating the starting model" not in (
            log.read_text() if log.exists() else ""):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    time.sleep(2)  # well inside the evaluation of 199 examples
    asked = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert time.time() - asked < 10
    status = json.loads((out / "status.json").read_text())
    assert (status["state"], status["step"]) == ("stopped", 0)
    assert (out / "checkpoints" / "latest").is_file() and not (out / "metrics.jsonl").exists()


def test_ctrl_c_while_starting_is_one_line(tmp_path, sft_file):
    """Probe 5: Ctrl-C in the first seconds (while transformers imports) printed a ~40-line
    KeyboardInterrupt traceback."""
    # as from a terminal: a shell without job control starts background jobs (make test run with
    # `&`, as CI may) with Ctrl-C ignored, and Python keeps it ignored
    proc = subprocess.Popen([sys.executable, "-m", "train", "sft", "--data", str(sft_file), "--output",
                             str(tmp_path / "run")], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.5)  # importing torch and transformers takes seconds
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted (Ctrl-C)")
