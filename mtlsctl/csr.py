"""Signing requests mtlsctl did not make a moment ago: `sign-csr` (the key never leaves the device) and
every renewal (certs/NAME.csr re-signed, wherever it came from).

A CSR is hostile input. With the guide's `copy_extensions = copy`, every extension the signing
section does not set is copied from the request (FIELD-NOTES), and a parser of `openssl req -text`
can be blinded by an attribute that contains openssl's own headers. So a request is:

1. read ONCE into memory (size-limited, a regular file, no symlink followed);
2. parsed structurally (mtlsctl.x509read: OIDs, extension objects, key type and size) and its
   self-signature verified;
3. refused, naming every reason, if it asks for anything a certificate of its kind must not have;
4. signed exactly as inspected: the in-memory copy is written to a private temporary directory in
   the PKI and signed with a per-run configuration that includes openssl.cnf, sets
   `copy_extensions = none`, and adds the kind's pinned section plus only the SANs checked here;
5. checked again after signing, structurally: CA:FALSE, the kind's one EKU, keyUsage for its key
   type, no extension outside the allowed set, subject exactly CN=NAME, the request's public key.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from mtlsctl import audit, db, openssl, validate, x509read
from mtlsctl.client import extensions_section, refuse_conflicts, require_section, retired_first, sign_into_database
from mtlsctl.errors import InputError, StateError
from mtlsctl.files import MODE_PUBLIC, Transaction, atomic_write, pki_lock, read_lock
from mtlsctl.pki import ClientFiles, Pki, Settings
from mtlsctl.runner import Command, Runner

CSR_MAX_BYTES = 64 * 1024
SIGN_SECTION = "mtlsctl_sign"

KIND_EKU = {"client": x509read.EKU_CLIENT_AUTH, "server": x509read.EKU_SERVER_AUTH, "ocsp": x509read.EKU_OCSP_SIGNING}
KIND_EKU_NAME = {"client": "clientAuth", "server": "serverAuth", "ocsp": "OCSPSigning"}

# Requested extensions that are refused outright, with the reason named.
_REFUSED = {
    "2.5.29.30": "nameConstraints",
    "2.5.29.32": "certificatePolicies",
    "2.5.29.33": "policyMappings",
    "2.5.29.36": "policyConstraints",
    "2.5.29.54": "inhibitAnyPolicy",
    "1.3.6.1.5.5.7.1.1": "authorityInfoAccess",
    "1.3.6.1.5.5.7.1.11": "subjectInfoAccess",
    "2.5.29.31": "CRL distribution points",
    "2.5.29.46": "freshestCRL",
    "2.5.29.18": "issuerAltName",
    "1.3.6.1.5.5.7.48.1.5": "ocspNoCheck",
}
_SAN = "2.5.29.17"
# What an issued leaf may carry (AIA only as the profile's OCSP URL, from the section itself).
_ISSUED_ALLOWED = {"2.5.29.14", "2.5.29.35", "2.5.29.19", "2.5.29.15", "2.5.29.37", _SAN, "1.3.6.1.5.5.7.1.1"}


@dataclass(frozen=True)
class RequestReview:
    """A request read once and checked: what will be signed, and what was left out."""

    pem: bytes = field(repr=False)  # exactly the bytes that were inspected (PEM)
    name: str
    kind: str
    key: x509read.KeyInfo
    public_key_der: bytes = field(repr=False)
    sans: list[str]  # validated TYPE:VALUE, the only thing taken from the request
    not_copied: list[str]  # harmless requested extensions that are not carried over


def read_request_file(path: Path) -> bytes:
    """The request's bytes, read once: a regular file (no symlink followed), at most 64 KiB."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise InputError(f"CSR {path} does not exist") from None
    except OSError as exc:
        raise InputError(f"CSR {path} cannot be opened ({exc.strerror})",
                         hint="give the path of a regular file, not a symlink") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"CSR {path} is not a regular file")
        data = os.read(fd, CSR_MAX_BYTES + 1)
        chunk = data
        while chunk and len(data) <= CSR_MAX_BYTES:
            chunk = os.read(fd, CSR_MAX_BYTES + 1 - len(data))
            data += chunk
    finally:
        os.close(fd)
    if len(data) > CSR_MAX_BYTES:
        raise InputError(f"CSR {path} is larger than 64 KiB; that is not a CSR")
    return data


def _check_san(kind: str, value: str | None, problems: list[str], out: list[str], cert_kind: str) -> None:
    if value is None or kind not in validate.SAN_TYPES:
        problems.append(f"its subjectAltName has a {kind} entry, a type mtlsctl does not accept (only DNS, IP, email, URI)")
        return
    if kind == "DNS" and "*" in value and not (cert_kind == "server" and value.startswith("*.") and "*" not in value[2:]):
        problems.append(f"its subjectAltName asks for the wildcard DNS:{value}; wildcards are issued to servers only "
                        "(add-server --san DNS:*.example.com)")
        return
    try:
        checked = validate.san(f"{kind}:{value}")
    except InputError as exc:
        problems.append(f"its subjectAltName is refused: {exc.message}")
        return
    if checked not in out:
        out.append(checked)


def review_request(data: bytes, name: str, kind: str = "client", source: str = "CSR") -> RequestReview:
    """Parse, verify and inspect a request; raise InputError (exit 2) naming every reason to refuse it."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    csr = x509read.load_csr(data, source)
    try:
        signature_ok = csr.is_signature_valid
    except Exception:  # an unsupported signature algorithm is as good as a broken one
        signature_ok = False
    if not signature_ok:
        raise InputError(f"{source} is refused: its self-signature does not verify (the request was altered or is damaged)",
                         hint="generate the CSR again on the device (openssl req -new -key ... -subj /CN=NAME)")
    problems: list[str] = []
    if not x509read.is_exactly_cn(csr.subject, name):
        problems.append(f"its subject is {x509read.describe_name(csr.subject)!r}, not CN={name} (exactly that, nothing more)")
    try:
        key = x509read.key_info(csr.public_key())
        public_key_der = csr.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    except Exception:  # noqa: BLE001 - an unparseable key is a reason like any other
        key, public_key_der = x509read.KeyInfo("unknown"), b""
    weak = x509read.key_problem(key)
    if weak:
        problems.append(weak)
    elif public_key_der and public_key_der not in csr.tbs_certrequest_bytes:
        # cryptography normalises what it reads: an EC key with explicit curve parameters, or an RSA-PSS key,
        # comes back as a plain P-256 / rsaEncryption key. Only the request's own bytes tell (openssl verify
        # rejects explicit parameters; RSA-PSS must not get keyEncipherment).
        problems.append("its public key is not encoded as a plain rsaEncryption or named-curve EC key "
                        "(explicit EC parameters or RSA-PSS are not issued)")
    sans: list[str] = []
    not_copied: list[str] = []
    for ext in x509read.extensions(csr, source):
        if ext.oid == "2.5.29.19":
            if ext.value.ca:
                problems.append("it asks for basicConstraints CA:TRUE (a sub-CA)")
        elif ext.oid == "2.5.29.15":
            asked = x509read.key_usages([ext]) or set()
            if asked & {"keyCertSign", "cRLSign"}:
                problems.append("it asks for keyUsage " + "/".join(sorted(asked & {"keyCertSign", "cRLSign"})))
        elif ext.oid == "2.5.29.37":
            ekus = [oid.dotted_string for oid in ext.value]
            if ekus != [KIND_EKU[kind]]:
                problems.append(f"it asks for extended key usage {', '.join(ekus) or '(none)'}; "
                                f"only {KIND_EKU_NAME[kind]} ({KIND_EKU[kind]}) is allowed")
        elif ext.oid == _SAN:
            for entry in ext.value:
                san_kind, value = x509read.general_name(entry)
                _check_san(san_kind, value, problems, sans, kind)
        elif ext.oid in _REFUSED:
            problems.append(f"it carries {_REFUSED[ext.oid]}")
        elif ext.oid in ("2.5.29.14", "2.5.29.35"):
            not_copied.append(ext.name)  # the CA sets its own key identifiers
        elif ext.critical:
            problems.append(f"it carries the critical extension {ext.name}, which mtlsctl does not know")
        else:
            not_copied.append(ext.name)
    if problems:
        raise InputError(f"{source} refused: {'; '.join(problems)}",
                         hint=f"the device must request exactly CN={name}, a {KIND_EKU_NAME[kind]} key of RSA ≥ 2048 "
                              "or EC P-256/P-384, and at most DNS/IP/email/URI SANs")
    from cryptography.hazmat.primitives.serialization import Encoding as Enc

    return RequestReview(pem=csr.public_bytes(Enc.PEM), name=name, kind=kind, key=key, public_key_der=public_key_der,
                         sans=sans, not_copied=not_copied)


# --------------------------------------------------------------------------- signing exactly what was reviewed


def ca_section(sections: dict[str, list[tuple[str, str]]]) -> str:
    """The CA section `openssl ca` uses: default_ca from [ ca ], else from the default section (as NCONF looks up)."""
    return dict(sections.get("ca", [])).get("default_ca") or dict(sections.get("", [])).get("default_ca") or "CA_default"


def signing_config(pki: Pki, section: str, sans: list[str]) -> str:
    """The per-run configuration: openssl.cnf, with `copy_extensions = none` and the section plus SANs.

    The pinned lines are read from the PKI's own openssl.cnf section (so an admin's OCSP AIA, say, is
    kept); that section must pin basicConstraints, keyUsage and extendedKeyUsage.
    """
    cnf_path = pki.path(pki.openssl_cnf)
    sections = openssl.cnf_sections(cnf_path.read_text(errors="replace"))
    default_ca = ca_section(sections)
    lines = [(k, v) for k, v in sections.get(section, []) if k != "subjectAltName"]
    keys = {k for k, _ in lines}
    missing = {"basicConstraints", "keyUsage", "extendedKeyUsage"} - keys
    if missing:
        raise StateError(f"[ {section} ] in openssl.cnf does not pin {', '.join(sorted(missing))}",
                         hint=f"copy the [ {section} ] section from mtlsctl's openssl.cnf.template")
    body = [
        "# written by mtlsctl for one signing, then removed: the PKI's openssl.cnf, but nothing copied",
        "# from the request; only the subjectAltName entries mtlsctl checked.",
        f".include {cnf_path}",
        f"[ {default_ca} ]",
        "copy_extensions = none",
        f"[ {SIGN_SECTION} ]",
        *(f"{k} = {v}" for k, v in lines),
    ]
    if sans:
        body.append("subjectAltName = " + ",".join(sans))
    return "\n".join(body) + "\n"


def sign_command(workdir: str, crt: str, days: int, ca_name: str = "CA_default") -> Command:
    """`-name` names the CA section explicitly: the one whose copy_extensions sign.cnf sets to none."""
    return Command(
        ("openssl", "ca", "-config", f"{workdir}/sign.cnf", "-name", ca_name, "-extensions", SIGN_SECTION,
         "-days", str(days), "-batch", "-in", f"{workdir}/request.csr", "-out", crt),
        label=f"signing {crt} with the CA ({days} days; nothing copied from the request)", uses_ca_key=True)


def check_issued(path: Path, review: RequestReview, *, ocsp_aia: bool) -> None:
    """Re-read the issued certificate structurally; a StateError withdraws it (the transaction rolls back)."""
    cert = x509read.read_certificate(path)
    exts = x509read.extensions(cert, str(path))
    found: list[str] = []
    bc = x509read.basic_constraints(exts)
    if bc is None or bc[0] or not bc[1]:
        found.append("basicConstraints is not critical CA:FALSE")
    if (x509read.eku_oids(exts) or []) != [KIND_EKU[review.kind]]:
        found.append(f"the extended key usage is not exactly {KIND_EKU_NAME[review.kind]}")
    usage = x509read.key_usages(exts) or set()
    # digitalSignature always; keyEncipherment only for RSA (RFC 5480); nonRepudiation is tolerated (the guide's
    # v3_client sets it); nothing that signs certificates or CRLs.
    allowed_usage = {"digitalSignature", "nonRepudiation"} | ({"keyEncipherment"} if review.key.type == "rsa" else set())
    if "digitalSignature" not in usage or usage - allowed_usage:
        found.append(f"keyUsage is {', '.join(sorted(usage)) or '(none)'}; allowed: {', '.join(sorted(allowed_usage))}")
    from cryptography import x509 as cx509

    for ext in exts:
        if ext.oid == _SAN and ext.critical:
            found.append("its subjectAltName is critical (its subject is not empty)")
        if ext.oid == "2.5.29.14" and ext.value.digest != cx509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest:
            found.append("its subjectKeyIdentifier is not the hash of its key (taken from the request?)")
        if ext.oid in ("2.5.29.19", "2.5.29.15") and not ext.critical:
            found.append(f"{ext.name} is not critical")
    allowed = _ISSUED_ALLOWED if ocsp_aia else _ISSUED_ALLOWED - {"1.3.6.1.5.5.7.1.1"}
    extra = [x509read.ext_name(e.oid) for e in exts if e.oid not in allowed]
    if extra:
        found.append("it carries " + ", ".join(extra))
    if not x509read.is_exactly_cn(cert.subject, review.name):
        found.append(f"its subject is {x509read.describe_name(cert.subject)!r}")
    issued_sans = [f"{k}:{v}" for k, v in x509read.sans(exts)]
    if [validate.san(s) for s in issued_sans] != review.sans:
        found.append(f"its subjectAltName is {issued_sans}, not {review.sans}")
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    if cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) != review.public_key_der:
        found.append("its public key is not the request's")
    if found:
        raise StateError(f"the issued certificate is not what was reviewed ({'; '.join(found)}); it was withdrawn",
                         hint="check the extension sections of openssl.cnf against mtlsctl's openssl.cnf.template")


def sign_reviewed(settings: Settings, review: RequestReview, crt: str, days: int, runner: Runner,
                  tx: Transaction) -> db.IndexRow:
    """Sign exactly the reviewed bytes into the database (call with the PKI lock held, inside `tx`)."""
    pki = settings.pki
    section = extensions_section(review.kind, review.key.type)
    require_section(pki, section)
    config = signing_config(pki, section, review.sans)
    workdir = Path(tempfile.mkdtemp(prefix=".sign-", dir=pki.path("private")))  # 0700, unpredictable name
    tx.created(workdir)
    tx.may_create(workdir / "request.csr", workdir / "sign.cnf")  # a kill leaves nothing: rollback removes all three
    try:
        for name, content in (("request.csr", review.pem), ("sign.cnf", config.encode())):
            fd = os.open(workdir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(content)
        rel = os.path.relpath(workdir, pki.root)
        ca_name = ca_section(openssl.cnf_sections(pki.path(pki.openssl_cnf).read_text(errors="replace")))
        row = sign_into_database(pki, sign_command(rel, crt, days, ca_name), review.name, crt, runner, tx)
        aia = any(k == "authorityInfoAccess" for k, _ in openssl.cnf_sections(config).get(SIGN_SECTION, []))
        check_issued(pki.path(crt), review, ocsp_aia=aia)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return row


def check_renewal(review: RequestReview, cert_path: Path) -> None:
    """A stored CSR may be re-signed only for the certificate it made: the same key, subject and SANs.

    certs/NAME.csr is a file on disk: replaced (another key, more SANs) or paired with a renamed index.txt
    row, renewing it would hand the name to another key. Raise StateError instead.
    """
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    cert = x509read.read_certificate(cert_path)
    found = []
    if cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) != review.public_key_der:
        found.append("its key is not the certificate's")
    if not x509read.is_exactly_cn(cert.subject, review.name):
        found.append(f"the certificate's subject is {x509read.describe_name(cert.subject)!r}, not CN={review.name}")
    cert_sans = []
    for kind, value in x509read.sans(x509read.extensions(cert, str(cert_path))):
        try:
            cert_sans.append(validate.san(f"{kind}:{value}"))
        except InputError:
            cert_sans.append(f"{kind}:{value}")
    if sorted(cert_sans) != sorted(review.sans):
        found.append(f"its SANs {review.sans} are not the certificate's {cert_sans}")
    if found:
        raise StateError(f"certs/{review.name}.csr does not belong to the certificate being renewed ({'; '.join(found)})",
                         hint=f"issue a new certificate instead: mtlsctl revoke {review.name}, then add-client/sign-csr")


# --------------------------------------------------------------------------- sign-csr


@dataclass(frozen=True)
class SignResult:
    name: str
    serial: str
    not_after: datetime
    sans: list[str]
    csr: Path
    crt: Path
    not_copied: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "serial": self.serial, "not_after": self.not_after.isoformat(), "sans": self.sans,
                "csr": str(self.csr), "crt": str(self.crt), "not_copied": self.not_copied}


def inspect(settings: Settings, csr_path: Path, name: str) -> RequestReview:
    """Read the CSR once and review it as a client request (raises InputError, writes nothing)."""
    validate.client_name(name, role="client")
    return review_request(read_request_file(csr_path), name, "client", source="CSR")


def plan_sign_csr(settings: Settings, csr_path: Path, name: str, days: int | None) -> tuple[RequestReview, list[Command], str]:
    """What `sign-csr --dry-run` shows: the same checks, the command and the per-run configuration."""
    pki = settings.pki
    pki.require_ca()
    days = validate.days(days if days is not None else settings.profile.clients.days)
    review = inspect(settings, csr_path, name)
    refuse_conflicts(pki, name)
    section = extensions_section("client", review.key.type)
    require_section(pki, section)
    ca_name = ca_section(openssl.cnf_sections(pki.path(pki.openssl_cnf).read_text(errors="replace")))
    return (review, [sign_command("private/.sign-XXXXXX", ClientFiles(name).crt, days, ca_name)],
            signing_config(pki, section, review.sans))


def sign_csr(settings: Settings, csr_path: Path, name: str, days: int | None, runner: Runner) -> SignResult:
    """Sign a device's CSR as client NAME: read once, inspected, signed as inspected, re-checked.

    Raises:
        InputError: the CSR is unreadable, altered, or asks for something refused (every reason named).
        StateError/OpenSSLError: signing failed or produced something else; nothing is left behind.
    """
    pki = settings.pki
    pki.require_ca()
    days = validate.days(days if days is not None else settings.profile.clients.days)
    review = inspect(settings, csr_path, name)
    require_section(pki, extensions_section("client", review.key.type))
    files = ClientFiles(name)
    with read_lock(pki.root, writer=True):
        refuse_conflicts(pki, name)  # exit 2 before the lock; again under it below
    # retired_first: a revoked/expired predecessor's files (an old key too) go to archive/NAME/SERIAL/ first
    with pki_lock(pki.lock_path), audit.failures_recorded(pki, "sign-csr", names=[name]), retired_first(pki, [name]), \
            Transaction(pki.root) as tx:
        refuse_conflicts(pki, name)
        tx.created(pki.path(files.csr))
        atomic_write(pki.path(files.csr), review.pem, MODE_PUBLIC)  # what renew re-signs: the reviewed request
        row = sign_reviewed(settings, review, files.crt, days, runner, tx)
        tx.checkpoint()
        audit.record(pki, "sign-csr", names=[name], serials=[row.serial], kind="client", days=days,
                     sans=",".join(review.sans)[:300] or None, source=str(csr_path)[:300])
    return SignResult(name, row.serial, row.expires, review.sans, pki.path(files.csr), pki.path(files.crt), review.not_copied)
