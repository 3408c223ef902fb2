"""Per-session chat state: what each vote records, arena rounds (both sides streamed at once),
stopping and cut-off answers, and the checkpoints offered."""
from __future__ import annotations

import contextlib
import json
import threading

import pytest

from chat.client import ServerError
from chat.conversation import (ArenaSession, ChatSession, chat_checkpoints,
                               new_sampling, stream_answer, stream_round)


class FakeClient:
    def __init__(self, model, fail=False):
        self.model, self.fail = model, fail

    def stream(self, messages, finish=None, **sampling):
        yield f"[{self.model}] "
        if self.fail:
            raise ServerError("the stream broke off.")
        yield messages[-1]["content"].upper()
        if finish is not None:
            finish["reason"] = "length" if sampling.get("max_tokens") == 2 else "stop"


class FakePool:
    def __init__(self, fail=False):
        self.fail, self.leased = fail, []

    @contextlib.contextmanager
    def lease(self, model):
        self.leased.append(model)
        yield FakeClient(model, self.fail)


def test_sampling_gets_a_seed_unless_one_is_given():
    assert new_sampling(0.7, 0.9, 64, seed=5) == {"temperature": 0.7, "top_p": 0.9,
                                                  "max_tokens": 64, "seed": 5}
    assert isinstance(new_sampling(0.7, 0.9, 64)["seed"], int)


def test_a_thumb_on_an_earlier_answer_records_the_conversation_it_replied_to():
    chat, pool = ChatSession(), FakePool()
    chat.ask("my name is ada")
    list(stream_answer(pool, chat, "runs/a/final", {"seed": 1}, "Be kind."))
    chat.ask("what is my name")
    list(stream_answer(pool, chat, "runs/b/ema", {"seed": 2}, "Be brief."))
    assert chat.history()[1] == {"role": "assistant", "content": "[runs/a/final] MY NAME IS ADA"}
    first = chat.rated(1)
    assert first["conversation"] == [{"role": "system", "content": "Be kind."},
                                     {"role": "user", "content": "my name is ada"}]
    assert first["model"] == "runs/a/final" and first["sampling"] == {"seed": 1}
    second = chat.rated(3)
    assert second["conversation"][0]["content"] == "Be brief." and len(second["conversation"]) == 4
    assert second["answer"] == "[runs/b/ema] WHAT IS MY NAME"
    assert chat.rated(2) is None and chat.rated(9) is None  # a user turn, out of range


def test_a_failed_answer_leaves_the_conversation_as_it_was():
    chat = ChatSession()
    chat.ask("hello")
    with pytest.raises(ServerError):
        list(stream_answer(FakePool(fail=True), chat, "m", {}, ""))
    assert chat.history() == [{"role": "user", "content": "hello"}]
    assert chat.drop_last_answer() is False and chat.last_user_text() == "hello"


def test_arena_round_is_anonymous_until_the_vote_and_the_winner_continues():
    arena, pool = ArenaSession(), FakePool()
    arena.start_round("hi", ("runs/x/final", "runs/y/final"), {"temperature": 1.0}, "Sys.")
    sides = list(stream_round(pool, arena))
    assert sorted(sides) == ["A", "A", "B", "B"] and arena.waiting_for_vote()
    left, right = arena.views()
    assert left[-1]["content"] != right[-1]["content"] and arena.reveal() == ""
    model_a, model_b = arena.round["A"]["model"], arena.round["B"]["model"]
    assert {model_a, model_b} == {"runs/x/final", "runs/y/final"}
    comparison = arena.vote("B")
    assert comparison["verdict"] == "B" and comparison["model_b"] == model_b
    assert comparison["conversation"] == [{"role": "system", "content": "Sys."},
                                          {"role": "user", "content": "hi"}]
    assert comparison["sampling_a"]["seed"] != comparison["sampling_b"]["seed"]
    assert arena.turns[-1]["content"] == comparison["answer_b"]
    assert arena.views() == (left, right)  # both answers stay in view with the names revealed
    assert model_a in arena.reveal() and not arena.waiting_for_vote()
    arena.start_round("more", ("runs/x/final", "runs/y/final"), {}, "Sys.")
    assert arena.views()[0][:3] == arena.views()[1][:3] == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": comparison["answer_b"]},
        {"role": "user", "content": "more"}]


def test_a_vote_that_could_not_be_stored_can_be_cast_again():
    arena = ArenaSession()
    arena.start_round("hi", ("m", "m"), {}, "")
    list(stream_round(FakePool(), arena))
    before = arena.views()
    arena.vote("tie")
    arena.undo_vote()
    assert arena.waiting_for_vote() and arena.views() == before and len(arena.turns) == 1


def test_two_samples_of_one_checkpoint_differ_only_in_seed():
    arena = ArenaSession()
    arena.start_round("hi", ("m", "m"), {"temperature": 0.8, "seed": 3}, "")
    a, b = arena.round["A"], arena.round["B"]
    assert a["model"] == b["model"] == "m" and a["sampling"]["temperature"] == 0.8
    assert a["sampling"]["seed"] != b["sampling"]["seed"]


def test_checkpoints_in_both_models_order_is_random():
    orders = set()
    for _ in range(40):
        arena = ArenaSession()
        arena.start_round("hi", ("one", "two"), {}, "")
        orders.add(arena.round["A"]["model"])
    assert orders == {"one", "two"}


def test_a_failed_round_is_dropped_with_its_user_turn():
    arena = ArenaSession()
    arena.start_round("hi", ("m", "m"), {}, "")
    with pytest.raises(ServerError):
        list(stream_round(FakePool(fail=True), arena))
    assert arena.turns == [] and arena.round is None and not arena.waiting_for_vote()


def make_run(folder, step, state, kinds=("final",)):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"# step: {step}\noutput: {folder}\n")
    (folder / "status.json").write_text(json.dumps({"state": state}))
    for kind in kinds:
        (folder / kind).mkdir()
        (folder / kind / "config.json").write_text("{}")


def test_checkpoints_offered_are_finished_sft_and_ppo_results(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs / "sft1", "sft", "done")
    make_run(runs / "ppo1", "ppo", "done", kinds=("final", "ema"))
    make_run(runs / "rm1", "rm", "done")            # a reward model is no chat model
    make_run(runs / "sft2", "sft", "running")       # not finished yet
    make_run(runs / "demo" / "sft", "sft", "done")  # inside a `train all` folder
    assert chat_checkpoints(runs, tmp_path) == ["default", "runs/demo/sft/final", "runs/ppo1/final",
                                                "runs/ppo1/ema", "runs/sft1/final"]


def test_both_arena_sides_stream_at_the_same_time():
    """Each side waits for the other's first piece: one side after the other would never end."""
    first_pieces = threading.Barrier(2, timeout=10)

    class Client(FakeClient):
        def stream(self, messages, finish=None, **sampling):
            first_pieces.wait()
            yield from super().stream(messages, finish, **sampling)

    class Pool(FakePool):
        @contextlib.contextmanager
        def lease(self, model):
            yield Client(model)

    arena = ArenaSession()
    arena.start_round("hi", ("one", "two"), {}, "")
    assert sorted(stream_round(Pool(), arena)) == ["A", "A", "B", "B"]
    assert arena.round["A"]["finish"] == arena.round["B"]["finish"] == "stop"


def test_stop_ends_an_answer_and_marks_it_where_it_is_shown():
    chat = ChatSession()
    chat.ask("hi")
    for _ in stream_answer(FakePool(), chat, "m", {}, ""):
        chat.stop = True
    assert (chat.turns[-1]["content"], chat.turns[-1]["finish"]) == ("[m] ", "stopped")
    assert chat.history()[-1]["content"] == "[m] \n\n*[stopped]*"
    assert chat.rated(1)["answer"] == "[m] "


def test_a_cut_off_answer_is_marked_in_the_arena_too():
    arena = ArenaSession()
    arena.start_round("hi", ("m", "m"), {"max_tokens": 2}, "")
    list(stream_round(FakePool(), arena))
    left, right = arena.views()
    assert left[-1]["content"].endswith("*[cut off at the token limit]*")
    assert arena.vote("A")["answer_a"] == "[m] HI"  # the vote keeps the text without the mark


def test_reward_model_checkpoints_are_listed_apart(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs / "sft1", "sft", "done")
    make_run(runs / "rm1", "rm", "done")
    assert chat_checkpoints(runs, tmp_path, stages=("rm",)) == ["runs/rm1/final"]
