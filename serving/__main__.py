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

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    from core.options import add_arguments
    from serving.config import ServeConfig

    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, ServeConfig)
    return parser


def quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def main(argv=None) -> int:
    from core.errors import UserError
    from core.options import from_namespace
    from core.process import tune_process
    from serving.config import ServeConfig

    args = build_parser().parse_args(argv)
    tune_process()  # before torch allocates anything
    try:
        cfg = from_namespace(ServeConfig, args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from serving.api import Limits, bind, create_app, uvicorn_server

    try:
        sock = bind(cfg.host, cfg.port)
    except OSError as err:
        print(f"error: cannot listen on {cfg.host}:{cfg.port} ({err.strerror or err}): stop the "
              "program using that port or pass --port with a free one.", file=sys.stderr)
        return 2
    from serving.engines import load_engine
    from serving.scheduler import Scheduler

    quiet_libraries()
    max_len = cfg.max_prompt_tokens + cfg.max_tokens_limit

    def loader(model: str):
        return load_engine(model, cfg.engine, cfg.tp, cfg.slots, max_len, cfg.precision)

    try:
        engine = loader(cfg.model)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    print(f"serving {cfg.model} ({engine.name}, {engine.dtype}, {cfg.slots} slots, up to "
          f"{engine.max_len} tokens per conversation) on http://{cfg.host}:{port}/v1",
          file=sys.stderr, flush=True)
    if cfg.host not in LOOPBACK and not cfg.api_key:
        print(f"warning: listening on {host} without --api-key: anyone who can reach this port "
              "can use the model and switch it.", file=sys.stderr, flush=True)
    limits = Limits(max_tokens=cfg.max_tokens_limit, max_prompt_tokens=cfg.max_prompt_tokens)
    scheduler = Scheduler(engine, cfg.max_queue, own_thread=False)
    server = uvicorn_server(create_app(scheduler, loader, limits, cfg.api_key or None))
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
