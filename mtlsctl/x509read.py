"""Read certificates, CSRs and CRLs into structured fields, so that no decision rests on display text.

openssl's `-text` output is for people: a CSR attribute can contain any words, including the headers
openssl prints ("Requested Extensions:", "TLS Web Server Authentication"), and a parser of that text
can be blinded or steered by them. Every decision mtlsctl takes about certificate content (what a CSR
asks for, what kind a certificate is, when a CRL expires) reads the DER through pyca/cryptography
instead: OIDs, extension objects, criticality, key types and sizes, dates, serial numbers.

cryptography is used here ONLY to read. Everything that creates, signs, revokes or exports is the
openssl binary (mtlsctl.openssl). It is imported lazily, inside the functions, so that commands that
never read a certificate (`list`, `--help`) do not pay for the import.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mtlsctl.errors import InputError, StateError

T = TypeVar("T")

if TYPE_CHECKING:
    from cryptography import x509

# RFC 5280 / RFC 4334 extended key usages, by dotted OID (what the certificate says, not what openssl prints).
EKU_SERVER_AUTH = "1.3.6.1.5.5.7.3.1"
EKU_CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"
EKU_OCSP_SIGNING = "1.3.6.1.5.5.7.3.9"

# Extensions, by dotted OID, with the name used in messages.
EXT_NAMES = {
    "2.5.29.14": "subjectKeyIdentifier",
    "2.5.29.35": "authorityKeyIdentifier",
    "2.5.29.19": "basicConstraints",
    "2.5.29.15": "keyUsage",
    "2.5.29.37": "extendedKeyUsage",
    "2.5.29.17": "subjectAltName",
    "2.5.29.18": "issuerAltName",
    "2.5.29.30": "nameConstraints",
    "2.5.29.32": "certificatePolicies",
    "2.5.29.33": "policyMappings",
    "2.5.29.36": "policyConstraints",
    "2.5.29.54": "inhibitAnyPolicy",
    "2.5.29.31": "cRLDistributionPoints",
    "2.5.29.46": "freshestCRL",
    "1.3.6.1.5.5.7.1.1": "authorityInfoAccess",
    "1.3.6.1.5.5.7.1.11": "subjectInfoAccess",
    "1.3.6.1.5.5.7.48.1.5": "ocspNoCheck",
    "2.16.840.1.113730.1.1": "nsCertType",
    "2.16.840.1.113730.1.13": "nsComment",
}

OID_CN = "2.5.4.3"
ALLOWED_CURVES = ("P-256", "P-384")
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def ext_name(oid: str) -> str:
    return EXT_NAMES.get(oid, oid)


def _pem_or_der(data: bytes, marker: bytes) -> tuple[bytes, bool]:
    """The bytes to hand to cryptography and whether they are PEM. openssl ca -out writes a text dump
    above the PEM block; only the block counts."""
    start = data.find(b"-----BEGIN " + marker)
    if start >= 0:
        return data[start:], True
    return data, False


def load_certificate(data: bytes, source: str = "certificate") -> x509.Certificate:
    from cryptography import x509

    raw, pem = _pem_or_der(data, b"CERTIFICATE-----")
    try:
        return x509.load_pem_x509_certificate(raw) if pem else x509.load_der_x509_certificate(raw)
    except ValueError as exc:
        raise StateError(f"{source} is not a readable X.509 certificate ({exc})") from None


def read_certificate(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from None
    return load_certificate(data, str(path))


def load_csr(data: bytes, source: str = "CSR") -> x509.CertificateSigningRequest:
    from cryptography import x509

    raw, pem = _pem_or_der(data, b"CERTIFICATE REQUEST-----")
    if not pem:
        raw, pem = _pem_or_der(data, b"NEW CERTIFICATE REQUEST-----")
        if pem:  # the old Netscape label: same DER inside
            raw = raw.replace(b"NEW CERTIFICATE REQUEST", b"CERTIFICATE REQUEST")
    try:
        return x509.load_pem_x509_csr(raw) if pem else x509.load_der_x509_csr(raw)
    except Exception:  # noqa: BLE001 - ValueError, InvalidVersion...: every unparseable request is bad input
        what = "a damaged PEM block" if pem else "neither a PEM certificate request nor valid DER"
        raise InputError(f"{source} is not a readable certificate request ({what})",
                         hint="give the PEM or DER file made by `openssl req -new`") from None


def load_crl(data: bytes, source: str = "CRL") -> x509.CertificateRevocationList:
    from cryptography import x509

    raw, pem = _pem_or_der(data, b"X509 CRL-----")
    try:
        return x509.load_pem_x509_crl(raw) if pem else x509.load_der_x509_crl(raw)
    except ValueError as exc:
        raise StateError(f"{source} is not a readable CRL ({exc})", hint="regenerate it: mtlsctl crl") from None


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class KeyInfo:
    type: str  # "rsa", "ec", "ed25519", "ed448", "dsa", "unknown"
    bits: int | None = None
    curve: str | None = None  # "P-256", "P-384", or the raw curve name

    def describe(self) -> str:
        if self.type == "rsa":
            return f"RSA {self.bits}-bit"
        if self.type == "ec":
            return f"EC {self.curve}"
        return self.type.upper() if self.type != "unknown" else "an unknown key type"


def key_info(public_key: Any) -> KeyInfo:
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

    if isinstance(public_key, rsa.RSAPublicKey):
        return KeyInfo("rsa", bits=public_key.key_size)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return KeyInfo("ec", bits=public_key.curve.key_size, curve=_CURVE_NAMES.get(public_key.curve.name, public_key.curve.name))
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return KeyInfo("ed25519")
    if isinstance(public_key, ed448.Ed448PublicKey):
        return KeyInfo("ed448")
    if isinstance(public_key, dsa.DSAPublicKey):
        return KeyInfo("dsa", bits=public_key.key_size)
    return KeyInfo("unknown")


def key_problem(key: KeyInfo) -> str | None:
    """Why a client key is too weak or of a kind mtlsctl does not issue for, or None."""
    if key.type == "rsa":
        if (key.bits or 0) < 2048:
            return f"its key is RSA {key.bits}-bit; at least RSA 2048-bit is required"
        if (key.bits or 0) > 16384:
            return f"its key is RSA {key.bits}-bit; more than 16384 bits is not supported"
        return None
    if key.type == "ec":
        if key.curve not in ALLOWED_CURVES:
            return f"its key is EC {key.curve}; use P-256 or P-384"
        return None
    return f"its key type ({key.describe()}) is not supported; use RSA ≥ 2048 or EC P-256/P-384"


# --------------------------------------------------------------------------- names and SANs


def subject_rdns(name: x509.Name) -> list[list[tuple[str, str]]]:
    """The subject as a list of RDNs, each a list of (dotted OID, value)."""
    out = []
    for rdn in name.rdns:
        out.append([(attr.oid.dotted_string, attr.value if isinstance(attr.value, str) else attr.value.hex())
                    for attr in rdn])
    return out


def common_name(name: x509.Name) -> str | None:
    """The single CN of a subject, or None when there is none or more than one."""
    values = [attr.value for rdn in name.rdns for attr in rdn if attr.oid.dotted_string == OID_CN]
    return values[0] if len(values) == 1 and isinstance(values[0], str) else None


def is_exactly_cn(name: x509.Name, cn: str) -> bool:
    """True when the subject is exactly one RDN holding exactly CN=cn (nothing else, nothing multi-valued),
    encoded as UTF8String or PrintableString: a BMPString or UniversalString CN that decodes to the same
    text is a different byte string to openssl (its index.txt row would read /CN=\\x00n\\x00a...)."""
    from cryptography import x509
    from cryptography.x509.name import _ASN1Type
    from cryptography.x509.oid import NameOID

    if subject_rdns(name) != [[(OID_CN, cn)]]:
        return False
    encoded = name.public_bytes()
    return any(encoded == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn, _type=t)]).public_bytes()
               for t in (_ASN1Type.UTF8String, _ASN1Type.PrintableString))


def describe_name(name: x509.Name) -> str:
    """For messages only (RFC 4514, as nginx's $ssl_client_s_dn prints it)."""
    return name.rfc4514_string() or "(empty)"


def general_name(entry: Any) -> tuple[str, str | None]:
    """(mtlsctl SAN type or the GeneralName kind, value) for one subjectAltName entry.

    The type is DNS, IP, email or URI for the four kinds mtlsctl issues; otherName, dirName,
    registeredID (and anything else) come back with value None.
    """
    from cryptography import x509

    if isinstance(entry, x509.DNSName):
        return "DNS", entry.value
    if isinstance(entry, x509.IPAddress):
        return "IP", str(entry.value)
    if isinstance(entry, x509.RFC822Name):
        return "email", entry.value
    if isinstance(entry, x509.UniformResourceIdentifier):
        return "URI", entry.value
    if isinstance(entry, x509.OtherName):
        return f"otherName ({entry.type_id.dotted_string})", None
    if isinstance(entry, x509.DirectoryName):
        return "dirName", None
    if isinstance(entry, x509.RegisteredID):
        return "registeredID", None
    return type(entry).__name__, None


# --------------------------------------------------------------------------- extensions


@dataclass(frozen=True)
class Extension:
    oid: str
    critical: bool
    value: Any  # the cryptography ExtensionType (UnrecognizedExtension for unknown OIDs)

    @property
    def name(self) -> str:
        return ext_name(self.oid)


def extensions(obj: x509.Certificate | x509.CertificateSigningRequest, source: str) -> list[Extension]:
    """Every extension, parsed. A duplicated or malformed extension is an error, not something to skip."""
    try:
        exts = obj.extensions
        return [Extension(e.oid.dotted_string, e.critical, e.value) for e in exts]
    except Exception as exc:  # cryptography raises DuplicateExtension / ValueError for malformed ones
        raise InputError(f"{source} has a malformed or duplicated extension ({exc})") from None


def eku_oids(exts: list[Extension]) -> list[str] | None:
    for ext in exts:
        if ext.oid == "2.5.29.37":
            return [oid.dotted_string for oid in ext.value]
    return None


def key_usages(exts: list[Extension]) -> set[str] | None:
    """The keyUsage bits that are set, by RFC 5280 name, or None without the extension."""
    for ext in exts:
        if ext.oid == "2.5.29.15":
            ku = ext.value
            names = {"digitalSignature": ku.digital_signature, "nonRepudiation": ku.content_commitment,
                     "keyEncipherment": ku.key_encipherment, "dataEncipherment": ku.data_encipherment,
                     "keyAgreement": ku.key_agreement, "keyCertSign": ku.key_cert_sign, "cRLSign": ku.crl_sign}
            found = {n for n, on in names.items() if on}
            if ku.key_agreement:
                found |= {n for n, on in (("encipherOnly", ku.encipher_only), ("decipherOnly", ku.decipher_only)) if on}
            return found
    return None


def basic_constraints(exts: list[Extension]) -> tuple[bool, bool] | None:
    """(ca, critical) of basicConstraints, or None without it."""
    for ext in exts:
        if ext.oid == "2.5.29.19":
            return bool(ext.value.ca), ext.critical
    return None


def sans(exts: list[Extension]) -> list[tuple[str, str | None]]:
    for ext in exts:
        if ext.oid == "2.5.29.17":
            return [general_name(entry) for entry in ext.value]
    return []


# --------------------------------------------------------------------------- certificates

KINDS = ("client", "server", "ocsp")


def kind_of(cert: x509.Certificate) -> str:
    """client, server, ocsp, ca or unknown: from basicConstraints and the EKU OIDs, never from text.

    mtlsctl issues exactly one EKU per leaf kind (v3_client clientAuth, v3_server serverAuth, v3_ocsp
    OCSPSigning); anything else is "unknown" and is never renewed as something it may not be.
    """
    exts = extensions(cert, "the certificate")
    bc = basic_constraints(exts)
    if bc is not None and bc[0]:
        return "ca"
    ekus = eku_oids(exts) or []
    if ekus == [EKU_CLIENT_AUTH]:
        return "client"
    if ekus == [EKU_SERVER_AUTH]:
        return "server"
    if ekus == [EKU_OCSP_SIGNING]:
        return "ocsp"
    return "unknown"


def cert_kind_file(path: Path) -> str:
    return kind_of(read_certificate(path))


@dataclass(frozen=True)
class CertFacts:
    """What mtlsctl decides on about one certificate."""

    serial: str  # upper-case hex, even length (index.txt's form)
    subject: str
    not_before: datetime
    not_after: datetime
    kind: str
    key: KeyInfo
    is_ca: bool
    ekus: list[str] = field(default_factory=list)
    key_usage: set[str] = field(default_factory=set)
    extension_oids: list[str] = field(default_factory=list)
    sans: list[tuple[str, str | None]] = field(default_factory=list)


def serial_hex(number: int) -> str:
    text = format(number, "X")
    return text.zfill(len(text) + len(text) % 2)


def facts(cert: x509.Certificate) -> CertFacts:
    exts = extensions(cert, "the certificate")
    bc = basic_constraints(exts)
    return CertFacts(
        serial=serial_hex(cert.serial_number),
        subject=describe_name(cert.subject),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        kind=kind_of(cert),
        key=key_info(cert.public_key()),
        is_ca=bool(bc and bc[0]),
        ekus=eku_oids(exts) or [],
        key_usage=key_usages(exts) or set(),
        extension_oids=[e.oid for e in exts],
        sans=sans(exts),
    )


def _derived(kind: str, data: bytes, compute: Callable[[], T], dump: Callable[[T], Any], load: Callable[[Any], T]) -> T:
    """compute(), or its result for the same bytes read by this same code before (mtlsctl/cache.py: keyed by the
    bytes, this module's source and cryptography's version). `list` and `renew` read the CA certificate and the
    CRL on every run; parsing them means importing cryptography, which costs more than the rest of the run."""
    from mtlsctl import cache

    try:
        code = cache.code_key("mtlsctl.x509read", "cryptography")
    except OSError:
        return compute()
    return cache.derived(kind, [data, code], compute, dump, load)


def _utc(text: Any) -> datetime:
    if not isinstance(text, str):
        raise ValueError("not a date")
    value = datetime.fromisoformat(text)
    if value.utcoffset() != timedelta(0):
        raise ValueError("not UTC")
    return value


def not_after(path: Path) -> datetime:
    """The certificate's notAfter (UTC)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from None
    return _derived("cert_not_after", data, lambda: load_certificate(data, str(path)).not_valid_after_utc,
                    lambda d: d.isoformat(), _utc)


# --------------------------------------------------------------------------- CRLs


@dataclass(frozen=True)
class CrlFacts:
    this_update: datetime
    next_update: datetime | None
    crl_number: str  # hex, as in the crlnumber file (even length), "" when absent
    revoked: int
    issuer: str


def crl_facts(crl: x509.CertificateRevocationList) -> CrlFacts:
    from cryptography import x509

    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        num = serial_hex(number)
    except x509.ExtensionNotFound:
        num = ""
    next_update = crl.next_update_utc
    return CrlFacts(this_update=crl.last_update_utc, next_update=next_update, crl_number=num,
                    revoked=len(crl), issuer=describe_name(crl.issuer))


def _crl_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}", hint="regenerate it: mtlsctl crl") from None


def read_crl_facts(path: Path) -> CrlFacts:
    data = _crl_bytes(path)
    return _derived("crl_facts", data, lambda: crl_facts(load_crl(data, str(path))), _crl_dump, _crl_load)


def _crl_dump(facts: CrlFacts) -> dict[str, Any]:
    return {"this_update": facts.this_update.isoformat(), "crl_number": facts.crl_number, "revoked": facts.revoked,
            "next_update": facts.next_update.isoformat() if facts.next_update else None, "issuer": facts.issuer}


def _crl_load(value: Any) -> CrlFacts:
    if not isinstance(value, dict) or set(value) != {"this_update", "next_update", "crl_number", "revoked", "issuer"}:
        raise ValueError("not CRL facts")
    number, revoked, issuer = value["crl_number"], value["revoked"], value["issuer"]
    if not isinstance(number, str) or not isinstance(issuer, str) or type(revoked) is not int:
        raise ValueError("not CRL facts")
    return CrlFacts(this_update=_utc(value["this_update"]),
                    next_update=None if value["next_update"] is None else _utc(value["next_update"]),
                    crl_number=number, revoked=revoked, issuer=issuer)


# serial_hex's spelling, which is db.normalize_serial's: even-length upper-case hex, no leading zero byte but "00"
_SERIAL = r"(?:00|(?:0[1-9A-F]|[1-9A-F][0-9A-F])(?:[0-9A-F]{2})*)"
_SERIALS_RE = re.compile(rf"{_SERIAL}(?:,{_SERIAL})*", re.ASCII)


def crl_serials(path: Path) -> frozenset[str]:
    """The serials a CRL lists (serial_hex form), parsed from its DER; remembered by its bytes (mtlsctl/cache.py):
    `renew` asks every night whether index.txt's revocations are all in it, and 20,000 entries take cryptography's
    import and 0.1 s to read. StateError when the file cannot be read or is not a CRL."""
    data = _crl_bytes(path)
    return _derived("crl_serials", data, lambda: frozenset(serial_hex(e.serial_number) for e in load_crl(data, str(path))),
                    lambda serials: ",".join(sorted(serials)), _serials_load)


def _serials_load(value: Any) -> frozenset[str]:
    if not isinstance(value, str) or (value and not _SERIALS_RE.fullmatch(value)):
        raise ValueError("not a list of serials")
    return frozenset(value.split(",")) if value else frozenset()


def crl_signed_by(crl_path: Path, ca_path: Path) -> bool:
    """True when the CRL's signature verifies with the CA certificate's public key."""
    crl = load_crl(crl_path.read_bytes(), str(crl_path))
    ca = read_certificate(ca_path)
    try:
        return bool(crl.is_signature_valid(ca.public_key()))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
