"""An adversarial probe of the server (issue 14's "Done when"): 99 kinds of bad request (bodies,
parameters, messages, headers, routes, model loads), each sent twice from 8 threads while 4
clients stream and ask greedy answers. Every bad request gets a 4xx with a JSON error, none a
5xx; every good answer equals the one it gets alone; nothing is logged as an error; the server
is idle and healthy afterwards."""
from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serving.api import Limits
from serving.engines import load_engine
from tests.serving import running_server, slowed

KEY = "probe-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "Hello there"}]
CHAT, LOAD = "/v1/chat/completions", "/v1/models/load"


def body(**fields) -> dict:
    return {"messages": HELLO, "max_tokens": 4, **fields}


def raw(text: str | bytes, content_type: str = "application/json") -> dict:
    return {"content": text, "headers": {**AUTH, "content-type": content_type}}


def as_json(value) -> dict:  # NaN and Infinity written as Python's json writes them
    return raw(json.dumps(value))


PARAMETERS = {
    "temperature": [-1, 2.5, float("nan"), float("inf"), "hot", None, [1]],
    "top_p": [0, -0.1, 1.5, float("nan"), "x"],
    "max_tokens": [0, -5, 1e30, 2**70, 10.5, "ten", 901],
    "max_completion_tokens": [0, 10**6],
    "n": [0, -1, 9, 100, 2.5, "two", 5],
    "seed": [2**64, 2**63, -1, 1.5, "seed", 10**100],
    "stop": [["a"] * 5, "x" * 201, [1], {"a": 1}, [["x"]]],
    "stream": [5, "maybe"],
    "stream_options": ["x", {"include_usage": "maybe"}],
    "model": [123, ["a"]],
}
MESSAGES = [None, {}, "hello", [], [{"role": "robot", "content": "hi"}], [{"content": "hi"}],
            [{"role": "user"}], [{"role": "user", "content": None}], [{"role": "user", "content": 5}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            [{"role": "user", "content": [{"type": "text"}]}],
            [{"role": "system", "content": "Be brief."}], HELLO + [{"role": "assistant", "content": "Hi"}],
            HELLO + [{"role": "system", "content": "Answer in French."}],
            [{"role": "user", "content": "word " * 200}],                          # over 100 tokens
            [{"role": "user", "content": "word " * 150_000}],                      # far over: bytes
            [{"role": "user", "content": "a"}] * 50_000]                           # far over: count
BODIES = [b"", b"null", b"[]", b'"text"', b"123", b'{"messages": [', b"[" * 100_000 + b"]" * 100_000,
          b'{"messages": [{"role": "user", "content": ' + b"[" * 50_000 + b"]" * 50_000 + b"}]}",
          b"\xff\xfe\x00garbage", b'{"messages": "\\ud800"}']


def bad_requests() -> list[tuple[str, str, str, dict]]:
    """(name, method, path, httpx keyword arguments) of every bad request."""
    requests = [(f"{name}={value!r:.30}", "POST", CHAT, as_json(body(**{name: value})))
                for name, values in PARAMETERS.items() for value in values]
    requests += [(f"messages={value!r:.30}", "POST", CHAT, as_json({"messages": value}))
                 for value in MESSAGES]
    requests += [(f"body {text[:20]!r}", "POST", CHAT, raw(text)) for text in BODIES]
    requests += [
        ("text/plain body", "POST", CHAT, raw(json.dumps(body()), "text/plain")),
        ("form body", "POST", CHAT, raw("messages=hi", "application/x-www-form-urlencoded")),
        ("5 MB body", "POST", CHAT, as_json({"messages": [{"role": "user", "content": "w " * 2_500_000}]})),
        ("chunked 5 MB body", "POST", CHAT, {"content": [b"x" * 100_000] * 50, "headers": AUTH}),
        ("no key", "POST", CHAT, {"json": body()}),
        ("wrong key", "POST", CHAT, {"json": body(), "headers": {"Authorization": "Bearer nope"}}),
        ("key without Bearer", "POST", CHAT, {"json": body(), "headers": {"Authorization": KEY}}),
        ("long key", "POST", CHAT, {"json": body(), "headers": {"Authorization": "Bearer " + "k" * 8000}}),
        ("models without key", "GET", "/v1/models", {}),
        ("docs with a key set", "GET", "/docs", {}),
        ("openapi without key", "GET", "/openapi.json", {}),
        ("GET on chat", "GET", CHAT, {"headers": AUTH}),
        ("unknown route", "POST", "/v1/completions", {"json": body(), "headers": AUTH}),
        ("path escape", "GET", "/../../etc/passwd", {}),
    ]
    for model in [None, "", 5, "../../etc", "/etc/passwd", "~/.ssh", "/", "someone/not-a-real-model",
                  "x" * 5000, "missing.gguf", "/dev/zero", "default\x00"]:
        requests.append((f"load {model!r:.30}", "POST", LOAD, as_json({"model": model})))
    requests.append(("load without key", "POST", LOAD, {"json": {"model": "/"}}))
    return requests


@pytest.fixture(scope="module")
def engine(untied_model):
    return load_engine(str(untied_model), "hf", slots=4, max_len=1024, dtype="fp32")


def test_bad_requests_beside_good_ones_fail_alone(engine, caplog):
    requests = bad_requests()
    questions = [[{"role": "user", "content": f"Good question {i}"}] for i in range(4)]

    def loader(name):
        return load_engine(name, "hf", slots=4, max_len=1024, dtype="fp32", offline=True)

    caplog.set_level(logging.ERROR)
    with running_server(slowed(engine, 0.005), loader, api_key=KEY, max_queue=64,
                        limits=Limits(max_tokens=900, max_prompt_tokens=100),
                        max_body_bytes=1_000_000) as url, httpx.Client(timeout=120) as http:

        def good(i: int, stream: bool) -> str:
            payload = {"messages": questions[i], "max_tokens": 24, "temperature": 0, "stream": stream}
            response = http.post(f"{url}{CHAT}", json=payload, headers=AUTH)
            assert response.status_code == 200, response.text
            if not stream:
                return response.json()["choices"][0]["message"]["content"]
            chunks = [json.loads(line[6:]) for line in response.text.splitlines()
                      if line.startswith("data: {")]
            return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)

        alone = [good(i, stream=False) for i in range(4)]
        done = threading.Event()

        def good_client(i: int) -> list[bool]:
            results = []
            while not done.is_set() or len(results) < 2:
                results.append(good(i, stream=len(results) % 2 == 0) == alone[i])
            return results

        def send(request) -> tuple[str, int, dict | None]:
            name, method, path, options = request
            response = http.request(method, f"{url}{path}", **options)
            try:
                return name, response.status_code, response.json()
            except ValueError:
                return name, response.status_code, None

        with ThreadPoolExecutor(4) as clients, ThreadPoolExecutor(8) as attackers:
            good_runs = [clients.submit(good_client, i) for i in range(4)]
            answers = list(attackers.map(send, requests * 2))  # twice: long enough to overlap
            done.set()
            good_results = [run.result() for run in good_runs]

        wrong = [(name, status, reply) for name, status, reply in answers
                 if not 400 <= status < 500 or not (reply or {}).get("error", {}).get("message")]
        assert wrong == []
        assert all(all(results) and len(results) >= 2 for results in good_results)
        health = http.get(f"{url}/health").json()
        assert (health["status"], health["active"], health["queued"]) == ("ok", 0, 0)
        assert health["model"] == str(engine.model_name)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
