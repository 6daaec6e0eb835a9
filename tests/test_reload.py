"""SIGHUP reloads a real `scepd serve` on 127.0.0.1, with --workers 1 (in-process) and 2 (the
workers replaced one by one): a next CA from `scepd ca rollover` is published by GetNextCACert,
`scepd ca activate-next` switches issuance, a broken configuration is refused with one line while
the old one keeps serving, requests under load see no refused connection and no 5xx, the log
level changes; and the supervisor's hand-over of the primary's jobs."""
from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from scepd.ca import pki
from scepd.http import workers

from .test_lifecycle import _openssl_next_ca
from .test_workers import Served, _ca_cert, _children, _enrollments, _issued, _post_pkcsreq, serve, stop

WORKERS = pytest.mark.parametrize("count", ["1", "2"])


def _scepd(state_dir: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "scepd", *args, "--state-dir", str(state_dir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _lines(served: Served, text: str) -> list[str]:
    return [line for line in served.log_text().splitlines() if text in line]


def _hup_and_wait(served: Served, outcome: str = "reloaded") -> None:
    """SIGHUP, then until the log has one more line with `outcome` (bounded)."""
    before = len(_lines(served, outcome))
    served.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if len(_lines(served, outcome)) > before:
            return
        assert served.proc.poll() is None, served.log_text()
        time.sleep(0.05)
    raise AssertionError(f"no {outcome!r} line after SIGHUP:\n{served.log_text()}")


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def workers_of(served: Served) -> set[int]:
    return _children(served.proc.pid)


def _set(state_dir: Path, key: str, value: str) -> None:
    """Set `key` in the [server]-first config file written by `scepd init` (render_default)."""
    path = state_dir / "scepd.toml"
    lines = path.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith(f"{key} ="))
    lines[index] = f"{key} = {value}"
    path.write_text("\n".join(lines) + "\n")


@WORKERS
def test_rollover_then_activate_next_each_followed_by_sighup(state_dir, tmp_path, count):
    served = serve(state_dir, "--workers", count)
    try:
        assert _get(served.port, "/scep?operation=GetNextCACert")[0] == 404
        old_ca = _ca_cert(served.port)
        _scepd(state_dir, "ca", "rollover")
        _hup_and_wait(served)
        status, body = _get(served.port, "/scep?operation=GetNextCACert")
        assert status == 200, body[:200]
        nxt = pki.load_next(state_dir)
        # read by OpenSSL (cms -verify to the root, pkcs7 -print_certs) as tests/test_lifecycle.py does
        assert _openssl_next_ca(body, tmp_path, state_dir / "ca" / "root.pem") == [nxt]
        assert _ca_cert(served.port) == old_ca  # still issuing from the current CA

        _scepd(state_dir, "ca", "activate-next")
        _hup_and_wait(served)
        assert _ca_cert(served.port) == nxt
        (e,) = _enrollments(nxt, 1, served.challenge, "after-activate")  # type: ignore[arg-type]
        cert = _issued(e, *_post_pkcsreq(served.port, e.der))
        assert cert is not None
        assert cert.issuer == nxt.subject
        cert.verify_directly_issued_by(nxt)
    finally:
        code = stop(served)
    assert code == 0 and "Traceback" not in served.log_text(), served.log_text()


@WORKERS
def test_a_broken_config_is_refused_with_one_line_and_the_server_keeps_serving(state_dir, count):
    served = serve(state_dir, "--workers", count, "--no-demo-challenge")
    try:
        pids = sorted(workers_of(served))
        good = (state_dir / "scepd.toml").read_text()
        (state_dir / "scepd.toml").write_text(good + '\n[ca]\ndefault_validity = "1d"\n')  # [ca] twice
        _hup_and_wait(served, "reload failed")
        failed = _lines(served, "reload failed")
        assert len(failed) == 1 and "not valid TOML" in failed[0], served.log_text()
        (state_dir / "scepd.toml").write_text(good)
        _set(state_dir, "log_level", '"loud"')
        _hup_and_wait(served, "reload failed")
        failed = _lines(served, "reload failed")
        assert len(failed) == 2 and "log_level" in failed[1] and "'loud'" in failed[1], served.log_text()
        assert "Traceback" not in served.log_text()
        assert sorted(workers_of(served)) == pids  # the same workers (--workers 2) keep serving
        assert _get(served.port, "/scep?operation=GetCACert")[0] == 200
        assert not _lines(served, "reloaded")
    finally:
        code = stop(served)
    assert code == 0, served.log_text()


@WORKERS
def test_requests_under_load_see_no_refused_connection_and_no_5xx_during_reloads(state_dir, count):
    served = serve(state_dir, "--workers", count, "--no-demo-challenge")
    outcomes: list[object] = []
    done = False

    def client() -> None:
        for _ in range(20_000):  # bounded; ends once the reloads are over
            if done:
                return
            try:
                outcomes.append(_get(served.port, "/scep?operation=GetCACert")[0])
            except OSError as exc:  # ConnectionRefusedError, a reset, ...
                outcomes.append(repr(exc))
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client) for _ in range(4)]
            try:
                for _ in range(3):
                    _hup_and_wait(served)
            finally:
                done = True
            for f in futures:
                f.result(timeout=60)
        assert len(_lines(served, "reloaded")) == 3
        failures = [o for o in outcomes if o != 200]
        assert outcomes and not failures, failures[:5]
    finally:
        code = stop(served)
    assert code == 0 and "Traceback" not in served.log_text(), served.log_text()


@WORKERS
def test_the_log_level_is_reloaded(state_dir, count):
    _set(state_dir, "log_level", '"warning"')
    served = serve(state_dir, "--workers", count, "--no-demo-challenge")
    try:
        assert _get(served.port, "/healthz")[0] == 200
        _set(state_dir, "log_level", '"info"')
        _hup_and_wait(served)  # the "reloaded" line is itself info, logged once the level applies
        assert _get(served.port, "/readyz")[0] == 200
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _lines(served, "GET /readyz 200"):
            time.sleep(0.05)
        # the access log (info) was off before the reload and is on after it
        assert _lines(served, "GET /readyz 200") and not _lines(served, "GET /healthz")
    finally:
        code = stop(served)
    assert code == 0, served.log_text()


# --- the supervisor's hand-over ----------------------------------------------------------------


def _recording_body(path: str, generation: str):
    """A worker that appends '<generation> <index> start|primary|stop' lines to `path`; SIGUSR1
    (the promotion) appends 'primary'."""
    def body(index: int, primary: bool, report) -> int:
        def note(what: str) -> None:
            with open(path, "a") as f:
                f.write(f"{generation} {index} {what}\n")
        stopping = []
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
        signal.signal(signal.SIGUSR1, lambda *_: note("primary"))
        note("start primary" if primary else "start")
        report("ready")
        deadline = time.monotonic() + 60
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.01)
        note("stop")
        return 0
    return body


def test_a_reload_starts_each_new_worker_before_stopping_its_old_one_and_hands_over_the_primary(tmp_path):
    events = str(tmp_path / "events")
    supervisor = workers.Supervisor(2, _recording_body(events, "old"),
                                    on_reload=lambda: _recording_body(events, "new"))
    supervisor.start()
    try:
        old_pids = supervisor.pids()
        supervisor.reload()
        assert not set(supervisor.pids()) & set(old_pids) and len(supervisor.pids()) == 2
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "new 0 primary" not in Path(events).read_text():
            time.sleep(0.01)
    finally:
        supervisor.stop()
    lines = Path(events).read_text().splitlines()
    assert lines[:2] == ["old 0 start primary", "old 1 start"]
    # each new worker is up before its old one stops; the new worker 0 starts as a secondary and
    # becomes the primary only after the old primary stopped
    assert lines.index("new 0 start") < lines.index("old 0 stop") < lines.index("new 0 primary")
    assert lines.index("new 1 start") < lines.index("old 1 stop")
    assert "new 1 primary" not in lines and "new 0 start primary" not in lines


def test_a_refused_reload_keeps_the_workers(tmp_path):
    events = str(tmp_path / "events")
    supervisor = workers.Supervisor(1, _recording_body(events, "old"), on_reload=lambda: None)
    supervisor.start()
    try:
        pids = supervisor.pids()
        supervisor.reload()
        assert supervisor.pids() == pids
    finally:
        supervisor.stop()
    assert Path(events).read_text().splitlines() == ["old 0 start primary", "old 0 stop"]


def test_a_new_worker_that_fails_to_start_leaves_the_old_one_serving(tmp_path):
    events = str(tmp_path / "events")

    def failing(index: int, primary: bool, report) -> int:
        report("database unreachable")
        return 1
    supervisor = workers.Supervisor(1, _recording_body(events, "old"), on_reload=lambda: failing)
    supervisor.start()
    try:
        pids = supervisor.pids()
        supervisor.reload()
        assert supervisor.pids() == pids
        assert all(w.process.is_alive() for w in supervisor._workers.values())
    finally:
        supervisor.stop()
    assert Path(events).read_text().splitlines() == ["old 0 start primary", "old 0 stop"]


@WORKERS
def test_metric_counters_go_on_across_a_reload(state_dir, count):
    """scepd_certificates_issued counted before a SIGHUP is still counted after it (one process or
    several): a reload is not a restart of the counters."""
    import re
    served = serve(state_dir, "--workers", count)
    try:
        ca = _ca_cert(served.port)
        [e] = _enrollments(ca, 1, served.challenge, "metrics-reload")
        assert _issued(e, *_post_pkcsreq(served.port, e.der)) is not None

        def issued() -> float:
            status, body = _get(served.port, "/metrics")
            assert status == 200
            return sum(float(m.group(1)) for m in re.finditer(
                r'^scepd_certificates_issued_total\{[^}]*protocol="scep"[^}]*\} (\S+)$', body.decode(), re.M))
        assert issued() == 1
        _hup_and_wait(served)
        assert issued() == 1
    finally:
        code = stop(served)
    assert code == 0, served.log_text()
    assert not list(state_dir.glob(".metrics-*"))  # removed at stop
