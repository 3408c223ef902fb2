import gzip
import json

import pytest

from tests.conftest import ROOT, shared_file
from train import data
from train.data import DataError


@pytest.mark.parametrize("name, kind, at_least", [
    ("llamafactory_alpaca_en_demo.json", "response", 999),
    ("alpaca_seed_tasks.jsonl", "response", 175),
    ("llamafactory_dpo_en_demo.json", "chosen", 300),
    ("hh_harmless_base_test.jsonl.gz", "chosen", 2290),
    ("alpaca_eval/gpt4.json", "chosen", 780),
])
def test_every_shared_format_normalises_to_one_record(name, kind, at_least):
    loaded = data.read_source(str(shared_file(name)))
    assert len(loaded.records) >= at_least
    for record in loaded.records:
        assert record["prompt"] and record["prompt"][-1]["role"] == "user"
        assert all(m["role"] in ("system", "user", "assistant") for m in record["prompt"])
        assert isinstance(record[kind], str) and record[kind].strip()


def test_hh_transcripts_split_at_the_last_assistant_turn():
    record = data.normalise({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye?\n\nAssistant: Bye.",
                             "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye?\n\nAssistant: No."},
                            "x")[0]
    assert [m["role"] for m in record["prompt"]] == ["user", "assistant", "user"]
    assert (record["chosen"], record["rejected"]) == ("Bye.", "No.")


def test_alpaca_eval_ties_are_skipped_and_counted():
    loaded = data.read_source(str(shared_file("alpaca_eval/alpaca-7b.json")))
    assert loaded.skipped["ties"] > 0
    assert "ties" in loaded.report()


def test_builtin_sample_sets_load():
    sizes = {name: len(data.read_source(str(ROOT / "prompts" / name)).records)
             for name in ("sft.jsonl", "preferences.jsonl", "prompts.jsonl")}
    assert sizes == {"sft.jsonl": 100, "preferences.jsonl": 100, "prompts.jsonl": 200}


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: invalid JSON"):
        data.read_source(str(path))


def test_missing_field_and_unknown_role_are_named(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a"}\n')
    with pytest.raises(DataError, match="line 1: .*both 'chosen' and 'rejected'"):
        data.read_source(str(path))
    path.write_text('{"prompt": [{"role": "wizard", "content": "hi"}], "response": "b"}\n')
    with pytest.raises(DataError, match="unknown role 'wizard'"):
        data.read_source(str(path))


def test_unusable_pairs_are_skipped_by_rule(tmp_path):
    path = tmp_path / "p.jsonl.gz"
    rows = [{"prompt": "q1", "chosen": "good", "rejected": "bad"},
            {"prompt": "q2", "chosen": "same", "rejected": "same"},
            {"prompt": "q3", "chosen": "", "rejected": "bad"}]
    with gzip.open(path, "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    loaded = data.read_source(str(path))
    assert len(loaded.records) == 1
    assert loaded.skipped == {"pairs with chosen identical to rejected": 1, "pairs with an empty answer": 1}


def test_missing_file_is_a_clear_error():
    with pytest.raises(DataError, match="does not exist"):
        data.read_source("no/such/file.jsonl")


def test_split_parts_are_disjoint_complete_and_reproducible():
    records = [{"prompt": [{"role": "user", "content": str(i)}], "response": "r"} for i in range(103)]
    parts = [data.split_part(records, [2, 4, 4], phase, 7, "src") for phase in data.PHASES]
    keys = [{r["prompt"][0]["content"] for r in part} for part in parts]
    assert [len(k) for k in keys] == [21, 41, 41]
    assert not (keys[0] & keys[1]) and not (keys[1] & keys[2]) and not (keys[0] & keys[2])
    assert set.union(*keys) == {str(i) for i in range(103)}
    assert data.split_part(records, [2, 4, 4], "rm", 7, "src") == parts[1]
    assert data.split_part(records, [2, 4, 4], "rm", 8, "src") != parts[1]


def test_one_file_named_two_ways_is_split_the_same_so_steps_stay_disjoint():
    records = [{"prompt": [{"role": "user", "content": str(i)}], "response": "r"} for i in range(103)]
    rm = data.split_part(records, [0, 5, 5], "rm", 1234, "../shared/data/hh.jsonl.gz")
    ppo = data.split_part(records, [0, 5, 5], "ppo", 1234, "/work/checkout/../shared/data/hh.jsonl.gz")
    assert not {id(r) for r in rm} & {id(r) for r in ppo} and len(rm) + len(ppo) == 103


def test_sft_phase_uses_the_chosen_side_of_pairs():
    records = [{"prompt": [{"role": "user", "content": "q"}], "chosen": "c", "rejected": "r"}]
    assert data.phase_records(records, "sft")[0]["response"] == "c"
    assert data.phase_records(records, "rm") == records


def test_preview_counts_every_split_and_shows_records():
    spec = str(ROOT / "prompts" / "sft.jsonl")
    text = data.preview([spec], [2, 4, 4], 1234)
    assert f"**{spec}**: 100 records; per split: sft 20, rm 40, ppo 40" in text
    assert '"prompt"' in text
    assert "per split: no split: all of it" in data.preview([spec], None, 1234)
    assert data.preview([], None, 1234) == "No data sources chosen."


def test_preview_of_a_missing_source_raises_the_data_error():
    with pytest.raises(DataError, match="does not exist"):
        data.preview(["nope/x.jsonl"], None, 1)


def test_known_sources_offer_the_sample_sets_relative_to_the_project():
    offered = data.known_sources(ROOT)
    assert {"prompts/sft.jsonl", "prompts/preferences.jsonl", "prompts/prompts.jsonl"} <= set(offered)
    assert offered[-1] == "ratings:"
    assert all((ROOT / spec).is_file() for spec in offered[:-1])  # relative to the project root
