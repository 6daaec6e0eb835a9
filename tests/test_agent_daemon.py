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

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.timezone.utc)  # the supervisor's clock

SUPERVISOR = """
import datetime as dt, sys
from agent.daemon import Supervisor, block_signals, setup_logging
block_signals()
setup_logging(False)
interval, deadline, child, work = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
now = dt.datetime.fromisoformat(sys.argv[5])
Supervisor(interval, [sys.executable, "-c", child, work], deadline=deadline, now=lambda: now).run()
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
                                      str(self.work), NOW.isoformat()], stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "w"), env=env, start_new_session=True)

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
            run.wait(lambda: len(_next_checks(run.text())) == n, f"the next check after failure {n}")
            assert expected in run.text()
            assert _next_checks(run.text())[-1] == NOW + dt.timedelta(seconds=3600)
            run.signal(signal.SIGHUP)  # no waiting for the hour
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
        assert _next_checks(run.text()) == [NOW + dt.timedelta(seconds=3600)]
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


def test_run_hands_its_options_and_the_challenge_read_at_start_to_each_check(tmp_path, monkeypatch):
    """`run` exec()s the supervisor with the arguments of one check; the challenge file is read
    once at the start (as when the daemon was one process), travels in the environment, and the
    check takes it out of the environment before anything (the hook) could inherit it."""
    from click.testing import CliRunner

    from agent import cli, daemon, schedule
    from agent.core import Agent
    captured = []
    monkeypatch.setattr(daemon, "exec_supervisor", lambda *a: captured.append(a))
    challenge = tmp_path / "challenge"
    challenge.write_text("s3cret\n")
    d = tmp_path / "agent"
    out = CliRunner().invoke(cli.main, ["run", "--dir", str(d), "--interval", "5m", "--renew-before", "1d",
                                        "--renew-at-fraction", "0.25", "--on-renew", "echo hi",
                                        "--challenge-file", str(challenge), "--reuse-key", "-v"])
    assert out.exit_code == 0, out.output
    [(interval, verbose, args, secret)] = captured
    assert interval == 300 and verbose is True and secret == "s3cret"
    assert not any("s3cret" in a or "challenge" in a for a in args)
    challenge.unlink()  # read at the start: the checks do not need the file any more

    seen = {}

    async def one_check(self):
        seen.update(challenge=self.challenge, on_renew=self.on_renew, reuse_key=self.reuse_key,
                    policy=self.policy, env=os.environ.get(daemon.CHALLENGE_ENV), dir=self.dir.root)
        return dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    monkeypatch.setattr(Agent, "daemon_check", one_check)
    monkeypatch.setenv(daemon.CHALLENGE_ENV, secret)
    read_end, write_end = os.pipe()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        out = CliRunner().invoke(cli.main, [*args, "--check-once-fd", str(write_end)])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert out.exit_code == 0, out.output
    assert os.read(read_end, 100) == b"2030-01-02T03:04:05Z\n"
    os.close(read_end)
    assert seen == {"challenge": "s3cret", "on_renew": "echo hi", "reuse_key": True, "env": None,
                    "dir": d.absolute(),
                    "policy": schedule.Policy(dt.timedelta(minutes=5), dt.timedelta(days=1), 0.25)}
