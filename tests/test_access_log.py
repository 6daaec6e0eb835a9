"""The HTTP access log: one line per request, secrets redacted, text and JSON (issue 15)."""
from __future__ import annotations

import json
import logging
import re

from aiohttp.test_utils import TestClient, TestServer

from scepd.http.app import HTTP_HANDLER_ARGS, create_app
from scepd.ops.accesslog import LOGGER, redact_target, runner_args
from scepd.ops.logctx import ContextFilter, JsonFormatter


def test_redaction():
    assert redact_target("/scep", "operation=PKIOperation&message=" + "A" * 300) == \
        "/scep?operation=PKIOperation&message=<300 bytes>"
    out = redact_target("/x", "challenge=s3cret&token=abc&password=pw&eab_hmac=k&name=dev-1")
    assert "s3cret" not in out and "abc" not in out and "pw" not in out and "=k" not in out
    assert out.count("REDACTED") == 4 and "name=dev-1" in out
    assert len(redact_target("/" + "p" * 5000, "")) < 600


async def _client(services, enabled: bool) -> TestClient:
    server = TestServer(create_app(services))
    await server.start_server(**HTTP_HANDLER_ARGS, **runner_args(enabled))
    client = TestClient(server)
    await client.start_server()
    return client


async def test_one_line_per_request_with_redacted_message(services, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    client = await _client(services, True)
    try:
        r = await client.get("/scep", params={"operation": "GetCACaps"})
        assert r.status == 200
        r = await client.get("/scep", params={"operation": "PKIOperation", "message": "bm90IGEgbWVzc2FnZQ==" * 10})
        assert r.status == 400
        r = await client.get("/no/such/path", params={"challenge": "topsecret"})
        assert r.status == 404
    finally:
        await client.close()
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 3
    texts = [r.getMessage() for r in records]
    assert re.match(r"GET /scep\?operation=GetCACaps 200 \d+B [\d.]+ms rid=[0-9a-f]{16} peer=127\.0\.0\.1$", texts[0])
    assert "message=<200 bytes>" in texts[1] and " 400 " in texts[1] and "bm90" not in texts[1]
    assert "topsecret" not in texts[2] and "challenge=REDACTED" in texts[2] and " 404 " in texts[2]
    # JSON: the same fields, structured
    record = records[1]
    ContextFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert line["logger"] == LOGGER and line["status"] == 400 and line["method"] == "GET"
    assert line["target"].startswith("/scep?operation=PKIOperation&message=<") and line["bytes"] > 0
    assert isinstance(line["duration_ms"], float) and re.fullmatch(r"[0-9a-f]{16}", line["request_id"])


async def test_off_when_disabled(services, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    client = await _client(services, False)
    try:
        assert (await client.get("/scep", params={"operation": "GetCACaps"})).status == 200
    finally:
        await client.close()
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_plain_queries_are_remembered_and_secret_ones_never():
    """The redacted forms of short queries with nothing to hide are kept (the common SCEP and
    OCSP targets are not parsed on every request); a query with a secret or a message is redacted
    afresh each time and never kept, not even as a key."""
    from scepd.ops import accesslog
    accesslog._PLAIN_QUERIES.clear()
    assert accesslog.redact_target("/scep", "operation=GetCACert") == "/scep?operation=GetCACert"
    assert accesslog._PLAIN_QUERIES == {"operation=GetCACert": "operation=GetCACert"}
    assert accesslog.redact_target("/scep", "operation=GetCACert") == "/scep?operation=GetCACert"
    for query in ("challenge=hunter2", "operation=PKIOperation&message=MIIBhunter2", "token=hunter2&x=1"):
        first = accesslog.redact_target("/scep", query)
        assert "hunter2" not in first and accesslog.redact_target("/scep", query) == first
    assert not any("hunter2" in k or "hunter2" in v for k, v in accesslog._PLAIN_QUERIES.items())
    assert len(accesslog._PLAIN_QUERIES) == 1
