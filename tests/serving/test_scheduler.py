"""The scheduler's own rules: what text is safe to stream, and when the queue is full."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from serving.scheduler import Params, QueueFull, Request, Scheduler, stable_length


@pytest.mark.parametrize("text, stops, expected", [
    ("Hello wor", [], 9),
    ("caf\ufffd", [], 3),                 # half a multi-byte character waits for the rest
    ("The answer is 4", ["\n\n"], 15),
    ("The answer\n", ["\n\n"], 10),       # may become the stop string: held back
    ("one, two, th", ["three"], 10),
    ("one, two, tx", ["three"], 12),
])
def test_only_stable_text_is_streamed(text, stops, expected):
    assert stable_length(text, stops) == expected


def fake_engine(slots: int):
    return SimpleNamespace(decoder=SimpleNamespace(slots=slots, max_len=64))


def test_requests_beyond_free_slots_and_queue_are_refused():
    loop = asyncio.new_event_loop()
    try:
        scheduler = Scheduler(fake_engine(slots=2), max_queue=1)  # not started: nothing admits
        new = lambda n=1: Request([1, 2, 3], Params(max_tokens=4, n=n), loop)  # noqa: E731
        scheduler.submit(new(n=2))      # takes both slots
        waiting = new()
        scheduler.submit(waiting)       # the one allowed to wait
        with pytest.raises(QueueFull):
            scheduler.submit(new())
        waiting.cancelled = True        # its client went away: room again
        scheduler.submit(new())
        assert scheduler.counts() == (0, 2)
    finally:
        loop.close()
