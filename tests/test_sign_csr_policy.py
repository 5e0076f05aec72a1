"""Findings of the attack review of issue 11, each pinned by a test that fails without its fix.

F1 an allowlist regex that PCRE and Python parse differently; F2 wildcard policy one rule for issuance and
renewal; F3 the backtick openssl.cnf silently drops; F4 the PKI path as written into openssl.cnf; F5 a
stored CSR that is not the renewed certificate's; F6 a hand-edited openssl.cnf whose CA section is not
[ CA_default ]; F7 keys cryptography normalises (explicit EC parameters, RSA-PSS); F8 requests that must be
bad input (exit 2), not a bug or a late openssl failure; and no PKCS#12 bundle of a server's key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtlsctl.profile import allow_regex

from .conftest import ca_status, openssl, run_cli, set_profile, tree

pytestmark = pytest.mark.integration


def cli(pki: Path, *args: str):
    return run_cli(["--pki-dir", str(pki), *args])


def _ec_key(path: Path) -> Path:
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
    return path


def _csr(tmp: Path, key: Path, *extra: str, name: str = "req.csr") -> Path:
    out = tmp / name
    openssl("req", "-new", "-key", str(key), "-out", str(out), *extra)
    return out


def _refused(res, *needles: str) -> None:
    assert res.code == 2, (res.code, res.out, res.err)
    assert "Traceback" not in res.err and all(n in res.err for n in needles), res.err


# ------------------------------------------------------------------ F1


@pytest.mark.parametrize("entry", [
    "~CN=admin[[:digit:](])|(.*[[:digit:])]",   # PCRE: POSIX class; Python: nested set -> the wrapper closes early in nginx
    "~CN=(?i)admin",                             # inline flag: case-insensitive in one engine's terms
    "~CN=admin\\Kx",                             # PCRE-only escape
    "~CN=a(*ACCEPT)",                            # PCRE verb
    "~CN=[[a]]",                                 # nested set
])
def test_allowlist_regexes_the_two_engines_could_read_differently_are_refused(entry):
    with pytest.raises(ValueError, match="Python and nginx's PCRE read alike"):
        allow_regex(entry)


def test_plain_allowlist_regexes_still_render_anchored():
    assert allow_regex("~CN=ops-[a-z0-9]+") == "^(?:CN=ops-[a-z0-9]+)$"
    assert allow_regex("~CN=(?:alice|bob)\\.lab") == "^(?:CN=(?:alice|bob)\\.lab)$"


# ------------------------------------------------------------------ F2


def test_wildcards_one_rule_for_issuance_and_renewal(fast_pki):
    set_profile(fast_pki, nginx={"reload_command": "", "test_command": ""})
    before = tree(fast_pki)
    _refused(cli(fast_pki, "add-client", "wc", "--san", "DNS:*.example.test"), "wildcards are issued to servers only")
    assert tree(fast_pki) == before
    assert cli(fast_pki, "add-server", "wild", "--san", "DNS:*.example.test", "--san", "DNS:example.test").code == 0
    res = cli(fast_pki, "renew", "--within", "3650", "--json")
    assert res.code == 0, res.err
    assert [r["name"] for r in json.loads(res.out)["renewed"]] == ["wild"]
    sans = openssl("x509", "-in", "certs/wild.crt", "-noout", "-ext", "subjectAltName", cwd=fast_pki).stdout
    assert "DNS:*.example.test" in sans and "DNS:example.test" in sans


# ------------------------------------------------------------------ F3, F4


def test_a_backtick_is_refused_where_openssl_cnf_would_drop_it(fast_pki, tmp_path):
    _refused(cli(fast_pki, "add-client", "bt", "--san", "URI:https://a.example/x`y"), "'`'")
    prof = tmp_path / "p.yaml"
    prof.write_text('ca: {subject: {CN: "R3 `Root` CA"}, key: {type: ec}}\n')
    _refused(run_cli(["--pki-dir", str(tmp_path / "p"), "--profile", str(prof), "init"]), "backtick (`)")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("evil", ["w#2", "q`x`", "h$me"])
def test_the_pki_path_is_checked_as_written_into_openssl_cnf(tmp_path, evil):
    """A relative --pki-dir (or ~) is made absolute; the absolute path is what openssl.cnf holds."""
    where = tmp_path / evil
    where.mkdir()
    code = "from mtlsctl.cli import main; main(['--pki-dir', 'pki', 'init', '--dry-run'])"
    bad = repr(evil[1])
    res = subprocess.run([sys.executable, "-c", code], cwd=where, capture_output=True, text=True)
    assert res.returncode == 2 and "PKI directory" in res.stderr and bad in res.stderr, res.stderr
    assert not (where / "pki").exists()
    res = subprocess.run([sys.executable, "-c", "from mtlsctl.cli import main; main(['--pki-dir', '~/pki', 'init', '--dry-run'])"],
                         cwd=tmp_path, env={**os.environ, "HOME": str(where)}, capture_output=True, text=True)
    assert res.returncode == 2 and "PKI directory" in res.stderr and bad in res.stderr, res.stderr


# ------------------------------------------------------------------ F5


def test_renew_refuses_a_stored_csr_that_is_not_the_certificates(fast_pki, tmp_path):
    set_profile(fast_pki, nginx={"reload_command": "", "test_command": ""})
    alice = json.loads(cli(fast_pki, "add-client", "alice", "--days", "3", "--json").out)
    other = _csr(tmp_path, _ec_key(tmp_path / "other.key"), "-subj", "/CN=alice", "-addext", "subjectAltName=DNS:bank.example")
    (fast_pki / "certs/alice.csr").write_bytes(other.read_bytes())
    res = cli(fast_pki, "renew", "--json")
    assert res.code == 1
    failed = json.loads(res.out)["failed"]
    assert [f["name"] for f in failed] == ["alice"] and "does not belong to the certificate" in failed[0]["error"]
    assert ca_status(fast_pki, alice["serial"]) == "Valid"  # the old certificate is untouched, not revoked


# ------------------------------------------------------------------ F6


def test_a_renamed_ca_section_still_gets_copy_extensions_none(fast_pki, tmp_path):
    """default_ca in the default section, the CA section renamed, copyall: the override must reach the section
    openssl uses (-name), and a requested SKI or a critical SAN must not reach the certificate."""
    cnf = fast_pki / "openssl.cnf"
    text = cnf.read_text().replace("[ ca ]\ndefault_ca = CA_default\n", "").replace("[ CA_default ]", "[ my_ca ]")
    text = text.replace("copy_extensions   = copy\n", "copy_extensions   = copyall\n")
    cnf.write_text("default_ca = my_ca\n" + text)
    csr = _csr(tmp_path, _ec_key(tmp_path / "d.key"), "-subj", "/CN=dev1",
               "-addext", "subjectKeyIdentifier=0101010101010101010101010101010101010101",
               "-addext", "subjectAltName=critical,DNS:s1.example")
    res = cli(fast_pki, "sign-csr", str(csr), "--name", "dev1")
    assert res.code == 0, res.err
    text = openssl("x509", "-in", "certs/dev1.crt", "-noout", "-text", cwd=fast_pki).stdout
    assert "01:01:01:01" not in text and "Subject Alternative Name: critical" not in text
    assert "DNS:s1.example" in text


# ------------------------------------------------------------------ F7, F8


@pytest.mark.parametrize("kind", ["explicit-ec", "rsa-pss"])
def test_keys_that_cryptography_normalises_are_refused(fast_pki, tmp_path, kind):
    key = tmp_path / "k.pem"
    if kind == "explicit-ec":
        openssl("ecparam", "-name", "prime256v1", "-param_enc", "explicit", "-genkey", "-noout", "-out", str(key))
    else:
        openssl("genpkey", "-algorithm", "RSA-PSS", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key))
    csr = _csr(tmp_path, key, "-subj", "/CN=dev1")
    before = tree(fast_pki)
    _refused(cli(fast_pki, "sign-csr", str(csr), "--name", "dev1"), "CSR refused", "not encoded as a plain")
    assert tree(fast_pki) == before


def test_a_version_2_request_is_bad_input_not_a_bug(fast_pki, tmp_path):
    csr = _csr(tmp_path, _ec_key(tmp_path / "k.pem"), "-subj", "/CN=dev1", "-outform", "DER")
    der = bytearray(csr.read_bytes())
    at = der.index(bytes([0x02, 0x01, 0x00]))  # the first INTEGER of CertificationRequestInfo: version 0
    der[at + 2] = 0x01
    csr.write_bytes(bytes(der))
    _refused(cli(fast_pki, "sign-csr", str(csr), "--name", "dev1"), "not a readable certificate request")


def test_a_bmpstring_cn_is_refused_before_openssl_signs_it(fast_pki, tmp_path):
    conf = tmp_path / "bmp.cnf"
    conf.write_text("[req]\ndistinguished_name=dn\nstring_mask=MASK:0x800\nprompt=no\n[dn]\nCN=dev1\n")
    csr = _csr(tmp_path, _ec_key(tmp_path / "k.pem"), "-config", str(conf))
    assert "BMPSTRING" in openssl("asn1parse", "-in", str(csr)).stdout
    before = tree(fast_pki)
    _refused(cli(fast_pki, "sign-csr", str(csr), "--name", "dev1"), "not CN=dev1")
    assert tree(fast_pki) == before


def test_no_bundle_of_a_server_key(fast_pki):
    assert cli(fast_pki, "add-server", "web.example.test", "--san", "DNS:web.example.test").code == 0
    _refused(cli(fast_pki, "export", "web.example.test"), "not a client certificate")
    assert not (fast_pki / "certs/web.example.test.p12").exists()
