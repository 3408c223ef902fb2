"""The OpenAI-compatible API on the tiny random model, through the official `openai` client:
answer and stream shapes, usage, n, seeds, stop sequences, 400s, the bounded queue (429) and
hanging up mid-answer. The tiny model's text is noise; these tests check mechanics."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from serving.api import Limits
from serving.engines import load_engine
from tests.serving import openai_client, running_server, slowed

LIMITS = Limits(max_tokens=900, max_prompt_tokens=100)
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def engine(tiny_model):
    # fp32: batching must not change greedy answers (bf16 rounding depends on batch size)
    return load_engine(str(tiny_model), "ds-inference", slots=4, max_len=1024, dtype="fp32")


@pytest.fixture(scope="module")
def url(engine):
    with running_server(engine, max_queue=4, limits=LIMITS) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai_client(url)


def ask(client, messages=HELLO, **options):
    options = {"model": "tiny", "max_tokens": 12, "temperature": 0, **options}
    return client.chat.completions.create(messages=messages, **options)


def streamed(client, messages=HELLO, **options):
    """(text per choice index, finish reason per index, chunks) of a streamed answer."""
    options = {"model": "tiny", "max_tokens": 12, "temperature": 0, **options}
    chunks = list(client.chat.completions.create(messages=messages, stream=True, **options))
    texts, reasons = {}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, chunks


def test_models_and_health_name_the_loaded_checkpoint(url, client, tiny_model):
    assert [m.id for m in client.models.list().data] == [str(tiny_model)]
    health = httpx.get(f"{url}/health").json()
    assert health == {"status": "ok", "model": str(tiny_model), "engine": "ds-inference",
                      "active": 0, "queued": 0}


def test_answer_has_openai_shape_and_usage(client, engine):
    reply = ask(client, max_tokens=8)
    assert reply.object == "chat.completion" and len(reply.choices) == 1
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(engine.encode_chat(HELLO))
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 8


def test_stream_carries_the_same_answer_as_a_plain_request(client, url):
    options = dict(temperature=1.0, seed=11, max_tokens=20)
    plain = ask(client, **options).choices[0]
    texts, reasons, chunks = streamed(client, stream_options={"include_usage": True}, **options)
    assert texts == {0: plain.message.content} and reasons == {0: plain.finish_reason}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    raw = httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3,
                                                          "stream": True}, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.splitlines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_n_returns_distinct_choices_and_seed_repeats_them(client):
    first = ask(client, n=2, temperature=1.0, seed=3, max_tokens=10)
    assert [c.index for c in first.choices] == [0, 1]
    texts = [c.message.content for c in first.choices]
    assert texts[0] != texts[1]  # two samples of ~50k-way noise
    again = ask(client, n=2, temperature=1.0, seed=3, max_tokens=10)
    assert [c.message.content for c in again.choices] == texts
    assert 2 <= first.usage.completion_tokens <= 20
    texts_streamed, reasons, _ = streamed(client, n=2, temperature=1.0, seed=3, max_tokens=10)
    assert texts_streamed == {0: texts[0], 1: texts[1]} and set(reasons) == {0, 1}


def test_stop_sequence_ends_the_answer_and_is_trimmed(client):
    options = dict(temperature=1.0, seed=5, max_tokens=30)
    full = ask(client, **options).choices[0].message.content
    assert len(full) >= 12, full
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.find(stop)]
    stopped = ask(client, stop=[stop, "never appears \u2603"], **options).choices[0]
    assert stopped.message.content == expected and stopped.finish_reason == "stop"
    texts, reasons, _ = streamed(client, stop=stop, **options)
    assert texts == {0: expected} and reasons == {0: "stop"}


def test_concurrent_clients_each_get_their_own_answer(client):
    """8 clients on 4 slots: half wait and join the running batch as slots free up; every
    greedy answer equals the one the same request gets alone."""
    conversations = [[{"role": "user", "content": f"Request number {i}: say {w}"}]
                     for i, w in enumerate("red green blue gold pink gray teal navy".split())]
    alone = [ask(client, c, max_tokens=16).choices[0].message.content for c in conversations]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda c: ask(client, c, max_tokens=16).choices[0].message.content,
                                 conversations))
    assert together == alone


BAD_REQUESTS = {
    "missing messages": {"model": "tiny"},
    "empty messages": {"messages": []},
    "unknown role": {"messages": [{"role": "robot", "content": "hi"}]},
    "max_tokens over the limit": {"messages": HELLO, "max_tokens": LIMITS.max_tokens + 1},
    "n out of range": {"messages": HELLO, "n": 9},
    "n over the slots": {"messages": HELLO, "n": 5},
    "negative temperature": {"messages": HELLO, "temperature": -0.5},
    "top_p zero": {"messages": HELLO, "top_p": 0},
    "prompt too long": {"messages": [{"role": "user", "content": "word " * 300}]},
    "messages not a list": {"messages": "hello"},
    "seed over 2**63-1": {"messages": HELLO, "seed": 2**64},
    "negative seed": {"messages": HELLO, "seed": -1},
    "NaN temperature": {"messages": HELLO, "temperature": float("nan")},
    "infinite top_p": {"messages": HELLO, "top_p": float("inf")},
    "max_tokens zero": {"messages": HELLO, "max_tokens": 0},
    "five stop strings": {"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]},
    "stop string too long": {"messages": HELLO, "stop": "x" * 201},
    "stop not text": {"messages": HELLO, "stop": [1, 2]},
    "only a system message": {"messages": [{"role": "system", "content": "Be brief."}]},
    "assistant message last": {"messages": HELLO + [{"role": "assistant", "content": "Hi"}]},
    "image part": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
    "message without content": {"messages": [{"role": "user"}]},
}


@pytest.mark.parametrize("body", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_malformed_request_gets_400_with_a_message_and_the_server_keeps_serving(url, client, body):
    response = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(body), timeout=60,
                          headers={"content-type": "application/json"})  # NaN as JSON writes it
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert message.endswith(".") and len(message) > 10
    assert ask(client, max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_invalid_json_gets_400(url, client):
    response = httpx.post(f"{url}/v1/chat/completions", content=b'{"messages": [',
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="over this server's limit"):
        ask(client, max_tokens=LIMITS.max_tokens + 100)


def wait_for_counts(url: str, active: int, queued: int, timeout_s: float) -> dict:
    """/health once it reports these counts, or as it is when the time is up."""
    deadline = time.time() + timeout_s
    while True:
        health = httpx.get(f"{url}/health").json()
        if (health["active"], health["queued"]) == (active, queued) or time.time() > deadline:
            return health
        time.sleep(0.05)


def test_full_queue_answers_429_and_hanging_up_frees_the_slots(tiny_model):
    """4 slots and a queue of 4: 8 long streams are taken, the 9th request is refused; once
    the 8 clients hang up, their slots free within a step and the server answers again."""
    engine = slowed(load_engine(str(tiny_model), "hf", slots=4, max_len=1024, dtype="fp32"))
    body = {"messages": HELLO, "max_tokens": 800, "stream": True}
    with running_server(engine, max_queue=4, limits=LIMITS) as url, httpx.Client(timeout=60) as http:
        streams = []
        try:
            for _ in range(8):
                stream = http.stream("POST", f"{url}/v1/chat/completions", json=body)
                response = stream.__enter__()
                streams.append(stream)
                assert response.status_code == 200
            health = wait_for_counts(url, active=4, queued=4, timeout_s=5)
            assert (health["active"], health["queued"]) == (4, 4), health
            refused = http.post(f"{url}/v1/chat/completions", json=body)
            assert refused.status_code == 429 and refused.headers["retry-after"]
            assert refused.json()["error"]["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):
                ask(openai_client(url))
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)  # hang up mid-answer
        # 800 tokens at >= 20 ms a step would take 16 s: idle within 5 s means they were freed
        assert wait_for_counts(url, 0, 0, timeout_s=5) == {**health, "active": 0, "queued": 0}
        with pytest.raises(httpx.ReadTimeout):  # a plain (not streamed) request given up on; greedy,
            # so it cannot end early by sampling the end-of-turn token (this model's greedy answer
            # runs to max_tokens)
            http.post(f"{url}/v1/chat/completions", json={**body, "stream": False, "temperature": 0},
                      timeout=0.5)
        assert wait_for_counts(url, 0, 0, timeout_s=5)["active"] == 0
        assert ask(openai_client(url), max_tokens=3).choices[0].finish_reason in ("stop", "length")


def test_api_key_guards_v1_routes_and_load_switches_checkpoints(tiny_model, tmp_path):
    """With --api-key: /v1 routes need the key, /health does not; /v1/models/load switches
    the checkpoint without a restart and /v1/models then names the new one."""
    import shutil

    second = tmp_path / "second"
    shutil.copytree(tiny_model, second)

    def loader(name):
        return load_engine(name, "hf", slots=2, max_len=1024, dtype="fp32")

    with running_server(loader(str(tiny_model)), loader, api_key="s3cret", limits=LIMITS) as url:
        keyed = openai_client(url, api_key="s3cret")
        with pytest.raises(openai.AuthenticationError):
            ask(openai_client(url, api_key="wrong"))
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200
        load = f"{url}/v1/models/load"
        assert httpx.post(load, json={"model": str(second)}).status_code == 401
        headers = {"Authorization": "Bearer s3cret"}
        missing = httpx.post(load, json={"model": str(tmp_path / "nope")}, headers=headers, timeout=120)
        assert missing.status_code == 400 and "not found" in missing.json()["error"]["message"]
        before = ask(keyed, max_tokens=6).choices[0].message.content
        switched = httpx.post(load, json={"model": str(second)}, headers=headers, timeout=120)
        assert switched.status_code == 200 and switched.json()["id"] == str(second)
        assert [m.id for m in keyed.models.list().data] == [str(second)]
        assert httpx.get(f"{url}/health").json()["model"] == str(second)
        assert ask(keyed, max_tokens=6).choices[0].message.content == before  # same weights


def greedy(url: str, messages, max_tokens: int) -> tuple[int, str, str]:
    """(status, model, text) of a plain greedy answer."""
    response = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    if response.status_code != 200:
        return response.status_code, "", response.text
    body = response.json()
    return 200, body["model"], body["choices"][0]["message"]["content"]


def test_switch_under_load_finishes_running_answers_on_the_old_model_and_the_queue_on_the_new(
        tiny_model, untied_model):
    """2 slots: 2 answers running, 4 waiting, then a switch: the running ones finish whole on
    the old checkpoint, the waiting ones run on the new one, none fails."""
    questions = [[{"role": "user", "content": f"Question {i}"}] for i in range(6)]
    # loaded beforehand, so the switch is pending while the first two still run
    engines = {str(folder): slowed(load_engine(str(folder), "hf", slots=2, max_len=1024, dtype="fp32"))
               for folder in (tiny_model, untied_model)}

    with running_server(engines[str(tiny_model)], engines.get, max_queue=8, limits=LIMITS) as url:
        old = [greedy(url, q, 60 if i < 2 else 10) for i, q in enumerate(questions)]
        with ThreadPoolExecutor(6) as pool:
            running = [pool.submit(greedy, url, q, 60) for q in questions[:2]]  # >= 1.2 s
            assert wait_for_counts(url, active=2, queued=0, timeout_s=10)["active"] == 2
            waiting = [pool.submit(greedy, url, q, 10) for q in questions[2:]]
            assert wait_for_counts(url, active=2, queued=4, timeout_s=10)["queued"] == 4
            switched = httpx.post(f"{url}/v1/models/load", json={"model": str(untied_model)}, timeout=120)
            answers = [future.result() for future in running + waiting]
        assert switched.status_code == 200 and switched.json()["id"] == str(untied_model)
        assert answers[:2] == old[:2]
        new = [greedy(url, q, 10) for q in questions[2:]]
        assert answers[2:] == new and all(model == str(untied_model) for _, model, _ in new)
        assert [text for _, _, text in new] != [text for _, _, text in old[2:]]  # told apart


def test_a_large_request_does_not_block_smaller_ones_behind_it(tiny_model):
    """4 slots, 3 held by long streams: an n=4 request waits for them, while n=1 requests sent
    after it are answered in the free slot (strict FIFO kept them behind it for the 16 s the
    long streams need); once the long streams end, the n=4 request runs."""
    engine = slowed(load_engine(str(tiny_model), "hf", slots=4, max_len=1024, dtype="fp32"))
    long_body = {"messages": HELLO, "max_tokens": 800, "stream": True}
    with running_server(engine, limits=LIMITS) as url, httpx.Client(timeout=60) as http, \
            ThreadPoolExecutor(1) as pool:
        streams = [http.stream("POST", f"{url}/v1/chat/completions", json=long_body) for _ in range(3)]
        try:
            for stream in streams:
                assert stream.__enter__().status_code == 200
            assert wait_for_counts(url, active=3, queued=0, timeout_s=10)["active"] == 3
            large = pool.submit(httpx.post, f"{url}/v1/chat/completions", timeout=120,
                                json={"messages": HELLO, "n": 4, "max_tokens": 5})
            assert wait_for_counts(url, active=3, queued=1, timeout_s=10)["queued"] == 1
            for _ in range(2):
                status, _, text = greedy(url, HELLO, 5)
                assert status == 200 and text
            health = httpx.get(f"{url}/health").json()
            assert (health["active"], health["queued"]) == (3, 1) and not large.done()
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)  # hang up: the slots drain to the n=4 request
        answer = large.result()
        assert answer.status_code == 200 and len(answer.json()["choices"]) == 4
