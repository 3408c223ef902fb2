"""What a body may make the server parse and validate (probe 4, finding 1: 160,000 empty content
parts in a 4 MB body kept the validator busy ~1 s each while holding the GIL, so 16 of them
stalled every stream for seconds). Refused with one sentence before the work: JSON items and
objects and arrays before parsing, content parts before validating. The limits count structure,
never text: a conversation full of commas and brackets is not refused by them. Through HTTP on
the tiny model."""
from __future__ import annotations

import json

import httpx
import pytest

import serving.validation
from serving.api import Limits
from serving.engines import load_engine
from serving.validation import MAX_CONTENT_PARTS, MAX_JSON_CONTAINERS, MAX_JSON_ITEMS
from tests.serving import running_server

LIMITS = Limits(max_tokens=900, max_prompt_tokens=100)
HELLO = [{"role": "user", "content": "Hello there"}]
EMPTY_PART = {"type": "text", "text": ""}


@pytest.fixture(scope="module")
def engine(tiny_model):
    return load_engine(str(tiny_model), "hf", slots=2, max_len=1024, dtype="fp32")


@pytest.fixture(scope="module")
def url(engine):
    with running_server(engine, limits=LIMITS) as base:
        yield base


@pytest.fixture
def work(monkeypatch) -> dict[str, list[int]]:
    """The sizes of the bodies the server parsed as JSON, and the conversations it validated."""
    seen = {"parsed": [], "validated": []}
    from_json, validate = serving.validation.from_json, serving.validation.ChatRequest.model_validate
    monkeypatch.setattr(serving.validation, "from_json",
                        lambda raw: seen["parsed"].append(len(raw)) or from_json(raw))
    monkeypatch.setattr(serving.validation.ChatRequest, "model_validate",
                        lambda data: seen["validated"].append(1) or validate(data))
    return seen


def error_of(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


def post(url: str, body: dict | bytes, route: str = "/v1/chat/completions") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    return httpx.post(f"{url}{route}", content=content, timeout=60,
                      headers={"content-type": "application/json"})


def with_junk(body: dict, junk: bytes, count: int) -> bytes:
    """`body` with a field the server ignores: a list of `count` copies of `junk`."""
    return b'{"junk": [' + b",".join([junk] * count) + b"], " + json.dumps(body)[1:].encode()


def test_the_probes_body_of_empty_parts_is_refused_before_it_is_parsed(url, work):
    """160,000 empty parts, under 4 MB: over the JSON item limit (6 items a part)."""
    parts = [EMPTY_PART] * 160_000 + [{"type": "text", "text": "Hello"}]
    error = error_of(post(url, {"messages": [{"role": "user", "content": parts}], "max_tokens": 2}))
    assert f"limit of {MAX_JSON_ITEMS}" in error["message"] and error["message"].endswith(".")
    assert error["code"] == "request_too_complex" and work == {"parsed": [], "validated": []}


def test_content_parts_over_the_limit_are_refused_before_they_are_validated(url, work):
    """Up to MAX_CONTENT_PARTS parts in all (here over two messages) are served; two more are
    refused, counted before pydantic sees the conversation."""
    half = [EMPTY_PART] * (MAX_CONTENT_PARTS // 2)
    last = [*half[1:], {"type": "text", "text": "Hi"}]
    served = post(url, {"max_tokens": 2, "messages": [{"role": "user", "content": half},
                                                      {"role": "user", "content": last}]})
    assert served.status_code == 200, served.text
    work["validated"].clear()
    error = error_of(post(url, {"messages": [{"role": "user", "content": [*half, EMPTY_PART]}] * 2}))
    assert error["param"] == "messages" and f"limit of {MAX_CONTENT_PARTS}" in error["message"]
    assert f"{MAX_CONTENT_PARTS + 2} content parts" in error["message"] and not work["validated"]


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 2}),
    ("/v1/models/load", {"model": "default"}),
], ids=["chat", "load"])
@pytest.mark.parametrize("junk, limit", [(b"0", MAX_JSON_ITEMS), (b"[]", MAX_JSON_CONTAINERS)],
                         ids=["items", "objects and arrays"])
def test_a_body_over_the_json_limits_is_refused_before_it_is_parsed(url, work, route, body, junk,
                                                                    limit):
    """Items the server would ignore cost as much to parse (1.4 M empty lists took 0.5 s), and
    objects and arrays by the hundred thousand set off full garbage collections; half as many
    are parsed and served."""
    error = error_of(post(url, with_junk(body, junk, limit), route))
    assert f"limit of {limit}" in error["message"] and "JSON" in error["message"]
    assert error["code"] == "request_too_complex" and not work["parsed"]
    assert post(url, with_junk(body, junk, limit // 2), route).status_code == 200
    assert work["parsed"]


def test_commas_and_brackets_inside_text_are_not_counted_as_items(url, work):
    """A conversation whose text holds 300,000 commas and brackets is refused by the prompt
    limit (the text is far too long here), not by the JSON item limit."""
    text = "[{a, b}], " * 60_000
    error = error_of(post(url, {"messages": [{"role": "user", "content": text}]}))
    assert "bytes of text" in error["message"] and work["parsed"]


def test_an_unclosed_string_of_escaped_quotes_is_refused_at_once(url):
    """Probe 5: `{"messages":"` then 48,000 escaped quotes (96 KB, a string that never closes)
    froze the server for 48 s: the item counter read the rest of the body again at every
    quote, holding the GIL. This body (400 KB) would take it about an hour; it is refused at
    once, and the next request is served."""
    body = b'{"messages":"' + b'\\"' * 200_000
    error = error_of(post(url, body))
    assert "not valid JSON" in error["message"]
    assert post(url, {"messages": HELLO, "max_tokens": 2}).status_code == 200


def items_of(value) -> tuple[int, int]:
    """(items, objects and arrays) of a parsed JSON value, counted as json_size counts the text:
    every string (keys too), object and array, and the commas between values."""
    if isinstance(value, str):
        return 1, 0
    if not isinstance(value, (list, dict)):
        return 0, 0
    inner = [*value.keys(), *value.values()] if isinstance(value, dict) else value
    counts = [items_of(v) for v in inner]
    return (1 + sum(i for i, _ in counts) + max(len(value) - 1, 0), 1 + sum(c for _, c in counts))


@pytest.mark.parametrize("text", ['\\', '\\"', '"\\', '\\\\"', 'a\\"b",[{', '\\u005c"'])
def test_items_are_counted_the_same_whatever_escapes_the_strings_hold(text):
    """Escapes are taken out before counting: a string full of escaped backslashes and quotes
    is one item, however they are laid out."""
    value = {"messages": [{"role": "user", "content": text * 50}, text], text: [text, [], {}]}
    raw = json.dumps(value).encode()
    assert serving.validation.json_size(raw, 10**6) == items_of(value)


def test_loading_without_a_model_gets_the_load_routes_hint(url):
    """{} on /v1/models/load was told to send 'messages' (the chat route's hint)."""
    for body in ({}, {"model": ""}, {"name": "default"}):
        error = error_of(httpx.post(f"{url}/v1/models/load", json=body, timeout=60))
        assert error["param"] == "model" and "'model'" in error["message"], error
        assert "messages" not in error["message"]
    error = error_of(post(url, b"{not json", "/v1/models/load"))
    assert "not valid JSON" in error["message"] and "'model'" in error["message"]
