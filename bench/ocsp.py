"""OCSP responses/s for requests without a nonce (pre-signed responses), against a real `scepd serve`.

    .venv/bin/python bench/ocsp.py [--certs 1000] [--seconds 10] [--connections 64] [--method get|post]
                                   [--workers N] [--generator auto|wrk|h2load|python]

Builds a throwaway CA and an inventory of --certs certificates (rows inserted directly; every tenth
one revoked, keyCompromise), starts `python -m scepd serve` on a loopback port (`--workers N` is
passed through when given), asks once for every certificate (the responses get signed and cached),
then drives GET /ocsp/<base64> (RFC 5019 form; or POST /ocsp) requests without a nonce, cycling over
the certificates, over --connections keep-alive connections for --seconds with a C load generator:
`wrk` (Debian package `wrk`; a Lua script cycles the requests) or `h2load` (Debian `nghttp2-client`;
HTTP/1.1, one URI list), falling back to a Python aiohttp generator (which is then the bottleneck:
its figure is a floor). Prints responses/s and the server's CPU (user+system of the serve process
and its children, from /proc) per response, with the load average.

Before and after the run a sample of responses is checked with pyca/cryptography (signature by the
CA, CertID, status, thisUpdate/nextUpdate, served byte-identical from the cache) and with
`openssl ocsp -respin ... -CAfile ... -resp_text`. Bounded in count and time; loopback only.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.x509 import ocsp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import start_scepd, tree_cpu  # noqa: E402
from scepd import config as config_mod  # noqa: E402
from scepd.ca import pki  # noqa: E402
from scepd.ca.ocsp import _issuer_hashes  # noqa: E402
from scepd.clock import SystemClock  # noqa: E402
from scepd.http.app import open_services  # noqa: E402
from scepd.store import CertificateRecord  # noqa: E402

WRK_LUA = r"""
local paths = {}
local bodies = {}
local method = os.getenv("OCSP_METHOD")
for line in io.lines(os.getenv("OCSP_LIST")) do
  if method == "POST" then
    bodies[#bodies + 1] = (line:gsub("..", function(cc) return string.char(tonumber(cc, 16)) end))
  else
    paths[#paths + 1] = line
  end
end
local i = 0
local headers = {["Content-Type"] = "application/ocsp-request"}
request = function()
  i = i + 1
  if method == "POST" then
    if i > #bodies then i = 1 end
    return wrk.format("POST", "/ocsp", headers, bodies[i])
  end
  if i > #paths then i = 1 end
  return wrk.format("GET", paths[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def seed(state: Path, count: int) -> tuple[list[tuple[int, str]], str]:
    """`count` certificate rows (every tenth revoked); [(serial, status)], ca_id."""
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    services = await open_services(config_mod.load(state, environ={}), SystemClock())
    try:
        ca_id = services.authority.ca_id
        out = []
        async with services.store.transaction() as tx:
            for i in range(count):
                serial = secrets.randbits(127) | (1 << 126)
                revoked = i % 10 == 9
                out.append((serial, "revoked" if revoked else "good"))
                await tx.insert_certificate(CertificateRecord(
                    serial=format(serial, "x"), ca_id=ca_id, subject=f"CN=bench-{i}", sans=(),
                    not_before=now, not_after=now + dt.timedelta(days=90), profile="device",
                    protocol="bench", transaction_id=None, requester=None, spki_sha256="0" * 64,
                    der=b"\x30\x00", issued_at=now, status="revoked" if revoked else "valid",
                    revoked_at=now if revoked else None,
                    revocation_reason="keyCompromise" if revoked else None))
        return out, ca_id
    finally:
        await services.close()


def fetch(url: str, data: bytes | None = None) -> tuple[bytes, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/ocsp-request"}
                                 if data else {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read(), dict(resp.headers)


def verify_sample(base: str, requests: list[bytes], certs: list[tuple[int, str]], ca, state: Path,
                  tmp: Path, first: dict[int, set[bytes]], label: str, copies: int = 1) -> None:
    """pyca + openssl on a sample; raises SystemExit on any mismatch."""
    pem = serialization.Encoding.PEM
    (tmp / "ca.pem").write_bytes(ca.public_bytes(pem))
    chain = (state / "ca" / "root.pem").read_bytes() + ca.public_bytes(pem)
    (tmp / "chain.pem").write_bytes(chain)
    step = max(1, len(requests) // 20)
    checked = 0
    for i in range(0, len(requests), step):
        der = requests[i]
        path = "/ocsp/" + base64.b64encode(der).decode()
        body, headers = fetch(base + path)
        r = ocsp.load_der_ocsp_response(body)
        serial, status = certs[i]
        want = ocsp.OCSPCertStatus.REVOKED if status == "revoked" else ocsp.OCSPCertStatus.GOOD
        problems = []
        if r.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL or r.serial_number != serial:
            problems.append("status/serial")
        if r.certificate_status != want:
            problems.append(f"cert status {r.certificate_status} != {want}")
        try:
            ca.public_key().verify(r.signature, r.tbs_response_bytes, padding.PKCS1v15(), hashes.SHA256())
        except Exception:
            problems.append("signature")
        now = dt.datetime.now(dt.timezone.utc)
        if not (r.this_update_utc <= now + dt.timedelta(seconds=5) < r.next_update_utc):
            problems.append("thisUpdate/nextUpdate")
        if "max-age=" not in headers.get("Cache-Control", "") or "ETag" not in headers:
            problems.append("headers")
        # each worker process pre-signs its own copy: at most `copies` distinct bodies per request
        bodies = first.setdefault(i, set())
        bodies.add(body)
        if len(bodies) > copies:
            problems.append(f"{len(bodies)} different responses for one request (re-signed?)")
        (tmp / "resp.der").write_bytes(body)
        (tmp / "req.der").write_bytes(der)
        out = subprocess.run(["openssl", "ocsp", "-respin", str(tmp / "resp.der"), "-reqin", str(tmp / "req.der"),
                              "-issuer", str(tmp / "ca.pem"), "-serial", str(serial), "-CAfile",
                              str(tmp / "chain.pem"), "-resp_text"], capture_output=True, text=True, timeout=30)
        text = out.stdout + out.stderr
        if "Response verify OK" not in text or f": {status}" not in text:
            problems.append("openssl: " + text[-300:])
        if problems:
            raise SystemExit(f"{label}: response {i} (serial {serial:x}) wrong: {problems}")
        checked += 1
    print(f"{label}: {checked} responses checked by pyca and `openssl ocsp -respin -CAfile -resp_text`: "
          f"signature, CertID, status, thisUpdate/nextUpdate, cache headers"
          + ((", byte-identical to the warm-up" if copies == 1 else
              f", at most {copies} distinct responses per request (one per worker)") if label != "warm-up" else ""))


def run_wrk(base: str, listfile: Path, method: str, connections: int, seconds: float, threads: int,
            tmp: Path) -> dict:
    script = tmp / "ocsp.lua"
    script.write_text(WRK_LUA)
    env = {**os.environ, "OCSP_LIST": str(listfile), "OCSP_METHOD": method.upper()}
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{int(seconds)}s", "--timeout", "10s",
           "-s", str(script), base]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise SystemExit(f"wrk failed: {out.stdout}\n{out.stderr}")
    stats = json.loads(line[len("WRKJSON "):])
    stats["non2xx"] = stats["status"]
    stats["errors"] = stats["connect"] + stats["read"] + stats["write"] + stats["timeout"]
    stats["seconds"] = stats["duration_us"] / 1e6
    return stats


def run_h2load(base: str, paths: list[str], connections: int, seconds: float, threads: int, tmp: Path) -> dict:
    uris = tmp / "uris.txt"
    uris.write_text("".join(base + p + "\n" for p in paths))
    cmd = ["h2load", "--h1", "-t", str(threads), "-c", str(connections), "-D", str(int(seconds)),
           "-i", str(uris)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    import re
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                     out.stdout)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out.stdout)
    took = re.search(r"finished in ([\d.]+)(m?s)", out.stdout)
    if not (done and codes and took):
        raise SystemExit(f"h2load failed: {out.stdout}\n{out.stderr}")
    secs = float(took.group(1)) / (1000 if took.group(2) == "ms" else 1)
    return {"requests": int(codes.group(1)), "seconds": secs, "non2xx": int(done.group(1)) - int(codes.group(1)),
            "errors": int(done.group(3)) + int(done.group(4))}


async def run_python(base: str, paths: list[str], bodies: list[bytes], method: str, connections: int,
                     seconds: float) -> dict:
    import aiohttp
    deadline = time.monotonic() + seconds
    counts = {"requests": 0, "non2xx": 0, "errors": 0}

    async def worker(session, start: int) -> None:
        i = start
        while time.monotonic() < deadline:
            i = (i + 1) % len(paths)
            try:
                if method == "post":
                    resp = await session.post(base + "/ocsp", data=bodies[i])
                else:
                    resp = await session.get(base + paths[i])
                async with resp:
                    await resp.read()
                    counts["requests"] += 1
                    if resp.status != 200:
                        counts["non2xx"] += 1
            except aiohttp.ClientError:
                counts["errors"] += 1
    started = time.monotonic()
    conn = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=conn) as session:
        await asyncio.gather(*(worker(session, k * 7) for k in range(connections)))
    counts["seconds"] = time.monotonic() - started
    return counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--certs", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="load generator threads (wrk/h2load)")
    ap.add_argument("--method", choices=("get", "post"), default="get")
    ap.add_argument("--workers", type=int, default=None, help="passed to `scepd serve --workers N`")
    ap.add_argument("--generator", choices=("auto", "wrk", "h2load", "python"), default="auto")
    ap.add_argument("--baseline", action="store_true",
                    help="also drive GET /healthz (a trivial route through the same middlewares): the "
                         "HTTP stack's own cost per request on this machine")
    args = ap.parse_args()
    args.seconds = min(args.seconds, 120)
    args.certs = max(1, min(args.certs, 200_000))
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "h2load" if shutil.which("h2load") else "python"
    if generator == "h2load" and args.method == "post":
        raise SystemExit("h2load here sends GETs only; use --method get or wrk")

    tmp = Path(tempfile.mkdtemp(prefix="scepd-ocsp-bench-"))
    state = tmp / "state"
    state.mkdir()
    proc = None
    try:
        pki.create(state, SystemClock(), cn="bench", root_bits=2048)
        (state / config_mod.CONFIG_NAME).write_text(config_mod.render_default())
        certs, _ca_id = asyncio.run(seed(state, args.certs))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "SCEPD_SERVER_HTTP": f"127.0.0.1:{port}",
               "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        if args.workers:
            proc = subprocess.Popen([sys.executable, "-m", "scepd", "serve", "--state-dir", str(state),
                                     "--no-demo-challenge", "--workers", str(args.workers)],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                                    start_new_session=True)
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                if line.startswith("Root CA") or not line:
                    break
        else:
            proc = start_scepd(state, env)
        from cryptography import x509
        ca = x509.load_pem_x509_certificate((state / "ca" / "ca.pem").read_bytes())
        name_hash, key_hash = _issuer_hashes(ca, "sha1")
        requests = [ocsp.OCSPRequestBuilder().add_certificate_by_hash(name_hash, key_hash, serial, hashes.SHA1())
                    .build().public_bytes(serialization.Encoding.DER) for serial, _ in certs]
        paths = ["/ocsp/" + base64.b64encode(der).decode().replace("/", "%2F").replace("+", "%2B")
                 for der in requests]
        for _ in range(300):  # the server is up when /healthz answers (bounded: 30 s)
            try:
                fetch(base + "/healthz")
                break
            except OSError:
                time.sleep(0.1)
        copies = max(1, args.workers or os.cpu_count() or 1)  # serve defaults to one worker per core
        t0 = time.monotonic()
        for _ in range(copies):  # warm-up: every response signed (once per worker, if they take turns)
            for der in requests:  # (POST and GET share the cache)
                fetch(base + "/ocsp", der)
        warm = time.monotonic() - t0
        print(f"warm-up: {len(requests) * copies} requests (signed and cached) in {warm:.1f} s "
              f"({warm / len(requests) / copies * 1000:.2f} ms each, one client, sequential)")
        first: dict[int, set[bytes]] = {}
        verify_sample(base, requests, certs, ca, state, tmp, first, "warm-up", copies)

        listfile = tmp / "requests.txt"
        def drive(route_paths: list[str], method: str) -> tuple[dict, float, tuple, tuple]:
            listfile.write_text("".join((p if method == "get" else der.hex()) + "\n"
                                        for p, der in zip(route_paths, requests)))
            load_before = os.getloadavg()
            cpu0 = tree_cpu(proc.pid)
            if generator == "wrk":
                stats = run_wrk(base, listfile, method, args.connections, args.seconds, args.threads, tmp)
            elif generator == "h2load":
                stats = run_h2load(base, route_paths, args.connections, args.seconds, args.threads, tmp)
            else:
                stats = asyncio.run(run_python(base, route_paths, requests, method, args.connections,
                                               args.seconds))
            return stats, tree_cpu(proc.pid) - cpu0, load_before, os.getloadavg()

        if args.baseline:
            stats, cpu, _lb, _la = drive(["/healthz"] * len(paths), "get")
            n = stats["requests"]
            print(f"baseline GET /healthz, {generator}: {n / stats['seconds']:,.0f} requests/s, server CPU "
                  f"{cpu / n * 1e6 if n else 0:.0f} µs per request ({cpu / stats['seconds']:.2f} cores busy)")
        stats, cpu, load_before, load_after = drive(paths, args.method)
        verify_sample(base, requests, certs, ca, state, tmp, first, "after the run", copies)
        events = {}
        for line in fetch(base + "/metrics")[0].decode().splitlines():
            if line.startswith("scepd_ocsp_cache_events{"):
                events[line.split('"')[1]] = int(float(line.rsplit(" ", 1)[1]))
        n = stats["requests"]
        rate = n / stats["seconds"] if stats["seconds"] else 0
        extra = f", p50 {stats['p50_us'] / 1000:.2f} ms, p99 {stats['p99_us'] / 1000:.2f} ms" if "p50_us" in stats else ""
        print(f"OCSP {args.method.upper()} without nonce, {generator}, {args.connections} keep-alive connections, "
              f"{len(requests)} certificates, scepd serve{f' --workers {args.workers}' if args.workers else ''}: "
              f"{n} responses in {stats['seconds']:.1f} s = {rate:,.0f} responses/s{extra}; "
              f"non-200 {stats['non2xx']}, errors {stats['errors']}")
        print(f"server CPU: {cpu:.2f} s = {cpu / n * 1e6 if n else 0:.0f} µs per response "
              f"({cpu / stats['seconds']:.2f} cores busy); loadavg {load_before[0]:.2f} before, "
              f"{load_after[0]:.2f} after")
        print("server's pre-signed response counters (/metrics scepd_ocsp_cache_events, of the process "
              "that answered the scrape -- one worker's share with --workers N): "
              + ", ".join(f"{k} {v}" for k, v in sorted(events.items())))
        if generator == "python":
            print("(the Python load generator is the bottleneck here: install `wrk` for the real figure)")
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
