"""Every artifact mtlsctl issues passes pkilint, an independent RFC 5280/5480 linter nobody here wrote (issue 11).

pkilint (DigiCert, PyPI) is driven in-process through its own console-script entry points (`lint_pkix_cert`,
`lint_crl`, `lint_pkix_signer_signee_cert_chain`, the `main(argv)` their wrappers call) with `-f JSON -s ALL`, on the
DER form of each file (openssl ca's PEM files carry a text dump before the block). Each PKI, single-tier and
two-tier (profile ca.intermediate), is built once per module with EC CAs, through the CLI only.

A finding of severity FATAL, ERROR or WARNING fails the test unless ALLOWED lists it with the reason it does not
apply. The negative controls at the end prove that the linters used here are live: pkilint must flag an EC
certificate with keyEncipherment, a CRL without authorityKeyIdentifier and a certificate paired with the wrong issuer.

pkilint is a test dependency (`pip install '.[test]'`): it is imported, never skipped.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkilint.bin import lint_crl, lint_pkix_cert, lint_pkix_signer_signee_cert_chain

from .conftest import openssl, run_cli

pytestmark = pytest.mark.integration

# (artifact kind, finding code) -> why it does not apply. Only WARNING-level codes belong here: FATAL and ERROR
# are never allowed. Empty: pkilint 0.13.3 reports no WARNING on any artifact (only INFO
# pkix.subject_key_identifier_method_1_identified, the SKI being the SHA-1 of the key, as RFC 5280 suggests).
ALLOWED: dict[tuple[str, str], str] = {}
BLOCKING = {"FATAL", "ERROR", "WARNING"}

TIERS = ("single", "two")
# kind -> (file in the PKI, tiers it exists in)
CERTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ca": ("ca/ca.crt", TIERS),  # the CA (single tier) or the issuing CA (two tiers)
    "root": ("ca/root.crt", ("two",)),
    "client-rsa": ("certs/client-rsa.crt", TIERS),
    "client-ec": ("certs/client-ec.crt", TIERS),
    "server-rsa": ("certs/rsa.mtls.test.crt", TIERS),
    "server-ec": ("certs/ec.mtls.test.crt", TIERS),
    "ocsp-signer": ("certs/ocsp-responder.crt", TIERS),
    "sign-csr-ec": ("certs/device-ec.crt", TIERS),
    "sign-csr-rsa": ("certs/device-rsa.crt", TIERS),
}
CRLS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # kind -> (file, pkilint CRL type, tiers). The root's CRL covers CA certificates only: an ARL (the type
    # changes nothing under the PKIX profile, it is given for accuracy).
    "crl": ("crl/ca.crl", "CRL", TIERS),
    "root-crl": ("crl/root.crl", "ARL", ("two",)),
}
LEAVES = [k for k in CERTS if k not in ("ca", "root")]

# What the keyUsage fix produces (RFC 5480 section 3: no keyEncipherment with an EC key).
RSA_LEAF_KU = {"digital_signature", "key_encipherment"}
EC_LEAF_KU = {"digital_signature"}


class Finding(NamedTuple):
    severity: str
    code: str
    message: str | None
    node: str


def _pkilint(main: Callable[[list[str]], int], *args: str) -> list[Finding]:
    """Run one pkilint console script in-process; every finding, INFO included."""
    out, err = io.StringIO(), io.StringIO()
    # pkilint's argparse.FileType leaves its input open: silence that ResourceWarning, nothing else.
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        main(["lint", *args[:-1], "-f", "JSON", "-s", "ALL", args[-1]])
    try:
        report = json.loads(out.getvalue())
    except json.JSONDecodeError:
        pytest.fail(f"pkilint could not read {args[-1]}: {err.getvalue().strip() or out.getvalue().strip()}")
    return [Finding(f["severity"], f["code"], f["message"], r["node_path"])
            for r in report["results"] for f in r["finding_descriptions"]]


def _der(pem: Path, kind: str, dest_dir: Path) -> Path:
    """openssl x509|crl -outform DER: drops the text dump openssl ca writes before the PEM block."""
    der = dest_dir / (pem.name + ".der")
    openssl(kind, "-in", str(pem), "-outform", "DER", "-out", str(der))
    return der


def lint_cert(pem: Path, work: Path) -> list[Finding]:
    return _pkilint(lint_pkix_cert.main, str(_der(pem, "x509", work)))


def lint_crl_file(pem: Path, crl_type: str, work: Path) -> list[Finding]:
    return _pkilint(lint_crl.main, "-t", crl_type, "-p", "PKIX", str(_der(pem, "crl", work)))


def lint_pair(issuer: Path, subject: Path, work: Path) -> list[Finding]:
    """Issuer/subject chaining: names, AKI = issuer's SKI, policies, and the signature itself."""
    i_der, s_der = _der(issuer, "x509", work / "issuer"), _der(subject, "x509", work / "subject")
    return _pkilint(lint_pkix_signer_signee_cert_chain.main, str(i_der), str(s_der))


def blocking(kind: str, findings: list[Finding], also: frozenset[str] = frozenset()) -> list[Finding]:
    return [f for f in findings if (f.severity in BLOCKING or f.code in also) and (kind, f.code) not in ALLOWED]


def _report(findings: list[Finding]) -> str:
    return "\n".join(f"  {f.severity} {f.code} @ {f.node}: {f.message or ''}" for f in findings)


# --------------------------------------------------------------------------------------------- the PKIs

def _profile(tier: str) -> dict:
    ca: dict = {"subject": {"CN": "Lint Root CA", "O": "mtlsctl tests"}, "key": {"type": "ec", "curve": "P-256"},
                "days": 800}
    if tier == "two":
        ca["intermediate"] = {"subject": {"CN": "Lint Issuing CA", "O": "mtlsctl tests"},
                              "key": {"type": "ec", "curve": "P-256"}, "days": 700}
    return {
        "ca": ca,
        "clients": {"key": {"type": "ec", "curve": "P-256"}},
        "ocsp": {"url": "http://127.0.0.1:8888", "port": 8888},
        "nginx": {"test_command": "true", "reload_command": "true"},
    }


def _ok(args: list[str]) -> None:
    res = run_cli(args)
    assert res.code == 0, f"mtlsctl {' '.join(args)} -> {res.code}\n{res.err}{res.out}"


def _build(tier: str, base: Path) -> Path:
    pki, prof = base / "pki", base / "profile.yaml"
    prof.write_text(yaml.safe_dump(_profile(tier)))
    cli = ["--pki-dir", str(pki)]
    _ok([*cli, "--profile", str(prof), "init"])
    _ok([*cli, "ocsp", "setup"])
    _ok([*cli, "add-client", "client-rsa", "--key-type", "rsa"])
    _ok([*cli, "add-client", "client-ec", "--key-type", "ec"])
    # Dotted names: pkilint checks dNSName with `validators.domain`, which wants a dot, and reports ERROR
    # pkix.invalid_domain_name_syntax for a single label such as `localhost` (valid RFC 1034 syntax).
    for kt in ("rsa", "ec"):
        _ok([*cli, "add-server", f"{kt}.mtls.test", "--san", f"DNS:{kt}.mtls.test", "--key-type", kt])
    # CSRs made on "the device" with plain openssl, then signed by mtlsctl
    for kt, newkey in (("ec", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]), ("rsa", ["-newkey", "rsa:2048"])):
        name = f"device-{kt}"
        openssl("req", "-new", *newkey, "-nodes", "-keyout", str(base / f"{name}.key"), "-subj", f"/CN={name}",
                "-out", str(base / f"{name}.csr"))
        _ok([*cli, "sign-csr", str(base / f"{name}.csr"), "--name", name])
    # a revoked entry, so the CRL has revokedCertificates with an entry extension (reasonCode) to lint
    _ok([*cli, "add-client", "gone", "--key-type", "ec"])
    _ok([*cli, "revoke", "gone", "--reason", "keyCompromise", "--no-reload"])
    return pki


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """pkis("single") / pkis("two"): each PKI built once per module, on first use."""
    built: dict[str, Path] = {}

    def get(tier: str) -> Path:
        if tier not in built:
            built[tier] = _build(tier, tmp_path_factory.mktemp(f"pkilint-{tier}"))
        return built[tier]
    return get


def _work(tmp_path: Path) -> Path:
    for sub in ("issuer", "subject"):
        (tmp_path / sub).mkdir(exist_ok=True)
    return tmp_path


# --------------------------------------------------------------------------------------------- the lints

CERT_CASES = [pytest.param(tier, kind, id=f"{tier}-{kind}") for tier in TIERS for kind, (_, tiers) in CERTS.items()
              if tier in tiers]
CRL_CASES = [pytest.param(tier, kind, id=f"{tier}-{kind}") for tier in TIERS for kind, (_, _, tiers) in CRLS.items()
             if tier in tiers]


@pytest.mark.parametrize(("tier", "kind"), CERT_CASES)
def test_certificate_passes_pkilint_rfc5280(pkis, tier, kind, tmp_path):
    pem = pkis(tier) / CERTS[kind][0]
    findings = lint_cert(pem, tmp_path)
    bad = blocking(kind, findings)
    assert not bad, f"pkilint lint_pkix_cert on {CERTS[kind][0]} ({tier}-tier {kind}):\n{_report(bad)}"


@pytest.mark.parametrize(("tier", "kind"), CRL_CASES)
def test_crl_passes_pkilint_rfc5280(pkis, tier, kind, tmp_path):
    path, crl_type, _ = CRLS[kind]
    pem = pkis(tier) / path
    if kind == "crl":  # the fixture's revocation is in it: the entry and its reasonCode were linted too
        text = openssl("crl", "-in", str(pem), "-noout", "-text").stdout
        assert "Key Compromise" in text, text
    findings = lint_crl_file(pem, crl_type, tmp_path)
    bad = blocking(kind, findings)
    assert not bad, f"pkilint lint_crl -t {crl_type} -p PKIX on {path} ({tier}-tier):\n{_report(bad)}"


def _pairs(tier: str) -> list[tuple[str, str]]:
    """(issuer kind, subject kind) for every link of the chain, self-signed roots included."""
    top = "root" if tier == "two" else "ca"
    pairs = [(top, top)] + ([("root", "ca")] if tier == "two" else [])
    return pairs + [("ca", leaf) for leaf in LEAVES]


# RFC 5280 compares names by its matching rules, so pkilint reports a byte-wise difference between the issuer's
# subject and the subject's issuer as NOTICE only; openssl and nginx chain by exact DER, so here it fails.
CHAIN_BLOCKING = frozenset({"pkix.issuer_and_subject_dn_not_binary_equal"})
PAIR_CASES = [pytest.param(tier, i, s, id=f"{tier}-{i}-signs-{s}") for tier in TIERS for i, s in _pairs(tier)]


@pytest.mark.parametrize(("tier", "issuer", "subject"), PAIR_CASES)
def test_each_link_of_the_chain_passes_pkilint(pkis, tier, issuer, subject, tmp_path):
    pki = pkis(tier)
    findings = lint_pair(pki / CERTS[issuer][0], pki / CERTS[subject][0], _work(tmp_path))
    bad = blocking(subject, findings, also=CHAIN_BLOCKING)
    assert not bad, f"lint_pkix_signer_signee_cert_chain {issuer} -> {subject} ({tier}-tier):\n{_report(bad)}"


@pytest.mark.parametrize(("tier", "kind"), [p for p in CERT_CASES if p.values[1] in LEAVES and p.values[1] != "ocsp-signer"])
def test_leaf_key_usage_matches_the_key_type(pkis, tier, kind):
    """RSA leaves: digitalSignature + keyEncipherment; EC leaves: digitalSignature only (RFC 5480). Client
    certificates may also carry nonRepudiation (the guide's v3_client); nothing else is accepted."""
    cert = x509.load_pem_x509_certificate(_pem_block(pkis(tier) / CERTS[kind][0]))
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
             "key_cert_sign", "crl_sign")
    present = {n for n in names if getattr(ku.value, n)}
    if kind.startswith("client") or kind.startswith("sign-csr"):
        present.discard("content_commitment")
    key = cert.public_key()
    assert isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey))
    expected = RSA_LEAF_KU if isinstance(key, rsa.RSAPublicKey) else EC_LEAF_KU
    assert present == expected, f"{kind} ({type(key).__name__}): keyUsage {sorted(present)}, expected {sorted(expected)}"


def _pem_block(path: Path) -> bytes:
    data = path.read_bytes()
    return data[data.index(b"-----BEGIN CERTIFICATE-----"):]


@pytest.mark.parametrize("tier", TIERS)
def test_the_ocsp_signer_is_a_signer_only(pkis, tier):
    cert = x509.load_pem_x509_certificate(_pem_block(pkis(tier) / CERTS["ocsp-signer"][0]))
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING])
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_encipherment and not ku.key_cert_sign


# --------------------------------------------------------------------------------------------- negative controls

def _ec_ca(tmp_path: Path, name: str = "raw") -> tuple[Path, Path]:
    key, crt = tmp_path / f"{name}-ca.key", tmp_path / f"{name}-ca.crt"
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key))
    openssl("req", "-x509", "-new", "-key", str(key), "-subj", f"/CN={name} CA", "-days", "5", "-out", str(crt),
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return key, crt


def _ec_leaf(tmp_path: Path, ca: tuple[Path, Path], key_usage: str) -> Path:
    key, csr, crt, ext = (tmp_path / f"leaf.{s}" for s in ("key", "csr", "crt", "ext"))
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
            "-subj", "/CN=leaf", "-out", str(csr))
    ext.write_text("basicConstraints=critical,CA:FALSE\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
                   f"keyUsage=critical,{key_usage}\nextendedKeyUsage=clientAuth\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]), "-days", "5",
            "-extfile", str(ext), "-out", str(crt))
    return crt


def test_control_pkilint_flags_key_encipherment_on_an_ec_certificate(tmp_path):
    """The defect issue 11 fixes, made with raw openssl: the linter used above must catch it..."""
    ca = _ec_ca(tmp_path)
    findings = lint_cert(_ec_leaf(tmp_path, ca, "digitalSignature,keyEncipherment"), tmp_path)
    assert ("ERROR", "pkix.key_usage_value_prohibited_for_ec") in {(f.severity, f.code) for f in findings}, findings
    assert blocking("client-ec", findings)


def test_control_pkilint_passes_the_same_ec_certificate_without_it(tmp_path):
    """... and only it: the same leaf with digitalSignature alone has no blocking finding."""
    ca = _ec_ca(tmp_path)
    findings = lint_cert(_ec_leaf(tmp_path, ca, "digitalSignature"), tmp_path)
    assert not blocking("client-ec", findings), _report(findings)


def test_control_pkilint_flags_a_crl_without_authority_key_identifier(tmp_path):
    """openssl ca -gencrl without crl_extensions (mtlsctl's crl_ext adds authorityKeyIdentifier)."""
    key, crt = _ec_ca(tmp_path)
    (tmp_path / "index.txt").write_text("")
    (tmp_path / "crlnumber").write_text("1000\n")
    cnf = tmp_path / "c.cnf"
    cnf.write_text(f"[ca]\ndefault_ca = x\n[x]\ndatabase = {tmp_path}/index.txt\ncrlnumber = {tmp_path}/crlnumber\n"
                   "default_md = sha256\ndefault_crl_days = 5\n")
    openssl("ca", "-config", str(cnf), "-gencrl", "-keyfile", str(key), "-cert", str(crt), "-out", str(tmp_path / "x.crl"))
    findings = lint_crl_file(tmp_path / "x.crl", "CRL", tmp_path)
    assert ("ERROR", "pkix.authority_key_identifier_missing") in {(f.severity, f.code) for f in findings}, findings


def test_control_pkilint_flags_a_certificate_paired_with_the_wrong_issuer(pkis, tmp_path):
    """The chain linter really compares: mtlsctl's client against an unrelated CA fails on names, AKI and signature."""
    _, other = _ec_ca(tmp_path, "other")
    findings = lint_pair(other, pkis("single") / CERTS["client-ec"][0], _work(tmp_path))
    codes = {f.code for f in blocking("client-ec", findings, also=CHAIN_BLOCKING)}
    assert {"pkix.issuer_and_subject_dn_not_binary_equal", "pkix.issuer_and_subject_key_identifier_not_equal",
            "pkix.signature_verification_failed"} <= codes, findings

