"""ACME issuance throughput and latency against a real `scepd serve --https` on 127.0.0.1.

    .venv/bin/python bench/acme_issue.py [--orders 100] [--concurrency 8] [--max-seconds 120]

One account (scepd-agent's ACME client); each order is the full RFC 8555 round: newOrder,
authorization, http-01 challenge validated by the server against a responder on loopback,
finalize (RSA-2048 CSR), certificate download. Certificate keys are generated before the clock
starts. Every JWS is signed and verified, every nonce comes from and goes to the database.
Bounded in count and in time; listens and connects on loopback only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agent.acme_client import AcmeClient  # noqa: E402
from agent.protocol import Identity  # noqa: E402
from bench.common import SharedResponder, start_scepd, tree_cpu as server_cpu  # noqa: E402
from tests.acme_responders import free_port  # noqa: E402


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--orders", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=120)
    ap.add_argument("--workers", type=int, default=None,
                    help="scepd serve --workers N (default: the server's, one per core)")
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="scepd-bench-acme-"))
    http, https, http01 = free_port(), free_port(), free_port()
    env = {**os.environ, "SCEPD_SERVER_HTTP": f"127.0.0.1:{http}", "SCEPD_SERVER_HTTPS": f"127.0.0.1:{https}",
           "SCEPD_ACME_HTTP01_PORT": str(http01), "SCEPD_ACME_RESOLVE": "*=127.0.0.1",
           # one account placing --orders orders as fast as it can: measure issuance, not limits
           "SCEPD_LIMITS_ACME_NEW_ORDERS_PER_ACCOUNT": "0"}
    proc = start_scepd(state, env, workers=args.workers)
    try:
        root = x509.load_pem_x509_certificate((state / "ca" / "root.pem").read_bytes())
        directory = f"https://127.0.0.1:{https}/acme/directory"
        responder = SharedResponder("127.0.0.1", http01)
        async with responder:
            first = AcmeClient(directory, root)
            await first.ensure_account(None)
            clients = []
            for _ in range(args.concurrency):
                c = AcmeClient(directory, root, account_key=first.account_key, account_url=first.account_url)
                c.responder = responder.per_order
                clients.append(c)
            print(f"generating {args.orders} RSA-2048 keys ...", flush=True)
            keys = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(args.orders)]
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(args.orders):
                queue.put_nowait(i)
            latencies: list[float] = []
            failures: list[str] = []
            stop_at = time.monotonic() + args.max_seconds

            async def worker(client: AcmeClient) -> None:
                while not queue.empty() and time.monotonic() < stop_at:
                    i = queue.get_nowait()
                    t0 = time.perf_counter()
                    try:
                        await client.enroll(keys[i], Identity(f"bench-{i}.example.test"), "")
                    except Exception as exc:  # counted and reported, never hidden
                        failures.append(str(exc))
                    latencies.append(time.perf_counter() - t0)

            cpu0 = server_cpu(proc.pid)
            started = time.perf_counter()
            await asyncio.gather(*(worker(c) for c in clients))
            elapsed = time.perf_counter() - started
            cpu = server_cpu(proc.pid) - cpu0
        done = len(latencies)
        q = statistics.quantiles(latencies, n=100) if done >= 2 else [0.0] * 99
        print(f"orders: {done} in {elapsed:.2f}s with concurrency {args.concurrency} "
              f"-> {done / elapsed:.1f}/s; failures {len(failures)} {failures[:3]}")
        print(f"latency ms (newOrder to certificate): p50 {q[49] * 1000:.0f}  p95 {q[94] * 1000:.0f}  "
              f"max {max(latencies) * 1000:.0f}")
        print(f"server CPU: {cpu:.2f}s = {cpu / max(done, 1) * 1000:.0f} ms an order "
              "(the client shares the machine's cores)")
        out = subprocess.run([sys.executable, "-m", "scepd", "certs", "list", "--json", "--state-dir",
                              str(state), "--limit", "100000"], capture_output=True, text=True, env=env)
        stored = sum(1 for c in json.loads(out.stdout) if c["protocol"] == "acme")
        print(f"ACME certificates in the store: {stored} (expected {done - len(failures)})")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


if __name__ == "__main__":
    asyncio.run(main())
