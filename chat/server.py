"""Starting, switching and stopping inference servers (`python -m serving`) for the app.

The app keeps one `ServerPool` per process. A pool runs at most `size` servers (default 2, so
the arena can compare two checkpoints without reloading weights for every answer), each a
`python -m serving` subprocess on a free port of 127.0.0.1 holding one checkpoint:

- `with pool.lease(model) as client:` gives a `ChatClient` of a server holding `model`: an
  existing one, a newly started one (waiting for `/health`), or the least recently used idle
  one switched through `POST /v1/models/load` (or started again on `model`, for a folder a
  server loads on request only from the runs and models folders);
- a leased server is never switched under a running answer: a lease waits until one is idle.

Every browser session shares the pool; chat state stays per session in the app. The app never
loads weights itself. `notify` (the app passes a console printer) hears of every server started,
switched or failed, with its checkpoint, port and log. Left out: servers on other machines, GPU
placement, restarting a server that dies mid-answer (the next lease starts a fresh one).
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path

from chat.client import ChatClient, ServerError
from core.distributed import free_port
from core.paths import outside_roots, request_roots, rlhf_home

ROOT = Path(__file__).resolve().parents[1]
SERVE_COMMAND = (sys.executable, "-m", "serving")


def last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [""])[-1].strip()


class ManagedServer:
    """One `python -m serving` subprocess and its client."""

    def __init__(self, model: str, engine: str, log_dir: Path, extra_args: tuple = (),
                 command: tuple = SERVE_COMMAND):
        self.model, self.engine, self.command = model, engine, tuple(command)
        self.port = free_port()
        self.log_path = Path(log_dir) / f"serving-{self.port}.log"
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen | None = None
        self.client = ChatClient(f"http://127.0.0.1:{self.port}")
        self.leases, self.ready, self.last_used = 0, False, time.time()

    def start(self, timeout: float) -> None:
        # its answers in flight get 10 s on SIGTERM, within the 15 s `stop` waits before a kill
        argv = [*self.command, "--model", self.model, "--engine", self.engine,
                "--port", str(self.port), "--shutdown-grace", "10", *self.extra_args]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        self.wait_ready(timeout)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float) -> None:
        """Poll /health until the server answers `ok`; a server that exits says why."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.alive():
                raise ServerError(f"the inference server for {self.model} exited: "
                                  f"{last_line(self.log_path) or 'no output'} (log: {self.log_path}).")
            try:
                if self.client.health().get("status") == "ok":
                    return
            except ServerError:
                pass  # not listening yet
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"the inference server for {self.model} did not start within "
                          f"{timeout:.0f} s: see {self.log_path}.")

    def switch(self, model: str, timeout: float) -> None:
        """Load `model` into this server; a folder a server loads only when its command line
        names it (outside the runs and models folders) gets this server started again on it."""
        self.model = model
        if not outside_roots(model, request_roots()):
            self.client.load(model)
            return
        self.stop()
        self.port = free_port()
        self.log_path = self.log_path.parent / f"serving-{self.port}.log"
        self.client = ChatClient(f"http://127.0.0.1:{self.port}")
        self.start(timeout)

    def stop(self) -> None:
        self.client.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class ServerPool:
    """At most `size` inference servers, one checkpoint each, shared by every browser session."""

    def __init__(self, engine: str = "auto", size: int = 2, log_dir: str | Path | None = None,
                 startup_timeout: float = 600.0, extra_args: tuple = (),
                 command: tuple = SERVE_COMMAND, notify=lambda message: None):
        self.engine, self.size, self.startup_timeout = engine, max(1, size), startup_timeout
        self.notify = notify
        self.log_dir = Path(log_dir) if log_dir else rlhf_home() / "serving-logs"
        self.extra_args, self.command = tuple(extra_args), tuple(command)
        self.servers: list[ManagedServer] = []
        self.changed = threading.Condition()

    @contextlib.contextmanager
    def lease(self, model: str):
        """A client of a server holding `model`, kept from being switched while in use."""
        server = self._acquire(model)
        try:
            yield server.client
        finally:
            with self.changed:
                server.leases -= 1
                server.last_used = time.time()
                self.changed.notify_all()

    def _claim(self, model: str):
        """Under the lock: (server, action) where action is None, "start" or "switch"."""
        while True:
            for dead in [s for s in self.servers if s.ready and not s.alive()]:
                dead.stop()  # crashed: the next lease of its model starts a fresh one
                self.servers.remove(dead)
            server = next((s for s in self.servers if s.model == model), None)
            if server is not None and server.ready:
                return server, None
            if server is None:  # nobody is bringing this model up yet
                if len(self.servers) < self.size:
                    server = ManagedServer(model, self.engine, self.log_dir, self.extra_args,
                                           self.command)
                    self.servers.append(server)
                    return server, "start"
                idle = [s for s in self.servers if s.ready and s.leases == 0]
                if idle:
                    server = min(idle, key=lambda s: s.last_used)
                    server.model, server.ready = model, False  # others wanting `model` wait here
                    return server, "switch"
            self.changed.wait()

    def _acquire(self, model: str) -> ManagedServer:
        with self.changed:
            server, action = self._claim(model)
            server.leases += 1
        if action is None:
            return server
        try:
            if action == "start":
                server.start(self.startup_timeout)
                self.notify(f"inference server started on {server.client.base_url} with {model} "
                            f"(engine {self.engine}, log {server.log_path})")
            else:
                server.switch(model, self.startup_timeout)
                self.notify(f"inference server on {server.client.base_url} switched to {model}")
        except BaseException as err:
            self.notify(f"inference server for {model} failed: {err}")
            server.stop()
            with self.changed:
                if server in self.servers:  # stop_all may have emptied the pool meanwhile
                    self.servers.remove(server)
                self.changed.notify_all()
            raise
        with self.changed:
            server.ready = True
            self.changed.notify_all()
        return server

    def status(self) -> list[dict]:
        with self.changed:
            return [{"model": s.model, "url": s.client.base_url, "engine": s.engine,
                     "ready": s.ready, "in_use": s.leases} for s in self.servers]

    def stop_all(self) -> None:
        with self.changed:
            servers, self.servers = self.servers, []
        for server in servers:
            server.stop()
