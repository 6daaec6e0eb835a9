"""Signatures (and RSA key-transport decryptions) per second: a CA key in SoftHSM2 through
scepd.ca.pkcs11 versus the same kind of key as a file (pyca/OpenSSL in process).

    .venv/bin/python bench/hsm_sign.py [--seconds 5] [--threads 1,4]

What the server does per operation: an RSA PKCS#1 v1.5 / ECDSA signature over SHA-256 (a
certificate, a CRL, an OCSP response, a CertRep) and, for SCEP, one RSA decryption. It prints
operations/s and CPU ms per operation of this process (SoftHSM runs in process). A temporary
token is created and deleted; nothing leaves the machine. Bounded in time per case.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import softhsm  # noqa: E402

DATA = os.urandom(600)  # about a TBSCertificate


def ops(key, kind: str):
    if kind == "decrypt":
        ct = key.public_key().encrypt(os.urandom(32), padding.PKCS1v15())
        return lambda: key.decrypt(ct, padding.PKCS1v15())
    if isinstance(key, rsa.RSAPrivateKey):
        return lambda: key.sign(DATA, padding.PKCS1v15(), hashes.SHA256())
    return lambda: key.sign(DATA, ec.ECDSA(hashes.SHA256()))


def measure(op, threads: int, seconds: float) -> tuple[float, float]:
    """(operations/s, process CPU ms per operation), `threads` callers for `seconds`."""
    counts = [0] * threads
    stop_at = time.monotonic() + seconds

    def run(i: int) -> None:
        n = 0
        while time.monotonic() < stop_at and n < 1_000_000:
            op()
            n += 1
        counts[i] = n
    cpu0, t0 = time.process_time(), time.perf_counter()
    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    total = sum(counts)
    return total / elapsed, cpu / max(total, 1) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--threads", default="1,4")
    args = ap.parse_args()
    reason = softhsm.missing()
    if reason:
        sys.exit(f"hsm_sign: {reason}")
    tmp = Path(tempfile.mkdtemp(prefix="scepd-hsm-bench-"))
    try:
        hsm = softhsm.SoftHsm(tmp, ("bench",))
        from scepd.ca import pkcs11 as p11
        cases = [
            ("RSA-2048", lambda: rsa.generate_private_key(65537, 2048),
             lambda: p11.generate_key(hsm.uri("bench", "rsa2048"), "rsa", 2048)),
            ("RSA-3072", lambda: rsa.generate_private_key(65537, 3072),
             lambda: p11.generate_key(hsm.uri("bench", "rsa3072"), "rsa", 3072)),
            ("EC P-256", lambda: ec.generate_private_key(ec.SECP256R1()),
             lambda: p11.generate_key(hsm.uri("bench", "p256"), "ec")),
        ]
        print(f"loadavg {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; {args.seconds:g}s per case")
        print(f"{'key':9} {'operation':8} {'threads':>7} {'file ops/s':>11} {'ms CPU/op':>9} "
              f"{'token ops/s':>12} {'ms CPU/op':>9} {'token/file':>10}")
        for name, file_key, token_key in cases:
            keys = (file_key(), token_key())
            for kind in ("sign", "decrypt") if name.startswith("RSA") else ("sign",):
                for threads in [int(t) for t in args.threads.split(",")]:
                    (f_rate, f_cpu), (t_rate, t_cpu) = (measure(ops(k, kind), threads, args.seconds)
                                                        for k in keys)
                    print(f"{name:9} {kind:8} {threads:>7} {f_rate:>11.0f} {f_cpu:>9.2f} {t_rate:>12.0f} "
                          f"{t_cpu:>9.2f} {t_rate / f_rate:>10.2f}", flush=True)
        hsm.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
