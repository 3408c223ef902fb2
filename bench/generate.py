"""Generation speed: our decoder (core/decoder.py, what PPO rollouts and the server use) against
Hugging Face `generate`, default model, one process, one run, each at its best precision here
(bf16 where the CPU computes it natively, else fp32: bench/common.py).

    python bench/generate.py [--prompts 64] [--new-tokens 128] [--hf-batches 16,32,64] [--quick]

Prints the machine, then measures, in this order:
1. the machine's memory read bandwidth (sum over a 256 MB tensor) and the model's weight bytes
   in the precision it decodes in, hence the batch-1 decode bound (bandwidth / weight bytes);
2. batch-1 greedy decode, ours and HF, decode steps only (prefill excluded), best of 3 runs;
3. the rollout phase of a PPO step: --prompts real prompts of about 100 tokens (alpaca demo
   instructions in the chat template, 80-120 tokens), each sampled (temperature 1) to exactly
   --new-tokens tokens (end-of-turn ignored, so every system does the same work). Ours: one
   batch, the weight layout (prep) included in the time. HF: `generate` at each of
   --hf-batches; its best batch is the baseline.
Every system is warmed up first (the first call of a process is several times slower), and the
share of the CPU other processes took during each timed part is printed (a shared machine skews
the figures). Prints a table and the ratios; writes bench/results/generate.json.
"""
from __future__ import annotations

import argparse
import json
import time

from common import ROOT, best_precision, machine, print_machine
from common import bench_env, cpu_seconds

DATA = ROOT.parent / "shared" / "data" / "llamafactory_alpaca_en_demo.json"
RESULTS = ROOT / "bench" / "results" / "generate.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64, help="prompts in the rollout phase")
    parser.add_argument("--new-tokens", type=int, default=128, help="sampled tokens per prompt")
    parser.add_argument("--hf-batches", default="16,32,64", help="HF generate batch sizes to try")
    parser.add_argument("--decode-tokens", type=int, default=128, help="batch-1 greedy tokens")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: every core; 1 gives steadier ratios on a busy machine)")
    parser.add_argument("--quick", action="store_true", help="16 prompts, 32 tokens, HF batch 16: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.new_tokens, args.hf_batches, args.decode_tokens = 16, 32, "16", 32
    args.hf_batches = [int(b) for b in args.hf_batches.split(",")]
    return args


def read_bandwidth_gbs() -> float:
    """Best of 10 full reads of a 256 MB tensor."""
    import torch

    data = torch.ones(64 * 2**20, dtype=torch.float32)
    best = float("inf")
    for _ in range(10):
        tic = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - tic)
    return data.numel() * 4 / best / 1e9


def rollout_prompts(tokenizer, count: int) -> list[list[int]]:
    """`count` chat prompts of 80-120 tokens from the alpaca demo set (cycled if too few)."""
    if not DATA.exists():
        raise SystemExit(f"error: {DATA} is missing: bench/generate.py reads its prompts from ../shared/data.")
    records = json.loads(DATA.read_text(encoding="utf-8"))
    prompts = []
    for record in records:
        text = "\n\n".join(p for p in (record["instruction"], record.get("input", "")) if p)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        if 80 <= len(ids) <= 120:
            prompts.append(ids)
    if not prompts:
        raise SystemExit(f"error: no prompt of 80-120 tokens in {DATA}")
    return [prompts[i % len(prompts)] for i in range(count)]


def ours_rollout(model, prompts, new_tokens: int, seed: int = 0) -> tuple[float, float]:
    """(seconds including the weight layout, of which the layout) for the whole batch."""
    import torch
    from core.decoder import SlotDecoder
    from core.sampling import Sampling
    from train.rollout import decode_batch

    sampling = Sampling(new_tokens, 1.0, 1.0, eos_token_id=-1, pad_token_id=0)  # never stops early
    tic = time.perf_counter()
    decoder = SlotDecoder(model, len(prompts), max(map(len, prompts)) + new_tokens)
    prep = time.perf_counter() - tic
    tokens = decode_batch(decoder, prompts, sampling, torch.Generator().manual_seed(seed)).response_ids
    assert tokens.shape == (len(prompts), new_tokens)
    return time.perf_counter() - tic, prep


def hf_rollout(model, prompts, new_tokens: int, batch: int, pad_id: int) -> float:
    """Seconds for all prompts through `generate`, `batch` at a time, left-padded."""
    from core.sampling import pad

    tic = time.perf_counter()
    for start in range(0, len(prompts), batch):
        ids, mask = pad(prompts[start:start + batch], pad_id, left=True)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                             top_k=None, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=pad_id)
        assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - tic


def ours_decode_rate(model, prompt, tokens: int) -> float:
    """Batch-1 greedy decode steps per second (prefill excluded)."""
    from core.decoder import SlotDecoder

    decoder = SlotDecoder(model, 1, len(prompt) + tokens + 1)
    token = decoder.prefill([0], [prompt]).argmax(-1)
    tic = time.perf_counter()
    for _ in range(tokens):
        token = decoder.decode([0], token).argmax(-1)
    return tokens / (time.perf_counter() - tic)


def hf_decode_rate(model, prompt, tokens: int) -> float:
    """Batch-1 greedy decode rate of `generate`: (tokens - 1) steps after a 1-token run's prefill."""
    import torch

    ids = torch.tensor([prompt])
    tic = time.perf_counter()
    model.generate(ids, max_new_tokens=1, do_sample=False)
    prefill = time.perf_counter() - tic
    tic = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return (tokens - 1) / (time.perf_counter() - tic - prefill)


def others_share(run, cores: int):
    """(run()'s result, share of the machine's cores other processes took while it ran)."""
    (all0, own0), tic = cpu_seconds(), time.perf_counter()
    result = run()
    (all1, own1), wall = cpu_seconds(), time.perf_counter() - tic
    return result, max(0.0, (all1 - all0) - (own1 - own0)) / (wall * cores)


def main() -> None:
    args = parse_args()
    cores, _ = bench_env()
    threads = args.threads or cores
    import torch
    from core import models
    from core.hardware import torch_dtype
    from core.kernels import Linear

    torch.set_num_threads(threads)
    precision = best_precision()
    dtype = torch_dtype(precision)
    path = str(models.resolve_model("default"))
    tokenizer = models.load_tokenizer(path)
    model = models.load_causal_lm(path, dtype=dtype).eval()
    prompts = rollout_prompts(tokenizer, args.prompts)
    info = machine(threads)
    print_machine(info, {"ours": precision, "HF generate": precision})
    plan = Linear(model.model.layers[0].mlp.gate_proj.weight.detach()).kernels()
    print(f"our kernels for a {tuple(model.model.layers[0].mlp.gate_proj.weight.shape)} weight, by rows: {plan}")
    results = {"machine": info, "precision": precision, "args": vars(args), "gate_proj_kernels": plan}

    # 1. the bound
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    bandwidth = read_bandwidth_gbs()
    bound = bandwidth * 1e9 / weight_bytes
    results.update(bandwidth_gbs=bandwidth, weight_mb=weight_bytes / 1e6, decode_bound_tps=bound)
    print(f"memory read {bandwidth:.1f} GB/s, {precision} weights {weight_bytes / 1e6:.0f} MB: "
          f"batch-1 decode bound {bound:.0f} tokens/s", flush=True)

    # 2. batch-1 decode
    with torch.inference_mode():
        ours_decode_rate(model, prompts[0], 8), hf_decode_rate(model, prompts[0], 8)  # warm-up
        # best of 3 runs each: single runs on this VM vary by 10-30%
        ours_b1, ours_busy = others_share(lambda: max(
            ours_decode_rate(model, prompts[0], args.decode_tokens) for _ in range(3)), cores)
        hf_b1, hf_busy = others_share(lambda: max(
            hf_decode_rate(model, prompts[0], args.decode_tokens) for _ in range(3)), cores)
    results.update(ours_batch1_tps=ours_b1, hf_batch1_tps=hf_b1,
                   batch1_others_cpu_share={"ours": ours_busy, "hf": hf_busy})
    print(f"batch-1 greedy decode: ours {ours_b1:.1f} tokens/s ({ours_b1 / bound:.0%} of the bound), "
          f"HF {hf_b1:.1f} ({hf_b1 / bound:.0%}); other processes took {ours_busy:.0%} / "
          f"{hf_busy:.0%} of the CPU meanwhile", flush=True)

    # 3. the rollout phase
    total = args.prompts * args.new_tokens
    rows = []
    with torch.inference_mode():
        ours_rollout(model, prompts[:4], 4)  # warm-up
        (seconds, prep), busy = others_share(lambda: ours_rollout(model, prompts, args.new_tokens), cores)
        rows.append((f"ours (fused, {precision})", len(prompts), seconds, prep, busy))
        print(f"ours: {seconds:.1f} s (weight layout {prep:.2f} s), others {busy:.0%}", flush=True)
        hf_rollout(model, prompts[:2], 4, 2, tokenizer.pad_token_id)  # warm-up
        for batch in args.hf_batches:
            seconds, busy = others_share(
                lambda: hf_rollout(model, prompts, args.new_tokens, batch, tokenizer.pad_token_id), cores)
            rows.append((f"HF generate {precision}", batch, seconds, 0.0, busy))
            print(f"HF generate batch {batch}: {seconds:.1f} s, others {busy:.0%}", flush=True)
    keys = ("system", "batch", "seconds", "prep_s", "others_cpu_share")
    results["rollout"] = [dict(zip(keys, r)) for r in rows]

    print(f"\nrollout phase: {args.prompts} prompts of 80-120 tokens, {args.new_tokens} sampled tokens each")
    print(f"{'system':<22}{'batch':>6}{'seconds':>9}{'tokens/s':>10}{'others':>8}")
    for name, batch, seconds, _, busy in rows:
        print(f"{name:<22}{batch:>6}{seconds:>9.1f}{total / seconds:>10.0f}{busy:>8.0%}")
    hf_best = min(r[2] for r in rows[1:])
    ratios = {"rollout: HF best batch / ours": hf_best / rows[0][2],
              "batch-1 decode: ours / HF": ours_b1 / hf_b1,
              "batch-1 decode: ours, share of the bound": ours_b1 / bound}
    results["ratios"] = ratios
    print()
    for label, value in ratios.items():
        print(f"{label}: {value:.2f}" + ("" if "share" in label else "x"))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
