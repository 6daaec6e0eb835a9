"""Renewal timing is a pure function: walked instant by instant, no clock, no sleeping."""
from __future__ import annotations

import datetime as dt

import pytest

from agent import schedule
from agent.schedule import Action, Lifetime, Policy, RenewalWindow

T0 = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.timezone.utc)
MIN = dt.timedelta(minutes=1)
DAY = dt.timedelta(days=1)


def life(days: float = 90, backdate: dt.timedelta = dt.timedelta(minutes=5)) -> Lifetime:
    """As scepd issues them: notBefore back-dated 5 minutes."""
    return Lifetime(T0 - backdate, T0 + dt.timedelta(days=days))


def test_defaults_are_the_earlier_of_5_days_and_a_third_of_the_lifetime():
    p = Policy.from_options(None, None, None)
    assert p.interval == dt.timedelta(minutes=20)
    assert (p.renew_before, p.renew_at_fraction) == (dt.timedelta(days=5), 0.33)
    l90 = life(90)
    # a third of 90 days (plus 5 minutes of back-dating) is earlier than 5 days before expiry
    assert schedule.threshold_due(l90, p) == l90.not_after - l90.length * 0.33
    assert l90.not_after - schedule.threshold_due(l90, p) > dt.timedelta(days=29)
    # for a 7-day certificate 5 days before expiry is the earlier one
    l7 = life(7)
    assert schedule.threshold_due(l7, p) == l7.not_after - 5 * DAY


def test_only_the_rules_given_take_part():
    l3 = Lifetime(T0 - 5 * MIN, T0 + 3 * MIN)  # a 3-minute certificate, really 8 minutes long
    absolute = Policy.from_options(dt.timedelta(seconds=10), MIN, None)
    assert absolute.renew_at_fraction is None
    assert schedule.threshold_due(l3, absolute) == T0 + 2 * MIN
    fraction = Policy.from_options(None, None, 0.25)
    assert fraction.renew_before is None
    # the fraction counts the real lifetime notAfter - notBefore (8 minutes), not the 3 asked for
    assert schedule.threshold_due(l3, fraction) == l3.not_after - 2 * MIN
    both = Policy.from_options(None, 30 * dt.timedelta(seconds=1), 0.25)
    assert schedule.threshold_due(l3, both) == l3.not_after - 2 * MIN  # the earlier of the two


def test_due_never_before_not_before():
    p = Policy.from_options(None, dt.timedelta(days=365), None)
    assert schedule.threshold_due(life(90), p) == life(90).not_before


@pytest.mark.parametrize("bad", [
    dict(interval=dt.timedelta(0)), dict(renew_before=-MIN), dict(renew_at_fraction=1.0),
    dict(renew_at_fraction=-0.1), dict(renew_before=None, renew_at_fraction=None)])
def test_policy_validation(bad):
    with pytest.raises(ValueError):
        Policy(**bad)


def test_walk_a_whole_lifetime_minute_by_minute():
    l3 = Lifetime(T0 - 5 * MIN, T0 + 3 * MIN)
    p = Policy.from_options(dt.timedelta(seconds=10), MIN, None)
    seen = []
    for i in range(-6 * 60, 5 * 60):  # every second from before notBefore to 2 minutes after expiry
        now = T0 + dt.timedelta(seconds=i)
        d = schedule.decide(now, l3, p, can_reenroll=False)
        seen.append(d.action)
        if now < T0 + 2 * MIN:
            assert d.action is Action.WAIT, now
        elif now < l3.not_after:
            assert d.action is Action.RENEW, now
        else:
            assert d.action is Action.STUCK and "EXPIRED" in d.reason
        assert d.due_at == T0 + 2 * MIN
    # monotone: wait..., renew..., stuck...
    order = [a for i, a in enumerate(seen) if i == 0 or seen[i - 1] is not a]
    assert order == [Action.WAIT, Action.RENEW, Action.STUCK]


def test_expired_reenrolls_only_with_a_challenge():
    l3 = Lifetime(T0 - 5 * MIN, T0 + 3 * MIN)
    p = Policy.from_options(None, MIN, None)
    after = T0 + 4 * MIN
    assert schedule.decide(after, l3, p, can_reenroll=True).action is Action.REENROLL
    assert schedule.decide(after, l3, p, can_reenroll=False).action is Action.STUCK
    assert schedule.decide(after, None, p, can_reenroll=True).action is Action.REENROLL
    assert schedule.decide(after, None, p, can_reenroll=False).action is Action.STUCK


def test_force_renews_a_valid_certificate_but_not_an_expired_one():
    l90 = life(90)
    p = Policy.from_options(None, None, None)
    assert schedule.decide(T0, l90, p, can_reenroll=False).action is Action.WAIT
    assert schedule.decide(T0, l90, p, can_reenroll=False, force=True).action is Action.RENEW
    assert schedule.decide(l90.not_after, l90, p, can_reenroll=False, force=True).action is Action.STUCK


def test_ari_window_is_used_inside_and_never_after_its_end():
    l90 = life(90)
    p = Policy.from_options(None, DAY, None)  # threshold: 1 day before expiry
    window = RenewalWindow(T0 + 60 * DAY, T0 + 62 * DAY)
    for k in range(100):
        rand = k / 100
        due = schedule.renewal_due_at(l90, p, window, rand)
        assert window.start <= due < window.end
    assert schedule.renewal_due_at(l90, p, window, 0.0) == window.start
    assert schedule.renewal_due_at(l90, p, window, 0.5) == T0 + 61 * DAY
    # a window that starts after our threshold: the threshold still wins (never renew too late)
    late = RenewalWindow(l90.not_after - dt.timedelta(hours=1), l90.not_after)
    assert schedule.renewal_due_at(l90, p, late, 0.9) == l90.not_after - DAY
    # a server that says "renew now" (window in the past) makes it due at once
    now_window = RenewalWindow(T0 - DAY, T0 - DAY / 2)
    assert schedule.decide(T0, l90, p, can_reenroll=False, ari=now_window, rand=0.3).action is Action.RENEW
    # an inverted window is ignored
    assert schedule.renewal_due_at(l90, p, RenewalWindow(T0 + 2 * DAY, T0 + DAY), 0.5) == l90.not_after - DAY


def test_next_check_is_the_interval_with_jitter_or_the_due_time():
    p = Policy.from_options(dt.timedelta(minutes=20), None, None)
    for k in range(101):
        wake = schedule.next_check(T0, p, None, k / 101)
        assert dt.timedelta(minutes=18) <= wake - T0 <= dt.timedelta(minutes=22)
    assert schedule.next_check(T0, p, None, 0.0) - T0 == dt.timedelta(minutes=18)
    assert schedule.next_check(T0, p, T0 + 5 * MIN, 0.99) == T0 + 5 * MIN  # due sooner: wake then
    assert schedule.next_check(T0, p, T0 - MIN, 0.5) - T0 == dt.timedelta(minutes=20)  # past due: no pull


def test_backoff_doubles_with_jitter_capped_at_the_interval():
    p = Policy.from_options(dt.timedelta(minutes=20), None, None)
    assert schedule.backoff_delay(0, p, 0.5) == dt.timedelta(0)
    assert schedule.backoff_delay(1, p, 1.0) == dt.timedelta(seconds=30)
    assert schedule.backoff_delay(1, p, 0.0) == dt.timedelta(seconds=15)
    assert schedule.backoff_delay(2, p, 1.0) == dt.timedelta(seconds=60)
    assert schedule.backoff_delay(3, p, 1.0) == dt.timedelta(seconds=120)
    highs = [schedule.backoff_delay(n, p, 1.0) for n in range(1, 40)]
    assert highs == sorted(highs)
    assert max(highs) == dt.timedelta(minutes=20)
    for n in range(1, 40):
        for k in range(10):
            assert schedule.backoff_delay(n, p, k / 10) <= p.interval


def test_retry_never_sleeps_past_expiry_and_says_so():
    p = Policy.from_options(dt.timedelta(minutes=20), None, None)
    not_after = T0 + dt.timedelta(seconds=100)
    at, loud = schedule.retry_at(T0, 10, p, 1.0, not_after)  # backoff would be 20 minutes
    assert loud and T0 <= at < not_after
    at, loud = schedule.retry_at(T0, 1, p, 1.0, not_after)  # 30 s: before expiry anyway
    assert not loud and at == T0 + dt.timedelta(seconds=30)
    at, loud = schedule.retry_at(T0, 5, p, 1.0, None)
    assert not loud and at == T0 + dt.timedelta(minutes=8)


def test_human_durations():
    assert schedule.human(dt.timedelta(days=2, hours=3)) == "2d3h"
    assert schedule.human(dt.timedelta(minutes=2, seconds=58)) == "2m58s"
    assert schedule.human(dt.timedelta(seconds=-75)) == "-1m15s"


def test_cli_durations():
    import click
    from agent.cli import parse_duration
    assert parse_duration("2m15s") == dt.timedelta(seconds=135)
    assert parse_duration("1h30m") == dt.timedelta(minutes=90)
    assert parse_duration("5d") == dt.timedelta(days=5)
    assert parse_duration("20") == dt.timedelta(seconds=20)
    for bad in ("", "5x", "m5", "5m x"):
        with pytest.raises(click.BadParameter):
            parse_duration(bad)
