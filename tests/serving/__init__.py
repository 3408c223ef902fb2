"""Helpers of the serving tests: a real server (uvicorn on a free loopback port, in a background
thread of the test process) around an engine the test loaded, and an `openai` client for it."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import replace


@contextmanager
def running_server(engine, loader=None, max_queue: int = 64, api_key: str | None = None, limits=None):
    """Serve `engine` until the block ends; yields the base URL (http://127.0.0.1:PORT)."""
    from serving.api import bind, create_app, uvicorn_server
    from serving.scheduler import Scheduler

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    app = create_app(Scheduler(engine, max_queue), loader or (lambda name: engine), limits, api_key)
    server = uvicorn_server(app, log_level="warning")
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
