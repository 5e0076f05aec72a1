"""Protections that a planted bug got past (or past everything but a race or a golden file), each pinned here by a
test that fails deterministically when the protection is removed. Which bug each one catches is in its docstring."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mtlsctl import files

pytestmark = pytest.mark.integration

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX if sys.argv[2] == "exclusive" else fcntl.LOCK_SH)
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def other_process_holds(fast_pki: Path):
    """other_process_holds("shared" | "exclusive"): another process holds the PKI lock that way until the test ends."""
    procs: list[subprocess.Popen[str]] = []

    def hold(how: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(fast_pki / files.LOCK_FILE), how],
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        return proc
    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_writer_waits_for_a_reader_and_gives_up_with_a_lock_error(fast_pki, other_process_holds):
    """Planted: pki_lock takes no flock, or a shared one (writers would run beside readers and each other)."""
    other_process_holds("shared")
    start = time.monotonic()
    with pytest.raises(files.LockError, match="another mtlsctl holds the lock"):
        with files.pki_lock(fast_pki / files.LOCK_FILE, timeout=0.3):
            pass
    assert time.monotonic() - start >= 0.3


def test_a_reader_waits_for_a_writer_but_not_for_another_reader(fast_pki, other_process_holds):
    """Planted: read_lock takes no lock (a reader would see index.txt between openssl's two renames)."""
    reader = other_process_holds("shared")
    with files.read_lock(fast_pki, timeout=0.3):  # readers share
        pass
    reader.kill()
    reader.wait()
    other_process_holds("exclusive")
    with pytest.raises(files.LockError):
        with files.read_lock(fast_pki, timeout=0.3):
            pass


def test_an_expired_certificate_gets_no_bundle(fast_pki, mtls):
    """Planted: check_exportable looks at the status letter only (openssl leaves an expired row V)."""
    from mtlsctl import client
    from mtlsctl.errors import InputError
    from mtlsctl.pki import resolve_settings

    assert mtls(["--pki-dir", str(fast_pki), "add-client", "phone", "--days", "2"]).code == 0
    pki = resolve_settings(fast_pki, None, environ={}).pki
    assert client.check_exportable(pki, "phone").status == "V"
    later = datetime.now(timezone.utc) + timedelta(days=3)
    with pytest.raises(InputError, match=r"phone.*is expired; no bundle is made for it"):
        client.check_exportable(pki, "phone", now=later)


@pytest.mark.parametrize("name", ["dir/phone", "a/b", "phone/"])
def test_a_name_with_a_slash_is_refused_by_every_command_that_issues(fast_pki, mtls, tmp_path, name):
    """Planted: the name pattern lets '/' through (caught otherwise only by a hypothesis property, by chance)."""
    from .conftest import openssl, tree

    key, csr = tmp_path / "k.pem", tmp_path / "r.csr"
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key))
    openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", "/CN=x")
    names = tmp_path / "names.txt"
    names.write_text(f"ok-1\n{name}\n")
    before = tree(fast_pki)
    for args in (["add-client", name], ["add-server", name, "--san", "DNS:web.example"], ["sign-csr", str(csr), "--name", name],
                 ["add-client", "--from-file", str(names)]):
        res = mtls(["--pki-dir", str(fast_pki), *args])
        assert res.code == 2 and "'/'" in res.err, (args, res.err)
        assert tree(fast_pki) == before
