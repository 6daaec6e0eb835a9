"""`scepd serve --workers N`: a real server with two worker processes on 127.0.0.1 (both answer,
one-time challenges stay one-time, kill -9 under load loses no certificate and repeats no serial,
a killed worker is replaced, SIGTERM stops everything), the supervisor's start-up failures, and
the ACME validation a restarted primary resumes twice."""
from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from acme.store import accounts, authzs, challenges
from scepd.http import workers
from scepd.scep import wire

from .helpers import make_csr, pkcs_req, reply_certs, rsa_key, self_signed
from .test_acme_orders import dns_server, get, key_authorization, lab, new_order  # noqa: F401
from .test_acme_ari import responder  # noqa: F401  (fixture)


# --- a real server ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    proc: subprocess.Popen
    port: int
    pids: list[int]
    challenge: str | None
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def serve(state_dir: Path, *args: str, env: dict | None = None) -> Served:
    port = _free_port()
    log = state_dir.parent / f"serve-{time.monotonic_ns()}.log"
    full_env = {**os.environ, **(env or {}), "SCEPD_SERVER_HTTP": f"127.0.0.1:{port}"}
    proc = subprocess.Popen([sys.executable, "-m", "scepd", "serve", "--state-dir", str(state_dir), *args],
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=full_env,
                            start_new_session=True)
    pids: list[int] = []
    challenge = None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            break
        if m := re.match(r"Worker processes: \d+ \(pids ([\d ]+)\)", line):
            pids = [int(p) for p in m.group(1).split()]
        if m := re.search(r"One-time challenge password \(valid 1 hour\): (\S+)", line):
            challenge = m.group(1)
        if challenge or (line.startswith("Root CA") and "--no-demo-challenge" in args):
            break
    else:
        proc.kill()
    if proc.poll() is not None:
        raise AssertionError("scepd serve did not start: " + log.read_text())
    return Served(proc, port, pids, challenge, log)


def stop(served: Served, sig: int = signal.SIGTERM) -> int:
    if sig == signal.SIGKILL:
        try:
            os.killpg(served.proc.pid, signal.SIGKILL)  # the parent and every worker
        except ProcessLookupError:
            pass
    else:
        served.proc.send_signal(sig)
    try:
        return served.proc.wait(timeout=40)
    finally:
        try:
            os.killpg(served.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid and stat[0] != "Z":
                out.add(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _owner(client: socket.socket, server_port: int, pids: list[int]) -> int | None:
    """The pid holding the server end of `client`'s connection (/proc/net/tcp and /proc/PID/fd)."""
    client_port = client.getsockname()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            inode = fields[9]
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
        except OSError:
            continue
    return None


def _connection_per_worker(port: int, tls, pids: list[int], method: str, path: str) -> dict:
    """{worker pid: a kept-alive HTTPS connection that worker holds}, one for each of `pids`,
    found by asking `method path` on fresh connections (bounded: 200)."""
    by_worker: dict[int, http.client.HTTPSConnection] = {}
    for _ in range(200):
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=tls)
        conn.request(method, path)
        conn.getresponse().read()
        owner = _owner(conn.sock, port, pids)  # type: ignore[arg-type]
        if owner in by_worker or owner is None:
            conn.close()
        else:
            by_worker[owner] = conn
        if len(by_worker) == len(pids):
            break
    return by_worker


def _ca_cert(port: int) -> x509.Certificate:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/scep?operation=GetCACert")
    return wire.certs_from_certs_only(conn.getresponse().read())[0]


def _post_pkcsreq(port: int, der: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/scep?operation=PKIOperation", body=der,
                     headers={"Content-Type": "application/x-pki-message"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@dataclass
class Enrollment:
    der: bytes
    key: object
    signer: x509.Certificate


def _enrollments(ca: x509.Certificate, count: int, challenge: str, prefix: str) -> list[Enrollment]:
    out = []
    for i in range(count):
        key = rsa_key(i % 4)
        signer = self_signed(key, f"{prefix}-signer-{i}")
        der, _, _ = pkcs_req(ca, key, make_csr(key, f"{prefix}-{i}", challenge), signer=(signer, key))
        out.append(Enrollment(der, key, signer))
    return out


def _issued(e: Enrollment, status: int, body: bytes) -> x509.Certificate | None:
    """The certificate of a SUCCESS reply, None for a FAILURE; anything else fails the test."""
    assert status == 200, (status, body[:200])
    rep = wire.decode_cert_rep(body)
    if rep.status == wire.PkiStatus.FAILURE:
        return None
    assert rep.status == wire.PkiStatus.SUCCESS, rep.status
    return next(c for c in reply_certs(rep, e.signer, e.key) if c.public_key() == e.key.public_key())


def _stored(state_dir: Path, database_url: str | None = None) -> dict[str, bytes]:
    """serial -> DER of every certificate in the store (SQLite file or PostgreSQL)."""
    if database_url is None:
        with sqlite3.connect(f"file:{state_dir / 'scepd.db'}?mode=ro", uri=True) as db:
            return {serial: bytes(der) for serial, der in db.execute("SELECT serial, der FROM certificates")}
    import asyncio

    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    async def read() -> dict[str, bytes]:
        engine = create_async_engine(database_url)
        try:
            async with engine.connect() as conn:
                rows = (await conn.execute(sa.text("SELECT serial, der FROM certificates"))).all()
        finally:
            await engine.dispose()
        return {serial: bytes(der) for serial, der in rows}
    return asyncio.run(read())


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> dict[str, str]:
    """The server's environment for each database: SQLite in the state directory, PostgreSQL."""
    if request.param == "sqlite":
        return {}
    cluster = request.getfixturevalue("postgres_cluster")
    return {"SCEPD_DATABASE_URL": cluster.create_database(f"scepd_workers_{time.monotonic_ns()}")}


# --- the tests ------------------------------------------------------------------------------------


def test_two_worker_processes_both_answer_and_sigterm_stops_them_all(state_dir):
    served = serve(state_dir, "--workers", "2", "--no-demo-challenge")
    try:
        assert len(served.pids) == 2 and set(served.pids) == _children(served.proc.pid)
        answered: dict[int, int] = {}
        for _ in range(400):  # bounded: until both workers held a connection and answered on it
            with socket.create_connection(("127.0.0.1", served.port), timeout=10) as c:
                c.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                reply = c.recv(4096)
                assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"ok\n")
                assert b"pid" not in reply.lower() and b"worker" not in reply.lower()  # no internals
                owner = _owner(c, served.port, served.pids)
                answered[owner] = answered.get(owner, 0) + 1  # type: ignore[index]
            if len(answered.keys() & set(served.pids)) == 2:
                break
        assert set(served.pids) <= answered.keys(), answered
    finally:
        code = stop(served)
    assert code == 0, served.log_text()
    assert not any(_alive(p) for p in served.pids)  # no orphans
    assert "Traceback" not in served.log_text()


def _get(port: int, path: str, pids: list[int]) -> tuple[int | None, bytes]:
    """(pid of the worker that answered, body) of one GET on a fresh keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        body = conn.getresponse().read()
        return _owner(conn.sock, port, pids), body  # type: ignore[arg-type]
    finally:
        conn.close()


def test_kill_9_of_the_parent_alone_leaves_no_worker_behind(state_dir):
    served = serve(state_dir, "--workers", "2", "--no-demo-challenge")
    try:
        os.kill(served.proc.pid, signal.SIGKILL)
        served.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in served.pids):
            time.sleep(0.05)
        assert not any(_alive(p) for p in served.pids)  # they stopped with their parent
    finally:
        stop(served, signal.SIGKILL)


def test_metrics_show_totals_across_workers_whichever_answers(state_dir):
    served = serve(state_dir, "--workers", "2", "--no-demo-challenge")
    try:
        served_by: set = set()
        asked = 0
        while asked < 40 or (not set(served.pids) <= served_by and asked < 400):  # bounded: the kernel
            owner, body = _get(served.port, "/scep?operation=GetCACaps", served.pids)  # picks the worker
            assert b"SHA-256" in body
            served_by.add(owner)
            asked += 1
        assert set(served.pids) <= served_by  # both workers counted some
        from scepd.ca.pki import ca_id_of
        ca_id = ca_id_of(_ca_cert(served.port))
        crl_by, crl = _get(served.port, f"/crl/{ca_id}.crl", served.pids)  # one worker signs CRL 1
        assert x509.load_der_x509_crl(crl).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
        scraped_by: set = set()
        for _ in range(200):  # bounded: until each worker answered /metrics at least once
            owner, body = _get(served.port, "/metrics", served.pids)
            text = body.decode()
            assert re.search(rf'^scepd_scep_operation_duration_seconds_count\{{operation="getcacaps"\}} {asked}\.0$',
                             text, re.M), text
            assert len(re.findall(r"^scepd_certificates_active ", text, re.M)) == 1  # from the database, once
            assert f'scepd_crl_number{{ca_id="{ca_id}"}} 1.0\n' in text  # whichever worker signed it
            scraped_by.add(owner)
            if set(served.pids) <= scraped_by:
                break
        assert set(served.pids) <= scraped_by
    finally:
        assert stop(served) == 0, served.log_text()
    assert not list(state_dir.glob(".metrics-*"))  # the shared directory goes with the server


def test_acme_nonces_are_good_at_the_other_worker_and_used_once_across_workers(state_dir):
    import json
    import ssl

    from .test_acme_jws import rsa_jwk, sign
    https = _free_port()
    served = serve(state_dir, "--workers", "2", "--no-demo-challenge",
                   env={"SCEPD_SERVER_HTTPS": f"127.0.0.1:{https}"})
    tls = ssl.create_default_context(cafile=str(state_dir / "ca" / "root.pem"))
    by_worker: dict[int, http.client.HTTPSConnection] = {}
    try:  # one kept-alive connection held by each worker
        by_worker = _connection_per_worker(https, tls, served.pids, "HEAD", "/acme/new-nonce")
        (a, conn_a), (b, conn_b) = by_worker.items()

        def new_account(conn, nonce: str) -> tuple[int, dict]:
            url = f"https://127.0.0.1:{https}/acme/new-account"
            body = sign(rsa_key(0), {"alg": "RS256", "nonce": nonce, "url": url, "jwk": rsa_jwk(rsa_key(0))},
                        json.dumps({"termsOfServiceAgreed": True}).encode())
            conn.request("POST", "/acme/new-account", body=body, headers={"Content-Type": "application/jose+json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")

        conn_a.request("HEAD", "/acme/new-nonce")
        resp = conn_a.getresponse()
        resp.read()
        nonce = resp.headers["Replay-Nonce"]
        assert new_account(conn_b, nonce)[0] == 201  # issued by a, good at b
        status, problem = new_account(conn_a, nonce)  # used at b: refused at a
        assert status == 400 and problem["type"] == "urn:ietf:params:acme:error:badNonce"
        assert _owner(conn_a.sock, https, served.pids) == a and _owner(conn_b.sock, https, served.pids) == b
    finally:
        for conn in by_worker.values():
            conn.close()
        assert stop(served) == 0, served.log_text()


def test_one_time_challenge_used_concurrently_across_workers_issues_one_certificate(state_dir):
    served = serve(state_dir, "--workers", "2")
    try:
        ca = _ca_cert(served.port)
        attempts = _enrollments(ca, 12, served.challenge, "once")  # type: ignore[arg-type]
        with ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(lambda e: _post_pkcsreq(served.port, e.der), attempts))
        issued = [c for e, (status, body) in zip(attempts, replies) if (c := _issued(e, status, body))]
        assert len(issued) == 1
        scep_certs = [der for der in _stored(state_dir).values()
                      if x509.load_der_x509_certificate(der).subject.rfc4514_string().startswith("CN=once-")]
        assert scep_certs == [issued[0].public_bytes(Encoding.DER)]
    finally:
        assert stop(served) == 0, served.log_text()


def test_one_eab_key_used_concurrently_across_workers_binds_one_account(state_dir):
    import base64
    import json
    import ssl

    from cryptography.hazmat.primitives import hashes, hmac

    from .test_acme_jws import b64, rsa_jwk, sign
    https = _free_port()
    env = {"SCEPD_SERVER_HTTPS": f"127.0.0.1:{https}", "SCEPD_ACME_EAB_REQUIRED": "1"}
    served = serve(state_dir, "--workers", "2", "--no-demo-challenge", env=env)
    tls = ssl.create_default_context(cafile=str(state_dir / "ca" / "root.pem"))
    url = f"https://127.0.0.1:{https}/acme/new-account"
    try:
        made = subprocess.run([sys.executable, "-m", "scepd", "eab", "create", "--state-dir", str(state_dir)],
                              capture_output=True, text=True, timeout=60, env={**os.environ, **env})
        kid = re.search(r"^kid: (\S+)$", made.stdout, re.M).group(1)  # type: ignore[union-attr]
        mac_key = re.search(r"^hmac: (\S+)$", made.stdout, re.M).group(1)  # type: ignore[union-attr]

        def new_account(index: int) -> int:
            key = rsa_key(index)
            protected = b64(json.dumps({"alg": "HS256", "kid": kid, "url": url}).encode())
            payload = b64(json.dumps(rsa_jwk(key)).encode())
            mac = hmac.HMAC(base64.urlsafe_b64decode(mac_key + "=" * (-len(mac_key) % 4)), hashes.SHA256())
            mac.update(f"{protected}.{payload}".encode())
            binding = {"protected": protected, "payload": payload, "signature": b64(mac.finalize())}
            conn = http.client.HTTPSConnection("127.0.0.1", https, timeout=60, context=tls)
            try:
                conn.request("HEAD", "/acme/new-nonce")
                nonce_reply = conn.getresponse()
                nonce_reply.read()
                body = sign(key, {"alg": "RS256", "nonce": nonce_reply.headers["Replay-Nonce"], "url": url,
                                  "jwk": rsa_jwk(key)},
                            json.dumps({"termsOfServiceAgreed": True, "externalAccountBinding": binding}).encode())
                conn.close()  # a fresh connection: either worker may take the new-account request
                conn = http.client.HTTPSConnection("127.0.0.1", https, timeout=60, context=tls)
                conn.request("POST", "/acme/new-account", body=body,
                             headers={"Content-Type": "application/jose+json"})
                reply = conn.getresponse()
                problem = json.loads(reply.read() or b"{}")
                assert reply.status == 201 or problem.get("type") == "urn:ietf:params:acme:error:unauthorized", \
                    (reply.status, problem)
                return reply.status
            finally:
                conn.close()
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(new_account, range(6)))
        assert statuses.count(201) == 1, statuses
    finally:
        assert stop(served) == 0, served.log_text()


class _AcmeClient:
    """Just enough ACME over http.client for a test: JWS posts with fresh nonces."""

    def __init__(self, port: int, tls, key):
        self.port, self.tls, self.key, self.kid = port, tls, key, None

    def post(self, path: str, payload) -> tuple[int, dict, dict]:
        import json

        from .test_acme_jws import rsa_jwk, sign
        url = path if path.startswith("https://") else f"https://127.0.0.1:{self.port}{path}"
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=60, context=self.tls)
        try:
            conn.request("HEAD", "/acme/new-nonce")
            nonce = conn.getresponse()
            nonce.read()
            protected = {"alg": "RS256", "nonce": nonce.headers["Replay-Nonce"], "url": url}
            protected.update({"kid": self.kid} if self.kid else {"jwk": rsa_jwk(self.key)})
            body = sign(self.key, protected, None if payload is None else json.dumps(payload).encode())
            conn.request("POST", url.split(str(self.port), 1)[1], body=body,
                         headers={"Content-Type": "application/jose+json"})
            resp = conn.getresponse()
            return resp.status, dict(resp.headers), json.loads(resp.read() or b"{}")
        finally:
            conn.close()


def test_a_validation_left_processing_is_resumed_once_not_once_per_worker(state_dir):
    import ssl
    https = _free_port()
    silent = socket.socket()  # the http-01 "responder": connections queue, nothing ever answers,
    silent.bind(("127.0.0.1", 0))  # so the resumed validation is still running when worker 1 starts
    silent.listen(16)
    env = {"SCEPD_SERVER_HTTPS": f"127.0.0.1:{https}", "SCEPD_ACME_HTTP01_PORT": str(silent.getsockname()[1]),
           "SCEPD_ACME_RESOLVE": "*=127.0.0.1"}
    served = serve(state_dir, "--workers", "2", "--no-demo-challenge", env=env)
    try:
        acme = _AcmeClient(https, ssl.create_default_context(cafile=str(state_dir / "ca" / "root.pem")), rsa_key(0))
        status, headers, _ = acme.post("/acme/new-account", {"termsOfServiceAgreed": True})
        assert status == 201
        acme.kid = headers["Location"]
        status, _, order = acme.post("/acme/new-order", {"identifiers": [{"type": "dns", "value": "resume.test"}]})
        assert status == 201
        _, _, authz = acme.post(order["authorizations"][0], None)
        challenge_id = next(c for c in authz["challenges"] if c["type"] == "http-01")["url"].rsplit("/", 1)[1]
    finally:
        assert stop(served) == 0, served.log_text()
    with sqlite3.connect(state_dir / "scepd.db") as db:  # as a server stopped mid-validation left it
        db.execute("UPDATE acme_challenges SET status = 'processing' WHERE id = ?", (challenge_id,))
    again = serve(state_dir, "--workers", "2", "--no-demo-challenge", env=env)
    try:  # every worker has started (and run its start-up hooks) when serve() returns
        log = again.log_text()
        assert log.count("acme: resuming the http-01 validation of resume.test") == 1, log
        with sqlite3.connect(state_dir / "scepd.db") as db:
            assert db.execute("SELECT status FROM acme_challenges WHERE id = ?",
                              (challenge_id,)).fetchone() == ("processing",)  # still validating
    finally:
        assert stop(again) == 0, again.log_text()
        silent.close()


def test_kill_9_under_load_loses_no_certificate_and_a_killed_worker_is_replaced(state_dir, backend):
    env = {"SCEPD_SCEP_STATIC_CHALLENGE": "load-secret", **backend}
    served = serve(state_dir, "--workers", "2", "--no-demo-challenge", env=env)
    ca = _ca_cert(served.port)
    todo = _enrollments(ca, 240, "load-secret", "load")
    received: list[x509.Certificate] = []
    failures: list[str] = []
    lock = threading.Lock()
    halt = threading.Event()
    position = iter(range(len(todo)))

    def client() -> None:
        while not halt.is_set():
            with lock:
                i = next(position, None)
            if i is None:
                return
            try:
                status, body = _post_pkcsreq(served.port, todo[i].der)
            except OSError:  # the connection of a killed process
                continue
            try:
                cert = _issued(todo[i], status, body)
            except AssertionError as exc:
                with lock:
                    failures.append(str(exc))
                continue
            with lock:
                (received.append(cert) if cert is not None else failures.append("FAILURE reply"))

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + 120
        while len(received) < count and time.monotonic() < deadline and not halt.is_set():
            time.sleep(0.05)
        assert len(received) >= count, (len(received), failures)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(10)
        victim = served.pids[1]
        os.kill(victim, signal.SIGKILL)  # one worker only: the service keeps answering
        before = len(received)
        wait_for(before + 10)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(_children(served.proc.pid) - {victim}) < 2:
            time.sleep(0.05)
        replacement = _children(served.proc.pid) - set(served.pids)
        assert len(replacement) == 1 and len(_children(served.proc.pid)) == 2
        wait_for(len(received) + 5)
        stop(served, signal.SIGKILL)  # the parent and every worker, mid-load
    finally:
        halt.set()
        for t in threads:
            t.join(timeout=120)
    assert not failures, failures  # every reply was a SUCCESS: no "database is locked" reached a client
    assert received

    again = serve(state_dir, "--workers", "2", "--no-demo-challenge", env=env)
    try:
        stored = _stored(state_dir, backend.get("SCEPD_DATABASE_URL"))
        for cert in received:
            assert stored[format(cert.serial_number, "x")] == cert.public_bytes(Encoding.DER)
        serials = [x509.load_der_x509_certificate(der).serial_number for der in stored.values()]
        assert len(serials) == len(set(serials))
        assert len({c.serial_number for c in received}) == len(received)
        extra = _enrollments(_ca_cert(again.port), 1, "load-secret", "after")[0]
        assert _issued(extra, *_post_pkcsreq(again.port, extra.der)) is not None  # works again
        # the killed server's metrics files are gone, the new server's are there
        assert [p.name for p in state_dir.glob(".metrics-*")] == [f".metrics-{again.proc.pid}"]
    finally:
        assert stop(again) == 0, again.log_text()
    assert "worker 1 (pid %d) exited with code -9" % victim in served.log_text()


def test_server_workers_from_the_config_file_and_a_bad_count_is_one_line(state_dir):
    cfg = state_dir / "scepd.toml"
    cfg.write_text(cfg.read_text().replace("workers = 0", "workers = 3"))
    served = serve(state_dir, "--no-demo-challenge")
    try:
        assert len(served.pids) == 3 and set(served.pids) == _children(served.proc.pid)
    finally:
        assert stop(served) == 0, served.log_text()
    bad = subprocess.run([sys.executable, "-m", "scepd", "serve", "--state-dir", str(state_dir)],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "SCEPD_SERVER_WORKERS": "-2", "SCEPD_SERVER_HTTP": "127.0.0.1:0"})
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "[server] workers must be 0 (one per CPU core) or more, got -2" in bad.stderr


def test_delegated_ocsp_responder_certificate_is_issued_once_not_per_worker(state_dir):
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509 import ocsp
    served = serve(state_dir, "--workers", "2", "--no-demo-challenge", env={"SCEPD_CA_OCSP_DELEGATED": "1"})
    try:
        responder = x509.load_pem_x509_certificate((state_dir / "ocsp" / "responder.pem").read_bytes())
        query = ocsp.OCSPRequestBuilder().add_certificate(responder, _ca_cert(served.port), hashes.SHA1()).build()

        def ask(_i) -> bytes:
            conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
            conn.request("POST", "/ocsp", body=query.public_bytes(Encoding.DER),
                         headers={"Content-Type": "application/ocsp-request"})
            return conn.getresponse().read()
        with ThreadPoolExecutor(8) as pool:
            answers = [ocsp.load_der_ocsp_response(r) for r in pool.map(ask, range(16))]
        assert all(a.certificate_status == ocsp.OCSPCertStatus.GOOD for a in answers)
        assert {a.certificates[0].serial_number for a in answers} == {responder.serial_number}
        responders = [der for der in _stored(state_dir).values()
                      if "OCSP responder" in x509.load_der_x509_certificate(der).subject.rfc4514_string()]
        assert len(responders) == 1
    finally:
        assert stop(served) == 0, served.log_text()


def _served_certificate(ctx) -> bytes:
    """The DER certificate a server context presents (an in-memory TLS handshake)."""
    import ssl
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = ctx.wrap_bio(s_in, s_out, server_side=True)
    done: set = set()
    for _ in range(20):  # bounded: a TLS 1.3 handshake takes a few flights
        for side in (client, server):
            try:
                side.do_handshake()
                done.add(side)
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if len(done) == 2:
            break
    return client.getpeercert(binary_form=True)


async def test_a_worker_loads_the_server_certificate_the_primary_renewed(make_services, tmp_path):
    from scepd.http.tls import ServerCertificate, names_for
    services = await make_services()
    worker = ServerCertificate(tmp_path / "tls", services.enrollment, services.ca_material, names_for("127.0.0.1"))
    await worker.ensure()
    ctx = worker.context(client_auth=False)
    first = _served_certificate(ctx)
    assert worker.reload_if_changed() is False
    (tmp_path / "tls" / "server.pem").unlink()  # the primary renews (here: because the file is gone)
    primary = ServerCertificate(tmp_path / "tls", services.enrollment, services.ca_material, names_for("127.0.0.1"))
    assert await primary.ensure()
    renewed = x509.load_pem_x509_certificate((tmp_path / "tls" / "server.pem").read_bytes())
    assert _served_certificate(ctx) == first  # not yet looked at
    assert worker.reload_if_changed() is True
    assert _served_certificate(ctx) == renewed.public_bytes(Encoding.DER) != first
    assert worker.reload_if_changed() is False


# --- the supervisor -----------------------------------------------------------------------------


def _cannot_start(index, primary, report):
    report("cannot reach the database: connection refused")
    return 1


def test_workers_failing_at_start_up_give_one_clear_error():
    supervisor = workers.Supervisor(2, _cannot_start)
    with pytest.raises(workers.WorkerStartError, match="^cannot reach the database: connection refused$"):
        supervisor.start()
    assert supervisor.pids() == []


def _second_fails_after_its_first_life(marker: Path):
    def body(index, primary, report):
        if index == 1 and marker.exists():
            report("cannot reach the database: gone")
            return 1
        report("ready")
        if index == 1:
            marker.touch()
            return 3  # dies after it started: restarted, then fails to start again
        signal.pause()  # worker 0 serves until the supervisor's SIGTERM
        return 0
    return body


def test_a_worker_that_keeps_failing_to_restart_stops_the_server(tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "MAX_START_FAILURES", 2)
    supervisor = workers.Supervisor(2, _second_fails_after_its_first_life(tmp_path / "died"))
    supervisor.start()
    first = supervisor.pids()
    with pytest.raises(workers.WorkerStartError, match="^cannot reach the database: gone$"):
        supervisor.run()
    assert supervisor.pids() == [] and not _alive(first[0])  # worker 0 stopped too


def _exits_right_after_start(index, primary, report):
    report("ready")
    if index == 1:
        return 3
    signal.pause()
    return 0


def test_a_worker_that_keeps_exiting_right_after_start_stops_the_server(monkeypatch):
    monkeypatch.setattr(workers, "MAX_START_FAILURES", 2)
    supervisor = workers.Supervisor(2, _exits_right_after_start)
    supervisor.start()
    first = supervisor.pids()
    with pytest.raises(workers.WorkerStartError, match="^worker 1 keeps exiting right after it started "
                                                       r"\(exit code 3\)$"):
        supervisor.run()
    assert supervisor.pids() == [] and not _alive(first[0])


# --- ACME: a validation resumed twice -------------------------------------------------------------


async def test_a_late_duplicate_validation_records_nothing(lab):  # noqa: F811
    """A restarted primary worker resumes every `processing` challenge, including one another
    worker still validates: the first outcome stands; the duplicate changes nothing."""
    _resp, order = await new_order(lab, [{"type": "dns", "value": "twice.example.test"}])
    authz = await get(lab, order["authorizations"][0])
    ch = next(c for c in authz["challenges"] if c["type"] == "http-01")
    lab.tokens[ch["token"]] = key_authorization(lab, ch)
    cid = ch["url"].rsplit("/", 1)[1]
    await lab.service.db.update(challenges, cid, status="processing")
    row = await lab.service.db.get(challenges, cid)
    a = await lab.service.db.get(authzs, row["authz_id"])
    thumbprint = (await lab.service.db.get(accounts, a["account_id"]))["thumbprint"]
    await lab.service._validate(row, a, thumbprint)  # the worker that took it: valid
    del lab.tokens[ch["token"]]  # the client cleaned up
    await lab.service._validate(row, a, thumbprint)  # the late duplicate: would fail now
    after = await lab.service.db.get(challenges, cid)
    assert after["status"] == "valid" and not after["error"]
    assert (await get(lab, order["authorizations"][0]))["status"] == "valid"


def test_a_rate_limit_holds_across_workers_not_per_worker(state_dir):
    """newNonce limited to 4 an hour per address: asked alternately over a connection held by each
    of the two workers, 4 answers in all, then 429 at both (per-worker buckets would allow 8)."""
    import ssl
    https = _free_port()
    served = serve(state_dir, "--workers", "2", "--no-demo-challenge",
                   env={"SCEPD_SERVER_HTTPS": f"127.0.0.1:{https}",
                        "SCEPD_LIMITS_ACME_NEW_NONCES_PER_ADDRESS": "4/1h"})
    tls = ssl.create_default_context(cafile=str(state_dir / "ca" / "root.pem"))
    by_worker: dict[int, http.client.HTTPSConnection] = {}
    try:  # one kept-alive connection held by each worker (the directory is not rate limited)
        by_worker = _connection_per_worker(https, tls, served.pids, "GET", "/acme/directory")
        assert len(by_worker) == 2
        statuses = []
        for i in range(8):
            conn = list(by_worker.values())[i % 2]
            conn.request("HEAD", "/acme/new-nonce")
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
        assert statuses[:4] == [200] * 4 and statuses[4:] == [429] * 4, statuses
        assert {_owner(c.sock, https, served.pids) for c in by_worker.values()} == set(by_worker)
    finally:
        for conn in by_worker.values():
            conn.close()
        assert stop(served) == 0, served.log_text()
