"""`scepd serve --workers N`: one supervising parent, N worker processes on shared sockets.

The process model (README "Worker processes"):

- The parent does everything that must happen once before any request is served: it opens the
  store (migrations), loads the CA, issues the server TLS certificate if due, makes the demo
  challenge, closes the store again, and binds the listening sockets. It starts no thread and no
  event loop that outlives that step, so forking afterwards copies a clean single-threaded
  process.
- Workers are forked (multiprocessing's 'fork' context: a sentinel and an exit code per worker,
  and the child keeps the parent's loaded modules and configuration; 'spawn' would re-import
  everything and need the configuration pickled). Every worker runs the same aiohttp apps on
  the inherited listening sockets (aiohttp SockSite). One shared accept queue per socket rather
  than SO_REUSEPORT: a connection waiting in the queue is accepted by whichever worker is free,
  so a busy or killed worker strands nothing (with SO_REUSEPORT each worker has its own queue
  and the connections hashed to a worker that dies are reset), port 0 works, and no other
  process can bind the port beside us.
- Worker 0 is the primary: it runs the jobs that must run once per server (ACME validations
  resumed at start-up, the server certificate renewal); the other workers start only once the
  primary reported ready, so the start-up resume sees only what a previous run left behind. A
  restarted worker 0 is primary again.
- The parent supervises: SIGTERM/SIGINT stop every worker gracefully; a worker that dies is
  restarted; workers that keep failing at start-up (database unreachable, ...) make the parent
  exit non-zero with the worker's one-line reason instead of looping.
- SIGHUP reloads (README "Reloading"): the parent checks the new configuration and CA files
  (on_reload; None keeps the old workers), then replaces the workers one at a time: a new worker
  serves the shared sockets (reported ready) before the old one gets SIGTERM, so the accept
  queue always has a worker behind it. A new worker 0 starts as a secondary; once the old
  primary has exited, SIGUSR1 makes it the primary (its once-per-server jobs: resuming what the
  old one left unfinished, the server certificate), so two primaries never run at once.
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("scepd.workers")

#: consecutive start-up failures of one worker after which the parent gives up
MAX_START_FAILURES = 5
#: how long a worker may take to report ready (CA key load, migrations check, TLS contexts)
START_TIMEOUT = 120.0
#: how long workers get to finish their requests after SIGTERM before they are killed
STOP_TIMEOUT = 30.0
#: a worker that exits sooner than this after it started counts as failing to start
SHORT_LIFE = 5.0


class WorkerStartError(Exception):
    """A worker could not start; str() is the one-line reason it reported."""


def bind(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket the workers inherit (as aiohttp's TCPSite would make it)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def threads_other_than_main() -> list[threading.Thread]:
    """Threads left behind by the parent's preparation; forking with any of them is unsafe."""
    main = threading.main_thread()
    others = [t for t in threading.enumerate() if t is not main]
    for t in others:  # aiosqlite's connection threads end just after the store closed
        t.join(timeout=5)
    return [t for t in threading.enumerate() if t is not main]


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGTERM this worker when the parent dies (kill -9 of the parent leaves no orphans)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


#: a worker body: (index, primary, report) -> exit code; report(message) tells the parent
#: "ready" or a one-line start-up error
WorkerMain = Callable[[int, bool, Callable[[str], None]], int]


def _worker_entry(body: WorkerMain, index: int, primary: bool, conn, parent_pid: int) -> None:
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the parent's (a HUP to the group too)
    _die_with_parent(parent_pid)
    os.environ["SCEPD_WORKER"] = str(index)

    def report(message: str) -> None:
        try:
            conn.send(message)
        except OSError:  # the parent is gone
            pass
    code = body(index, primary, report)
    sys.stdout.flush()
    sys.exit(code)


@dataclass
class _Worker:
    index: int
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    started: float
    ready: bool = False


@dataclass
class Supervisor:
    """Starts `count` workers running `body`, restarts those that die, stops them all on a signal."""
    count: int
    body: WorkerMain
    on_restart: Callable[[int, int], None] = lambda index, pid: None
    #: SIGHUP: the body of the new workers, or None to keep the running ones
    on_reload: Callable[[], WorkerMain | None] = lambda: None
    _workers: dict[int, _Worker] = field(default_factory=dict)
    _failures: dict[int, int] = field(default_factory=dict)
    _signal: int | None = None
    _reload: bool = False

    def __post_init__(self) -> None:
        self._ctx = multiprocessing.get_context("fork")
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    # --- signals --------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            if self._signal is None:
                self._signal = signum
            try:
                os.write(self._wake_w, b"!")
            except OSError:
                pass
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

        def hup(_signum, _frame):
            self._reload = True
            try:
                os.write(self._wake_w, b"!")
            except OSError:
                pass
        signal.signal(signal.SIGHUP, hup)

    @property
    def stopping(self) -> bool:
        return self._signal is not None

    # --- workers --------------------------------------------------------------------------------

    def pids(self) -> list[int]:
        return [w.process.pid for _, w in sorted(self._workers.items()) if w.process.pid]

    def _spawn(self, index: int, primary: bool | None = None) -> _Worker:
        recv, send = self._ctx.Pipe(duplex=False)
        primary = index == 0 if primary is None else primary
        process = self._ctx.Process(target=_worker_entry, name=f"scepd-worker-{index}",
                                    args=(self.body, index, primary, send, os.getpid()))
        process.start()
        send.close()
        worker = _Worker(index, process, recv, time.monotonic())
        self._workers[index] = worker
        return worker

    def _await_ready(self, worker: _Worker) -> None:
        """Until the worker says ready; WorkerStartError if it fails or dies first."""
        deadline = worker.started + START_TIMEOUT
        while not self.stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                worker.process.kill()
                worker.process.join(5)
                raise WorkerStartError(f"worker {worker.index} did not start within {START_TIMEOUT:.0f} s")
            ready = multiprocessing.connection.wait([worker.conn, worker.process.sentinel, self._wake_r], left)
            if worker.conn in ready:
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):
                    message = None
                if message == "ready":
                    worker.ready = True
                    return
                worker.process.join(10)  # an error, or the pipe closed without a word: it is ending
                if worker.process.is_alive():
                    worker.process.kill()
                    worker.process.join(5)
                if message is not None:
                    raise WorkerStartError(message)
            if worker.process.sentinel in ready or not worker.process.is_alive():
                worker.process.join(5)
                raise WorkerStartError(f"worker {worker.index} exited with code {worker.process.exitcode} "
                                       "during start-up")
            if self._wake_r in ready:
                os.read(self._wake_r, 64)

    def start(self) -> None:
        """Worker 0 first (the primary runs the start-up jobs), then the others together.
        WorkerStartError (every worker stopped) if any fails."""
        try:
            self._await_ready(self._spawn(0))
            if self.stopping:
                return
            rest = [self._spawn(i) for i in range(1, self.count)]
            for worker in rest:
                self._await_ready(worker)
        except WorkerStartError:
            self.stop()
            raise

    def run(self) -> None:
        """Supervise until a signal; WorkerStartError if a worker keeps failing to (re)start."""
        while not self.stopping:
            if self._reload:  # a SIGHUP, also one that came during the start
                self._reload = False
                self.reload()
                continue  # the sentinels changed
            sentinels = {w.process.sentinel: w for w in self._workers.values()}
            ready = multiprocessing.connection.wait(list(sentinels) + [self._wake_r])
            if self._wake_r in ready:
                os.read(self._wake_r, 64)
            if self._reload:
                continue
            for sentinel in ready:
                worker = sentinels.get(sentinel)  # type: ignore[arg-type]
                if worker is None or self.stopping:
                    continue
                worker.process.join(5)
                code = worker.process.exitcode
                log.warning("worker %d (pid %s) exited with code %s; starting a new one",
                            worker.index, worker.process.pid, code)
                if time.monotonic() - worker.started < SHORT_LIFE:  # a crash loop: back off, then give up
                    failures = self._failures[worker.index] = self._failures.get(worker.index, 0) + 1
                    if failures >= MAX_START_FAILURES:
                        self.stop()
                        raise WorkerStartError(f"worker {worker.index} keeps exiting right after it "
                                               f"started (exit code {code})")
                else:
                    self._failures[worker.index] = 0
                self._restart(worker.index)
        self.stop()

    def reload(self) -> None:
        """Check the new configuration (on_reload), then replace every worker, one at a time.
        A worker that dies meanwhile is restarted by run() afterwards."""
        body = self.on_reload()
        if body is None:
            return
        self.body = body
        replaced = 0
        for index in sorted(self._workers):
            if self.stopping:
                return
            old = self._workers[index]
            if not old.process.is_alive():
                continue  # run() restarts it with the new body
            new = self._spawn(index, primary=False)  # registered as self._workers[index]
            try:
                self._await_ready(new)
            except WorkerStartError as exc:
                self._workers[index] = old
                new.conn.close()
                log.error("reload: a new worker %d did not start (%s); the workers not replaced yet "
                          "keep the previous configuration", index, exc)
                return
            self._retire(old)
            if self.stopping:  # a SIGTERM while the new one started: stop() stops it
                return
            if index == 0:  # the old primary is gone: the new worker 0 takes over its jobs
                try:
                    os.kill(new.process.pid, signal.SIGUSR1)
                except ProcessLookupError:  # it died meanwhile: run() restarts it as the primary
                    pass
            replaced += 1
        log.info("reloaded: %d workers replaced (pids %s)", replaced, " ".join(map(str, self.pids())))

    def _retire(self, worker: _Worker) -> None:
        """SIGTERM one worker and wait for it (STOP_TIMEOUT, then SIGKILL)."""
        try:
            os.kill(worker.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        worker.process.join(STOP_TIMEOUT)
        if worker.process.is_alive():
            log.error("worker %d (pid %s) did not stop in time; killing it", worker.index, worker.process.pid)
            worker.process.kill()
            worker.process.join(5)
        worker.conn.close()

    def _restart(self, index: int) -> None:
        while not self.stopping:
            failures = self._failures.get(index, 0)
            if failures:
                # back off 0.2, 0.4, 0.8 ... s; a signal ends the wait
                multiprocessing.connection.wait([self._wake_r], min(0.1 * 2 ** failures, 5.0))
                if self.stopping:
                    return
            worker = self._spawn(index)
            try:
                self._await_ready(worker)
            except WorkerStartError as exc:
                self._failures[index] = failures + 1
                log.error("worker %d failed to start (%d/%d): %s", index, failures + 1,
                          MAX_START_FAILURES, exc)
                if failures + 1 >= MAX_START_FAILURES:
                    self.stop()
                    raise
                continue
            if worker.ready:
                log.warning("worker %d restarted (pid %s)", index, worker.process.pid)
                self.on_restart(index, worker.process.pid)
            return

    def stop(self) -> None:
        """SIGTERM every worker, wait for them (STOP_TIMEOUT), SIGKILL those still running."""
        alive = [w for w in self._workers.values() if w.process.is_alive()]
        for w in alive:
            try:
                os.kill(w.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_TIMEOUT
        for w in alive:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                log.error("worker %d (pid %s) did not stop in time; killing it", w.index, w.process.pid)
                w.process.kill()
                w.process.join(5)
        for w in self._workers.values():
            w.conn.close()
        self._workers.clear()
