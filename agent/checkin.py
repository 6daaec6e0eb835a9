"""The one mutual-TLS call: POST /api/v1/agents/checkin with the installed certificate."""
from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import aiohttp

from . import __version__
from .protocol import AgentError

PATH = "/api/v1/agents/checkin"


def client_context(anchor: Path, fullchain: Path, key: Path) -> ssl.SSLContext:
    """Trust only our anchor; present leaf + issuing CA (the server trusts the root, so a
    certificate from a CA before or after a rollover still builds its path)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(anchor))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(fullchain), str(key))
    return ctx


def checkin_url(base: str) -> str:
    base = base.rstrip("/")
    return base if base.endswith(PATH) else base + PATH


async def checkin(base_url: str, anchor: Path, fullchain: Path, key: Path,
                  hostname: str | None = None) -> dict:
    ctx = client_context(anchor, fullchain, key)
    body = {"hostname": hostname or socket.gethostname(), "agent_version": __version__}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            async with session.post(checkin_url(base_url), json=body, ssl=ctx) as resp:
                if resp.status != 200:
                    text = (await resp.text())[:200].strip()
                    raise AgentError(f"check-in refused: HTTP {resp.status} {text}")
                return await resp.json()
    except aiohttp.ClientConnectorCertificateError as exc:
        raise AgentError(f"check-in: the server certificate is not trusted: {exc.certificate_error}") from None
    except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
        raise AgentError(f"check-in: TLS handshake refused: {exc}") from None
    except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
        raise AgentError(f"check-in: cannot connect to {base_url}: {exc or 'timeout'}") from None
    except aiohttp.ClientError as exc:  # e.g. a reply that is not JSON
        raise AgentError(f"check-in: bad reply from {base_url}: {exc}") from None
