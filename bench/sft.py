"""Benchmark: our SFT step against TRL's SFTTrainer, in one run, on the same model (the built-in
SmolLM2-135M-Instruct), examples, batch size, max length and precision: the best for this
machine (bf16 where the CPU computes it natively, else fp32: bench/common.py).

    python bench/sft.py [--steps 20] [--batch-size 8] [--max-seq-len 256]

Both systems run as subprocesses, one after the other, each with the machine's cores as threads.
Prints s/step and non-padding tokens/s (mean over the steps after the first 2, which warm up),
the ratio ours/TRL, and writes the same to bench/results/sft.json. On first run it sets up TRL
(bench/requirements-peers.txt) in its own venv, bench/.peer-trl, unless our venv has it
(bench/common.py). RLHF_HOME is honoured as by `python -m train`.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from statistics import mean

from common import ROOT
from trainer_bench import WARMUP, Setup, report, run_ours, run_trl, setup, write_jsonl

DATA = ROOT.parent / "shared" / "data" / "llamafactory_alpaca_en_demo.json"


def shared_examples(s: Setup) -> list[dict]:
    """SFT records of the demo set that both sides take whole (no truncation on either side)."""
    from core.models import load_tokenizer
    from train import data, tokens

    tokenizer = load_tokenizer(s.model_path)
    records = data.phase_records(data.read_source(str(DATA)).records, "sft")
    kept = []
    for record in records:
        prompt, response = record["prompt"], record["response"]
        example, note = tokens.encode_chat(tokenizer, prompt, response, s.args.max_seq_len)
        # TRL tokenises the whole rendered chat, which ends with a newline after the end-of-turn
        # token that ours drops: that rendering must fit too, or TRL would cut the example.
        full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}],
                                             tokenize=True, return_dict=False)
        if example is not None and note is None and len(full) <= s.args.max_seq_len:
            kept.append({"prompt": prompt, "response": response})
    print(f"bench: {len(kept)} of {len(records)} SFT records of {DATA.name} fit "
          f"{s.args.max_seq_len} tokens whole; both systems train on exactly these", flush=True)
    return kept


def summary(system: str, times: list[float], rates: list[float], others: float) -> dict:
    timed, rated = times[WARMUP:], rates[WARMUP:]
    return {"system": system, "steps_timed": len(timed), "s_per_step": round(mean(timed), 3),
            "tokens_per_s": round(mean(rated), 1),
            "every_step": [{"s": round(t, 3), "tokens_per_s": round(r, 1)}  # warm-up included
                           for t, r in zip(times, rates)],
            "cpu_share_of_other_processes": others}


def main() -> None:
    s = setup(__doc__, default_steps=20)
    examples = shared_examples(s)
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        work = Path(tmp)
        ours_data = write_jsonl(work / "ours.jsonl", examples)
        trl_data = write_jsonl(work / "trl.jsonl", (
            {"prompt": e["prompt"], "completion": [{"role": "assistant", "content": e["response"]}]}
            for e in examples))
        rows, others = run_ours(s, "sft", work, ours_data)
        rows = [row for row in rows if "tokens_per_s" in row]
        ours = summary("ours", [r["step_time_s"] for r in rows], [r["tokens_per_s"] for r in rows],
                       others)
        peer, others = run_trl(s, "sft", "SFTTrainer", work, trl_data)
        trl = summary(f"TRL {peer['trl']}", peer["step_time_s"],
                      [n / t for n, t in zip(peer["tokens"], peer["step_time_s"])], others)
    report(s, "sft", ours, trl, peer, "tokens_per_s",
           f"batch {s.args.batch_size}, max length {s.args.max_seq_len}, {len(examples)} shared records",
           {"records": len(examples)})


if __name__ == "__main__":
    main()
