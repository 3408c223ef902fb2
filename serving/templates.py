"""Chat templates rendered in worker processes, so that no template can stall or bloat the server.

A chat template is code from the model's folder (Jinja, in transformers' sandbox). The sandbox
stops file and attribute access, not cost: `7 ** 14000000` or `'a' * 1200000000` is one C call
that holds the GIL for seconds and gigabytes, and no thread of the server can interrupt it (probe
6 P1, probe 7 F5: every client's stream stalled 18 s). So the server renders in a small pool of
worker processes:

- a worker is a fresh interpreter (`python -c`, started with fork+exec by subprocess: never a
  fork of the server, which runs torch threads) that imports transformers' renderer only, not
  torch nor the server, with its address space capped (TEMPLATE_MEMORY_BYTES): a huge string
  ends in MemoryError there, a TemplateError here;
- a render past its time (TEMPLATE_SECONDS) ends in TemplateTimeout: the worker's own alarm
  interrupts it (a Jinja loop, or `7 ** 14000000`, whose C code checks for signals) and it
  serves on; one that does not answer (a C call that never checks) gets SIGKILL, and a fresh
  worker is started in its place. A template that has run out of time once is suspect: its
  later renders get SUSPECT_SECONDS, since real templates render in milliseconds and its slow
  content may come again; a conversation that ran out of time is refused at once when it comes
  again (the last TIMED_OUT_KEPT are remembered), so resending one costs no render (probes 8 N1,
  9 P9-1);
- renders run side by side: each takes an idle worker; while none is idle the pool starts more,
  up to POOL_SIZE, and it keeps a spare started, so one slow render delays no other. Past
  POOL_SIZE renders, up to MAX_WAITING more wait in line (first come, first served) for a
  worker, each at most WAIT_SECONDS; past those, RenderBusy at once (the server answers 429);
- a render whose caller sets its `cancelled` event (the client went away, the server is shutting
  down) stops waiting, or has its worker interrupted (SIGUSR1, as its alarm) or else killed;
- the text is what `tokenizer.apply_chat_template(messages, add_generation_prompt=True,
  tokenize=False)` gives: the same `render_jinja_template` call with the tokenizer's special
  tokens as variables, the messages' None values dropped as transformers does.

Workers are plain subprocesses rather than multiprocessing's spawn or forkserver: both re-import
the parent's __main__ in each worker (`python -m serving`'s, so torch and the whole server). A
worker ends when the pool closes (at exit), when its stdin closes (the server is gone), or,
mid-render, at a CPU-time limit seconds past its render's time: none outlives the server long.

Left out: tools, documents, continue_final_message and the assistant-token mask (the server
passes none); tokenising the text (Engine.encode_chat does it, in the server).
"""
from __future__ import annotations

import atexit
import collections
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

from core.models import ModelError

# The longest one render may take. Real templates render a conversation in about a millisecond;
# this is how long a hostile one holds a worker (and a refused load its caller), and so about how
# long other requests wait for a worker while hostile renders hold them all (probe 8, N1).
TEMPLATE_SECONDS = 2.0
# A worker's whole address space (~200 MB of it is the interpreter and the renderer): a rendered
# conversation is at most a few MB (Engine.encode_chat's bound), so 1 GiB refuses only hostile ones.
TEMPLATE_MEMORY_BYTES = 1 << 30
# A template that has timed out once gets this long per render: still some 100 times a real
# render's time, and little more than a plain request costs the server.
SUSPECT_SECONDS = 0.25
TIMED_OUT_KEPT = 4096  # conversations that ran out of time, refused at once when they come again
KILL_GRACE_SECONDS = 0.5  # how long past its time a worker has to answer for its own alarm
POOL_SIZE = 4            # workers at most: renders in flight at once
MAX_WAITING = 8 * POOL_SIZE  # renders waiting in line for a worker
START_SECONDS = 60.0     # the longest a render waits for a worker to start (~1-3 s on a busy machine)
WAIT_SECONDS = 2 * TEMPLATE_SECONDS  # the longest a render waits for a busy worker to come free
ROOT = Path(__file__).resolve().parents[1]
BOOT = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from serving.templates import serve; serve()"


class TemplateError(ModelError):
    """A chat template that cannot serve: it needs too much memory or time, writes far more than
    a conversation may hold, or its process could not run it."""


class TemplateTimeout(TemplateError):
    """A chat template took longer than TEMPLATE_SECONDS to render one conversation."""


class TemplateTooLong(TemplateError):
    """A chat template wrote more than the caller's bound; `chars` is how much."""

    def __init__(self, chars: int):
        super().__init__(f"the model's chat template wrote {chars} characters for one conversation")
        self.chars = chars


class RenderBusy(Exception):
    """Every worker is rendering and the line of renders waiting is full, or none came free
    within WAIT_SECONDS: the server is busy, not the request wrong."""


class RenderCancelled(Exception):
    """The render's caller gave up on it (its `cancelled` event was set)."""


class TemplateRejected(ValueError):
    """The template refused these messages itself (raise_exception, an undefined name, ...): the
    request's fault or the template's, as apply_chat_template would have raised."""


def render_chat(tokenizer, messages: list[dict], max_chars: int, pool: RenderPool | None = None,
                seconds: float | None = None, cancelled: threading.Event | None = None) -> str:
    """The text of `messages` through `tokenizer`'s chat template with the generation prompt,
    rendered by `pool` (the shared one) within `seconds` (TEMPLATE_SECONDS); TemplateTooLong
    past `max_chars`; RenderCancelled once `cancelled` is set."""
    job = {"template": tokenizer.get_chat_template(), "messages": messages,
           "variables": dict(tokenizer.special_tokens_map), "max_chars": max_chars}
    return (pool or shared_pool()).render(job, seconds or TEMPLATE_SECONDS, cancelled)


_pool: RenderPool | None = None
_pool_lock = threading.Lock()


def shared_pool() -> RenderPool:
    """The server process's pool (one for every engine: the template travels with each job),
    created on first use and closed at exit."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = RenderPool()
            atexit.register(_pool.close)
        return _pool


class Worker:
    """One render process and the two pipes to it (length-prefixed JSON messages)."""

    def __init__(self):
        # one thread each for BLAS and OpenMP: the renderer imports numpy, which computes nothing here
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, "-c", BOOT], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env)
        self.jobs = Connection(os.dup(self.process.stdin.fileno()), readable=False)
        self.replies = Connection(os.dup(self.process.stdout.fileno()), writable=False)
        self.killed = False
        self.process.stdin.close()
        self.process.stdout.close()
        try:
            ready = self.replies.poll(START_SECONDS) and self._reply(1024) == {"ready": True}
        except TemplateError:  # it ended: its error is in the server's log
            ready = False
        if not ready:
            self.kill()
            raise TemplateError(f"the chat-template process did not start within {START_SECONDS:g} s "
                                "(see the server's log): check that transformers imports here.")

    def render(self, job: dict, seconds: float, cancelled: threading.Event | None) -> dict:
        """The worker's reply; TemplateTimeout (the worker killed) when it does not answer in
        time, RenderCancelled (the worker interrupted, or killed if it does not answer) once
        `cancelled` is set."""
        self.jobs.send_bytes(json.dumps({**job, "seconds": seconds}, default=str).encode())
        deadline = time.monotonic() + seconds + KILL_GRACE_SECONDS  # its own alarm comes first
        while not self.replies.poll(min(0.1, max(0.0, deadline - time.monotonic()))):
            if cancelled is not None and cancelled.is_set():
                self.process.send_signal(signal.SIGUSR1)  # as its alarm: it answers and serves on
                if self.replies.poll(KILL_GRACE_SECONDS):
                    self._reply(12 * job["max_chars"] + 4096)
                else:
                    self.kill()
                raise RenderCancelled()
            if time.monotonic() >= deadline:
                self.kill()
                raise timed_out(seconds)
        # a reply is at most max_chars characters, each at most 12 bytes as JSON (\\uXXXX pairs)
        return self._reply(12 * job["max_chars"] + 4096)

    def _reply(self, max_bytes: int) -> dict:
        try:
            return json.loads(self.replies.recv_bytes(max_bytes))
        except (EOFError, OSError):  # it ended (a signal, the CPU limit) or wrote past the bound
            code = self.kill()
            raise TemplateError(f"the chat-template process ended while rendering (exit {code}): "
                                "fix chat_template in the model's tokenizer files.") from None

    def kill(self) -> int:
        """SIGKILL (a template in C code answers nothing else), then reap it; its exit code."""
        self.killed = True
        self.process.kill()
        for pipe in (self.jobs, self.replies):
            pipe.close()
        return self.process.wait()


def timed_out(seconds: float) -> TemplateTimeout:
    return TemplateTimeout(f"the model's chat template took over {seconds:g} s to render one "
                           "conversation (a loop, or a huge computation?): fix chat_template in "
                           "its tokenizer files.")


class RenderPool:
    """Up to `size` workers; `render` takes an idle one, or waits in line for one."""

    def __init__(self, size: int = POOL_SIZE, max_waiting: int = MAX_WAITING):
        self.size, self.max_waiting = size, max_waiting
        self._suspects: set[int] = set()  # hashes of templates that have run out of time
        self._timed_out: collections.OrderedDict[int, None] = collections.OrderedDict()  # conversations
        self._idle: list[Worker] = []
        self._workers: set[Worker] = set()  # started and not killed: idle or rendering
        self._line: collections.deque[object] = collections.deque()  # renders waiting, first first
        self._starting = 0
        self._start_error: Exception | None = None
        self._closed = False
        self._changed = threading.Condition()

    def render(self, job: dict, seconds: float, cancelled: threading.Event | None = None) -> str:
        suspect = hash(job["template"])
        if suspect in self._suspects:
            seconds = min(seconds, SUSPECT_SECONDS)
        conversation = hash((job["template"], json.dumps(job["messages"], sort_keys=True, default=str)))
        if conversation in self._timed_out:
            raise timed_out(seconds)
        for attempt in range(2):
            worker = self._take(cancelled)
            if conversation in self._timed_out:  # while it waited, the same one ran out of time
                self._give_back(worker)
                raise timed_out(seconds)
            try:
                reply = worker.render(job, seconds, cancelled)
            except (BrokenPipeError, ConnectionResetError):  # it died while idle: another one
                self._drop(worker)
                if attempt:
                    raise TemplateError("the chat-template processes end as soon as they start: "
                                        "see the server's log.") from None
                continue
            except TemplateTimeout:
                self._ran_out(suspect, conversation)
                self._drop(worker)
                raise
            except RenderCancelled:
                if worker.killed:
                    self._drop(worker)
                else:
                    self._give_back(worker)
                raise
            except BaseException:
                self._drop(worker)
                raise
            self._give_back(worker)
            if reply.get("error") == "timeout":  # its own alarm: the worker serves on
                self._ran_out(suspect, conversation)
                raise timed_out(seconds)
            return result_of(reply)

    def _ran_out(self, template: int, conversation: int) -> None:
        with self._changed:
            self._suspects.add(template)
            self._timed_out[conversation] = None
            while len(self._timed_out) > TIMED_OUT_KEPT:
                self._timed_out.popitem(last=False)

    def close(self) -> None:
        """Kill every worker (renders in flight end in TemplateError); later renders are refused."""
        with self._changed:
            self._closed, idle, busy = True, list(self._idle), self._workers - set(self._idle)
            self._idle.clear()
            self._workers.clear()
            self._changed.notify_all()
        for worker in idle:
            worker.kill()
        for worker in busy:  # its render thread sees the pipe end, then closes and reaps it
            worker.process.kill()

    def pids(self) -> list[int]:
        with self._changed:
            return [worker.process.pid for worker in self._workers]

    def _take(self, cancelled: threading.Event | None) -> Worker:
        start, ticket = time.monotonic(), object()
        with self._changed:
            if len(self._line) >= self.max_waiting:
                raise RenderBusy(f"every chat-template process is busy and {len(self._line)} renders wait")
            self._line.append(ticket)
            try:
                while not (self._idle and self._line[0] is ticket):
                    if self._closed:
                        raise TemplateError("the server is shutting down: no chat template renders now.")
                    if self._start_error is not None and not self._starting:
                        error, self._start_error = self._start_error, None  # the next one tries again
                        raise error
                    if self._starting < len(self._line) and len(self._workers) + self._starting < self.size:
                        self._start_one()
                    if cancelled is not None and cancelled.is_set():
                        raise RenderCancelled()
                    # for a busy worker WAIT_SECONDS; while none runs yet, for one to start
                    waited = time.monotonic() - start
                    if waited >= (WAIT_SECONDS if self._workers else START_SECONDS):
                        raise RenderBusy(f"no chat-template process came free in {waited:.0f} s")
                    self._changed.wait(0.1 if cancelled is not None else 1.0)
                worker = self._idle.pop()
            finally:
                self._line.remove(ticket)
                self._changed.notify_all()  # the next in line may take an idle worker
            self._keep_a_spare()
            return worker

    def _give_back(self, worker: Worker) -> None:
        with self._changed:
            if worker in self._workers:  # not closed meanwhile
                self._idle.append(worker)
                self._changed.notify_all()  # the first in line takes it

    def _drop(self, worker: Worker) -> None:
        worker.kill()
        with self._changed:
            self._workers.discard(worker)
            self._keep_a_spare()  # its replacement, ready before the next render asks
            self._changed.notify_all()

    def _keep_a_spare(self) -> None:  # called holding the lock
        if not self._closed and not self._idle and not self._starting \
                and len(self._workers) < self.size:
            self._start_one()

    def _start_one(self) -> None:  # called holding the lock
        self._starting += 1
        threading.Thread(target=self._started, name="template-worker-start", daemon=True).start()

    def _started(self) -> None:
        worker, error = None, None
        try:
            worker = Worker()
        except Exception as err:  # noqa: BLE001  (handed to the renders waiting)
            error = err if isinstance(err, TemplateError) else TemplateError(
                f"cannot start a chat-template process ({err}): see the server's log.")
        with self._changed:
            self._starting -= 1
            self._start_error = error
            if worker is not None and not self._closed:
                self._workers.add(worker)
                self._idle.append(worker)
                worker = None
            self._changed.notify_all()
        if worker is not None:  # the pool closed while it started
            worker.kill()


def result_of(reply: dict) -> str:
    """The rendered text of a worker's reply, or the error it stands for."""
    if "text" in reply:
        return reply["text"]
    if "chars" in reply:
        raise TemplateTooLong(reply["chars"])
    if reply.get("error") == "MemoryError":
        raise TemplateError(f"the model's chat template needed over {TEMPLATE_MEMORY_BYTES >> 20} MB "
                            "to render one conversation: fix chat_template in its tokenizer files.")
    raise TemplateRejected(reply["message"])


# ---- the worker process ----------------------------------------------------------------------

class TimeUp(BaseException):
    """A render's alarm or its caller's cancel (a BaseException: a template catches no such thing)."""


_rendering = False  # a signal's handler raises TimeUp only while this is set


def time_up(_signum, _frame):
    if _rendering:  # not after the render: a late signal must not cut the reply short
        raise TimeUp()


def end_render() -> None:
    """No more TimeUp for this render: the flag down, the alarm off (each call may be cut short
    by a signal; at most two come per render, its alarm and one cancel, and each is caught by a
    layer that calls this again: render_job's and serve's)."""
    global _rendering
    _rendering = False
    signal.setitimer(signal.ITIMER_REAL, 0)


def serve() -> None:
    """A worker's main loop: one job in, one reply out, until stdin closes."""
    jobs, replies = Connection(os.dup(0), writable=False), Connection(os.dup(1), readable=False)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # a stray print goes to the server's log, not into the replies
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle (it closes us)
    signal.signal(signal.SIGALRM, time_up)  # the render's time is up
    signal.signal(signal.SIGUSR1, time_up)  # its caller gave up on it
    from transformers.utils.chat_template_utils import render_jinja_template

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_AS, (TEMPLATE_MEMORY_BYTES, TEMPLATE_MEMORY_BYTES))
    try:
        replies.send_bytes(b'{"ready": true}')
        while True:
            job = json.loads(jobs.recv_bytes())
            limit_cpu(job["seconds"])
            try:
                reply = render_job(render_jinja_template, job)
            except TimeUp:  # the second signal, inside render_job's handling of the first
                end_render()
                reply = {"error": "timeout"}
            replies.send_bytes(json.dumps(reply).encode())
    except (EOFError, OSError):  # the server closed the pipes (it ended, or gave up on this worker)
        return


def limit_cpu(seconds: float) -> None:
    """SIGXCPU well past this render's time: our alarm or the server (which kills us half a
    second past it, or later on a busy server) comes first, unless the server is gone."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(usage.ru_utime + usage.ru_stime + seconds) + 10
    resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.getrlimit(resource.RLIMIT_CPU)[1]))


def render_job(render_jinja_template, job: dict) -> dict:
    """The reply to one job; Python code past the job's time is interrupted by SIGALRM, or by
    SIGUSR1 from the server (a C call is not: the server kills us then)."""
    global _rendering
    try:
        # as apply_chat_template: None values dropped, special tokens as variables
        messages = [{key: value for key, value in message.items() if value is not None}
                    for message in job["messages"]]
        _rendering = True
        signal.setitimer(signal.ITIMER_REAL, job["seconds"])
        try:
            rendered, _ = render_jinja_template(conversations=[messages], tools=None, documents=None,
                                                chat_template=job["template"],
                                                return_assistant_tokens_mask=False,
                                                continue_final_message=False,
                                                add_generation_prompt=True, **job["variables"])
        finally:
            end_render()
    except TimeUp:
        end_render()  # again: the signal may have cut the one above short
        return {"error": "timeout"}
    except MemoryError:
        return {"error": "MemoryError"}
    except Exception as err:  # noqa: BLE001  (the template's own error, for the caller)
        return {"error": type(err).__name__, "message": str(err)[:500]}
    text = rendered[0]
    return {"text": text} if len(text) <= job["max_chars"] else {"chars": len(text)}
