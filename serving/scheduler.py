"""Continuous batching: one background thread owns the slot decoder and serves every request.

The loop: admit waiting requests into free slots (one prefill for all newcomers; a request
with n choices takes n slots), then one decode step over every active slot, sampling each row
with its own request's settings (greedy at temperature 0, else temperature and top-p with the
request's own seeded generator). New requests thus join between the decode steps of those
already running; a choice that ends (end-of-turn token, max_tokens, a stop string) or whose
client went away frees its slot at once. Text goes to each request's asyncio queue through
`loop.call_soon_threadsafe`, decoded incrementally: the whole answer so far is decoded and only
its stable new suffix is sent (never half a multi-byte character, never the start of a stop
string that may still complete).

A bounded queue: a request that would wait behind more than `max_queue` others is refused
(`QueueFull`). Switching checkpoints (`swap`) stops admitting, lets the running requests
finish, then swaps between steps; waiting requests run on the new model.

Left out: prefix caching, chunked prefill (a long prompt's prefill delays the running decodes
by its own duration), preemption and priorities, re-tokenising queued prompts after a swap to a
model with another tokenizer.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from core.sampling import Sampling, sample_tokens

log = logging.getLogger("serving")


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its limit."""


@dataclass
class Params:
    """One request's generation settings (validated by the API)."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Choice:
    index: int
    slot: int | None = None
    token_ids: list[int] = field(default_factory=list)  # generated, end-of-turn token excluded
    text: str = ""                                        # decoded, trimmed at a stop string
    sent: int = 0                                         # characters of `text` already pushed
    finish_reason: str | None = None                      # "stop" or "length" once done


class Request:
    """A chat completion in flight. The scheduler pushes events to `events`, in order:
    ("delta", index, text) (streamed requests only) and ("finish", index, reason) per choice,
    then ("done", usage); or ("error", message) when generation failed."""

    def __init__(self, prompt_ids: list[int], params: Params, loop: asyncio.AbstractEventLoop,
                 stream: bool = True):
        self.prompt_ids = prompt_ids
        self.params = params
        self.loop = loop
        self.stream = stream  # False: no "delta" events (the text is read from `choices` at the end)
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set by the API when the client goes away
        self.choices = [Choice(i) for i in range(params.n)]
        self._generator: torch.Generator | None = None

    def push(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the client's event loop is gone
            self.cancelled = True

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The request's own random stream (seeded from `seed` when given); None for greedy."""
        if self.params.temperature == 0:
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            if self.params.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.params.seed)
        return self._generator

    def sampling(self, end_token: int) -> Sampling:
        p = self.params
        return Sampling(max_new_tokens=p.max_tokens, temperature=p.temperature or 1.0,
                        top_p=p.top_p, eos_token_id=end_token, pad_token_id=end_token,
                        greedy=p.temperature == 0)

    def usage(self) -> dict:
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": completion,
                "total_tokens": len(self.prompt_ids) + completion}


def stable_length(text: str, stops: list[str]) -> int:
    """How much of a growing answer can be sent now: not a trailing partial character (decoded
    as U+FFFD) and not a tail that could be the start of a stop string."""
    end = len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end -= k
                break
    return end


class Scheduler:
    """Owns the engine's slot decoder on one thread; `submit` requests from the event loop."""

    def __init__(self, engine, max_queue: int = 64, own_thread: bool = True):
        self.engine = engine
        self.max_queue = max_queue
        self.cond = threading.Condition()
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []
        self.free_slots = list(range(engine.decoder.slots))
        self.pending_swap: tuple | None = None  # (engine, threading.Event) until swapped
        self.stopping = False
        self.device: torch.device | None = None
        # the command line runs the loop on the main thread instead (`run`): decoding on another
        # thread was twice as slow here (a second OpenMP team beside the main thread's)
        self.thread = threading.Thread(target=self._run, name="scheduler", daemon=True) if own_thread else None

    # ---- the API's side -----------------------------------------------------------------------

    def start(self) -> None:
        if self.thread is not None:
            self.thread.start()

    def run(self) -> None:
        """Serve on the calling thread until `stop` (a scheduler made with own_thread=False)."""
        self._run()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        """Queue a request; raises QueueFull when it would wait behind `max_queue` others."""
        with self.cond:
            if self._waiting_beyond_slots(request) > self.max_queue:
                raise QueueFull()
            self.waiting.append(request)
            self.cond.notify_all()

    def swap(self, engine) -> None:
        """Serve `engine` from now on, once the running requests are done (blocks until then)."""
        done = threading.Event()
        with self.cond:
            self.pending_swap = (engine, done)
            self.cond.notify_all()
        done.wait()

    def counts(self) -> tuple[int, int]:
        """(requests generating, requests waiting)."""
        with self.cond:
            return len(self.active), sum(not r.cancelled for r in self.waiting)

    def _waiting_beyond_slots(self, newcomer: Request) -> int:
        """How many queued requests (newcomer included) would find no free slot (FIFO order)."""
        free, beyond = len(self.free_slots), 0
        for request in [*self.waiting, newcomer]:
            if request.cancelled:
                continue
            if beyond == 0 and request.params.n <= free and self.pending_swap is None:
                free -= request.params.n
            else:
                beyond += 1
        return beyond

    # ---- the scheduler thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self._has_work():
                    self.cond.wait()
                if self.stopping:
                    return
                self._swap_if_idle()
                newcomers = self._take_admissible()
            try:
                if newcomers:
                    self._prefill(newcomers)
                self._drop_cancelled()
                if self.active:
                    self._decode_step()
            except Exception as err:  # noqa: BLE001  (one bad step must not end the server)
                log.exception("generation failed")
                self._fail_active(f"generation failed on the server ({type(err).__name__}: {err}).")

    def _has_work(self) -> bool:
        admissible = (self.waiting and self.pending_swap is None
                      and (self.waiting[0].cancelled or self.waiting[0].params.n <= len(self.free_slots)))
        return bool(self.stopping or self.active or admissible
                     or (self.pending_swap is not None and not self.active))

    def _swap_if_idle(self) -> None:
        if self.pending_swap is None or self.active:
            return
        engine, done = self.pending_swap
        self.engine, self.pending_swap = engine, None
        self.free_slots = list(range(engine.decoder.slots))
        done.set()

    def _take_admissible(self) -> list[Request]:
        """Pop the requests at the head of the queue that fit in free slots; assign slots."""
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        taken = []
        while (self.waiting and self.pending_swap is None
               and self.waiting[0].params.n <= len(self.free_slots)):
            request = self.waiting.popleft()
            for choice in request.choices:
                choice.slot = self.free_slots.pop()
            taken.append(request)
        return taken

    def _prefill(self, newcomers: list[Request]) -> None:
        rows, slot_ids, prompts = [], [], []
        for request in newcomers:
            if len(request.prompt_ids) + request.params.max_tokens > self.engine.max_len:
                self._fail(request, "the prompt plus max_tokens no longer fits the model now "
                                    "loaded: send a shorter conversation or lower max_tokens.")
                continue
            for choice in request.choices:
                rows.append((request, choice))
                slot_ids.append(choice.slot)
                prompts.append(request.prompt_ids)
        if not rows:
            return
        self.active.extend(dict.fromkeys(request for request, _ in rows))
        logits = self.engine.decoder.prefill(slot_ids, prompts)
        self.device = logits.device
        self._sample_and_advance(rows, logits)

    def _decode_step(self) -> None:
        rows = [(r, c) for r in self.active for c in r.choices if c.finish_reason is None]
        if not rows:
            return
        slot_ids = [choice.slot for _, choice in rows]
        tokens = torch.tensor([choice.token_ids[-1] for _, choice in rows], device=self.device)
        logits = self.engine.decoder.decode(slot_ids, tokens)
        self._sample_and_advance(rows, logits)

    def _sample_and_advance(self, rows: list[tuple[Request, Choice]], logits: torch.Tensor) -> None:
        """Sample every row with its request's settings; rows of one request in one call."""
        by_request: dict[Request, list[int]] = {}
        for index, (request, _) in enumerate(rows):
            by_request.setdefault(request, []).append(index)
        end_token = min(self.engine.end_token_ids)
        for request, indices in by_request.items():
            picked = torch.tensor(indices, device=logits.device)
            tokens = sample_tokens(logits.index_select(0, picked), request.sampling(end_token),
                                   request.generator(logits.device))
            for index, token in zip(indices, tokens.tolist()):
                self._advance(request, rows[index][1], token)

    def _advance(self, request: Request, choice: Choice, token: int) -> None:
        """Take one sampled token into a choice: end it, or extend its text and send what is stable."""
        if token in self.engine.end_token_ids:
            return self._finish(request, choice, "stop")
        choice.token_ids.append(token)
        with_token = self.engine.decode(choice.token_ids)
        stops = request.params.stop
        hits = [with_token.find(stop) for stop in stops if stop in with_token]
        if hits:
            choice.text = with_token[:min(hits)]
            return self._finish(request, choice, "stop")
        choice.text = with_token
        if len(choice.token_ids) >= request.params.max_tokens:
            return self._finish(request, choice, "length")
        self._send(request, choice, stable_length(choice.text, stops))

    def _send(self, request: Request, choice: Choice, upto: int) -> None:
        if request.stream and upto > choice.sent:
            request.push("delta", choice.index, choice.text[choice.sent:upto])
            choice.sent = upto

    def _finish(self, request: Request, choice: Choice, reason: str) -> None:
        self._send(request, choice, len(choice.text))
        choice.finish_reason = reason
        self._release([choice])
        request.push("finish", choice.index, reason)
        if all(c.finish_reason for c in request.choices):
            self.active.remove(request)
            request.push("done", request.usage())

    def _release(self, choices: list[Choice]) -> None:
        with self.cond:
            for choice in choices:
                if choice.slot is not None:
                    self.free_slots.append(choice.slot)
                    choice.slot = None

    def _drop_cancelled(self) -> None:
        for request in [r for r in self.active if r.cancelled]:
            self._release(request.choices)
            self.active.remove(request)

    def _fail(self, request: Request, message: str) -> None:
        self._release(request.choices)
        if request in self.active:
            self.active.remove(request)
        request.push("error", message)

    def _fail_active(self, message: str) -> None:
        for request in list(self.active):
            self._fail(request, message)
