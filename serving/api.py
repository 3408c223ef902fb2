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
has not arrived within the body timeout (its connection is closed), 429 with Retry-After
when the queue is full, 503 while shutting down. An error inside one request answers that
request alone (500 before a stream starts, else an error event and `data: [DONE]`) and leaves
the connection usable. With an API key every /v1 route and /openapi.json need `Authorization:
Bearer KEY`, as OpenAI's do; /docs and /redoc are then off; /health stays open for
supervisors. A model that cannot be loaded gets one sentence whatever the reason (missing, not
a model, pickled weights, a hub name not cached: hub names are never downloaded here), so a
client cannot probe the server's files; the server's log has the reason. Chat bodies are
parsed and checked, and prompts tokenised, on worker threads, never on the event loop. The `model` field of a chat request is
accepted and ignored: the server serves the one loaded checkpoint.

Left out: tools and function calling, logprobs, response_format, penalties (other fields are
accepted and ignored, as many OpenAI-compatible servers do), the legacy /v1/completions route.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import secrets
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from fastapi import Depends, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from core.models import DefaultModelMissing
from serving.request import Failure, Request
from serving.scheduler import QueueFull, Scheduler, ShuttingDown
from serving.validation import (BODY_HINT, ApiError, ChatRequest, Limits, LoadRequest,
                                answer_room, check_request, encode, error_response, parse_chat,
                                validation_message)

__all__ = ["Limits", "bind", "create_app", "uvicorn_server"]
log = logging.getLogger("serving")
MAX_BODY_BYTES = 4 * 2**20
BODY_TIMEOUT_S = 30.0


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down: send the request again once it is back.",
                    type="server_error", code="server_shutting_down")


def failure_error(failure: Failure) -> ApiError:
    kind = "server_error" if failure.status >= 500 else "invalid_request_error"
    return ApiError(failure.status, failure.message, type=kind, code=failure.code)


def load_refused(name: str) -> ApiError:
    return ApiError(400, f"model {name!r} was not found or is not a model this server can load: "
                         "pass a run's final/ or ema/ folder, a Hugging Face model folder with "
                         "safetensors weights, a .gguf file or 'default' (the server's log says "
                         "why).", code="model_not_loadable", param="model")


# ---- the app --------------------------------------------------------------------------------------

@dataclass
class ServerState:
    scheduler: Scheduler
    limits: Limits
    api_key: str | None
    loader: Callable[[str], object]  # model name -> Engine (load_engine with the CLI's options)
    loaded_at: int = 0
    load_lock: asyncio.Lock | None = None


def create_app(scheduler: Scheduler, loader: Callable[[str], object], limits: Limits | None = None,
               api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    """The FastAPI app around a (not yet started) scheduler; starts and stops it with the app."""
    state = ServerState(scheduler, limits or Limits(), api_key, loader, int(time.time()))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        state.load_lock = asyncio.Lock()
        asyncio.get_running_loop().set_exception_handler(ResourceErrorLog())
        scheduler.start()
        yield
        scheduler.stop()

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

    @app.post("/v1/models/load", dependencies=key_required)
    async def load_model(body: LoadRequest):
        if scheduler.closing:
            raise shutting_down()
        async with state.load_lock:
            try:
                engine = await asyncio.to_thread(state.loader, body.model)
            except DefaultModelMissing as err:  # says what to run; nothing about the user's files
                raise ApiError(400, str(err), code="model_not_prepared", param="model") from None
            except Exception as err:  # noqa: BLE001  (the same answer for every reason: see above)
                log.warning("cannot load model %r: %s: %s", body.model, type(err).__name__, err)
                raise load_refused(body.model) from None
            if not await asyncio.to_thread(scheduler.swap, engine):
                raise shutting_down()
            state.loaded_at = int(time.time())
        return model_entry(state)

    @app.post("/v1/chat/completions", dependencies=key_required, openapi_extra=CHAT_BODY_SCHEMA)
    async def chat_completions(http_request: HttpRequest):
        if scheduler.closing:
            raise shutting_down()
        raw = await http_request.body()
        engine = scheduler.engine
        body, messages, params, requested = await asyncio.to_thread(
            read_chat_request, raw, http_request.headers.get("content-type"), state.limits, engine)
        prompt_ids = await asyncio.to_thread(encode, engine, messages)
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


# the body is parsed by hand (off the event loop, see read_chat_request): its schema for /docs
CHAT_BODY_SCHEMA = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": ChatRequest.model_json_schema()}}}}


def read_chat_request(raw: bytes, content_type: str | None, limits: Limits, engine):
    """(body, messages, params, max_tokens asked for) of a chat request, or a 400 ApiError; on
    a worker thread, since parsing and checking megabytes of JSON takes a while."""
    body = parse_chat(raw, content_type)
    return (body, *check_request(body, limits, engine))


def model_entry(state: ServerState) -> dict:
    return {"id": state.scheduler.engine.model_name, "object": "model",
            "created": state.loaded_at, "owned_by": "rlhf-studio"}


def api_key_checker(api_key: str | None):
    async def check(http_request: HttpRequest):
        if api_key is None:
            return
        given = http_request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
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
        if err.status_code == 400:  # FastAPI could not parse the body (e.g. JSON nested too deep)
            return error_response(ApiError(400, f"the request body could not be read as JSON: "
                                                f"{BODY_HINT}."))
        return error_response(ApiError(err.status_code, str(err.detail), type="http_error"))


class Guard:
    """The app's outer layer (pure ASGI). Every body is read here, before the app sees it, and
    replayed to it. A body over `max_body_bytes` is answered 413 before it is read: at once by
    its Content-Length, or as soon as a chunked one grows past the limit (counting the bytes
    received, never trusting a header). A body that has not arrived whole `body_timeout_s`
    after its request's headers is answered 408: a client that sends headers and then stalls
    (or trickles) cannot hold a connection, and the file it costs, for ever. A request with
    both Content-Length and Transfer-Encoding (or two lengths) is refused 400 unread: its
    length is ambiguous, the classic way to smuggle a body past a limit. These answers close
    the connection. An error no handler took becomes a 500 in OpenAI's shape here, logged
    once, instead of reaching uvicorn, which would print an ASGI traceback and drop the
    connection."""

    def __init__(self, app, max_body_bytes: int, body_timeout_s: float = BODY_TIMEOUT_S):
        self.app, self.max_body_bytes, self.body_timeout_s = app, max_body_bytes, body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = self._framing_error(scope["headers"])
        if refused is None:
            lengths = [v for k, v in scope["headers"] if k.lower() == b"content-length"]
            if lengths and int(lengths[0]) > self.max_body_bytes:
                receive = None
            else:
                receive = await self._buffered(receive)
            if receive is None:
                refused = ApiError(413, f"the request body is over this server's limit of "
                                        f"{self.max_body_bytes} bytes: send a shorter conversation "
                                        "(the server's --max-body-mb sets it).",
                                   code="request_too_large")
            elif receive is TIMED_OUT:
                refused = ApiError(408, f"the request body did not arrive within "
                                        f"{self.body_timeout_s:g} s: send the whole body at once "
                                        "(the server's --body-timeout sets the limit).",
                                   code="request_timeout")
        if refused is not None:
            return await self._send_error(send, refused, close=True)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:
            pass  # nobody to answer
        except Exception:  # noqa: BLE001  (a bug answers its own request, not the connection)
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if not started:
                await self._send_error(send, ApiError(500, "the server failed on this request: "
                                                           "its log has the details.", type="server_error"))
            else:  # a stream already under way: end it, if the client is still there
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    def _framing_error(headers) -> ApiError | None:
        """A 400 for a request whose body length is ambiguous or not a number, else None."""
        names = [k.lower() for k, _ in headers]
        lengths = [v for k, v in headers if k.lower() == b"content-length"]
        if lengths and b"transfer-encoding" in names:
            return ApiError(400, "the request has both Content-Length and Transfer-Encoding "
                                 "headers: send only one (a chunked body needs no Content-Length).",
                            code="ambiguous_body_length")
        if len(lengths) > 1 or (lengths and not lengths[0].strip().isdigit()):
            return ApiError(400, "the request's Content-Length is given twice or is not a number: "
                                 "send one header with the body's size in bytes.",
                            code="ambiguous_body_length")
        return None

    async def _buffered(self, receive):
        """The body read up to the limit and replayed; None once it is over the limit,
        TIMED_OUT when it has not arrived whole within the body timeout."""
        chunks, size, more = [], 0, True
        deadline = time.monotonic() + self.body_timeout_s
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return TIMED_OUT
            if message["type"] != "http.request":
                return receive  # the client left; the app sees it on its first receive
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                return None
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return replay

    @staticmethod
    async def _send_error(send, error: ApiError, close: bool = False) -> None:
        """The error as JSON; `close`: the body was left unread, so the connection cannot carry
        another request (uvicorn closes it after this answer)."""
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": error.status,
                    "headers": headers + ([(b"connection", b"close")] if close else [])})
        await send({"type": "http.response.body", "body": body})


TIMED_OUT = object()  # _buffered's answer for a body that did not arrive in time


class ResourceErrorLog:
    """The event loop's exception handler: running out of file descriptors (EMFILE, ENFILE:
    every failed accept and connection logs one, with a traceback) is one line per
    `every_s` seconds with a count, so a flood of connections cannot flood the log too;
    anything else goes to asyncio's default handler."""

    def __init__(self, every_s: float = 10.0):
        self.every_s, self.last, self.suppressed = every_s, float("-inf"), 0

    def __call__(self, loop, context):
        err = context.get("exception")
        if not (isinstance(err, OSError) and err.errno in (errno.EMFILE, errno.ENFILE)):
            return loop.default_exception_handler(context)
        now = time.monotonic()
        if now - self.last < self.every_s:
            self.suppressed += 1
            return
        more = f" ({self.suppressed} more since the last report)" if self.suppressed else ""
        log.error("out of file descriptors: %s%s; raise `ulimit -n` or lower --max-connections.",
                  context.get("message", err), more)
        self.last, self.suppressed = now, 0


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


# ---- running it ----------------------------------------------------------------------------------

def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port (port 0: any free one); OSError when taken."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def uvicorn_server(app: FastAPI, log_level: str = "info", max_connections: int | None = None):
    """A uvicorn server for `app`; run it with `.run(sockets=[bind(host, port)])`. Beyond
    `max_connections` open connections (or requests in flight) a new request gets 503 at once
    and its connection is closed, so a flood of connections fails itself, not the process."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5,
                                         limit_concurrency=max_connections))
