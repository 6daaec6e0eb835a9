"""agent.daemon, the supervisor behind `scepd-agent run`, with a scripted check in place of the
real one (the real agent daemon against a real server: conformance/test_agent.py).

The supervisor runs in its own process (it blocks signals and sleeps in sigtimedwait); each
"check" is a small child script that records its call, may hold until the test releases it
through a FIFO (no sleeping), then reports a next instant, crashes or reports garbage.
"""
from __future__ import annotations

import datetime as dt
import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAR = "2099-01-01T00:00:00Z"

SUPERVISOR = """
import sys
from agent.daemon import Supervisor, block_signals, setup_logging
block_signals()
setup_logging(False)
interval, deadline, child, work = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
Supervisor(interval, [sys.executable, "-c", child, work], deadline=deadline).run()
"""

#: one scripted check: plan[n-1] for call n: [hold:]future|crash|kill|garbage
CHECK = """
import os, sys
from pathlib import Path
work = Path(sys.argv[1])
fd = int(sys.argv[sys.argv.index("--check-once-fd") + 1])
n = len(list(work.glob("call-*"))) + 1
plan = (work / "plan").read_text().split()
action = plan[min(n, len(plan)) - 1]
(work / f"call-{n}").write_text(str(os.getpid()))
if action.startswith("hold:"):
    with open(work / "go") as go:  # blocks until the test writes to the FIFO
        go.readline()
    action = action[5:]
(work / f"done-{n}").touch()
if action == "future":
    os.write(fd, b"%s\\n")
elif action == "garbage":
    os.write(fd, b"soon\\n")
elif action == "crash":
    sys.exit(3)
elif action == "kill":
    os.kill(os.getpid(), 9)
""" % FAR


def wait_for(predicate, what: str, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; supervisor log:\n{log.read_text()}")


def release(work: Path) -> None:
    """Let the held check go on (the FIFO's reader is there: the check has recorded its call)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            fd = os.open(work / "go", os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:  # ENXIO: the check has not opened it yet
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    os.write(fd, b"go\n")
    os.close(fd)


class Run:
    def __init__(self, tmp: Path, plan: str, interval: float = 3600, deadline: float = 3600):
        self.work = tmp / "work"
        self.work.mkdir()
        (self.work / "plan").write_text(plan)
        os.mkfifo(self.work / "go")
        self.log = tmp / "supervisor.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(interval), str(deadline), CHECK,
                                      str(self.work)], stdout=subprocess.DEVNULL, stderr=open(self.log, "w"),
                                     env=env, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text()

    def calls(self) -> int:
        return len(list(self.work.glob("call-*")))

    def exists(self, name: str) -> bool:
        return (self.work / name).exists()

    def wait(self, predicate, what: str) -> None:
        wait_for(predicate, what, self.proc, self.log)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def finish(self) -> int:
        """The exit status once stopped by the test's SIGTERM."""
        return self.proc.wait(timeout=30)

    def cleanup(self) -> None:
        if self.proc.poll() is None:  # a failed test: nothing to wait for
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def children(self) -> list[str]:
        return Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()


def test_hup_during_a_check_checks_again_and_term_lets_the_check_finish(tmp_path):
    run = Run(tmp_path, "hold:future hold:future")
    try:
        run.wait(lambda: run.calls() == 1, "the first check")
        run.signal(signal.SIGHUP)  # during the check: one more check right after it
        run.wait(lambda: "SIGHUP: checking now" in run.text(), "SIGHUP to be taken")
        release(run.work)
        run.wait(lambda: run.calls() == 2, "the check asked for by SIGHUP")
        assert f"next check at {FAR}" in run.text()  # not waited for: SIGHUP came first
        run.signal(signal.SIGTERM)  # during the second check: it runs to its end, then stop
        run.wait(lambda: "SIGTERM/SIGINT: stopping after the current step" in run.text(), "SIGTERM to be taken")
        assert run.proc.poll() is None and not run.exists("done-2")
        release(run.work)
        assert run.finish() == 0
    finally:
        run.cleanup()
    assert run.exists("done-2") and run.calls() == 2
    text = run.text()
    assert text.rstrip().endswith("stopped") and text.count("next check at") == 1
    assert "Traceback" not in text


def test_sleeps_until_the_next_check_with_no_child_and_one_thread(tmp_path):
    run = Run(tmp_path, "future")
    try:
        run.wait(lambda: f"next check at {FAR}" in run.text(), "the first check's report")
        assert run.children() == []  # the check's process is reaped
        assert os.listdir(f"/proc/{run.proc.pid}/task") == [str(run.proc.pid)]
        run.signal(signal.SIGHUP)  # while sleeping: check now
        run.wait(lambda: run.text().count(f"next check at {FAR}") == 2, "the check asked for by SIGHUP")
        run.signal(signal.SIGTERM)
        assert run.finish() == 0
    finally:
        run.cleanup()
    assert run.calls() == 2 and run.text().rstrip().endswith("stopped")


def _next_checks(text: str) -> list[dt.datetime]:
    return [dt.datetime.fromisoformat(m.replace("Z", "+00:00"))
            for m in re.findall(r"next check at (\S+)", text)]


def test_a_failed_check_is_logged_and_the_next_comes_after_the_interval(tmp_path):
    run = Run(tmp_path, "crash kill garbage future", interval=3600)
    try:
        for n, expected in enumerate(["exited with status 3", "was killed by SIGKILL",
                                      "reported no next check ('soon')"], start=1):
            before = dt.datetime.now(dt.timezone.utc)
            run.wait(lambda: len(_next_checks(run.text())) == n, f"the next check after failure {n}")
            after = dt.datetime.now(dt.timezone.utc)
            assert expected in run.text()
            at = _next_checks(run.text())[-1]
            assert before + dt.timedelta(seconds=3600) - dt.timedelta(seconds=1) <= at \
                <= after + dt.timedelta(seconds=3600)
            run.signal(signal.SIGHUP)
        run.wait(lambda: f"next check at {FAR}" in run.text(), "a good check after the failures")
        run.signal(signal.SIGTERM)
        assert run.finish() == 0
    finally:
        run.cleanup()
    assert run.text().count("ERROR") == 3 and "Traceback" not in run.text()


def test_a_check_past_its_deadline_is_killed(tmp_path):
    run = Run(tmp_path, "hold:future", deadline=0.5)
    try:
        run.wait(lambda: "next check at" in run.text(), "the stuck check to be killed")
        assert "still runs after 0.5 s: killing it" in run.text() and "was killed by SIGKILL" in run.text()
        assert not run.exists("done-1") and run.children() == []
        run.signal(signal.SIGTERM)
        assert run.finish() == 0
    finally:
        run.cleanup()


def test_the_supervisor_imports_no_crypto_http_or_server_code():
    """What the idle daemon holds: the standard library it needs to sleep and to decide. asyncio,
    ssl and cryptography alone are about 33 MB resident; they are loaded only by each check."""
    code = ("import sys; before = set(sys.modules); import agent.daemon; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.split()
    assert "agent.daemon" in loaded
    heavy = [m for m in loaded if m.split(".")[0] in ("asyncio", "ssl", "_ssl", "cryptography", "aiohttp", "asn1crypto",
                                                      "josepy", "click", "scepd", "acme", "concurrent", "json")
             or (m.startswith("agent.") and m != "agent.daemon")]
    assert heavy == [], heavy
