"""What a chat request may ask for, checked before it joins the batch; errors in OpenAI's shape.

Every sampling parameter is held to the range the sampler really handles, so a request that
passes can never fail inside a decode step shared with others:
- `seed`: 0 to 2**63-1 (the generator's range; 2**64 once failed every request in flight);
- `temperature`: 0 to 2, finite; below `MIN_TEMPERATURE` (0.01) the answer is greedy, as at 0
  (dividing logits by 1e-45 overflows to inf and the sample is noise);
- `top_p`: above 0 up to 1, finite; `n`: 1 to `MAX_N` and at most the server's slots;
- `max_tokens` (or `max_completion_tokens`): 1 to the server's limit and the room the model's
  context leaves after the prompt;
- `stop`: at most `MAX_STOPS` strings of at most `MAX_STOP_CHARS` characters;
- `messages`: system, user and assistant turns (text, or a list of text parts), ending with a
  user turn (an empty list, only a system prompt or an assistant turn last is refused); at most
  `MAX_MESSAGES` (2048) of them, counted before they are validated one by one; a conversation
  longer than the prompt limit is refused, by a byte bound before tokenising when it is far too
  long, else by its token count; at most `MAX_CONTENT_PARTS` (4096) text parts in all, counted
  before pydantic validates them (160,000 empty parts kept it busy ~1 s, holding the GIL);
- the body: at most `MAX_JSON_ITEMS` (100,000) JSON items (strings, objects, arrays and the
  commas between values; text inside strings does not count) and `MAX_JSON_CONTAINERS`
  (10,000) objects and arrays, counted before it is parsed: a 4 MB body of empty lists took
  0.5 s to parse, holding the GIL, even in a field that is ignored, and objects and arrays
  made by the hundred thousand set off Python's full garbage collections (~0.3 s each, also
  holding it, in a server with a model loaded). A conversation at the other limits has under
  45,000 items and 8,200 objects and arrays.
Other OpenAI fields are accepted and ignored. JSON's NaN and Infinity are refused everywhere, and
so is a value of the wrong JSON type (booleans are not integers, numeric strings not numbers).
`parse_chat` and `parse_load` read a body (JSON, then these fields); the API runs them on a
worker thread, so a body of megabytes never holds up the event loop that streams other answers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import from_json

from serving.request import Params
from serving.templates import RenderBusy, RenderCancelled, TemplateError

MAX_N = 8
MAX_STOPS = 4
MAX_STOP_CHARS = 200
MAX_SEED = 2**63 - 1
MIN_TEMPERATURE = 0.01
MAX_MESSAGES = 2048
MAX_CONTENT_PARTS = 4096
MAX_JSON_ITEMS = 100_000
MAX_JSON_CONTAINERS = 10_000
BODY_HINT = "send a JSON object with 'messages', a list of chat messages ending with a user turn"
LOAD_HINT = "send a JSON object with 'model', a checkpoint folder or 'default'"
# a JSON string with its escapes taken out (json_size), an opening bracket (group 1) or a comma
# outside strings; a string that never closes runs to the end, so each byte is read once
JSON_ITEM = re.compile(rb'"[^"]*"?|([\[{])|,')


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.code, self.param, self.headers = code, param, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


@dataclass
class Limits:
    max_tokens: int = 1024         # the most tokens one answer may ask for
    max_prompt_tokens: int = 2048  # the longest conversation (after the chat template) accepted


# ---- request bodies -------------------------------------------------------------------------------

class Strict(BaseModel):
    # strict: JSON types as written ("stream": "yes", "seed": true or "42", "n": 2.0 and
    # "temperature": "0.5" are refused, not coerced); an integer is still a number
    model_config = ConfigDict(allow_inf_nan=False, strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class StreamOptions(Strict):
    include_usage: bool = False


class ChatRequest(Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None


class LoadRequest(Strict):
    model: str = Field(min_length=1, max_length=4096)


# ---- checks ---------------------------------------------------------------------------------------

def validation_message(errors: list[dict], hint: str = BODY_HINT) -> tuple[str, str | None]:
    """One sentence for the first problem pydantic found (`hint`: what the route takes), and
    the parameter it concerns."""
    error = errors[0]
    parts = [str(p) for p in error["loc"] if p != "body"]
    param = ".".join(parts).replace(".[", "[") or None
    if error["type"] == "json_invalid":
        return (f"the request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')}): "
                f"{hint}."), None
    if param is None and error["type"] == "missing":
        return f"the request body is empty: {hint}.", None
    if param is None:
        return f"the request body is not a JSON object: {hint}.", None
    if error["type"] == "missing":
        return f"'{param}' is required: {hint}.", param
    return f"'{param}': {error['msg'].rstrip('.')}.", param


def json_size(raw: bytes, max_items: int) -> tuple[int, int]:
    """(items, objects and arrays) in the JSON text `raw`, items being its strings, objects,
    arrays and commas outside strings; counting stops past `max_items`. In steps that let other
    threads run between them (pydantic's parser holds the GIL until it is done). Escapes go
    first, an escaped backslash before an escaped quote, as a JSON reader meets them: matching
    them in the pattern took time quadratic in the length of an unclosed string of them (probe 5)."""
    plain = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    items = containers = 0
    for items, match in enumerate(JSON_ITEM.finditer(plain), start=1):
        if items > max_items:
            break
        if match.lastindex:
            containers += 1
    return items, containers


def read_json_object(raw: bytes, content_type: str | None, hint: str) -> dict:
    """The JSON object in a body, or a 400 ApiError whose sentence ends with `hint`. A body of
    another content type is refused, as FastAPI's own parsing does."""
    media = (content_type or "application/json").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(400, f"the request body is {media}, not JSON: send it with the header "
                            "'Content-Type: application/json'.")
    if not raw.strip():
        raise ApiError(400, f"the request body is empty: {hint}.")
    items, containers = json_size(raw, MAX_JSON_ITEMS)
    if items > MAX_JSON_ITEMS:
        raise ApiError(400, f"the request body has more JSON items (strings, objects, arrays and "
                            f"the values in them) than this server's limit of {MAX_JSON_ITEMS}: "
                            f"{hint}.", code="request_too_complex")
    if containers > MAX_JSON_CONTAINERS:
        raise ApiError(400, f"the request body has {containers} JSON objects and arrays, over this "
                            f"server's limit of {MAX_JSON_CONTAINERS}: {hint}.",
                       code="request_too_complex")
    try:
        data = from_json(raw)
    except ValueError as err:
        raise ApiError(400, f"the request body is not valid JSON ({err}): {hint}.") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body is not a JSON object: {hint}.")
    return data


def parse_chat(raw: bytes, content_type: str | None) -> ChatRequest:
    """The chat request in a body (call it off the event loop: megabytes take a while), or a
    400 ApiError. Messages and parts are counted before pydantic validates them one by one."""
    data = read_json_object(raw, content_type, BODY_HINT)
    messages = data.get("messages")
    if isinstance(messages, list):
        if len(messages) > MAX_MESSAGES:
            raise ApiError(400, f"the conversation has {len(messages)} messages, over this server's "
                                f"limit of {MAX_MESSAGES}: drop early turns.", param="messages",
                           code="context_length_exceeded")
        parts = sum(len(m["content"]) for m in messages
                    if isinstance(m, dict) and isinstance(m.get("content"), list))
        if parts > MAX_CONTENT_PARTS:
            raise ApiError(400, f"the conversation has {parts} content parts, over this server's "
                                f"limit of {MAX_CONTENT_PARTS}: join each message's text parts "
                                "into one string.", param="messages")
    return validated(ChatRequest, data, BODY_HINT)


def parse_load(raw: bytes, content_type: str | None) -> LoadRequest:
    """The model to load named in a body (call it off the event loop), or a 400 ApiError."""
    return validated(LoadRequest, read_json_object(raw, content_type, LOAD_HINT), LOAD_HINT)


def validated(model: type[Strict], data: dict, hint: str):
    """`data` as a `model`, or a 400 ApiError for its first problem."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        message, param = validation_message(err.errors(), hint)
        raise ApiError(400, message, param=param) from None


def check_request(body: ChatRequest, limits: Limits, engine) -> tuple[list[dict], Params, int | None]:
    """(messages, generation settings, max_tokens asked for) of a request, or a 400 ApiError;
    everything that can be checked before tokenising."""
    requested = body.max_completion_tokens or body.max_tokens
    if requested is not None and requested > limits.max_tokens:
        raise ApiError(400, f"max_tokens {requested} is over this server's limit of "
                            f"{limits.max_tokens}: ask for fewer tokens.", param="max_tokens")
    slots = engine.decoder.slots
    if body.n > slots:
        raise ApiError(400, f"n={body.n} needs {body.n} slots but the server has {slots}: ask for "
                            "fewer choices.", param="n")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"{len(stops)} stop sequences given: pass at most {MAX_STOPS}.", param="stop")
    if any(len(stop) > MAX_STOP_CHARS for stop in stops):
        raise ApiError(400, f"a stop sequence is longer than {MAX_STOP_CHARS} characters: pass "
                            "shorter ones.", param="stop")
    messages = [m.plain() for m in body.messages]
    if messages[-1]["role"] != "user":
        last = "an assistant" if messages[-1]["role"] == "assistant" else "a system"
        raise ApiError(400, f"the conversation ends with {last} message: end it with the user "
                            "turn to answer.", param="messages")
    limit = prompt_limit(engine, limits)
    if len(messages) > limit:  # every message costs a token at least (its role's marker)
        raise ApiError(400, f"the conversation has {len(messages)} messages, over this server's "
                            f"limit of {limit} tokens: drop early turns.", param="messages",
                       code="context_length_exceeded")
    size = sum(len(m["content"].encode("utf-8", "replace")) for m in messages)
    # a token stands for at most max_token_bytes of text (4x that leaves room for normalisers
    # that shrink text): past this bound the conversation is over the limit without tokenising
    # it, which takes seconds for megabytes
    if size > 4 * limit * engine.max_token_bytes:
        raise ApiError(400, f"the conversation ({size} bytes of text) is far over this server's "
                            f"limit of {limit} tokens: shorten it or drop early turns.",
                       param="messages", code="context_length_exceeded")
    temperature = 0.0 if body.temperature < MIN_TEMPERATURE else body.temperature
    params = Params(max_tokens=requested or 0, temperature=temperature, top_p=body.top_p,
                    n=body.n, stop=[s for s in stops if s], seed=body.seed)
    return messages, params, requested


def prompt_limit(engine, limits: Limits) -> int:
    return min(limits.max_prompt_tokens, engine.max_len - 1)


def render_busy() -> ApiError:
    return ApiError(429, "the server is busy rendering other conversations' chat templates; retry "
                         "in a moment.", type="server_busy", code="render_queue_full",
                    headers={"Retry-After": "1"})


def encode(engine, messages: list[dict], cancelled=None) -> list[int]:
    """Prompt token ids (call it off the event loop), or a 400 ApiError (429 while every
    chat-template process is taken); RenderCancelled once the `cancelled` event is set."""
    try:
        return engine.encode_chat(messages, cancelled)
    except RenderCancelled:
        raise
    except RenderBusy:
        raise render_busy() from None
    except TemplateError as err:  # the template's own cost (time, memory, size): not the request's fault
        raise ApiError(400, f"the model's chat template cannot render this conversation: {err}",
                       param="messages") from None
    except Exception as err:  # noqa: BLE001  (chat templates raise their own errors)
        raise ApiError(400, f"the model's chat template rejected these messages ({err}): "
                            "check the order of roles.", param="messages") from None


def answer_room(prompt_ids: list[int], requested: int | None, engine, limits: Limits) -> int:
    """max_tokens for this prompt (the request's, or all the room left), or a 400 ApiError."""
    limit = prompt_limit(engine, limits)
    if len(prompt_ids) > limit:
        raise ApiError(400, f"the conversation is {len(prompt_ids)} tokens, over this server's "
                            f"limit of {limit}: shorten it or drop early turns.",
                       param="messages", code="context_length_exceeded")
    room = engine.max_len - len(prompt_ids)
    max_tokens = requested or min(limits.max_tokens, room)
    if max_tokens > room:
        raise ApiError(400, f"the conversation ({len(prompt_ids)} tokens) plus max_tokens "
                            f"({max_tokens}) exceeds the model's {engine.max_len}-token context: "
                            f"ask for at most {room} tokens.", param="max_tokens",
                       code="context_length_exceeded")
    return max_tokens
