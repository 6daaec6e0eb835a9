"""Side by side: scepd against micromdm's scepserver (SCEP) and pebble (ACME), same load, same run.

    .venv/bin/python bench/compare.py [--quick] [--scep-requests 200] [--acme-orders 60] [--rounds 1]
                                      [--max-seconds 60] [--json FILE] [--database sqlite|postgresql]

The whole run happens in a private network namespace with only loopback up (`unshare --net`, as
root, else `unshare --map-root-user --net`): scepserver binds every interface, so nothing here can
be reached from outside the run. The namespace goes away with the run's last process.

SCEP: PKCSReq (RSA-2048 keys pre-generated, AES-128-CBC, SHA-256, static challenge) at 1, 8 and 32
concurrent clients against `scepd serve` and `scepserver`. Requests are built before the clock
starts; replies are kept and verified after it stops (CertRep signature by a GetCACert
certificate, transactionID and nonce, envelope decrypted with the request key, the issued
certificate is for the request key and signed by the CA, duplicate serials).
ACME: full orders (ES256 account, newOrder, http-01 validated by the server against a responder on
127.0.0.1, finalize with an RSA-2048 CSR, download; chain checked to the server's root and key
matched by scepd-agent's client) at 1 and 16 concurrent clients against `scepd serve --https` and
`pebble` (its DNS from `pebble-challtestsrv`, everything resolving to 127.0.0.1). Both clients poll
every 50 ms whatever Retry-After says, so neither server is measured by the client's politeness.

--database postgresql: scepd stores in a throwaway PostgreSQL (Debian `postgresql`) started inside
the namespace on 127.0.0.1, durable as a production one (fsync and synchronous_commit on, like
SQLite's synchronous=FULL in the default run); PostgreSQL's CPU (every backend) is counted in
scepd's and also shown alone ("db ms").

Side by side in time too: each round starts the three servers afresh; each setting then runs
against scepd and its reference one right after the other (which one goes first alternates
with the round), so a machine whose speed drifts -- other guests taking the CPU ("steal", shown
a setting) -- moves both figures of a pair alike. --rounds N repeats every setting N times and
ends with the median of each ratio.

Server CPU per request is the utime+stime delta (/proc/PID/stat, the process and its children)
over each setting; the load generator runs in this process, on the same cores. Every setting is
bounded in count and in time; failures are counted and printed, never dropped.
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import dataclasses
import datetime as dt
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agent.acme_client import AcmeClient  # noqa: E402
from agent.protocol import Identity  # noqa: E402
from bench.common import (ScepRequest, SharedResponder, build_requests, check_cert_rep,  # noqa: E402
                          recipient_of, tree_cpu)
from bench.common import start_scepd as start_scepd_process  # noqa: E402
from scepd.scep import wire  # noqa: E402
from tests.helpers import self_signed  # noqa: E402

INNER = "SCEPD_BENCH_COMPARE_NETNS"
CHALLENGE = "bench-static-challenge"
POLL_SECONDS = 0.05
PROCS: list[subprocess.Popen] = []
#: processes whose CPU is scepd's database's (PostgreSQL's postmaster, with its backends)
DB_PIDS: list[int] = []
CLUSTERS: list = []  # tests.pg.PostgresCluster, stopped with the servers
WORKDIRS: list[Path] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(cmd: list[str], env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    PROCS.append(proc)
    return proc


def stop_all() -> None:
    stop_servers()
    while CLUSTERS:
        try:
            CLUSTERS.pop().stop()
        except Exception as exc:  # noqa: BLE001 - reported, the rest still stops
            print(f"stopping PostgreSQL: {exc}", file=sys.stderr)
    DB_PIDS.clear()


def stop_servers() -> None:
    for proc in reversed(PROCS):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
    for proc in reversed(PROCS):
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    PROCS.clear()


async def wait_http(url: str, ssl_ctx=None, seconds: float = 60) -> bytes:
    """GET url until it answers 200, for at most `seconds`."""
    deadline = time.monotonic() + seconds
    last = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url, ssl=ssl_ctx) as resp:
                    if resp.status == 200:
                        return await resp.read()
                    last = f"HTTP {resp.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {seconds:.0f} s: {last}")


# --- results -------------------------------------------------------------------------------------

@dataclass
class Row:
    protocol: str
    clients: int
    server: str
    sent: int = 0
    ok: int = 0
    failures: int = 0
    duplicate_serials: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0
    db_cpu: float = 0.0  # of `cpu`: the database server's (PostgreSQL), 0 with SQLite (in-process)
    http01_answered: int | None = None
    round: int = 1
    steal: float = 0.0  # share of the machine's CPU time other guests took during the setting
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok_per_s(self) -> float:
        """Throughput: verified successes a second (a failure is no operation done)."""
        return self.ok / self.elapsed if self.elapsed else 0.0

    @property
    def cpu_ms_per_req(self) -> float:
        """Server CPU per request sent, successful or not."""
        return self.cpu * 1000 / self.sent if self.sent else 0.0

    @property
    def db_ms_per_req(self) -> float:
        return self.db_cpu * 1000 / self.sent if self.sent else 0.0

    @property
    def correct_per_s(self) -> float:
        """Successes a second that did not repeat a serial number already issued."""
        return (self.ok - self.duplicate_serials) / self.elapsed if self.elapsed else 0.0


def machine_ticks() -> tuple[int, int]:
    """(all CPU ticks, steal ticks) of the machine so far (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


class Steal:
    """The share of the machine's CPU time the hypervisor gave other guests, over a block."""

    def __enter__(self) -> "Steal":
        self._t0, self._s0 = machine_ticks()
        self.share = 0.0
        return self

    def __exit__(self, *exc) -> None:
        t1, s1 = machine_ticks()
        self.share = (s1 - self._s0) / (t1 - self._t0) if t1 > self._t0 else 0.0


def cpu_now(pids: list[int]) -> tuple[float, float]:
    """(CPU seconds of `pids` and of the database processes, CPU seconds of the database's alone)."""
    db = sum(tree_cpu(p) for p in DB_PIDS) if DB_PIDS and pids else 0.0
    return sum(tree_cpu(p) for p in pids) + db, db


class CountingResponder(SharedResponder):
    """The shared http-01 responder, counting the validation requests it answered."""

    answered = 0

    async def handle(self, request):
        resp = await super().handle(request)
        if resp.status == 200:
            self.answered += 1
        return resp


def count_duplicates(serials: list[tuple]) -> int:
    return len(serials) - len(set(serials))


# --- SCEP ----------------------------------------------------------------------------------------

async def get_ca_certs(url: str) -> list[x509.Certificate]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "?operation=GetCACert") as resp:
            body, ctype = await resp.read(), resp.content_type
    if ctype == "application/x-x509-ca-cert":
        return [x509.load_der_x509_certificate(body)]
    return wire.certs_from_certs_only(body)


async def scep_setting(name: str, url: str, pids: list[int], ca_certs: list[x509.Certificate],
                       requests: list[ScepRequest], clients: int, max_seconds: float) -> Row:
    row = Row("SCEP", clients, name)
    replies: list[tuple[ScepRequest, int, bytes]] = []
    todo = list(reversed(requests))
    stop_at = time.monotonic() + max_seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        while todo and time.monotonic() < stop_at:
            req = todo.pop()
            try:
                async with session.post(url + "?operation=PKIOperation", data=req.der,
                                        headers={"Content-Type": "application/x-pki-message"}) as resp:
                    replies.append((req, resp.status, await resp.read()))
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                replies.append((req, 0, repr(exc).encode()))

    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:
        cpu0, db0 = cpu_now(pids)
        t0 = time.perf_counter()
        with Steal() as steal:
            await asyncio.gather(*(worker(session) for _ in range(clients)))
        row.elapsed = time.perf_counter() - t0
        cpu1, db1 = cpu_now(pids)
        row.cpu, row.db_cpu, row.steal = cpu1 - cpu0, db1 - db0, steal.share
    serials = []
    for req, status, body in replies:  # verified after the clock stopped
        row.sent += 1
        try:
            leaf = check_cert_rep(req, status, body, ca_certs)
        except Exception as exc:  # counted and reported, never hidden
            row.failures += 1
            row.errors.append(str(exc)[:200] or type(exc).__name__)
            continue
        row.ok += 1
        serials.append((leaf.issuer.public_bytes(), leaf.serial_number))
    row.duplicate_serials = count_duplicates(serials)
    return row


# --- ACME ----------------------------------------------------------------------------------------

async def poll_sleep(seconds: float) -> None:
    await asyncio.sleep(min(seconds, POLL_SECONDS))


async def acme_setting(name: str, directory: str, anchor: x509.Certificate, tls: ssl.SSLContext,
                       responder: CountingResponder, pids: list[int], keys, count: int, clients: int,
                       max_seconds: float, tag: str = "") -> Row:
    row = Row("ACME", clients, name)
    accounts = []
    for _ in range(clients):  # one ES256 account per concurrent client, made before the clock starts
        c = AcmeClient(directory, anchor, ssl_context=tls, sleep=poll_sleep)
        await c.ensure_account(None)
        c.responder = responder.per_order
        accounts.append(c)
    todo = list(reversed(range(count)))
    issued: list[x509.Certificate] = []
    stop_at = time.monotonic() + max_seconds

    async def worker(client: AcmeClient) -> None:
        while todo and time.monotonic() < stop_at:
            i = todo.pop()
            row.sent += 1
            try:  # the client checks the chain to `anchor` and the key of the leaf
                dns = f"o{i}-c{clients}{tag}.{name}.example.test"  # in CN and SAN: pebble wants the SAN
                got = await client.enroll(keys[i % len(keys)], Identity(dns, (f"DNS:{dns}",)), "")
                issued.append(got.cert)
                row.ok += 1
            except Exception as exc:  # counted and reported, never hidden
                row.failures += 1
                row.errors.append(str(exc)[:200] or type(exc).__name__)

    answered0 = responder.answered
    cpu0, db0 = cpu_now(pids)
    t0 = time.perf_counter()
    with Steal() as steal:
        await asyncio.gather(*(worker(c) for c in accounts))
    row.elapsed = time.perf_counter() - t0
    cpu1, db1 = cpu_now(pids)
    row.cpu, row.db_cpu, row.steal = cpu1 - cpu0, db1 - db0, steal.share
    row.http01_answered = responder.answered - answered0
    row.duplicate_serials = count_duplicates([(c.issuer.public_bytes(), c.serial_number) for c in issued])
    return row


# --- servers -------------------------------------------------------------------------------------

@dataclass
class Server:
    """A server started for the run, with what the load needs to reach it."""
    name: str
    pids: list[int]
    scep_url: str | None = None
    ca_certs: list[x509.Certificate] | None = None  # GetCACert's
    acme_directory: str | None = None
    anchor: x509.Certificate | None = None  # the ACME chain's root
    tls: ssl.SSLContext | None = None
    http01_port: int | None = None  # where it validates http-01 (our responder listens there)
    log: Path | None = None


async def start_scepd(work: Path, args) -> Server:
    http, https, http01 = free_port(), free_port(), free_port()
    env = {**os.environ, "SCEPD_SERVER_HTTP": f"127.0.0.1:{http}", "SCEPD_SERVER_HTTPS": f"127.0.0.1:{https}",
           "SCEPD_SCEP_STATIC_CHALLENGE": CHALLENGE, "SCEPD_LIMITS_ENABLED": "0",
           "SCEPD_ROOT_KEY_PASSPHRASE": "bench-root-passphrase",
           "SCEPD_ACME_HTTP01_PORT": str(http01), "SCEPD_ACME_RESOLVE": "*=127.0.0.1"}
    state = work / "scepd"
    if args.database == "postgresql":
        from tests import pg
        cluster = pg.PostgresCluster().start(durable=True)
        CLUSTERS.append(cluster)
        env["SCEPD_DATABASE_URL"] = cluster.create_database("scepd_bench")
        DB_PIDS[:] = [int((cluster.data / "postmaster.pid").read_text().split()[0])]
    proc = start_scepd_process(state, env, workers=args.workers)
    PROCS.append(proc)
    url = f"http://127.0.0.1:{http}/scep"
    await wait_http(url + "?operation=GetCACert")
    root = x509.load_pem_x509_certificate((state / "ca" / "root.pem").read_bytes())
    tls = ssl.create_default_context(cadata=root.public_bytes(serialization.Encoding.PEM).decode())
    directory = f"https://127.0.0.1:{https}/acme/directory"
    await wait_http(directory, tls)
    return Server("scepd", [proc.pid], scep_url=url, ca_certs=await get_ca_certs(url), acme_directory=directory,
                  anchor=root, tls=tls, http01_port=http01)


async def start_scepserver(work: Path) -> Server:
    depot = work / "depot"
    out = subprocess.run(["scepserver", "ca", "-init", "-depot", str(depot), "-keySize", "2048"],
                         capture_output=True, text=True, timeout=120, cwd=work)
    if out.returncode != 0:
        raise RuntimeError(f"scepserver ca -init failed: {out.stderr.strip()}")
    port = free_port()
    proc = spawn(["scepserver", "-depot", str(depot), "-port", str(port), "-challenge", CHALLENGE,
                  "-allowrenew", "0"], log=work / "scepserver.log")
    url = f"http://127.0.0.1:{port}/scep"
    await wait_http(url + "?operation=GetCACert")
    return Server("micromdm", [proc.pid], scep_url=url, ca_certs=await get_ca_certs(url),
                  log=work / "scepserver.log")


def tls_pair(work: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a 127.0.0.1/localhost certificate for pebble's HTTPS listener."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench pebble TLS CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = work / "tls-ca.pem", work / "tls-cert.pem", work / "tls-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


async def start_pebble(work: Path) -> Server:
    ca_pem, cert_pem, key_pem = tls_pair(work)
    port, mgmt, http01, tlsalpn, dns, dns_mgmt = (free_port() for _ in range(6))
    config = {"pebble": {"listenAddress": f"127.0.0.1:{port}", "managementListenAddress": f"127.0.0.1:{mgmt}",
                         "certificate": str(cert_pem), "privateKey": str(key_pem), "httpPort": http01,
                         "tlsPort": tlsalpn, "ocspResponderURL": "", "externalAccountBindingRequired": False}}
    (work / "pebble.json").write_text(json.dumps(config))
    spawn(["pebble-challtestsrv", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "", "-dns01", f"127.0.0.1:{dns}",
           "-http01", "", "-https01", "", "-tlsalpn01", "", "-management", f"127.0.0.1:{dns_mgmt}"],
          log=work / "challtestsrv.log")
    env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
    proc = spawn(["pebble", "-config", str(work / "pebble.json"), "-dnsserver", f"127.0.0.1:{dns}"],
                 env=env, log=work / "pebble.log")
    tls = ssl.create_default_context(cafile=str(ca_pem))
    await wait_http(f"https://127.0.0.1:{port}/dir", tls)
    root = x509.load_pem_x509_certificate(await wait_http(f"https://127.0.0.1:{mgmt}/roots/0", tls))
    # pebble's CPU only: the mock DNS server stands in for the resolver scepd is told to skip
    return Server("pebble", [proc.pid], acme_directory=f"https://127.0.0.1:{port}/dir", anchor=root, tls=tls,
                  http01_port=http01, log=work / "pebble.log")


async def run_settings(work: Path, args, keys, signers, acme_keys) -> list[Row]:
    """Every setting, each against scepd and its reference one right after the other (the first
    of the pair alternating with the round), --rounds times; each round on servers started
    afresh (in-memory pebble once hung in a third round of the same servers), so no round
    inherits another's state."""
    rows: list[Row] = []
    for rnd in range(1, args.rounds + 1):
        place = work / f"round{rnd}"
        place.mkdir()
        print(f"round {rnd}: starting scepd, micromdm scepserver and pebble ...", flush=True)
        try:
            servers = {srv.name: srv for srv in (await start_scepd(place, args), await start_scepserver(place),
                                                 await start_pebble(place))}
            rows += await run_round(rnd, servers, args, keys, signers, acme_keys)
        finally:
            stop_all()
    return rows


async def run_round(rnd: int, servers: dict[str, Server], args, keys, signers, acme_keys) -> list[Row]:
    rows: list[Row] = []
    async with contextlib.AsyncExitStack() as stack:
        responders = {}
        for srv in servers.values():
            if srv.http01_port is not None:
                responders[srv.name] = await stack.enter_async_context(
                    CountingResponder("127.0.0.1", srv.http01_port))
        for clients, count in args.scep_counts.items():
            for srv in pair(servers, "micromdm", rnd):
                print(f"round {rnd}: SCEP, {clients} clients, {srv.name} ...", flush=True)
                reqs = await asyncio.to_thread(build_requests, recipient_of(srv.ca_certs), keys, signers, count,
                                               f"{srv.name}-r{rnd}-c{clients}", CHALLENGE)
                row = await scep_setting(srv.name, srv.scep_url, srv.pids, srv.ca_certs, reqs, clients,
                                         args.max_seconds)
                row.round = rnd
                rows.append(row)
        for clients, count in args.acme_counts.items():
            for srv in pair(servers, "pebble", rnd):
                print(f"round {rnd}: ACME, {clients} clients, {srv.name} ...", flush=True)
                try:
                    row = await acme_setting(srv.name, srv.acme_directory, srv.anchor, srv.tls,
                                             responders[srv.name], srv.pids, acme_keys, count, clients,
                                             args.max_seconds, tag=f"r{rnd}")
                except Exception as exc:  # noqa: BLE001 - the setting failed before its clock: say so, go on
                    row = Row("ACME", clients, srv.name, sent=count, failures=count,
                              errors=[f"before the clock: {exc!r}"[:300]])
                    if srv.log is not None and srv.log.exists():
                        tail = srv.log.read_text(errors="replace").splitlines()[-15:]
                        print(f"{srv.name} failed a setting ({exc!r}); its log ends:", *tail, sep="\n  ",
                              flush=True)
                row.round = rnd
                rows.append(row)
    return rows


def pair(servers: dict[str, Server], reference: str, rnd: int) -> list[Server]:
    both = [servers["scepd"], servers[reference]]
    return both if rnd % 2 else both[::-1]


# --- report --------------------------------------------------------------------------------------

REFERENCE = {"SCEP": "micromdm", "ACME": "pebble"}


def table(rows: list[Row]) -> str:
    db = any(r.db_cpu for r in rows)
    rounds = max(r.round for r in rows) > 1
    head = (f"{'protocol':8} {'clients':>7} {'server':9} {'sent':>5} {'ok':>5} {'fail':>5} {'dupser':>6} "
            f"{'secs':>7} {'ok/s':>8} {'cpu ms/req':>10} {'x ok/s':>7} {'x cpu':>6} {'x correct':>9} {'steal':>6}"
            + (f" {'round':>5}" if rounds else "") + (f" {'db ms':>6}" if db else ""))
    lines = [head, "-" * len(head)]
    for r in rows:
        ref = reference_of(r, rows)
        ratio_ops = ratio_cpu = ratio_correct = ""
        if ref is not None and ref.ok_per_s and ref.cpu_ms_per_req:
            ratio_ops = f"{r.ok_per_s / ref.ok_per_s:.2f}"
            ratio_cpu = f"{r.cpu_ms_per_req / ref.cpu_ms_per_req:.1f}"
            if ref.correct_per_s:
                ratio_correct = f"{r.ok_per_s / ref.correct_per_s:.2f}"
        lines.append(f"{r.protocol:8} {r.clients:>7} {r.server:9} {r.sent:>5} {r.ok:>5} {r.failures:>5} "
                     f"{r.duplicate_serials:>6} {r.elapsed:>7.2f} {r.ok_per_s:>8.1f} {r.cpu_ms_per_req:>10.1f} "
                     f"{ratio_ops:>7} {ratio_cpu:>6} {ratio_correct:>9} {r.steal * 100:>5.0f}%"
                     + (f" {r.round:>5}" if rounds else "")
                     + (f" {r.db_ms_per_req:>6.1f}" if db and r.server == "scepd" else ""))
    return "\n".join(lines)


def reference_of(r: Row, rows: list[Row]) -> Row | None:
    """For a scepd row, the reference server's row of the same setting and round."""
    if r.server != "scepd":
        return None
    return next((x for x in rows if (x.protocol, x.clients, x.round, x.server) ==
                 (r.protocol, r.clients, r.round, REFERENCE[r.protocol])), None)


def medians(rows: list[Row]) -> str:
    """Per setting over the rounds: the median of each ratio and of each server's CPU ms."""
    out = ["medians over the rounds: scepd ÷ reference ok/s (correct), CPU ms/req scepd / reference, steal"]
    settings = sorted({(r.protocol, r.clients) for r in rows}, key=lambda k: ({"SCEP": 0, "ACME": 1}[k[0]], k[1]))
    for protocol, clients in settings:
        pairs = [(r, ref) for r in rows if (r.protocol, r.clients, r.server) == (protocol, clients, "scepd")
                 and (ref := reference_of(r, rows)) is not None and ref.ok_per_s and ref.correct_per_s]
        if not pairs:
            continue
        med = statistics.median
        ops = [r.ok_per_s / ref.ok_per_s for r, ref in pairs]
        correct = [r.ok_per_s / ref.correct_per_s for r, ref in pairs]
        out.append(f"{protocol} {clients:>2} clients: x ok/s {med(ops):.2f} (rounds {', '.join(f'{v:.2f}' for v in ops)})"
                   f"{f', x correct {med(correct):.2f}' if protocol == 'SCEP' else ''}; "
                   f"CPU ms {med([r.cpu_ms_per_req for r, _ in pairs]):.1f} / "
                   f"{med([ref.cpu_ms_per_req for _, ref in pairs]):.1f}; "
                   f"steal {med([r.steal for r, _ in pairs] + [ref.steal for _, ref in pairs]) * 100:.0f}%")
    return "\n".join(out)


async def inner(args) -> int:
    logging.basicConfig(level=logging.ERROR)
    loadavg = Path("/proc/loadavg").read_text().split()[:3]
    # /proc/self/net is this process's namespace (/sys/class/net is the one sysfs was mounted in)
    ifaces = sorted(line.split(":")[0].strip() for line in Path("/proc/self/net/dev").read_text().splitlines()[2:])
    print(f"loadavg at start: {' '.join(loadavg)} ({os.cpu_count()} cores, shared with other jobs); "
          f"network namespace interfaces: {', '.join(ifaces)}", flush=True)
    print(f"scepd serve --workers {args.workers if args.workers is not None else f'(default: {os.cpu_count()})'}"
          f", database {args.database}", flush=True)
    if ifaces != ["lo"]:
        print("refusing to run: this network namespace has interfaces besides loopback", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="scepd-bench-compare-"))
    WORKDIRS.append(work)
    nkeys = max(args.scep_counts.values())
    print(f"generating {min(nkeys, 32)} SCEP and {min(max(args.acme_counts.values()), 64)} ACME RSA-2048 keys ...",
          flush=True)
    keys = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(min(nkeys, 32))]
    signers = [self_signed(k) for k in keys]
    acme_keys = [rsa.generate_private_key(public_exponent=65537, key_size=2048)
                 for _ in range(min(max(args.acme_counts.values()), 64))]
    try:
        rows = await run_settings(work, args, keys, signers, acme_keys)
    finally:
        stop_all()
        shutil.rmtree(work, ignore_errors=True)
    order = {"SCEP": 0, "ACME": 1}
    rows.sort(key=lambda r: (r.round, order[r.protocol], r.clients, r.server != "scepd"))
    print()
    print(table(rows))
    if args.rounds > 1:
        print()
        print(medians(rows))
    print("ok/s: verified successes a second; cpu ms/req: server CPU (user+sys, with children) per request sent; "
          "dupser: serial numbers issued twice; x ok/s = scepd ok/s / reference ok/s (higher is better); "
          "x cpu = scepd cpu ms/req / reference (lower is better); x correct = scepd ok/s / the reference's "
          "successes a second whose serial was not issued before; steal: the machine's CPU time other guests "
          "took meanwhile; references: micromdm scepserver for SCEP, pebble for ACME")
    def label(r: Row) -> str:
        return (f"round {r.round}: " if args.rounds > 1 else "") + f"{r.protocol} {r.clients} {r.server}"
    for r in rows:
        if r.http01_answered is not None:
            print(f"{label(r)}: {r.http01_answered} http-01 validation requests answered for {r.ok} certificates")
    for r in rows:
        if r.errors:
            print(f"{label(r)}: {r.failures} failures, e.g. {sorted(set(r.errors))[:3]}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"loadavg": loadavg, "scepd_workers": args.workers, "database": args.database, "rounds": args.rounds,
             "rows": [{**{k: v for k, v in r.__dict__.items() if k != "errors"},
                                           "errors": r.errors[:10], "ok_per_s": r.ok_per_s,
                                           "cpu_ms_per_req": r.cpu_ms_per_req,
                                           "db_ms_per_req": r.db_ms_per_req} for r in rows]}, indent=1))
    return 0


def outer(argv: list[str]) -> int:
    """Run this script again inside a fresh network namespace with only loopback up."""
    unshare = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--map-root-user", "--net"]
    cmd = [*unshare, "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
           sys.executable, str(Path(__file__).resolve()), *argv]
    proc = subprocess.Popen(cmd, env={**os.environ, INNER: "1"})
    try:
        return proc.wait(timeout=3600)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts (a smoke test, not a measurement)")
    ap.add_argument("--scep-requests", type=int, default=200, help="PKCSReq per setting")
    ap.add_argument("--acme-orders", type=int, default=60, help="orders per setting")
    ap.add_argument("--max-seconds", type=float, default=120, help="time bound of each setting")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every setting this many times (pairs interleaved) and print the median ratios")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--workers", type=int, default=None,
                    help="scepd serve --workers N (default: the server's, one per core)")
    ap.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite",
                    help="scepd's store: SQLite in its state dir, or a throwaway durable PostgreSQL")
    args = ap.parse_args()
    if os.environ.get(INNER) != "1":
        return outer(sys.argv[1:])
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.quick:
        args.scep_requests, args.acme_orders, args.max_seconds = 6, 4, min(args.max_seconds, 20)
    args.scep_counts = {1: args.scep_requests, 8: args.scep_requests, 32: args.scep_requests}
    args.acme_counts = {1: args.acme_orders, 16: args.acme_orders}
    if args.quick:
        args.scep_counts[1] = args.acme_counts[1] = 2
        args.scep_counts[8], args.scep_counts[32] = 8, 32
        args.acme_counts[16] = 16

    def on_signal(signum, frame):
        # not asyncio's SIGINT handling: a cancellation can be swallowed on its way up; stop the
        # servers here, remove the work directory and leave
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_all()
        for work in WORKDIRS:
            shutil.rmtree(work, ignore_errors=True)
        print(f"interrupted by signal {signum}; servers stopped", file=sys.stderr, flush=True)
        os._exit(130)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    atexit.register(stop_all)
    return asyncio.run(inner(args))


if __name__ == "__main__":
    sys.exit(main())
