"""Rounds: prompts sampled twice through a server that speaks the OpenAI shape, queued as pending
comparisons with their round and provenance, voted on, exported and migrated, all torch-free."""
from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest
from fastapi import FastAPI, Request

from chat import rounds
from chat.client import ServerError
from chat.server import free_port
from core import ratings
from core.ratings import RatingsError


def make_seeded_app(model: str):
    """Answers depend on the seed, except for prompts containing 'same', answered identically."""
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        body = await request.json()
        question = body["messages"][-1]["content"]
        text = "same answer" if "same" in question else f"answer {body['seed']} to {question}"
        text += f" (t={body['temperature']}, max={body['max_tokens']})"
        return {"object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}

    return app


@pytest.fixture
def seeded_server():
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_seeded_app("runs/dpo1/final"), host="127.0.0.1",
                                           port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "ratings.db"


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_a_round_queues_two_answers_per_prompt_with_provenance(store, seeded_server):
    ratings.add_comparison(user("old"), "a", "b", "m1", "m2", "A")  # round 0: outside rounds
    seen = []
    result = rounds.sample_round(seeded_server, [user("Hi?"), user("say the same"), user("Why?")],
                                 temperature=0.7, max_tokens=32, seed=1, source="builtin",
                                 progress=lambda done, total: seen.append((done, total)))
    assert result["round"] == 1 and result["model"] == "runs/dpo1/final"
    assert (result["queued"], result["identical"]) == (2, 1)   # identical answers teach nothing
    assert seen == [(1, 3), (2, 3), (3, 3)]
    first, second = ratings.pending()
    assert [first["id"], second["id"]] == result["pending_ids"]
    assert first["conversation"] == user("Hi?") and first["round"] == 1 and first["source"] == "builtin"
    assert first["model_a"] == first["model_b"] == "runs/dpo1/final"
    seeds = first["sampling_a"]["seed"], first["sampling_b"]["seed"]
    assert first["answer_a"].startswith(f"answer {seeds[0]} to Hi?") and seeds[0] != seeds[1]
    assert first["sampling_a"] == {"temperature": 0.7, "top_p": 0.95, "max_tokens": 32, "seed": seeds[0]}
    assert ratings.round_counts() == {0: {"votes": 1, "waiting": 0, "voted": 0},
                                      1: {"votes": 0, "waiting": 2, "voted": 0}}
    assert rounds.sample_round(seeded_server, [user("Again?")])["round"] == 2   # the next round


def test_a_vote_on_a_pending_pair_keeps_round_and_provenance_and_is_exported(store, seeded_server):
    rounds.sample_round(seeded_server, [user("Hi?"), user("Why?")], round=3)
    item = ratings.next_pending()
    rating_id = ratings.vote_pending(item["id"], "B", session="tab-1")
    [vote] = ratings.rows()
    assert vote["id"] == rating_id and vote["round"] == 3 and vote["verdict"] == "B"
    assert (vote["answer_a"], vote["sampling_b"]) == (item["answer_a"], item["sampling_b"])
    assert ratings.next_pending()["conversation"] == user("Why?")          # the queue moved on
    with pytest.raises(RatingsError, match="not waiting for a vote"):
        ratings.vote_pending(item["id"], "A")                              # a second tab was slower
    [record] = ratings.export_records()
    assert record["round"] == 3 and record["chosen"] == item["answer_b"]
    assert ratings.round_counts()[3] == {"votes": 1, "waiting": 1, "voted": 1}
    assert ratings.discard_pending(round=3) == 1 and ratings.next_pending() is None


def test_prompt_sets_builtin_file_and_chat(store, tmp_path):
    builtin = rounds.prompt_set("builtin", limit=5, seed=2)
    assert len(builtin) == 5 and all(c[-1]["role"] == "user" for c in builtin)
    assert builtin == rounds.prompt_set("builtin", limit=5, seed=2)        # seeded
    text = tmp_path / "mine.txt"
    text.write_text("First question?\n\nSecond question?\n")
    assert rounds.prompt_set(str(text), limit=10) == [user("First question?"), user("Second question?")]
    records = tmp_path / "mine.jsonl"
    records.write_text(json.dumps({"prompt": "Plain text?"}) + "\n"
                       + json.dumps({"prompt": [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Messages?"}]}) + "\n")
    assert [c[-1]["content"] for c in rounds.prompt_set(str(records))] == ["Plain text?", "Messages?"]
    with pytest.raises(RatingsError, match="is empty"):
        rounds.prompt_set("chat")
    ratings.add_thumb(user("Typed in chat"), "ok", "m1", up=True)
    ratings.add_comparison(user("Typed in chat"), "a", "b", "m1", "m2", "tie")
    assert rounds.prompt_set("chat") == [user("Typed in chat")]          # each conversation once


def test_bad_prompt_files_and_unreachable_servers_are_one_sentence(store, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{"instruction": "no prompt field"}\n')
    with pytest.raises(RatingsError, match="record 1: expected a record with a 'prompt'"):
        rounds.prompt_set(str(broken))
    with pytest.raises(RatingsError, match="cannot be read"):
        rounds.prompt_set(str(tmp_path / "missing.txt"))
    with pytest.raises(ServerError, match="is not reachable"):
        rounds.sample_round(f"http://127.0.0.1:{free_port()}", [user("Hi?")], model="m")
    assert ratings.pending() == []
    with pytest.raises(RatingsError, match="round -1"):
        ratings.add_pending(user("Hi?"), "a", "b", "m", "m", round=-1)


def test_a_store_made_before_rounds_gains_the_column_and_keeps_its_votes(tmp_path):
    """The ratings table as the first release wrote it: no round column, one vote in it."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript("""CREATE TABLE ratings (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
        created_at REAL NOT NULL, session TEXT NOT NULL DEFAULT '', conversation TEXT NOT NULL,
        answer_a TEXT NOT NULL, answer_b TEXT, model_a TEXT NOT NULL, model_b TEXT,
        sampling_a TEXT NOT NULL DEFAULT '{}', sampling_b TEXT, verdict TEXT NOT NULL);""")
    conn.execute("INSERT INTO ratings (kind, created_at, conversation, answer_a, answer_b, model_a, "
                 "model_b, verdict) VALUES ('comparison', 1.0, ?, 'yes', 'no', 'm1', 'm2', 'A')",
                 (json.dumps(user("Old vote?")),))
    conn.commit()
    conn.close()
    [old] = ratings.rows(path)
    assert old["round"] == 0 and old["answer_a"] == "yes"
    ratings.add_comparison(user("New vote?"), "a", "b", "m1", "m2", "B", path=path, round=2)
    assert [r["round"] for r in ratings.export_records(path)] == [0, 2]
    assert ratings.latest_round(path) == 2
