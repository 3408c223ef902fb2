"""A chat completion in flight, as the scheduler holds it: its generation settings (`Params`),
its choices (token ids, text, finish reason), the events it sends to the API's event loop, its
own random generator, and the `Failure` it ends with when it cannot be answered.

The event protocol (`Request.events`, an asyncio queue filled from the scheduler's thread):
("start", model name) at admission; ("delta", index, text) (streamed requests only) and
("finish", index, reason) per choice; then ("done", usage). Or ("error", Failure), possibly
before "start".
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from core.sampling import Sampling
from serving.detokenizer import AnswerText


@dataclass
class Failure:
    """Why a request ended without an answer, in the shape of an HTTP error."""
    message: str
    status: int = 500
    code: str = "generation_failed"


def failure_of(err: Exception) -> Failure:
    return Failure(f"generation failed on the server ({type(err).__name__}: {err}): its log has "
                   "the details.")


SHUTDOWN_FAILURE = Failure("the server is shutting down and could not finish this answer: "
                           "send the request again once it is back.", 503, "server_shutting_down")


@dataclass
class Params:
    """One request's generation settings (validated by the API)."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Choice:
    index: int
    slot: int | None = None
    token_ids: list[int] = field(default_factory=list)  # generated, end-of-turn token excluded
    answer: AnswerText | None = None                     # its text, set at admission
    finish_reason: str | None = None                     # "stop" or "length" once done

    @property
    def text(self) -> str:
        return self.answer.text if self.answer is not None else ""


class Request:
    """A chat completion in flight; the scheduler pushes its events (see above) to `events`."""

    def __init__(self, prompt_ids: list[int], params: Params, loop: asyncio.AbstractEventLoop,
                 stream: bool = True):
        self.prompt_ids = prompt_ids
        self.params = params
        self.loop = loop
        self.stream = stream  # False: no "delta" events (the text is read from `choices` at the end)
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set by the API when the client goes away
        self.choices = [Choice(i) for i in range(params.n)]
        self.model_name: str | None = None  # the checkpoint that answers it, set at admission
        self.overtaken = 0  # requests admitted past this one while it waited
        self._generator: torch.Generator | None = None

    def push(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the client's event loop is gone
            self.cancelled = True

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The request's own random stream (seeded from `seed` when given); None for greedy."""
        if self.params.temperature == 0:
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            if self.params.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.params.seed)
        return self._generator

    def sampling(self, end_token: int) -> Sampling:
        p = self.params
        return Sampling(max_new_tokens=p.max_tokens, temperature=p.temperature or 1.0,
                        top_p=p.top_p, eos_token_id=end_token, pad_token_id=end_token,
                        greedy=p.temperature == 0)

    def usage(self) -> dict:
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": completion,
                "total_tokens": len(self.prompt_ids) + completion}
