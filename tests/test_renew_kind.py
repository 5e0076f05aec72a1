"""Renewal keeps each certificate's kind, and verify checks the purpose (issue 11).

The kind (client, server, OCSP signer) must come from the certificate's EKU itself: the PKIs here have
CA subjects that spell openssl's EKU words ("TLS Web Server Authentication", "OCSP Signing"), and a
device request whose attributes spell them too, so a decision taken from openssl's text renews every
certificate as the wrong kind (a server or client as an OCSP signer, with the signer's validity and
without a bundle). Everything is checked with openssl on the files themselves.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from .conftest import openssl, run_cli, set_profile

pytestmark = pytest.mark.integration

OCSP_URL = "http://127.0.0.1:8888"
SIGNER = "ocsp-responder"
SIGNER_DAYS = 60
DAYS = 200  # issue and renew with this; the OCSP signer keeps SIGNER_DAYS
EKU_WORDS_CA = "TLS Web Server Authentication OCSP Signing CA"
EKU = {"client": "TLS Web Client Authentication", "server": "TLS Web Server Authentication", "ocsp": "OCSP Signing"}
EC = {"type": "ec", "curve": "P-256"}


def cli(pki: Path, *args: str):
    return run_cli(["--pki-dir", str(pki), *args])


def _init(tmp_path: Path, two_tier: bool) -> Path:
    ca: dict = {"subject": {"CN": EKU_WORDS_CA, "O": "OCSP Signing"}, "key": EC, "days": 3000}
    if two_tier:
        ca["intermediate"] = {"subject": {"CN": "TLS Web Client Authentication OCSP Signing Issuing CA"},
                              "key": EC, "days": 2000}
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({"ca": ca, "clients": {"key": EC},
                                       "ocsp": {"url": OCSP_URL, "port": 8888, "signer_days": SIGNER_DAYS}}))
    pki = tmp_path / "pki"
    res = run_cli(["--pki-dir", str(pki), "--profile", str(profile), "init"])
    assert res.code == 0, res.err
    return pki


@pytest.fixture(params=["fast_pki", "eku-words-ca", "eku-words-two-tier"])
def kinds_pki(request, tmp_path):
    """A PKI holding a server `srv`, the OCSP signer, a client `phone` (key, .p12) and a device client `dev1`
    signed from a CSR whose attributes say "TLS Web Server Authentication" and "OCSP Signing"."""
    if request.param == "fast_pki":
        pki = request.getfixturevalue("fast_pki")
        set_profile(pki, ocsp={"url": OCSP_URL, "port": 8888, "signer_days": SIGNER_DAYS})
    else:
        pki = _init(tmp_path, two_tier=request.param.endswith("two-tier"))
    res = cli(pki, "add-server", "srv", "--san", "DNS:srv", "--days", str(DAYS))
    assert res.code == 0, res.err
    res = cli(pki, "ocsp", "setup")
    assert res.code == 0, res.err
    res = cli(pki, "add-client", "phone", "--days", str(DAYS))
    assert res.code == 0, res.err
    key, csr, cnf = tmp_path / "dev1.key", tmp_path / "dev1.csr", tmp_path / "dev1.cnf"
    cnf.write_text("[req]\ndistinguished_name=dn\nattributes=attrs\nreq_extensions=ext\nprompt=no\nstring_mask=utf8only\n"
                   "[dn]\nCN=dev1\n[attrs]\nchallengePassword=TLS Web Server Authentication\n"
                   "unstructuredName=OCSP Signing\n[ext]\nextendedKeyUsage=clientAuth\n")
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key))
    openssl("req", "-new", "-key", str(key), "-config", str(cnf), "-out", str(csr))
    assert "TLS Web Server Authentication" in openssl("req", "-in", str(csr), "-noout", "-text").stdout
    res = cli(pki, "sign-csr", str(csr), "--name", "dev1", "--days", str(DAYS))
    assert res.code == 0, res.err
    return pki


# ------------------------------------------------------------------ openssl's view of a certificate


def ekus(pki: Path, name: str) -> list[str]:
    out = openssl("x509", "-in", str(pki / f"certs/{name}.crt"), "-noout", "-ext", "extendedKeyUsage").stdout
    lines = [line.strip() for line in out.splitlines()[1:] if line.strip()]
    return [u.strip() for line in lines for u in line.split(",")]


def serial(pki: Path, name: str) -> str:
    return openssl("x509", "-in", str(pki / f"certs/{name}.crt"), "-noout", "-serial").stdout.strip().split("=", 1)[1]


def days_left(pki: Path, name: str) -> float:
    out = openssl("x509", "-in", str(pki / f"certs/{name}.crt"), "-noout", "-enddate").stdout.strip().split("=", 1)[1]
    end = datetime.strptime(out, "%b %d %H:%M:%S %Y %Z").replace(tzinfo=timezone.utc)
    return (end - datetime.now(timezone.utc)) / timedelta(days=1)


def openssl_verify(pki: Path, name: str, purpose: str) -> bool:
    """openssl verify -purpose PURPOSE against the PKI's trust anchor (the root, with the issuing CA if any)."""
    anchors = ["-CAfile", "ca/root.crt", "-untrusted", "ca/ca.crt"] if (pki / "ca/root.crt").exists() else ["-CAfile", "ca/ca.crt"]
    res = openssl("verify", "-purpose", purpose, *anchors, f"certs/{name}.crt", cwd=pki, check=False)
    return res.returncode == 0 and res.stdout.strip().endswith(": OK")


def p12_certificate(pki: Path, name: str) -> str:
    password = (pki / f"private/{name}.p12.password").read_text().rstrip("\n")
    pem = openssl("pkcs12", "-in", str(pki / f"certs/{name}.p12"), "-nokeys", "-clcerts", "-passin", "stdin",
                  input=password + "\n").stdout
    return openssl("x509", "-noout", "-fingerprint", "-sha256", input=pem).stdout


def fingerprint(pki: Path, name: str) -> str:
    return openssl("x509", "-in", str(pki / f"certs/{name}.crt"), "-noout", "-fingerprint", "-sha256").stdout


ALLOWED = {"2.5.29.14", "2.5.29.35", "2.5.29.19", "2.5.29.15", "2.5.29.37", "2.5.29.17", "1.3.6.1.5.5.7.1.1"}


def assert_only_allowed_extensions(pki: Path, name: str) -> None:
    """SKI, AKI, BC, KU, EKU, SAN and, with the profile's ocsp, AIA holding exactly the OCSP URL."""
    from cryptography import x509

    der = openssl_der(pki / f"certs/{name}.crt")
    oids = {e.oid.dotted_string for e in x509.load_der_x509_certificate(der).extensions}
    assert oids <= ALLOWED, (name, oids - ALLOWED)
    aia = openssl("x509", "-in", str(pki / f"certs/{name}.crt"), "-noout", "-ext", "authorityInfoAccess").stdout
    assert [line.strip() for line in aia.splitlines()[1:] if line.strip()] in ([], [f"OCSP - URI:{OCSP_URL}"]), aia


def openssl_der(crt: Path) -> bytes:
    import subprocess

    return subprocess.run(["openssl", "x509", "-in", str(crt), "-outform", "DER"], capture_output=True, check=True).stdout


def assert_kinds(pki: Path) -> None:
    assert ekus(pki, "srv") == [EKU["server"]], ekus(pki, "srv")
    assert ekus(pki, SIGNER) == [EKU["ocsp"]], ekus(pki, SIGNER)
    for client in ("phone", "dev1"):
        assert ekus(pki, client) == [EKU["client"]], (client, ekus(pki, client))
        assert openssl_verify(pki, client, "sslclient")
        assert not openssl_verify(pki, client, "sslserver")
    assert openssl_verify(pki, "srv", "sslserver") and not openssl_verify(pki, "srv", "sslclient")
    for name in ("srv", SIGNER, "phone", "dev1"):
        assert_only_allowed_extensions(pki, name)
        assert re.search(r"CA:FALSE", openssl("x509", "-in", str(pki / f"certs/{name}.crt"), "-noout", "-ext",
                                              "basicConstraints").stdout)


# ------------------------------------------------------------------ 3: renewal keeps the kind


def test_renewal_keeps_each_certificates_kind(kinds_pki):
    pki = kinds_pki
    assert_kinds(pki)  # issued right in the first place
    before = {name: serial(pki, name) for name in ("srv", SIGNER, "phone", "dev1")}
    old_p12 = (pki / "certs/phone.p12").read_bytes()
    assert not (pki / "certs/srv.p12").exists()

    res = cli(pki, "renew", "--within", "3650", "--days", str(DAYS), "--no-reload", "--json")
    assert res.code == 0, (res.out, res.err)
    report = json.loads(res.out)
    assert report["failed"] == []
    renewed = {r["name"]: r for r in report["renewed"]}
    assert set(renewed) == set(before), renewed
    for name, old in before.items():
        assert serial(pki, name) != old, f"{name} was not re-issued"
        assert renewed[name]["new_serial"] == serial(pki, name)

    assert_kinds(pki)
    # the server: serverAuth, the renewal's days (not the OCSP signer's), and no bundle
    assert abs(days_left(pki, "srv") - DAYS) < 1, days_left(pki, "srv")
    assert renewed["srv"]["p12"] is None
    assert not (pki / "certs/srv.p12").exists() and not (pki / "private/srv.p12.password").exists()
    # the OCSP signer: OCSPSigning, its own short validity, no bundle
    assert abs(days_left(pki, SIGNER) - SIGNER_DAYS) < 1, days_left(pki, SIGNER)
    assert renewed[SIGNER]["p12"] is None
    assert not (pki / f"certs/{SIGNER}.p12").exists()
    # the client with its key here: clientAuth, the renewal's days, a new bundle holding the new certificate
    assert abs(days_left(pki, "phone") - DAYS) < 1
    assert renewed["phone"]["p12"] == str(pki / "certs/phone.p12")
    assert (pki / "certs/phone.p12").read_bytes() != old_p12
    assert p12_certificate(pki, "phone") == fingerprint(pki, "phone")
    # the device client (sign-csr, its attributes spell server/OCSP words): still a client, no bundle (no key here)
    assert abs(days_left(pki, "dev1") - DAYS) < 1
    assert renewed["dev1"]["p12"] is None and not (pki / "certs/dev1.p12").exists()


def test_renewed_certificates_are_still_verified_by_purpose(kinds_pki):
    pki = kinds_pki
    assert cli(pki, "renew", "--within", "3650", "--days", str(DAYS), "--no-reload").code == 0
    res = cli(pki, "verify", "srv")
    assert res.code == 1 and "not usable as a client certificate" in res.out + res.err, (res.out, res.err)
    assert cli(pki, "verify", "--server", "srv").code == 0
    for client in ("phone", "dev1"):
        res = cli(pki, "verify", client)
        assert res.code == 0, (client, res.out, res.err)


# ------------------------------------------------------------------ 4: verify checks the purpose


def test_verify_a_server_certificate_as_a_client_fails(kinds_pki):
    res = cli(kinds_pki, "verify", "srv")
    assert res.code == 1, (res.out, res.err)
    assert "not usable as a client certificate" in res.out + res.err
    js = cli(kinds_pki, "verify", "srv", "--json")
    assert js.code == 1 and json.loads(js.out)["ok"] is False


def test_verify_server_accepts_a_server_certificate(kinds_pki):
    res = cli(kinds_pki, "verify", "--server", "srv")
    assert res.code == 0, (res.out, res.err)


@pytest.mark.parametrize("client", ["phone", "dev1"])
def test_verify_a_client_succeeds(kinds_pki, client):
    res = cli(kinds_pki, "verify", client)
    assert res.code == 0, (res.out, res.err)
    assert re.search(r"\bOK\b", res.out), res.out


def test_verify_the_ocsp_signer_as_a_client_fails(kinds_pki):
    res = cli(kinds_pki, "verify", SIGNER)
    assert res.code == 1 and "not usable as a client certificate" in res.out + res.err, (res.out, res.err)
