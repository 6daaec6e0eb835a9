"""Injected time. Core code never reads the wall clock directly: it asks a Clock."""
from __future__ import annotations

import datetime as dt
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """An aware UTC datetime."""


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)

    def timestamp(self) -> float:
        """now() as POSIX seconds, without building a datetime (hot paths: rate limits)."""
        return time.time()


class FixedClock:
    """A clock for tests: stands still until moved."""

    def __init__(self, at: dt.datetime):
        if at.tzinfo is None:
            raise ValueError("FixedClock needs an aware datetime")
        self._at = at

    def now(self) -> dt.datetime:
        return self._at

    def advance(self, delta: dt.timedelta) -> None:
        self._at += delta

    def set(self, at: dt.datetime) -> None:
        self._at = at
