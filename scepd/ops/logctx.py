"""Per-request log context: a request id and the protocol transaction/order id on every line.

Both live in contextvars, so every log record emitted while a request is handled (in its task,
or in a thread started with asyncio.to_thread, which copies the context) carries them. The HTTP
middleware sets the request id; protocol code sets the transaction id as soon as it knows it
(`set_transaction_id`). `ContextFilter` copies them onto each record; `JsonFormatter` writes one
JSON object a line.
"""
from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import secrets

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("scepd_request_id", default=None)
transaction_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("scepd_transaction_id",
                                                                            default=None)


def new_request_id() -> str:
    return secrets.token_hex(8)


def set_transaction_id(value: str | None) -> None:
    """The SCEP transactionID / ACME order id of the work in progress (printable, capped)."""
    if value is not None:
        value = "".join(ch for ch in str(value)[:128] if ch.isprintable())
    transaction_id.set(value)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        record.transaction_id = transaction_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key in ("request_id", "transaction_id"):
            value = getattr(record, key, None)
            if value:
                out[key] = value
        access = getattr(record, "access", None)
        if access:  # the access log (scepd/ops/accesslog.py): its fields, not just the text
            out.update({k: v for k, v in access.items() if k not in out and v is not None})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second: int | None = None
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """logging's default text ("2026-11-27 16:01:19,123"), the strftime part made once a second."""
        second = int(record.created)
        if second != self._second:
            self._stamp, self._second = super().formatTime(record, datefmt).rsplit(",", 1)[0], second
        return f"{self._stamp},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        tags = [f"{k}={getattr(record, k)}" for k in ("request_id", "transaction_id")
                if getattr(record, k, None)]
        return f"{text} [{' '.join(tags)}]" if tags else text
