"""Plumbing shared by the harnesses: the seed corpus, the crash rule, atheris start-up.

A harness module defines `NAME`, `seeds()` (bytes made at start: from the shared SCEP vectors
and from keys generated on the spot) and `TestOneInput(data)`. TestOneInput swallows only the
exceptions the target documents (the ScepdError hierarchy, plus what the function says); any
other exception propagates and atheris reports it as a crash, with the input saved as
`crash-<sha1>` in the working directory.

FUZZ_TOLERATE=RecursionError (a comma-separated list of builtin exception names) tolerates a
known crash class during long runs, so that one known bug does not stop the search for others.
Nothing tolerates it by default: tests/test_fuzz_short.py sees it as a crash.
"""
from __future__ import annotations

import builtins
import hashlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VECTORS = Path(os.environ.get("SCEPD_VECTORS") or REPO.parent / "shared" / "vectors" / "scep")
CORPUS = REPO / "fuzz" / "corpus"
WORK = REPO / "fuzz" / "work"


def _tolerated() -> tuple[type[BaseException], ...]:
    names = [n.strip() for n in os.environ.get("FUZZ_TOLERATE", "").split(",") if n.strip()]
    out = []
    for n in names:
        cls = getattr(builtins, n, None)
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise SystemExit(f"FUZZ_TOLERATE: {n!r} is not a builtin exception")
        out.append(cls)
    return tuple(out)


#: Known crash classes tolerated in this run (empty unless FUZZ_TOLERATE says otherwise).
TOLERATED = _tolerated()


def vector(name: str) -> bytes:
    path = VECTORS / name
    if not path.exists():
        raise SystemExit(f"SCEP vectors not found at {VECTORS}: set SCEPD_VECTORS or put shared/ beside the repo")
    return path.read_bytes()


def vector_ders() -> list[Path]:
    """The captured PKIMessages (and the one captured CertRep), sorted by name."""
    if not VECTORS.is_dir():
        raise SystemExit(f"SCEP vectors not found at {VECTORS}: set SCEPD_VECTORS or put shared/ beside the repo")
    return sorted(p for p in VECTORS.glob("*.der") if p.name != "getcacert-ca.der")


def write_seeds(directory: Path, seeds) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    n = 0
    for s in seeds:
        (directory / f"seed-{hashlib.sha1(s).hexdigest()}").write_bytes(s)
        n += 1
    return n


def main(name: str, test_one_input, seeds, dictionary: str | None = None) -> None:
    """atheris entry point. Corpus directories given on the command line are used as they are;
    without any, fuzz/work/<name> (generated seeds and new finds, not committed) and
    fuzz/corpus/<name> (committed seeds, read only) are used. Generated seeds go into the
    first directory. libFuzzer flags (-runs=N, -seed=S, -max_total_time=T) pass through. `dictionary`, a file
    in fuzz/, is passed as -dict unless the command line gives one."""
    import atheris

    args = list(sys.argv)
    inputs = [a for a in args[1:] if not a.startswith("-")]
    if not inputs:
        inputs = [str(WORK / name)]
        if (CORPUS / name).is_dir():
            inputs.append(str(CORPUS / name))
        args += inputs
    if dictionary and not any(a.startswith("-dict=") for a in args):
        args.append(f"-dict={REPO / 'fuzz' / dictionary}")
    first = Path(inputs[0])
    if not first.is_file():  # a directory (or a new one): a corpus, not a single input to replay
        write_seeds(first, seeds())
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


#: strings a structured JSON value is drawn from (ACME/JOSE names and values, edge cases)
JSON_WORDS = ["alg", "jwk", "kid", "nonce", "url", "kty", "crv", "x", "y", "n", "e", "d", "k", "EC", "RSA", "OKP",
              "oct", "P-256", "P-384", "P-521", "Ed25519", "RS256", "ES256", "ES384", "ES512", "EdDSA", "HS256",
              "none", "AQAB", "", "mailto:a@example.com", "deactivated", "valid", "dns", "ip", "a.example",
              "*.a.example", "192.0.2.1", "::1", "server", "agent", "2026-11-27T12:00:00Z",
              "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "https://127.0.0.1/acme/acct/abc",
              "contact", "status", "identifiers", "type", "value", "profile", "notBefore", "notAfter",
              "replaces", "csr", "certificate", "reason", "account", "oldKey", "onlyReturnExisting",
              "externalAccountBinding", "protected", "payload", "signature", "termsOfServiceAgreed"]


def json_value(fdp, depth: int = 0):
    """A JSON value of any type drawn from an atheris FuzzedDataProvider: the structure-aware
    half of the JSON harnesses (type confusion is what byte mutations of JSON text rarely reach)."""
    kind = fdp.ConsumeIntInRange(0, 9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 9))
    if kind == 3:
        return fdp.ConsumeRegularFloat()
    if kind in (4, 5):
        return JSON_WORDS[fdp.ConsumeIntInRange(0, len(JSON_WORDS) - 1)]
    if kind == 6:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
    if kind == 7:
        return [json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    return json_object(fdp, depth + 1)


def json_object(fdp, depth: int = 0) -> dict:
    return {JSON_WORDS[fdp.ConsumeIntInRange(0, len(JSON_WORDS) - 1)]: json_value(fdp, depth)
            for _ in range(fdp.ConsumeIntInRange(0, 6))}
