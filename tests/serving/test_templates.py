"""Chat templates render in worker processes (serving/templates.py): the text is exactly
apply_chat_template's, and a template that computes, allocates or loops without end is refused
while every other client goes on (probe 6 P1, probe 7 F5: `7 ** 14000000` froze the whole
server for 18 s and the model was loaded all the same)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest
from transformers import AutoTokenizer

from serving import templates
from serving.engines import Engine, load_engine
from serving.templates import (RenderBusy, RenderCancelled, RenderPool, TemplateError, TemplateRejected,
                               TemplateTimeout, render_chat)
from tests.serving.test_cli import serve, wait_until_serving

# Templates in the manner of four families (written for these tests), besides SmolLM2's own:
# a BOS variable, system turns folded or defaulted, role checks, `is defined` on optional keys.
FAMILIES = {
    "llama3": "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
              "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
              "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    "mistral": "{%- if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
               "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}"
               "{% endif %}{{ bos_token }}{% for m in turns %}"
               "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/...') }}{% endif %}"
               "{% if m['role'] == 'user' %}[INST] {% if loop.first and system %}{{ system }}\n\n{% endif %}"
               "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}",
    "qwen2": "{%- if messages[0].role != 'system' %}<|im_start|>system\nYou are a helpful assistant."
             "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
             "{% if m.tool_calls is defined %}[tool calls]{% endif %}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "qwen3": "{%- set ns = namespace(last_user=0) %}{% for m in messages %}{% if m.role == 'user' %}"
             "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}{% for m in messages %}"
             "<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and loop.index0 < ns.last_user %}"
             "{{ m.content.split('</think>')[-1] | trim }}{% else %}{{ m.content }}{% endif %}<|im_end|>\n"
             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is "
             "defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}",
}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"},
     {"role": "assistant", "content": "<think>easy</think> Blue.", "tool_calls": None},
     {"role": "user", "content": "  And grass?  "}],
]
HOSTILE = {  # each as a prefix of the model's own template, as in probe 7
    "power": "{% set x = 7 ** 14000000 %}",          # one C call, ~17 s, holds the GIL
    "string": "{% set s = 'a' * 1200000000 %}{{ s | length }}",  # 1.2 GB (server peak 5.6 GB)
    "loop": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
}


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return AutoTokenizer.from_pretrained(default_model)


@pytest.fixture(scope="module")
def engine(tiny_model):
    return load_engine(str(tiny_model), "hf", slots=2, max_len=1024, dtype="fp32")


def test_the_text_is_apply_chat_template_s_for_each_family(tokenizer):
    for family, template in [("smollm2", tokenizer.chat_template), *FAMILIES.items()]:
        tokenizer_of_family = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
        tokenizer_of_family.chat_template = template
        for messages in CONVERSATIONS:
            expected = tokenizer_of_family.apply_chat_template(messages, add_generation_prompt=True,
                                                               tokenize=False)
            assert render_chat(tokenizer_of_family, messages, 10**6) == expected, family


def test_a_template_s_own_refusal_keeps_its_message(tokenizer):
    mistral = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    mistral.chat_template = FAMILIES["mistral"]
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception) as direct:
        mistral.apply_chat_template(two_users, add_generation_prompt=True, tokenize=False)
    with pytest.raises(TemplateRejected) as pooled:
        render_chat(mistral, two_users, 10**6)
    assert str(pooled.value) == str(direct.value) and "must alternate" in str(pooled.value)


def test_the_engine_s_prompt_ids_are_apply_chat_template_s(engine):
    for messages in CONVERSATIONS:
        expected = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                        tokenize=True, return_dict=False)
        assert engine.encode_chat(messages) == list(expected)


def hostile_model(tiny_model, folder, kind: str):
    shutil.copytree(tiny_model, folder)
    template = folder / "chat_template.jinja"
    template.write_text(HOSTILE[kind] + template.read_text())
    return folder


def latencies_while(engine: Engine, action) -> tuple[float, int]:
    """Run action() while another thread encodes conversations back to back; (its longest
    encode, how many it did)."""
    times, stop = [], threading.Event()

    def encode_repeatedly():
        while not stop.is_set():
            start = time.monotonic()
            engine.encode_chat(CONVERSATIONS[1])
            times.append(time.monotonic() - start)

    other = threading.Thread(target=encode_repeatedly)
    other.start()
    try:
        action()
    finally:
        stop.set()
        other.join(timeout=60)
    return max(times), len(times)


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_a_hostile_template_is_refused_while_others_render(kind, engine, tiny_model, tmp_path):
    """The model is refused at load (TemplateError: too slow, or too much memory) within the
    time limit, and a conversation rendered meanwhile on another model waits no more than ~2 s."""
    folder = hostile_model(tiny_model, tmp_path / kind, kind)
    engine.encode_chat(CONVERSATIONS[0])
    until(lambda: len(templates.shared_pool().pids()) >= 2)  # a spare up: the other thread waits for no start
    refused = []

    def load_hostile():
        start = time.monotonic()
        with pytest.raises(TemplateError) as err:
            load_engine(str(folder), "hf", slots=2, max_len=1024, dtype="fp32")
        refused.append((err.value, time.monotonic() - start))

    longest, count = latencies_while(engine, load_hostile)
    error, seconds = refused[0]
    expected = "needed over" if kind == "string" else "took over"
    assert expected in str(error), (str(error), seconds, count, longest)
    assert seconds < templates.TEMPLATE_SECONDS + 30, seconds  # generous: loading the weights
    assert count >= 5 and longest < 2.0, (count, longest)


def with_prefix(tokenizer, prefix: str):
    """A copy of `tokenizer` whose chat template starts with `prefix`."""
    copy = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    copy.chat_template = prefix + tokenizer.chat_template
    return copy


def test_a_killed_worker_is_replaced_and_none_outlives_the_pool(tokenizer):
    """A worker that does not answer even its own alarm (stuck in a C call that never checks for
    signals; stopped here with SIGSTOP) is SIGKILLed past its time and replaced."""
    pool = RenderPool(size=1)
    try:
        assert "Hi" in render_chat(tokenizer, CONVERSATIONS[0], 10**6, pool=pool)
        before = set(pool.pids())
        for pid in before:
            os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(TemplateTimeout):
            render_chat(tokenizer, CONVERSATIONS[0], 10**6, pool=pool, seconds=1.0)
        assert time.monotonic() - start < 1.0 + templates.KILL_GRACE_SECONDS + 0.5
        assert not running(before)  # SIGKILLed and reaped
        for _ in range(3):  # another conversation (that one ran out of time: refused if it comes again)
            assert "grass" in render_chat(tokenizer, CONVERSATIONS[1], 10**6, pool=pool)
        fresh = set(pool.pids())
        assert len(fresh) == 1 and not fresh & before  # its replacement
    finally:
        pool.close()
    assert not running(before | fresh)


def until(value, seconds: float = 60):
    """value() once it is truthy (polled: a worker takes a second or two to start)."""
    deadline = time.monotonic() + seconds
    while not (result := value()):
        assert time.monotonic() < deadline, "not within 60 s"
        time.sleep(0.1)
    return result


def running(pids) -> set[int]:
    """Those of `pids` that ps lists (zombies included: a worker must be reaped too)."""
    listed = subprocess.run(["ps", "-e", "-o", "pid="], capture_output=True, text=True).stdout
    return set(pids) & {int(pid) for pid in listed.split()}


def children(pid: int) -> set[int]:
    listed = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return {int(child) for child in listed.stdout.split()}


def stream_gaps(url: str, stop: threading.Event, gaps: list[float]) -> None:
    """Streams on the loaded model back to back until `stop`; the gaps between the chunks (the
    first one timed from the request) go to `gaps`."""
    body = {"messages": [{"role": "user", "content": "Count"}], "max_tokens": 200, "stream": True}
    with httpx.Client(timeout=120) as http:
        while not stop.is_set():
            last = time.monotonic()
            with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line:
                        gaps.append(time.monotonic() - last)
                        last = time.monotonic()


def test_loading_a_power_template_answers_400_while_a_stream_flows(tiny_model, tmp_path):
    """Probe 7 (F5): /v1/models/load of a folder under --load-from whose template starts with
    `7 ** 14000000` answered 200 after 19.5 s, during which a stream stalled 18.5 s. Now: 400,
    the stream's longest gap stays far below that, and the server leaves no render process behind."""
    allowed = tmp_path / "allowed"
    power = hostile_model(tiny_model, allowed / "t_pow", "power")
    server = serve("--model", str(tiny_model), "--port", "0", "--slots", "2", "--load-from", str(allowed),
                   RLHF_HOME=str(tmp_path / "home"), RLHF_RUNS_DIR=str(tmp_path / "runs"))
    try:
        url = wait_until_serving(server)
        stop, gaps = threading.Event(), []
        canary = threading.Thread(target=stream_gaps, args=(url, stop, gaps))
        canary.start()
        while len(gaps) < 20:  # streaming
            assert canary.is_alive()
            time.sleep(0.05)
        before = len(gaps)
        loaded = httpx.post(f"{url}/v1/models/load", json={"model": str(power)}, timeout=120)
        during = len(gaps) - before
        stop.set()
        canary.join(timeout=120)
        assert loaded.status_code == 400, loaded.text
        assert during > 20 and max(gaps) < 3.0, (during, max(gaps))
        workers = children(server.pid)
        assert workers  # the render processes
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while running(workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not running(workers)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_a_worker_that_cannot_start_is_one_sentence_not_a_hang(tokenizer, monkeypatch):
    monkeypatch.setattr(templates, "BOOT", "import sys; sys.exit(3)")  # as a broken install would
    pool = RenderPool(size=2)
    try:
        with pytest.raises(TemplateError, match="did not start"):
            render_chat(tokenizer, CONVERSATIONS[0], 10**6, pool=pool)
    finally:
        pool.close()


def test_a_template_that_runs_out_of_time_is_not_blamed_on_the_request():
    """Probe 8, N9: a timeout or memory refusal of the model's template told the client to
    "check the order of roles", which cannot help."""
    from serving.validation import ApiError, encode

    class Failing:
        def __init__(self, err):
            self.err = err

        def encode_chat(self, messages, cancelled=None):
            raise self.err

    with pytest.raises(ApiError) as caught:
        encode(Failing(TemplateTimeout("the model's chat template took over 5 s")), [])
    assert "cannot render this conversation" in caught.value.message
    assert "order of roles" not in caught.value.message
    with pytest.raises(ApiError) as caught:  # the template's own refusal still is the request's
        encode(Failing(ValueError("Conversation roles must alternate")), [])
    assert "order of roles" in caught.value.message


# ---- probe 8, N1: slow renders must not hold up other requests --------------------------------

@pytest.fixture
def one_worker(tokenizer):
    """A pool of one worker, started (one render done), two renders may wait for it, and a copy
    of the tokenizer whose template loops."""
    pool = RenderPool(size=1, max_waiting=2)
    assert "Hi" in render_chat(tokenizer, CONVERSATIONS[0], 10**6, pool=pool)
    yield pool, with_prefix(tokenizer, HOSTILE["loop"])
    pool.close()


def test_a_looping_template_is_stopped_by_its_own_alarm_and_then_gets_less_time(tokenizer, one_worker):
    """Probe 8, N1: every timeout SIGKILLed its worker (a fresh interpreter takes seconds to
    start on a busy machine), and the same slow content held a worker for the full 5 s again and
    again. Python code is now interrupted in the worker, which serves on, and a template that has
    run out of time once gets SUSPECT_SECONDS."""
    pool, looping = one_worker
    worker = pool.pids()
    start = time.monotonic()
    with pytest.raises(TemplateTimeout):
        render_chat(looping, CONVERSATIONS[0], 10**6, pool=pool, seconds=2.0)
    assert 2.0 <= time.monotonic() - start < 2.0 + templates.KILL_GRACE_SECONDS
    assert pool.pids() == worker  # interrupted, not killed
    start = time.monotonic()
    with pytest.raises(TemplateTimeout, match=f"over {templates.SUSPECT_SECONDS:g} s"):
        render_chat(looping, CONVERSATIONS[1], 10**6, pool=pool, seconds=5.0)
    assert templates.SUSPECT_SECONDS <= time.monotonic() - start \
        < templates.SUSPECT_SECONDS + templates.KILL_GRACE_SECONDS
    start = time.monotonic()
    with pytest.raises(TemplateTimeout):  # the same conversation again: refused unrendered
        render_chat(looping, CONVERSATIONS[0], 10**6, pool=pool, seconds=5.0)
    assert time.monotonic() - start < 0.1
    assert "Hi" in render_chat(tokenizer, CONVERSATIONS[0], 10**6, pool=pool)  # the other template: full time
    assert pool.pids() == worker


def in_thread(call) -> dict:
    """Runs call() on a thread; the dict gets its "result" or "error" and "seconds" (and the
    thread, to join)."""
    outcome = {}

    def run():
        start = time.monotonic()
        try:
            outcome["result"] = call()
        except Exception as err:  # noqa: BLE001  (the test looks at it)
            outcome["error"] = err
        outcome["seconds"] = time.monotonic() - start
    outcome["thread"] = threading.Thread(target=run)
    outcome["thread"].start()
    return outcome


def test_a_render_given_up_stops_at_once_rendering_or_waiting(tokenizer, one_worker):
    """Probe 8, N1: closing the connection did not stop its render: 16 requests sent and
    abandoned kept every worker busy. A render whose `cancelled` event is set now ends within a
    fraction of a second, and its worker serves on."""
    pool, looping = one_worker
    worker = pool.pids()
    given_up = threading.Event()
    threading.Timer(0.5, given_up.set).start()
    start = time.monotonic()
    with pytest.raises(RenderCancelled):
        render_chat(looping, CONVERSATIONS[0], 10**6, pool=pool, seconds=4.0, cancelled=given_up)
    assert time.monotonic() - start < 1.5
    assert pool.pids() == worker  # interrupted, not killed

    holder = in_thread(lambda: render_chat(looping, CONVERSATIONS[0], 10**6, pool=pool, seconds=3.0))
    time.sleep(0.3)  # it holds the only worker
    given_up = threading.Event()
    waiter = in_thread(lambda: render_chat(tokenizer, CONVERSATIONS[0], 10**6, pool=pool,
                                           cancelled=given_up))
    time.sleep(0.5)
    given_up.set()
    waiter["thread"].join(timeout=10)
    assert isinstance(waiter.get("error"), RenderCancelled) and waiter["seconds"] < 1.5, waiter
    holder["thread"].join(timeout=10)
    assert isinstance(holder.get("error"), TemplateTimeout), holder


def test_renders_past_the_pool_s_room_are_refused_at_once_and_waits_are_bounded(tokenizer, one_worker,
                                                                                monkeypatch):
    """Probe 8, N1: a render waited up to 80 s for a worker, so 12 slow requests queued every
    other client's render behind them for 30 s. Now a render waits WAIT_SECONDS at most, and past
    the pool's max_waiting, RenderBusy comes at once (the server answers 429)."""
    monkeypatch.setattr(templates, "WAIT_SECONDS", 1.5)
    pool, looping = one_worker
    holder = in_thread(lambda: render_chat(looping, CONVERSATIONS[0], 10**6, pool=pool, seconds=4.0))
    time.sleep(0.3)
    waiters = [in_thread(lambda: render_chat(tokenizer, CONVERSATIONS[0], 10**6, pool=pool))
               for _ in range(2)]
    time.sleep(0.3)
    start = time.monotonic()
    with pytest.raises(RenderBusy):
        render_chat(tokenizer, CONVERSATIONS[0], 10**6, pool=pool)
    assert time.monotonic() - start < 0.5
    for waiter in waiters:
        waiter["thread"].join(timeout=10)
        assert isinstance(waiter.get("error"), RenderBusy), waiter
        assert 1.4 <= waiter["seconds"] < 3.0, waiter
    holder["thread"].join(timeout=10)
    assert isinstance(holder.get("error"), TemplateTimeout), holder
    assert "Hi" in render_chat(tokenizer, CONVERSATIONS[0], 10**6, pool=pool)


SLOW_CONTENT = "{% if 'SLOWSLOW' in messages[-1]['content'] %}" + HOSTILE["loop"] + "{% endif %}"


def timed_post(url: str, body, path: str = "/v1/chat/completions") -> tuple[int, float]:
    start = time.monotonic()
    if isinstance(body, bytes):
        response = httpx.post(url + path, content=body, headers={"content-type": "application/json"},
                              timeout=120)
    else:
        response = httpx.post(url + path, json=body, timeout=120)
    return response.status_code, time.monotonic() - start


def slow_body(tag) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": f"SLOWSLOW {tag}"}], "max_tokens": 4}).encode()


def attack(url: str, varied: bool, stop: threading.Event, statuses: list[int]) -> None:
    """Resends a request whose render loops until `stop`: the same one, or a new one each time."""
    sent = 0
    while not stop.is_set():
        statuses.append(timed_post(url, slow_body(sent if varied else "again"))[0])
        sent += 1


@pytest.mark.parametrize("varied", [False, True], ids=["same", "varied"])
def test_slow_renders_hold_up_no_other_request_nor_a_load(tiny_model, tmp_path, varied):
    """Probes 8 (N1) and 9 (P9-1), through HTTP, on a model whose template loops only for some
    content. Probe 8: 12 such requests made an innocent request wait 31 s and left a bad-JSON
    request and a model load unanswered for 15 s; 16 such requests sent and abandoned did the
    same. Probe 9: 12 clients resending such a request got 17 of 18 innocent requests a 429.
    Now abandoned renders stop, every innocent request is answered 200 within seconds while 12
    clients resend slow ones (the same, refused at once once it has run out of time; or a new
    one each time, in line with the rest), a bad body gets its 400 and the load its 200 at
    once, and the server shuts down promptly."""
    allowed = tmp_path / "allowed"
    shutil.copytree(tiny_model, allowed / "slow")
    template = allowed / "slow" / "chat_template.jinja"
    template.write_text(SLOW_CONTENT + template.read_text())
    other = shutil.copytree(tiny_model, allowed / "other")
    server = serve("--model", str(allowed / "slow"), "--port", "0", "--slots", "2",
                   "--load-from", str(allowed), RLHF_HOME=str(tmp_path / "home"),
                   RLHF_RUNS_DIR=str(tmp_path / "runs"))
    innocent = {"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 4}
    stop, statuses = threading.Event(), []
    try:
        url = wait_until_serving(server)
        assert timed_post(url, innocent)[0] == 200
        host, port = url.removeprefix("http://").split(":")
        for n in range(16):  # sent, then abandoned, before the template has run out of time once
            with socket.create_connection((host, int(port))) as sock:
                body = slow_body(f"abandoned {n}")
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                             b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.5)
        status, seconds = timed_post(url, innocent)  # unstopped, 4 renders would hold every worker 2 s
        assert status == 200 and seconds < 1.0, (status, seconds)

        attackers = [threading.Thread(target=attack, args=(url, varied, stop, statuses)) for _ in range(12)]
        for attacker in attackers:
            attacker.start()
        time.sleep(1.0)
        for _ in range(5):
            status, seconds = timed_post(url, innocent)
            assert status == 200 and seconds < 4.0, (status, seconds)
        status, seconds = timed_post(url, b"{not json")
        assert status == 400 and seconds < 1.0, (status, seconds)
        status, seconds = timed_post(url, {"model": str(other)}, "/v1/models/load")
        assert status == 200 and seconds < 30, (status, seconds)
        stop.set()
        for attacker in attackers:
            attacker.join(timeout=120)
        assert 400 in statuses and set(statuses) <= {200, 400, 429}, statuses  # 200: after the load
        assert timed_post(url, innocent)[0] == 200

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0
    finally:
        stop.set()
        if server.poll() is None:
            server.kill()
            server.wait()
