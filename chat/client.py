"""HTTP client of the inference server (serving/): OpenAI Chat Completions, streamed or not.

Talks HTTP only, through `httpx`: it never imports serving/ nor loads weights, so the app can
chat with a server in another process (or on another machine). Routes used:
`POST /v1/chat/completions` (with `stream: true`: server-sent `chat.completion.chunk` events
ending with `data: [DONE]`), `GET /v1/models`, `GET /health` and `POST /v1/models/load`.

Every failure (server down, an error answer such as 400 or 429, a broken stream, an error event
inside a stream) is raised as `ServerError` with one sentence for the user. The API key is the
one given, else the environment variable RLHF_API_KEY (the one `python -m serving` reads), so a
server the app starts with that variable set is reachable. Left out: retries, tool calls,
logprobs.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import httpx

SAMPLING_KEYS = ("temperature", "top_p", "max_tokens", "stop", "seed", "n")
API_KEY_VARIABLE = "RLHF_API_KEY"


class ServerError(RuntimeError):
    """The inference server cannot answer; the message says why and what to do."""


def error_message(response: httpx.Response) -> str:
    """The server's own one-sentence error (OpenAI's `{"error": {"message": ...}}` shape)."""
    try:
        body = json.loads(response.read() or b"{}")
        message = body["error"]["message"] if isinstance(body.get("error"), dict) else body.get("detail")
    except (ValueError, KeyError, TypeError, AttributeError):
        message = None
    return str(message or response.reason_phrase or "no message")


class ChatClient:
    """One inference server at `base_url` (e.g. http://127.0.0.1:8000)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 300.0):
        self.base_url = base_url.rstrip("/")
        api_key = api_key or os.environ.get(API_KEY_VARIABLE, "").strip() or None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers,
                                 timeout=httpx.Timeout(timeout, connect=5.0))

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise ServerError(f"the inference server at {self.base_url} is not reachable "
                              f"({type(err).__name__}): start it again from the Chat tab.") from None
        if response.status_code >= 400:
            raise ServerError(f"the inference server refused the request ({response.status_code}): "
                              f"{error_message(response)}")
        try:
            return response.json()
        except ValueError:
            raise ServerError(f"the inference server at {self.base_url} did not answer JSON: "
                              "check that the port belongs to `python -m serving`.") from None

    def health(self) -> dict:
        return self._request("GET", "/health")

    def models(self) -> list[str]:
        return [entry["id"] for entry in self._request("GET", "/v1/models").get("data", [])]

    def load(self, model: str) -> dict:
        """Switch the server to another checkpoint without restarting it."""
        return self._request("POST", "/v1/models/load", json={"model": model})

    def complete(self, messages: list[dict], **sampling) -> list[str]:
        """The answers (one per choice, `n` of them) to the conversation, not streamed."""
        body = {"model": "served", "messages": messages, **_sampling_fields(sampling)}
        answer = self._request("POST", "/v1/chat/completions", json=body)
        choices = sorted(answer.get("choices", []), key=lambda c: c.get("index", 0))
        return [choice["message"]["content"] or "" for choice in choices]

    def stream(self, messages: list[dict], finish: dict | None = None, **sampling) -> Iterator[str]:
        """Yield the answer's text piece by piece as the server generates it (first choice);
        `finish["reason"]` then holds why it ended ("stop", or "length" at the token limit)."""
        body = {"model": "served", "messages": messages, "stream": True,
                **_sampling_fields(sampling)}
        try:
            with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    raise ServerError("the inference server refused the request "
                                      f"({response.status_code}): {error_message(response)}")
                yield from _stream_deltas(response.iter_lines(), finish if finish is not None else {})
        except httpx.HTTPError as err:
            raise ServerError(f"the stream from {self.base_url} broke off ({type(err).__name__}): "
                              "regenerate the answer, or restart the server from the Chat tab.") from None


def _sampling_fields(sampling: dict) -> dict:
    return {key: value for key, value in sampling.items()
            if key in SAMPLING_KEYS and value not in (None, "", [])}


def _stream_deltas(lines, finish: dict) -> Iterator[str]:
    """Text deltas of choice 0 from server-sent event lines, up to `data: [DONE]`; choice 0's
    finish reason goes into `finish["reason"]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, comments and event names
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            return
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise ServerError("the inference server sent a malformed stream event: restart it "
                              "from the Chat tab.") from None
        if "error" in chunk:
            raise ServerError(f"the inference server stopped the answer: {chunk['error'].get('message')}")
        for choice in chunk.get("choices", []):
            text = (choice.get("delta") or {}).get("content")
            if choice.get("index", 0) == 0 and choice.get("finish_reason"):
                finish["reason"] = choice["finish_reason"]
            if choice.get("index", 0) == 0 and text:
                yield text
