"""Per-session chat state for the app's Chat and Compare tabs, and the checkpoints to chat with.

Each browser session holds its own `ChatSession` or `ArenaSession` (in a `gr.State`), never a
module global, so two tabs never share a conversation. A session keeps the conversation as
OpenAI messages plus, for every answer, the checkpoint and sampling settings that produced it
and the system prompt in force: the provenance a vote stores.

Arena rounds: the same conversation is answered twice (two samples of one checkpoint with
different seeds, or two checkpoints in a random order), both streamed at the same time, shown
as A and B without names until the vote. After the vote the preferred answer (A on a tie or
both bad) joins the conversation and the next user turn starts a new round.

While an answer streams, a session is `streaming`: the app queues messages sent meanwhile
(`queued`, answered in order) and its Stop button sets `stop`, which ends the streams at the next
piece. An answer cut at the token limit (finish reason "length") or stopped is marked where it
is shown, never in the text a vote stores. Left out: editing earlier turns, branching.
"""
from __future__ import annotations

import queue
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

from core.runs import RunInfo

CHAT_STAGES = ("sft", "ppo", "dpo")  # stages whose final/ (and ema/) is a chat model; rm's is not
MARKS = {"length": "*[cut off at the token limit]*", "stopped": "*[stopped]*"}


def shown(text: str, finish: str | None) -> str:
    """An answer as the Chatbot shows it: marked when it was cut off or stopped."""
    mark = MARKS.get(finish or "")
    return f"{text}\n\n{mark}" if mark else text


def with_system(system_prompt: str, turns: list[dict]) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    return messages + [{"role": t["role"], "content": t["content"]} for t in turns]


def new_sampling(temperature: float, top_p: float, max_tokens: int, seed=None) -> dict:
    """The sampling settings of one answer, with a seed drawn when none is given."""
    seed = int(seed) if seed not in (None, "") else random.randrange(2**31)
    return {"temperature": float(temperature), "top_p": float(top_p),
            "max_tokens": int(max_tokens), "seed": seed}


@dataclass
class ChatSession:
    """One tab's multi-turn chat: turns are user and assistant messages; assistant turns also
    carry `model`, `sampling` and `system` (what produced them)."""

    turns: list[dict] = field(default_factory=list)
    streaming: bool = False                            # an answer is being generated
    stop: bool = False                                 # Stop was pressed: end the stream
    queued: list[str] = field(default_factory=list)    # messages sent while streaming

    def history(self) -> list[dict]:
        """The Chatbot's value."""
        return [{"role": t["role"], "content": shown(t["content"], t.get("finish"))}
                for t in self.turns]

    def ask(self, text: str) -> None:
        self.turns.append({"role": "user", "content": text})

    def start_answer(self, model: str, sampling: dict, system_prompt: str) -> list[dict]:
        """Open an empty assistant turn; returns the messages to send for it."""
        messages = with_system(system_prompt, self.turns)
        self.turns.append({"role": "assistant", "content": "", "model": model,
                           "sampling": sampling, "system": system_prompt})
        return messages

    def extend_answer(self, text: str) -> None:
        self.turns[-1]["content"] += text

    def drop_last_answer(self) -> bool:
        """Remove the last answer (to regenerate it); False when there is none."""
        if not self.turns or self.turns[-1]["role"] != "assistant":
            return False
        self.turns.pop()
        return True

    def last_user_text(self) -> str | None:
        return next((t["content"] for t in reversed(self.turns) if t["role"] == "user"), None)

    def rated(self, index: int) -> dict | None:
        """The answer at Chatbot message `index` with the conversation it replied to."""
        if not 0 <= index < len(self.turns) or self.turns[index]["role"] != "assistant":
            return None
        answer = self.turns[index]
        return {"conversation": with_system(answer["system"], self.turns[:index]),
                "answer": answer["content"], "model": answer["model"],
                "sampling": answer["sampling"]}


@dataclass
class ArenaSession:
    """One tab's arena: the shared conversation and the round waiting for a vote."""

    turns: list[dict] = field(default_factory=list)
    system: str = ""
    round: dict | None = None  # {"prompt", "A": {text, model, sampling, finish}, "B": ..., "verdict"}
    streaming: bool = False
    stop: bool = False

    def waiting_for_vote(self) -> bool:
        return self.round is not None and self.round["verdict"] is None

    def start_round(self, text: str, models: tuple[str, str], sampling: dict,
                    system_prompt: str) -> dict:
        """A new round for the user turn `text`; the two models are put in a random order."""
        self.system = system_prompt
        self.turns.append({"role": "user", "content": text})
        first, second = random.sample(list(models), 2) if models[0] != models[1] else models
        self.round = {"prompt": with_system(system_prompt, self.turns), "verdict": None}
        for side, model in (("A", first), ("B", second)):
            self.round[side] = {"text": "", "model": model,
                                "sampling": {**sampling, "seed": random.randrange(2**31)}}
        return self.round

    def views(self) -> tuple[list[dict], list[dict]]:
        """The two Chatbot values: the conversation, then answer A (left) or B (right); after
        the vote both answers stay in view until the next round."""
        shared = [{"role": t["role"], "content": t["content"]} for t in self.turns]
        if self.round is None:
            return shared, list(shared)
        if self.round["verdict"] is not None:
            shared = shared[:-1]  # the kept answer, shown on its own side below
        return tuple(shared + [{"role": "assistant", "content": shown(self.round[side]["text"],
                                                                      self.round[side].get("finish"))}]
                     for side in ("A", "B"))

    def vote(self, verdict: str) -> dict:
        """Close the round: returns the comparison to store; the preferred answer continues."""
        current = self.round
        current["verdict"] = verdict
        kept = current["B"] if verdict == "B" else current["A"]
        self.turns.append({"role": "assistant", "content": kept["text"]})
        return {"conversation": current["prompt"], "answer_a": current["A"]["text"],
                "answer_b": current["B"]["text"], "model_a": current["A"]["model"],
                "model_b": current["B"]["model"], "sampling_a": current["A"]["sampling"],
                "sampling_b": current["B"]["sampling"], "verdict": verdict}

    def undo_vote(self) -> None:
        """Reopen the round (its vote could not be stored)."""
        self.round["verdict"] = None
        self.turns.pop()

    def revealed(self, side: str) -> str | None:
        """`side`'s model and seed once the round is voted on, else None (still anonymous)."""
        if self.round is None or self.round["verdict"] is None:
            return None
        answer = self.round[side]
        return f"{answer['model']} (seed {answer['sampling'].get('seed')})"

    def reveal(self) -> str:
        if self.round is None or self.round["verdict"] is None:
            return ""
        return f"A was **{self.revealed('A')}**, B was **{self.revealed('B')}**."


def chat_checkpoints(runs_dir: str | Path, root: str | Path, stages=CHAT_STAGES) -> list[str]:
    """`default` and every finished run's final/ and ema/ of `stages` (chat models by default;
    also inside `train all` pipeline folders), as paths relative to `root` where they lie under
    it, newest run first. `default` is left out when `stages` holds no chat stage."""
    runs_dir, root = Path(runs_dir), Path(root).resolve()
    found = []
    configs = list(runs_dir.glob("*/config.yaml")) + list(runs_dir.glob("*/*/config.yaml"))
    for config in sorted(configs, key=lambda p: (-p.stat().st_mtime, str(p))):
        folder = config.parent
        run = RunInfo.load(folder)
        if run is None or run.stage not in stages or run.state != "done":
            continue
        for kind in ("final", "ema"):
            if (folder / kind / "config.json").is_file():
                path = (folder / kind).resolve()
                found.append(str(path.relative_to(root)) if path.is_relative_to(root) else str(path))
    return (["default"] if set(stages) & set(CHAT_STAGES) else []) + found


def stream_answer(pool, chat: ChatSession, model: str, sampling: dict, system_prompt: str):
    """Generate the next answer of `chat` through a server holding `model`, yielding after each
    piece, until it ends or `chat.stop` is set; on a server error the half answer is dropped and
    the ServerError raised."""
    messages = chat.start_answer(model, sampling, system_prompt)
    finish = {}
    try:
        with pool.lease(model) as client:
            pieces = client.stream(messages, finish=finish, **sampling)
            try:
                for piece in pieces:
                    chat.extend_answer(piece)
                    yield
                    if chat.stop:
                        finish["reason"] = "stopped"
                        break
            finally:
                pieces.close()  # a stopped stream disconnects: the server frees its slots
    except Exception:
        chat.drop_last_answer()
        raise
    chat.turns[-1]["finish"] = finish.get("reason")


def _read_side(pool, arena: ArenaSession, side: str, events: queue.Queue, halt) -> None:
    """One arena side's stream, piece by piece into `events` (run on its own thread)."""
    answer, finish = arena.round[side], {}
    try:
        with pool.lease(answer["model"]) as client:
            pieces = client.stream(arena.round["prompt"], finish=finish, **answer["sampling"])
            try:
                for piece in pieces:
                    if halt():
                        finish["reason"] = "stopped"
                        break
                    events.put((side, piece))
            finally:
                pieces.close()
        events.put((side, None, finish.get("reason")))
    except Exception as err:  # noqa: BLE001  (handed to the generator, which raises it)
        events.put((side, err))


def stream_round(pool, arena: ArenaSession):
    """Generate both answers of the open arena round at the same time (a thread per side),
    yielding the side after each piece, until both end or `arena.stop` is set; on a server
    error the round and its user turn are dropped and the error raised."""
    events, failed = queue.Queue(), []
    halt = lambda: arena.stop or bool(failed)  # noqa: E731
    readers = [threading.Thread(target=_read_side, args=(pool, arena, side, events, halt),
                                daemon=True) for side in ("A", "B")]
    for reader in readers:
        reader.start()
    pending = {"A", "B"}
    try:
        while pending:
            side, item, *finish = events.get()
            if isinstance(item, Exception):
                failed.append(item)
                pending.discard(side)
            elif item is None:
                arena.round[side]["finish"] = finish[0]
                pending.discard(side)
            elif not failed:
                arena.round[side]["text"] += item
                yield side
    finally:
        failed.append(None)  # a generator closed early (the page went away) ends both streams
        for reader in readers:
            reader.join(timeout=30)
    errors = [e for e in failed if e is not None]
    if errors:
        arena.round = None
        arena.turns.pop()
        raise errors[0]
