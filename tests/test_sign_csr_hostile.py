"""sign-csr against hostile CSRs (issue 11): the CSR is read once, inspected structurally, and only what a
client certificate may carry ends up in the certificate.

Every refused case proves exit 2, a one-line "CSR refused: ..." naming each reason, and an unchanged PKI
(tree() before/after). Every issued case re-reads the certificate with openssl (and cryptography for the full
list of extension OIDs) and proves: CA:FALSE, EKU exactly clientAuth, KU digitalSignature (+keyEncipherment
for RSA only), subject exactly CN=NAME, the request's public key, only extensions from {SKI, AKI, BC, KU, EKU,
SAN} (fast_pki has no OCSP, so no AIA), only the SANs that pass `--san`'s validation.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import json
import os
import re
import select
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from .conftest import openssl, tree

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent

PRIVATE_OID = "1.3.6.1.4.1.55555.7.1"
CRITICAL_OID = "1.3.6.1.4.1.55555.7.2"
ALLOWED_EXTENSIONS = {ExtensionOID.SUBJECT_KEY_IDENTIFIER, ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
                      ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE,
                      ExtensionOID.SUBJECT_ALTERNATIVE_NAME}
# The words `openssl req -text` prints as section headers, in an attribute value (FIELD-NOTES: attributes
# are printed before "Requested Extensions:"). \n is an escape openssl's config turns into a newline: the
# value fakes a whole, harmless-looking extension block with the indentation openssl uses.
HEADER_WORDS = "Requested Extensions: Signature Algorithm: X509v3 Basic Constraints: critical CA:TRUE"
FAKE_BLOCK = (r"x\n        Requested Extensions:\n            X509v3 Extended Key Usage: \n"
              r"                TLS Web Client Authentication\n    Signature Algorithm: ecdsa-with-SHA256")


# ------------------------------------------------------------------ building CSRs


def make_key(tmp: Path, key: str = "ec:P-256", name: str = "req") -> Path:
    keyfile = tmp / f"{name}.key"
    kind, _, size = key.partition(":")
    if kind == "rsa":
        openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{size}", "-out", str(keyfile))
    else:
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", f"ec_paramgen_curve:{size}", "-out", str(keyfile))
    return keyfile


def make_csr(tmp: Path, subject: str = "/CN=dev1", *addext: str, key: str = "ec:P-256", name: str = "req") -> Path:
    keyfile, csr = make_key(tmp, key, name), tmp / f"{name}.csr"
    args = ["req", "-new", "-key", str(keyfile), "-out", str(csr), "-subj", subject]
    for ext in addext:
        args += ["-addext", ext]
    openssl(*args)
    return csr


def config_csr(tmp: Path, *, dn: str = "CN=dev1", ext: str = "", attrs: str = "", key: str = "ec:P-256",
               name: str = "req", extra: str = "") -> Path:
    """A CSR from a -config with req_extensions [ext], attributes [attrs] and any extra sections."""
    keyfile, csr, cnf = make_key(tmp, key, name), tmp / f"{name}.csr", tmp / f"{name}.cnf"
    text = "[req]\ndistinguished_name=dn\nprompt=no\nstring_mask=utf8only\n"
    text += "req_extensions=ext\n" if ext else ""
    text += "attributes=attrs\n" if attrs else ""
    text += f"[dn]\n{dn}\n"
    text += f"[ext]\n{ext}\n" if ext else ""
    text += f"[attrs]\n{attrs}\n" if attrs else ""
    cnf.write_text(text + extra)
    openssl("req", "-new", "-key", str(keyfile), "-config", str(cnf), "-out", str(csr))
    return csr


def der_of(csr: Path) -> bytes:
    return base64.b64decode("".join(line for line in csr.read_text().splitlines() if not line.startswith("-----")))


def write_pem(path: Path, der: bytes) -> Path:
    body = base64.encodebytes(der).decode()
    path.write_text(f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n")
    return path


def _tlv(data: bytes, i: int) -> tuple[int, bytes, int]:
    tag, length, j = data[i], data[i + 1], i + 2
    if length & 0x80:
        n = length & 0x7F
        length, j = int.from_bytes(data[j:j + n], "big"), j + n
    return tag, data[j:j + length], j + length


def _enc(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(raw)]) + raw + content


def _replace_tlv(data: bytes, old: bytes, new: bytes) -> bytes:
    """Replace every TLV equal to `old` inside `data`, re-encoding the lengths of the constructed parents."""
    out, i = b"", 0
    while i < len(data):
        start = i
        tag, content, i = _tlv(data, i)
        whole = data[start:i]
        if whole == old:
            out += new
        elif tag & 0x20:
            out += _enc(tag, _replace_tlv(content, old, new))
        else:
            out += whole
    return out


def resign(tmp: Path, csr: Path, key: Path, old: bytes = b"", new: bytes = b"", name: str = "resigned") -> Path:
    """The CSR's CertificationRequestInfo (with `old` TLV replaced by `new`), signed again with `key`."""
    _, body, _ = _tlv(der_of(csr), 0)
    _, cri_content, end = _tlv(body, 0)
    cri = _enc(0x30, cri_content)
    alg_start = end
    _, _, alg_end = _tlv(body, alg_start)
    if old:
        cri = _replace_tlv(cri, old, new)
    (tmp / "cri.der").write_bytes(cri)
    openssl("dgst", "-sha256", "-sign", str(key), "-out", str(tmp / "cri.sig"), str(tmp / "cri.der"))
    sig = (tmp / "cri.sig").read_bytes()
    return write_pem(tmp / f"{name}.csr", _enc(0x30, cri + body[alg_start:alg_end] + _enc(0x03, b"\x00" + sig)))


EXT_REQ_OID = bytes.fromhex("06092a864886f70d01090e")  # 1.2.840.113549.1.9.14 extensionRequest
MS_EXT_REQ_OID = bytes.fromhex("060a2b06010401823702010e")  # 1.3.6.1.4.1.311.2.1.14 msExtReq


def ms_ext_req_csr(tmp: Path) -> Path:
    """CA:TRUE + nameConstraints requested through Microsoft's msExtReq attribute (openssl honours it too:
    X509_REQ_get_extensions reads extensionRequest and msExtReq), correctly self-signed."""
    csr = make_csr(tmp, "/CN=dev1", "basicConstraints=critical,CA:TRUE", "nameConstraints=permitted;DNS:.example.com",
                   name="ms")
    out = resign(tmp, csr, tmp / "ms.key", EXT_REQ_OID, MS_EXT_REQ_OID, name="ms-ext-req")
    said = openssl("req", "-in", str(out), "-noout", "-text", "-verify")
    assert "verify OK" in said.stdout + said.stderr  # a valid self-signature: only the attribute's OID changed
    assert EXT_REQ_OID not in der_of(out) and MS_EXT_REQ_OID in der_of(out)
    assert "CA:TRUE" in said.stdout  # openssl itself reads msExtReq as requested extensions
    return out


def flipped_signature_csr(tmp: Path) -> Path:
    der = der_of(make_csr(tmp, "/CN=dev1", name="flip"))
    return write_pem(tmp / "flipped.csr", der[:-3] + bytes([der[-3] ^ 0x01]) + der[-2:])


def tampered_subject_csr(tmp: Path) -> Path:
    """Signed as CN=dev0, then the subject edited to CN=dev1: it looks perfect, only the signature says no."""
    der = der_of(make_csr(tmp, "/CN=dev0", name="tamper"))
    assert der.count(b"dev0") == 1
    return write_pem(tmp / "tampered.csr", der.replace(b"dev0", b"dev1"))


def foreign_signature_csr(tmp: Path) -> Path:
    """A well-formed signature, but by another key than the one in the request."""
    csr = make_csr(tmp, "/CN=dev1", name="mine")
    return resign(tmp, csr, make_key(tmp, name="someone-else"), name="foreign")


# ------------------------------------------------------------------ checking outcomes


def sign(mtls, pki: Path, csr: Path, name: str = "dev1", *extra: str):
    return mtls(["--pki-dir", str(pki), "sign-csr", str(csr), "--name", name, *extra])


SUBJECT_REASON = ("not CN=dev1", "not exactly CN=dev1")
REFUSED_LINE = re.compile(r"^error: CSR (\S.* )?refused: ")  # "CSR refused:" (the spec) or "CSR <file> refused:"


def assert_refused(mtls, pki: Path, csr: Path, needles, name: str = "dev1", prefix: re.Pattern = REFUSED_LINE):
    """Exit 2, one line naming every reason (each needle: a string or a tuple of alternatives, case-insensitive),
    and not one byte of the PKI changed."""
    before = tree(pki)
    res = sign(mtls, pki, csr, name)
    assert res.code == 2, (res.code, res.out, res.err)
    line = res.err.splitlines()[0] if res.err else ""
    assert prefix.match(line), res.err
    for needle in needles:
        options = needle if isinstance(needle, tuple) else (needle,)
        assert any(o.lower() in line.lower() for o in options), f"reason {options} not named in: {line}"
    assert tree(pki) == before, "a refused CSR changed the PKI"
    assert not (pki / f"certs/{name}.crt").exists()
    return line


def cert_der(crt: Path) -> x509.Certificate:
    der = subprocess.run(["openssl", "x509", "-in", str(crt), "-outform", "DER"], capture_output=True, check=True).stdout
    return x509.load_der_x509_certificate(der)


def pubkey_of_cert(crt: Path) -> str:
    return openssl("x509", "-in", str(crt), "-noout", "-pubkey").stdout


def pubkey_of_key(key: Path) -> str:
    return openssl("pkey", "-in", str(key), "-pubout").stdout


def assert_plain_client(pki: Path, name: str, key: Path, sans: list[str] | None = None, rsa: bool = False) -> x509.Certificate:
    """The certificate at certs/NAME.crt is a plain client certificate of `key`, checked with openssl."""
    crt = pki / f"certs/{name}.crt"
    assert openssl("verify", "-CAfile", "ca/ca.crt", f"certs/{name}.crt", cwd=pki).stdout.strip().endswith("OK")
    assert openssl("x509", "-in", str(crt), "-noout", "-subject", "-nameopt", "RFC2253").stdout.strip() == f"subject=CN={name}"
    assert pubkey_of_cert(crt) == pubkey_of_key(key), "the certificate is not of the requested key"
    ext = openssl("x509", "-in", str(crt), "-noout", "-ext", "basicConstraints,extendedKeyUsage,keyUsage").stdout
    assert re.search(r"Basic Constraints: critical\n\s+CA:FALSE\n", ext), ext
    assert re.search(r"Extended Key Usage: ?(critical)?\n\s+TLS Web Client Authentication\n", ext), ext
    expected_ku = "Digital Signature, Key Encipherment" if rsa else "Digital Signature"
    assert re.search(rf"Key Usage: critical\n\s+{expected_ku}\n", ext), ext
    cert = cert_der(crt)
    oids = {e.oid for e in cert.extensions}
    assert oids <= ALLOWED_EXTENSIONS, f"extensions outside the client profile: {oids - ALLOWED_EXTENSIONS}"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment == rsa
    assert not (ku.key_cert_sign or ku.crl_sign or ku.content_commitment or ku.data_encipherment or ku.key_agreement)
    rdns = list(cert.subject.rdns)
    assert len(rdns) == 1 and len(rdns[0]) == 1
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
    try:
        got = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        got = None
    if not sans:
        assert got is None, f"unexpected SANs {got}"
    else:
        rendered = []
        for gn in got:
            kind = {x509.DNSName: "DNS", x509.IPAddress: "IP", x509.RFC822Name: "email",
                    x509.UniformResourceIdentifier: "URI"}.get(type(gn))
            assert kind, f"SAN of a type mtlsctl does not issue: {gn!r}"
            rendered.append(f"{kind}:{gn.value}")
        assert rendered == sans
    return cert


# ------------------------------------------------------------------ 1a: attributes that fake openssl's text


def test_attribute_with_section_headers_does_not_hide_the_real_extensions(fast_pki, mtls, tmp_path):
    """challengePassword says "Requested Extensions: Signature Algorithm: ...": a parser of `openssl req -text`
    that splits on those words reads the attribute instead of the real extensions (CA:TRUE, nameConstraints,
    a wildcard SAN) and signs them; a structural parse sees them and refuses."""
    csr = config_csr(tmp_path, attrs=f"challengePassword={HEADER_WORDS}\nunstructuredName={FAKE_BLOCK}",
                     ext="basicConstraints=critical,CA:TRUE\nnameConstraints=critical,permitted;DNS:.example.com\n"
                         "subjectAltName=DNS:*.example.com")
    text = openssl("req", "-in", str(csr), "-noout", "-text").stdout
    assert text.count("Requested Extensions:") == 3 and text.index("challengePassword") < text.index("CA:TRUE\n")
    assert_refused(mtls, fast_pki, csr, ["CA:TRUE", "nameConstraints", ("wildcard", "*.example.com")])


def test_header_words_in_an_unstructured_name_alone_are_refused(fast_pki, mtls, tmp_path):
    """The same trick with only the fake block in unstructuredName, in front of a real nameConstraints."""
    csr = config_csr(tmp_path, attrs=f"unstructuredName={FAKE_BLOCK}",
                     ext="nameConstraints=permitted;DNS:.example.com\nauthorityInfoAccess=OCSP;URI:http://evil.example/o")
    assert_refused(mtls, fast_pki, csr, ["nameConstraints", "authorityInfoAccess"])


def test_header_words_in_attributes_of_a_benign_csr_do_not_matter(fast_pki, mtls, tmp_path):
    """Words are not extensions: a benign request whose attributes say "X509v3 Basic Constraints: critical
    CA:TRUE" is issued, as a plain client certificate."""
    csr = config_csr(tmp_path, attrs=f"challengePassword={HEADER_WORDS}\nunstructuredName={FAKE_BLOCK}",
                     ext="extendedKeyUsage=clientAuth\nsubjectAltName=DNS:dev1.example.com")
    res = sign(mtls, fast_pki, csr)
    assert res.code == 0, res.err
    assert_plain_client(fast_pki, "dev1", tmp_path / "req.key", sans=["DNS:dev1.example.com"])


# ------------------------------------------------------------------ 1b, 1e, 1f: each forbidden extension alone

FORBIDDEN = {
    "ca_true_critical": ("basicConstraints=critical,CA:TRUE", ["CA:TRUE"]),
    "ca_true_pathlen": ("basicConstraints=CA:TRUE,pathlen:0", ["CA:TRUE"]),
    "key_cert_sign": ("keyUsage=critical,digitalSignature,keyCertSign", ["keyCertSign"]),
    "crl_sign": ("keyUsage=cRLSign", ["cRLSign"]),
    "name_constraints": ("nameConstraints=critical,permitted;DNS:.example.com", ["nameConstraints"]),
    "name_constraints_noncritical": ("nameConstraints=excluded;DNS:.evil.example", ["nameConstraints"]),
    "certificate_policies": ("certificatePolicies=1.2.3.4.5", ["certificatePolicies"]),
    "any_policy": ("certificatePolicies=critical,2.5.29.32.0", ["certificatePolicies"]),
    "aia_ocsp": ("authorityInfoAccess=OCSP;URI:http://evil.example/ocsp", ["authorityInfoAccess"]),
    "aia_ca_issuers": ("authorityInfoAccess=caIssuers;URI:http://evil.example/ca.crt", ["authorityInfoAccess"]),
    "cdp": ("crlDistributionPoints=URI:http://evil.example/x.crl", ["CRL distribution points"]),
    "eku_server": ("extendedKeyUsage=serverAuth", ["only clientAuth"]),
    "eku_client_and_server": ("extendedKeyUsage=clientAuth,serverAuth", ["only clientAuth"]),
    "eku_any": ("extendedKeyUsage=anyExtendedKeyUsage", ["only clientAuth"]),
    "eku_ocsp_signing": ("extendedKeyUsage=critical,OCSPSigning", ["only clientAuth"]),
    "eku_code_signing": ("extendedKeyUsage=clientAuth,codeSigning", ["only clientAuth"]),
    "unknown_critical": (f"{CRITICAL_OID}=critical,ASN1:UTF8String:obey", [CRITICAL_OID, "critical"]),
}


@pytest.mark.parametrize("case", sorted(FORBIDDEN))
def test_each_forbidden_extension_alone_is_refused(fast_pki, mtls, tmp_path, case):
    ext, needles = FORBIDDEN[case]
    csr = make_csr(tmp_path, "/CN=dev1", ext)
    assert_refused(mtls, fast_pki, csr, needles)


def test_extensions_requested_through_ms_ext_req_are_seen(fast_pki, mtls, tmp_path):
    """openssl reads requested extensions from msExtReq as well as extensionRequest: so must the inspection."""
    assert_refused(mtls, fast_pki, ms_ext_req_csr(tmp_path), ["CA:TRUE", "nameConstraints"])


# ------------------------------------------------------------------ 1c: several reasons at once


def test_every_reason_of_a_combined_csr_is_named_on_one_line(fast_pki, mtls, tmp_path):
    csr = config_csr(
        tmp_path, key="rsa:1024", dn="O=Evil\nCN=other",
        ext="basicConstraints=critical,CA:TRUE\nkeyUsage=keyCertSign,cRLSign\n"
            "nameConstraints=permitted;DNS:.example.com\ncertificatePolicies=1.2.3.4\n"
            "authorityInfoAccess=OCSP;URI:http://evil.example/o\ncrlDistributionPoints=URI:http://evil.example/c\n"
            f"extendedKeyUsage=serverAuth\n{CRITICAL_OID}=critical,ASN1:NULL\n"
            "subjectAltName=DNS:*.example.com,otherName:1.3.6.1.4.1.311.20.2.3;UTF8:admin@corp.example",
        attrs=f"challengePassword={HEADER_WORDS}")
    line = assert_refused(mtls, fast_pki, csr, [
        SUBJECT_REASON, "at least RSA 2048", "CA:TRUE", "keyCertSign", "nameConstraints", "certificatePolicies",
        "authorityInfoAccess", "CRL distribution points", "only clientAuth", CRITICAL_OID,
        ("wildcard", "*.example.com"), "othername"])
    assert "\n" not in line


# ------------------------------------------------------------------ 1d: SANs that --san would refuse

BAD_SANS = {
    "upn_other_name": ("subjectAltName=otherName:1.3.6.1.4.1.311.20.2.3;UTF8:x@y", ("othername",)),
    "registered_id": ("subjectAltName=DNS:dev1.example.com,RID:1.2.3.4", ("registeredid", "registered id", "rid")),
    "wildcard": ("subjectAltName=DNS:*.example.com", ("wildcard", "*.example.com")),
    "wildcard_among_good": ("subjectAltName=DNS:dev1.example.com,DNS:*.example.com", ("wildcard", "*.example.com")),
}


@pytest.mark.parametrize("case", sorted(BAD_SANS))
def test_sans_outside_dns_ip_email_uri_or_invalid_are_refused(fast_pki, mtls, tmp_path, case):
    ext, needle = BAD_SANS[case]
    assert_refused(mtls, fast_pki, make_csr(tmp_path, "/CN=dev1", ext), [needle])


def test_a_dirname_san_is_refused(fast_pki, mtls, tmp_path):
    csr = config_csr(tmp_path, ext="subjectAltName=dirName:dir_sect", extra="[dir_sect]\nCN=admin\n")
    assert_refused(mtls, fast_pki, csr, [("dirname", "directory name")])


def test_a_san_entry_with_a_comma_inside_is_refused(fast_pki, mtls, tmp_path):
    """One DNS entry whose value is "ok.example.com,IP:10.0.0.1": rejoined as text it would become two."""
    csr = config_csr(tmp_path, ext="subjectAltName=@alt", extra="[alt]\nDNS.1 = ok.example.com,IP:10.0.0.1\n")
    assert_refused(mtls, fast_pki, csr, [("comma", "ok.example.com,IP:10.0.0.1")])


def test_a_san_uri_with_a_hash_is_refused(fast_pki, mtls, tmp_path):
    """FIELD-NOTES: `#` cuts an openssl -addext value; a URI carrying one is refused, like --san."""
    csr = config_csr(tmp_path, ext="subjectAltName=@alt", extra="[alt]\nURI.1 = https://dev1.example.com/a\\#frag\n")
    assert "URI:https://dev1.example.com/a#frag" in openssl("req", "-in", str(csr), "-noout", "-text").stdout
    assert_refused(mtls, fast_pki, csr, ["#"])


# ------------------------------------------------------------------ 1f: harmless extensions: issued without them


def test_a_private_non_critical_extension_is_not_copied_and_reported_in_json(fast_pki, mtls, tmp_path):
    csr = make_csr(tmp_path, "/CN=dev1", f"{PRIVATE_OID}=ASN1:UTF8String:hello", "subjectAltName=DNS:dev1.example.com")
    res = sign(mtls, fast_pki, csr, "dev1", "--json")
    assert res.code == 0, res.err
    assert_plain_client(fast_pki, "dev1", tmp_path / "req.key", sans=["DNS:dev1.example.com"])
    assert PRIVATE_OID not in openssl("x509", "-in", str(fast_pki / "certs/dev1.crt"), "-noout", "-text").stdout
    out = json.loads(res.out)
    assert out["sans"] == ["DNS:dev1.example.com"]
    assert [e for e in out["not_copied"] if PRIVATE_OID in e], f"the dropped extension is not reported: {out}"


def test_a_requested_subject_key_identifier_is_not_copied_and_reported(fast_pki, mtls, tmp_path):
    """The spec names SKI among the harmless extensions that are issued without and reported as not copied."""
    csr = make_csr(tmp_path, "/CN=dev1", "subjectKeyIdentifier=DEADBEEF01")
    res = sign(mtls, fast_pki, csr, "dev1", "--json")
    assert res.code == 0, res.err
    cert = assert_plain_client(fast_pki, "dev1", tmp_path / "req.key")
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert ski != bytes.fromhex("DEADBEEF01"), "the CSR's subjectKeyIdentifier was copied"
    out = json.loads(res.out)
    assert [e for e in out["not_copied"] if re.search(r"subject ?key ?identifier|2\.5\.29\.14", e, re.I)], out


def test_a_private_non_critical_extension_is_reported_as_not_copied(fast_pki, mtls, tmp_path):
    csr = make_csr(tmp_path, "/CN=dev1", f"{PRIVATE_OID}=ASN1:UTF8String:hello")
    res = sign(mtls, fast_pki, csr)
    assert res.code == 0, res.err
    assert_plain_client(fast_pki, "dev1", tmp_path / "req.key")
    said = res.out + res.err
    assert "not copied" in said and PRIVATE_OID in said, said


def test_a_private_critical_extension_is_refused(fast_pki, mtls, tmp_path):
    csr = make_csr(tmp_path, "/CN=dev1", f"{PRIVATE_OID}=critical,ASN1:UTF8String:hello")
    assert_refused(mtls, fast_pki, csr, [PRIVATE_OID, "critical"])


# ------------------------------------------------------------------ 1g: the subject, exactly CN=NAME

SUBJECTS = ["/O=Evil/CN=dev1", "/CN=dev2", "/CN=dev1/CN=dev2", "/CN=dev2/CN=dev1", "/CN=dev1+O=Evil",
            "/CN=dev1/emailAddress=dev1@example.com", "/CN=DEV1", "/", "/CN=dev1/OU=admins"]


@pytest.mark.parametrize("subject", SUBJECTS)
def test_a_subject_other_than_exactly_cn_name_is_refused(fast_pki, mtls, tmp_path, subject):
    assert_refused(mtls, fast_pki, make_csr(tmp_path, subject), [SUBJECT_REASON])


# ------------------------------------------------------------------ 1h: keys


@pytest.mark.parametrize("key,needle", [("rsa:1024", "at least RSA 2048"), ("ec:secp256k1", "P-256"),
                                        ("ec:prime192v1", "P-256")])
def test_weak_keys_are_refused(fast_pki, mtls, tmp_path, key, needle):
    assert_refused(mtls, fast_pki, make_csr(tmp_path, "/CN=dev1", key=key), [needle])


def test_an_rsa_2048_request_gets_key_encipherment_and_an_ec_one_does_not(fast_pki, mtls, tmp_path):
    rsa = make_csr(tmp_path, "/CN=dev-rsa", key="rsa:2048", name="rsa")
    ec = make_csr(tmp_path, "/CN=dev-ec", name="ec")
    assert sign(mtls, fast_pki, rsa, "dev-rsa").code == 0
    assert sign(mtls, fast_pki, ec, "dev-ec").code == 0
    assert_plain_client(fast_pki, "dev-rsa", tmp_path / "rsa.key", rsa=True)
    assert_plain_client(fast_pki, "dev-ec", tmp_path / "ec.key", rsa=False)


def test_good_sans_of_every_type_are_carried_over_and_nothing_else(fast_pki, mtls, tmp_path):
    csr = make_csr(tmp_path, "/CN=dev1",
                   "subjectAltName=DNS:dev1.example.com,IP:10.0.0.5,email:ops@example.com,URI:spiffe://example.org/dev1",
                   "basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature", "extendedKeyUsage=clientAuth")
    res = sign(mtls, fast_pki, csr, "dev1", "--json")
    assert res.code == 0, res.err
    sans = ["DNS:dev1.example.com", "IP:10.0.0.5", "email:ops@example.com", "URI:spiffe://example.org/dev1"]
    assert json.loads(res.out)["sans"] == sans
    assert_plain_client(fast_pki, "dev1", tmp_path / "req.key", sans=sans)


# ------------------------------------------------------------------ 1i: broken self-signatures


@pytest.mark.parametrize("build", [flipped_signature_csr, tampered_subject_csr, foreign_signature_csr],
                         ids=["flipped-byte", "tampered-subject", "signed-by-another-key"])
def test_a_broken_self_signature_is_refused(fast_pki, mtls, tmp_path, build):
    csr = build(tmp_path)
    said = openssl("req", "-in", str(csr), "-noout", "-verify", check=False)
    assert "verify OK" not in said.stdout + said.stderr  # openssl itself says it is broken (whatever its exit code)
    assert_refused(mtls, fast_pki, csr, ["signature does not verify"], prefix=re.compile("^error: "))


# ------------------------------------------------------------------ renewal re-signs only what sign-csr issued


def test_renewing_a_signed_csr_copies_nothing_sign_csr_dropped(fast_pki, mtls, tmp_path):
    """renew re-signs certs/NAME.csr: a `copy_extensions = copy` there would bring back the private extension
    sign-csr did not copy; the SAN that was carried over stays."""
    csr = make_csr(tmp_path, "/CN=dev1", f"{PRIVATE_OID}=ASN1:UTF8String:hello", "subjectAltName=DNS:dev1.example.com")
    assert sign(mtls, fast_pki, csr).code == 0
    first = cert_der(fast_pki / "certs/dev1.crt").serial_number
    res = mtls(["--pki-dir", str(fast_pki), "renew", "--within", "3650", "--no-reload", "--json"])
    assert res.code == 0, res.err
    assert cert_der(fast_pki / "certs/dev1.crt").serial_number != first
    assert_plain_client(fast_pki, "dev1", tmp_path / "req.key", sans=["DNS:dev1.example.com"])


# ------------------------------------------------------------------ 2: the CSR swapped while it is being signed

IN_ACCESS, IN_OPEN = 0x00000001, 0x00000020


class SwapOnOpen(threading.Thread):
    """Linux inotify (ctypes on libc): after the N-th open of the watched file by anyone, rename a hostile
    CSR over its path. A reader holding the file open keeps reading the original (same inode); whoever opens
    the path again gets the hostile one."""

    def __init__(self, path: Path, hostile: Path, after_opens: int) -> None:
        super().__init__(daemon=True)
        self.path, self.hostile, self.after_opens = path, hostile, after_opens
        self.opens = 0
        self.swapped = threading.Event()
        self.stop = threading.Event()
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        wd = libc.inotify_add_watch(self.fd, str(path).encode(), IN_OPEN | IN_ACCESS)
        assert wd >= 0, os.strerror(ctypes.get_errno())

    def run(self) -> None:
        try:
            while not self.stop.is_set() and not self.swapped.is_set():
                ready, _, _ = select.select([self.fd], [], [], 0.02)
                if not ready:
                    continue
                data = os.read(self.fd, 4096)
                i = 0
                while i < len(data):
                    _wd, mask, _cookie, length = struct.unpack_from("iIII", data, i)
                    i += 16 + length
                    if mask & IN_OPEN:
                        self.opens += 1
                        if self.opens == self.after_opens and not self.swapped.is_set():
                            os.replace(self.hostile, self.path)
                            self.swapped.set()
        finally:
            os.close(self.fd)


SWAPPED_IN = {
    # the spec's: a sub-CA request for another name
    "ca-true-other-cn": ("/CN=evil", "basicConstraints=critical,CA:TRUE", "extendedKeyUsage=clientAuth"),
    # the stealthy one: the right name, another key, and what the client section does not pin
    "same-cn-other-key": ("/CN=dev1", "nameConstraints=permitted;DNS:.example.com",
                          "authorityInfoAccess=OCSP;URI:http://evil.example/ocsp", "extendedKeyUsage=clientAuth"),
}


@pytest.mark.parametrize("swapped_in", sorted(SWAPPED_IN))
@pytest.mark.parametrize("after_opens", [1, 2], ids=["after-first-open", "after-second-open"])
def test_a_csr_swapped_during_signing_is_not_what_gets_signed(fast_pki, tmp_path, after_opens, swapped_in):
    """The file is replaced (rename over its path) by another request as soon as mtlsctl has opened it once
    (or twice). Read once into memory, the benign request is the one inspected and signed; a sign-csr that
    opens the file again (to inspect it, or to hand it to `openssl ca -in FILE`) inspects or signs the other."""
    benign = make_csr(tmp_path, "/CN=dev1", "subjectAltName=DNS:dev1.example.com", name="benign")
    benign_bytes = benign.read_bytes()
    subject, *exts = SWAPPED_IN[swapped_in]
    hostile = make_csr(tmp_path, subject, *exts, name="hostile")
    hostile_bytes = hostile.read_bytes()
    csr = tmp_path / "incoming" / "dev1.csr"
    csr.parent.mkdir()
    csr.write_bytes(benign_bytes)
    swapper = SwapOnOpen(csr, hostile, after_opens)
    swapper.start()
    try:
        res = subprocess.run([sys.executable, "-m", "mtlsctl", "--pki-dir", str(fast_pki), "sign-csr", str(csr),
                              "--name", "dev1"], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        time.sleep(0.1)  # let the watcher drain the last events
        swapper.stop.set()
        swapper.join(5)
    if after_opens == 1:
        assert swapper.swapped.is_set(), "mtlsctl never opened the CSR file?"
        assert csr.read_bytes() == hostile_bytes  # the swap really happened under it
    assert res.returncode == 0, (f"{swapper.opens} opens", res.stdout, res.stderr)
    crt = fast_pki / "certs/dev1.crt"
    assert pubkey_of_cert(crt) == pubkey_of_key(tmp_path / "benign.key"), f"signed the swapped-in request ({swapper.opens} opens)"
    assert_plain_client(fast_pki, "dev1", tmp_path / "benign.key", sans=["DNS:dev1.example.com"])
    # the copy kept for renew is the request that was inspected and signed
    kept = fast_pki / "certs/dev1.csr"
    assert openssl("req", "-in", str(kept), "-noout", "-pubkey").stdout == pubkey_of_key(tmp_path / "benign.key")
