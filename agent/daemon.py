"""The idle daemon of `scepd-agent run`: a supervisor that sleeps between checks and runs each
check in a short-lived child process.

Why: the interpreter with asyncio, ssl and cryptography loaded is already about 33 MB resident
(aiohttp and the SCEP codec bring a check to about 50 MB), more than an idle agent should hold
for 20 minutes. This module imports only the standard library it needs to sleep and to decide
(logging, datetime, os, signal, time: about 12 MB), so between checks the daemon is one small
process with one thread that makes no system call until the next check or a signal.

`scepd-agent run` validates its options, records the rules, then exec()s this module (same PID,
so systemd's MainPID and `kill -HUP` keep working). Each check is `python -m agent run ...
--check-once-fd N`: the same options, one `Agent.daemon_check()`, the instant of the next check
written to the pipe N, exit 0. The child logs to the same stderr, so the log reads as before.
The price: each check starts an interpreter and imports aiohttp and cryptography again (about
0.4 s of CPU per check instead of about 10 ms; every 20 minutes).

Signals are blocked and taken with sigtimedwait (no handler, no wake-up fd, no polling):
  SIGTERM/SIGINT  stop after the current check (a child that gets them too only logs them)
  SIGHUP          check now (during a check: check again right after it)
A child that exits with a failure, is killed, or gives no next instant is logged at ERROR and the
next check comes after the interval; a child still running after CHECK_DEADLINE is killed (the
state directory is crash-safe: a kill leaves a matching pair).
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import sys
import time

log = logging.getLogger("scepd.agent")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: no check may take longer (the hook alone may take 5 minutes, an ACME validation 2, a SCEP
#: request pending approval about 5)
CHECK_DEADLINE = 3600.0
STOP = (signal.SIGTERM, signal.SIGINT)
#: the re-enrollment challenge, from `run` to each check (environment of the supervisor, same user)
CHALLENGE_ENV = "_SCEPD_AGENT_RUN_CHALLENGE"
SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}


def setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def exec_supervisor(interval_seconds: float, verbose: bool, run_args: list[str], challenge: str | None) -> None:
    """Replace this process (the `run` command, with everything a check needs imported) by the
    lean supervisor. `run_args`: the `scepd-agent` arguments of one check, without the fd;
    `challenge`: read once now (`--challenge-file` or SCEPD_AGENT_CHALLENGE), handed to each check
    in the environment variable CHALLENGE_ENV, which the check removes before it runs the hook."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    env = dict(os.environ)
    env.pop(CHALLENGE_ENV, None)
    if challenge is not None:
        env[CHALLENGE_ENV] = challenge
    argv = [sys.executable, "-m", "agent.daemon", repr(float(interval_seconds)), "1" if verbose else "0", *run_args]
    os.execve(sys.executable, argv, env)


class Supervisor:
    """One check at a time in a child process; sleeps in sigtimedwait in between."""

    def __init__(self, interval_seconds: float, command: list[str], *, deadline: float = CHECK_DEADLINE,
                 now=lambda: dt.datetime.now(dt.timezone.utc)):
        """`command`: the argv of one check, to which `--check-once-fd N` is appended; `interval_seconds`:
        the wait after a check that gave no next instant; `now`: the clock."""
        self.interval = interval_seconds
        self.command = command
        self.deadline = deadline
        self.now = now
        self.stop = False
        self.wake = False

    # --- signals ----------------------------------------------------------------------------

    def _signal(self, signum: int) -> None:
        if signum in STOP:
            log.info("SIGTERM/SIGINT: stopping after the current step")
            self.stop = True
        elif signum == signal.SIGHUP:
            log.info("SIGHUP: checking now")
            self.wake = True

    def _wait_signal(self, timeout: float | None):
        """The next of SIGNALS, or None once `timeout` seconds have passed."""
        if timeout is None:
            return signal.sigwaitinfo(SIGNALS)
        return signal.sigtimedwait(SIGNALS, max(0.0, timeout))

    # --- one check ----------------------------------------------------------------------------

    def check(self) -> dt.datetime:
        """Run one check in a child; the instant of the next check."""
        fallback = self.now() + dt.timedelta(seconds=self.interval)
        read_end, write_end = os.pipe()
        try:
            os.set_inheritable(write_end, True)
            argv = [*self.command, "--check-once-fd", str(write_end)]
            # the child starts with SIGTERM/SIGINT/SIGHUP blocked (it takes them over once ready)
            # and SIGCHLD open (its hook is its own child)
            pid = os.posix_spawn(argv[0], argv, os.environ,
                                 setsigmask=SIGNALS - {signal.SIGCHLD}, setsigdef=SIGNALS)
        except OSError as exc:
            os.close(read_end)
            log.error("cannot start the check: %s; next try after the interval", exc)
            return fallback
        finally:
            os.close(write_end)
        try:
            status = self._wait_child(pid)
            os.set_blocking(read_end, False)
            try:
                report = os.read(read_end, 256).decode("ascii", "replace").strip()
            except BlockingIOError:
                report = ""
        finally:
            os.close(read_end)
        if status != 0:
            log.error("the check (process %d) %s; next check after the interval", pid, _describe(status))
            return fallback
        try:
            return dt.datetime.fromisoformat(report.replace("Z", "+00:00"))
        except ValueError:
            log.error("the check (process %d) reported no next check (%r); next check after the interval",
                      pid, report[:60])
            return fallback

    def _wait_child(self, pid: int) -> int:
        """Wait for the child while taking signals; its wait status."""
        end = time.monotonic() + self.deadline
        killed = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return status
            left = end - time.monotonic()
            if left <= 0 and not killed:
                log.error("the check (process %d) still runs after %g s: killing it", pid, self.deadline)
                os.kill(pid, signal.SIGKILL)
                killed = True
                end = time.monotonic() + 60.0
                continue
            info = self._wait_signal(left if left > 0 else None)
            if info is not None and info.si_signo != signal.SIGCHLD:
                self._signal(info.si_signo)

    # --- the loop -------------------------------------------------------------------------------

    def sleep_until(self, when: dt.datetime) -> None:
        """Sleep until `when` in one system call; SIGHUP and SIGTERM end it early."""
        end = time.monotonic() + max(0.0, (when - self.now()).total_seconds())
        while not (self.stop or self.wake):
            left = end - time.monotonic()
            if left <= 0:
                return
            info = self._wait_signal(left)
            if info is None:
                return
            self._signal(info.si_signo)  # SIGCHLD: no child runs now; nothing to do

    def run(self, max_checks: int | None = None) -> None:
        """Check, sleep until the next check (or SIGHUP/SIGTERM), repeat. Signals must be blocked
        (`block_signals`) before the first check."""
        checks = 0
        while not self.stop:
            next_at = self.check()
            checks += 1
            if self.stop or (max_checks is not None and checks >= max_checks):
                break
            log.info("next check at %s", iso(next_at))
            self.sleep_until(next_at)  # at once if a SIGHUP came during the check
            self.wake = False
        log.info("stopped")


def block_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"was killed by {name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def main(argv: list[str]) -> int:
    """python -m agent.daemon INTERVAL_SECONDS VERBOSE RUN_ARGS... (from exec_supervisor)."""
    block_signals()  # before anything else: no signal may be lost or kill us half-way
    interval, verbose, run_args = float(argv[0]), argv[1] == "1", argv[2:]
    setup_logging(verbose)
    Supervisor(interval, [sys.executable, "-m", "agent", *run_args]).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
