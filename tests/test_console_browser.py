"""The console in a real browser (headless Chromium through selenium) against a real `scepd serve`
with HTTPS on 127.0.0.1 and two workers: sign in with a token, find an enrolled certificate, approve a pending
request and see it issued, revoke one and see it revoked, and the expiry timeline's counts.
Screenshots of each step are saved under the test's tmp dir (`<tmp_path>/screenshots/`, printed
at the end; pytest keeps the last three runs' tmp dirs)."""
from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import ssl
import time
import urllib.request

import pytest

from scepd import config as config_mod
from scepd.admin.service import AdminService
from scepd.clock import FixedClock, SystemClock
from scepd.http.app import open_services
from scepd.store import PendingRecord

from .helpers import make_csr, rsa_key
from .test_revocation_tls import _issue
from .test_workers import _free_port, serve, stop

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian chromium + chromium-driver (scripts/test installs them)")


async def _populate(state_dir) -> dict:
    """Inventory, a pending request and an admin token, written before the server starts."""
    cfg = config_mod.load(state_dir, environ={})
    now = SystemClock().now()
    services = await open_services(cfg, SystemClock())
    try:
        e = services.enrollment
        e.validity = dt.timedelta(days=30)
        found = await _issue(services, "web-01.example", rsa_key(0))
        e.validity = dt.timedelta(days=60)
        victim = await _issue(services, "revoke-me.example", rsa_key(1))
        e.clock, e.validity = FixedClock(now - dt.timedelta(days=3)), dt.timedelta(days=1)
        await _issue(services, "expired-01.example", rsa_key(0))
        e.clock, e.validity = SystemClock(), None
        key = rsa_key(2)
        csr = make_csr(key, "pending-01.example")
        from scepd.ca.csr import decode_csr
        spki = decode_csr(csr).spki_sha256
        async with services.store.transaction() as tx:
            pending_id = await tx.insert_pending(PendingRecord(
                id=0, transaction_id=hashlib.sha256(csr).hexdigest(), spki_sha256=spki, signer_spki_sha256=spki,
                csr_der=csr, subject="CN=pending-01.example", profile=cfg.scep.profile, protocol="scep",
                requester="browser-test", created_at=now))
        _id, token = await AdminService(services.store, services.clock).create_token("browser", actor="test")
    finally:
        await services.close()
    return {"found": found.record, "victim": victim.record, "pending_id": pending_id, "token": token}


def _wait_https(port: int) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=ctx, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    opts.accept_insecure_certs = True  # the server's TLS certificate comes from the test CA
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


async def test_console_in_a_browser(state_dir, tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    data = await _populate(state_dir)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    https = _free_port()
    # two worker processes: the session cookie is honoured by whichever one answers
    served = serve(state_dir, "--workers", "2", "--no-demo-challenge", "--https", f"127.0.0.1:{https}")
    try:
        _wait_https(https)
        base = f"https://127.0.0.1:{https}"
        b = browser

        def shot(name: str) -> None:
            b.save_screenshot(str(shots / f"{name}.png"))

        def text(css: str) -> str:
            return b.find_element(By.CSS_SELECTOR, css).text

        def navigates(action, url_part: str) -> None:
            """Do `action` (a click, Enter) and wait, bounded, until the next page has loaded."""
            old = b.find_element(By.TAG_NAME, "html")
            action()
            WebDriverWait(b, 20).until(EC.staleness_of(old))
            WebDriverWait(b, 20).until(lambda d: url_part in d.current_url
                                       and d.execute_script("return document.readyState") == "complete")

        # sign in: a page without a session goes to the form; one password field
        b.get(f"{base}/ui/certificates")
        assert b.current_url.endswith("/ui/login")
        field = b.find_element(By.ID, "token")
        assert field.get_attribute("type") == "password"
        field.send_keys("scepd_not-the-token")
        navigates(field.submit, "/ui/login")
        assert "Invalid or revoked token" in text("main")
        # the keyboard alone: the field has the focus, Enter submits
        assert b.switch_to.active_element.get_attribute("id") == "token"
        b.switch_to.active_element.send_keys(data["token"])
        shot("01-sign-in")
        navigates(lambda: b.switch_to.active_element.send_keys(Keys.ENTER), "/ui/certificates")
        assert b.current_url.endswith("/ui/certificates") and "Sign out" in text("header")
        # the first Tab reaches the skip link, the next ones the navigation
        b.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
        assert b.switch_to.active_element.text == "Skip to content"
        b.switch_to.active_element.send_keys(Keys.TAB)
        assert b.switch_to.active_element.text == "Inventory"
        assert b.get_cookie("scepd_console")["httpOnly"] is True

        # find the enrolled certificate by CN, open it
        b.find_element(By.ID, "f-q").send_keys("web-01")
        navigates(b.find_element(By.ID, "f-q").submit, "q=web-01")
        rows = b.find_elements(By.CSS_SELECTOR, "main tbody tr")
        assert len(rows) == 1 and "web-01.example" in rows[0].text
        shot("02-inventory-search")
        navigates(rows[0].find_element(By.LINK_TEXT, data["found"].serial).click, data["found"].serial)
        assert "valid" in text("#facts") and data["found"].serial in text("#facts")
        shot("03-certificate")

        # the timeline before: one expired, none revoked, the victim expiring in 60 days
        found_day = data["found"].not_after.date().isoformat()
        victim_day = data["victim"].not_after.date().isoformat()
        b.get(f"{base}/ui/timeline")
        assert text("#count-expired strong") == "1" and text("#count-revoked strong") == "0"
        bars = {r.get_attribute("data-day"): int(r.get_attribute("data-count"))
                for r in b.find_elements(By.CSS_SELECTOR, "#timeline rect.bar")}
        assert bars[found_day] == 1 and bars[victim_day] == 1

        # approve the pending request: it is issued
        b.get(f"{base}/ui/pending")
        assert "pending-01.example" in text(f"#pending-{data['pending_id']}")
        shot("04-pending")
        navigates(b.find_element(By.CSS_SELECTOR, f"#pending-{data['pending_id']} form[action$='/approve'] button").click,
                  "/ui/certificates/")
        assert "/ui/certificates/" in b.current_url
        assert "CN=pending-01.example" in text("#facts") and "valid" in text("#facts")
        assert "pending.approved" in text("main") or "certificate.issued" in text("main")
        b.get(f"{base}/ui/pending")
        assert "No request is waiting" in text("main")

        # revoke one: a reason and the confirmation box
        b.get(f"{base}/ui/certificates/{data['victim'].serial}")
        Select(b.find_element(By.ID, "reason")).select_by_value("keyCompromise")
        b.find_element(By.ID, "confirm").click()
        shot("05-revoke")
        navigates(b.find_element(By.CSS_SELECTOR, "button.danger").click, data["victim"].serial)
        assert "revoked" in text("#facts") and "keyCompromise" in text("#facts")
        assert "certificate.revoked" in text("main")

        # the timeline after: the revoked certificate left its day and is counted as revoked
        b.get(f"{base}/ui/timeline")
        assert text("#count-expired strong") == "1" and text("#count-revoked strong") == "1"
        bars = {r.get_attribute("data-day"): int(r.get_attribute("data-count"))
                for r in b.find_elements(By.CSS_SELECTOR, "#timeline rect.bar")}
        assert bars[found_day] == 1 and victim_day not in bars
        shot("06-timeline")

        for path, expect in (("/ui/agents", "No agent"), ("/ui/ca", "CRL number"), ("/ui/audit", "certificate.revoked")):
            b.get(base + path)
            assert expect in text("main"), path
            shot("07-" + path.rsplit("/", 1)[1])

        # sign out: the session cookie is gone and pages go back to the form
        navigates(b.find_element(By.CSS_SELECTOR, "header form button").click, "/ui/login")
        assert b.current_url.endswith("/ui/login") and b.get_cookie("scepd_console") is None
        b.get(f"{base}/ui/certificates")
        assert b.current_url.endswith("/ui/login")
    finally:
        assert stop(served) == 0
    print(f"screenshots: {shots}")
