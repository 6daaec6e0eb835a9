"""Renewal timing: pure functions of (certificate lifetime, now, policy, ARI window, randomness).

Nothing here reads a clock, sleeps or draws random numbers: callers pass `now` and a number
`rand` in [0, 1). That is what lets the tests walk a certificate's whole life instant by instant.

The rule (stated once, shown by `scepd-agent status`):
  * renewal is due at the EARLIER of
      - not_after - renew_before                  (absolute rule, e.g. 5 days before expiry), and
      - not_after - fraction * lifetime           (fraction rule, lifetime = not_after - not_before,
                                                   e.g. 0.33: when a third of the lifetime is left);
    a rule that is not configured does not take part; with neither configured both defaults apply
    (5 days, 0.33), so a 90-day certificate renews 30 days before expiry and a 1-day one at 8 hours;
  * when the server offers an ACME renewal window (ARI, RFC 9773) renewal is due at a random
    instant inside that window (spreading a fleet's load as the RFC asks), never after its end
    and never after the threshold rule says;
  * the daemon wakes every `interval` with +-10% jitter, and earlier when the due time falls
    before the next wake-up; after a failure it retries with exponential backoff (30 s, 60 s, ...)
    jittered, capped at the interval, and never sleeps past expiry.
"""
from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

DEFAULT_INTERVAL = dt.timedelta(minutes=20)
DEFAULT_RENEW_BEFORE = dt.timedelta(days=5)
DEFAULT_FRACTION = 0.33
BACKOFF_BASE = dt.timedelta(seconds=30)
JITTER = 0.10  # +-10% of the interval


@dataclass(frozen=True)
class Policy:
    interval: dt.timedelta = DEFAULT_INTERVAL
    renew_before: dt.timedelta | None = DEFAULT_RENEW_BEFORE
    renew_at_fraction: float | None = DEFAULT_FRACTION

    def __post_init__(self) -> None:
        if self.interval <= dt.timedelta(0):
            raise ValueError("the check interval must be positive")
        if self.renew_before is not None and self.renew_before < dt.timedelta(0):
            raise ValueError("renew-before must not be negative")
        if self.renew_at_fraction is not None and not 0.0 <= self.renew_at_fraction < 1.0:
            raise ValueError("renew-at-fraction must be in [0, 1)")
        if self.renew_before is None and self.renew_at_fraction is None:
            raise ValueError("at least one renewal rule is needed")

    @classmethod
    def from_options(cls, interval: dt.timedelta | None, renew_before: dt.timedelta | None,
                     renew_at_fraction: float | None) -> "Policy":
        """Only the rules given take part; none given: both defaults."""
        if renew_before is None and renew_at_fraction is None:
            renew_before, renew_at_fraction = DEFAULT_RENEW_BEFORE, DEFAULT_FRACTION
        return cls(interval or DEFAULT_INTERVAL, renew_before, renew_at_fraction)


@dataclass(frozen=True)
class Lifetime:
    """The two dates of a certificate that matter here."""

    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def length(self) -> dt.timedelta:
        return self.not_after - self.not_before


@dataclass(frozen=True)
class RenewalWindow:
    """ACME Renewal Information (RFC 9773 suggestedWindow)."""

    start: dt.datetime
    end: dt.datetime


def threshold_due(life: Lifetime, policy: Policy) -> dt.datetime:
    """The earlier of the configured rules."""
    candidates = []
    if policy.renew_before is not None:
        candidates.append(life.not_after - policy.renew_before)
    if policy.renew_at_fraction is not None:
        candidates.append(life.not_after - life.length * policy.renew_at_fraction)
    return max(min(candidates), life.not_before)


def renewal_due_at(life: Lifetime, policy: Policy, ari: RenewalWindow | None = None,
                   rand: float = 0.0) -> dt.datetime:
    due = threshold_due(life, policy)
    if ari is not None and ari.start <= ari.end:
        point = ari.start + (ari.end - ari.start) * rand
        due = min(due, point)
    return due


class Action(enum.Enum):
    WAIT = "wait"  # nothing to do until next_check
    RENEW = "renew"  # authenticated by the current certificate
    REENROLL = "reenroll"  # expired (or missing): a challenge/token is configured
    STUCK = "stuck"  # expired or missing and nothing can authenticate a new request


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    due_at: dt.datetime | None
    time_left: dt.timedelta | None


def decide(now: dt.datetime, life: Lifetime | None, policy: Policy, *, can_reenroll: bool,
           ari: RenewalWindow | None = None, rand: float = 0.0, force: bool = False) -> Decision:
    if life is None:
        if can_reenroll:
            return Decision(Action.REENROLL, "no certificate installed: enrolling with the configured challenge",
                            None, None)
        return Decision(Action.STUCK, "no certificate installed and no challenge configured", None, None)
    left = life.not_after - now
    due = renewal_due_at(life, policy, ari, rand)
    if left <= dt.timedelta(0):
        if can_reenroll:
            return Decision(Action.REENROLL, f"certificate expired at {life.not_after:%Y-%m-%dT%H:%M:%SZ}: "
                            "re-enrolling with the configured challenge", due, left)
        return Decision(Action.STUCK, f"certificate EXPIRED at {life.not_after:%Y-%m-%dT%H:%M:%SZ} and no "
                        "challenge is configured: enroll again (scepd-agent enroll)", due, left)
    if force:
        return Decision(Action.RENEW, "renewal forced", due, left)
    if now >= due:
        return Decision(Action.RENEW, f"due since {due:%Y-%m-%dT%H:%M:%SZ} ({_human(left)} left)", due, left)
    return Decision(Action.WAIT, f"not due until {due:%Y-%m-%dT%H:%M:%SZ} ({_human(left)} left)", due, left)


def next_check(now: dt.datetime, policy: Policy, due_at: dt.datetime | None, rand: float) -> dt.datetime:
    """The next wake-up after a successful check: interval +-10%, or the due time if sooner."""
    wake = now + policy.interval * (1.0 + JITTER * (2.0 * rand - 1.0))
    if due_at is not None and now < due_at < wake:
        wake = due_at
    return wake


def backoff_delay(failures: int, policy: Policy, rand: float) -> dt.timedelta:
    """Delay before retry number `failures` (1 = after the first failure): 30 s doubling,
    jittered to 50-100 %, capped at the interval."""
    if failures < 1:
        return dt.timedelta(0)
    exp = BACKOFF_BASE * (2 ** min(failures - 1, 30))
    base = min(exp, policy.interval)
    return base * (0.5 + 0.5 * rand)


def retry_at(now: dt.datetime, failures: int, policy: Policy, rand: float,
             not_after: dt.datetime | None) -> tuple[dt.datetime, bool]:
    """(when to retry, True if the retry had to be pulled in before expiry — log loudly)."""
    at = now + backoff_delay(failures, policy, rand)
    if not_after is not None and now < not_after <= at:
        return max(now, not_after - dt.timedelta(seconds=1)), True
    return at, False


def _human(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{sign}{days}d{hours}h"
    if hours:
        return f"{sign}{hours}h{minutes}m"
    if minutes:
        return f"{sign}{minutes}m{secs}s"
    return f"{sign}{secs}s"


human = _human
