"""The http-01 validator's one shared client session (issue 13): reused across validations,
and still no cookies carried from one validation to the next, no redirect followed, the body
capped."""
from __future__ import annotations

import pytest
from aiohttp import web

from acme import validators
from scepd.errors import ValidationFailed


async def test_http01_session_is_shared_and_keeps_the_rules(aiohttp_server):
    seen_cookies = []

    async def challenge(request):
        token = request.match_info["token"]
        seen_cookies.append(request.headers.get("Cookie"))
        if token == "redirect":
            raise web.HTTPFound("/.well-known/acme-challenge/good")
        if token == "big":
            return web.Response(text="x" * (validators.MAX_BODY + 1))
        resp = web.Response(text=f"{token}.thumb")
        resp.set_cookie("tracker", token)  # must not come back on a later validation
        return resp
    app = web.Application()
    app.router.add_get("/.well-known/acme-challenge/{token}", challenge)
    server = await aiohttp_server(app, host="127.0.0.1")
    settings = validators.ValidatorSettings(http01_port=server.port, resolve="*=127.0.0.1")
    target = validators.Target("dns", "v.example.test")

    await validators.http01(target, "good", "good.thumb", settings)
    first = validators._session()
    await validators.http01(target, "again", "again.thumb", settings)
    assert validators._session() is first  # one session for every validation of this loop
    assert seen_cookies == [None, None]
    with pytest.raises(ValidationFailed, match="HTTP 302"):
        await validators.http01(target, "redirect", "good.thumb", settings)
    with pytest.raises(ValidationFailed, match="more than"):
        await validators.http01(target, "big", "big.thumb", settings)
    assert len(seen_cookies) == 4  # the redirect was not followed
    await validators.close()
    assert first.closed
