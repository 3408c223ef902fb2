"""The HTTP API: OpenAI Chat Completions (plain and streamed), model listing and switching, health.

Routes:
    POST /v1/chat/completions   messages, temperature, top_p, max_tokens (or
                                max_completion_tokens), stop, n, seed, stream, stream_options
    GET  /v1/models             the loaded checkpoint, as given on the command line or to load
    POST /v1/models/load        {"model": "PATH or default"}: switch checkpoints without a restart
    GET  /health                {"status", "model", "engine", "active", "queued"} (HEAD too)

Errors are JSON in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a
malformed request (serving/validation.py; FastAPI's 422 becomes 400) or one with both
Content-Length and Transfer-Encoding, 401 for a missing or wrong API key, 413 for a body over
the limit (refused before it is read; a chunked one by the bytes received), 408 for a body that
has not arrived within the body timeout, or headers within the header timeout (the
connection is closed: serving/connections.py), 429 with Retry-After when the queue is full,
503 while shutting down. An error inside one request answers that request alone (500 before a
stream starts, else an error event and `data: [DONE]`) and leaves the connection usable. With
an API key every /v1 route and /openapi.json need `Authorization: Bearer KEY`, as OpenAI's do,
checked before the body is parsed (the key's UTF-8 or Latin-1 bytes); /docs and /redoc are
then off; /health stays open for supervisors. A model that cannot be loaded gets one sentence
whatever the reason (missing, not a model, pickled weights, a hub name not cached: hub names
are never downloaded here), so a client cannot probe the server's files; the server's log has
the reason. Bodies are parsed and checked, and prompts tokenised, on worker threads, never on
the event loop. Chat templates render in worker processes (serving/templates.py) from threads
of their own: at most RENDERS_AT_ONCE requests render or wait for a render (past that: 429),
and a request whose client disconnects, or that the shutdown overtakes, stops its render, so
requests with slow templates never hold the threads that parse other bodies or load models
(probe 8, N1). The `model` field of a chat request is accepted and ignored: the server serves
the one loaded checkpoint.

Left out: tools and function calling, logprobs, response_format, penalties (other fields are
accepted and ignored, as many OpenAI-compatible servers do), the legacy /v1/completions route.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from fastapi import Depends, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.models import DefaultModelMissing
from serving.connections import (BODY_TIMEOUT_S, MAX_BODY_BYTES, Guard, ResourceErrorLog, bind,
                                 shutting_down, uvicorn_server)
from serving.request import Failure, Request
from serving.scheduler import QueueFull, Scheduler, ShuttingDown
from serving.templates import MAX_WAITING, POOL_SIZE
from serving.validation import (ApiError, ChatRequest, Limits, LoadRequest, answer_room,
                                check_request, encode, error_response, parse_chat, parse_load,
                                render_busy, validation_message)

__all__ = ["Limits", "bind", "create_app", "load_running", "uvicorn_server"]
log = logging.getLogger("serving")
LOAD_THREAD = "model-load"
# requests rendering their chat template or waiting in line for a render process (threads that
# mostly wait; serving/templates.py bounds the wait); past this they get 429 at once
RENDERS_AT_ONCE = POOL_SIZE + MAX_WAITING


def failure_error(failure: Failure) -> ApiError:
    kind = "server_error" if failure.status >= 500 else "invalid_request_error"
    return ApiError(failure.status, failure.message, type=kind, code=failure.code)


def load_refused(name: str) -> ApiError:
    return ApiError(400, f"model {name!r} was not found or is not a model this server can load: "
                         "pass a run's final/ or ema/ folder, a Hugging Face model folder with "
                         "safetensors weights in the folders it loads from, a .gguf file "
                         "converted before or 'default' (the server's log says why).",
                    code="model_not_loadable", param="model")


# ---- the app --------------------------------------------------------------------------------------

@dataclass
class ServerState:
    scheduler: Scheduler
    limits: Limits
    api_key: str | None
    loader: Callable[[str], object]  # model name -> Engine (load_engine with the CLI's options)
    loaded_at: int = 0
    load_lock: asyncio.Lock | None = None
    renders: concurrent.futures.ThreadPoolExecutor | None = None  # encode() calls, RENDERS_AT_ONCE
    rendering: int = 0  # requests in `renders` (changed on the event loop only)


def create_app(scheduler: Scheduler, loader: Callable[[str], object], limits: Limits | None = None,
               api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    """The FastAPI app around a (not yet started) scheduler; starts and stops it with the app."""
    state = ServerState(scheduler, limits or Limits(), api_key, loader, int(time.time()))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        state.load_lock = asyncio.Lock()
        state.renders = concurrent.futures.ThreadPoolExecutor(RENDERS_AT_ONCE, "render")
        asyncio.get_running_loop().set_exception_handler(ResourceErrorLog())
        scheduler.start()
        yield
        scheduler.stop()
        state.renders.shutdown(wait=False, cancel_futures=True)

    docs = {} if api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="RLHF Studio inference server", lifespan=lifespan, **docs)
    app.state.server = state
    app.add_middleware(Guard, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s)
    add_error_handlers(app)
    key_required = [Depends(api_key_checker(api_key))]

    if api_key is not None:
        @app.get("/openapi.json", dependencies=key_required, include_in_schema=False)
        async def openapi():
            return app.openapi()

    @app.get("/health")
    async def health():
        active, queued = scheduler.counts()
        engine = scheduler.engine
        body = {"status": "shutting down" if scheduler.closing else "ok", "model": engine.model_name,
                "engine": engine.name, "active": active, "queued": queued}
        return JSONResponse(body, status_code=503 if scheduler.closing else 200)

    # supervisors may probe with HEAD (same answer, no body); one entry in the schema
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    @app.get("/v1/models", dependencies=key_required)
    async def list_models():
        return {"object": "list", "data": [model_entry(state)]}

    @app.post("/v1/models/load", dependencies=key_required, openapi_extra=body_schema(LoadRequest))
    async def load_model(http_request: HttpRequest):
        if scheduler.closing:
            raise shutting_down()
        body = await asyncio.to_thread(parse_load, await http_request.body(),
                                       http_request.headers.get("content-type"))
        async with state.load_lock:
            try:
                engine = await load_unless_closing(scheduler, state.loader, body.model)
            except ApiError:  # the shutdown's 503
                raise
            except DefaultModelMissing as err:  # says what to run; nothing about the user's files
                raise ApiError(400, str(err), code="model_not_prepared", param="model") from None
            except Exception as err:  # noqa: BLE001  (the same answer for every reason: see above)
                log.warning("cannot load model %r: %s: %s", body.model, type(err).__name__, err)
                raise load_refused(body.model) from None
            if not await asyncio.to_thread(scheduler.swap, engine):
                raise shutting_down()
            state.loaded_at = int(time.time())
        return model_entry(state)

    @app.post("/v1/chat/completions", dependencies=key_required,
              openapi_extra=body_schema(ChatRequest))
    async def chat_completions(http_request: HttpRequest):
        if scheduler.closing:
            raise shutting_down()
        raw = await http_request.body()
        engine = scheduler.engine
        body, messages, params, requested = await asyncio.to_thread(
            read_chat_request, raw, http_request.headers.get("content-type"), state.limits, engine)
        prompt_ids = await encode_unless_gone(state, http_request, engine, messages)
        if prompt_ids is None:  # the client went away while its template rendered
            return JSONResponse({}, status_code=499)
        params.max_tokens = answer_room(prompt_ids, requested, engine, state.limits)
        request = Request(prompt_ids, params, asyncio.get_running_loop(), stream=body.stream)
        try:
            scheduler.submit(request)
        except QueueFull:
            raise ApiError(429, "the server is busy: every slot is in use and the queue is full; "
                                "retry in a moment.", type="server_busy", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ShuttingDown:
            raise shutting_down() from None
        reply = Reply(engine.model_name, request)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(reply.sse(usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await reply.whole(http_request)

    return app


async def encode_unless_gone(state: ServerState, http_request: HttpRequest, engine,
                             messages: list[dict]) -> list[int] | None:
    """encode() on the render threads: the prompt's ids, None once the client has disconnected
    (its render stopped), the shutdown's 503 once the server shuts down, 429 while
    RENDERS_AT_ONCE requests render already."""
    if state.rendering >= RENDERS_AT_ONCE:
        raise render_busy()
    cancelled = threading.Event()
    state.rendering += 1
    encoded = asyncio.get_running_loop().run_in_executor(state.renders, encode, engine, messages,
                                                         cancelled)

    def finished(future):
        state.rendering -= 1
        if not future.cancelled():
            future.exception()  # retrieved: a cancelled render's RenderCancelled is nobody's error

    encoded.add_done_callback(finished)
    try:
        while not (await asyncio.wait({encoded}, timeout=0.25))[0]:
            if state.scheduler.closing:
                raise shutting_down()
            if await http_request.is_disconnected():
                return None
        return encoded.result()
    finally:
        if not encoded.done():
            cancelled.set()


async def load_unless_closing(scheduler: Scheduler, loader: Callable[[str], object], name: str):
    """`loader(name)` on a thread of its own, or the shutdown's 503 as soon as the server shuts
    down: the new engine could not be served anyway, and the load (a .gguf conversion takes
    half a minute) would otherwise be cut off by uvicorn's shutdown timeout with a 500. The
    thread is a daemon, so an abandoned load does not hold the process's exit."""
    loop = asyncio.get_running_loop()
    loaded = loop.create_future()

    def settle(engine, error):
        if loaded.done():
            return
        if error is not None:
            loaded.set_exception(error)
        else:
            loaded.set_result(engine)

    def load():
        try:
            engine, error = loader(name), None
        except Exception as err:  # noqa: BLE001  (the route sorts them out)
            engine, error = None, err
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, engine, error)

    threading.Thread(target=load, name=LOAD_THREAD, daemon=True).start()
    while not loaded.done():
        await asyncio.wait({loaded}, timeout=0.2)
        if scheduler.closing and not loaded.done():
            log.warning("loading model %r abandoned: the server is shutting down", name)
            raise shutting_down()
    return loaded.result()


def load_running() -> bool:
    """Whether a /v1/models/load is still loading (after a shutdown: one that was abandoned)."""
    return any(thread.name == LOAD_THREAD and thread.is_alive() for thread in threading.enumerate())


def body_schema(model) -> dict:
    """A route's body for /docs: bodies are parsed by hand (off the event loop, after the key)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}


def read_chat_request(raw: bytes, content_type: str | None, limits: Limits, engine):
    """(body, messages, params, max_tokens asked for) of a chat request, or a 400 ApiError; on
    a worker thread, since parsing and checking megabytes of JSON takes a while."""
    body = parse_chat(raw, content_type)
    return (body, *check_request(body, limits, engine))


def model_entry(state: ServerState) -> dict:
    return {"id": state.scheduler.engine.model_name, "object": "model",
            "created": state.loaded_at, "owned_by": "rlhf-studio"}


def api_key_checker(api_key: str | None):
    """The routes' key check, before any body is parsed. The header is compared as the bytes
    sent, in constant time, with the key's UTF-8 bytes (what curl and most clients send) and,
    where Latin-1 can write the key, its Latin-1 bytes (HTTP's old header charset, what
    Python's http.client sends): header bytes have no declared charset."""
    accepted = set()
    if api_key is not None:
        accepted.add(b"Bearer " + api_key.encode("utf-8", "surrogateescape"))
        with contextlib.suppress(UnicodeEncodeError):
            accepted.add(b"Bearer " + api_key.encode("latin-1"))

    async def check(http_request: HttpRequest):
        if api_key is None:
            return
        given = http_request.headers.get("authorization", "").encode("latin-1")  # the bytes sent
        if not any([secrets.compare_digest(given, key) for key in accepted]):  # a list: all compared
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: "
                                "Bearer KEY' with the key the server was started with.",
                           code="invalid_api_key")
    return check


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request, err: ApiError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, err: RequestValidationError):
        message, param = validation_message(err.errors())
        return error_response(ApiError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, err: StarletteHTTPException):
        return error_response(ApiError(err.status_code, str(err.detail), type="http_error"))


# ---- replies --------------------------------------------------------------------------------------

class Reply:
    """Turns a request's scheduler events into one chat.completion or a stream of chunks."""

    def __init__(self, model_name: str, request: Request):
        self.request = request
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model_name  # replaced by the checkpoint that admits it (after a swap: the new one)
        self.checked = time.monotonic()  # when the client's connection was last checked

    async def whole(self, http_request: HttpRequest) -> JSONResponse:
        try:
            while True:
                event = await self._next_event(http_request)
                if event is None:  # the client went away: its slots are freed
                    return JSONResponse({}, status_code=499)
                if event[0] == "start":
                    self.model = event[1]
                elif event[0] == "error":
                    return error_response(failure_error(event[1]))
                elif event[0] == "done":
                    break
        finally:
            self.request.cancelled = True  # a no-op once done; frees the slots otherwise
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason, "logprobs": None}
                   for c in self.request.choices]
        return JSONResponse({"id": self.id, "object": "chat.completion", "created": self.created,
                             "model": self.model, "choices": choices, "usage": event[1]})

    async def _next_event(self, http_request: HttpRequest):
        """The next event, or None once the client has disconnected (checked every second)."""
        while True:
            if time.monotonic() - self.checked >= 1.0:
                self.checked = time.monotonic()
                if await http_request.is_disconnected():
                    return None
            try:
                return await asyncio.wait_for(self.request.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                pass

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model, "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    async def sse(self, include_usage: bool):
        """Server-sent events: a role chunk per choice once admitted, content deltas, a finish
        chunk per choice, the usage chunk when asked for, then `data: [DONE]`; an error ends
        the stream with an error event and `data: [DONE]`. Starlette cancels this generator
        when the client disconnects; `finally` then frees the request's slots."""
        try:
            while True:
                event = await self.request.events.get()
                if event[0] == "start":
                    self.model = event[1]
                    for choice in self.request.choices:
                        yield self._chunk([{"index": choice.index, "finish_reason": None,
                                            "delta": {"role": "assistant", "content": ""}}])
                elif event[0] == "delta":
                    yield self._chunk([{"index": event[1], "delta": {"content": event[2]},
                                        "finish_reason": None}])
                elif event[0] == "finish":
                    yield self._chunk([{"index": event[1], "delta": {}, "finish_reason": event[2]}])
                elif event[0] == "error":
                    yield f"data: {json.dumps(failure_error(event[1]).body())}\n\n"
                    break
                elif event[0] == "done":
                    if include_usage:
                        yield self._chunk([], usage=event[1])
                    break
            yield "data: [DONE]\n\n"
        finally:
            self.request.cancelled = True
