"""The event loop the serving processes of `scepd serve` run on (`[server] event_loop`).

    uvloop  (default) libuv's loop: sockets, TLS, timers and thread hand-backs in C
    asyncio the standard library's selector loop

Both run the same code; only the loop underneath differs. Measured side by side
(README "Benchmarks"), uvloop spends about a tenth less of the server's CPU on an ACME order or
a SCEP enrollment, most of it in the per-connection TLS and transport work. Only the processes
that serve requests use it: the other commands, the set-up before the workers fork, and the
agent keep asyncio's own loop.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine

from ..config import EVENT_LOOPS, ConfigError


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of the loop `choice` names (None: asyncio's default); ConfigError when it
    is not one of EVENT_LOOPS or uvloop cannot be imported."""
    if choice == "asyncio":
        return None
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ConfigError("[server] event_loop = uvloop, but uvloop is not installed: "
                              "pip install uvloop, or set event_loop = asyncio") from None
        return uvloop.new_event_loop
    raise ConfigError(f"[server] event_loop must be {' or '.join(EVENT_LOOPS)}, got {choice!r}")


def run(main: Coroutine[Any, Any, Any], choice: str) -> Any:
    """asyncio.run(main) on the loop `choice` names."""
    try:
        factory = loop_factory(choice)
    except ConfigError:
        main.close()  # never awaited: no "coroutine was never awaited" warning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """uvloop or asyncio: the loop this coroutine runs on."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]
