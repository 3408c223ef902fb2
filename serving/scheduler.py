"""Continuous batching: one background thread owns the slot decoder and serves every request.

The loop: admit waiting requests into free slots (one prefill for all newcomers; a request
with n choices takes n slots), then one decode step over every active slot, sampling each row
with its own request's settings (greedy at temperature 0, else temperature and top-p with the
request's own seeded generator). New requests thus join between the decode steps of those
already running; a choice that ends (end-of-turn token, max_tokens, a stop string) or whose
client went away frees its slot at once. Text goes to each request's asyncio queue through
`loop.call_soon_threadsafe`, decoded incrementally (serving/detokenizer.py: never half a
multi-byte character, never the start of a stop string that may still complete).

Admission is fair to small requests: a request that does not fit the free slots (say n=8
with 3 free) lets the smaller ones behind it in, but only `overtake_limit` of them (default:
the number of slots); after that nobody passes it, so the slots drain to it and it cannot
starve. A bounded queue: a request that would wait behind more than `max_queue` others is
refused (`QueueFull`).

Requests are isolated: an error while sampling or decoding the text of one request ends that
request alone (an "error" event); a prefill that fails is retried request by request, so only
the request that caused it fails. Only a failed decode step (the model itself) ends every
request in it.

Switching checkpoints (`swap`) stops admitting, lets the running requests finish, then swaps
between steps; waiting requests run on the new model. `shutdown(grace_s)` stops admitting
(`ShuttingDown`), ends the waiting requests, lets the running ones finish for up to `grace_s`
seconds, ends the rest with an error and returns from `run`.

Left out: prefix caching, chunked prefill (a long prompt's prefill delays the running decodes
by its own duration), preemption and priorities, re-tokenising queued prompts after a swap to a
model with another tokenizer.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque

import torch

from core.sampling import sample_tokens
from serving.detokenizer import AnswerText
from serving.request import SHUTDOWN_FAILURE, Failure, Request, failure_of

log = logging.getLogger("serving")


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its limit."""


class ShuttingDown(Exception):
    """The server is shutting down and admits no new request."""


def pick_admissible(waiting, free: int, overtake_limit: int) -> list[Request]:
    """The waiting requests to admit into `free` slots, in queue order: each one that fits,
    except that nobody passes a request already overtaken `overtake_limit` times."""
    taken = []
    for request in waiting:
        if free == 0:
            break
        if request.cancelled:
            continue
        if request.params.n <= free:
            taken.append(request)
            free -= request.params.n
        elif request.overtaken >= overtake_limit:
            break  # the slots drain to it: it cannot starve
    return taken


class Scheduler:
    """Owns the engine's slot decoder on one thread; `submit` requests from the event loop."""

    def __init__(self, engine, max_queue: int = 64, own_thread: bool = True,
                 overtake_limit: int | None = None):
        self.engine = engine
        self.max_queue = max_queue
        self.overtake_limit = engine.decoder.slots if overtake_limit is None else overtake_limit
        self.cond = threading.Condition()
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []
        self.free_slots = list(range(engine.decoder.slots))
        self.pending_swap: tuple | None = None  # (engine, threading.Event) until swapped
        self.stopping = False
        self.deadline: float | None = None  # set by `shutdown`: running requests end by then
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
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=30)

    @property
    def closing(self) -> bool:
        return self.stopping or self.deadline is not None

    def shutdown(self, grace_s: float) -> None:
        """Admit nothing more, end the waiting requests, give the running ones `grace_s`
        seconds to finish (a second call can only shorten it); `run` returns once none is left."""
        with self.cond:
            deadline = time.monotonic() + grace_s
            self.deadline = deadline if self.deadline is None else min(self.deadline, deadline)
            for request in self.waiting:
                request.push("error", SHUTDOWN_FAILURE)
            self.waiting.clear()
            self.cond.notify_all()

    def submit(self, request: Request) -> None:
        """Queue a request; raises QueueFull when it would wait behind `max_queue` others,
        ShuttingDown once `shutdown` was called."""
        with self.cond:
            if self.closing:
                raise ShuttingDown()
            if self._waiting_beyond_slots(request) > self.max_queue:
                raise QueueFull()
            self.waiting.append(request)
            self.cond.notify_all()

    def swap(self, engine) -> bool:
        """Serve `engine` from now on, once the running requests are done (blocks until then);
        False when the server shuts down first."""
        done = threading.Event()
        with self.cond:
            if self.closing:
                return False
            self.pending_swap = (engine, done)
            self.cond.notify_all()
        done.wait()
        return self.engine is engine

    def counts(self) -> tuple[int, int]:
        """(requests generating, requests waiting)."""
        with self.cond:
            return len(self.active), sum(not r.cancelled for r in self.waiting)

    def _admissible(self, waiting) -> list[Request]:
        if self.pending_swap is not None or self.closing:
            return []
        return pick_admissible(waiting, len(self.free_slots), self.overtake_limit)

    def _waiting_beyond_slots(self, newcomer: Request) -> int:
        """How many queued requests (newcomer included) would find no free slot now."""
        queue = [r for r in [*self.waiting, newcomer] if not r.cancelled]
        return len(queue) - len(self._admissible(queue))

    # ---- the scheduler thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._step():
                pass
        finally:
            self._end_all(SHUTDOWN_FAILURE)

    def _step(self) -> bool:
        """Admit, prefill and decode once; False once the loop should end."""
        with self.cond:
            while not self._has_work():
                self.cond.wait()
            if self.stopping or self._drained():
                return False
            self._swap_if_idle()
            newcomers = self._take_admissible()
        try:
            if newcomers:
                self._prefill_isolated(newcomers)
            self._drop_cancelled()
            if self.active:
                self._decode_step()
        except Exception as err:  # noqa: BLE001  (a bug must not end the server: fail and go on)
            log.exception("scheduler step failed")
            for request in list(self.active):
                self._fail(request, failure_of(err))
        return True

    def _has_work(self) -> bool:
        return bool(self.stopping or self.active or self.deadline is not None
                    or any(r.cancelled for r in self.waiting) or self._admissible(self.waiting)
                    or (self.pending_swap is not None and not self.active))

    def _drained(self) -> bool:
        """Shutting down and nothing left to run (requests past the deadline are ended here)."""
        if self.deadline is None:
            return False
        if self.active and time.monotonic() >= self.deadline:
            for request in list(self.active):
                self._fail(request, SHUTDOWN_FAILURE)
        return not self.active

    def _end_all(self, failure: Failure) -> None:
        """The loop ends: every request still here ends with `failure`; a pending swap gives up."""
        with self.cond:
            for request in [*self.active, *self.waiting]:
                self._fail(request, failure)
            self.waiting.clear()
            if self.pending_swap is not None:
                self.pending_swap[1].set()
                self.pending_swap = None

    def _swap_if_idle(self) -> None:
        if self.pending_swap is None or self.active:
            return
        engine, done = self.pending_swap
        self.engine, self.pending_swap = engine, None
        self.free_slots = list(range(engine.decoder.slots))
        done.set()

    def _take_admissible(self) -> list[Request]:
        """Pop the requests that fit in free slots (see `pick_admissible`); assign slots."""
        slots = self.engine.decoder.slots
        for request in [r for r in self.waiting if r.params.n > slots and not r.cancelled]:
            request.cancelled = True  # a smaller model was loaded since it was accepted
            request.push("error", Failure(f"n={request.params.n} needs more slots than the "
                                          f"model now loaded has ({slots}): ask for fewer "
                                          "choices.", 400, "too_many_choices"))
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        taken = self._admissible(self.waiting)
        taken_set, passed = set(taken), 0
        for request in reversed(self.waiting):  # count who was admitted from behind whom
            if request in taken_set:
                passed += 1
            else:
                request.overtaken += passed
        self.waiting = deque(r for r in self.waiting if r not in taken_set)
        for request in taken:
            request.model_name = self.engine.model_name
            request.push("start", request.model_name)
            for choice in request.choices:
                choice.slot = self.free_slots.pop()
                choice.answer = AnswerText(self.engine.detokenizer, request.params.stop)
        return taken

    def _prefill_isolated(self, newcomers: list[Request]) -> None:
        """One prefill for every newcomer; if it fails, one per request, so that only the
        request that makes it fail gets the error."""
        try:
            return self._prefill(newcomers)
        except Exception as err:  # noqa: BLE001  (a request's prompt must not fail the others)
            if len(newcomers) == 1:
                log.exception("prefill failed")
                return self._fail(newcomers[0], failure_of(err))
        for request in newcomers:
            if request in self.active:
                self.active.remove(request)  # restarted from its prompt below
            self._prefill_isolated([request])

    def _prefill(self, newcomers: list[Request]) -> None:
        rows, slot_ids, prompts = [], [], []
        for request in newcomers:
            if len(request.prompt_ids) + request.params.max_tokens > self.engine.max_len:
                self._fail(request, Failure("the prompt plus max_tokens no longer fits the model "
                                            "now loaded: send a shorter conversation or lower "
                                            "max_tokens.", 400, "context_length_exceeded"))
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
        try:
            logits = self.engine.decoder.decode(slot_ids, tokens)
        except Exception as err:  # noqa: BLE001  (the model failed: every request in the step ends)
            log.exception("decode step failed")
            for request in dict.fromkeys(r for r, _ in rows):
                self._fail(request, failure_of(err))
            return
        self._sample_and_advance(rows, logits)

    def _sample_and_advance(self, rows: list[tuple[Request, Choice]], logits: torch.Tensor) -> None:
        """Sample every row with its request's settings; rows of one request in one call; an
        error ends that request alone."""
        by_request: dict[Request, list[int]] = {}
        for index, (request, _) in enumerate(rows):
            by_request.setdefault(request, []).append(index)
        end_token = min(self.engine.end_token_ids)
        for request, indices in by_request.items():
            try:
                picked = torch.tensor(indices, device=logits.device)
                tokens = sample_tokens(logits.index_select(0, picked), request.sampling(end_token),
                                       request.generator(logits.device))
                for index, token in zip(indices, tokens.tolist()):
                    self._advance(request, rows[index][1], token)
            except Exception as err:  # noqa: BLE001  (one request's settings must not fail the others)
                log.exception("sampling failed for one request")
                self._fail(request, failure_of(err))

    def _advance(self, request: Request, choice: Choice, token: int) -> None:
        """Take one sampled token into a choice: end it, or extend its text and send what is final."""
        if token in self.engine.end_token_ids:
            return self._finish(request, choice, "stop")
        choice.token_ids.append(token)
        text, stopped = choice.answer.add(token)
        self._send(request, choice, text)
        if stopped:
            return self._finish(request, choice, "stop")
        if len(choice.token_ids) >= request.params.max_tokens:
            return self._finish(request, choice, "length")

    def _send(self, request: Request, choice: Choice, text: str) -> None:
        if request.stream and text:
            request.push("delta", choice.index, text)

    def _finish(self, request: Request, choice: Choice, reason: str) -> None:
        if not choice.answer.stopped:
            self._send(request, choice, choice.answer.finish())
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

    def _fail(self, request: Request, failure: Failure) -> None:
        self._release(request.choices)
        if request in self.active:
            self.active.remove(request)
        for choice in request.choices:
            choice.finish_reason = choice.finish_reason or "error"
        request.push("error", failure)
