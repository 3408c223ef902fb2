"""The HTTP chat client and the server pool, against a stand-in that speaks serving/'s contract.

The stand-in (a small FastAPI app below) answers the routes chat/ relies on in their documented
shape, so the client's parsing, streaming and error handling are tested without model weights.
Run as `python -m tests.chat.test_client --model M --port P` it is a server the pool can start.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from chat.client import ChatClient, ServerError
from chat.server import ServerPool, free_port

FAKE_COMMAND = (sys.executable, "-m", "tests.chat.test_client")


def make_fake_app(model: str, api_key: str | None = None):
    """OpenAI-shaped answers: "<model> heard: <last user turn>" (one word per stream chunk)."""
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
def fake_server():
    """A stand-in server in a background thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_fake_app("runs/sft1/final", api_key="k"),
                                           host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "My name is Ada."},
                {"role": "assistant", "content": "Hello Ada."},
                {"role": "user", "content": "What is my name?"}]


def test_streamed_answer_arrives_in_pieces_and_equals_the_whole(fake_server):
    client = ChatClient(fake_server, api_key="k")
    pieces = list(client.stream(CONVERSATION, temperature=0.5, top_p=None))
    assert len(pieces) > 3
    assert "".join(pieces) == "runs/sft1/final heard: What is my name? (t=0.5)"
    [whole] = client.complete(CONVERSATION, temperature=0.5)
    assert whole == "".join(pieces) + " #0"


def test_a_stream_says_why_it_ended(fake_server):
    client = ChatClient(fake_server, api_key="k")
    for max_tokens, reason in ((1, "length"), (16, "stop")):
        finish = {}
        assert "".join(client.stream(CONVERSATION, finish=finish, max_tokens=max_tokens))
        assert finish == {"reason": reason}


def test_n_answers_come_back_in_order(fake_server):
    answers = ChatClient(fake_server).complete(CONVERSATION, n=2)
    assert [a[-2:] for a in answers] == ["#0", "#1"]


def test_server_errors_become_one_sentence_with_the_servers_message(fake_server):
    client = ChatClient(fake_server)
    with pytest.raises(ServerError, match=r"\(400\): max_tokens 500 is over the limit"):
        client.complete(CONVERSATION, max_tokens=500)
    with pytest.raises(ServerError, match=r"\(400\): messages must be a non-empty list"):
        list(client.stream([]))


def test_switching_checkpoints_needs_the_api_key(fake_server):
    with pytest.raises(ServerError, match="401"):
        ChatClient(fake_server).load("runs/ppo1/ema")
    client = ChatClient(fake_server, api_key="k")
    client.load("runs/ppo1/ema")
    assert client.models() == ["runs/ppo1/ema"] and client.health()["model"] == "runs/ppo1/ema"


def test_unreachable_server_is_one_sentence():
    client = ChatClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ServerError, match="is not reachable"):
        client.health()
    with pytest.raises(ServerError, match="broke off"):
        list(client.stream(CONVERSATION))


@pytest.fixture
def pool(tmp_path):
    pool = ServerPool(engine="hf", size=1, log_dir=tmp_path, startup_timeout=120,
                      command=FAKE_COMMAND)
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
                      command=FAKE_COMMAND)
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
    args = parser.parse_args(argv)
    if args.model == "nowhere":
        print("error: model folder nowhere does not exist: pass a run's final/ folder.",
              file=sys.stderr)
        return 2
    uvicorn.run(make_fake_app(args.model), host="127.0.0.1", port=args.port, log_level="error")
    return 0


if __name__ == "__main__":
    sys.exit(main())
