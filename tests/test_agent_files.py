"""The agent's files: atomic writes, key never readable by others, a matching pair at any instant."""
from __future__ import annotations

import datetime as dt
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.files import AgentDir, SimulatedCrash, atomic_write

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.timezone.utc)
STEPS = ["pair-dir", "key-written", "cert-written", "pair-complete", "previous-linked", "current-switched",
         "links"]


def _ca():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(ca, serial: int):
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "h")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(serial)
            .not_valid_before(NOW).not_valid_after(NOW + dt.timedelta(days=1)).sign(ca_key, hashes.SHA256()))
    return key, cert


def _matches(pair) -> bool:
    return pair is not None and pair.cert.public_key() == pair.key.public_key()


def test_install_layout_permissions_and_previous(tmp_path):
    ca = _ca()
    d = AgentDir(tmp_path / "agent")
    k1, c1 = _leaf(ca, 0x1111)
    d.install(k1, c1, [ca[0]])
    assert stat.S_IMODE(os.stat(d.root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(d.key_path).st_mode) == 0o600  # follows the symlink to the pair's key
    assert os.readlink(d.root / "current") == "pairs/1111"
    for name in ("key.pem", "cert.pem", "chain.pem", "fullchain.pem"):
        assert os.readlink(d.root / name) == f"current/{name}"
    assert x509.load_pem_x509_certificates(d.fullchain_path.read_bytes()) == [c1, ca[0]]
    assert _matches(d.load_pair()) and d.load_pair("previous") is None

    k2, c2 = _leaf(ca, 0x2222)
    d.install(k2, c2, [ca[0]])
    assert d.load_pair().cert == c2 and d.load_pair("previous").cert == c1  # previous kept
    k3, c3 = _leaf(ca, 0x3333)
    d.install(k3, c3, [ca[0]])
    assert d.load_pair().cert == c3 and d.load_pair("previous").cert == c2
    assert sorted(p.name for p in (d.root / "pairs").iterdir()) == ["2222", "3333"]  # older pruned
    assert not [p for p in d.root.iterdir() if ".tmp." in p.name or ".lnk." in p.name]


@pytest.mark.parametrize("step", STEPS)
def test_a_kill_between_any_two_steps_leaves_a_matching_pair(tmp_path, step):
    ca = _ca()
    d = AgentDir(tmp_path / "agent")
    k1, c1 = _leaf(ca, 0xAAAA)
    d.install(k1, c1, [ca[0]])
    k2, c2 = _leaf(ca, 0xBBBB)

    def fault(name: str) -> None:
        if name == step:
            raise SimulatedCrash(name)
    with pytest.raises(SimulatedCrash):
        d.install(k2, c2, [ca[0]], fault=fault)
    # what a restarted agent (or nginx, reading key.pem and cert.pem) finds on disk
    fresh = AgentDir(d.root)
    pair = fresh.load_pair()
    assert _matches(pair)
    switched = STEPS.index(step) >= STEPS.index("current-switched")
    assert pair.cert == (c2 if switched else c1)
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(fresh.key_path.read_bytes(), None)
    cert = x509.load_pem_x509_certificate(fresh.cert_path.read_bytes())
    assert key.public_key() == cert.public_key()
    # the next install completes normally and clears what the interrupted one left
    k3, c3 = _leaf(ca, 0xCCCC)
    fresh.install(k3, c3, [ca[0]])
    assert _matches(fresh.load_pair()) and fresh.load_pair().cert == c3
    assert {p.name for p in (d.root / "pairs").iterdir()} == {"cccc", "bbbb" if switched else "aaaa"}


def test_a_kill_during_the_first_install_leaves_no_half_pair(tmp_path):
    ca = _ca()
    d = AgentDir(tmp_path / "agent")
    k1, c1 = _leaf(ca, 0x1)

    def fault(name: str) -> None:
        if name == "cert-written":
            raise SimulatedCrash(name)
    with pytest.raises(SimulatedCrash):
        d.install(k1, c1, [ca[0]], fault=fault)
    assert d.load_pair() is None and d.load_cert() is None  # missing, not mismatched


def test_atomic_write_mode_and_replace(tmp_path):
    target = tmp_path / "secret.pem"
    atomic_write(target, b"one", 0o600)
    assert target.read_bytes() == b"one" and stat.S_IMODE(os.stat(target).st_mode) == 0o600
    old_umask = os.umask(0)
    try:
        atomic_write(target, b"two", 0o600)  # even with a permissive umask
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"two" and stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.pem"]


def test_state_file_is_private(tmp_path):
    d = AgentDir(tmp_path / "agent")
    d.create()
    d.save_state({"server": "http://x/scep"})
    assert d.load_state() == {"server": "http://x/scep"}
    assert stat.S_IMODE(os.stat(d.state_path).st_mode) == 0o600


CHILD = r"""
import os, signal, sys, datetime as dt
sys.path.insert(0, {repo!r})
from tests.test_agent_files import _ca, _leaf
from agent.files import AgentDir
ca = _ca()
d = AgentDir({root!r})
k1, c1 = _leaf(ca, 0xAAAA)
d.install(k1, c1, [ca[0]])
k2, c2 = _leaf(ca, 0xBBBB)
def fault(name):
    if name == {step!r}:
        os.kill(os.getpid(), signal.SIGKILL)  # no finally, no cleanup: the process is gone
d.install(k2, c2, [ca[0]], fault=fault)
"""


@pytest.mark.parametrize("step", STEPS)
def test_a_real_sigkill_between_steps_leaves_a_matching_pair(tmp_path, step):
    import signal
    import subprocess
    import sys
    from pathlib import Path
    repo = str(Path(__file__).resolve().parent.parent)
    root = tmp_path / "agent"
    proc = subprocess.run([sys.executable, "-c", CHILD.format(repo=repo, root=str(root), step=step)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pair = AgentDir(root).load_pair()
    assert _matches(pair)
    assert format(pair.cert.serial_number, "x") == ("bbbb" if STEPS.index(step) >= STEPS.index("current-switched")
                                                     else "aaaa")
