"""Rate limits: token buckets in memory, keyed by (limit name, key). Protocol-neutral.

Each limit is a `Rate`: `count` tokens per `period`, at most `burst` stored. Request-counting
limits (ACME newNonce, newAccount, newOrder) `acquire` a token per request; failure-counting
limits (failed SCEP enrollments, failed ACME validations) `ensure` a token is left before the
work and `spend` one after a failure, so the refused answers themselves do not keep a client
locked out. Time comes from the injected Clock; a fixed clock never refills.

Memory is bounded: each limit keeps at most `max_keys` buckets, least recently used first out,
and buckets that have refilled to `burst` (the same as no bucket) are dropped as they age out.
A key whose bucket is evicted starts again with a full bucket: under a flood of more distinct
keys than `max_keys` the limit weakens for the longest-idle keys, memory never grows.
"""
from __future__ import annotations

import math
import re
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from ..clock import Clock, SystemClock
from ..config import ConfigError
from ..errors import RateLimited

SCEP_FAILURES_PER_ADDRESS = "scep_failures_per_address"
SCEP_FAILURES_PER_TRANSACTION = "scep_failures_per_transaction"
EST_FAILURES_PER_ADDRESS = "est_failures_per_address"
ACME_NEW_ACCOUNTS_PER_ADDRESS = "acme_new_accounts_per_address"
ACME_NEW_ORDERS_PER_ACCOUNT = "acme_new_orders_per_account"
ACME_FAILED_VALIDATIONS_PER_ACCOUNT = "acme_failed_validations_per_account"
ACME_NEW_NONCES_PER_ADDRESS = "acme_new_nonces_per_address"

#: name -> what the client is told it did too often. The names are the keys of [limits]
#: (defaults in scepd/config.py) and the `limit` label of scepd_rate_limited_total.
LIMITS: dict[str, str] = {
    SCEP_FAILURES_PER_ADDRESS: "too many failed enrollment attempts from this address",
    SCEP_FAILURES_PER_TRANSACTION: "too many failed attempts for this transactionID",
    EST_FAILURES_PER_ADDRESS: "too many failed enrollment attempts from this address",
    ACME_NEW_ACCOUNTS_PER_ADDRESS: "too many new accounts from this address",
    ACME_NEW_ORDERS_PER_ACCOUNT: "too many new orders for this account",
    ACME_FAILED_VALIDATIONS_PER_ACCOUNT: "too many failed validations for this account",
    ACME_NEW_NONCES_PER_ADDRESS: "too many new nonces from this address",
}

#: transaction IDs and account ids are client-chosen or long; a key never holds more than this
MAX_KEY_CHARS = 128

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([smhdw])\s*(?:,?\s*burst\s*(\d+))?\s*$", re.IGNORECASE)
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True)
class Rate:
    count: int
    period: float  # seconds
    burst: int

    @property
    def per_second(self) -> float:
        return self.count / self.period

    @classmethod
    def parse(cls, text: str) -> "Rate | None":
        """'10/1m burst 20', '100/s', '300/1h, burst 50'; '0', 'off' or '' disables (None).
        Without `burst`, the bucket holds `count` tokens."""
        if text.strip().lower() in ("", "0", "off", "none"):
            return None
        m = _RATE.match(text)
        if not m:
            raise ValueError(f"not a rate: {text!r} (use e.g. '10/1m burst 20', or 0 to disable)")
        count, periods, unit, burst = int(m.group(1)), int(m.group(2) or 1), m.group(3).lower(), m.group(4)
        if count == 0 or periods == 0:
            return None
        burst_n = int(burst) if burst is not None else count
        if burst_n < 1:
            raise ValueError(f"burst must be at least 1: {text!r}")
        return cls(count, float(periods * _UNIT[unit]), burst_n)


class TokenBucket:
    """`tokens` as of `stamp` (seconds); refilled lazily when looked at."""

    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float):
        self.tokens = tokens
        self.stamp = stamp

    def refill(self, per_second: float, burst: float, now: float) -> float:
        if now > self.stamp:
            tokens = self.tokens + (now - self.stamp) * per_second
            self.tokens = tokens if tokens < burst else burst
            self.stamp = now
        return self.tokens


class _Limit:
    """The buckets of one limit: an LRU map key -> TokenBucket of bounded size."""

    __slots__ = ("name", "rate", "per_second", "burst", "detail", "buckets", "max_keys")

    def __init__(self, name: str, rate: Rate, detail: str, max_keys: int):
        self.name, self.rate, self.detail, self.max_keys = name, rate, detail, max_keys
        self.per_second, self.burst = rate.per_second, float(rate.burst)
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def bucket(self, key: str, now: float) -> TokenBucket:
        buckets = self.buckets
        b = buckets.get(key)
        if b is not None:
            buckets.move_to_end(key)
            b.refill(self.per_second, self.burst, now)
            return b
        # drop up to two idle buckets that have refilled (amortized: at most what was added)
        for _ in range(2):
            if not buckets:
                break
            oldest_key, oldest = next(iter(buckets.items()))
            if oldest.refill(self.per_second, self.burst, now) < self.burst:
                break
            del buckets[oldest_key]
        while len(buckets) >= self.max_keys:
            buckets.popitem(last=False)
        b = buckets[key] = TokenBucket(self.burst, now)
        return b

    def wait(self, tokens: float) -> float:
        """Seconds until a bucket holding `tokens` holds one."""
        return (1.0 - tokens) / self.per_second


class RateLimiter:
    """Every limit of the server. A limit that is not configured (or disabled) always allows.
    Thread-safe: one lock around each check's bucket arithmetic (SCEP's gate runs in the
    worker thread that decodes a message, its `spend` on the event loop)."""

    def __init__(self, rates: dict[str, Rate | None], clock: Clock, max_keys: int = 10_000):
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        unknown = set(rates) - set(LIMITS)
        if unknown:
            raise ValueError(f"unknown rate limits: {sorted(unknown)}")
        self.clock = clock
        # the system clock gives POSIX seconds without building a datetime (about 0.2 instead of
        # 1.2 µs a read on the development machine, bench/ratelimit.py)
        self._now = getattr(clock, "timestamp", None) or (lambda: clock.now().timestamp())
        self._limits = {name: _Limit(name, rate, LIMITS[name], max_keys)
                        for name, rate in rates.items() if rate is not None}
        #: called with the limit name whenever a request is refused (metrics)
        self.listeners: list[Callable[[str], None]] = []
        self._lock = threading.Lock()

    @classmethod
    def disabled(cls, clock: Clock | None = None) -> "RateLimiter":
        return cls({}, clock or SystemClock())

    @classmethod
    def from_config(cls, section, clock: Clock) -> "RateLimiter":
        """From a LimitsConfig ([limits]); ConfigError names the bad key."""
        if not section.enabled:
            return cls({}, clock)
        rates = {}
        for name in LIMITS:
            try:
                rates[name] = Rate.parse(getattr(section, name))
            except ValueError as err:
                raise ConfigError(f"[limits] {name}: {err}") from None
        if section.max_keys < 1:
            raise ConfigError("[limits] max_keys must be at least 1")
        return cls(rates, clock, section.max_keys)

    def names(self) -> list[str]:
        """The enabled limits."""
        return list(self._limits)

    def enabled(self, name: str) -> bool:
        return name in self._limits

    def rate(self, name: str) -> Rate | None:
        limit = self._limits.get(name)
        return limit.rate if limit is not None else None

    def tracked(self, name: str) -> int:
        limit = self._limits.get(name)
        return len(limit.buckets) if limit is not None else 0

    # --- the checks -------------------------------------------------------------------------

    def acquire(self, name: str, key: str) -> None:
        """Take one token, or raise RateLimited (nothing taken) with the seconds to wait."""
        limit = self._limits.get(name)
        if limit is None:
            return
        with self._lock:
            b = limit.bucket(key[:MAX_KEY_CHARS], self._now())
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return
            tokens = b.tokens
        self._refuse(limit, tokens)

    def ensure(self, name: str, key: str) -> None:
        """Raise RateLimited if no token is left; take nothing (failures are `spend`-ed later)."""
        limit = self._limits.get(name)
        if limit is None:
            return
        b = limit.buckets.get(key[:MAX_KEY_CHARS])
        if b is None:  # never failed (or long idle): a full bucket, nothing to store
            return
        with self._lock:
            tokens = b.refill(limit.per_second, limit.burst, self._now())
        if tokens < 1.0:
            self._refuse(limit, tokens)

    def spend(self, name: str, key: str) -> None:
        """Record one failure: one token less (never below zero)."""
        limit = self._limits.get(name)
        if limit is None:
            return
        with self._lock:
            b = limit.bucket(key[:MAX_KEY_CHARS], self._now())
            b.tokens = max(0.0, b.tokens - 1.0)

    def refund(self, name: str, key: str) -> None:
        """Give back the token of an `acquire` whose request did not count after all."""
        limit = self._limits.get(name)
        if limit is None:
            return
        with self._lock:
            b = limit.buckets.get(key[:MAX_KEY_CHARS])
            if b is not None:
                b.tokens = min(limit.burst, b.tokens + 1.0)

    def _refuse(self, limit: _Limit, tokens: float) -> None:
        for listener in self.listeners:
            listener(limit.name)
        retry_after = max(1, math.ceil(limit.wait(tokens)))
        raise RateLimited(f"{limit.detail}; retry in {retry_after} s", retry_after, limit.name)


def address_key(remote: str | None) -> str:
    """The key of a peer address: IPv4 as is, IPv6 by its /64 (one host usually holds a whole
    /64, so single IPv6 addresses are free to cycle through). Behind a reverse proxy every
    client is the proxy: the limits apply to all of them together."""
    if not remote:
        return "?"
    if ":" not in remote:
        return remote
    try:
        packed = socket.inet_pton(socket.AF_INET6, remote.split("%", 1)[0])
    except (OSError, ValueError):
        return remote[:MAX_KEY_CHARS]
    if packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


_V4_MAPPED = bytes(10) + b"\xff\xff"
