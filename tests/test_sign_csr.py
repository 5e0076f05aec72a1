"""sign-csr: hostile CSRs are refused with their reasons; a good one is signed with its SANs."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from .conftest import openssl, tree, x509_text

pytestmark = pytest.mark.integration


def make_csr(tmp: Path, subject: str = "/CN=dev1", *addext: str, key: str = "ec:P-256", name: str = "req") -> Path:
    keyfile, csr = tmp / f"{name}.key", tmp / f"{name}.csr"
    kind, _, size = key.partition(":")
    if kind == "rsa":
        openssl("genrsa", "-out", str(keyfile), size)
    elif kind == "ec":
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", f"ec_paramgen_curve:{size}", "-out", str(keyfile))
    else:
        openssl("genpkey", "-algorithm", kind, "-out", str(keyfile))
    args = ["req", "-new", "-key", str(keyfile), "-out", str(csr), "-subj", subject]
    for ext in addext:
        args += ["-addext", ext]
    openssl(*args)
    return csr


def test_a_good_csr_is_signed_with_its_sans(fast_pki, mtls, tmp_path):
    csr = make_csr(tmp_path, "/CN=dev1", "subjectAltName=DNS:dev1.example.com,email:ops@example.com",
                   "extendedKeyUsage=clientAuth", "keyUsage=digitalSignature")
    res = mtls(["--pki-dir", str(fast_pki), "sign-csr", str(csr), "--name", "dev1", "--json"])
    assert res.code == 0, res.err
    out = json.loads(res.out)
    assert out["sans"] == ["DNS:dev1.example.com", "email:ops@example.com"]
    text = x509_text(fast_pki / "certs/dev1.crt")
    assert re.search(r"Basic Constraints: critical\s+CA:FALSE", text)
    assert "DNS:dev1.example.com, email:ops@example.com" in text
    assert openssl("verify", "-CAfile", "ca/ca.crt", "certs/dev1.crt", cwd=fast_pki).stdout.strip().endswith("OK")
    assert not (fast_pki / "private/dev1.key").exists()  # the key never came here
    # the CSR is kept for renew, and renew re-signs it
    assert (fast_pki / "certs/dev1.csr").read_bytes() == csr.read_bytes()


HOSTILE = {
    "ca_true": (("/CN=dev1", "basicConstraints=critical,CA:TRUE"), "CA:TRUE"),
    "key_cert_sign": (("/CN=dev1", "keyUsage=critical,keyCertSign,cRLSign"), "keyCertSign"),
    "name_constraints": (("/CN=dev1", "nameConstraints=permitted;DNS:.example.com"), "nameConstraints"),
    "aia": (("/CN=dev1", "authorityInfoAccess=OCSP;URI:http://evil.example/ocsp"), "authorityInfoAccess"),
    "cdp": (("/CN=dev1", "crlDistributionPoints=URI:http://evil.example/x.crl"), "CRL distribution points"),
    "server_auth_only": (("/CN=dev1", "extendedKeyUsage=serverAuth"), "only clientAuth"),
    "extra_eku": (("/CN=dev1", "extendedKeyUsage=clientAuth,codeSigning"), "only clientAuth"),
    "wrong_cn": (("/CN=someone-else",), "not CN=dev1"),
    "extra_rdn": (("/O=Evil/CN=dev1",), "not CN=dev1"),
    "bad_san": (("/CN=dev1", "subjectAltName=DNS:bad_name!.example"), "SAN"),
    "dirname_san": (("/CN=dev1", "subjectAltName=dirName:dir_sect"), None),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_csrs_are_refused_with_the_reason(fast_pki, mtls, tmp_path, case):
    (subject, *exts), needle = HOSTILE[case]
    if case == "dirname_san":
        csr = _dirname_csr(tmp_path)
        needle = "type mtlsctl does not accept"
    else:
        csr = make_csr(tmp_path, subject, *exts)
    before = tree(fast_pki)
    res = mtls(["--pki-dir", str(fast_pki), "sign-csr", str(csr), "--name", "dev1"])
    assert res.code == 2, (res.out, res.err)
    assert res.err.startswith("error: CSR refused:") and needle in res.err, res.err
    assert tree(fast_pki) == before


def _dirname_csr(tmp_path: Path) -> Path:
    cnf = tmp_path / "dn.cnf"
    cnf.write_text("[req]\ndistinguished_name=dn\nreq_extensions=ext\nprompt=no\n[dn]\nCN=dev1\n"
                   "[ext]\nsubjectAltName=dirName:dir_sect\n[dir_sect]\nCN=admin\n")
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(tmp_path / "d.key"))
    openssl("req", "-new", "-key", str(tmp_path / "d.key"), "-out", str(tmp_path / "d.csr"), "-config", str(cnf))
    return tmp_path / "d.csr"


@pytest.mark.parametrize("key,needle", [("rsa:1024", "at least RSA 2048"), ("ec:secp521r1", "use P-256 or P-384"),
                                        ("ED25519", "not supported")])
def test_weak_or_unsupported_keys_are_refused(fast_pki, mtls, tmp_path, key, needle):
    csr = make_csr(tmp_path, "/CN=dev1", key=key)
    res = mtls(["--pki-dir", str(fast_pki), "sign-csr", str(csr), "--name", "dev1"])
    assert res.code == 2 and needle in res.err, res.err


def test_a_csr_whose_signature_is_broken_is_refused(fast_pki, mtls, tmp_path):
    """FIELD-NOTES: `openssl req -verify` exits 0 on a broken self-signature; mtlsctl reads its words."""
    csr = make_csr(tmp_path)
    der = base64.b64decode("".join(csr.read_text().splitlines()[1:-1]))
    broken = der[:-3] + bytes([der[-3] ^ 0x01]) + der[-2:]  # flip a bit in the signature
    body = base64.encodebytes(broken).decode()
    bad = tmp_path / "broken.csr"
    bad.write_text(f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n")
    res = mtls(["--pki-dir", str(fast_pki), "sign-csr", str(bad), "--name", "dev1"])
    assert res.code == 2 and "self-signature does not verify" in res.err


def test_several_reasons_are_all_named(fast_pki, mtls, tmp_path):
    csr = make_csr(tmp_path, "/CN=other", "basicConstraints=critical,CA:TRUE", "extendedKeyUsage=serverAuth", key="rsa:1024")
    res = mtls(["--pki-dir", str(fast_pki), "sign-csr", str(csr), "--name", "dev1"])
    assert res.code == 2
    for needle in ("not CN=dev1", "at least RSA 2048", "CA:TRUE", "only clientAuth"):
        assert needle in res.err


def test_not_a_csr_and_missing_file(fast_pki, mtls, tmp_path):
    junk = tmp_path / "junk.csr"
    junk.write_text("hello\n")
    assert mtls(["--pki-dir", str(fast_pki), "sign-csr", str(junk), "--name", "dev1"]).code == 2
    assert mtls(["--pki-dir", str(fast_pki), "sign-csr", str(tmp_path / "none.csr"), "--name", "dev1"]).code == 2
