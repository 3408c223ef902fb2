"""The API key (probe 4, finding 7): checked before a body is parsed on every protected route
(an anonymous malformed body on /v1/models/load got a 400 parse error, not 401), and compared
as the bytes a client sends: a non-ASCII key matched only as Latin-1 bytes, not as UTF-8 (what
curl and most clients send). Through HTTP on the tiny model."""
from __future__ import annotations

import http.client

import httpx
import pytest

from serving.engines import load_engine
from tests.serving import running_server

KEY = "s3cret-kéy"


@pytest.fixture(scope="module")
def engine(tiny_model):
    return load_engine(str(tiny_model), "hf", slots=2, max_len=1024, dtype="fp32")


@pytest.fixture(scope="module")
def keyed_url(engine):
    with running_server(engine, api_key="s3cret") as url:
        yield url


def status_with(url: str, authorization: bytes | None, path: str = "/v1/models") -> int:
    """The status of GET `path` with these exact bytes as the Authorization header's value."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path, headers={} if authorization is None else
                           {"Authorization": authorization})  # bytes are sent as they are
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.parametrize("path, body", [
    ("/v1/models/load", b"{not json"), ("/v1/models/load", b"{}"), ("/v1/models/load", b""),
    ("/v1/chat/completions", b"{not json"), ("/v1/chat/completions", b'{"messages": []}'),
])
def test_a_missing_key_is_answered_401_before_the_body_is_parsed(keyed_url, path, body):
    response = httpx.post(f"{keyed_url}{path}", content=body, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("key", [KEY, "ключ-42"], ids=["latin-1 letters", "cyrillic"])
def test_a_non_ascii_key_matches_as_utf8_and_latin1_bytes(engine, key):
    with running_server(engine, api_key=key) as url:
        assert status_with(url, b"Bearer " + key.encode("utf-8")) == 200
        if key == KEY:  # a key Latin-1 can write may also come as Latin-1 bytes
            assert status_with(url, b"Bearer " + key.encode("latin-1")) == 200
        twice = key.encode("utf-8").decode("latin-1").encode("utf-8")  # UTF-8 of the UTF-8 bytes
        for wrong in (None, b"Bearer ", b"Bearer " + key.encode("utf-8")[:-1], b"Bearer " + twice,
                      key.encode("utf-8")):
            assert status_with(url, wrong) == 401, wrong
