"""Integration: revoke, crl, list, renew, verify with real openssl; results checked with openssl."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

import pytest

from .conftest import ca_status, crl_text, openssl, reloads, set_profile, tree, verify_crl, x509_text

pytestmark = pytest.mark.integration


def _add(mtls, pki, name, *extra):
    res = mtls(["--pki-dir", str(pki), "add-client", name, "--json", *extra])
    assert res.code == 0, res.err
    return json.loads(res.out)


def test_revoke_lists_the_serial_with_its_reason_and_reloads(fast_pki, mtls, reload_log):
    _add(mtls, fast_pki, "keep")
    lost = _add(mtls, fast_pki, "lost-device")
    assert verify_crl(fast_pki, "certs/lost-device.crt").endswith(": OK")
    res = mtls(["--pki-dir", str(fast_pki), "revoke", "lost-device", "--reason", "keyCompromise", "--json"])
    assert res.code == 0, res.err
    out = json.loads(res.out)
    assert out["revoked"] == [lost["serial"]] and out["reloaded"] is True and out["crl"]["revoked"] == 1
    assert reloads(reload_log) == 1
    assert "certificate revoked" in verify_crl(fast_pki, "certs/lost-device.crt")
    assert verify_crl(fast_pki, "certs/keep.crt").endswith(": OK")
    text = crl_text(fast_pki)
    assert re.search(rf"Serial Number: {lost['serial']}\s+Revocation Date: .*\s+CRL entry extensions:\s+"
                     r"X509v3 CRL Reason Code:\s+Key Compromise", text)
    assert ca_status(fast_pki, lost["serial"]) == "Revoked"
    # verify reports it in words, exit 1
    v = mtls(["--pki-dir", str(fast_pki), "verify", "lost-device"])
    assert v.code == 1 and "REVOKED" in v.out
    assert mtls(["--pki-dir", str(fast_pki), "verify", "keep"]).code == 0


def test_revoke_is_idempotent_and_unknown_names_change_nothing(fast_pki, mtls, reload_log):
    _add(mtls, fast_pki, "dev")
    assert mtls(["--pki-dir", str(fast_pki), "revoke", "dev"]).code == 0
    before = tree(fast_pki)
    again = mtls(["--pki-dir", str(fast_pki), "revoke", "dev"])
    assert again.code == 0 and "Already revoked: serial 1000" in again.out
    assert reloads(reload_log) == 1  # nothing changed the second time: no reload
    assert tree(fast_pki) == before
    for args in (["revoke", "nobody"], ["revoke", "--serial", "ABCD"], ["revoke", "dev", "--reason", "removeFromCRL"],
                 ["revoke"], ["revoke", "dev", "--serial", "1000"]):
        res = mtls(["--pki-dir", str(fast_pki), *args])
        assert res.code == 2, (args, res.err)
        assert tree(fast_pki) == before


def test_revoke_by_serial_and_several_valid_certificates_of_one_name(fast_pki, mtls):
    set_profile(fast_pki, renew={"revoke_superseded": False}, nginx={"reload_command": ""})
    _add(mtls, fast_pki, "tablet", "--days", "3")
    res = mtls(["--pki-dir", str(fast_pki), "renew", "--json"])
    assert res.code == 0, res.err
    new = json.loads(res.out)["renewed"][0]["new_serial"]
    assert ca_status(fast_pki, "1000") == "Valid" and ca_status(fast_pki, new) == "Valid"
    res = mtls(["--pki-dir", str(fast_pki), "revoke", "tablet", "--json"])
    assert sorted(json.loads(res.out)["revoked"]) == sorted(["1000", new])
    assert ca_status(fast_pki, "1000") == "Revoked" and ca_status(fast_pki, new) == "Revoked"
    _add(mtls, fast_pki, "phone")
    res = mtls(["--pki-dir", str(fast_pki), "revoke", "--serial", "0x1002", "--reason", "cessationofoperation"])
    assert res.code == 0, res.err
    assert "Cessation Of Operation" in crl_text(fast_pki)


def test_renew_end_to_end(fast_pki, mtls, reload_log):
    soon = _add(mtls, fast_pki, "soon", "--days", "5")
    other = _add(mtls, fast_pki, "other")
    gone = _add(mtls, fast_pki, "gone", "--days", "2")
    assert mtls(["--pki-dir", str(fast_pki), "revoke", "gone"]).code == 0  # already-revoked rows do not stop renewal
    other_crt = (fast_pki / "certs/other.crt").read_bytes()
    reloads_before = reloads(reload_log)

    res = mtls(["--pki-dir", str(fast_pki), "renew", "--json"])
    assert res.code == 0, res.err
    out = json.loads(res.out)
    assert [r["name"] for r in out["renewed"]] == ["soon"] and out["failed"] == []
    item = out["renewed"][0]
    assert item["old_serial"] == soon["serial"] and "password" not in item
    assert out["crl"]["regenerated"] is True and out["reloaded"] is True
    assert reloads(reload_log) == reloads_before + 1
    # the new certificate: valid for renew.days, verifies against CA and CRL
    text = x509_text(fast_pki / "certs/soon.crt")
    assert f"Serial Number: {int(item['new_serial'], 16)} (0x{item['new_serial'].lower()})" in text
    na = datetime.strptime(re.search(r"Not After : (.+ GMT)", text).group(1), "%b %d %H:%M:%S %Y GMT")
    assert abs((na - datetime.utcnow()).days - 365) <= 1
    assert verify_crl(fast_pki, "certs/soon.crt").endswith(": OK")
    # the old one: archived and revoked as superseded
    archive = fast_pki / f"certs/soon.crt.old.{datetime.now(timezone.utc):%Y-%m-%d}"
    assert f"Serial Number: {int(soon['serial'], 16)} " in x509_text(archive)
    assert "certificate revoked" in verify_crl(fast_pki, str(archive.relative_to(fast_pki)))
    assert ca_status(fast_pki, soon["serial"]) == "Revoked"
    assert re.search(rf"Serial Number: {soon['serial']}\s+Revocation Date: .*\s+CRL entry extensions:\s+"
                     r"X509v3 CRL Reason Code:\s+Superseded", crl_text(fast_pki))
    # exactly one valid row per name, says openssl
    index = (fast_pki / "index.txt").read_text().splitlines()
    valid_names = [line.split("\t")[5] for line in index if ca_status(fast_pki, line.split("\t")[3]) == "Valid"]
    assert sorted(valid_names) == ["/CN=other", "/CN=soon"]
    # the new bundle opens with the password in the reported 0600 file
    pw_file = fast_pki / "private/soon.p12.password"
    assert item["password_file"] == str(pw_file) and pw_file.stat().st_mode & 0o777 == 0o600
    password = pw_file.read_text().strip()
    assert len(password) >= 20 and password not in res.out + res.err  # in the 0600 file, never printed
    p12_certs = openssl("pkcs12", "-in", item["p12"], "-nokeys", "-passin", f"file:{pw_file}").stdout
    assert openssl("x509", "-noout", "-serial", input=p12_certs).stdout.strip() == f"serial={item['new_serial']}"
    # other clients untouched
    assert (fast_pki / "certs/other.crt").read_bytes() == other_crt
    assert ca_status(fast_pki, other["serial"]) == "Valid" and ca_status(fast_pki, gone["serial"]) == "Revoked"
    # second run: nothing to renew, CRL fresh, no reload
    before = tree(fast_pki)
    res2 = mtls(["--pki-dir", str(fast_pki), "renew", "--json"])
    assert res2.code == 0
    out2 = json.loads(res2.out)
    assert out2["renewed"] == [] and out2["crl"]["regenerated"] is False and out2["reloaded"] is False
    assert reloads(reload_log) == reloads_before + 1
    assert tree(fast_pki) == before


def test_renew_failure_leaves_the_old_certificate_valid_and_unrevoked(fast_pki, mtls, reload_log):
    bad = _add(mtls, fast_pki, "bad", "--days", "3")
    good = _add(mtls, fast_pki, "good", "--days", "3")
    crt_before = (fast_pki / "certs/bad.crt").read_bytes()
    (fast_pki / "certs/bad.csr").write_text("-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n-----END CERTIFICATE REQUEST-----\n")
    res = mtls(["--pki-dir", str(fast_pki), "renew", "--json"])
    assert res.code == 1
    out = json.loads(res.out)
    # the stored request is read and reviewed before openssl runs: a damaged one is refused by name
    assert [f["name"] for f in out["failed"]] == ["bad"] and "not a readable certificate request" in out["failed"][0]["error"]
    assert [r["name"] for r in out["renewed"]] == ["good"]  # one failure does not stop the others
    assert ca_status(fast_pki, bad["serial"]) == "Valid"
    assert (fast_pki / "certs/bad.crt").read_bytes() == crt_before
    assert not list(fast_pki.glob("certs/bad.crt.old.*"))
    assert verify_crl(fast_pki, "certs/bad.crt").endswith(": OK")
    assert ca_status(fast_pki, good["serial"]) == "Revoked"
    assert "1 certificate(s) failed to renew" in res.err


def test_renew_without_a_csr_reports_it_and_goes_on(fast_pki, mtls):
    set_profile(fast_pki, nginx={"reload_command": ""})
    _add(mtls, fast_pki, "nocsr", "--days", "3")
    (fast_pki / "certs/nocsr.csr").unlink()
    res = mtls(["--pki-dir", str(fast_pki), "renew"])
    assert res.code == 1 and "FAILED nocsr (serial 1000): CSR not found" in res.err
    assert ca_status(fast_pki, "1000") == "Valid"


def _age_crl(pki, days_left: float):
    """Re-sign the CRL by hand so its nextUpdate is `days_left` away (what 20 quiet days look like)."""
    now = datetime.now(timezone.utc)
    nxt = (now + timedelta(days=days_left)).strftime("%y%m%d%H%M%SZ")
    last = (now - timedelta(days=1)).strftime("%y%m%d%H%M%SZ")
    openssl("ca", "-config", "openssl.cnf", "-gencrl", "-crl_lastupdate", last, "-crl_nextupdate", nxt,
            "-out", "crl/ca.crl", cwd=pki)


def test_crl_if_due_refreshes_only_when_due(fast_pki, mtls, reload_log):
    set_profile(fast_pki, crl={"days": 30, "refresh_within_days": 7})
    res = mtls(["--pki-dir", str(fast_pki), "crl", "--if-due", "--json"])
    assert res.code == 0 and json.loads(res.out)["regenerated"] is False and reloads(reload_log) == 0
    _age_crl(fast_pki, 3)
    res = mtls(["--pki-dir", str(fast_pki), "crl", "--if-due", "--json"])
    out = json.loads(res.out)
    assert out["regenerated"] is True and out["reloaded"] is True and reloads(reload_log) == 1
    m = re.search(r"Next Update: (.+ GMT)", crl_text(fast_pki)).group(1)
    left = datetime.strptime(m, "%b %d %H:%M:%S %Y GMT") - datetime.utcnow()
    assert timedelta(days=29, hours=23) < left <= timedelta(days=30)
    last = re.search(r"Last Update: (.+ GMT)", crl_text(fast_pki)).group(1)
    assert datetime.strptime(last, "%b %d %H:%M:%S %Y GMT") <= datetime.utcnow() - timedelta(minutes=4)


def test_renew_refreshes_a_due_crl_even_when_nothing_renews(fast_pki, mtls, reload_log):
    _add(mtls, fast_pki, "fine")
    _age_crl(fast_pki, 2)
    res = mtls(["--pki-dir", str(fast_pki), "renew", "--json"])
    out = json.loads(res.out)
    assert res.code == 0 and out["renewed"] == [] and out["crl"]["regenerated"] is True and out["reloaded"] is True
    assert verify_crl(fast_pki, "certs/fine.crt").endswith(": OK")


def test_an_expired_crl_is_named_by_verify(fast_pki, mtls):
    _add(mtls, fast_pki, "c1")
    _age_crl(fast_pki, -1)
    res = mtls(["--pki-dir", str(fast_pki), "verify", "c1", "--json"])
    assert res.code == 1 and json.loads(res.out)["verdict"] == "crl_expired"


def test_failed_nginx_test_means_no_reload_and_exit_1(fast_pki, mtls, tmp_path):
    log = tmp_path / "r.log"
    set_profile(fast_pki, nginx={"test_command": "sh -c 'echo emerg: broken >&2; exit 1'",
                                 "reload_command": f"sh -c 'echo reload >> {log}'"})
    _add(mtls, fast_pki, "x")
    res = mtls(["--pki-dir", str(fast_pki), "revoke", "x"])
    assert res.code == 1 and "was not reloaded" in res.err and "emerg: broken" in res.err
    assert not log.exists()
    assert ca_status(fast_pki, "1000") == "Revoked"  # the revocation itself stands


def test_list_reads_the_database(fast_pki, mtls):
    _add(mtls, fast_pki, "a")
    _add(mtls, fast_pki, "b", "--days", "10")
    assert mtls(["--pki-dir", str(fast_pki), "revoke", "a", "--no-reload", "--reason", "superseded"]).code == 0
    res = mtls(["--pki-dir", str(fast_pki), "list", "--json"])
    rows = json.loads(res.out)
    # b ends within renew.within_days (30): expiring, so `renew` will take it
    assert [(r["name"], r["serial"], r["status"]) for r in rows] == [("a", "1000", "revoked"), ("b", "1001", "expiring")]
    assert set(rows[0]) == {"name", "serial", "status", "not_after", "days_left", "revoked_at", "reason", "subject", "files"}
    assert rows[0]["reason"] == "superseded" and rows[1]["days_left"] == 10
    assert rows[1]["files"] == ["private/b.key", "certs/b.csr", "certs/b.crt", "certs/b.p12"]
    soon = json.loads(mtls(["--pki-dir", str(fast_pki), "list", "--expiring-within", "30", "--json"]).out)
    assert [r["name"] for r in soon] == ["b"]
    table = mtls(["--pki-dir", str(fast_pki), "list"]).out
    assert "CA: expires" in table and "CRL: next update" in table and "revoked" in table


def test_guides_pki_gets_renewed(tmp_path, mtls):
    """A guide-made PKI has unique_subject = yes in index.txt.attr; renewal must still work."""
    from .test_integration_foundation import test_a_pki_built_by_the_guides_own_commands_is_adopted as build

    build(tmp_path, mtls)
    pki = tmp_path / "guide"
    assert "unique_subject = yes" in (pki / "index.txt.attr").read_text()
    (pki / "mtls.yaml").write_text("nginx: {reload_command: ''}\nrenew: {within_days: 400}\n")
    res = mtls(["--pki-dir", str(pki), "renew", "--json"])
    assert res.code == 0, res.err
    assert json.loads(res.out)["renewed"][0]["name"] == "iphone-jmrp"
    assert ca_status(pki, "1000") == "Revoked" and ca_status(pki, "1001") == "Valid"
