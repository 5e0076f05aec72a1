"""Inventory you can rely on: status valid / expiring / expired / revoked from the dates at run time, one
day-count rule (a started day counts) tested at its boundaries, and a missing CRL made, not a crash."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from mtlsctl import db, lifecycle
from mtlsctl.pki import resolve_settings

from .conftest import require_tool, run_cli, set_profile

pytestmark = pytest.mark.integration

T = datetime(2027, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
ROW = db.IndexRow(status="V", expires=T, revoked_at=None, reason=None, serial="1000", subject="/CN=x")


@pytest.mark.parametrize(("before", "left"), [
    (timedelta(days=365), 365),                      # issued for a year a moment ago
    (timedelta(days=1, seconds=1), 2),
    (timedelta(days=1), 1),
    (timedelta(seconds=1), 1),                       # ends within the next 24 hours: 1 day left
    (timedelta(0), 0),                               # ended
    (-timedelta(hours=23), 0),
    (-timedelta(days=1, seconds=1), -1),
])
def test_days_left_counts_a_started_day(before, left):
    assert lifecycle.days_left(T, T - before) == left


@pytest.mark.parametrize(("before", "status"), [
    (timedelta(days=30, seconds=1), "valid"),
    (timedelta(days=30), "expiring"),                # exactly renew.within_days ahead: renew takes it, so it is expiring
    (timedelta(seconds=1), "expiring"),
    (timedelta(0), "expired"),                       # notAfter reached (openssl still says V in index.txt)
    (-timedelta(days=3), "expired"),
])
def test_status_boundaries(before, status):
    assert lifecycle.status_of(ROW, T - before, expiring_days=30) == status
    revoked = db.IndexRow(status="R", expires=T, revoked_at=T - timedelta(days=9), reason="keyCompromise", serial="1001",
                          subject="/CN=y")
    assert lifecycle.status_of(revoked, T - before, expiring_days=30) == "revoked"


def test_list_statuses_and_days_from_the_real_database(fast_pki):
    set_profile(fast_pki, nginx={"reload_command": "", "test_command": ""}, renew={"within_days": 30})
    for name, days in (("year", 365), ("soon", 10), ("gone", 365)):
        assert run_cli(["--pki-dir", str(fast_pki), "add-client", name, "--days", str(days)]).code == 0
    assert run_cli(["--pki-dir", str(fast_pki), "revoke", "gone", "--no-reload"]).code == 0
    rows = {r["name"]: r for r in json.loads(run_cli(["--pki-dir", str(fast_pki), "list", "--json"]).out)}
    assert (rows["year"]["status"], rows["year"]["days_left"]) == ("valid", 365)
    assert (rows["soon"]["status"], rows["soon"]["days_left"]) == ("expiring", 10)
    assert rows["gone"]["status"] == "revoked"
    only = json.loads(run_cli(["--pki-dir", str(fast_pki), "list", "--status", "expiring", "--json"]).out)
    assert [r["name"] for r in only] == ["soon"]
    # the same rows a year and a day later: both expired (index.txt still says V), never "valid" with negative days
    settings = resolve_settings(fast_pki, None, environ={})
    later = lifecycle.list_certs(settings, now=datetime.now(timezone.utc) + timedelta(days=366))
    assert {e.name: (e.status, e.days_left <= 0) for e in later} == {
        "year": ("expired", True), "soon": ("expired", True), "gone": ("revoked", True)}
    bad = run_cli(["--pki-dir", str(fast_pki), "list", "--status", "sparkling"])
    assert bad.code == 2 and "expiring" in bad.err


def test_list_under_a_faked_clock_says_expired(fast_pki):
    """The whole command under libfaketime (the clock of the process, as cron would see it in a year)."""
    faketime = require_tool("faketime")
    assert run_cli(["--pki-dir", str(fast_pki), "add-client", "short", "--days", "2"]).code == 0
    code = f"from mtlsctl.cli import main; main(['--pki-dir', {str(fast_pki)!r}, 'list', '--json'])"
    when = (datetime.now(timezone.utc) + timedelta(days=3)).strftime("%Y-%m-%d %H:%M:%S")
    res = subprocess.run([faketime, when, sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout)[0]
    assert row["status"] == "expired" and row["days_left"] <= 0


def test_a_missing_crl_is_made_by_crl_if_due_and_renew(fast_pki):
    set_profile(fast_pki, nginx={"reload_command": "", "test_command": ""})
    for args in (["crl", "--if-due", "--no-reload"], ["renew", "--no-reload"]):
        (fast_pki / "crl/ca.crl").unlink()
        res = run_cli(["--pki-dir", str(fast_pki), *args])
        assert res.code == 0 and "CRL regenerated" in res.out, (args, res.out, res.err)
        assert (fast_pki / "crl/ca.crl").is_file()
    (fast_pki / "crl/ca.crl").unlink()
    doc = run_cli(["--pki-dir", str(fast_pki), "doctor", "--json"])
    assert doc.code == 1 and any(f["check"] == "crl" and f["level"] == "error" and "mtlsctl crl" in f["fix"]
                                 for f in json.loads(doc.out)["findings"])


def test_doctor_names_a_name_left_with_two_valid_certificates(fast_pki):
    """An interrupted replace (or renew) leaves the lost device's certificate valid beside the new one."""
    set_profile(fast_pki, nginx={"reload_command": "", "test_command": ""})
    assert run_cli(["--pki-dir", str(fast_pki), "add-client", "phone"]).code == 0
    assert run_cli(["--pki-dir", str(fast_pki), "doctor"]).code == 0
    # what a replace killed after issuing leaves: a second valid certificate of the name, issued by hand here
    from .conftest import openssl

    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "k2.pem",
            "-subj", "/CN=phone", "-out", "p2.csr", cwd=fast_pki)
    openssl("ca", "-config", "openssl.cnf", "-extensions", "v3_client_ec", "-batch", "-in", "p2.csr", "-out", "p2.crt",
            cwd=fast_pki)
    for f in ("k2.pem", "p2.csr", "p2.crt"):
        (fast_pki / f).unlink()
    res = run_cli(["--pki-dir", str(fast_pki), "doctor", "--json"])
    assert res.code == 1
    found = [f for f in json.loads(res.out)["findings"] if "valid certificates" in f["message"]]
    assert found and "phone has 2 valid certificates" in found[0]["message"] and "mtlsctl replace phone" in found[0]["fix"]
