from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from scepd import config as config_mod
from scepd.ca import pki
from scepd.http.app import create_app, open_services
from scepd.clock import FixedClock

from .helpers import VECTORS

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="session")
def vectors() -> Path:
    if not (VECTORS / "README.md").exists():
        pytest.fail(f"SCEP vectors not found at {VECTORS}: the shared/ folder must sit beside the repo")
    return VECTORS


@pytest.fixture(scope="session")
def ca_template(tmp_path_factory) -> Path:
    """A CA created once (RSA keys are slow); each test copies it."""
    d = tmp_path_factory.mktemp("ca-template")
    pki.create(d, FixedClock(NOW - dt.timedelta(days=1)), cn="Test", org="scepd-tests", root_bits=2048)
    return d


@pytest.fixture
def state_dir(tmp_path, ca_template) -> Path:
    import shutil
    d = tmp_path / "state"
    shutil.copytree(ca_template, d)
    (d / config_mod.CONFIG_NAME).write_text(config_mod.render_default())
    return d


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(NOW)


@pytest.fixture
async def make_services(state_dir, clock):
    opened = []

    async def _make(env: dict[str, str] | None = None, directory: Path | None = None):
        cfg = config_mod.load(directory or state_dir, environ=env or {})
        services = await open_services(cfg, clock)
        opened.append(services)
        return services
    yield _make
    for s in opened:
        await s.close()


@pytest.fixture
async def services(make_services):
    return await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret"})


@pytest.fixture
async def client(aiohttp_client, services):
    from aiohttp.test_utils import TestServer

    from scepd.http.app import HTTP_HANDLER_ARGS
    server = TestServer(create_app(services))
    await server.start_server(**HTTP_HANDLER_ARGS)  # the limits `scepd serve` uses
    return await aiohttp_client(server)


@pytest.fixture(scope="session")
def postgres_cluster():
    import os

    from . import pg
    if not pg.available():
        if os.environ.get("SCEPD_REQUIRE_CLIENTS") == "1":
            pytest.fail("PostgreSQL is not installed but SCEPD_REQUIRE_CLIENTS=1")
        pytest.skip("PostgreSQL (Debian postgresql) not installed")
    cluster = pg.PostgresCluster().start()
    yield cluster
    cluster.stop()


_db_counter = iter(range(1, 10_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """Every store contract test runs on both backends."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'contract.db'}"
    cluster = request.getfixturevalue("postgres_cluster")
    return cluster.create_database(f"scepd_test_{next(_db_counter)}")


@pytest.fixture
def vector_state(tmp_path, vectors) -> Path:
    """A state directory whose CA is the vectors' own issuing CA (imported), so the captured
    requests are encrypted to us."""
    d = tmp_path / "vstate"
    d.mkdir()
    p = vectors / "pki"
    pki.import_ca(d, (p / "ca.pem").read_bytes(), (p / "ca.key").read_bytes(),
                  (p / "chain.pem").read_bytes(), None, None)
    (d / config_mod.CONFIG_NAME).write_text(config_mod.render_default())
    return d
