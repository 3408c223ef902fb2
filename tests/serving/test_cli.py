"""`python -m serving` as a user runs it: it serves over HTTP with the API key from a file or the
environment, shuts down gracefully on SIGTERM, and the errors a user can cause end in one
`error:` line and exit code 2."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serving.api import bind
from tests.conftest import ROOT
from tests.serving import openai_client


def user_env(**variables) -> dict:
    # as inherited: DeepSpeed variables this process set are the child's to replace (train/ds.py)
    environ = {k: v for k, v in os.environ.items() if k != "RLHF_API_KEY"}
    return {**environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **variables}


def serve(*args: str, **variables) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "serving", *args], cwd=ROOT, env=user_env(**variables),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until_serving(server: subprocess.Popen) -> str:
    """The base URL once the server answers /health (its output so far must name the address)."""
    banner, seen = "", []
    while "http://" not in banner:  # this line names the address it serves
        banner = server.stdout.readline()
        seen.append(banner)
        assert banner or server.poll() is None, f"the server exited: {''.join(seen)}"
    url = re.search(r"(http://[\d.:]+)/v1", banner).group(1)
    deadline = time.time() + 60
    while True:
        try:
            httpx.get(f"{url}/health")
            return url
        except httpx.ConnectError:
            assert time.time() < deadline, "no /health answer within 60 s"
            time.sleep(0.2)


def run_to_end(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving", *args], cwd=ROOT, env=user_env(),
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and lines[-1].startswith("error: "), done.stderr
    assert all(word in lines[-1] for word in words), lines[-1]


def test_serves_a_chat_over_http_on_loopback_with_the_key_from_a_file(tiny_model, tmp_path):
    """The key file wins over RLHF_API_KEY; the key never needs to be on the command line."""
    key_file = tmp_path / "key"
    key_file.write_text("from-the-file\n")
    server = serve("--model", str(tiny_model), "--port", "0", "--slots", "2",
                   "--api-key-file", str(key_file), RLHF_API_KEY="from-the-environment")
    try:
        url = wait_until_serving(server)
        assert url.startswith("http://127.0.0.1:")
        health = httpx.get(f"{url}/health").json()
        assert health["engine"] == "ds-inference" and health["model"] == str(tiny_model)
        for key in (None, "from-the-environment"):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 401
        reply = openai_client(url, api_key="from-the-file").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0


def test_missing_model_folder_is_one_error_line(tmp_path):
    assert_one_error_line(run_to_end("--model", str(tmp_path / "no-such-run" / "final")),
                          "not found")


def test_an_empty_or_missing_load_from_folder_is_one_error_line(tiny_model, tmp_path):
    """Probe 7, F10: `--load-from ""` (an unset variable) let requests load every folder under
    the working directory, and a folder that does not exist was accepted without a word."""
    done = run_to_end("--model", str(tiny_model), "--port", "0", "--load-from", "", timeout=120)
    assert_one_error_line(done, "--load-from is empty", "leave --load-from out")
    missing = tmp_path / "no-such-folder"
    done = run_to_end("--model", str(tiny_model), "--port", "0", "--load-from", str(missing), timeout=120)
    assert_one_error_line(done, f"--load-from {missing} is not a folder", "name an existing folder")


def test_port_in_use_is_one_error_line(tiny_model):
    taken = bind("127.0.0.1", 0)
    taken.listen()
    try:
        port = str(taken.getsockname()[1])
        assert_one_error_line(run_to_end("--model", str(tiny_model), "--port", port),
                              "cannot listen", port, "--port")
    finally:
        taken.close()


def test_unreadable_or_doubled_api_key_is_one_error_line(tmp_path):
    assert_one_error_line(run_to_end("--api-key-file", str(tmp_path / "no-key")),
                          "--api-key-file", "no-key", "cannot be read")
    key_file = tmp_path / "key"
    key_file.write_text("k\n")
    assert_one_error_line(run_to_end("--api-key", "k", "--api-key-file", str(key_file)),
                          "--api-key", "only one")


def test_a_key_file_that_is_not_a_regular_file_or_too_big_is_one_error_line(tmp_path):
    """F4: --api-key-file on a FIFO waited for a writer for ever (a device: read until memory
    ran out); now refused without reading, as is a file over 64 KB."""
    fifo = tmp_path / "key-fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big-key"
    big.write_text("k" * 70_000 + "\n")
    for path, words in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file"),
                        (big, "over 64 KB")):
        done = subprocess.run([sys.executable, "-m", "serving", "--api-key-file", str(path)],
                              cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=60)
        assert_one_error_line(done, "--api-key-file", str(path), words)


@pytest.fixture(scope="module")
def long_context_model(tiny_model, tmp_path_factory):
    """The tiny model with room for 32k-token answers (rotary positions: only the config
    changes), so an answer outlasts a short grace period on any machine."""
    folder = tmp_path_factory.mktemp("long-context")
    for path in tiny_model.iterdir():
        shutil.copy(path, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32768}))
    return folder


def sse(url: str, key: str, max_tokens: int, started: threading.Event) -> list[str]:
    """The event lines of a greedy stream; sets `started` at its first content."""
    body = {"messages": [{"role": "user", "content": "Tell me everything"}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0}
    lines = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {key}"}) as response:
        for line in response.iter_lines():
            lines.append(line)
            if '"content": "' in line and '"content": ""' not in line:
                started.set()
    return [line for line in lines if line]


def assert_clean_exit(server: subprocess.Popen, timeout: float) -> None:
    """The server exits 0 within `timeout` s, with no traceback or error in its log."""
    assert server.wait(timeout=timeout) == 0
    output = server.stdout.read()
    assert "Traceback" not in output and "ERROR" not in output, output


def test_sigterm_lets_running_answers_finish_then_ends_the_rest_cleanly(long_context_model):
    """SIGTERM with 3 answers running (2 of 32k tokens, 1 of 50) and 1 more sent: new requests
    get 503; the short answer finishes; after the 3 s grace the long stream ends with an error
    event and [DONE], the long plain requests with a 503 in OpenAI's shape; exit code 0 and no
    traceback. The key comes from RLHF_API_KEY."""
    server = serve("--model", str(long_context_model), "--port", "0", "--slots", "3",
                   "--max-tokens-limit", "32000", "--max-prompt-tokens", "64",
                   "--shutdown-grace", "3", RLHF_API_KEY="env-key")
    auth = {"Authorization": "Bearer env-key"}
    try:
        url = wait_until_serving(server)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        chat = f"{url}/v1/chat/completions"
        plain = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32000, "temperature": 0}
        with ThreadPoolExecutor(4) as pool:
            long_started, short_started = threading.Event(), threading.Event()
            long_stream = pool.submit(sse, url, "env-key", 32000, long_started)
            long_plain = pool.submit(httpx.post, chat, json=plain, headers=auth, timeout=120)
            assert long_started.wait(timeout=60)
            short_stream = pool.submit(sse, url, "env-key", 50, short_started)
            assert short_started.wait(timeout=60)
            late = pool.submit(httpx.post, chat, json=plain, headers=auth, timeout=120)  # queued, or
            time.sleep(0.2)                                  # in the short one's slot if it is done
            server.send_signal(signal.SIGTERM)
            deadline = time.time() + 10
            while httpx.get(f"{url}/health").status_code != 503:  # the long answers keep it up
                assert time.time() < deadline, "the server did not start shutting down"
                time.sleep(0.05)
            refused = httpx.post(chat, json=plain, headers=auth, timeout=30)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
            short = short_stream.result()
            assert '"finish_reason": "length"' in short[-2] and short[-1] == "data: [DONE]"
            cut = long_stream.result()
            assert "shutting down" in cut[-2] and '"error"' in cut[-2] and cut[-1] == "data: [DONE]"
            for answer in (long_plain.result(), late.result()):
                assert answer.status_code == 503 and "shutting down" in answer.json()["error"]["message"]
        assert_clean_exit(server, timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# `python -m serving` whose loader takes two minutes for the model "slow" (as a .gguf conversion
# takes half a minute), and says when it starts; it spends them inside torch operators, as a
# real load does (a load thread left inside one when Python exits aborted the process: F6)
SLOW_LOAD = """
import sys, time
import torch
import serving.engines
real_load = serving.engines.load_engine
def slow_load(model, *args, **kwargs):
    if model == "slow":
        print("slow load started", file=sys.stderr, flush=True)
        weights, until = torch.ones(600, 600), time.time() + 120
        while time.time() < until:
            torch.ops.aten.mm(weights, weights)
    return real_load(model, *args, **kwargs)
serving.engines.load_engine = slow_load
from serving.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_a_model_load_answers_it_503_and_exits_within_the_grace(tiny_model):
    """Probe 5, N5: SIGTERM while /v1/models/load converted a .gguf gave the loading client
    uvicorn's text/plain 500 and an ASGI traceback (CancelledError, 5 s after the signal), and
    the process exited only once the load's thread was done (46 s). Probe 7, F6: with the load
    inside a torch call the process then aborted ("terminate called without an active
    exception", exit code 134) as Python finalised around the abandoned thread."""
    server = subprocess.Popen([sys.executable, "-c", SLOW_LOAD, "--model", str(tiny_model), "--port",
                               "0", "--shutdown-grace", "3"], cwd=ROOT, env=user_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = wait_until_serving(server)
        with ThreadPoolExecutor(1) as pool:
            load = pool.submit(httpx.post, f"{url}/v1/models/load", json={"model": "slow"}, timeout=180)
            while "slow load started" not in server.stdout.readline():
                assert server.poll() is None
            server.send_signal(signal.SIGTERM)
            answer = load.result()
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "server_shutting_down"
        assert_clean_exit(server, timeout=30)  # the load's thread would hold it for 2 minutes
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_a_hub_name_with_the_hub_switched_off_is_one_error_line(tmp_path):
    """HF_HUB_OFFLINE=1 and a hub name not in the cache: the cause and the fix, exit 2."""
    done = subprocess.run([sys.executable, "-m", "serving", "--model", "someone/not-a-real-model",
                           "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=user_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub")))
    assert_one_error_line(done, "'someone/not-a-real-model'", "not in the local hub cache",
                          "unset HF_HUB_OFFLINE")


def test_a_key_file_with_a_byte_order_mark_or_a_key_no_client_can_send(tmp_path):
    """Probe 5: a key file saved with a UTF-8 byte-order mark started a server that answered
    401 to everyone (the mark was part of the key); a key holding NUL could never be sent."""
    from types import SimpleNamespace

    from core.options import ConfigError
    from serving.__main__ import API_KEY_VARIABLE, read_api_key

    marked = tmp_path / "marked"
    marked.write_bytes(b"\xef\xbb\xbfbomkey\n")
    assert read_api_key(SimpleNamespace(api_key=None, api_key_file=str(marked)), {}) == "bomkey"
    # probe 6 (P3): a line separator inside the key cut it short (splitlines), silently
    separated = tmp_path / "separated"
    separated.write_text("abc\u2028SECRET\n", encoding="utf-8")
    assert read_api_key(SimpleNamespace(api_key=None, api_key_file=str(separated)), {}) == \
        "abc\u2028SECRET"
    nul = tmp_path / "nul"
    nul.write_bytes(b"bad\x00key\n")
    for cfg, environ in [(SimpleNamespace(api_key=None, api_key_file=str(nul)), {}),
                         (SimpleNamespace(api_key="tab\there", api_key_file=None), {}),
                         (SimpleNamespace(api_key=None, api_key_file=None), {API_KEY_VARIABLE: "a\x7fb"})]:
        with pytest.raises(ConfigError, match="control character"):
            read_api_key(cfg, environ)


def test_a_request_loads_models_only_from_the_runs_models_and_load_from_folders(tiny_model, tmp_path):
    """Probe 6 (P1, P2): any client could make the server load any model folder on disk, and a
    folder's chat template runs inside the server: one doing C-level work (7 ** 14000000, a
    1.2 GB string) froze every client for 17-30 s. A request now loads only from the runs folder,
    $RLHF_HOME/models and --load-from (links resolved); --model may still name any folder."""
    runs, allowed, outside = tmp_path / "runs", tmp_path / "allowed", tmp_path / "outside"
    for folder in (runs / "r1" / "final", allowed / "m", outside / "m"):
        shutil.copytree(tiny_model, folder)
    (runs / "link").symlink_to(outside / "m")
    server = serve("--model", str(tiny_model), "--port", "0", "--slots", "2", "--load-from", str(allowed),
                   RLHF_HOME=str(tmp_path / "home"), RLHF_RUNS_DIR=str(runs))
    try:
        url = wait_until_serving(server)
        with httpx.Client(timeout=120) as http:
            for name, status in [(outside / "m", 400), (runs / "link", 400), (runs / "r1" / "final", 200),
                                 (allowed / "m", 200), ("someone/not-a-real-model", 400)]:
                answer = http.post(f"{url}/v1/models/load", json={"model": str(name)})
                assert answer.status_code == status, (name, answer.text)
                if status == 400:
                    assert "not found or is not a model" in answer.json()["error"]["message"]
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert "lies outside the folders this server loads from on request" in server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
