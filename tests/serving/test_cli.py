"""`python -m serving` as a user runs it: it serves over HTTP, and the errors a user can cause
end in one `error:` line and exit code 2."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx

from serving.api import bind
from tests.conftest import ROOT
from tests.serving import openai_client


def user_env() -> dict:
    # as inherited: DeepSpeed variables this process set are the child's to replace (train/ds.py)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def serve(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "serving", *args], cwd=ROOT, env=user_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_to_end(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving", *args], cwd=ROOT, env=user_env(),
                          capture_output=True, text=True, timeout=300)


def assert_one_error_line(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and lines[-1].startswith("error: "), done.stderr
    assert all(word in lines[-1] for word in words), lines[-1]


def test_serves_a_chat_over_http_on_loopback(tiny_model):
    server = serve("--model", str(tiny_model), "--port", "0", "--slots", "2")
    try:
        banner, seen = "", []
        while "http://" not in banner:  # this line names the address it serves
            banner = server.stdout.readline()
            seen.append(banner)
            assert banner or server.poll() is None, f"the server exited: {''.join(seen)}"
        url = re.search(r"(http://[\d.:]+)/v1", banner).group(1)
        assert url.startswith("http://127.0.0.1:")
        deadline = time.time() + 60
        while True:
            try:
                health = httpx.get(f"{url}/health").json()
                break
            except httpx.ConnectError:
                assert time.time() < deadline, "no /health answer within 60 s"
                time.sleep(0.2)
        assert health["engine"] == "ds-inference" and health["model"] == str(tiny_model)
        reply = openai_client(url).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)


def test_missing_model_folder_is_one_error_line(tmp_path):
    assert_one_error_line(run_to_end("--model", str(tmp_path / "no-such-run" / "final")),
                          "not found")


def test_port_in_use_is_one_error_line(tiny_model):
    taken = bind("127.0.0.1", 0)
    taken.listen()
    try:
        port = str(taken.getsockname()[1])
        assert_one_error_line(run_to_end("--model", str(tiny_model), "--port", port),
                              "cannot listen", port, "--port")
    finally:
        taken.close()
