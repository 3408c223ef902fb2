"""Helpers of the serving tests: a real server (uvicorn on a free loopback port, in a background
thread of the test process) around an engine the test loaded, an `openai` client for it, and
engines whose behaviour a test controls: a slowed decoder, a scripted decoder (its greedy
answer is a token list the test chose, with the real tokenizer), a tokenizer that waits."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import replace

import torch


@contextmanager
def running_server(engine, loader=None, max_queue: int = 64, api_key: str | None = None, limits=None,
                   max_connections: int | None = None, header_timeout_s: float | None = None,
                   **app_options):
    """Serve `engine` until the block ends; yields the base URL (http://127.0.0.1:PORT).
    `header_timeout_s`: the server's header timeout (None: its default)."""
    from serving.api import bind, create_app, uvicorn_server
    from serving.scheduler import Scheduler

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    app = create_app(Scheduler(engine, max_queue), loader or (lambda name: engine), limits, api_key,
                     **app_options)
    timeouts = {} if header_timeout_s is None else {"header_timeout_s": header_timeout_s}
    server = uvicorn_server(app, log_level="warning", max_connections=max_connections, **timeouts)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the test server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def openai_client(url: str, api_key: str = "unused"):
    """The official client, without its automatic retries (a test must see a 429 as it is)."""
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=300)


class SlowDecoder:
    """A slot decoder that sleeps before each decode step: keeps requests running long enough
    for a test to fill the queue or hang up mid-answer."""

    def __init__(self, decoder, delay_s: float):
        self.decoder, self.delay_s = decoder, delay_s
        self.slots, self.max_len = decoder.slots, decoder.max_len

    def prefill(self, slot_ids, prompts):
        return self.decoder.prefill(slot_ids, prompts)

    def decode(self, slot_ids, tokens):
        time.sleep(self.delay_s)
        return self.decoder.decode(slot_ids, tokens)

    def length(self, slot_id):
        return self.decoder.length(slot_id)


def slowed(engine, delay_s: float = 0.02):
    return replace(engine, decoder=SlowDecoder(engine.decoder, delay_s))


class ScriptedDecoder:
    """A slot decoder whose every answer is chosen by the test: `answer(prompt_ids)` gives the
    answer's token ids (it may raise, as a prefill that fails would), then the end token. The
    chosen token gets a logit of 100, so greedy and sampled answers alike follow the script."""

    def __init__(self, answer, vocab_size: int, end_token: int, slots: int = 4,
                 max_len: int = 1024, delay_s: float = 0.0):
        self.answer, self.vocab_size, self.end_token = answer, vocab_size, end_token
        self.slots, self.max_len, self.delay_s = slots, max_len, delay_s
        self.scripts: dict[int, list[int]] = {}  # slot -> its answer, then the end token
        self.steps: dict[int, int] = {}          # slot -> tokens decoded since its prefill
        self.lengths: dict[int, int] = {}

    def prefill(self, slot_ids, prompts):
        scripts = [[*self.answer(list(prompt)), self.end_token] for prompt in prompts]
        for slot, prompt, script in zip(slot_ids, prompts, scripts):
            self.scripts[slot], self.steps[slot], self.lengths[slot] = script, 0, len(prompt)
        return self._logits(slot_ids)

    def decode(self, slot_ids, tokens):
        time.sleep(self.delay_s)
        for slot in slot_ids:
            self.steps[slot] += 1
            self.lengths[slot] += 1
        return self._logits(slot_ids)

    def length(self, slot_id):
        return self.lengths[slot_id]

    def _logits(self, slot_ids) -> torch.Tensor:
        logits = torch.zeros(len(slot_ids), self.vocab_size)  # (rows, V)
        for row, slot in enumerate(slot_ids):
            script = self.scripts[slot]
            logits[row, script[min(self.steps[slot], len(script) - 1)]] = 100.0
        return logits


def scripted_engine(tokenizer, answer, slots: int = 4, delay_s: float = 0.0, name: str = "scripted"):
    """An engine over a ScriptedDecoder and a real tokenizer (the tiny model's: SmolLM2's)."""
    from serving.engines import Engine

    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    decoder = ScriptedDecoder(answer, len(tokenizer), end, slots=slots, delay_s=delay_s)
    return Engine("scripted", name, name, tokenizer, decoder, {end, tokenizer.eos_token_id})


class GatedTokenizer:
    """The engine's tokenizer, except that encoding a rendered conversation containing `marker`
    waits until the test opens `gate` (a prompt that takes as long as the test wants)."""

    def __init__(self, tokenizer, marker: str):
        self.tokenizer, self.marker = tokenizer, marker
        self.gate, self.waiting = threading.Event(), threading.Event()

    def __call__(self, text, *args, **kwargs):  # encoding the rendered conversation
        if self.marker in text:
            self.waiting.set()
            assert self.gate.wait(timeout=120), "the test never opened the gate"
        return self.tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)
