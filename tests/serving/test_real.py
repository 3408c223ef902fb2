"""The server on the real default model (SmolLM2-135M-Instruct, ds-inference engine, bf16 where
the CPU has it), through the official `openai` client: answers that depend on the conversation,
streaming, n, stop sequences, concurrent clients, and the same greedy answer as PPO's sampler."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.engines import load_engine
from tests.serving import openai_client, running_server

pytestmark = pytest.mark.slow

NAME_TURN = [{"role": "user", "content": "My name is Ada. Please remember it."}]


@pytest.fixture(scope="module")
def engine(default_model):
    return load_engine("default", "ds-inference", slots=16, max_len=1024)


@pytest.fixture(scope="module")
def client(engine):
    with running_server(engine) as url:
        yield openai_client(url)


def ask(client, messages, **options):
    options = {"model": "default", "max_tokens": 40, "temperature": 0, **options}
    return client.chat.completions.create(messages=messages, **options)


def second_turn(first_answer: str) -> list[dict]:
    return NAME_TURN + [{"role": "assistant", "content": first_answer},
                        {"role": "user", "content": "What is my name?"}]


def test_second_answer_depends_on_the_first_turn(client):
    first = ask(client, NAME_TURN).choices[0].message.content
    answer = ask(client, second_turn(first), max_tokens=30).choices[0].message.content
    assert "Ada" in answer, answer
    stranger = [{"role": "user", "content": "What is my name?"}]
    assert "Ada" not in ask(client, stranger, max_tokens=30).choices[0].message.content


def test_the_same_conversation_streamed(client):
    first = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="default", messages=NAME_TURN, max_tokens=40, temperature=0, stream=True) if chunk.choices)
    assert first == ask(client, NAME_TURN).choices[0].message.content
    chunks = list(client.chat.completions.create(model="default", messages=second_turn(first),
                                                 max_tokens=30, temperature=0, stream=True))
    answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Ada" in answer and len(chunks) > 3, answer  # several chunks: it really streamed


def test_n_two_gives_two_sampled_answers(client):
    reply = ask(client, [{"role": "user", "content": "Write a short greeting."}], n=2,
                temperature=1.0, seed=1, max_tokens=30)
    texts = [c.message.content for c in reply.choices]
    assert len(texts) == 2 and all(t.strip() for t in texts) and texts[0] != texts[1]


def test_stop_sequence_is_honoured(client):
    count = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    full = ask(client, count, max_tokens=60).choices[0].message.content
    assert "4" in full and "5" in full, full
    stopped = ask(client, count, max_tokens=60, stop=["5"]).choices[0]
    assert stopped.finish_reason == "stop" and "5" not in stopped.message.content
    assert stopped.message.content == full[:full.index("5")]


# countries whose capital the 135M model names when asked alone
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Greece": "Athens", "Germany": "Berlin",
            "China": "Beijing", "England": "London", "Russia": "Moscow", "Egypt": "Cairo"}


def test_eight_concurrent_clients_are_all_answered_correctly(client):
    def capital_of(country: str) -> str:
        question = [{"role": "user", "content": f"What is the capital of {country}?"}]
        return ask(client, question, max_tokens=30).choices[0].message.content

    with ThreadPoolExecutor(len(CAPITALS)) as pool:
        answers = dict(zip(CAPITALS, pool.map(capital_of, CAPITALS)))
    wrong = {country: a for country, a in answers.items() if CAPITALS[country] not in a}
    assert not wrong, wrong


def test_greedy_answer_equals_the_ppo_samplers(client, engine):
    """Server and PPO rollouts share one generation core: the same greedy tokens."""
    from core.sampling import Sampling
    from train.rollout import generate

    conversation = [{"role": "user", "content": "Name three colours of the rainbow."}]
    served = ask(client, conversation, max_tokens=40).choices[0].message.content
    tokenizer = engine.tokenizer
    sampling = Sampling(max_new_tokens=40, temperature=1.0, top_p=1.0, greedy=True,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    lm = engine.decoder.model
    _, _, response_ids, response_mask, _ = generate(lm, [engine.encode_chat(conversation)], sampling)
    kept = [t for t, alive in zip(response_ids[0].tolist(), response_mask[0].tolist())
            if alive and t not in engine.end_token_ids]
    assert served == tokenizer.decode(kept, skip_special_tokens=True)
