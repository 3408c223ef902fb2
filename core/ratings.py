"""The ratings store: every vote cast in the app, with its provenance, in SQLite (WAL mode).

The database lives at `$RLHF_HOME/ratings.db`. One row per vote:

- a comparison (the arena): the conversation so far (messages ending with the user turn), the
  two answers, the model or checkpoint and the sampling settings of each, the verdict
  (`A`, `B`, `tie` or `both_bad`), the browser session and the time;
- a thumb: one answer with its model and sampling, verdict `up` or `down`.

Every write opens its own connection inside one transaction, so several browser tabs (threads
of the app) and several processes can vote at once: WAL lets readers run beside the writer and
`busy_timeout` makes a second writer wait instead of failing.

Export (`export_records`, `export`; on the command line `python -m chat.ratings export --out FILE`) turns votes into
the project's preference records (`prompt`, `chosen`, `rejected`) plus provenance fields, the
format `python -m train rm --data ratings:` reads. What is left out, and why:

- `tie` and `both_bad` comparisons: neither answer is preferred, and train/data.py reads only
  `prompt`/`chosen`/`rejected` (it drops `verdict`), so exporting them would teach a false order;
- thumbs that cannot be paired: a thumb rates one answer, so a pair is formed only from an
  `up` and a `down` answer to the same conversation (the oldest unpaired up with the oldest
  unpaired down; each thumb is used once). Lone thumbs stay in the store for later.

Rounds (the app's loop: sample, vote, train, repeat): every vote carries the `round` it was
cast in (0 for votes outside rounds, and for every vote of a store made before rounds existed:
opening such a store adds the column). A round starts by queueing *pending* comparisons: two
answers to one prompt from the round's checkpoint, with their provenance, waiting in the
`pending` table until someone votes on them in Compare (`next_pending`, `vote_pending`).
chat/rounds.py samples them through the inference server. Exported records keep `round`.

Opening the store: only writes (`add_comparison`, `add_thumb`, `delete`, `add_pending`,
`vote_pending`, `discard_pending`) create it, with its folder. Reads (`read`, `rows`,
`counts`, `export_records`, `export`, `left_out`, `conversations`, the leaderboard's votes)
open an existing store read-only and never change a byte of it: a store that is not there is
one sentence when its path was named (the default store is simply empty until the first
vote); the queue's reads (`pending`, `round_counts`, `latest_round`) find a missing store
empty. A write first looks at an existing file read-only: a file that is not a ratings store
is refused, and before the one-time setup that rewrites the header (WAL mode, tables, the
round column) the whole file is checked (`PRAGMA quick_check`), so "nothing was changed" in
an error is true. A store path must name a regular file (SQLite hangs on a FIFO); a file
beside the store where SQLite expects its journal is named when it keeps the store from
opening. Export never writes onto the store or its side files, nor over anything but a
regular file.

`delete` removes one vote by id (the app's undo). Left out on purpose: editing votes, user
accounts, and deduplicating the same vote cast twice (each click is a vote).
"""
from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
from collections import Counter, defaultdict
from contextlib import closing, contextmanager
from pathlib import Path

from core.errors import UserError
from core.paths import atomic_write, rlhf_home

COMPARISON_VERDICTS = ("A", "B", "tie", "both_bad")
THUMB_VERDICTS = ("up", "down")
ROLES = ("system", "user", "assistant")

SCHEMA = """
CREATE TABLE IF NOT EXISTS ratings (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT NOT NULL,          -- comparison | thumb
    created_at  REAL NOT NULL,          -- seconds since the epoch
    session     TEXT NOT NULL DEFAULT '',
    conversation TEXT NOT NULL,         -- JSON list of messages, ending with the user turn
    answer_a    TEXT NOT NULL,
    answer_b    TEXT,                   -- NULL for a thumb
    model_a     TEXT NOT NULL,
    model_b     TEXT,
    sampling_a  TEXT NOT NULL DEFAULT '{}',   -- JSON: temperature, top_p, max_tokens, seed ...
    sampling_b  TEXT,
    verdict     TEXT NOT NULL,
    round       INTEGER NOT NULL DEFAULT 0   -- the round of the app's loop the vote was cast in
);
CREATE TABLE IF NOT EXISTS pending (        -- comparisons queued for a vote
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    round       INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    conversation TEXT NOT NULL,
    answer_a    TEXT NOT NULL,
    answer_b    TEXT NOT NULL,
    model_a     TEXT NOT NULL,
    model_b     TEXT NOT NULL,
    sampling_a  TEXT NOT NULL DEFAULT '{}',
    sampling_b  TEXT NOT NULL DEFAULT '{}',
    source      TEXT NOT NULL DEFAULT '',   -- the prompt set it came from
    rating_id   INTEGER                     -- NULL while waiting; the vote's id once voted
);
"""


class RatingsError(UserError, ValueError):
    """A vote cannot be stored or read; the message names the cause and the fix."""


class ExportExists(RatingsError):
    """The export's file exists already and replacing it was not asked for."""


def db_path() -> Path:
    return rlhf_home() / "ratings.db"


def store_file(path=None) -> Path:
    """The store's file: `path`, or the default store `db_path()`."""
    return Path(path).expanduser() if path else db_path()


SIDE_FILES = ("-journal", "-wal", "-shm")  # SQLite's files beside a database
JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")  # how a rollback journal starts


def missing_store(path: Path) -> RatingsError:
    return RatingsError(f"no ratings store at {path}: vote in the app first, or pass --db with "
                        "the right path.")


def store_error(path: Path, err: Exception) -> RatingsError:
    """One sentence for what went wrong with the store file, with the fix that fits."""
    text = str(err)
    if "readonly" in text and (stray := _stray_journal(path)) is not None:
        return stray
    if "not a database" in text:
        return RatingsError(f"{path} is not a ratings database (not SQLite): move it aside or point "
                            "--db (or $RLHF_HOME) at the right file; nothing was changed.")
    if "malformed" in text or isinstance(err, sqlite3.DatabaseError) and "corrupt" in text:
        return RatingsError(f"the ratings store {path} is damaged ({text}): copy it aside, recover "
                            f"what it holds with `sqlite3 {path} .recover > votes.sql`, then move "
                            "it away to start a new store; nothing was changed.")
    if isinstance(err, sqlite3.OperationalError) and "locked" in text:
        return RatingsError(f"the ratings store {path} is busy (another process holds a write lock "
                            "for over 30 s): try again in a moment.")
    return RatingsError(f"the ratings store {path} cannot be used ({text}): check that its folder "
                        "($RLHF_HOME) is writable and the file is readable.")


def _stray_journal(path: Path) -> RatingsError | None:
    """The sentence for a `-journal` file beside the store that keeps SQLite from reading it
    (a hot journal: read-only connections cannot roll it back), or None when there is none."""
    journal = Path(f"{path}-journal")
    try:
        with open(journal, "rb") as handle:
            head = handle.read(len(JOURNAL_MAGIC))
    except OSError:
        return None
    if head != JOURNAL_MAGIC:
        return RatingsError(f"the ratings store {path} cannot be read because of {journal} beside "
                            "it, which is not SQLite's journal (a file written there by mistake?): "
                            "move that file away; the store itself was not changed.")
    return RatingsError(f"the ratings store {path} has an unfinished write in {journal} (a program "
                        f"stopped mid-write): run `sqlite3 {path} 'PRAGMA quick_check'` once to roll "
                        "it back (do not delete the journal), then try again.")


def _existing_store(file: Path) -> bool:
    """Whether the store file is there; a path that cannot be a store file (a folder, a FIFO, a
    device: SQLite would hang or fail on them, a name too long) is a RatingsError."""
    try:
        info = file.stat()
    except FileNotFoundError:
        return False
    except OSError as err:
        raise RatingsError(f"the ratings store {file} cannot be used ({err.strerror}): pass --db "
                           "(or $RLHF_HOME) with the path of a ratings database.") from None
    if not stat.S_ISREG(info.st_mode):
        raise RatingsError(f"the ratings store {file} is not a regular file (a folder, device, FIFO "
                           "or socket): pass --db (or $RLHF_HOME) with the path of a ratings "
                           "database.")
    return True


@contextmanager
def _reading(path):
    """Store errors raised inside become one RatingsError sentence."""
    try:
        yield
    except (OSError, sqlite3.Error) as err:
        raise store_error(store_file(path), err) from None


def _open_read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot write to the file (SQLite may add its -wal/-shm side files)."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
    conn.row_factory = sqlite3.Row
    return conn


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _not_a_store(path: Path) -> RatingsError:
    return RatingsError(f"{path} is an SQLite database but not a ratings store (it has no "
                        "ratings table): point --db (or $RLHF_HOME) at the right file; nothing "
                        "was changed.")


@contextmanager
def _reader(path=None, missing_ok: bool = False):
    """A read-only connection to an existing store, or None when there is none and that is
    fine (`missing_ok`, or the default store before its first vote); a named store that is not
    there is a RatingsError. Store errors inside become one sentence."""
    file = store_file(path)
    if not _existing_store(file):
        if missing_ok or not path:
            yield None
            return
        raise missing_store(file)
    with _reading(file), closing(_open_read_only(file)) as conn:
        if "ratings" not in _tables(conn):
            raise _not_a_store(file)
        yield conn


def _needs_setup(path: Path) -> bool:
    """Whether an existing file still needs the setup `connect` writes (WAL mode, tables, the
    round column), found read-only; a file that is not a healthy store is refused here, before
    anything is written (so the error's "nothing was changed" holds)."""
    with closing(_open_read_only(path)) as conn:
        tables = _tables(conn)
        if tables and "ratings" not in tables:
            raise _not_a_store(path)
        ready = (conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
                 and {"ratings", "pending"} <= tables and "round" in _columns(conn, "ratings"))
        if not ready:  # the setup rewrites the header: check every page first
            found = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
            if found != "ok":  # its first line names the database, the next the damage
                detail = [line for line in found.splitlines() if not line.startswith("***")]
                raise sqlite3.DatabaseError(f"database disk image is malformed: {detail[0] if detail else found}")
        return not ready


def connect(path: str | Path | None = None) -> sqlite3.Connection:
    """A read-write connection to the store, created (with its folder) on first use, in WAL mode
    with a busy timeout: for writes (reads use `_reader`). An existing file is checked first."""
    path = store_file(path)
    with _reading(path):
        setup = _needs_setup(path) if _existing_store(path) else True
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30.0)
        conn.execute("PRAGMA busy_timeout = 30000")
        if setup:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(SCHEMA)
            _add_round_column(conn)
    conn.row_factory = sqlite3.Row
    return conn


def _add_round_column(conn: sqlite3.Connection) -> None:
    """Stores made before rounds existed lack `ratings.round`: add it (their votes are round 0)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(ratings)")}
    if "round" in columns:
        return
    try:
        conn.execute("ALTER TABLE ratings ADD COLUMN round INTEGER NOT NULL DEFAULT 0")
        conn.commit()
    except sqlite3.OperationalError as err:  # another process added it a moment ago
        if "duplicate column" not in str(err):
            raise


def check_round(round_number) -> int:
    if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 0:
        raise RatingsError(f"round {round_number!r} must be a whole number, 0 or more.")
    return round_number


def check_conversation(conversation) -> list[dict]:
    """The conversation as plain messages; it must end with the user turn both answers reply to."""
    if not isinstance(conversation, list) or not conversation:
        raise RatingsError("a vote needs the conversation so far: a non-empty list of messages.")
    messages = []
    for turn in conversation:
        role, content = (turn.get("role"), turn.get("content")) if isinstance(turn, dict) else (None, None)
        if role not in ROLES or not isinstance(content, str):
            raise RatingsError(f"a vote's conversation has a malformed message {turn!r}: each "
                               "needs a role (system, user or assistant) and text content.")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise RatingsError("a vote's conversation must end with the user turn the answers reply to.")
    return messages


def _insert(row: dict, path) -> int:
    conn = connect(path)
    try:
        with conn:  # one transaction: committed, or rolled back on error
            cursor = conn.execute(
                f"INSERT INTO ratings ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()))
        return cursor.lastrowid
    except sqlite3.Error as err:
        raise store_error(Path(path) if path else db_path(), err) from None
    finally:
        conn.close()


def comparison_row(conversation, answer_a: str, answer_b: str, model_a: str, model_b: str,
                   sampling_a: dict | None, sampling_b: dict | None, round_number: int) -> dict:
    """The checked columns of a comparison (a vote's, or a pending one's)."""
    return {"round": check_round(round_number),
            "conversation": json.dumps(check_conversation(conversation)),
            "answer_a": str(answer_a), "answer_b": str(answer_b), "model_a": str(model_a),
            "model_b": str(model_b), "sampling_a": json.dumps(sampling_a or {}),
            "sampling_b": json.dumps(sampling_b or {})}


def add_comparison(conversation, answer_a: str, answer_b: str, model_a: str, model_b: str,
                   verdict: str, sampling_a: dict | None = None, sampling_b: dict | None = None,
                   session: str = "", path=None, round: int = 0) -> int:
    """Store an A/B vote cast in `round`; returns its id. `verdict` is A, B, tie or both_bad."""
    if verdict not in COMPARISON_VERDICTS:
        raise RatingsError(f"verdict {verdict!r} is not one of {', '.join(COMPARISON_VERDICTS)}.")
    row = {"kind": "comparison", "created_at": time.time(), "session": session, "verdict": verdict,
           **comparison_row(conversation, answer_a, answer_b, model_a, model_b, sampling_a,
                            sampling_b, round)}
    return _insert(row, path)


def add_thumb(conversation, answer: str, model: str, up: bool, sampling: dict | None = None,
              session: str = "", path=None, round: int = 0) -> int:
    """Store a thumbs-up or thumbs-down on one answer, cast in `round`; returns its id."""
    row = {"kind": "thumb", "created_at": time.time(), "session": session,
           "conversation": json.dumps(check_conversation(conversation)), "answer_a": str(answer),
           "model_a": str(model), "sampling_a": json.dumps(sampling or {}),
           "verdict": "up" if up else "down", "round": check_round(round)}
    return _insert(row, path)


def delete(rating_id: int, path=None) -> bool:
    """Remove the vote `rating_id` (an undo); False when there is no such vote."""
    if isinstance(rating_id, bool) or not isinstance(rating_id, int):
        raise RatingsError(f"vote id {rating_id!r} is not a vote number: pass the whole number "
                           "of a vote (its id).")
    if not 0 < rating_id < 2**63:  # no vote has such an id (SQLite's ids are positive 64-bit)
        return False
    conn = connect(path)
    try:
        with conn:
            return conn.execute("DELETE FROM ratings WHERE id = ?", (rating_id,)).rowcount > 0
    except sqlite3.Error as err:
        raise store_error(Path(path) if path else db_path(), err) from None
    finally:
        conn.close()


def _decode(row: sqlite3.Row) -> dict | None:
    """A stored vote (or pending comparison) with its JSON fields decoded, or None when the row
    is malformed (written by another tool, or damaged): such rows are skipped and counted, never
    fatal."""
    record = dict(row)
    record.setdefault("round", 0)  # a store made before rounds, read as it is
    try:
        for key in ("conversation", "sampling_a", "sampling_b"):
            record[key] = json.loads(record[key]) if record[key] else None
        check_conversation(record["conversation"])
    except (TypeError, ValueError, RatingsError):
        return None
    return record if _well_typed(record) else None


LATEST_TIME = 253402300800.0  # the year 10000: a later created_at is no time a vote was cast


def _well_typed(record: dict) -> bool:
    """Whether a decoded row holds what readers rely on: a time, a round, text for every answer
    and model it has (both for a comparison), a verdict of its kind, sampling settings as objects."""
    def text(*keys):
        return all(isinstance(record.get(k), str) for k in keys)

    when, round_number = record.get("created_at"), record.get("round")
    if isinstance(when, bool) or not isinstance(when, (int, float)) or not 0 <= when < LATEST_TIME:
        return False
    if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 0:
        return False
    if not all(isinstance(record.get(k), (dict, type(None))) for k in ("sampling_a", "sampling_b")):
        return False
    kind = record.get("kind", "comparison")  # pending comparisons have no kind nor verdict
    if kind == "thumb":
        return record.get("verdict") in THUMB_VERDICTS and text("answer_a", "model_a")
    return (kind == "comparison" and record.get("verdict", "A") in COMPARISON_VERDICTS
            and text("answer_a", "answer_b", "model_a", "model_b"))


def read(path=None, limit: int | None = None) -> tuple[list[dict], int]:
    """(every well-formed vote, newest first, with its JSON fields decoded; how many rows were
    malformed and skipped)."""
    with _reader(path) as conn:
        query = "SELECT * FROM ratings ORDER BY id DESC" + (" LIMIT ?" if limit else "")
        decoded = [] if conn is None else [_decode(r) for r in conn.execute(query, (limit,) if limit else ())]
    good = [r for r in decoded if r is not None]
    return good, len(decoded) - len(good)


def rows(path=None, limit: int | None = None) -> list[dict]:
    """Every well-formed vote, newest first (malformed rows are skipped: see `read`)."""
    return read(path, limit)[0]


def counts(path=None) -> dict:
    """Well-formed votes by verdict, their total, the malformed rows skipped, and how many
    preference records an export would write."""
    stored, malformed = read(path)
    by_verdict = Counter(r["verdict"] for r in stored)
    return {**{v: by_verdict[v] for v in COMPARISON_VERDICTS + THUMB_VERDICTS},
            "total": len(stored), "malformed": malformed,
            "exportable": len(preference_records(stored))}


def _pair_record(rating_id: str, conversation, chosen: dict, rejected: dict, verdict: str,
                 created_at: float, round_number: int) -> dict:
    return {"id": rating_id, "source": "ratings", "prompt": conversation,
            "chosen": chosen["answer"], "rejected": rejected["answer"], "verdict": verdict,
            "chosen_model": chosen["model"], "rejected_model": rejected["model"],
            "chosen_sampling": chosen["sampling"], "rejected_sampling": rejected["sampling"],
            "created_at": created_at, "round": round_number}


def _comparison_record(rating: dict) -> dict | None:
    if rating["verdict"] not in ("A", "B"):
        return None
    side_a = {"answer": rating["answer_a"], "model": rating["model_a"], "sampling": rating["sampling_a"]}
    side_b = {"answer": rating["answer_b"], "model": rating["model_b"], "sampling": rating["sampling_b"]}
    chosen, rejected = (side_a, side_b) if rating["verdict"] == "A" else (side_b, side_a)
    return _pair_record(f"ratings-{rating['id']}", rating["conversation"], chosen, rejected,
                        rating["verdict"], rating["created_at"], rating["round"])


def _thumb_records(thumbs: list[dict]) -> list[dict]:
    """Pairs of an up and a down answer to the same conversation in the same round, oldest first,
    each used once."""
    by_conversation = defaultdict(lambda: {"up": [], "down": []})
    for rating in sorted(thumbs, key=lambda r: r["id"]):
        key = json.dumps([rating["round"], rating["conversation"]], sort_keys=True)
        by_conversation[key][rating["verdict"]].append(rating)
    records = []
    for side in by_conversation.values():
        for up, down in zip(side["up"], side["down"]):
            chosen = {"answer": up["answer_a"], "model": up["model_a"], "sampling": up["sampling_a"]}
            rejected = {"answer": down["answer_a"], "model": down["model_a"],
                        "sampling": down["sampling_a"]}
            records.append(_pair_record(f"ratings-{up['id']}-{down['id']}", up["conversation"],
                                        chosen, rejected, "thumbs",
                                        max(up["created_at"], down["created_at"]), up["round"]))
    return records


def export_records(path=None) -> list[dict]:
    """The store as preference records (see the module docstring for what is left out)."""
    return preference_records(rows(path))


def preference_records(stored: list[dict]) -> list[dict]:
    """Well-formed votes (as `read` returns them) as preference records."""
    ratings = sorted(stored, key=lambda r: r["id"])
    records = [r for r in map(_comparison_record, (x for x in ratings if x["kind"] == "comparison"))
               if r is not None]
    records += _thumb_records([r for r in ratings if r["kind"] == "thumb"])
    return records


def left_out(path=None) -> Counter:
    """Why votes are not exported: ties, both-bad, thumbs without a partner, malformed rows."""
    ratings, malformed = read(path)
    reasons = Counter(r["verdict"] for r in ratings if r["verdict"] in ("tie", "both_bad"))
    if malformed:
        reasons["malformed rows"] = malformed
    thumbs = sum(1 for r in ratings if r["kind"] == "thumb")
    unpaired = thumbs - 2 * len(_thumb_records([r for r in ratings if r["kind"] == "thumb"]))
    if unpaired:
        reasons["unpaired thumbs"] = unpaired
    return reasons


def export(out: str | Path, path=None, overwrite: bool = False) -> int:
    """Write the preference records as JSONL to `out`; returns how many were written.

    Never onto the store itself or its side files (-journal, -wal, -shm: SQLite would read a
    file there as its own); an existing file only with `overwrite`, and only a regular file
    (never a device, FIFO, socket or folder). The file appears whole or not at all (written
    beside it, then renamed over it)."""
    out = Path(out).expanduser()
    try:
        _check_export_target(out, store_file(path), overwrite)
    except OSError as err:  # a name too long, a folder that cannot be searched ...
        raise RatingsError(f"cannot write {out} ({err.strerror}): choose a writable path.") from None
    records = export_records(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_write(out, replace=overwrite) as handle:
                for record in records:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        except FileExistsError:  # it appeared since the check
            raise _exists(out) from None
    except OSError as err:
        raise RatingsError(f"cannot write {out} ({err.strerror}): choose a writable path.") from None
    return len(records)


def _check_export_target(out: Path, store: Path, overwrite: bool) -> None:
    """Refuse an export onto the store or its side files (by resolved path, and by identity for
    files that exist, so symlinks, hard links and other spellings count), onto anything that is
    not a regular file, and onto an existing file without `overwrite`."""
    # SQLite keeps its side files beside the store's real file: a --db spelled through a link
    # has them beside the link's target (probe 7, F1)
    store_files = [Path(f"{name}{suffix}") for name in {store, store.resolve()} for suffix in ("",) + SIDE_FILES]
    same = out.resolve() in {f.resolve() for f in store_files}
    if not same and out.exists():
        same = any(f.exists() and os.path.samefile(out, f) for f in store_files)
    for suffix in SIDE_FILES:  # a side file named beside another hard link of the store (probe 8, N2)
        base = Path(str(out).removesuffix(suffix))
        if not same and base != out and base.exists() and store.exists():
            same = os.path.samefile(base, store)
    if same:
        raise RatingsError(f"{out} is the ratings store itself or one of its SQLite side files "
                           "(-journal, -wal, -shm): export to another file, such as prefs.jsonl.")
    if out.is_symlink() or out.exists():
        if out.exists() and not out.is_file():
            raise RatingsError(f"{out} is not a regular file (a folder, device, FIFO or socket): "
                               "export to a file name, such as prefs.jsonl.")
        if not overwrite:
            raise _exists(out)


def _exists(out: Path) -> ExportExists:
    return ExportExists(f"{out} already exists: choose a new file name, or pass --overwrite to "
                        "replace it.")


# ---- rounds: comparisons queued for a vote --------------------------------------------------------

def add_pending(conversation, answer_a: str, answer_b: str, model_a: str, model_b: str,
                sampling_a: dict | None = None, sampling_b: dict | None = None, round: int = 0,
                source: str = "", path=None) -> int:
    """Queue two answers to `conversation` for a vote in Compare; returns the pending id.
    chat/rounds.py calls this for every sampled pair of a round."""
    row = {"created_at": time.time(), "source": str(source),
           **comparison_row(conversation, answer_a, answer_b, model_a, model_b, sampling_a,
                            sampling_b, round)}
    conn = connect(path)
    try:
        with conn:
            cursor = conn.execute(f"INSERT INTO pending ({', '.join(row)}) "
                                  f"VALUES ({', '.join('?' * len(row))})", list(row.values()))
        return cursor.lastrowid
    except sqlite3.Error as err:
        raise RatingsError(f"the pending comparison could not be stored ({err}): try again.") from None
    finally:
        conn.close()


def pending(round: int | None = None, limit: int | None = None, path=None) -> list[dict]:
    """Comparisons still waiting for a vote, oldest first (of one round, or of all): each with
    id, round, conversation, answer_a/b, model_a/b, sampling_a/b and source. What Compare shows
    next is `pending(limit=1)` (or `next_pending`)."""
    query = "SELECT * FROM pending WHERE rating_id IS NULL"
    args: list = []
    if round is not None:
        query += " AND round = ?"
        args.append(check_round(round))
    query += " ORDER BY id" + (" LIMIT ?" if limit else "")
    args += [limit] if limit else []
    with _reader(path, missing_ok=True) as conn:
        if conn is None or "pending" not in _tables(conn):
            return []
        return [r for r in map(_decode, conn.execute(query, args)) if r is not None]


def next_pending(round: int | None = None, path=None) -> dict | None:
    """The oldest comparison waiting for a vote, or None when the queue is empty."""
    waiting = pending(round, limit=1, path=path)
    return waiting[0] if waiting else None


def vote_pending(pending_id: int, verdict: str, session: str = "", path=None) -> int:
    """Store the vote on a pending comparison, with its round and provenance, and take it off
    the queue, in one transaction; returns the vote's id. A second vote on the same comparison
    (another tab was quicker) is refused with RatingsError."""
    if verdict not in COMPARISON_VERDICTS:
        raise RatingsError(f"verdict {verdict!r} is not one of {', '.join(COMPARISON_VERDICTS)}.")
    conn = connect(path)
    try:
        with conn:
            # claiming the row first takes the write lock, so two voters cannot both pass
            claimed = conn.execute("UPDATE pending SET rating_id = -1 WHERE id = ? AND rating_id IS NULL",
                                   (pending_id,)).rowcount
            if not claimed:
                raise RatingsError(f"comparison {pending_id} is not waiting for a vote (voted "
                                   "already, or discarded): show the next one.")
            item = dict(conn.execute("SELECT * FROM pending WHERE id = ?", (pending_id,)).fetchone())
            row = {"kind": "comparison", "created_at": time.time(), "session": session,
                   "verdict": verdict, **{k: item[k] for k in ("round", "conversation", "answer_a",
                   "answer_b", "model_a", "model_b", "sampling_a", "sampling_b")}}
            cursor = conn.execute(f"INSERT INTO ratings ({', '.join(row)}) "
                                  f"VALUES ({', '.join('?' * len(row))})", list(row.values()))
            conn.execute("UPDATE pending SET rating_id = ? WHERE id = ?", (cursor.lastrowid, pending_id))
        return cursor.lastrowid
    except sqlite3.Error as err:
        raise RatingsError(f"the vote could not be stored ({err}): try again.") from None
    finally:
        conn.close()


def discard_pending(round: int | None = None, path=None) -> int:
    """Drop the comparisons still waiting (of one round, or all); returns how many. Votes
    already cast stay."""
    conn = connect(path)
    try:
        with conn:
            if round is None:
                return conn.execute("DELETE FROM pending WHERE rating_id IS NULL").rowcount
            return conn.execute("DELETE FROM pending WHERE rating_id IS NULL AND round = ?",
                                (check_round(round),)).rowcount
    finally:
        conn.close()


def round_counts(path=None) -> dict[int, dict]:
    """Per round: votes cast (`votes`), and pending comparisons `waiting` and `voted`. A row whose
    round is not a whole number (another tool wrote it) is malformed, and counted in no round."""
    votes, queued = {}, []
    with _reader(path, missing_ok=True) as conn:
        if conn is not None:
            if "round" in _columns(conn, "ratings"):
                votes = dict(conn.execute("SELECT round, COUNT(*) FROM ratings WHERE typeof(round) = "
                                          "'integer' GROUP BY round"))
            else:  # a store made before rounds: every vote is round 0
                total = conn.execute("SELECT COUNT(*) FROM ratings").fetchone()[0]
                votes = {0: total} if total else {}
            if "pending" in _tables(conn):
                queued = conn.execute("SELECT round, SUM(rating_id IS NULL), SUM(rating_id IS NOT "
                                      "NULL) FROM pending WHERE typeof(round) = 'integer' "
                                      "GROUP BY round").fetchall()
    result = {r: {"votes": n, "waiting": 0, "voted": 0} for r, n in votes.items()}
    for round_number, waiting, voted in queued:
        result.setdefault(round_number, {"votes": 0, "waiting": 0, "voted": 0})
        result[round_number].update(waiting=waiting, voted=voted)
    return dict(sorted(result.items()))


def latest_round(path=None) -> int:
    """The highest round that holds a vote or a pending comparison (0 for an empty store); a
    new round is `latest_round() + 1`."""
    return max(round_counts(path), default=0)


def conversations(path=None) -> list[list[dict]]:
    """Every distinct conversation people typed and rated (the prompts of Chat and Compare),
    oldest first: a prompt set for the next round."""
    seen, result = set(), []
    for rating in sorted(rows(path), key=lambda r: r["id"]):
        key = json.dumps(rating["conversation"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            result.append(rating["conversation"])
    return result
