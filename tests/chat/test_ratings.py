"""The ratings store: provenance kept, concurrent writers lose nothing, export feeds `train rm`."""
from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from core import ratings
from tests.conftest import ROOT, read_jsonl, run_train
from train import data

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "My name is Ada."},
                {"role": "assistant", "content": "Hello Ada!"},
                {"role": "user", "content": "What is my name?"}]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty store at $RLHF_HOME/ratings.db in a fresh RLHF_HOME."""
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "ratings.db"


def test_store_lives_in_rlhf_home_in_wal_mode(store):
    ratings.add_thumb(CONVERSATION, "Ada.", "runs/sft1/final", up=True)
    assert store.is_file()
    conn = ratings.connect()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_comparison_keeps_its_whole_provenance(store):
    sampling_a = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 64, "seed": 1}
    sampling_b = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 64, "seed": 2}
    rating_id = ratings.add_comparison(CONVERSATION, "Your name is Ada.", "I do not know.",
                                       "runs/ppo1/ema", "runs/sft1/final", "A", sampling_a,
                                       sampling_b, session="tab-1")
    [row] = ratings.rows()
    assert row["id"] == rating_id and row["kind"] == "comparison" and row["session"] == "tab-1"
    assert row["conversation"] == CONVERSATION
    assert (row["answer_a"], row["answer_b"]) == ("Your name is Ada.", "I do not know.")
    assert (row["model_a"], row["model_b"]) == ("runs/ppo1/ema", "runs/sft1/final")
    assert (row["sampling_a"], row["sampling_b"]) == (sampling_a, sampling_b)
    assert row["verdict"] == "A" and row["created_at"] > 1.7e9


@pytest.mark.parametrize("bad", [[], [{"role": "user"}], [{"role": "robot", "content": "hi"}],
                                 CONVERSATION[:3]])
def test_malformed_conversation_is_refused_with_one_sentence(store, bad):
    with pytest.raises(ratings.RatingsError, match="conversation"):
        ratings.add_comparison(bad, "a", "b", "m1", "m2", "A")


def test_unknown_verdict_is_refused(store):
    with pytest.raises(ratings.RatingsError, match="verdict 'C'"):
        ratings.add_comparison(CONVERSATION, "a", "b", "m1", "m2", "C")


def test_export_writes_decisive_votes_as_preference_records(store):
    ratings.add_comparison(CONVERSATION, "Ada.", "Bob.", "m1", "m2", "A", {"seed": 1}, {"seed": 2})
    ratings.add_comparison(CONVERSATION, "Bob.", "Ada.", "m1", "m2", "B")
    ratings.add_comparison(CONVERSATION, "Ada.", "Ada!", "m1", "m2", "tie")
    ratings.add_comparison(CONVERSATION, "Bob.", "Eve.", "m1", "m2", "both_bad")
    first, second = ratings.export_records()
    assert first["prompt"] == CONVERSATION and first["source"] == "ratings"
    assert (first["chosen"], first["rejected"]) == ("Ada.", "Bob.")
    assert (first["chosen_model"], first["rejected_model"]) == ("m1", "m2")
    assert first["chosen_sampling"] == {"seed": 1} and first["verdict"] == "A"
    assert (second["chosen"], second["rejected"], second["chosen_model"]) == ("Ada.", "Bob.", "m2")
    assert ratings.left_out() == {"tie": 1, "both_bad": 1}
    counts = ratings.counts()
    assert counts["total"] == 4 and counts["A"] == counts["B"] == counts["tie"] == 1
    assert counts["exportable"] == 2


def test_thumbs_pair_only_up_with_down_on_the_same_conversation(store):
    other = [{"role": "user", "content": "Hi"}]
    ratings.add_thumb(CONVERSATION, "Your name is Ada.", "m1", up=True, sampling={"seed": 3})
    ratings.add_thumb(other, "Hello!", "m1", up=True)           # no partner: stays unexported
    ratings.add_thumb(CONVERSATION, "Who knows.", "m2", up=False)
    ratings.add_thumb(CONVERSATION, "Ada, I think.", "m2", up=True)  # second up: no partner left
    [record] = ratings.export_records()
    assert (record["chosen"], record["rejected"]) == ("Your name is Ada.", "Who knows.")
    assert (record["chosen_model"], record["rejected_model"]) == ("m1", "m2")
    assert record["verdict"] == "thumbs" and record["chosen_sampling"] == {"seed": 3}
    assert ratings.left_out() == {"unpaired thumbs": 2}


def _vote_many(path, writer: int, count: int) -> None:
    for i in range(count):
        ratings.add_comparison([{"role": "user", "content": f"q{writer}-{i}"}], f"a{i}", f"b{i}",
                               "m1", "m2", "A", session=f"writer-{writer}", path=path)


def test_concurrent_writers_lose_no_vote(tmp_path):
    """Two browser tabs (threads) and two app processes voting at the same time."""
    path = tmp_path / "ratings.db"
    ratings.connect(path).close()
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_vote_many, args=(path, w, 40)) for w in (0, 1)]
    threads = [threading.Thread(target=_vote_many, args=(path, w, 40)) for w in (2, 3)]
    for worker in processes + threads:
        worker.start()
    for worker in processes + threads:
        worker.join(timeout=120)
    assert all(p.exitcode == 0 for p in processes)
    stored = ratings.rows(path)
    assert len(stored) == 160
    per_writer = {w: sum(r["session"] == f"writer-{w}" for r in stored) for w in range(4)}
    assert per_writer == {0: 40, 1: 40, 2: 40, 3: 40}


def test_cli_export_writes_jsonl_and_says_what_it_left_out(store, tmp_path):
    ratings.add_comparison(CONVERSATION, "Ada.", "Bob.", "m1", "m2", "A")
    ratings.add_comparison(CONVERSATION, "Ada.", "Ada!", "m1", "m2", "tie")
    out = tmp_path / "prefs.jsonl"
    done = subprocess.run([sys.executable, "-m", "chat.ratings", "export", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 1 preference records" in done.stdout and "1 tie" in done.stdout
    [record] = read_jsonl(out)
    assert record["chosen"] == "Ada." and record["prompt"] == CONVERSATION


def test_cli_export_to_an_unwritable_path_is_one_sentence(store, tmp_path):
    ratings.add_comparison(CONVERSATION, "Ada.", "Bob.", "m1", "m2", "A")
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = subprocess.run([sys.executable, "-m", "chat.ratings", "export", "--out",
                           str(blocker / "prefs.jsonl")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: cannot write")


def test_data_layer_reads_the_store_as_rm_records(store):
    ratings.add_comparison(CONVERSATION, "Your name is Ada.", "No idea.", "m1", "m2", "B")
    ratings.add_comparison(CONVERSATION, "Ada.", "Ada.", "m1", "m2", "A")  # identical: skipped
    loaded = data.read_source("ratings:")
    assert len(loaded.records) == 1 and loaded.skipped
    records = data.load_data(["ratings:"], "rm", seed=1, log=lambda _: None)
    assert records[0]["chosen"] == "No idea." and records[0]["rejected"] == "Your name is Ada."


def test_ratings_with_a_path_reads_that_store_and_only_it(store, tmp_path):
    """Probe 5 (N3): `ratings:PATH` ignored PATH and trained on the default store; a missing
    or foreign PATH trained on it too."""
    ratings.add_comparison(CONVERSATION, "From the default store.", "No.", "m1", "m2", "A")
    other = tmp_path / "other.db"
    ratings.add_comparison(CONVERSATION, "No.", "From the other store.", "m1", "m2", "B", path=other)
    named = data.read_source(f"ratings:{other}")
    assert [r["chosen"] for r in named.records] == ["From the other store."]
    assert [r["chosen"] for r in data.read_source("ratings:").records] == ["From the default store."]
    (tmp_path / "notes.txt").write_text("not a store")
    for path, says in [(tmp_path / "missing.db", "does not exist"), (tmp_path / "notes.txt", "not a ratings")]:
        with pytest.raises(data.DataError, match=says) as refused:
            data.read_source(f"ratings:{path}")
        assert "--db" not in str(refused.value)  # probe 6 (P4): `python -m train` has no --db


def test_train_rm_runs_on_the_exported_votes(store, tmp_path, tiny_model, monkeypatch):
    for i in range(6):
        prompt = [{"role": "user", "content": f"Say something kind about number {i}."}]
        ratings.add_comparison(prompt, f"{i} is a lovely number.", "No.", "m1", "m2", "A")
        ratings.add_comparison(prompt, "Go away.", f"Number {i} is great!", "m1", "m2", "B")
    out = tmp_path / "rm"
    done = run_train("rm", "--model", str(tiny_model), "--data", "ratings:", "--output", str(out),
                     "--max-steps", "2", "--batch-size", "4", "--fp32", "--eval-every", "0",
                     "--save-every", "0", "--no-tensorboard", "--stats-samples", "4")
    assert done.returncode == 0, done.stderr
    assert "data ratings:: 12 records" in (out / "train.log").read_text()
    assert (out / "final").is_dir()
    assert json.loads((out / "status.json").read_text())["state"] == "done"


def export_cli(*args, db=None):
    argv = [sys.executable, "-m", "chat.ratings", *(["--db", str(db)] if db else []), "export", *args]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_export_never_writes_onto_the_store_or_an_existing_file(tmp_path):
    """Issue 14, item 4: `export --out` naming the database lost every vote."""
    db = tmp_path / "x.db"
    ratings.add_comparison(CONVERSATION, "Ada.", "Bob.", "m1", "m2", "A", path=db)
    done = export_cli("--out", str(db), db=db)
    assert done.returncode == 2 and "is the ratings store itself" in done.stderr
    assert "Traceback" not in done.stderr and len(ratings.rows(db)) == 1
    existing = tmp_path / "prefs.jsonl"
    existing.write_text("keep me\n")
    done = export_cli("--out", str(existing), db=db)
    assert done.returncode == 2 and "already exists" in done.stderr
    assert existing.read_text() == "keep me\n"
    done = export_cli("--out", str(existing), "--overwrite", db=db)
    assert done.returncode == 0 and read_jsonl(existing)[0]["chosen"] == "Ada."
    assert not list(tmp_path.glob(".*.tmp"))  # written beside, then renamed


def test_an_empty_out_is_one_sentence_saying_so(tmp_path):
    """Probe 7, F11: `export --out ""` said ". is not a regular file"."""
    db = tmp_path / "x.db"
    ratings.add_comparison(CONVERSATION, "Ada.", "Bob.", "m1", "m2", "A", path=db)
    done = export_cli("--out", "", db=db)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "error: --out is empty: name the JSONL file to write, or - for standard output.\n"


def test_a_damaged_store_is_one_sentence_naming_the_file_and_the_fix(tmp_path):
    """Issue 14, item 10: a valid header over corrupt pages, and random bytes."""
    db = tmp_path / "damaged.db"
    for i in range(300):  # several pages
        ratings.add_thumb([{"role": "user", "content": f"question {i} " * 20}], "answer " * 30, "m",
                          up=True, path=db)
    raw = bytearray(db.read_bytes())
    raw[4096:len(raw) - 4096] = bytes(range(256)) * ((len(raw) - 8192) // 256) + \
        bytes((len(raw) - 8192) % 256)
    db.write_bytes(bytes(raw))
    done = export_cli("--out", str(tmp_path / "out.jsonl"), db=db)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"the ratings store {db} is damaged" in done.stderr and ".recover" in done.stderr
    noise = tmp_path / "noise.db"
    noise.write_bytes(bytes(range(256)) * 64)
    done = export_cli("--out", str(tmp_path / "out.jsonl"), db=noise)
    assert done.returncode == 2 and "is not a ratings database" in done.stderr
    assert noise.read_bytes() == bytes(range(256)) * 64  # nothing was changed


def test_a_malformed_row_is_skipped_and_counted_on_export(tmp_path):
    db = tmp_path / "x.db"
    ratings.add_comparison(CONVERSATION, "Ada.", "Bob.", "m1", "m2", "A", path=db)
    conn = ratings.connect(db)
    with conn:
        conn.execute("INSERT INTO ratings (kind, created_at, conversation, answer_a, answer_b, "
                     "model_a, model_b, verdict) VALUES ('comparison', 0, 'not json', 'a', 'b', "
                     "'m1', 'm2', 'A')")
    conn.close()
    out = tmp_path / "prefs.jsonl"
    done = export_cli("--out", str(out), db=db)
    assert done.returncode == 0, done.stderr
    assert "wrote 1 preference records" in done.stdout and "1 malformed rows" in done.stdout
    assert len(read_jsonl(out)) == 1


def ratings_cli(*args, db=None, timeout=120):
    argv = [sys.executable, "-m", "chat.ratings", *(["--db", str(db)] if db else []), *args]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_reading_a_store_that_is_not_there_is_one_sentence_and_creates_nothing(tmp_path, monkeypatch):
    """`--db /some/typo.db counts` (and export) once created the store and its folders."""
    typo = tmp_path / "typo" / "folder" / "ratings.db"
    for args in (["counts"], ["export", "--out", str(tmp_path / "prefs.jsonl")]):
        done = ratings_cli(*args, db=typo)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith(f"error: no ratings store at {typo}: vote in the app first")
    for read in (ratings.counts, ratings.export_records, ratings.left_out, ratings.read):
        with pytest.raises(ratings.RatingsError, match="no ratings store at"):
            read(typo)
    assert list(tmp_path.iterdir()) == []  # no folder, no store, no export
    # the app's default store: empty until the first vote, which creates it
    home = tmp_path / "home"
    monkeypatch.setenv("RLHF_HOME", str(home))
    assert ratings.counts()["total"] == 0 and ratings.export_records() == []
    assert ratings.next_pending() is None and ratings.latest_round() == 0 and not home.exists()
    ratings.add_thumb(CONVERSATION, "Ada.", "m", up=True)
    assert (home / "ratings.db").is_file() and ratings.counts()["up"] == 1


def damaged_store(path, wal: bool):
    """A store of several pages whose header is valid and whose other pages are noise."""
    for i in range(300):
        ratings.add_thumb([{"role": "user", "content": f"question {i} " * 20}], "answer " * 30, "m",
                          up=True, path=path)
    if not wal:  # as a store copied by a tool that left it in rollback-journal mode
        conn = ratings.connect(path)
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.close()
    raw = bytearray(path.read_bytes())
    raw[4096:len(raw) - 4096] = bytes(range(256)) * ((len(raw) - 8192) // 256) + \
        bytes((len(raw) - 8192) % 256)
    path.write_bytes(bytes(raw))
    return bytes(raw)


@pytest.mark.parametrize("wal", [True, False], ids=["wal", "rollback-journal"])
def test_a_damaged_store_is_left_exactly_as_it_was(tmp_path, wal):
    """'nothing was changed' is true: reading it (CLI and library) and trying to vote on it
    leave every byte as it was (switching it to WAL once rewrote its header)."""
    db = tmp_path / "damaged.db"
    before = damaged_store(db, wal)
    for args in (["counts"], ["export", "--out", str(tmp_path / "out.jsonl")]):
        done = ratings_cli(*args, db=db)
        assert done.returncode == 2 and f"the ratings store {db} is damaged" in done.stderr, done.stderr
        assert "nothing was changed" in done.stderr and db.read_bytes() == before
    with pytest.raises(ratings.RatingsError, match="is damaged"):
        ratings.rows(db)
    if not wal:  # a vote on it is refused before anything is written
        with pytest.raises(ratings.RatingsError, match="is damaged.*nothing was changed"):
            ratings.add_thumb(CONVERSATION, "Ada.", "m", up=True, path=db)
    assert db.read_bytes() == before and not (tmp_path / "out.jsonl").exists()


def test_an_sqlite_file_that_is_not_a_store_is_refused_and_left_alone(tmp_path):
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE notes (text TEXT)")
    conn.commit()
    conn.close()
    before = other.read_bytes()
    for action in (lambda: ratings.counts(other),
                   lambda: ratings.add_thumb(CONVERSATION, "Ada.", "m", up=True, path=other)):
        with pytest.raises(ratings.RatingsError, match="not a ratings store"):
            action()
    assert other.read_bytes() == before


def test_export_never_writes_onto_a_side_file_of_the_store(tmp_path):
    """Issue 14 (third probe), F2: `export --out ratings.db-journal` wrote JSONL where SQLite
    reads a hot journal, and every later count, export and vote failed with a misleading hint.
    Each side file, however spelled, is refused; a stray journal is named when reading fails."""
    db = tmp_path / "ratings.db"
    ratings.add_comparison(CONVERSATION, "Ada.", "Bob.", "m1", "m2", "A", path=db)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "ratings.db-journal")
    for out in (f"{db}-journal", f"{db}-wal", f"{db}-shm", tmp_path / "sub" / ".." / "ratings.db-journal",
                tmp_path / "link"):
        done = ratings_cli("export", "--out", str(out), "--overwrite", db=db)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "SQLite side files" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ratings.db-journal").exists()
    done = ratings_cli("counts", db=db)
    assert done.returncode == 0 and json.loads(done.stdout)["A"] == 1
    # a file someone else left there: named, with the fix, instead of "check the folder"
    (tmp_path / "ratings.db-journal").write_text('{"prompt": "hi"}\n')
    done = ratings_cli("counts", db=db)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"because of {db}-journal" in done.stderr and "move that file away" in done.stderr


def test_export_refuses_the_side_files_of_a_store_named_through_a_link(tmp_path):
    """Probe 7, F1: with --db spelled through a symlink, the side files were looked for beside
    the link, while SQLite keeps them beside its target: `export --out S.db-wal --overwrite`
    replaced the live WAL (committed votes lost) and then said nothing was changed."""
    real = tmp_path / "data" / "S.db"
    real.parent.mkdir()
    ratings.add_comparison(CONVERSATION, "Ada.", "Bob.", "m1", "m2", "A", path=real)
    link, hard = tmp_path / "L.db", tmp_path / "data" / "H.db"
    link.symlink_to(real)
    os.link(real, hard)  # probe 8, N2: a hard link's side files are named after the other name
    for db in (link, hard):
        for out in (Path(f"{real}{suffix}") for suffix in ("-wal", "-journal", "-shm")):
            done = ratings_cli("export", "--out", str(out), "--overwrite", db=db)
            assert done.returncode == 2 and "SQLite side files" in done.stderr, done.stderr
            assert not out.exists() or b'"chosen"' not in out.read_bytes()  # SQLite's, not an export
    done = ratings_cli("counts", db=link)
    assert done.returncode == 0 and json.loads(done.stdout)["A"] == 1


def test_export_replaces_only_a_regular_file_and_a_store_must_be_one(tmp_path):
    """F4: `--overwrite` renamed a regular file over /dev/full; `--db` on a FIFO hung forever;
    a 300-character --out name ended in a traceback. Each is one sentence; nothing is touched."""
    db = tmp_path / "ratings.db"
    ratings.add_comparison(CONVERSATION, "Ada.", "Bob.", "m1", "m2", "A", path=db)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for out in (fifo, tmp_path):
        done = ratings_cli("export", "--out", str(out), "--overwrite", db=db)
        assert done.returncode == 2 and "is not a regular file" in done.stderr, done.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    done = ratings_cli("counts", db=fifo, timeout=30)
    assert done.returncode == 2 and "is not a regular file" in done.stderr, done.stderr
    with pytest.raises(ratings.RatingsError, match="not a regular file"):
        ratings.add_thumb(CONVERSATION, "Ada.", "m", up=True, path=fifo)
    done = ratings_cli("export", "--out", str(tmp_path / ("x" * 300)), db=db)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "cannot write" in done.stderr and "File name too long" in done.stderr
    long_name = tmp_path / ("y" * 250)  # allowed: the temporary file beside it must be too
    assert ratings_cli("export", "--out", str(long_name), db=db).returncode == 0
    assert read_jsonl(long_name)[0]["chosen"] == "Ada."
    left = {p.name for p in tmp_path.iterdir()} - {"ratings.db-wal", "ratings.db-shm"}
    assert left == {"ratings.db", "fifo", long_name.name}  # no temporary file left behind


@pytest.mark.parametrize("bad", [True, 1.5, "1", None])
def test_undo_refuses_an_id_that_is_not_a_whole_number(tmp_path, bad):
    """`delete(True)` deleted vote #1 and `delete(1.5)` vote #1 too."""
    db = tmp_path / "x.db"
    ratings.add_comparison(CONVERSATION, "Ada.", "Bob.", "m1", "m2", "A", path=db)
    with pytest.raises(ratings.RatingsError, match="not a vote number"):
        ratings.delete(bad, path=db)
    assert len(ratings.rows(db)) == 1
    assert not ratings.delete(2**64, path=db) and ratings.delete(1, path=db) and not ratings.rows(db)


def test_export_never_writes_through_a_link_planted_at_its_temporary_name(tmp_path):
    """Issue 14 (fourth probe, finding 4): links at `.prefs.jsonl.<pid>.tmp` made the export
    replace the victim's content and leave prefs.jsonl a link to it."""
    db = tmp_path / "r.db"
    ratings.add_comparison(CONVERSATION, "Ada.", "Bob.", "m1", "m2", "A", path=db)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out" / "prefs.jsonl"
    out.parent.mkdir()
    (out.parent / f".prefs.jsonl.{os.getpid()}.tmp").symlink_to(victim)
    assert ratings.export(out, db) == 1
    assert victim.read_text() == "keep me"
    assert not out.is_symlink() and read_jsonl(out)[0]["chosen"] == "Ada."


def plant_hostile_rows(db):
    """Rows another tool wrote: a time that is not a number, an A verdict with no answer B, a
    comparison with a thumb's verdict, a thumb with a comparison's verdict."""
    conn = ratings.connect(db)
    conversation = json.dumps(CONVERSATION)
    with conn:
        for created_at, answer_b, verdict, kind, model_a in [
                ("notafloat", "b", "A", "comparison", "m1"), (0, None, "A", "comparison", "m1"),
                (0, "b", "up", "comparison", "m1"), (0, None, "A", "thumb", "m1")]:
            conn.execute("INSERT INTO ratings (kind, created_at, conversation, answer_a, answer_b, "
                         "model_a, model_b, verdict) VALUES (?, ?, ?, 'a', ?, ?, 'm2', ?)",
                         (kind, created_at, conversation, answer_b, model_a, verdict))
    conn.close()
    return 4


def test_rows_with_bad_types_are_skipped_and_counted_everywhere(store, tmp_path):
    """Issue 14 (fourth probe, finding 5): such rows broke the Ratings tab (TypeError) and the
    export wrote "rejected": null, so `train rm` refused the whole file."""
    ratings.add_comparison(CONVERSATION, "Ada.", "Bob.", "m1", "m2", "A")
    bad = plant_hostile_rows(store)
    good, malformed = ratings.read()
    assert len(good) == 1 and malformed == bad
    tally = ratings.counts()
    assert (tally["total"], tally["A"], tally["up"], tally["malformed"], tally["exportable"]) == (1, 1, 0, bad, 1)
    out = tmp_path / "prefs.jsonl"
    done = export_cli("--out", str(out), db=store)
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert "wrote 1 preference records" in done.stdout and f"{bad} malformed rows" in done.stdout
    assert [(r["chosen"], r["rejected"]) for r in read_jsonl(out)] == [("Ada.", "Bob.")]
    assert len(data.read_source(str(out)).records) == 1  # what `train rm --data` reads
    loaded = data.read_source("ratings:")
    assert len(loaded.records) == 1 and f"{bad} malformed ratings rows" in loaded.report()


def test_export_to_a_dash_writes_standard_output(tmp_path):
    """Probe 5: `export --out -` wrote a file named '-' in the current folder."""
    db = tmp_path / "x.db"
    ratings.add_comparison(CONVERSATION, "Ada.", "Bob.", "m1", "m2", "A", path=db)
    done = subprocess.run([sys.executable, "-m", "chat.ratings", "--db", str(db), "export", "--out", "-"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert [(r["chosen"], r["rejected"]) for r in map(json.loads, done.stdout.splitlines())] == \
        [("Ada.", "Bob.")]
    assert "wrote 1 preference records to -" in done.stderr and not (tmp_path / "-").exists()
