"""Chat templates render in worker processes (serving/templates.py): the text is exactly
apply_chat_template's, and a template that computes, allocates or loops without end is refused
while every other client goes on (probe 6 P1, probe 7 F5: `7 ** 14000000` froze the whole
server for 18 s and the model was loaded all the same)."""
from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time

import httpx
import pytest
from transformers import AutoTokenizer

from serving import templates
from serving.engines import Engine, load_engine
from serving.templates import RenderPool, TemplateError, TemplateRejected, TemplateTimeout, render_chat
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


def test_a_killed_worker_is_replaced_and_none_outlives_the_pool(tokenizer):
    pool = RenderPool(size=2)
    looping = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    looping.chat_template = HOSTILE["loop"] + tokenizer.chat_template
    try:
        assert "Hi" in render_chat(tokenizer, CONVERSATIONS[0], 10**6, pool=pool)
        before = until(lambda: set(pool.pids()) if len(pool.pids()) == 2 else None)  # and its spare
        with pytest.raises(TemplateTimeout):
            render_chat(looping, CONVERSATIONS[0], 10**6, pool=pool, seconds=1.0)
        killed = before - set(pool.pids())
        assert len(killed) == 1 and not running(killed)  # SIGKILLed and reaped
        for _ in range(3):
            assert "Hi" in render_chat(tokenizer, CONVERSATIONS[0], 10**6, pool=pool)
        fresh = until(lambda: set(pool.pids()) - before)  # its replacement
        assert len(pool.pids()) <= 2
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

        def encode_chat(self, messages):
            raise self.err

    with pytest.raises(ApiError) as caught:
        encode(Failing(TemplateTimeout("the model's chat template took over 5 s")), [])
    assert "cannot render this conversation" in caught.value.message
    assert "order of roles" not in caught.value.message
    with pytest.raises(ApiError) as caught:  # the template's own refusal still is the request's
        encode(Failing(ValueError("Conversation roles must alternate")), [])
    assert "order of roles" in caught.value.message
