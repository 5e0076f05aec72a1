"""The whole lifecycle in a single-tier AND a two-tier PKI (root -> issuing CA), checked with openssl itself.

Every result is proven with `openssl verify` against what nginx would trust: the CA certificate and its CRL
(single tier), or the root with the issuing CA untrusted and BOTH CRLs (-crl_check_all, two-tier).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import ca_status, is_two_tier, openssl, run_cli, set_profile

pytestmark = pytest.mark.integration


def nginx_verify(pki: Path, crt: str, purpose: str = "sslclient") -> str:
    """`openssl verify` the way nginx checks a client: chain to what ssl_client_certificate trusts, every CRL."""
    if is_two_tier(pki):
        args = ["verify", "-purpose", purpose, "-crl_check_all", "-CAfile", "ca/root.crt", "-untrusted", "ca/ca.crt",
                "-CRLfile", "crl/chain.crl", crt]
    else:
        args = ["verify", "-purpose", purpose, "-crl_check", "-CAfile", "ca/ca.crt", "-CRLfile", "crl/ca.crl", crt]
    res = openssl(*args, cwd=pki, check=False)
    return (res.stdout + res.stderr).strip()


def cli(pki: Path, *args: str, stdin: str | None = None):
    return run_cli(["--pki-dir", str(pki), *args], stdin=stdin)


def test_issue_revoke_renew_and_crl_in_both_tiers(tiered_pki):
    pki = tiered_pki
    set_profile(pki, nginx={"reload_command": "", "test_command": ""})
    for name in ("phone", "lost", "soon"):
        assert cli(pki, "add-client", name, *(["--days", "3"] if name == "soon" else [])).code == 0
    assert nginx_verify(pki, "certs/phone.crt").endswith("OK")
    # the bundle carries the chain (two-tier: the issuing CA and the root)
    pw = json.loads(cli(pki, "export", "phone", "--force", "--json").out)["password"]
    info = openssl("pkcs12", "-in", "certs/phone.p12", "-nokeys", "-passin", "stdin", input=pw + "\n", cwd=pki).stdout
    assert info.count("BEGIN CERTIFICATE") == (3 if is_two_tier(pki) else 2)

    assert cli(pki, "revoke", "lost", "--reason", "keyCompromise", "--no-reload").code == 0
    assert "certificate revoked" in nginx_verify(pki, "certs/lost.crt")
    assert cli(pki, "verify", "lost").code == 1 and "REVOKED" in cli(pki, "verify", "lost").out

    res = cli(pki, "renew", "--no-reload", "--json")
    assert res.code == 0, res.err
    out = json.loads(res.out)
    assert [r["name"] for r in out["renewed"]] == ["soon"]
    new, old = out["renewed"][0]["new_serial"], out["renewed"][0]["old_serial"]
    assert ca_status(pki, new) == "Valid" and ca_status(pki, old) == "Revoked"
    assert nginx_verify(pki, "certs/soon.crt").endswith("OK")
    assert "certificate revoked" in nginx_verify(pki, out["renewed"][0]["archived"])
    assert cli(pki, "verify", "soon").code == 0

    before = openssl("crl", "-in", "crl/ca.crl", "-noout", "-crlnumber", cwd=pki).stdout
    assert cli(pki, "crl", "--no-reload").code == 0
    after = openssl("crl", "-in", "crl/ca.crl", "-noout", "-crlnumber", cwd=pki).stdout
    assert before != after and nginx_verify(pki, "certs/phone.crt").endswith("OK")
    assert cli(pki, "doctor").code == 0, cli(pki, "doctor").out


def test_the_root_crl_in_a_two_tier_pki(tiered_pki):
    pki = tiered_pki
    set_profile(pki, nginx={"reload_command": "", "test_command": ""})
    if not is_two_tier(pki):
        res = cli(pki, "crl", "--root", "--no-reload")
        assert res.code == 2 and "no separate root" in res.err
        return
    number = lambda: openssl("crl", "-in", "crl/root.crl", "-noout", "-crlnumber", cwd=pki).stdout.strip()  # noqa: E731
    first = number()
    dry = cli(pki, "crl", "--root", "--dry-run")
    assert dry.code == 0
    res = cli(pki, "crl", "--root", "--no-reload")
    assert res.code == 0, res.err
    assert number() != first
    # the root's CRL is signed by the root, and chain.crl carries it beside the issuing CA's
    assert openssl("crl", "-in", "crl/root.crl", "-CAfile", "ca/root.crt", "-noout", cwd=pki, check=False).returncode == 0
    chain = (pki / "crl/chain.crl").read_text()
    assert chain.count("BEGIN X509 CRL") == 2 and (pki / "crl/root.crl").read_text().strip() in chain
    assert cli(pki, "add-client", "after").code == 0
    assert nginx_verify(pki, "certs/after.crt").endswith("OK")


def test_a_server_in_both_tiers_is_served_with_its_chain_and_verifies_as_a_server(tiered_pki):
    pki = tiered_pki
    assert cli(pki, "add-server", "web.example.test", "--san", "DNS:web.example.test").code == 0
    chain = (pki / "certs/web.example.test.fullchain.pem").read_text()
    assert chain.count("BEGIN CERTIFICATE") == (2 if is_two_tier(pki) else 1)
    assert nginx_verify(pki, "certs/web.example.test.crt", "sslserver").endswith("OK")
    assert "unsuitable certificate purpose" in nginx_verify(pki, "certs/web.example.test.crt", "sslclient")
    assert cli(pki, "verify", "web.example.test").code == 1
    assert cli(pki, "verify", "--server", "web.example.test").code == 0
