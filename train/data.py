"""The data layer: every source becomes one record format, then blends and splits.

A record is `{"prompt": [{"role", "content"}, ... ending with a user turn], "response": str}`
(SFT) or `{"prompt": [...], "chosen": str, "rejected": str}` (preference), with optional
`source` and `id`. Prompt-only records serve PPO and chat.

Sources: local `.json`, `.jsonl`, `.jsonl.gz`, `.json.gz` files in the formats of our record,
alpaca (`instruction/input/output`), alpaca seed tasks (`instruction/instances`), sharegpt or
OpenAI-style conversations (`conversations`/`messages`, optionally with `chosen`/`rejected`),
Anthropic HH transcripts (`chosen`/`rejected` strings with Human/Assistant turns) and AlpacaEval
pairs (`output_1/output_2/preference`); Hugging Face dataset names (`name` or `name:split`) and
local `datasets` folders; and `ratings:` (the ratings store; `ratings:PATH` another store file).

Rules: a structurally malformed record (invalid JSON, a missing field, an unknown role) is an
error naming the file, the line and the problem. Records that are well formed but unusable
(an empty response, chosen identical to rejected, an AlpacaEval tie) are skipped and counted.

Tokenising and batching the records is train/tokens.py's job: this module needs neither a
tokenizer nor torch.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError

PHASES = ("sft", "rm", "ppo")
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
         "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant"}


class DataError(UserError, ValueError):
    """A data source cannot be read; the message names the file, the line and the problem."""


@dataclass
class Loaded:
    records: list[dict]
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def report(self) -> str:
        if not self.skipped:
            return f"{len(self.records)} records"
        reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
        return f"{len(self.records)} records (skipped: {reasons})"


# ---- reading sources ----------------------------------------------------------------------------

def known_sources(root: Path) -> list[str]:
    """Sources to offer without typing, as paths relative to the project `root`: the built-in
    sample sets (prompts/*.jsonl), the shared real data sets (../shared/data) where present,
    and `ratings:`."""
    files = sorted(str(p.relative_to(root)) for p in (root / "prompts").glob("*.jsonl"))
    shared = root.parent / "shared" / "data"
    files += sorted(os.path.relpath(p, root) for p in shared.glob("*.json*")) if shared.is_dir() else []
    return files + ["ratings:"]


def read_source(spec: str) -> Loaded:
    """Read one source into normalised records (each tagged with `source`)."""
    if spec.startswith("ratings:"):
        return _read_ratings(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return _normalise_all(_iter_file(path), spec)
    if path.is_dir():
        return _normalise_all(_iter_datasets_folder(path), spec)
    if path.exists():  # a device, pipe or socket: reading it would never end, or block
        raise DataError(f"data source {spec} is not a regular file (a device, pipe or socket): "
                        "pass a JSON or JSONL file or a folder.")
    looks_like_path = spec.endswith((".json", ".jsonl", ".gz")) or spec.startswith((".", "/", "~")) \
        or spec.count("/") > 1
    if looks_like_path:
        raise DataError(f"data file {spec} does not exist: check the path.")
    return _normalise_all(_iter_hub_dataset(spec), spec)


def _iter_file(path: Path):
    """Yield (where, raw record) pairs; `where` names the file and line for error messages."""
    opener = gzip.open if path.suffix == ".gz" else open
    name = path.name[:-3] if path.suffix == ".gz" else path.name
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            if name.endswith(".jsonl"):
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        yield f"{path}, line {number}", json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}, line {number}: invalid JSON ({err.msg}).") from None
                return
            text = handle.read()
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise DataError(f"{path} cannot be read ({err}): pass a UTF-8 JSON or JSONL file.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: invalid JSON ({err.msg}).") from None
    if isinstance(data, dict):  # {"data": [...]} and similar wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records.")
    for number, raw in enumerate(data):
        yield f"{path}, record {number}", raw


def _iter_datasets_folder(path: Path):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"{path} is not a saved Hugging Face dataset ({err}): pass a file or a "
                        "folder written by Dataset.save_to_disk.") from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    for number, raw in enumerate(loaded):
        yield f"{path}, row {number}", raw


def _iter_hub_dataset(spec: str):
    import datasets

    name, _, split = spec.partition(":")
    try:
        loaded = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # the hub client raises many kinds; all mean "cannot get it"
        raise DataError(f"data source {spec!r} is neither a local file nor a loadable Hugging Face "
                        f"dataset ({type(err).__name__}): check the path, or the name and network "
                        "access.") from None
    for number, raw in enumerate(loaded):
        yield f"{spec}, row {number}", raw


def _read_ratings(spec: str) -> Loaded:
    """`ratings:` reads the ratings store, `ratings:PATH` the store in PATH (which must be one)."""
    from core.ratings import RatingsError, db_path, preference_records, read

    path = spec.removeprefix("ratings:")
    if path and not Path(path).expanduser().exists():
        raise DataError(f"data source {spec}: {path} does not exist: check the path, or pass "
                        f"ratings: alone for the store the app writes ({db_path()}).")
    try:
        stored, malformed = read(path or None)
    except RatingsError as err:
        if not path:
            raise
        # the store's own hint speaks of --db, which `python -m train` has not
        raise DataError(f"data source {spec}: {str(err).split(': ')[0]}: pass a ratings database "
                        f"the app wrote, or ratings: alone for its store ({db_path()}).") from None
    records = enumerate(preference_records(stored))
    return _normalise_all(((f"ratings, row {i}", r) for i, r in records), spec,
                          Counter({"malformed ratings rows": malformed} if malformed else {}))


def _normalise_all(rows, source: str, skipped: Counter | None = None) -> Loaded:
    loaded = Loaded([], skipped or Counter())
    for where, raw in rows:
        for record in normalise(raw, where):
            reason = unusable_reason(record)
            if reason:
                loaded.skipped[reason] += 1
                continue
            record.setdefault("source", source)
            loaded.records.append(record)
    if not loaded.records:
        raise DataError(f"data source {source} holds no usable records ({loaded.report()}).")
    return loaded


# ---- normalising every format to one record -------------------------------------------------------

def normalise(raw, where: str) -> list[dict]:
    """One raw record in any supported format -> zero or more records of our format."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}.")
    keep = {k: raw[k] for k in ("id",) if k in raw}
    if "prompt" in raw:
        records = [_from_ours(raw, where)]
    elif "conversations" in raw or "messages" in raw:
        records = [_from_conversation(raw, where)]
    elif "output_1" in raw and "output_2" in raw:
        records = _from_alpaca_eval(raw, where)
    elif "instruction" in raw and "instances" in raw:
        records = [{"prompt": _user(_join(raw["instruction"], inst.get("input", ""))),
                    "response": _text(inst, "output", where)} for inst in raw["instances"]]
    elif "instruction" in raw:
        records = [{"prompt": _user(_join(raw["instruction"], raw.get("input", ""))),
                    "response": _text(raw, "output", where)}]
    elif isinstance(raw.get("chosen"), str) and isinstance(raw.get("rejected"), str):
        records = [_from_hh(raw, where)]
    else:
        raise DataError(f"{where}: unknown record format with keys {sorted(raw)}: expected prompt "
                        "with response or chosen/rejected, alpaca, conversations or HH fields.")
    for record in records:
        record.update(keep)
        if "skip" not in record:
            check_record(record, where)
    return records


def _text(raw: dict, key: str, where: str) -> str:
    value = raw.get(key)
    if isinstance(value, dict):  # sharegpt-style {"from": "gpt", "value": ...}
        value = value.get("value", value.get("content"))
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} is missing or not text.")
    return value


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _join(instruction: str, extra: str) -> str:
    return f"{instruction}\n\n{extra}" if extra else instruction


def _message(turn, where: str) -> dict:
    if not isinstance(turn, dict):
        raise DataError(f"{where}: a message must be an object with role and content.")
    role = turn.get("role", turn.get("from"))
    content = turn.get("content", turn.get("value"))
    if role not in ROLES:
        raise DataError(f"{where}: unknown role {role!r}: use system, user or assistant.")
    if not isinstance(content, str):
        raise DataError(f"{where}: a {role} message has no text content.")
    return {"role": ROLES[role], "content": content}


def _from_ours(raw: dict, where: str) -> dict:
    prompt = raw["prompt"]
    messages = _user(prompt) if isinstance(prompt, str) else [_message(t, where) for t in prompt] \
        if isinstance(prompt, list) else None
    if messages is None:
        raise DataError(f"{where}: 'prompt' must be text or a list of messages.")
    record = {"prompt": messages}
    for key in ("response", "chosen", "rejected"):
        if key in raw:
            record[key] = _text(raw, key, where)
    if ("chosen" in record) != ("rejected" in record):
        raise DataError(f"{where}: a preference record needs both 'chosen' and 'rejected'.")
    return record


def _from_conversation(raw: dict, where: str) -> dict:
    turns = [_message(t, where) for t in raw.get("conversations", raw.get("messages")) or []]
    if "chosen" in raw or "rejected" in raw:
        return {"prompt": turns, "chosen": _text(raw, "chosen", where),
                "rejected": _text(raw, "rejected", where)}
    if not turns or turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: a conversation without chosen/rejected must end with an "
                        "assistant turn (the response to learn).")
    return {"prompt": turns[:-1], "response": turns[-1]["content"]}


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def _parse_hh(transcript: str, where: str) -> list[dict]:
    pieces = _HH_TURN.split("\n\n" + transcript.lstrip("\n"))
    if len(pieces) < 3 or pieces[0].strip():
        raise DataError(f"{where}: an HH transcript must consist of Human:/Assistant: turns.")
    return [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
            for who, text in zip(pieces[1::2], pieces[2::2])]


def _from_hh(raw: dict, where: str) -> dict:
    chosen = _parse_hh(raw["chosen"], where)
    rejected = _parse_hh(raw["rejected"], where)
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise DataError(f"{where}: an HH transcript must end with an Assistant turn.")
    record = {"prompt": chosen[:-1], "chosen": chosen[-1]["content"],
              "rejected": rejected[-1]["content"]}
    if chosen[:-1] != rejected[:-1]:  # a few public transcripts lose a turn separator
        record["skip"] = "HH pairs whose two transcripts differ before the answer"
    return record


def _from_alpaca_eval(raw: dict, where: str) -> list[dict]:
    try:
        preference = float(raw.get("preference"))
    except (TypeError, ValueError):
        raise DataError(f"{where}: 'preference' must be 1 or 2.") from None
    outputs = (_text(raw, "output_1", where), _text(raw, "output_2", where))
    prompt = _user(_join(_text(raw, "instruction", where), raw.get("input") or ""))
    if preference not in (1.0, 2.0):
        return [{"prompt": prompt, "chosen": "", "rejected": "", "skip": "ties"}]
    better = int(preference) - 1
    return [{"prompt": prompt, "chosen": outputs[better], "rejected": outputs[1 - better]}]


def check_record(record: dict, where: str) -> None:
    prompt = record["prompt"]
    if not prompt:
        raise DataError(f"{where}: the prompt has no messages.")
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user turn, not {prompt[-1]['role']}.")


def unusable_reason(record: dict) -> str | None:
    """Why a well-formed record cannot train anything (skipped and counted), or None."""
    if "skip" in record:
        return record.pop("skip")
    if not record["prompt"][-1]["content"].strip():
        return "empty prompts"
    if "response" in record and not record["response"].strip():
        return "empty responses"
    if "chosen" in record:
        if not record["chosen"].strip() or not record["rejected"].strip():
            return "pairs with an empty answer"
        if record["chosen"].strip() == record["rejected"].strip():
            return "pairs with chosen identical to rejected"
    return None


# ---- blending and splitting -----------------------------------------------------------------------

def phase_records(records: list[dict], phase: str) -> list[dict]:
    """The records a phase can use: SFT takes responses (or the chosen side of pairs)."""
    if phase == "sft":
        return [{**r, "response": r["response"] if "response" in r else r["chosen"]}
                for r in records if "response" in r or "chosen" in r]
    if phase == "rm":
        return [r for r in records if "chosen" in r]
    return records


def split_part(records: list[dict], weights: list[float], phase: str, seed: int,
               source: str) -> list[dict]:
    """This phase's disjoint share of one source, the same for every step given the seed. The
    shuffle is keyed by the source's file name, not by how its path is spelled, so steps that
    name one file differently (relative, absolute, another checkout) still take disjoint parts."""
    order = list(range(len(records)))
    random.Random(f"{seed}:{Path(source).name}").shuffle(order)
    total = sum(weights)
    index = PHASES.index(phase)
    start = round(len(order) * sum(weights[:index]) / total)
    end = round(len(order) * sum(weights[:index + 1]) / total)
    return [records[i] for i in order[start:end]]


def load_data(sources: list[str], phase: str, seed: int, weights: list[float] | None = None,
              log=print, part: str | None = None) -> list[dict]:
    """Read, split (per source) and blend the sources into one shuffled list for `phase`;
    `part` names the split part to take when it is not the phase's own (DPO: pairs of step 3)."""
    if not sources:
        raise DataError("no data sources given: pass --data with at least one file or dataset.")
    blended = []
    for spec in sources:
        loaded = read_source(spec)
        share = split_part(loaded.records, weights, part or phase, seed, spec) if weights \
            else loaded.records
        usable = phase_records(share, phase)
        log(f"data {spec}: {loaded.report()}; {len(usable)} for {phase}")
        blended += usable
    if not blended:
        raise DataError(f"none of the data sources holds records usable for {phase}"
                        + (": SFT needs responses or chosen answers." if phase == "sft" else
                           ": the reward model needs chosen/rejected pairs." if phase == "rm" else "."))
    random.Random(seed).shuffle(blended)
    return blended


def holdout(records: list[dict], fraction: float, cap: int) -> tuple[list[dict], list[dict]]:
    """Split off the held-out evaluation records (the input is already shuffled)."""
    count = min(cap, int(len(records) * fraction))
    if fraction > 0 and cap > 0 and count == 0 and len(records) >= 2:
        count = 1  # a tiny data set still gets one held-out record
    return records[count:], records[:count]


def preview(sources: list[str], weights: list[float] | None, seed: int) -> str:
    """Markdown for the Train tab's "Preview data": each source's record count (and skips), its
    size per split and its first three records."""
    lines = []
    for spec in sources:
        loaded = read_source(spec)
        parts = {phase: len(split_part(loaded.records, weights, phase, int(seed), spec))
                 for phase in PHASES} if weights else {}
        split = ", ".join(f"{phase} {n}" for phase, n in parts.items()) or "no split: all of it"
        first = "\n".join(json.dumps(r, ensure_ascii=False)[:300] for r in loaded.records[:3])
        lines.append(f"**{spec}**: {loaded.report()}; per split: {split}\n```\n{first}\n```")
    return "\n\n".join(lines) or "No data sources chosen."
