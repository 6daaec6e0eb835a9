"""SCEP enrollment throughput and latency against a real `scepd serve` on 127.0.0.1.

    .venv/bin/python bench/scep_enroll.py [--requests 400] [--concurrency 8] [--max-seconds 120] [--workers N] [--hsm]

--hsm: the issuing CA key is in a temporary SoftHSM2 token (`scepd init --ca-key-uri`), so every
decryption and signature of the server goes through PKCS#11.

Requests (CSR, throwaway signer, CMS envelope) are built before the clock starts, so the figures
are the server's: decode, decrypt, verify, policy, sign, store (SQLite, synchronous=FULL), reply.
Server CPU is summed over the server's process tree (the parent and every worker with
--workers N, reaped workers included). Bounded in count and in time; loopback only.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scepd.scep import wire  # noqa: E402
from bench.common import start_scepd, tree_cpu as server_cpu  # noqa: E402
from tests.helpers import make_csr, pkcs_req, self_signed  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_token_ca(state: Path) -> None:
    """`scepd init --ca-key-uri` into a SoftHSM2 token made in `state`/softhsm (SOFTHSM2_CONF is
    set for this process, so the server inherits it)."""
    from tests import softhsm
    reason = softhsm.missing()
    if reason:
        sys.exit(f"--hsm: {reason}")
    hsm = softhsm.SoftHsm(state / "softhsm", ("bench",))
    subprocess.run([sys.executable, "-m", "scepd", "init", "--state-dir", str(state),
                    "--insecure-unencrypted-root-key", "--ca-key-uri", hsm.uri("bench", "issuing-ca")],
                   check=True, capture_output=True, timeout=300)
    print("CA key: in SoftHSM2 (PKCS#11)", flush=True)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=120)
    ap.add_argument("--workers", type=int, default=None,
                    help="scepd serve --workers N (default: the server's, one per core)")
    ap.add_argument("--hsm", action="store_true", help="the CA key in a temporary SoftHSM2 token")
    args = ap.parse_args()
    print(f"loadavg at start: {' '.join(Path('/proc/loadavg').read_text().split()[:3])} "
          f"({os.cpu_count()} cores)", flush=True)
    state = Path(tempfile.mkdtemp(prefix="scepd-bench-"))
    if args.hsm:
        init_token_ca(state)
    port = free_port()
    env = {**os.environ, "SCEPD_SERVER_HTTP": f"127.0.0.1:{port}", "SCEPD_SCEP_STATIC_CHALLENGE": "bench"}
    proc = start_scepd(state, env, workers=args.workers)
    try:
        url = f"http://127.0.0.1:{port}/scep"
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "?operation=GetCACert") as resp:
                ca = wire.certs_from_certs_only(await resp.read())[0]
            print(f"building {args.requests} requests ...", flush=True)
            keys = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(16)]
            messages = []
            for i in range(args.requests):
                key = keys[i % len(keys)]
                der, _, _ = pkcs_req(ca, key, make_csr(key, f"bench-{i}", "bench"),
                                     signer=(self_signed(key), key))
                messages.append(der)
            latencies: list[float] = []
            failures = 0
            queue: asyncio.Queue[bytes] = asyncio.Queue()
            for m in messages:
                queue.put_nowait(m)
            stop_at = time.monotonic() + args.max_seconds

            async def worker() -> None:
                nonlocal failures
                while not queue.empty() and time.monotonic() < stop_at:
                    msg = queue.get_nowait()
                    t0 = time.perf_counter()
                    async with session.post(url + "?operation=PKIOperation", data=msg) as resp:
                        body = await resp.read()
                    latencies.append(time.perf_counter() - t0)
                    if resp.status != 200 or wire.decode_cert_rep(body).status != wire.PkiStatus.SUCCESS:
                        failures += 1

            cpu0 = server_cpu(proc.pid)
            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            elapsed = time.perf_counter() - started
            cpu = server_cpu(proc.pid) - cpu0
        done = len(latencies)
        q = statistics.quantiles(latencies, n=100) if done >= 2 else [0.0] * 99
        print(f"enrollments: {done} in {elapsed:.2f}s with concurrency {args.concurrency} "
              f"-> {done / elapsed:.1f}/s; failures {failures}")
        print(f"latency ms: p50 {q[49] * 1000:.1f}  p95 {q[94] * 1000:.1f}  p99 {q[98] * 1000:.1f}  "
              f"max {max(latencies) * 1000:.1f}")
        print(f"server CPU (all processes): {cpu:.2f}s = {cpu / max(done, 1) * 1000:.1f} ms an enrollment; "
              f"loadavg now {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
        out = subprocess.run([sys.executable, "-m", "scepd", "certs", "list", "--json", "--state-dir",
                              str(state), "--limit", "100000"], capture_output=True, text=True, env=env)
        stored = len(re.findall(r'"serial"', out.stdout))
        print(f"certificates in the store: {stored} (expected {done - failures})")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


if __name__ == "__main__":
    asyncio.run(main())
