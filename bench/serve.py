"""Benchmark: our inference server against a baseline server that calls Hugging Face `generate`
once per request, in one run, on the built-in model, at 1, 4 and 16 concurrent clients, both in
the best precision for this machine (bf16 where the CPU computes it natively, else fp32:
bench/common.py).

    python bench/serve.py [--quick] [--max-tokens 128] [--clients 1,4,16]

Ours is the normal command line (`python -m serving --engine ds-inference --precision P`:
continuous batching over the slot decoder); the baseline is a minimal FastAPI endpoint in this
file that answers each request with one `model.generate` call under a lock, what a first server
around transformers does. Both run as subprocesses, one after the other, with the machine's
cores as threads. Each client sends its requests one after another (non-streamed, greedy, up to
--max-tokens tokens), prompts taken in order from prompts/prompts.jsonl. Prints throughput
(completion tokens per second of wall time) and p50/p95 request latency per concurrency, the
ratio ours/baseline, and writes the same to bench/results/serve.json. Left out: streaming
time-to-first-token, long prompts, sampling.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import best_precision, machine, print_machine  # bench/ is this script's folder
from common import bench_env, cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "prompts" / "prompts.jsonl"
RESULTS = ROOT / "bench" / "results" / "serve.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=128, help="max_tokens of every request")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    parser.add_argument("--requests-per-client", type=int, default=2,
                        help="requests each client sends at each level (at least 4 in all)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 32 tokens, one request per client")
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.max_tokens, args.requests_per_client = 32, 1
    args.levels = [int(c) for c in args.clients.split(",")]
    return args


# ---- the baseline server (run as `python bench/serve.py --baseline-server`) --------------------

def baseline_app(model_path: str):
    """OpenAI-shaped chat completions answered by one Hugging Face `generate` call each."""
    import torch
    from fastapi import FastAPI
    from transformers import AutoModelForCausalLM

    from core.models import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    from core.hardware import torch_dtype

    dtype = torch_dtype(best_precision())
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, use_safetensors=True).eval()
    lock = threading.Lock()  # one generate at a time: the model is not shared between calls
    app = FastAPI()

    @app.post("/v1/chat/completions")
    def complete(body: dict):  # a plain def: FastAPI runs it on its thread pool
        ids = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        prompt = torch.tensor([ids])
        with lock, torch.no_grad():
            output = lm.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=body["max_tokens"], top_k=None, top_p=None,
                                 eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        new = output[0, prompt.shape[1]:].tolist()
        ended = tokenizer.eos_token_id in new
        new = new[:new.index(tokenizer.eos_token_id)] if ended else new
        return {"object": "chat.completion",
                "choices": [{"index": 0, "finish_reason": "stop" if ended else "length",
                             "message": {"role": "assistant",
                                         "content": tokenizer.decode(new, skip_special_tokens=True)}}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new),
                          "total_tokens": len(ids) + len(new)}}

    return app


def serve_baseline() -> None:
    import uvicorn

    from serving.api import bind
    from core.models import resolve_model

    sock = bind("127.0.0.1", 0)
    print(f"baseline on http://127.0.0.1:{sock.getsockname()[1]}/v1", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(baseline_app(resolve_model("default")), log_level="warning")).run(
        sockets=[sock])


# ---- driving a server -------------------------------------------------------------------------

def start(cmd: list[str], env: dict) -> tuple[subprocess.Popen, str]:
    """Start a server subprocess; (process, base URL) once /health or its route answers."""
    import httpx

    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    for line in process.stderr:  # the first line with an address names the port
        found = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
        if found:
            break
    else:
        sys.exit(f"bench: {' '.join(cmd[1:3])} exited before serving")
    threading.Thread(target=process.stderr.read, daemon=True).start()  # keep its pipe drained
    url = found.group(1)
    for _ in range(600):
        try:
            httpx.post(f"{url}/v1/chat/completions", timeout=600, json={
                "model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
            return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    sys.exit("bench: the server did not answer within 5 minutes")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def drive(url: str, prompts: list[list[dict]], clients: int, per_client: int, max_tokens: int) -> dict:
    """`clients` threads, each sending its requests one after another; throughput and latency."""
    import httpx

    def client(index: int) -> list[tuple[float, int]]:
        done = []
        with httpx.Client(timeout=1800) as http:
            for r in range(per_client):
                messages = prompts[(index * per_client + r) % len(prompts)]
                tic = time.perf_counter()
                reply = http.post(f"{url}/v1/chat/completions", json={
                    "model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0})
                reply.raise_for_status()
                done.append((time.perf_counter() - tic, reply.json()["usage"]["completion_tokens"]))
        return done

    tic = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [item for items in pool.map(client, range(clients)) for item in items]
    wall = time.perf_counter() - tic
    latencies = [latency for latency, _ in results]
    tokens = sum(count for _, count in results)
    return {"clients": clients, "requests": len(results), "completion_tokens": tokens,
            "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "p50_s": round(percentile(latencies, 50), 2), "p95_s": round(percentile(latencies, 95), 2)}


def process_cpu_s(pid: int) -> float:
    """CPU seconds a running process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_server(what: str, cmd: list[str], env: dict, args, prompts, cores: int) -> list[dict]:
    print(f"\nbench: {what}", flush=True)
    process, url = start(cmd, env)
    try:
        drive(url, prompts, min(4, max(args.levels)), 1, 16)  # warm-up, not counted
        rows = []
        for clients in args.levels:
            per_client = max(args.requests_per_client, -(-4 // clients))
            (all0, own0), server0, tic = cpu_seconds(), process_cpu_s(process.pid), time.time()
            row = drive(url, prompts, clients, per_client, args.max_tokens)
            (all1, own1), server1, wall = cpu_seconds(), process_cpu_s(process.pid), time.time() - tic
            others = max(0.0, (all1 - all0) - (own1 - own0) - (server1 - server0)) / (wall * cores)
            row["cpu_share_of_other_processes"] = round(others, 3)
            print(f"  {clients:>2} clients: {row['tokens_per_s']:>7.1f} tokens/s, p50 "
                  f"{row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s", flush=True)
            if others > 0.05:  # a shared machine: say so rather than report a skewed number
                print(f"bench: WARNING: other processes took {others:.0%} of the CPU meanwhile: "
                      "these timings are low; rerun on an idle machine", flush=True)
            rows.append(row)
        return rows
    finally:
        process.terminate()
        process.wait(timeout=60)


def static_batch_tokens_per_s(prompts: list[list[dict]], max_tokens: int, batch: int = 16) -> float:
    """HF `generate` (best precision here) on one left-padded batch of the first `batch` prompts, greedy, stopping
    at end of turn: generated tokens (up to each row's end) per second, after a warm-up. No
    server: the ceiling a static batch of `generate` reaches on the same prompts."""
    import torch
    from core.hardware import torch_dtype
    from core.models import load_causal_lm, load_tokenizer, resolve_model
    from core.sampling import pad

    path = resolve_model("default")
    tokenizer = load_tokenizer(path)
    lm = load_causal_lm(path, dtype=torch_dtype(best_precision())).eval()
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
           for p in prompts[:batch]]
    input_ids, mask = pad(ids, tokenizer.pad_token_id, left=True)
    with torch.inference_mode():
        lm.generate(input_ids[:2], attention_mask=mask[:2], max_new_tokens=4, do_sample=False)  # warm-up
        tic = time.perf_counter()
        out = lm.generate(input_ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                          top_k=None, top_p=None, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
        seconds = time.perf_counter() - tic
    new = out[:, input_ids.shape[1]:]
    ended = (new == tokenizer.eos_token_id).long()
    kept = ((ended.cumsum(1) - ended) == 0).sum().item()  # tokens up to each row's end of turn
    return kept / seconds


def main() -> None:
    args = parse_args()
    cores, env = bench_env()
    if args.baseline_server:
        return serve_baseline()
    precision = best_precision()
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines() if line.strip()]
    ours_cmd = [sys.executable, "-m", "serving", "--model", "default", "--engine", "ds-inference",
                "--precision", precision, "--port", "0", "--slots", str(max(16, max(args.levels)))]
    ours = bench_server("ours (python -m serving, ds-inference, continuous batching)", ours_cmd,
                        env, args, prompts, cores)
    base_cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-server"]
    base = bench_server("baseline (HF generate per request, under a lock)", base_cmd, env, args,
                        prompts, cores)

    info = machine(cores)
    print()
    print_machine(info, {"ours": precision, "HF generate baseline": precision})
    print(f"model SmolLM2-135M-Instruct, greedy, max_tokens {args.max_tokens}, prompts from "
          f"{PROMPTS.relative_to(ROOT)}\n")
    print(f"{'clients':>7} | {'ours tok/s':>10} {'p50 s':>6} {'p95 s':>6} | "
          f"{'HF tok/s':>8} {'p50 s':>6} {'p95 s':>6} | {'ratio':>5}")
    for mine, theirs in zip(ours, base):
        mine["ratio_tokens_per_s"] = round(mine["tokens_per_s"] / theirs["tokens_per_s"], 2)
        print(f"{mine['clients']:>7} | {mine['tokens_per_s']:>10.1f} {mine['p50_s']:>6.2f} "
              f"{mine['p95_s']:>6.2f} | {theirs['tokens_per_s']:>8.1f} {theirs['p50_s']:>6.2f} "
              f"{theirs['p95_s']:>6.2f} | {mine['ratio_tokens_per_s']:>5.2f}")
    static = static_batch_tokens_per_s(prompts, args.max_tokens)
    at16 = next((m["tokens_per_s"] for m in ours if m["clients"] == 16), None)
    print(f"\nHF generate {precision}, one static batch of the first 16 prompts (no server): {static:.1f} tokens/s"
          + (f"; ours at 16 clients / that: {at16 / static:.2f}x" if at16 else ""))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"hf_generate_static_batch16_tokens_per_s": static,
        "machine": info, "model": "SmolLM2-135M-Instruct", "precision": precision, "max_tokens": args.max_tokens, "quick": args.quick,
        "ours": ours, "baseline_hf_generate": base}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
