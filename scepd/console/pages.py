"""HTML for the console: a few functions returning strings. Every value from the inventory goes
through `e` (certificates carry subjects chosen by whoever asked for them)."""
from __future__ import annotations

import datetime as dt
from html import escape
from urllib.parse import urlencode

from .queries import TIMELINE_DAYS, Timeline


def e(value) -> str:
    return escape("" if value is None else str(value), quote=True)


def when(t: dt.datetime | None) -> str:
    return "" if t is None else e(t.strftime("%Y-%m-%d %H:%M:%S UTC"))


CSS = """
:root{--fg:#1b1f24;--muted:#5a6472;--line:#d0d7de;--accent:#0b5cad;--bad:#b42318;--ok:#1a7f37;--warn:#9a6700}
*{box-sizing:border-box}body{font:15px/1.45 system-ui,sans-serif;color:var(--fg);margin:0;background:#f6f8fa}
header{background:#12263f;color:#fff;padding:.5rem 1rem;display:flex;gap:1rem;align-items:center;flex-wrap:wrap}
header a{color:#fff}header .brand{font-weight:700;margin-right:1rem}nav ul{list-style:none;margin:0;padding:0;display:flex;gap:.9rem;flex-wrap:wrap}
header form{margin-left:auto}main{padding:1rem 1.5rem;max-width:80rem}
a{color:var(--accent)}table{border-collapse:collapse;width:100%;background:#fff}
th,td{border:1px solid var(--line);padding:.3rem .5rem;text-align:left;vertical-align:top}th{background:#eef1f4}
td.mono,.mono{font-family:ui-monospace,monospace;word-break:break-all}
.state-valid{color:var(--ok);font-weight:600}.state-revoked{color:var(--bad);font-weight:600}.state-expired{color:var(--warn);font-weight:600}
form.filters{display:flex;flex-wrap:wrap;gap:.6rem;align-items:end;margin-bottom:1rem}
label{display:block;font-weight:600;font-size:.9rem}input,select,button,textarea{font:inherit;padding:.25rem .4rem}
button{background:var(--accent);color:#fff;border:1px solid var(--accent);border-radius:4px;cursor:pointer}
button.danger{background:var(--bad);border-color:var(--bad)}
a:focus,input:focus,select:focus,button:focus,textarea:focus{outline:3px solid #f0b400;outline-offset:2px}
.msg{padding:.5rem .8rem;border:1px solid var(--line);background:#fff;margin-bottom:1rem}.error{border-color:var(--bad);color:var(--bad)}
.cards{display:flex;gap:1rem;flex-wrap:wrap;margin:1rem 0}.card{background:#fff;border:1px solid var(--line);padding:.6rem 1rem}
.card strong{font-size:1.4rem;display:block}pre{background:#fff;border:1px solid var(--line);padding:.5rem;overflow:auto}
.inline{display:inline}
svg{background:#fff;border:1px solid var(--line);max-width:100%;height:auto}.skip{position:absolute;left:-999px}.skip:focus{left:1rem;top:.5rem;background:#fff;color:#000;padding:.3rem}
"""

NAV = (("certificates", "Inventory"), ("timeline", "Expiry timeline"), ("pending", "Approvals"),
       ("agents", "Agents"), ("ca", "CA status"), ("audit", "Audit"))


def layout(title: str, body: str, actor: str | None = None, csrf: str | None = None) -> str:
    nav = ""
    if actor is not None:
        items = "".join(f'<li><a href="/ui/{p}">{e(label)}</a></li>' for p, label in NAV)
        nav = (f'<nav aria-label="Console"><ul>{items}</ul></nav>'
               f'<form method="post" action="/ui/logout"><input type="hidden" name="csrf" value="{e(csrf)}">'
               f'<span title="signed in as">{e(actor)}</span> <button type="submit">Sign out</button></form>')
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{e(title)} · scepd</title><link rel="stylesheet" href="/ui/console.css"></head>'
            f'<body><a class="skip" href="#main">Skip to content</a><header><span class="brand">scepd console</span>{nav}</header>'
            f'<main id="main"><h1>{e(title)}</h1>{body}</main></body></html>')


def login(csrf: str, error: str | None = None) -> str:
    err = f'<p class="msg error" role="alert">{e(error)}</p>' if error else ""
    return layout("Sign in", f"""{err}
<p>Sign in with an admin token (<code>scepd admin token create NAME</code>), or present an admin
client certificate (<code>scepd admin issue-cert</code>) to your browser.</p>
<form method="post" action="/ui/login">
<input type="hidden" name="csrf" value="{e(csrf)}">
<label for="token">Admin token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required size="50" autofocus>
<button type="submit">Sign in</button></form>""")


def message(title: str, text: str, actor=None, csrf=None, error=True) -> str:
    cls = "msg error" if error else "msg"
    return layout(title, f'<p class="{cls}" role="alert">{e(text)}</p><p><a href="/ui/certificates">Back to the inventory</a></p>',
                  actor, csrf)


def state_cell(state: str) -> str:
    return f'<span class="state-{e(state)}">{e(state)}</span>'


def _select(name: str, label: str, options: list[str], current: str) -> str:
    opts = [f'<option value=""{"" if current else " selected"}>any</option>']
    opts += [f'<option value="{e(o)}"{" selected" if o == current else ""}>{e(o)}</option>' for o in options]
    return f'<div><label for="f-{name}">{e(label)}</label><select id="f-{name}" name="{name}">{"".join(opts)}</select></div>'


def inventory(records, more: bool, f, choices: dict, now: dt.datetime) -> str:
    form = (f'<form class="filters" method="get" action="/ui/certificates" role="search">'
            f'<div><label for="f-q">Search (CN, serial, SAN)</label><input id="f-q" name="q" value="{e(f.q)}" size="30"></div>'
            + _select("state", "State", ["valid", "expired", "revoked"], f.state)
            + _select("profile", "Profile", choices["profile"], f.profile)
            + _select("protocol", "Protocol", choices["protocol"], f.protocol)
            + _select("ca", "CA", choices["ca"], f.ca)
            + '<div><button type="submit">Search</button></div></form>')
    rows = "".join(
        f'<tr><td class="mono"><a href="/ui/certificates/{e(r.serial)}">{e(r.serial)}</a></td><td>{e(r.subject)}</td>'
        f'<td>{e(", ".join(r.sans))}</td><td>{state_cell(r.state(now))}</td><td>{e(r.profile)}</td>'
        f'<td>{e(r.protocol)}</td><td class="mono">{e(r.ca_id)}</td><td>{when(r.not_after)}</td></tr>' for r in records)
    table = ('<table><caption class="skip">Certificates</caption><thead><tr><th scope="col">Serial</th><th scope="col">Subject</th>'
             '<th scope="col">SANs</th><th scope="col">State</th><th scope="col">Profile</th><th scope="col">Protocol</th>'
             f'<th scope="col">CA</th><th scope="col">Not after</th></tr></thead><tbody>{rows}</tbody></table>'
             if records else '<p class="msg">No certificate matches.</p>')
    base = {k: v for k, v in (("q", f.q), ("state", f.state), ("profile", f.profile), ("protocol", f.protocol),
                              ("ca", f.ca)) if v}
    links = []
    if f.page > 1:
        links.append(f'<a rel="prev" href="/ui/certificates?{e(urlencode({**base, "page": f.page - 1}))}">Previous page</a>')
    if more:
        links.append(f'<a rel="next" href="/ui/certificates?{e(urlencode({**base, "page": f.page + 1}))}">Next page</a>')
    pager = f'<nav aria-label="Pages"><p>Page {f.page} {" · ".join(links)}</p></nav>'
    return form + table + pager


REASONS = ("unspecified", "keyCompromise", "affiliationChanged", "superseded", "cessationOfOperation",
           "privilegeWithdrawn")


def detail(rec, now: dt.datetime, trail, csrf: str) -> str:
    state = rec.state(now)
    facts = [("Serial", f'<span class="mono">{e(rec.serial)}</span>'), ("Subject", e(rec.subject)),
             ("SANs", e(", ".join(rec.sans))), ("State", state_cell(state)), ("Profile", e(rec.profile)),
             ("Protocol", e(rec.protocol)), ("CA", f'<span class="mono">{e(rec.ca_id)}</span>'),
             ("Not before", when(rec.not_before)), ("Not after", when(rec.not_after)),
             ("Issued", when(rec.issued_at)), ("Requester", e(rec.requester)),
             ("Transaction", f'<span class="mono">{e(rec.transaction_id)}</span>')]
    if rec.status == "revoked":
        facts += [("Revoked", when(rec.revoked_at)), ("Reason", e(rec.revocation_reason))]
    dl = "".join(f"<tr><th scope=\"row\">{k}</th><td>{v}</td></tr>" for k, v in facts)
    out = (f'<table id="facts">{dl}</table>'
           f'<p><a href="/ui/certificates/{e(rec.serial)}.pem" download>Download PEM</a></p>')
    if rec.status != "revoked":
        opts = "".join(f'<option value="{r}">{r}</option>' for r in REASONS)
        out += (f'<h2>Revoke</h2><form method="post" action="/ui/certificates/{e(rec.serial)}/revoke">'
                f'<input type="hidden" name="csrf" value="{e(csrf)}">'
                f'<label for="reason">Reason</label><select id="reason" name="reason">{opts}</select>'
                f'<p><input type="checkbox" id="confirm" name="confirm" value="yes" required> '
                f'<label for="confirm" class="inline">I confirm revoking {e(rec.subject)} '
                f'(serial {e(rec.serial)}); this cannot be undone</label></p>'
                f'<button class="danger" type="submit">Revoke certificate</button></form>')
    out += "<h2>Audit trail</h2>" + audit_table(trail)
    return out


def audit_table(records) -> str:
    if not records:
        return '<p class="msg">No audit events.</p>'
    rows = "".join(
        f'<tr><td>{when(r.at)}</td><td>{e(r.event)}</td><td>{e(r.subject)}</td>'
        f'<td class="mono">{e(r.serial)}</td><td>{e(r.actor)}</td>'
        f'<td class="mono">{e(", ".join(f"{k}={v}" for k, v in sorted(r.details.items())))}</td></tr>' for r in records)
    return ('<table class="audit"><thead><tr><th scope="col">At</th><th scope="col">Event</th><th scope="col">Subject</th>'
            '<th scope="col">Serial</th><th scope="col">Actor</th><th scope="col">Details</th></tr></thead>'
            f'<tbody>{rows}</tbody></table>')


def pending(rows, csrf: str) -> str:
    if not rows:
        return '<p class="msg">No request is waiting for approval.</p>'
    out = []
    for p in rows:
        out.append(
            f'<tr id="pending-{p.id}"><td>{p.id}</td><td>{e(p.subject)}</td><td>{e(p.profile)}</td><td>{e(p.protocol)}</td>'
            f'<td>{e(p.requester)}</td><td>{when(p.created_at)}</td><td>'
            f'<form method="post" action="/ui/pending/{p.id}/approve"><input type="hidden" name="csrf" value="{e(csrf)}">'
            f'<button type="submit" aria-label="Approve request {p.id}">Approve</button></form>'
            f'<form method="post" action="/ui/pending/{p.id}/reject"><input type="hidden" name="csrf" value="{e(csrf)}">'
            f'<label for="reason-{p.id}">Reason for rejecting</label>'
            f'<input id="reason-{p.id}" name="reason" required maxlength="500">'
            f' <button class="danger" type="submit" aria-label="Reject request {p.id}">Reject</button></form></td></tr>')
    return ('<table><thead><tr><th scope="col">Id</th><th scope="col">Subject</th><th scope="col">Profile</th>'
            '<th scope="col">Protocol</th><th scope="col">Requester</th><th scope="col">Received</th>'
            f'<th scope="col">Decision</th></tr></thead><tbody>{"".join(out)}</tbody></table>')


def timeline_svg(t: Timeline) -> str:
    """Bars per day over the next TIMELINE_DAYS days; each bar has a <title> for screen readers."""
    w, h, left, bottom, top = 900, 260, 40, 40, 20
    peak = max(t.per_day) or 1
    bw = (w - left - 10) / len(t.per_day)
    parts = [f'<svg id="timeline" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
             f'role="img" aria-labelledby="timeline-title"><title id="timeline-title">Certificates expiring per day, '
             f'next {TIMELINE_DAYS} days: {sum(t.per_day)} in total</title>']
    plot = h - bottom - top
    for frac in (0, 0.5, 1):
        y = top + plot * (1 - frac)
        parts.append(f'<line x1="{left}" x2="{w - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#d0d7de"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{round(peak * frac)}</text>')
    for i, n in enumerate(t.per_day):
        day = t.start + dt.timedelta(days=i)
        if n:
            bh = plot * n / peak
            parts.append(f'<rect class="bar" data-day="{day.isoformat()}" data-count="{n}" x="{left + i * bw + 1:.1f}" '
                         f'y="{top + plot - bh:.1f}" width="{max(bw - 2, 1):.1f}" height="{bh:.1f}" fill="#0b5cad">'
                         f'<title>{day.isoformat()}: {n} expiring</title></rect>')
        if i % 15 == 0:
            parts.append(f'<text x="{left + i * bw:.1f}" y="{h - bottom + 16}" font-size="11">{day.strftime("%b %d")}</text>')
    parts.append("</svg>")
    return "".join(parts)


def timeline(t: Timeline) -> str:
    cards = (f'<div class="cards"><div class="card" id="count-upcoming"><strong>{sum(t.per_day)}</strong>expiring in the next {TIMELINE_DAYS} days</div>'
             f'<div class="card" id="count-expired"><strong>{t.expired}</strong>expired</div>'
             f'<div class="card" id="count-revoked"><strong>{t.revoked}</strong>revoked</div></div>')
    days = "".join(f"<tr><td>{(t.start + dt.timedelta(days=i)).isoformat()}</td><td>{n}</td></tr>"
                   for i, n in enumerate(t.per_day) if n)
    table = (f'<details><summary>The same as a table</summary><table><thead><tr><th scope="col">Day</th>'
             f'<th scope="col">Expiring</th></tr></thead><tbody>{days}</tbody></table></details>')
    return cards + timeline_svg(t) + table


def agents(rows, now: dt.datetime, stale: dt.timedelta) -> str:
    if not rows:
        return '<p class="msg">No agent has checked in.</p>'
    out = []
    for a in rows:
        if a.cert_not_after <= now:
            health = '<span class="state-revoked">certificate expired</span>'
        elif now - a.last_checkin_at > stale:
            health = '<span class="state-expired">silent</span>'
        else:
            health = '<span class="state-valid">healthy</span>'
        out.append(f'<tr><td>{e(a.hostname)}</td><td>{e(a.subject)}</td><td class="mono">'
                   f'<a href="/ui/certificates/{e(a.serial)}">{e(a.serial)}</a></td><td>{e(a.agent_version)}</td>'
                   f'<td>{when(a.last_checkin_at)}</td><td>{a.checkins}</td><td>{when(a.cert_not_after)}</td><td>{health}</td></tr>')
    return ('<table><thead><tr><th scope="col">Host</th><th scope="col">Subject</th><th scope="col">Serial</th>'
            '<th scope="col">Agent</th><th scope="col">Last check-in</th><th scope="col">Check-ins</th>'
            f'<th scope="col">Certificate until</th><th scope="col">Health</th></tr></thead><tbody>{"".join(out)}</tbody></table>')


def ca_status(facts: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f'<tr><th scope="row">{e(k)}</th><td>{v}</td></tr>' for k, v in facts) + "</table>"
