"""Command line: python -m serving --model PATH|default [--engine auto|mii|ds-inference|hf] [--port 8000] ...

Binds 127.0.0.1 unless --host says otherwise; the port is taken before the model loads, so a
port in use fails at once. Errors a user can cause (a missing model folder, pickled weights, a
port in use, an engine this machine cannot run, an unreadable key file) end in one `error:`
line and exit code 2.

Connections are capped (--max-connections; beyond them 503), a request's headers must arrive
within --header-timeout seconds (10; else the connection is closed, idle ones too), its body
within --body-timeout seconds (30; else 408), and the soft limit on open files is raised to the
hard one at start, so a flood of slow or idle clients fails itself rather than every client.

The API key comes from --api-key, --api-key-file or the environment variable RLHF_API_KEY (in
that order; the flag is visible to every user in `ps`, the other two are not).

SIGTERM or Ctrl-C shut down gracefully: new requests get 503, waiting ones end with a 503
error, running answers may finish for --shutdown-grace seconds, then end with an error event
and `data: [DONE]` (streams) or a 503 (plain requests); the process exits 0. A second signal
ends the running answers at once.
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import stat
import sys
import threading
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")
API_KEY_VARIABLE = "RLHF_API_KEY"
MAX_KEY_FILE_BYTES = 64 * 1024
FILES_KEPT_BACK = 100  # open files left for the model, logs and the listening socket


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


def read_api_key(cfg, environ) -> str | None:
    """The API key from --api-key, --api-key-file or RLHF_API_KEY; None when there is none.
    A key an HTTP header cannot carry (control characters, NUL) is refused: no client could
    send it."""
    from core.options import ConfigError

    if cfg.api_key and cfg.api_key_file:
        raise ConfigError("--api-key and --api-key-file are both given: pass only one.")
    if cfg.api_key_file:
        key, where = key_from_file(Path(cfg.api_key_file).expanduser()), f"--api-key-file {cfg.api_key_file}"
    elif cfg.api_key:
        key, where = cfg.api_key, "--api-key"
    else:
        key, where = environ.get(API_KEY_VARIABLE, "").strip() or None, API_KEY_VARIABLE
    if key and any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ConfigError(f"the key in {where} holds a control character (such as NUL or a tab), "
                          "which no HTTP client can send in a header: use printable characters.")
    return key


def key_from_file(path: Path) -> str:
    """The first line of a key file, without the byte-order mark some editors write."""
    from core.options import ConfigError

    try:
        # lines end at \n only: splitlines() also cut at U+2028, form feeds and more, so a key
        # holding one silently became its first few characters
        lines = read_small_text(path, MAX_KEY_FILE_BYTES).removeprefix("\ufeff").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--api-key-file {path} cannot be read "
                          f"({getattr(err, 'strerror', None) or type(err).__name__}): pass a "
                          "readable text file whose first line is the key.") from None
    except ValueError as err:  # not a regular file, or too big for a key file
        raise ConfigError(f"--api-key-file {path} {err}: pass a text file whose first line is "
                          "the key.") from None
    if not lines or not lines[0].strip():
        raise ConfigError(f"--api-key-file {path} has no key on its first line: write the key there.")
    return lines[0].strip()


def read_small_text(path: Path, limit: int) -> str:
    """A regular file's text, opened without blocking (a FIFO would wait for a writer for ever)
    and read only up to `limit` bytes; ValueError says why another kind of file is refused."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("is not a regular file (a folder, device, FIFO or socket)")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"is over {limit // 1024} KB, too big for a key file")
    return data.decode("utf-8")


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (every connection costs
    one); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for wanted in (hard, 1 << 20):  # an unlimited hard limit cannot be the soft one on Linux
        if wanted == resource.RLIM_INFINITY or wanted <= soft:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            return wanted
        except (ValueError, OSError):
            pass
    return soft


def connection_limit(cfg, open_files: int) -> int:
    """--max-connections, or (0) room for every slot and queued request plus idle keep-alive
    connections; never more than the open files leave."""
    wanted = cfg.max_connections or cfg.slots + cfg.max_queue + 64
    return max(1, min(wanted, open_files - FILES_KEPT_BACK))


def main(argv=None) -> int:
    from core.errors import UserError
    from core.options import from_namespace
    from core.process import tune_process
    from serving.config import ServeConfig

    args = build_parser().parse_args(argv)
    tune_process()  # before torch allocates anything
    open_files = raise_open_files_limit()
    try:
        cfg = from_namespace(ServeConfig, args)
        api_key = read_api_key(cfg, os.environ)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from serving.api import Limits, bind, create_app, load_running, uvicorn_server

    try:
        sock = bind(cfg.host, cfg.port)
    except OSError as err:
        print(f"error: cannot listen on {cfg.host}:{cfg.port} ({err.strerror or err}): stop the "
              "program using that port or pass --port with a free one.", file=sys.stderr)
        return 2
    from core.paths import outside_roots, request_roots
    from serving.engines import EngineError, load_engine
    from serving.scheduler import Scheduler

    quiet_libraries()
    max_len = cfg.max_prompt_tokens + cfg.max_tokens_limit

    roots = request_roots(cfg.load_from)

    def loader(model: str, offline: bool = True):  # /v1/models/load never downloads
        if offline and outside_roots(model, roots):  # a request loads only what the operator named
            raise EngineError(f"{model} lies outside the folders this server loads from on request "
                              f"({', '.join(map(str, roots))}): start it with --load-from FOLDER, "
                              "or start a server with --model naming it.")
        return load_engine(model, cfg.engine, cfg.tp, cfg.slots, max_len, cfg.precision, offline)

    try:
        engine = loader(cfg.model, offline=False)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    print(f"serving {cfg.model} ({engine.name}, {engine.dtype}, {cfg.slots} slots, up to "
          f"{engine.max_len} tokens per conversation) on http://{cfg.host}:{port}/v1",
          file=sys.stderr, flush=True)
    if cfg.api_key:
        print("warning: --api-key is visible to every user of this machine in `ps`: pass "
              f"--api-key-file or set {API_KEY_VARIABLE} instead.", file=sys.stderr, flush=True)
    if cfg.host not in LOOPBACK and not api_key:
        print(f"warning: listening on {host} without an API key: anyone who can reach this port "
              "can use the model and switch it.", file=sys.stderr, flush=True)
    limits = Limits(max_tokens=cfg.max_tokens_limit, max_prompt_tokens=cfg.max_prompt_tokens)
    scheduler = Scheduler(engine, cfg.max_queue, own_thread=False)
    app = create_app(scheduler, loader, limits, api_key, max_body_bytes=int(cfg.max_body_mb * 2**20),
                     body_timeout_s=cfg.body_timeout)
    server = uvicorn_server(app, max_connections=connection_limit(cfg, open_files),
                            header_timeout_s=cfg.header_timeout)
    # HTTP on a thread, generation on the main thread (see Scheduler); SIGINT and SIGTERM reach
    # the main thread and start the graceful shutdown (also where the parent ignored SIGINT)
    web = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
    install_shutdown_handlers(scheduler, cfg.shutdown_grace)
    web.start()
    try:
        scheduler.run()  # returns once shut down (or when the app's shutdown stops it)
    finally:
        server.should_exit = True  # uvicorn sends the last events, then closes
        web.join(timeout=30)
    if load_running():
        # an abandoned load is inside torch: were Python to finalise around it, the thread would
        # be unwound through C++ frames that cannot be (std::terminate, exit code 134)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def install_shutdown_handlers(scheduler, grace_s: float) -> None:
    """SIGINT and SIGTERM shut `scheduler` down with `grace_s` seconds; a second one with none."""
    signals_seen = []

    def on_signal(signum, _frame):
        grace = grace_s if not signals_seen else 0.0
        signals_seen.append(signum)
        print(f"{signal.Signals(signum).name}: shutting down, admitting no new requests; running "
              f"answers may finish for {grace:g} s (a second signal ends them now).",
              file=sys.stderr, flush=True)
        # from a thread of its own: the handler runs on the main thread, possibly in the middle
        # of the scheduler's own step
        threading.Thread(target=scheduler.shutdown, args=(grace,), daemon=True).start()

    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, on_signal)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
