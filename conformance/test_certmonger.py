"""certmonger 0.79 (Debian): the daemon on a private D-Bus session bus, GET + AES-256."""
from __future__ import annotations

import os
from pathlib import Path

from .conftest import assert_subject_kept, require, run

SCRIPT = """set -u
getcert add-scep-ca -s -c T -u '{url}' || exit 3
for i in $(seq 1 80); do getcert list-cas -s -c T | grep -q thumbprint && break; sleep 0.25; done
getcert request -s -c T -I r1 -f {dir}/cert.pem -k {dir}/key.pem -L '{challenge}' -N 'CN={cn}{dn_rest}' \
  -D {cn}.example.test -w --wait-timeout 60 -v
getcert list -s -i r1
"""


def run_certmonger(server, work: Path, cn: str, challenge: str, dn_rest: str = ""):
    """`dn_rest`: more of the -N subject after CN=<cn>, e.g. ",O=interop-lab"."""
    return certmonger_session(work, SCRIPT.format(url=server.url, dir=work, challenge=challenge, cn=cn,
                                                  dn_rest=dn_rest))


def requested_csr(work: Path) -> bytes:
    """The CSR certmonger made, from its request file (`csr=` and its continuation lines)."""
    for path in (work / "req").iterdir():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("csr="):
                pem = [line[4:]] + [ln[1:] for ln in lines[i + 1:] if ln.startswith(" ")]
                return "\n".join(pem).split("-----END CERTIFICATE REQUEST-----")[0].encode() \
                    + b"-----END CERTIFICATE REQUEST-----\n"
    raise AssertionError(f"no csr= in {list((work / 'req').iterdir())}")


def certmonger_session(work: Path, script: str):
    """Run `script` (getcert commands) beside a certmonger daemon on a private D-Bus session bus,
    all state under `work`."""
    require("certmonger")
    require("getcert")
    require("/usr/lib/certmonger/scep-submit")
    require("dbus-run-session")
    for sub in ("home/.config", "req", "cas", "lca", "tmp"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    (work / "inner.sh").write_text(script)
    env = {**os.environ, "HOME": str(work / "home"), "XDG_CONFIG_HOME": str(work / "home/.config"),
           "CERTMONGER_REQUESTS_DIR": str(work / "req"), "CERTMONGER_CAS_DIR": str(work / "cas"),
           "CERTMONGER_LOCAL_CA_DIR": str(work / "lca"), "CERTMONGER_TMPDIR": str(work / "tmp")}
    return run(["dbus-run-session", "--", "certmonger", "-s", "-n", "-c", f"bash {work}/inner.sh"],
               timeout=200, env=env, cwd=work)


def test_certmonger_enrolls_over_get_with_aes(server, tmp_path):
    out = run_certmonger(server, tmp_path, "cm-host1", server.new_challenge(), ",OU=MDM,O=interop-lab")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "status: MONITORING" in out.stdout, out.stdout + out.stderr
    cert = server.verify(tmp_path / "cert.pem", tmp_path / "key.pem")
    # certmonger encodes -N in the order written (CN first), so RFC 4514 shows it reversed
    assert cert.subject.rfc4514_string() == "O=interop-lab,OU=MDM,CN=cm-host1"
    assert_subject_kept(cert, requested_csr(tmp_path))
    records = server.scepd("certs", "show", format(cert.serial_number, "x"))
    assert '"protocol": "scep"' in records
    serial = format(cert.serial_number, "x")
    [line] = [ln for ln in server.log_text().splitlines() if f"serial={serial}" in ln and "PKIOperation" in ln]
    assert "PKIOperation GET type=19 status=SUCCESS" in line and "cipher=aes-256-cbc" in line


def test_certmonger_wrong_challenge_is_rejected(server, tmp_path):
    out = run_certmonger(server, tmp_path, "cm-bad", "not-the-challenge")
    assert "status: MONITORING" not in out.stdout
    assert not (tmp_path / "cert.pem").exists()


def test_certmonger_needs_the_root_in_getcacert(tmp_path):
    """Why GetCACert serves the chain by default: with the issuing CA alone (the
    getcacert_chain=false form), certmonger cannot verify our replies."""
    from .conftest import start_server, stop_server
    srv = start_server(tmp_path / "srv", {"SCEPD_SCEP_GETCACERT_CHAIN": "0"})
    try:
        work = tmp_path / "cm"
        work.mkdir()
        out = run_certmonger(srv, work, "cm-single", srv.new_challenge())
        assert "status: MONITORING" not in out.stdout
        assert "certificate verify error" in out.stdout + out.stderr
    finally:
        stop_server(srv)
