"""Per-session chat state for the app's Chat and Compare tabs, and the checkpoints to chat with.

Each browser session holds its own `ChatSession` or `ArenaSession` (in a `gr.State`), never a
module global, so two tabs never share a conversation. A session keeps the conversation as
OpenAI messages plus, for every answer, the checkpoint and sampling settings that produced it
and the system prompt in force: the provenance a vote stores.

Arena rounds: the same conversation is answered twice (two samples of one checkpoint with
different seeds, or two checkpoints in a random order), shown as A and B without names until
the vote. After the vote the preferred answer (A on a tie or both bad) joins the conversation
and the next user turn starts a new round. Left out: editing earlier turns, branching.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from core.runs import RunInfo

CHAT_STAGES = ("sft", "ppo", "dpo")  # stages whose final/ (and ema/) is a chat model; rm's is not


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

    def history(self) -> list[dict]:
        """The Chatbot's value."""
        return [{"role": t["role"], "content": t["content"]} for t in self.turns]

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
    round: dict | None = None  # {"prompt", "A": {text, model, sampling}, "B": {...}, "verdict"}

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
        return tuple(shared + [{"role": "assistant", "content": self.round[side]["text"]}]
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

    def reveal(self) -> str:
        if self.round is None or self.round["verdict"] is None:
            return ""
        return (f"A was **{self.round['A']['model']}**, B was **{self.round['B']['model']}** "
                f"(seeds {self.round['A']['sampling']['seed']} and "
                f"{self.round['B']['sampling']['seed']}).")


def chat_checkpoints(runs_dir: str | Path, root: str | Path) -> list[str]:
    """`default` and every finished SFT or PPO run's final/ and ema/ (also inside `train all`
    pipeline folders), as paths relative to `root` where they lie under it."""
    runs_dir, root = Path(runs_dir), Path(root)
    found = []
    for config in sorted(list(runs_dir.glob("*/config.yaml")) + list(runs_dir.glob("*/*/config.yaml"))):
        folder = config.parent
        run = RunInfo.load(folder)
        if run is None or run.stage not in CHAT_STAGES or run.state != "done":
            continue
        for kind in ("final", "ema"):
            if (folder / kind / "config.json").is_file():
                path = (folder / kind).resolve()
                found.append(str(path.relative_to(root.resolve())) if path.is_relative_to(root.resolve())
                             else str(path))
    return ["default"] + found


def stream_answer(pool, chat: ChatSession, model: str, sampling: dict, system_prompt: str):
    """Generate the next answer of `chat` through a server holding `model`, yielding after each
    piece; on a server error the half answer is dropped and the ServerError raised."""
    messages = chat.start_answer(model, sampling, system_prompt)
    try:
        with pool.lease(model) as client:
            for piece in client.stream(messages, **sampling):
                chat.extend_answer(piece)
                yield
    except Exception:
        chat.drop_last_answer()
        raise


def stream_round(pool, arena: ArenaSession):
    """Generate both answers of the open arena round (A, then B), yielding the side after each
    piece; on a server error the round and its user turn are dropped and the error raised."""
    try:
        for side in ("A", "B"):
            answer = arena.round[side]
            with pool.lease(answer["model"]) as client:
                for piece in client.stream(arena.round["prompt"], **answer["sampling"]):
                    answer["text"] += piece
                    yield side
    except Exception:
        arena.round = None
        arena.turns.pop()
        raise
