"""Command line: python -m serving --model PATH|default [--engine auto|mii|ds-inference|hf] [--port 8000] ...

Binds 127.0.0.1 unless --host says otherwise; the port is taken before the model loads, so a
port in use fails at once. Errors a user can cause (a missing model folder, pickled weights, a
port in use, an engine this machine cannot run) end in one `error:` line and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from serving.engines import ENGINES

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="checkpoint to serve: a folder (a run's final/ or ema/), a .gguf file, "
                             "a hub name, or 'default' (SmolLM2-135M-Instruct)")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="auto: DeepSpeed-MII on CUDA where installed, else ds-inference")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every /v1 route")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (only 1 for now)")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                        help="weights' precision; auto: bf16 where the hardware has it")
    parser.add_argument("--slots", type=int, default=16,
                        help="answers generated at once (continuous batching); n=k takes k")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests that may wait for a slot; beyond that: 429")
    parser.add_argument("--max-tokens-limit", type=int, default=1024,
                        help="the largest max_tokens a request may ask for")
    parser.add_argument("--max-prompt-tokens", type=int, default=2048,
                        help="the longest conversation accepted (after the chat template), "
                             "also capped by the model's context")
    # the deepspeed launcher passes --local_rank; LOCAL_RANK says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def check_numbers(args) -> str | None:
    """A message for the first option out of range, or None."""
    ranges = {"--port": (args.port, 0, 65535), "--tp": (args.tp, 1, 1024),
              "--slots": (args.slots, 1, 1024), "--max-queue": (args.max_queue, 0, 100_000),
              "--max-tokens-limit": (args.max_tokens_limit, 1, 1_000_000),
              "--max-prompt-tokens": (args.max_prompt_tokens, 1, 1_000_000)}
    for option, (value, low, high) in ranges.items():
        if not low <= value <= high:
            return f"{option} {value} is out of range: pass a number from {low} to {high}."
    return None


def quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    problem = check_numbers(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from serving.api import Limits, bind, create_app, uvicorn_server

    try:
        sock = bind(args.host, args.port)
    except OSError as err:
        print(f"error: cannot listen on {args.host}:{args.port} ({err.strerror or err}): stop the "
              "program using that port or pass --port with a free one.", file=sys.stderr)
        return 2
    from serving.engines import load_engine
    from serving.scheduler import Scheduler
    from train.models import ModelError

    quiet_libraries()
    max_len = args.max_prompt_tokens + args.max_tokens_limit

    def loader(model: str):
        return load_engine(model, args.engine, args.tp, args.slots, max_len, args.dtype)

    try:
        engine = loader(args.model)
    except ModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    print(f"serving {args.model} ({engine.name}, {engine.dtype}, {args.slots} slots, up to "
          f"{engine.max_len} tokens per conversation) on http://{args.host}:{port}/v1",
          file=sys.stderr, flush=True)
    if args.host not in LOOPBACK and args.api_key is None:
        print(f"warning: listening on {host} without --api-key: anyone who can reach this port "
              "can use the model and switch it.", file=sys.stderr, flush=True)
    limits = Limits(max_tokens=args.max_tokens_limit, max_prompt_tokens=args.max_prompt_tokens)
    scheduler = Scheduler(engine, args.max_queue, own_thread=False)
    server = uvicorn_server(create_app(scheduler, loader, limits, args.api_key))
    # HTTP on a thread, generation on the main thread (see Scheduler); Ctrl-C and SIGTERM reach
    # the main thread and end both
    web = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
    for stop_signal in (signal.SIGINT, signal.SIGTERM):  # also where the parent ignored SIGINT
        signal.signal(stop_signal, signal.default_int_handler)
    web.start()
    try:
        scheduler.run()  # returns when the app's shutdown stops the scheduler
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        web.join(timeout=10)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
