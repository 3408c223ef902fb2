"""The server's options, declared like every stage's (core/options.py): one definition gives the
command-line flag, its default, help text and allowed range. The API key may also come from
the environment variable RLHF_API_KEY (read by __main__.py, as the flag would be)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from core.hardware import PRECISIONS
from core.options import ConfigError, opt, validate

ENGINES = ("auto", "mii", "ds-inference", "hf")


@dataclass
class ServeConfig:
    """Serve a checkpoint behind the OpenAI Chat Completions API."""

    model: str = opt("default", "checkpoint to serve: a folder (a run's final/ or ema/), a .gguf "
                                "file, a hub name, or 'default' (SmolLM2-135M-Instruct); "
                                "/v1/models/load takes hub names from the local cache only")
    engine: str = opt("auto", "auto: DeepSpeed-MII on CUDA where installed, else ds-inference",
                      choices=ENGINES)
    host: str = opt("127.0.0.1", "address to bind")
    port: int = opt(8000, "port to bind (0: any free port)", range=(0, 65535))
    api_key: str = opt("", "require 'Authorization: Bearer KEY' on every /v1 route (a flag shows "
                           "in `ps`: prefer --api-key-file or the RLHF_API_KEY variable)")
    api_key_file: str = opt("", "read the API key from this file (its first line)")
    tp: int = opt(1, "tensor-parallel degree (only 1 for now)", range=(1, 1024))
    precision: str = opt("auto", "weights' precision; auto: bf16 where the hardware computes it "
                                 "natively, else fp32", choices=PRECISIONS)
    slots: int = opt(16, "answers generated at once (continuous batching); n=k takes k",
                     range=(1, 1024))
    max_queue: int = opt(64, "requests that may wait for a slot; beyond that: 429", range=(0, 100_000))
    max_tokens_limit: int = opt(1024, "the largest max_tokens a request may ask for",
                                range=(1, 1_000_000))
    max_prompt_tokens: int = opt(2048, "the longest conversation accepted (after the chat "
                                       "template), also capped by the model's context",
                                 range=(1, 1_000_000))
    max_body_mb: float = opt(4.0, "the largest request body accepted, in MiB; larger ones get 413 "
                                  "before they are read", range=(0.01, 1024))
    body_timeout: float = opt(30.0, "seconds a request's body may take to arrive after its "
                                    "headers; a slower one gets 408 and its connection is closed",
                              range=(0.1, 3600))
    header_timeout: float = opt(10.0, "seconds a connection may take to send a whole request's "
                                      "headers, after it opens or after its previous answer; a "
                                      "slower or idle one is closed (408 if it sent part of them)",
                                range=(0.1, 3600))
    max_connections: int = opt(0, "open connections served at once; beyond them a new request "
                                  "gets 503 (0: slots + max_queue + 64, within the process's "
                                  "open-files limit)", range=(0, 1_000_000))
    load_from: list[str] = opt([], "folders besides the runs folder and $RLHF_HOME/models whose "
                                   "models /v1/models/load may load (--model may name any)")
    shutdown_grace: float = opt(30.0, "seconds running answers may take to finish after SIGTERM "
                                      "or Ctrl-C; then they end with an error", range=(0, 3600))
    # renamed: old name -> (type, value -> new options)
    RENAMED: ClassVar[dict] = {"dtype": (str, lambda value: {"precision": value})}

    def __post_init__(self):
        validate(self)
        for folder in self.load_from:
            if not folder.strip():  # Path("") is the working directory: every folder under it
                raise ConfigError("--load-from is empty (an unset shell variable?): name a folder of "
                                  "models, or leave --load-from out.")
            if not Path(folder).expanduser().is_dir():
                raise ConfigError(f"--load-from {folder} is not a folder (it does not exist?): name "
                                  "an existing folder of models, or leave --load-from out.")
