"""doctor finds each planted problem and passes a healthy PKI; backup -> restore gives a working PKI."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from datetime import datetime, timedelta, timezone

import pytest

from .conftest import ca_status, openssl, set_profile, tree

pytestmark = pytest.mark.integration


def doctor(mtls, pki):
    res = mtls(["--pki-dir", str(pki), "doctor", "--json"])
    data = json.loads(res.out)
    return res.code, data, [(f["check"], f["level"], f["message"]) for f in data["findings"] if f["level"] != "ok"]


def test_a_healthy_pki_passes(fast_pki, mtls):
    assert mtls(["--pki-dir", str(fast_pki), "add-client", "a"]).code == 0
    code, data, problems = doctor(mtls, fast_pki)
    assert code == 0 and data["healthy"] and problems == []


def _age_crl(pki, days_left):
    now = datetime.now(timezone.utc)
    openssl("ca", "-config", "openssl.cnf", "-gencrl", "-crl_lastupdate", (now - timedelta(days=40)).strftime("%y%m%d%H%M%SZ"),
            "-crl_nextupdate", (now + timedelta(days=days_left)).strftime("%y%m%d%H%M%SZ"), "-out", "crl/ca.crl", cwd=pki)


PLANTS = {
    "world_readable_key": (lambda p: (p / "private/a.key").chmod(0o644), ("modes", "error", "private/a.key is mode 644")),
    "readable_p12": (lambda p: (p / "certs/a.p12").chmod(0o640), ("modes", "error", "certs/a.p12 is mode 640")),
    "open_private_dir": (lambda p: (p / "private").chmod(0o755), ("modes", "error", "private/ is mode 755")),
    "expired_crl": (lambda p: _age_crl(p, -1), ("crl", "error", "the CRL EXPIRED")),
    "crl_due": (lambda p: _age_crl(p, 2), ("crl", "warn", "inside the refresh window")),
    "missing_crl": (lambda p: (p / "crl/ca.crl").unlink(), ("crl", "error", "crl/ca.crl is missing")),
    "missing_newcert": (lambda p: (p / "newcerts/1000.pem").unlink(), ("database", "error", "newcerts/1000.pem is missing")),
    "orphan_newcert": (lambda p: shutil.copy(p / "newcerts/1000.pem", p / "newcerts/10FF.pem"),
                       ("database", "error", "newcerts/10FF.pem is not in index.txt")),
    "unknown_cert": (lambda p: shutil.copy(p / "ca/ca.crt", p / "certs/intruder.crt"), ("database", "error", "certs/intruder.crt")),
    "serial_behind": (lambda p: (p / "serial").write_text("1000\n"), ("database", "error", "serial (1000) is not above")),
    "unique_subject_yes": (lambda p: (p / "index.txt.attr").write_text("unique_subject = yes\n"),
                           ("config", "warn", "index.txt.attr says unique_subject = yes")),
    "revoked_not_in_crl": (lambda p: openssl("ca", "-config", "openssl.cnf", "-revoke", "certs/a.crt", cwd=p),
                           ("crl", "error", "the CRL does not list 1 certificate(s) index.txt has revoked (serial 1000)")),
    # as many R rows as the CRL has entries, but not the same serials (index.txt restored or edited by hand)
    "revoked_swapped": (lambda p: _revoke_another(p), ("crl", "error", "the CRL does not list 1 certificate(s) "
                                                       "index.txt has revoked (serial 1001)")),
}


def _revoke_another(pki) -> None:
    """The CRL lists serial 1000 (revoked by mtlsctl); then 1001 is revoked by hand and 1000 made valid again
    in index.txt: one R row, one CRL entry, and the CRL misses the revocation that counts."""
    from .conftest import run_cli

    assert run_cli(["--pki-dir", str(pki), "add-client", "b"]).code == 0
    assert run_cli(["--pki-dir", str(pki), "revoke", "a", "--no-reload"]).code == 0
    openssl("ca", "-config", "openssl.cnf", "-revoke", "certs/b.crt", cwd=pki)
    lines = (pki / "index.txt").read_text().splitlines()
    fields = lines[0].split("\t")
    assert fields[0] == "R" and fields[3] == "1000"
    lines[0] = "\t".join(["V", fields[1], "", *fields[3:]])
    (pki / "index.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_doctor_finds_each_planted_problem(fast_pki, mtls, plant):
    assert mtls(["--pki-dir", str(fast_pki), "add-client", "a"]).code == 0
    action, (check, level, needle) = PLANTS[plant]
    action(fast_pki)
    code, data, problems = doctor(mtls, fast_pki)
    assert code == 1 and not data["healthy"]
    assert any(c == check and lv == level and needle in msg for c, lv, msg in problems), problems
    assert all(f["fix"] for f in data["findings"] if f["level"] != "ok")  # every finding says how to fix it


def test_doctor_notices_a_moved_pki(fast_pki, mtls, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(fast_pki, moved)
    code, _, problems = doctor(mtls, moved)
    assert code == 1 and any(c == "config" and "openssl.cnf's dir is" in m for c, _, m in problems)


def test_doctor_checks_the_rendered_site(fast_pki, mtls, tmp_path):
    site = tmp_path / "site.conf"
    assert mtls(["--pki-dir", str(fast_pki), "add-server", "web"]).code == 0
    set_profile(fast_pki, nginx={"site_file": str(site), "server_cert": str(fast_pki / "certs/web.crt"),
                                 "server_key": str(fast_pki / "private/web.key")})
    code, _, problems = doctor(mtls, fast_pki)
    assert code == 1 and any("site.conf does not exist" in m for *_, m in problems)
    assert mtls(["--pki-dir", str(fast_pki), "nginx", "render", "--out", str(site)]).code == 0
    assert doctor(mtls, fast_pki)[0] == 0
    set_profile(fast_pki, nginx={"session_timeout": "5m"})
    code, _, problems = doctor(mtls, fast_pki)
    assert code == 1 and any("differs from what the profile renders" in m for *_, m in problems)


@pytest.mark.parametrize("encrypted", [True, False])
def test_backup_restore_round_trip(fast_pki, mtls, tmp_path, encrypted):
    assert mtls(["--pki-dir", str(fast_pki), "add-client", "phone"]).code == 0
    assert mtls(["--pki-dir", str(fast_pki), "revoke", "phone", "--no-reload"]).code == 0
    assert mtls(["--pki-dir", str(fast_pki), "add-client", "laptop"]).code == 0
    passfile = tmp_path / "pass"
    passfile.write_text("correct horse battery\n")
    out = tmp_path / "pki.backup"
    args = ["--passphrase-file", str(passfile)] if encrypted else []
    res = mtls(["--pki-dir", str(fast_pki), "backup", "--out", str(out), "--json", *args])
    assert res.code == 0, res.err
    assert out.stat().st_mode & 0o777 == 0o600
    assert (out.read_bytes()[:8] == b"Salted__") == encrypted
    if encrypted:  # the CA key is not readable without the passphrase
        assert b"PRIVATE KEY" not in out.read_bytes()
    target = tmp_path / "restored"
    res = mtls(["restore", str(out), "--pki-dir", str(target), "--json", *args])
    assert res.code == 0, res.err
    assert all(f["level"] == "ok" for f in json.loads(res.out)["doctor"])
    # modes kept
    assert (target / "private/ca.key").stat().st_mode & 0o777 == 0o400
    assert (target / "private").stat().st_mode & 0o777 == 0o700
    # the restored PKI works: verify (with the CRL) and add-client
    ok = openssl("verify", "-crl_check", "-CAfile", "ca/ca.crt", "-CRLfile", "crl/ca.crl", "certs/laptop.crt", cwd=target)
    assert ok.stdout.strip().endswith("OK")
    bad = openssl("verify", "-crl_check", "-CAfile", "ca/ca.crt", "-CRLfile", "crl/ca.crl", "certs/phone.crt", cwd=target, check=False)
    assert "certificate revoked" in bad.stdout + bad.stderr
    assert mtls(["--pki-dir", str(target), "add-client", "tablet"]).code == 0
    assert ca_status(target, "1002") == "Valid"
    # restore never overwrites a PKI
    before = tree(target)
    again = mtls(["restore", str(out), "--pki-dir", str(target), *args])
    assert again.code == 2 and "not empty" in again.err
    assert tree(target) == before


def test_restore_refuses_a_wrong_passphrase_and_hostile_archives(fast_pki, mtls, tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("right one\n")
    bad.write_text("wrong one\n")
    out = tmp_path / "b.enc"
    assert mtls(["--pki-dir", str(fast_pki), "backup", "--out", str(out), "--passphrase-file", str(good)]).code == 0
    res = mtls(["restore", str(out), "--pki-dir", str(tmp_path / "r"), "--passphrase-file", str(bad)])
    assert res.code == 2 and "wrong passphrase" in res.err and not (tmp_path / "r").exists()
    res = mtls(["restore", str(out), "--pki-dir", str(tmp_path / "r")])
    assert res.code == 2 and "encrypted" in res.err
    for name, kind in (("pki/../../escape", tarfile.REGTYPE), ("/etc/evil", tarfile.REGTYPE), ("pki/link", tarfile.SYMTYPE)):
        evil = tmp_path / "evil.tgz"
        with tarfile.open(evil, "w:gz") as tar:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/shadow" if kind == tarfile.SYMTYPE else ""
            tar.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
        res = mtls(["restore", str(evil), "--pki-dir", str(tmp_path / "r")])
        assert res.code == 2 and "refused" in res.err, (name, res.err)
        assert not (tmp_path / "r").exists() and not (tmp_path / "escape").exists()


def test_backup_never_overwrites_and_stays_out_of_the_pki(fast_pki, mtls, tmp_path):
    (tmp_path / "exists").write_text("x")
    assert mtls(["--pki-dir", str(fast_pki), "backup", "--out", str(tmp_path / "exists")]).code == 2
    assert (tmp_path / "exists").read_text() == "x"
    assert mtls(["--pki-dir", str(fast_pki), "backup", "--out", str(fast_pki / "b.tgz")]).code == 2
