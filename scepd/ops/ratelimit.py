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

With `serve --workers N` the buckets are shared by the workers (`share_across_processes`, called
by the parent before it forks them): a fixed table per limit in anonymous shared memory, each
check one read-modify-write under a POSIX record lock (released by the kernel if a worker dies
holding it), so a limit is the configured one whichever worker a client reaches. The table has
room for `max_keys` keys of each limit as configured at start (open addressing, 16 slots a key
may use; the least recently refilled of them is evicted when all 16 are taken).
"""
from __future__ import annotations

import fcntl
import math
import mmap
import os
import re
import socket
import struct
import tempfile
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


class SharedBuckets:
    """Token buckets of every limit in one anonymous shared mapping, inherited by forked workers.

    Per limit, a table of `slots` entries (hash of the key, tokens, stamp); a key lives in one of
    PROBE consecutive entries from its hash. The key's hash is Python's str hash, salted per
    server start and the same in every worker forked from the parent. Every operation runs under
    a lockf lock on an unlinked file (between processes; the kernel drops it with its process) and
    a threading lock (between the threads of one process)."""

    PROBE = 16
    _ENTRY = struct.Struct("<qdd")  # hash (0: empty), tokens, stamp

    def __init__(self, max_keys: int, names=None):
        self.names = list(names or LIMITS)
        slots = 1
        while slots < max(2 * max_keys, self.PROBE):
            slots *= 2
        self.slots = slots
        self.max_keys = max_keys
        self._size = slots * self._ENTRY.size
        self.mem = mmap.mmap(-1, self._size * len(self.names), flags=mmap.MAP_SHARED)
        self._base = {name: i * self._size for i, name in enumerate(self.names)}
        fd, path = tempfile.mkstemp(prefix="scepd-limits-")
        os.unlink(path)
        self._fd = fd
        self._thread_lock = threading.Lock()

    def __enter__(self):
        self._thread_lock.acquire()
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def _positions(self, name: str, key: str):
        h = hash(key) or 1
        base, mask, size = self._base[name], self.slots - 1, self._ENTRY.size
        return h, [base + ((h + i) & mask) * size for i in range(self.PROBE)]

    def find(self, name: str, key: str) -> tuple[int, float, float] | None:
        """(offset, tokens, stamp) of the key's entry, or None; call inside `with self`."""
        h, positions = self._positions(name, key)
        unpack = self._ENTRY.unpack_from
        for pos in positions:
            eh, tokens, stamp = unpack(self.mem, pos)
            if eh == h:
                return pos, tokens, stamp
        return None

    def place(self, name: str, key: str, per_second: float, burst: float, now: float) -> int:
        """The offset of a new entry for the key (full bucket as of now), taking an empty entry,
        else one that has refilled to `burst` (the same as none), else the least recently
        refilled; call inside `with self`, after `find` returned None."""
        h, positions = self._positions(name, key)
        unpack = self._ENTRY.unpack_from
        victim, oldest = positions[0], None
        for pos in positions:
            eh, tokens, stamp = unpack(self.mem, pos)
            if eh == 0 or tokens + max(0.0, now - stamp) * per_second >= burst:
                victim = pos
                break
            if oldest is None or stamp < oldest:
                victim, oldest = pos, stamp
        self._ENTRY.pack_into(self.mem, victim, h, burst, now)
        return victim

    def store(self, pos: int, key: str, tokens: float, stamp: float) -> None:
        self._ENTRY.pack_into(self.mem, pos, hash(key) or 1, tokens, stamp)

    def tracked(self, name: str) -> int:
        base, size = self._base[name], self._ENTRY.size
        with self:
            return sum(1 for i in range(self.slots) if self._ENTRY.unpack_from(self.mem, base + i * size)[0])


#: set in the parent of `serve --workers N` before the workers are forked (see the module text)
_shared: SharedBuckets | None = None


def share_across_processes(max_keys: int) -> SharedBuckets:
    """Called once by the parent, before forking: every RateLimiter made afterwards in this
    process or its children keeps its buckets in one shared table."""
    global _shared
    if _shared is None:
        _shared = SharedBuckets(max_keys)
    return _shared


class _SharedLimit:
    """One limit's buckets in the SharedBuckets table: the operations RateLimiter needs, each one
    read-modify-write under the table's lock."""

    __slots__ = ("name", "rate", "per_second", "burst", "detail", "table")

    def __init__(self, name: str, rate: Rate, detail: str, table: SharedBuckets):
        self.name, self.rate, self.detail, self.table = name, rate, detail, table
        self.per_second, self.burst = rate.per_second, float(rate.burst)

    def _refilled(self, tokens: float, stamp: float, now: float) -> tuple[float, float]:
        if now > stamp:
            tokens = min(self.burst, tokens + (now - stamp) * self.per_second)
            stamp = now
        return tokens, stamp

    def _bucket(self, key: str, now: float) -> tuple[int, float, float]:
        """(offset, tokens, stamp) of the key's bucket refilled to `now`, a new full one if it
        has none; call inside `with self.table`."""
        t = self.table
        found = t.find(self.name, key)
        if found is None:
            return t.place(self.name, key, self.per_second, self.burst, now), self.burst, now
        pos, tokens, stamp = found
        return (pos, *self._refilled(tokens, stamp, now))

    def take(self, key: str, now: float) -> float | None:
        """acquire: None if a token was taken, else the tokens left (nothing taken)."""
        t = self.table
        with t:
            pos, tokens, stamp = self._bucket(key, now)
            if tokens >= 1.0:
                t.store(pos, key, tokens - 1.0, stamp)
                return None
            t.store(pos, key, tokens, stamp)
            return tokens

    def left(self, key: str, now: float) -> float | None:
        """ensure: the tokens left, or None if the key has no bucket (a full one)."""
        t = self.table
        with t:
            found = t.find(self.name, key)
        if found is None:
            return None
        return self._refilled(found[1], found[2], now)[0]

    def spend(self, key: str, now: float) -> None:
        t = self.table
        with t:
            pos, tokens, stamp = self._bucket(key, now)
            t.store(pos, key, max(0.0, tokens - 1.0), stamp)

    def refund(self, key: str) -> None:
        t = self.table
        with t:
            found = t.find(self.name, key)
            if found is not None:
                t.store(found[0], key, min(self.burst, found[1] + 1.0), found[2])

    def wait(self, tokens: float) -> float:
        return (1.0 - tokens) / self.per_second


class _Limit:
    """The buckets of one limit: an LRU map key -> TokenBucket of bounded size. Thread-safe: the
    RateLimiter operations below hold a lock around their bucket arithmetic (SCEP's gate runs in
    the worker thread that decodes a message, its `spend` on the event loop)."""

    __slots__ = ("name", "rate", "per_second", "burst", "detail", "buckets", "max_keys", "lock")

    def __init__(self, name: str, rate: Rate, detail: str, max_keys: int):
        self.name, self.rate, self.detail, self.max_keys = name, rate, detail, max_keys
        self.per_second, self.burst = rate.per_second, float(rate.burst)
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.lock = threading.Lock()

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

    # the operations of RateLimiter (the same as _SharedLimit's)
    def take(self, key: str, now: float) -> float | None:
        with self.lock:
            b = self.bucket(key, now)
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return None
            return b.tokens

    def left(self, key: str, now: float) -> float | None:
        with self.lock:
            b = self.buckets.get(key)
            return None if b is None else b.refill(self.per_second, self.burst, now)

    def spend(self, key: str, now: float) -> None:
        with self.lock:
            b = self.bucket(key, now)
            b.tokens = max(0.0, b.tokens - 1.0)

    def refund(self, key: str) -> None:
        with self.lock:
            b = self.buckets.get(key)
            if b is not None:
                b.tokens = min(self.burst, b.tokens + 1.0)


class RateLimiter:
    """Every limit of the server. A limit that is not configured (or disabled) always allows."""

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
        shared = _shared  # `serve --workers N`: one table for every worker
        self.shared = shared is not None
        self._limits: dict[str, _Limit | _SharedLimit] = {
            name: (_SharedLimit(name, rate, LIMITS[name], shared) if shared is not None
                   else _Limit(name, rate, LIMITS[name], max_keys))
            for name, rate in rates.items() if rate is not None}
        #: called with the limit name whenever a request is refused (metrics)
        self.listeners: list[Callable[[str], None]] = []

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
        if limit is None:
            return 0
        return limit.table.tracked(name) if isinstance(limit, _SharedLimit) else len(limit.buckets)

    # --- the checks -------------------------------------------------------------------------

    def acquire(self, name: str, key: str) -> None:
        """Take one token, or raise RateLimited (nothing taken) with the seconds to wait."""
        limit = self._limits.get(name)
        if limit is None:
            return
        tokens = limit.take(key[:MAX_KEY_CHARS], self._now())
        if tokens is not None:
            self._refuse(limit, tokens)

    def ensure(self, name: str, key: str) -> None:
        """Raise RateLimited if no token is left; take nothing (failures are `spend`-ed later).
        A key never seen (or long idle) has a full bucket: nothing is stored."""
        limit = self._limits.get(name)
        if limit is None:
            return
        tokens = limit.left(key[:MAX_KEY_CHARS], self._now())
        if tokens is not None and tokens < 1.0:
            self._refuse(limit, tokens)

    def allows(self, name: str, key: str) -> bool:
        """Whether `ensure` would pass now: no exception, no listener told, nothing taken."""
        limit = self._limits.get(name)
        if limit is None:
            return True
        tokens = limit.left(key[:MAX_KEY_CHARS], self._now())
        return tokens is None or tokens >= 1.0

    def spend(self, name: str, key: str) -> None:
        """Record one failure: one token less (never below zero)."""
        limit = self._limits.get(name)
        if limit is not None:
            limit.spend(key[:MAX_KEY_CHARS], self._now())

    def refund(self, name: str, key: str) -> None:
        """Give back the token of an `acquire` whose request did not count after all."""
        limit = self._limits.get(name)
        if limit is not None:
            limit.refund(key[:MAX_KEY_CHARS])

    def _refuse(self, limit: "_Limit | _SharedLimit", tokens: float) -> None:
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
