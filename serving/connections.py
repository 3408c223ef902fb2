"""What a connection may cost the server, below the routes: a deadline for each request's head,
a limit and a deadline for its body, a cap on open connections and a quiet log when files run out.

- `HeadDeadline`: uvicorn's HTTP/1.1 protocol (h11) with a deadline for each request's head:
  a connection that has not sent a whole head `header_timeout_s` after it opened, or after
  its previous answer, is closed (with a 408 if it sent part of one). uvicorn's own timer
  (`timeout_keep_alive`) starts only after a first answer and stops at the first byte, so a
  connection that sent nothing, half a head, or an HTTP/0.9 request line was held for ever,
  and 100 of them kept every client out of a server capped at 100 connections.
- `Guard`: the app's outer layer (pure ASGI): the body limit (413), the body deadline (408),
  ambiguous lengths (400), an error no handler took as a 500 in OpenAI's shape, and a request
  that shutdown cut short as a 503.
- `uvicorn_server`: the server with both, and the connection cap (503 beyond it).

Left out: HTTP/2 and TLS (the server binds loopback by default; a proxy in front does those),
a minimum transfer rate (a body that arrives whole within its deadline may trickle).
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import socket
import time

import h11
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from serving.validation import ApiError

log = logging.getLogger("serving")
MAX_BODY_BYTES = 4 * 2**20
BODY_TIMEOUT_S = 30.0
HEADER_TIMEOUT_S = 10.0


class HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head has not arrived whole
    `header_timeout_s` after the connection opened or its previous answer ended. A request
    under way (its body, its answer) is never cut by it: the body has its own deadline."""

    def __init__(self, *args, header_timeout_s: float = HEADER_TIMEOUT_S, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a whole head arrived (or a bad one was refused)
            self._stop_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may already have started a pipelined request
        self._await_head()

    def connection_lost(self, exc) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._stop_timer()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _stop_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a head came: say why the connection ends
            self.transport.write(head_timeout_answer(self.header_timeout_s))
        self.transport.close()


def head_timeout_answer(timeout_s: float) -> bytes:
    """A whole HTTP/1.1 408 answer, written past h11 (which has no request to answer)."""
    body = json.dumps(ApiError(408, f"the request's headers did not arrive within {timeout_s:g} s: "
                                    "send the whole request at once (the server's --header-timeout "
                                    "sets the limit).", code="request_timeout").body()).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)) + body


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down: send the request again once it is back.",
                    type="server_error", code="server_shutting_down")


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
    connection. A request still running when uvicorn's shutdown gives up on it is cancelled
    (CancelledError, which no `except Exception` sees): it gets the shutdown's 503 here, not
    uvicorn's text/plain 500 and an ASGI traceback."""

    def __init__(self, app, max_body_bytes: int, body_timeout_s: float = BODY_TIMEOUT_S):
        self.app, self.max_body_bytes, self.body_timeout_s = app, max_body_bytes, body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._guarded(scope, receive, tracked)
        except ClientDisconnect:
            pass  # nobody to answer
        except asyncio.CancelledError:  # only uvicorn's shutdown cancels a request's task
            log.warning("%s %s cut short by the shutdown", scope.get("method"), scope.get("path"))
            await self._end(send, started, shutting_down())
        except Exception:  # noqa: BLE001  (a bug answers its own request, not the connection)
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            await self._end(send, started, ApiError(500, "the server failed on this request: its "
                                                         "log has the details.", type="server_error"))

    async def _guarded(self, scope, receive, send) -> None:
        """The request's framing and body checked (answered and closed when refused), then the app."""
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
        await self.app(scope, receive, send)

    @classmethod
    async def _end(cls, send, started: bool, error: ApiError) -> None:
        """Answer `error`, or end a stream already under way if the client is still there."""
        if not started:
            return await cls._send_error(send, error)
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


def uvicorn_server(app, log_level: str = "info", max_connections: int | None = None,
                   header_timeout_s: float = HEADER_TIMEOUT_S):
    """A uvicorn server for `app`; run it with `.run(sockets=[bind(host, port)])`. Beyond
    `max_connections` open connections (or requests in flight) a new request gets 503 at once
    and its connection is closed, so a flood of connections fails itself, not the process; a
    connection that sends no whole request head within `header_timeout_s` is closed, so idle
    ones cannot hold the cap for long."""
    import uvicorn

    protocol = functools.partial(HeadDeadline, header_timeout_s=header_timeout_s)
    return uvicorn.Server(uvicorn.Config(app, http=protocol, log_level=log_level,
                                         timeout_graceful_shutdown=5,
                                         limit_concurrency=max_connections))
