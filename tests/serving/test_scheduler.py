"""The scheduler's own rules, on a scripted decoder with the real tokenizer (tests/serving):
admission (fair to small requests, bounded for large ones, the bounded queue), slots freed by
cancellation, n choices, stop strings, errors that end one request alone, model swaps and the
graceful shutdown."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from core.models import load_tokenizer
from serving.request import Params, Request
from serving.scheduler import QueueFull, Scheduler, ShuttingDown, pick_admissible
from tests.serving import scripted_engine

ANSWERS = {1: "Hello 🌍 world, 世界! The end.", 2: "Second answer, shorter.", 3: "x " * 300}


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


def engine_for(tokenizer, slots=4, delay_s=0.0, name="scripted", prefix=""):
    """Prompt [k, ...] is answered ANSWERS[k] (prefixed); prompt [0, ...] fails its prefill."""
    def answer(prompt):
        if prompt[0] == 0:
            raise RuntimeError("this prompt breaks the model")
        return tokenizer.encode(prefix + ANSWERS[prompt[0]], add_special_tokens=False)
    return scripted_engine(tokenizer, answer, slots=slots, delay_s=delay_s, name=name)


async def events_of(request: Request, timeout_s: float = 60) -> list[tuple]:
    """Every event of `request` up to its "done" or "error"."""
    events = []
    while not events or events[-1][0] not in ("done", "error"):
        events.append(await asyncio.wait_for(request.events.get(), timeout_s))
    return events


def first(tokenizer, key: int, count: int) -> str:
    """The text of the first `count` tokens of ANSWERS[key]."""
    return tokenizer.decode(tokenizer.encode(ANSWERS[key], add_special_tokens=False)[:count])


def text_of(events: list[tuple], index: int = 0) -> str:
    return "".join(e[2] for e in events if e[0] == "delta" and e[1] == index)


def run(scheduler: Scheduler, body):
    """Run `body(new_request)` (a coroutine function) with the scheduler's thread started."""
    async def main():
        loop = asyncio.get_running_loop()

        def new(key=1, **params):
            params = {"max_tokens": 500, "temperature": 0.0, **params}
            return Request([key, 7, 7], Params(**params), loop)
        scheduler.start()
        try:
            return await body(new)
        finally:
            scheduler.stop()
    return asyncio.run(main())


def test_answers_stream_whole_characters_and_stop_at_a_stop_string(tokenizer):
    async def body(new):
        plain, stopped, n3 = new(1), new(1, stop=["世界", "never"]), new(2, n=3, temperature=1.0)
        for request in (plain, stopped, n3):
            scheduler.submit(request)
        plain_events, stop_events, n3_events = [await events_of(r) for r in (plain, stopped, n3)]
        assert text_of(plain_events) == ANSWERS[1] and "\ufffd" not in "".join(
            e[2] for e in plain_events if e[0] == "delta")
        assert plain_events[0] == ("start", "scripted") and plain_events[-2] == ("finish", 0, "stop")
        assert text_of(stop_events) == "Hello 🌍 world, " and stop_events[-2] == ("finish", 0, "stop")
        assert [text_of(n3_events, i) for i in range(3)] == [ANSWERS[2]] * 3
        assert sorted(e[1] for e in n3_events if e[0] == "finish") == [0, 1, 2]
        usage = n3_events[-1][1]
        assert usage["completion_tokens"] == 3 * len(tokenizer.encode(ANSWERS[2]))
        assert sorted(scheduler.free_slots) == [0, 1, 2, 3]

    scheduler = Scheduler(engine_for(tokenizer))
    run(scheduler, body)


def test_max_tokens_ends_with_length(tokenizer):
    async def body(new):
        request = new(1, max_tokens=3)
        scheduler.submit(request)
        events = await events_of(request)
        assert events[-2] == ("finish", 0, "length") and events[-1][1]["completion_tokens"] == 3
        assert text_of(events) == tokenizer.decode(tokenizer.encode(ANSWERS[1])[:3])

    scheduler = Scheduler(engine_for(tokenizer))
    run(scheduler, body)


def test_cancelled_request_frees_its_slots_for_the_queue(tokenizer):
    async def body(new):
        long = new(3, n=4)                 # takes every slot, ~300 steps at 10 ms
        waiting = new(2)
        scheduler.submit(long)
        scheduler.submit(waiting)
        assert (await long.events.get())[0] == "start"
        await asyncio.sleep(0.1)
        assert scheduler.counts() == (1, 1)
        long.cancelled = True              # its client went away
        events = await events_of(waiting)
        assert text_of(events) == ANSWERS[2]
        assert not any(choice.finish_reason for choice in long.choices)  # it was not waited for

    scheduler = Scheduler(engine_for(tokenizer, delay_s=0.01))
    run(scheduler, body)


def fake_request(n: int, overtaken: int = 0):
    return SimpleNamespace(params=SimpleNamespace(n=n), cancelled=False, overtaken=overtaken)


def test_small_requests_pass_a_large_one_a_bounded_number_of_times():
    large, small, other = fake_request(4), fake_request(1), fake_request(2)
    assert pick_admissible([large, small, other], free=3, overtake_limit=2) == [small, other]
    large.overtaken = 2  # passed twice already: the slots now drain to it
    assert pick_admissible([large, small, other], free=3, overtake_limit=2) == []
    assert pick_admissible([large, small], free=4, overtake_limit=2) == [large]


def test_a_large_request_waits_for_slots_without_starving(tokenizer):
    """3 of 4 slots busy: an n=4 request waits, n=1 requests behind it run in the free slot,
    but only `overtake_limit` of them: then the n=4 request gets the slots next."""
    async def body(new):
        busy = [new(3) for _ in range(3)]
        for request in busy:
            scheduler.submit(request)
        for request in busy:
            assert (await request.events.get())[0] == "start"
        large = new(2, n=4)
        small = [new(2) for _ in range(3)]
        for request in [large, *small]:
            scheduler.submit(request)
        first, second = await events_of(small[0], 5), await events_of(small[1], 5)
        assert text_of(first) == text_of(second) == ANSWERS[2]
        assert large.overtaken == 2 and small[2].events.empty()  # the third waits behind it
        for request in busy:
            request.cancelled = True
        large_events, third = await events_of(large, 5), await events_of(small[2], 5)
        assert [text_of(large_events, i) for i in range(4)] == [ANSWERS[2]] * 4
        assert text_of(third) == ANSWERS[2]

    scheduler = Scheduler(engine_for(tokenizer, delay_s=0.01), overtake_limit=2)
    run(scheduler, body)


def test_queue_beyond_free_slots_is_refused():
    loop = asyncio.new_event_loop()
    try:
        engine = SimpleNamespace(decoder=SimpleNamespace(slots=2, max_len=64))
        scheduler = Scheduler(engine, max_queue=1)  # not started: nothing admits
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


def test_errors_end_only_the_request_that_caused_them(tokenizer):
    """A seed the generator cannot take (sampling fails) and a prompt whose prefill fails,
    admitted in the same steps as good requests: only they end, with an error."""
    async def body(new):
        good = [new(1), new(2, temperature=1.0, seed=5), new(1)]
        bad_seed, bad_prompt = new(2, temperature=1.0, seed=2**64), new(0)
        for request in [good[0], bad_seed, good[1], bad_prompt, good[2]]:
            scheduler.submit(request)
        for request in (bad_seed, bad_prompt):
            failure = (await events_of(request))[-1]
            assert failure[0] == "error" and failure[1].status == 500
        for request, key in zip(good, (1, 2, 1)):
            assert text_of(await events_of(request)) == ANSWERS[key]
        assert sorted(scheduler.free_slots) == [0, 1, 2, 3]

    scheduler = Scheduler(engine_for(tokenizer, slots=4))
    run(scheduler, body)


def test_swap_lets_running_requests_finish_and_runs_the_queue_on_the_new_model(tokenizer):
    new_engine = engine_for(tokenizer, name="new", prefix="New: ")

    async def body(new):
        running = [new(3, n=2, max_tokens=60), new(3, n=2, max_tokens=60)]  # 0.6 s each
        queued = [new(1), new(2)]
        for request in [*running, *queued]:
            scheduler.submit(request)
        for request in running:
            assert (await request.events.get()) == ("start", "scripted")
        swapped = asyncio.get_running_loop().run_in_executor(None, scheduler.swap, new_engine)
        for request in running:
            events = await events_of(request)
            assert events[-2] == ("finish", 1, "length") and text_of(events, 1) == first(tokenizer, 3, 60)
        assert await swapped
        for request, key in zip(queued, (1, 2)):
            events = await events_of(request)
            assert events[0] == ("start", "new") and text_of(events) == "New: " + ANSWERS[key]

    scheduler = Scheduler(engine_for(tokenizer, delay_s=0.01))
    run(scheduler, body)


def test_shutdown_ends_the_queue_lets_answers_finish_then_ends_the_rest(tokenizer):
    async def body(new):
        short, long, queued = new(3, n=2, max_tokens=10), new(3, n=2), new(1)
        for request in (short, long, queued):
            scheduler.submit(request)
        assert (await short.events.get())[0] == "start"
        scheduler.shutdown(grace_s=2.0)
        with pytest.raises(ShuttingDown):
            scheduler.submit(new(1))
        assert (await events_of(queued))[-1][1].status == 503
        short_events = await events_of(short)                         # finished within the grace
        assert short_events[-2] == ("finish", 1, "length")
        assert text_of(short_events) == first(tokenizer, 3, 10)
        long_events = await events_of(long)                           # 300 steps, >= 3 s: cut at 2 s
        assert long_events[-1][0] == "error" and long_events[-1][1].status == 503
        assert 0 < len(text_of(long_events)) < len(ANSWERS[3])
        scheduler.thread.join(timeout=5)
        assert not scheduler.thread.is_alive()  # the loop ended by itself

    scheduler = Scheduler(engine_for(tokenizer, delay_s=0.01))
    run(scheduler, body)
