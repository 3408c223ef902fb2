"""The GPU check: every CUDA path of RLHF Studio in one run of under 8 minutes on one H100, and
bench/gpu/README.md written with the machine, the versions, the figures and the command.

    bash bench/gpu/check.sh          # = python -m bench.gpu.check, from the repository root

In order, each as the user runs it (a subprocess, its own time limit; a failure is recorded and
the check goes on): SFT, RM and PPO a few steps each on the default model at `--precision auto`
(bf16 on a GPU that has it) under ZeRO-2 and ZeRO-3; PPO with `--rollout-engine deepspeed`
(DeepSpeed's Hybrid Engine; the default model is a Llama, which it has containers for), which
either runs or falls back to our decoder with its reason in train.log (transformers 5 calls the
layers differently from the transformers 4 its containers follow); our slot decoder on CUDA
(greedy tokens against the model's own `generate` in fp32, then a 64 x 128 sampled rollout
against `generate` at batch 64 in bf16); the server with `--engine ds-inference` and with
`--engine mii`, each answering the official `openai` client (plain, streamed, 8 at once).
A step that would start with under a minute of the budget left is skipped and says so.
On a machine without a CUDA GPU it prints one sentence and exits (status 0).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "bench" / "gpu" / "README.md"
BUDGET_S = 8 * 60 - 20  # the README is written in the last seconds
PY = sys.executable


def train(stage: str, work: Path, name: str, *options: str) -> tuple[list[str], Path]:
    out = work / name
    return [PY, "-m", "train", stage, "--output", str(out), "--overwrite", "--save-every", "0",
            "--no-tensorboard", *options], out


def metrics(out: Path) -> str:
    """Mean step time (first step dropped) and the step's own rate, from metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r for r in rows if "step_time_s" in r][1:] or [r for r in rows if "step_time_s" in r]
    mean = lambda key: sum(r[key] for r in steps) / len(steps)  # noqa: E731
    figures = [f"{mean('step_time_s'):.2f} s/step"]
    for key, unit in (("tokens_per_s", "tokens/s"), ("gen_tokens_per_s", "generated tokens/s"),
                      ("time_generate_s", "s generating")):
        if key in steps[0]:
            figures.append(f"{mean(key):.1f} {unit}")
    log = (out / "train.log").read_text()
    notes = [re.sub(r"^[\d-]+ [\d:]+ ", "", line.strip())  # without the log's time stamp
             for line in log.splitlines() if re.search(r"precision|rollouts:", line)]
    return "; ".join(figures), " / ".join(notes[:2])


def run_training(cmd: list[str], out: Path, limit: float) -> tuple[bool, str, str]:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    if done.returncode != 0:
        return False, "", last_lines(done.stderr)
    figures, notes = metrics(out)
    return True, figures, notes


def last_lines(text: str, count: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-count:])


# ---- our decoder on CUDA (run as `python -m bench.gpu.check --decoder RESULT.json`) ----------

def decoder_check(result: Path) -> None:
    import torch

    from core import models
    from core.decoder import SlotDecoder
    from core.sampling import Sampling
    from train.rollout import decode_batch, generate, hf_generate

    path = models.resolve_model("default")
    tokenizer = models.load_tokenizer(path)
    prompts = [tokenizer.apply_chat_template(json.loads(line)["prompt"], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
               for line in (ROOT / "prompts" / "prompts.jsonl").read_text().splitlines()[:64]]
    figures = {}
    with torch.inference_mode():
        lm = models.load_causal_lm(path, dtype=torch.float32).cuda().eval()
        greedy = Sampling(32, 1.0, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=True)
        _, _, ours, mask, _ = generate(lm, prompts[:8], greedy)
        equal = 0
        for row, prompt in enumerate(prompts[:8]):
            own = lm.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=32, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            expected = own[0, len(prompt):].tolist()
            equal += ours[row, :len(expected)].tolist() == expected
        figures["greedy_equal_fp32"] = f"{equal}/8"
        lm = lm.to(torch.bfloat16)
        sampling = Sampling(128, 1.0, 1.0, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id)
        decode_batch(SlotDecoder(lm, 4, 256), prompts[:4], Sampling(4, 1.0, 1.0, -1, 0))  # warm-up
        hf_generate(lm, prompts[:4], Sampling(4, 1.0, 1.0, -1, tokenizer.pad_token_id))
        for name, rollout in (("ours", lambda: decode_batch(SlotDecoder(lm, 64, 256), prompts, sampling)),
                              ("hf", lambda: hf_generate(lm, prompts, sampling))):
            torch.cuda.synchronize()
            tic = time.perf_counter()
            tokens = rollout()[2]
            torch.cuda.synchronize()
            figures[f"{name}_tokens_per_s"] = round(tokens.numel() / (time.perf_counter() - tic), 1)
    result.write_text(json.dumps(figures))


def run_decoder(work: Path, limit: float) -> tuple[bool, str, str]:
    result = work / "decoder.json"
    done = subprocess.run([PY, "-m", "bench.gpu.check", "--decoder", str(result)], cwd=ROOT,
                          capture_output=True, text=True, timeout=limit)
    if done.returncode != 0:
        return False, "", last_lines(done.stderr)
    f = json.loads(result.read_text())
    return (True, f"64 x 128 sampled, bf16: ours {f['ours_tokens_per_s']} tokens/s, HF generate "
                  f"(batch 64) {f['hf_tokens_per_s']}",
            f"greedy tokens equal to the model's own generate (fp32, 32 tokens): {f['greedy_equal_fp32']} prompts")


# ---- the server, through the official openai client --------------------------------------------

def run_server(engine: str, limit: float) -> tuple[bool, str, str]:
    from openai import OpenAI

    cmd = [PY, "-m", "serving", "--model", "default", "--engine", engine, "--port", "0"]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in process.stderr:  # the server names its address on stderr once it is bound
            lines.append(line)
            found = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
            if found:
                break
        else:
            return False, "", last_lines("".join(lines))
        threading.Thread(target=process.stderr.read, daemon=True).start()  # keep the pipe drained
        client = OpenAI(base_url=f"{found.group(1)}/v1", api_key="none", timeout=limit, max_retries=0)
        messages = [{"role": "user", "content": "Name three rivers in Europe."}]
        first = client.chat.completions.create(model="default", messages=messages, max_tokens=32)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model="default", messages=messages, max_tokens=32, stream=True) if chunk.choices)
        tic = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda i: client.chat.completions.create(
                model="default", max_tokens=128, temperature=0,
                messages=[{"role": "user", "content": f"Write a short story number {i} about the sea."}]),
                range(8)))
        tokens = sum(r.usage.completion_tokens for r in replies)
        ok = bool(first.choices[0].message.content) and bool(streamed)
        return ok, f"8 concurrent clients: {tokens / (time.perf_counter() - tic):.1f} tokens/s", \
            f"answer: {first.choices[0].message.content[:60]!r}"
    except Exception as err:  # noqa: BLE001  (recorded in the table)
        return False, "", f"{type(err).__name__}: {err}"[:300]
    finally:
        process.terminate()
        process.wait(timeout=60)


# ---- the run ---------------------------------------------------------------------------------------

def checks(work: Path) -> list[tuple[str, object]]:
    """(name, a function of the time limit -> (ok, figures, notes)) in the order they run."""
    items = []
    sft = ["--model", "default", "--data", "prompts/sft.jsonl", "--max-steps", "6", "--batch-size", "8",
           "--max-seq-len", "256", "--eval-fraction", "0", "--log-every", "1"]
    rm = ["--model", "default", "--data", "prompts/preferences.jsonl", "--max-steps", "6",
          "--batch-size", "8", "--max-seq-len", "256", "--eval-fraction", "0", "--log-every", "1"]
    for zero in ("2", "3"):
        for stage, options in (("sft", sft), ("rm", rm)):
            cmd, out = train(stage, work, f"{stage}-z{zero}", *options, "--zero-stage", zero)
            items.append((f"{stage.upper()} ZeRO-{zero}, 6 steps",
                          lambda limit, cmd=cmd, out=out: run_training(cmd, out, limit)))
    for zero, engine in (("2", "fused"), ("3", "fused"), ("2", "deepspeed")):
        cmd, out = train("ppo", work, f"ppo-z{zero}-{engine}", "--actor", "default",
                         "--reward", str(work / f"rm-z{zero}" / "final"), "--data", "prompts/prompts.jsonl",
                         "--max-steps", "3", "--rollout-batch-size", "16", "--batch-size", "8",
                         "--max-new-tokens", "64", "--max-eval-samples", "0", "--zero-stage", zero,
                         "--rollout-engine", engine)
        items.append((f"PPO ZeRO-{zero}, --rollout-engine {engine}, 3 steps",
                      lambda limit, cmd=cmd, out=out: run_training(cmd, out, limit)))
    items.append(("our slot decoder on CUDA", lambda limit: run_decoder(work, limit)))
    for engine in ("ds-inference", "mii"):
        items.append((f"server --engine {engine}, openai client", lambda limit, e=engine: run_server(e, limit)))
    return items


def versions() -> dict:
    from importlib import metadata

    found = {}
    for name in ("torch", "transformers", "deepspeed", "deepspeed-mii", "peft", "openai"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_readme(rows: list[dict], seconds: float) -> None:
    import torch

    from bench.common import cpu_model

    gpu = torch.cuda.get_device_properties(0)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True)
    lines = ["# GPU check", "",
             f"Written by `bash bench/gpu/check.sh` on {time.strftime('%Y-%m-%d %H:%M')}, one run of "
             f"{seconds:.0f} s (budget {BUDGET_S + 20} s). Every row is the command a user runs; "
             "figures are one run each.", "", "## Machine", "",
             f"- GPU: {gpu.name}, {gpu.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
             f"driver {smi.stdout.strip() or 'unknown'}",
             f"- CPU: {cpu_model()}",
             f"- Python {sys.version.split()[0]}; " + ", ".join(f"{k} {v}" for k, v in versions().items()),
             "", "## Results", "", "| check | result | seconds | figures | notes |", "|---|---|---|---|---|"]
    for row in rows:
        cells = [row["name"], row["result"], f"{row['seconds']:.0f}", row["figures"], row["notes"]]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    lines += ["", "## Command", "", "    bash bench/gpu/check.sh", ""]
    README.write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--decoder", type=Path, help=argparse.SUPPRESS)  # the decoder part, in its own process
    args = parser.parse_args()
    from core.hardware import hardware

    if hardware().device != "cuda":
        print(f"bench/gpu/check.sh needs a CUDA GPU, and this machine has none ({hardware().describe()}): "
              "nothing to check.")
        return 0
    if args.decoder:
        decoder_check(args.decoder)
        return 0
    start = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="rlhf-gpu-check-") as tmp:
        for name, check in checks(Path(tmp)):
            left = BUDGET_S - (time.time() - start)
            tic = time.time()
            if left < 60:
                ok, figures, notes = None, "", "skipped: under a minute of the 8-minute budget left"
            else:
                try:
                    ok, figures, notes = check(left)
                except subprocess.TimeoutExpired:
                    ok, figures, notes = False, "", f"stopped at the budget's end ({left:.0f} s)"
            result = {True: "ok", False: "FAILED", None: "skipped"}[ok]
            rows.append({"name": name, "result": result, "seconds": time.time() - tic,
                         "figures": figures, "notes": notes})
            print(f"{name}: {result} ({rows[-1]['seconds']:.0f} s) {figures} {notes}", flush=True)
    write_readme(rows, time.time() - start)
    print(f"wrote {README.relative_to(ROOT)}")
    return 0 if all(row["result"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
