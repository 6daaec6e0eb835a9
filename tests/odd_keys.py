"""Keys outside the key limits, made cheaply: RSA keys with any public exponent (from the primes
of an ordinary key) and RSA "public keys" with a modulus of any size that is no real key at all
(a key refused before verification needn't be one)."""
from __future__ import annotations

import functools
import math
import random

from cryptography.hazmat.primitives.asymmetric import rsa

from .helpers import rsa_key


@functools.lru_cache(maxsize=None)
def rsa_with_exponent(e: int, bits: int = 2048) -> rsa.RSAPrivateKey:
    """A working RSA private key with public exponent `e` (odd; gcd(e, phi) = 1 is searched over
    a bounded number of fresh keys: for e = 3 one key in four qualifies, so 64 tries fail with
    probability (3/4)^64, about 1e-8 -- ten tries failed one CI run in eighteen)."""
    if e == 3:
        return rsa.generate_private_key(public_exponent=3, key_size=bits)
    for index in range(100, 164):
        base = rsa_key(index, bits).private_numbers()
        p, q = base.p, base.q
        phi = (p - 1) * (q - 1)
        if math.gcd(e, phi) != 1:
            continue
        d = pow(e, -1, phi)
        return rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                     rsa.RSAPublicNumbers(e, p * q)).private_key()
    raise AssertionError(f"no key found for e={e}")


def huge_exponent(bits: int = 2000) -> int:
    """An odd exponent of `bits` bits (deterministic)."""
    return random.Random(bits).getrandbits(bits) | (1 << (bits - 1)) | 1


def fake_rsa_public_key(bits: int, e: int = 65537) -> rsa.RSAPublicKey:
    """An RSA public key with an odd `bits`-bit modulus that nobody can sign with."""
    n = random.Random(bits).getrandbits(bits) | (1 << (bits - 1)) | 1
    return rsa.RSAPublicNumbers(e, n).public_key()
