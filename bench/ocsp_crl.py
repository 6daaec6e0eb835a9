"""CRL signing time by size, and OCSP throughput/latency, over HTTP on 127.0.0.1.

    .venv/bin/python bench/ocsp_crl.py [--revoked 10000] [--requests 2000] [--concurrency 8] [--max-seconds 60]

Builds a throwaway CA and an inventory with --revoked revoked certificates (rows inserted directly:
a CRL entry needs only serial, time and reason), then measures (1) publishing a CRL of that size
(store read + sign + write, as on a stale CRL request) and (2) OCSP POSTs through the real app
factory served by aiohttp on a loopback port. Bounded in count and in time.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scepd import config as config_mod
from scepd.ca import pki  # noqa: E402
from scepd.http.app import create_app, open_services  # noqa: E402
from scepd.clock import FixedClock  # noqa: E402
from scepd.store import CertificateRecord  # noqa: E402


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--revoked", type=int, default=10000)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=60)
    args = ap.parse_args()
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    clock = FixedClock(now)
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        pki.create(state, clock, cn="bench", root_bits=2048)
        (state / config_mod.CONFIG_NAME).write_text(config_mod.render_default())
        services = await open_services(config_mod.load(state, environ={}), clock)
        try:
            ca_id = services.authority.ca_id
            serials = []
            async with services.store.transaction() as tx:
                for i in range(args.revoked):
                    serial = format(secrets.randbits(127) | (1 << 126), "x")
                    serials.append(serial)
                    await tx.insert_certificate(CertificateRecord(
                        serial=serial, ca_id=ca_id, subject=f"CN=bench-{i}", sans=(), not_before=now,
                        not_after=now + dt.timedelta(days=90), profile="device", protocol="bench",
                        transaction_id=None, requester=None, spki_sha256="0" * 64, der=b"\x30\x00",
                        issued_at=now, status="revoked", revoked_at=now, revocation_reason="keyCompromise"))
            timings = []
            for _ in range(3):
                clock.advance(dt.timedelta(hours=13))  # stale: the next request publishes a new CRL
                started = time.perf_counter()
                published = await services.crl.current()
                timings.append(time.perf_counter() - started)
            print(f"CRL with {args.revoked} entries: {len(published.der) / 1024:.0f} KiB, "
                  f"publish (read + sign + store) median {statistics.median(timings) * 1000:.0f} ms")
            started = time.perf_counter()
            for _ in range(200):
                await services.crl.current()
            print(f"fresh CRL served from cache (incl. the freshness check): "
                  f"{(time.perf_counter() - started) / 200 * 1000:.2f} ms")

            runner = web.AppRunner(create_app(services), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]
            issuer = services.ca_material.cert
            from scepd.ca.ocsp import _issuer_hashes
            name_hash, key_hash = _issuer_hashes(issuer, "sha1")
            bodies = [ocsp.OCSPRequestBuilder().add_certificate_by_hash(
                name_hash, key_hash, int(serials[i % len(serials)], 16) if serials else 1, hashes.SHA1()
            ).build().public_bytes(serialization.Encoding.DER) for i in range(args.requests)]
            latencies: list[float] = []
            deadline = time.monotonic() + args.max_seconds
            queue = iter(bodies)

            async def worker(session: aiohttp.ClientSession) -> None:
                for body in queue:
                    if time.monotonic() > deadline:
                        return
                    t0 = time.perf_counter()
                    async with session.post(f"http://127.0.0.1:{port}/ocsp", data=body) as resp:
                        await resp.read()
                        assert resp.status == 200
                    latencies.append(time.perf_counter() - t0)
            started = time.perf_counter()
            async with aiohttp.ClientSession() as session:
                await asyncio.gather(*(worker(session) for _ in range(args.concurrency)))
            elapsed = time.perf_counter() - started
            await runner.cleanup()
            latencies.sort()
            print(f"OCSP: {len(latencies)} responses in {elapsed:.1f} s = {len(latencies) / elapsed:.0f}/s "
                  f"(concurrency {args.concurrency}); p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
                  f"p99 {latencies[int(len(latencies) * 0.99) - 1] * 1000:.1f} ms")
        finally:
            await services.close()


if __name__ == "__main__":
    asyncio.run(main())
