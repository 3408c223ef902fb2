"""The HTTP API: OpenAI Chat Completions (plain and streamed), model listing and switching, health.

Routes:
    POST /v1/chat/completions   messages, temperature, top_p, max_tokens (or
                                max_completion_tokens), stop, n, seed, stream, stream_options
    GET  /v1/models             the loaded checkpoint, as given on the command line or to load
    POST /v1/models/load        {"model": "PATH or default"}: switch checkpoints without a restart
    GET  /health                {"status", "model", "engine", "active", "queued"}

Errors are JSON in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a
malformed request (FastAPI's 422 becomes 400), 401 for a missing or wrong API key, 429 with
Retry-After when the queue is full. With an API key every /v1 route needs `Authorization:
Bearer KEY`, as OpenAI's do; /health stays open for supervisors. The `model` field of a chat
request is accepted and ignored: the server serves the one loaded checkpoint.

Left out: tools and function calling, logprobs, response_format, penalties (other fields are
accepted and ignored, as many OpenAI-compatible servers do), the legacy /v1/completions route.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Callable, Literal

from fastapi import Depends, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.scheduler import Params, QueueFull, Request, Scheduler
from core.errors import UserError

MAX_N = 8
MAX_STOPS = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.code, self.param, self.headers = code, param, headers


def error_response(error: ApiError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.type, "param": error.param,
                      "code": error.code}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


# ---- request bodies -------------------------------------------------------------------------------

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class LoadRequest(BaseModel):
    model: str = Field(min_length=1)


# ---- the app --------------------------------------------------------------------------------------

@dataclass
class Limits:
    max_tokens: int = 1024         # the most tokens one answer may ask for
    max_prompt_tokens: int = 2048  # the longest conversation (after the chat template) accepted


@dataclass
class ServerState:
    scheduler: Scheduler
    limits: Limits
    api_key: str | None
    loader: Callable[[str], object]  # model name -> Engine (load_engine with the CLI's options)
    loaded_at: int = 0
    load_lock: asyncio.Lock | None = None


def create_app(scheduler: Scheduler, loader: Callable[[str], object], limits: Limits | None = None,
               api_key: str | None = None) -> FastAPI:
    """The FastAPI app around a (not yet started) scheduler; starts and stops it with the app."""
    state = ServerState(scheduler, limits or Limits(), api_key, loader, int(time.time()))

    @asynccontextmanager
    async def lifespan(_app):
        state.load_lock = asyncio.Lock()
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="RLHF Studio inference server", lifespan=lifespan)
    app.state.server = state
    add_error_handlers(app)
    key_required = [Depends(api_key_checker(api_key))]

    @app.get("/health")
    async def health():
        active, queued = scheduler.counts()
        engine = scheduler.engine
        return {"status": "ok", "model": engine.model_name, "engine": engine.name,
                "active": active, "queued": queued}

    @app.get("/v1/models", dependencies=key_required)
    async def list_models():
        return {"object": "list", "data": [model_entry(state)]}

    @app.post("/v1/models/load", dependencies=key_required)
    async def load_model(body: LoadRequest):
        async with state.load_lock:
            try:
                engine = await asyncio.to_thread(state.loader, body.model)
            except UserError as err:
                raise ApiError(400, str(err), code="model_not_loadable", param="model") from None
            await asyncio.to_thread(scheduler.swap, engine)
            state.loaded_at = int(time.time())
        return model_entry(state)

    @app.post("/v1/chat/completions", dependencies=key_required)
    async def chat_completions(body: ChatRequest, http_request: HttpRequest):
        engine = scheduler.engine
        prompt_ids, params = validate(body, engine, state.limits, scheduler)
        request = Request(prompt_ids, params, asyncio.get_running_loop(), stream=body.stream)
        try:
            scheduler.submit(request)
        except QueueFull:
            raise ApiError(429, "the server is busy: every slot is in use and the queue is full; "
                                "retry in a moment.", type="server_busy", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        reply = Reply(engine.model_name, request)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(reply.sse(usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await reply.whole(http_request)

    return app


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
        return error_response(ApiError(err.status_code, str(err.detail), type="http_error"))

    @app.exception_handler(Exception)
    async def server_error(_request, err: Exception):  # uvicorn logs the traceback as well
        return error_response(ApiError(500, f"the server failed ({type(err).__name__}: {err}); "
                                            "its log has the details.", type="server_error"))


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One sentence for the first problem pydantic found, and the parameter it concerns."""
    error = errors[0]
    parts = [str(p) for p in error["loc"] if p != "body"]
    param = ".".join(parts).replace(".[", "[") or None
    if error["type"] == "json_invalid":
        return ("the request body is not valid JSON: send a JSON object with 'messages' "
                f"({error.get('ctx', {}).get('error', 'parse error')})."), None
    if error["type"] == "missing":
        return f"'{param}' is required.", param
    where = f"'{param}'" if param else "the request body"
    return f"{where}: {error['msg'].rstrip('.')}.", param


def validate(body: ChatRequest, engine, limits: Limits, scheduler: Scheduler) -> tuple[list[int], Params]:
    """(prompt token ids, generation settings), or a 400 ApiError naming what to change."""
    requested = body.max_completion_tokens or body.max_tokens
    if requested is not None and requested > limits.max_tokens:
        raise ApiError(400, f"max_tokens {requested} is over this server's limit of "
                            f"{limits.max_tokens}: ask for fewer tokens.", param="max_tokens")
    slots = scheduler.engine.decoder.slots
    if body.n > slots:
        raise ApiError(400, f"n={body.n} needs {body.n} slots but the server has {slots}: ask for "
                            "fewer choices.", param="n")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"{len(stops)} stop sequences given: pass at most {MAX_STOPS}.", param="stop")
    try:
        prompt_ids = engine.encode_chat([m.plain() for m in body.messages])
    except Exception as err:  # noqa: BLE001  (chat templates raise their own errors)
        raise ApiError(400, f"the model's chat template rejected these messages ({err}): "
                            "check the order of roles.", param="messages") from None
    prompt_limit = min(limits.max_prompt_tokens, engine.max_len - 1)
    if len(prompt_ids) > prompt_limit:
        raise ApiError(400, f"the conversation is {len(prompt_ids)} tokens, over this server's "
                            f"limit of {prompt_limit}: shorten it or drop early turns.",
                       param="messages", code="context_length_exceeded")
    room = engine.max_len - len(prompt_ids)
    max_tokens = requested or min(limits.max_tokens, room)
    if max_tokens > room:
        raise ApiError(400, f"the conversation ({len(prompt_ids)} tokens) plus max_tokens "
                            f"({max_tokens}) exceeds the model's {engine.max_len}-token context: "
                            f"ask for at most {room} tokens.", param="max_tokens",
                       code="context_length_exceeded")
    params = Params(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                    n=body.n, stop=[s for s in stops if s], seed=body.seed)
    return prompt_ids, params


# ---- replies --------------------------------------------------------------------------------------

class Reply:
    """Turns a request's scheduler events into one chat.completion or a stream of chunks."""

    def __init__(self, model_name: str, request: Request):
        self.request = request
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model_name
        self.checked = time.monotonic()  # when the client's connection was last checked

    async def whole(self, http_request: HttpRequest) -> JSONResponse:
        try:
            while True:
                event = await self._next_event(http_request)
                if event is None:  # the client went away: its slots are freed
                    return JSONResponse({}, status_code=499)
                if event[0] == "error":
                    raise ApiError(500, event[1], type="server_error")
                if event[0] == "done":
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
        """Server-sent events: a role chunk per choice, content deltas, a finish chunk per
        choice, the usage chunk when asked for, then `data: [DONE]`. Starlette cancels this
        generator when the client disconnects; `finally` then frees the request's slots."""
        try:
            for choice in self.request.choices:
                yield self._chunk([{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}])
            while True:
                event = await self.request.events.get()
                if event[0] == "delta":
                    yield self._chunk([{"index": event[1], "delta": {"content": event[2]},
                                        "finish_reason": None}])
                elif event[0] == "finish":
                    yield self._chunk([{"index": event[1], "delta": {}, "finish_reason": event[2]}])
                elif event[0] == "error":
                    yield f"data: {json.dumps({'error': {'message': event[1], 'type': 'server_error'}})}\n\n"
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


def uvicorn_server(app: FastAPI, log_level: str = "info"):
    """A uvicorn server for `app`; run it with `.run(sockets=[bind(host, port)])`."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
