"""The HTTP chat client against the real server, and the server pool.

The client's tests run serving/'s own app (an in-process uvicorn over the tiny model, as
tests/serving does), so they check the client against what the server really sends: streamed
chunks, OpenAI-shaped errors, error events inside a stream, the API key, model switching.

The pool's tests manage processes (start, switch, stop, a server that cannot start), which
would take a model load per process with the real server; they run a stand-in with serving/'s
command line and routes instead (`python -m tests.chat.test_client --model M --port P`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

import serving.scheduler
from chat.client import ChatClient, ServerError
from chat.server import ServerPool, free_port
from serving.api import Limits
from serving.engines import load_engine
from tests.serving import running_server

STAND_IN_COMMAND = (sys.executable, "-m", "tests.chat.test_client")
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "My name is Ada."},
                {"role": "assistant", "content": "Hello Ada."},
                {"role": "user", "content": "What is my name?"}]
SAMPLED = {"temperature": 1.0, "seed": 7, "max_tokens": 24}


# ---- the client against the real server -------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_model):
    return load_engine(str(tiny_model), "hf", slots=4, max_len=1024, dtype="fp32")


@pytest.fixture(scope="module")
def server(engine, tiny_model, tmp_path_factory):
    """The real server with an API key; /v1/models/load switches between copies of the tiny model."""
    copy = tmp_path_factory.mktemp("copy") / "tiny-copy"
    shutil.copytree(tiny_model, copy)

    def loader(name):
        return load_engine(name, "hf", slots=4, max_len=1024, dtype="fp32", offline=True)

    with running_server(engine, loader, api_key="k", limits=Limits(max_tokens=100)) as url:
        yield url, str(copy)


def test_streamed_answer_arrives_in_pieces_and_equals_the_whole(server):
    client = ChatClient(server[0], api_key="k")
    pieces = list(client.stream(CONVERSATION, top_p=None, **SAMPLED))
    assert len(pieces) > 3 and all(pieces)
    [whole] = client.complete(CONVERSATION, **SAMPLED)
    assert whole == "".join(pieces)


def test_a_stream_says_why_it_ended(server):
    """The chat marks an answer cut at max_tokens; an answer ended by a stop string is whole."""
    client = ChatClient(server[0], api_key="k")
    finish = {}
    pieces = list(client.stream(CONVERSATION, finish=finish, **SAMPLED))
    assert finish["reason"] == "length"  # the tiny random model never ends a turn by itself
    finish = {}
    list(client.stream(CONVERSATION, finish=finish, stop=[pieces[3].strip()], **SAMPLED))
    assert finish["reason"] == "stop"


def test_n_answers_come_back_in_order(server):
    client = ChatClient(server[0], api_key="k")
    answers = client.complete(CONVERSATION, n=3, **SAMPLED)
    assert len(answers) == 3 and len(set(answers)) == 3
    assert client.complete(CONVERSATION, n=3, **SAMPLED) == answers  # same seed, same order


def test_server_errors_become_one_sentence_with_the_servers_message(server):
    client = ChatClient(server[0], api_key="k")
    with pytest.raises(ServerError, match=r"\(400\): max_tokens 500 is over this server's limit"):
        client.complete(CONVERSATION, max_tokens=500)
    with pytest.raises(ServerError, match=r"\(400\): the conversation ends with an assistant message"):
        list(client.stream(CONVERSATION[:3]))
    with pytest.raises(ServerError, match=r"\(401\): missing or wrong API key"):
        ChatClient(server[0], api_key="wrong").complete(CONVERSATION)


def test_an_error_inside_a_stream_becomes_one_sentence(server, monkeypatch):
    sample_tokens = serving.scheduler.sample_tokens

    def faulty(logits, sampling, generator=None):  # an injected fault for top_p=0.5
        if sampling.top_p == 0.5:
            raise RuntimeError("injected sampling fault")
        return sample_tokens(logits, sampling, generator)

    monkeypatch.setattr(serving.scheduler, "sample_tokens", faulty)
    with pytest.raises(ServerError, match="stopped the answer: generation failed.*injected"):
        list(ChatClient(server[0], api_key="k").stream(CONVERSATION, top_p=0.5))


def test_switching_checkpoints_needs_the_api_key_which_may_come_from_the_environment(
        server, tiny_model, monkeypatch):
    url, copy = server
    with pytest.raises(ServerError, match="401"):
        ChatClient(url).load(copy)
    monkeypatch.setenv("RLHF_API_KEY", "k")
    client = ChatClient(url)  # the key from RLHF_API_KEY, as `python -m serving` takes it
    try:
        client.load(copy)
        assert client.models() == [copy] and client.health()["model"] == copy
        with pytest.raises(ServerError, match="not found or is not a model"):
            client.load(str(tiny_model / "nowhere"))
        assert client.models() == [copy]
    finally:
        client.load(str(tiny_model))


def test_unreachable_server_is_one_sentence():
    client = ChatClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ServerError, match="is not reachable"):
        client.health()
    with pytest.raises(ServerError, match="broke off"):
        list(client.stream(CONVERSATION))


# ---- the pool, over stand-in processes ----------------------------------------------------------

def make_stand_in_app(model: str, api_key: str | None = None):
    """A stand-in with serving/'s routes for the pool's tests: "<model> heard: <last user turn>"
    (one word per stream chunk)."""
    app = FastAPI()
    state = {"model": model}

    def error(status: int, message: str):
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status)

    def authorised(request: Request) -> bool:
        return api_key is None or request.headers.get("authorization") == f"Bearer {api_key}"

    @app.get("/health")
    def health():
        return {"status": "ok", "model": state["model"], "engine": "fake", "active": 0, "queued": 0}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": state["model"], "object": "model"}]}

    @app.post("/v1/models/load")
    async def load(request: Request):
        if not authorised(request):
            return error(401, "a valid API key is required.")
        wanted = (await request.json())["model"]
        if wanted == "missing":
            return error(400, "model folder missing does not exist: pass a run's final/ folder.")
        state["model"] = wanted
        return {"id": wanted, "object": "model"}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        body = await request.json()
        if not body.get("messages"):
            return error(400, "messages must be a non-empty list.")
        if body.get("max_tokens", 16) > 100:
            return error(400, "max_tokens 500 is over the limit of 100.")
        text = f"{state['model']} heard: {body['messages'][-1]['content']}"
        if "temperature" in body:
            text += f" (t={body['temperature']})"
        if not body.get("stream"):
            choices = [{"index": i, "message": {"role": "assistant", "content": f"{text} #{i}"},
                        "finish_reason": "stop"} for i in range(body.get("n", 1))]
            return {"object": "chat.completion", "model": state["model"], "choices": choices}

        def events():
            yield ": keep-alive\n\n"
            for position, word in enumerate(text.split(" ")):
                piece = word if position == 0 else " " + word
                chunk = {"object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": {"content": piece}}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            reason = "length" if body.get("max_tokens") == 1 else "stop"
            yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {}, 'finish_reason': reason}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture
def pool(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_RUNS_DIR", str(Path.cwd() / "runs"))  # the stand-in's runs/... lie there
    pool = ServerPool(engine="hf", size=1, log_dir=tmp_path, startup_timeout=120,
                      command=STAND_IN_COMMAND)
    yield pool
    pool.stop_all()


def test_pool_starts_a_server_then_switches_it_instead_of_starting_another(pool):
    with pool.lease("runs/a/final") as client:
        assert "".join(client.stream(CONVERSATION[1:2])) == "runs/a/final heard: My name is Ada."
        first_url = client.base_url
    with pool.lease("runs/a/final") as client:
        assert client.base_url == first_url
    with pool.lease("runs/b/ema") as client:
        assert client.base_url == first_url  # size 1: the same process, switched
        assert client.models() == ["runs/b/ema"]
    [server] = pool.status()
    assert server["model"] == "runs/b/ema" and server["ready"] and server["in_use"] == 0
    process = pool.servers[0].process
    pool.stop_all()
    assert process.poll() is not None


def test_a_model_outside_the_runs_and_models_folders_gets_a_server_of_its_own(pool, tmp_path):
    """Probe 6: a server loads on request only from the runs and models folders (a folder's
    chat template runs inside it), so for another folder the pool starts a server whose command
    line names it, instead of switching an idle one."""
    with pool.lease("runs/a/final") as client:
        first_url, first = client.base_url, pool.servers[0].process
    elsewhere = str(tmp_path / "elsewhere" / "model")
    with pool.lease(elsewhere) as client:
        assert client.base_url != first_url and client.models() == [elsewhere]
    assert first.poll() is not None and [s["model"] for s in pool.status()] == [elsewhere]


def test_a_leased_server_is_not_switched_under_a_running_answer(pool):
    events = []

    def other_session():
        with pool.lease("runs/b/ema") as client:
            events.append(("b got", client.models()[0]))

    with pool.lease("runs/a/final") as client:
        thread = threading.Thread(target=other_session)
        thread.start()
        time.sleep(1.0)
        events.append(("a still", client.models()[0]))
    thread.join(timeout=60)
    assert events == [("a still", "runs/a/final"), ("b got", "runs/b/ema")]


def test_a_pool_of_two_keeps_two_checkpoints_loaded_for_the_arena(tmp_path):
    pool = ServerPool(engine="hf", size=2, log_dir=tmp_path, startup_timeout=120,
                      command=STAND_IN_COMMAND)
    try:
        for _ in range(2):  # A then B, twice: no switching, no restarting
            for model in ("runs/a/final", "runs/b/ema"):
                with pool.lease(model) as client:
                    assert client.models() == [model]
        assert sorted(s["model"] for s in pool.status()) == ["runs/a/final", "runs/b/ema"]
        assert len({s["url"] for s in pool.status()}) == 2
    finally:
        pool.stop_all()


def test_a_server_that_cannot_start_says_why(pool):
    with pytest.raises(ServerError, match="model folder nowhere does not exist"):
        with pool.lease("nowhere"):
            pass
    assert pool.status() == []


def test_a_failed_switch_leaves_no_broken_server(pool):
    with pool.lease("runs/a/final"):
        pass
    with pytest.raises(ServerError, match="model folder missing does not exist"):
        with pool.lease("missing"):
            pass
    assert pool.status() == []
    with pool.lease("runs/a/final") as client:  # a fresh server comes up
        assert client.health()["model"] == "runs/a/final"


def main(argv=None) -> int:
    """The stand-in as a process, with serving/'s command line (`--model`, `--port`, ...)."""
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--shutdown-grace", type=float, default=30)
    args = parser.parse_args(argv)
    if args.model == "nowhere":
        print("error: model folder nowhere does not exist: pass a run's final/ folder.",
              file=sys.stderr)
        return 2
    uvicorn.run(make_stand_in_app(args.model), host="127.0.0.1", port=args.port, log_level="error")
    return 0


if __name__ == "__main__":
    sys.exit(main())
