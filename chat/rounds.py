"""Rounds of the app's loop: two answers per prompt from the current checkpoint, queued for votes.

A round, as the Ratings and Compare tabs drive it:
1. `prompt_set(source)`: the prompts to answer: the built-in set (prompts/prompts.jsonl), a file
   of prompts, or the conversations people typed in Chat and Compare (the ratings store's);
2. `sample_round(server_url, prompts)`: the inference server holding the round's checkpoint
   answers each prompt twice (two seeds); each pair is queued in the ratings store as a pending
   comparison with the round number, the checkpoint and each answer's sampling settings
   (core/ratings.py `add_pending`);
3. Compare shows `core.ratings.next_pending()` and stores the verdict with
   `core.ratings.vote_pending(id, verdict)`, which keeps the round and provenance;
4. training on `ratings:` (`python -m train dpo --data ratings:`) uses every round's votes;
   the leaderboard can show rounds side by side (`core.leaderboard.votes_from_ratings(rows,
   rounds=...)`).

A pair whose two answers are the same text is not queued: a vote on it can teach nothing.
HTTP only, through chat/client.py: the app never loads weights. Torch-free. Left out: pairs from
two different checkpoints in one round, and rejection of near-duplicate answers.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from chat.client import ChatClient
from core import ratings
from core.ratings import RatingsError

BUILTIN_PROMPTS = Path(__file__).resolve().parents[1] / "prompts" / "prompts.jsonl"
PROMPT_SOURCES = ("builtin", "chat")  # or a file path


def _prompt_of(record, where: str) -> list[dict]:
    """A record's conversation: `prompt` as text or messages (our record format), or the text
    of a line of a .txt file."""
    prompt = record.get("prompt") if isinstance(record, dict) else record
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt.strip()}]
    if isinstance(prompt, list):
        return ratings.check_conversation(prompt)
    raise RatingsError(f"{where}: expected a record with a 'prompt' (text or a list of messages).")


def read_prompts(path: str | Path) -> list[list[dict]]:
    """Conversations from a .txt file (one prompt a line) or a .jsonl/.json file of records with
    a `prompt` field (the format of prompts/prompts.jsonl)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RatingsError(f"prompt file {path} cannot be read ({err}): pass a UTF-8 .txt, .jsonl "
                           "or .json file.") from None
    if path.suffix == ".txt":
        return [_prompt_of(line, f"{path}, line {n}") for n, line in enumerate(text.splitlines(), 1)
                if line.strip()]
    try:
        records = json.loads(text) if path.suffix == ".json" else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise RatingsError(f"{path} is not valid JSON ({err.msg}, line {err.lineno}).") from None
    if not isinstance(records, list):
        raise RatingsError(f"{path}: expected a JSON list of records.")
    return [_prompt_of(r, f"{path}, record {n}") for n, r in enumerate(records)]


def prompt_set(source: str = "builtin", limit: int = 16, seed: int = 0, path=None) -> list[list[dict]]:
    """Up to `limit` conversations (a seeded random choice) for a round: source "builtin",
    "chat" (every conversation in the ratings store at `path`), or a prompt file's path."""
    if source == "builtin":
        conversations = read_prompts(BUILTIN_PROMPTS)
    elif source == "chat":
        conversations = ratings.conversations(path)
    else:
        conversations = read_prompts(source)
    if not conversations:
        raise RatingsError(f"the prompt set {source!r} is empty: chat and vote first, or pick the "
                           "built-in prompts or a file.")
    picked = random.Random(seed).sample(range(len(conversations)), min(limit, len(conversations)))
    return [conversations[i] for i in sorted(picked)]


def sample_round(server_url: str, conversations: list[list[dict]], model: str | None = None,
                 round: int | None = None, temperature: float = 0.8, top_p: float = 0.95,
                 max_tokens: int = 256, seed: int = 0, source: str = "", api_key: str | None = None,
                 path=None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Ask the server at `server_url` for two answers to each conversation and queue the pairs
    for votes. `model` is the checkpoint named in the votes' provenance (default: what the
    server says it holds); `round` defaults to a new one (`latest_round() + 1`); each answer's
    seed is drawn from `seed`. `progress(done, total)` is called after each conversation.
    Returns {"round", "model", "queued", "identical", "pending_ids"}. Server failures raise
    chat.client.ServerError with one sentence; pairs queued before stay queued."""
    round = ratings.latest_round(path) + 1 if round is None else ratings.check_round(round)
    client = ChatClient(server_url, api_key=api_key)
    try:
        model = model or client.health().get("model") or "served"
        seeds = random.Random(seed)
        queued, identical = [], 0
        for done, conversation in enumerate(conversations, 1):
            conversation = ratings.check_conversation(conversation)
            sampling = [{"temperature": float(temperature), "top_p": float(top_p),
                         "max_tokens": int(max_tokens), "seed": seeds.randrange(2**31)}
                        for _ in range(2)]  # the server takes only JSON numbers of these types
            answers = [client.complete(conversation, **s)[0] for s in sampling]
            if answers[0].strip() == answers[1].strip():
                identical += 1
            else:
                queued.append(ratings.add_pending(conversation, answers[0], answers[1], model, model,
                                                  sampling[0], sampling[1], round=round,
                                                  source=source, path=path))
            if progress is not None:
                progress(done, len(conversations))
    finally:
        client.close()
    return {"round": round, "model": model, "queued": len(queued), "identical": identical,
            "pending_ids": queued}
