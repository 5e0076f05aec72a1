"""Apple configuration profiles (`.mobileconfig`): a client's PKCS#12 bundle, packed for iOS, iPadOS and macOS.

A profile is an XML property list (the standard library's `plistlib`) holding:

- a `com.apple.security.pkcs12` payload: the client's bundle, in the compat PKCS#12 profile by default (3DES,
  SHA-1 MAC: what iOS and macOS keychains import, FIELD-NOTES "PKCS#12"). Its password is NOT in the profile
  (Apple's `Password` key is left out): the device asks for it while installing, so the file alone opens nothing;
- with `--with-ca`, a `com.apple.security.root` payload: the trust anchor (ca/ca.crt, or ca/root.crt in a
  two-tier PKI), so Safari trusts a site whose certificate this CA issued (the person must still switch on full
  trust under Settings > General > About > Certificate Trust Settings).

PayloadIdentifiers are derived from the profile and the name (`PREFIX.NAME`, `PREFIX.NAME.pkcs12`,
`PREFIX.NAME.ca`): the same on every export, so a new profile replaces the old one on the device instead of
sitting beside it. Every export gets fresh PayloadUUIDs (uuid4).

When the site profile names a signer (`mobileconfig.signer_cert` / `signer_key`), the plist is signed with
`openssl smime -sign -signer CERT -inkey KEY [-certfile CHAIN] -outform der -nodetach -binary` (a CMS SignedData
with the plist inside, what iOS reads), the key's passphrase on a pipe (`-passin fd:N`, never argv, never a
terminal prompt), and read back with `openssl smime -verify -noverify` to prove the signed content is the plist.
Unsigned profiles install too; iOS shows them as "Not Verified".
"""

from __future__ import annotations

import base64
import os
import plistlib
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlsctl import db, validate
from mtlsctl.errors import InputError, StateError
from mtlsctl.files import MODE_SECRET, create_exclusive
from mtlsctl.pki import Pki, Settings
from mtlsctl.runner import Command, Runner

CONTENT_TYPE = "application/x-apple-aspen-config"
SUFFIX = ".mobileconfig"
# Work files inside a private directory (export: the bundle's work directory in private/; deliver: a 0700 temp dir).
UNSIGNED = "profile.plist"
SIGNED = "profile.signed"
CHECK = "profile.check"
_DNS_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
OID_O = "2.5.4.10"
OID_CN = "2.5.4.3"


@dataclass(frozen=True)
class Identifiers:
    """The PayloadIdentifiers of NAME's profile: stable across exports (the device replaces, never duplicates)."""

    profile: str
    pkcs12: str
    root: str


def identifier_prefix(settings: Settings) -> str:
    """mobileconfig.identifier_prefix, else nginx.server_name's first name reversed + `.mtlsctl`
    (secure.example.com -> com.example.secure.mtlsctl), else `local.mtlsctl`."""
    given = settings.profile.mobileconfig.identifier_prefix
    if given is not None:
        return given
    first = (settings.profile.nginx.server_name.split() or [""])[0].rstrip(".")
    if _DNS_RE.fullmatch(first):
        return ".".join(reversed(first.lower().split("."))) + ".mtlsctl"
    return "local.mtlsctl"


def identifiers(prefix: str, name: str) -> Identifiers:
    """PREFIX.NAME and its payloads' identifiers. NAME is a validated client name (letters, digits, . _ -)."""
    validate.client_name(name)
    base = f"{prefix}.{name}"
    return Identifiers(profile=base, pkcs12=f"{base}.pkcs12", root=f"{base}.ca")


def trust_anchor(pki: Pki) -> str:
    """The certificate `--with-ca` installs: the root in a two-tier PKI (the trust anchor), else ca/ca.crt."""
    return pki.root_cert if pki.has_chain() else pki.ca_cert


def organization(settings: Settings) -> str:
    """mobileconfig.organization, else the trust anchor's O, else its CN (read from the certificate itself:
    a PKI made by hand has no profile that says it), else "mtlsctl"."""
    given = settings.profile.mobileconfig.organization
    if given is not None:
        return given
    from mtlsctl import x509read

    try:
        subject = x509read.subject_rdns(x509read.read_certificate(settings.pki.path(trust_anchor(settings.pki))).subject)
    except StateError:
        return "mtlsctl"
    values = {oid: value for rdn in subject for oid, value in rdn}
    return values.get(OID_O) or values.get(OID_CN) or "mtlsctl"


def certificate_der(path: Path) -> bytes:
    """The DER bytes of the first PEM certificate in a file (the root payload holds DER)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from None
    block = db.pem_certificate(text)
    if block is None:
        raise StateError(f"{path} holds no PEM certificate")
    body = block.removeprefix("-----BEGINCERTIFICATE-----").removesuffix("-----ENDCERTIFICATE-----")
    return base64.b64decode(body, validate=True)


def _uuid() -> str:
    return str(uuid.uuid4()).upper()


def build(name: str, p12: bytes, *, prefix: str, organization: str, ca_der: bytes | None = None,
          ca_file_name: str = "ca.crt") -> bytes:
    """The unsigned profile (an XML plist) for NAME's bundle; with `ca_der`, the trust anchor as a root payload.

    The bundle's password is deliberately absent: the device asks for it while installing.
    """
    ids = identifiers(prefix, name)
    payloads: list[dict[str, Any]] = [{
        "PayloadType": "com.apple.security.pkcs12",
        "PayloadVersion": 1,
        "PayloadIdentifier": ids.pkcs12,
        "PayloadUUID": _uuid(),
        "PayloadDisplayName": f"{name} (client certificate)",
        "PayloadDescription": f"The client certificate and key of {name} for mutual TLS; the device asks for the password.",
        "PayloadCertificateFileName": f"{name}.p12",
        "PayloadContent": p12,
    }]
    if ca_der is not None:
        payloads.append({
            "PayloadType": "com.apple.security.root",
            "PayloadVersion": 1,
            "PayloadIdentifier": ids.root,
            "PayloadUUID": _uuid(),
            "PayloadDisplayName": f"{organization} certificate authority",
            "PayloadDescription": "The CA that issued the site's certificate; enable full trust for it in "
                                  "Settings > General > About > Certificate Trust Settings.",
            "PayloadCertificateFileName": ca_file_name,
            "PayloadContent": ca_der,
        })
    top = {
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": ids.profile,
        "PayloadUUID": _uuid(),
        "PayloadDisplayName": f"{name} ({organization})",
        "PayloadDescription": f"Mutual TLS client certificate {name}" + (" and the CA certificate" if ca_der else ""),
        "PayloadOrganization": organization,
        "PayloadRemovalDisallowed": False,
        "PayloadContent": payloads,
    }
    return plistlib.dumps(top, fmt=plistlib.FMT_XML, sort_keys=True)


# ------------------------------------------------------------------ signing


@dataclass(frozen=True)
class Signer:
    """The certificate and key that sign profiles (absolute paths), the chain sent with them, the key's passphrase."""

    cert: Path
    key: Path
    chain: Path | None = None
    passphrase: str | None = field(default=None, repr=False)


def _resolve(pki: Pki, value: str, what: str) -> Path:
    path = Path(value) if os.path.isabs(value) else pki.path(value)
    if not path.is_file():
        raise InputError(f"mobileconfig.{what} {path} is not a file",
                         hint=f"fix mobileconfig.{what} in the profile (absolute, or relative to {pki.root}), or remove "
                              "the signer to write unsigned profiles")
    return path.absolute()


def _issued_by(cert: Path, ca: Path) -> bool:
    """Was `cert` signed by the certificate `ca` (its signature checked, not the names compared)?"""
    from cryptography.exceptions import InvalidSignature

    from mtlsctl import x509read

    try:
        x509read.read_certificate(cert).verify_directly_issued_by(x509read.read_certificate(ca))
    except (InvalidSignature, ValueError, TypeError, StateError):
        return False
    return True


def _read_passphrase(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(4097)
    except OSError as exc:
        raise InputError(f"cannot read mobileconfig.signer_passphrase_file {path}: {exc.strerror}") from None
    if len(raw) > 4096:
        raise InputError(f"mobileconfig.signer_passphrase_file {path} is longer than 4096 bytes: that is not a passphrase")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"mobileconfig.signer_passphrase_file {path} is not UTF-8 text") from None
    return validate.password(validate.strip_one_newline(text), source=str(path))


def key_encrypted(path: Path) -> bool:
    """A PEM key protected by a passphrase (PKCS#8 `ENCRYPTED PRIVATE KEY` or traditional `Proc-Type: 4,ENCRYPTED`)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(256)
    except OSError:
        return False
    return b"ENCRYPTED" in head


def signer(settings: Settings) -> Signer | None:
    """The profile's signer, checked (files present, an encrypted key has its passphrase); None: unsigned profiles.

    Raises:
        InputError: a named file is missing, or the key is encrypted and mobileconfig.signer_passphrase_file is not set.
    """
    conf, pki = settings.profile.mobileconfig, settings.pki
    if conf.signer_cert is None or conf.signer_key is None:
        return None
    cert = _resolve(pki, conf.signer_cert, "signer_cert")
    key = _resolve(pki, conf.signer_key, "signer_key")
    if conf.signer_chain is not None:
        chain: Path | None = _resolve(pki, conf.signer_chain, "signer_chain")
    else:  # a signer this PKI issued: send the CA chain with it, so the device can build the path to the root
        issuing = pki.path(pki.ca_cert)
        chain = pki.path(pki.ca_bundle).absolute() if issuing.is_file() and _issued_by(cert, issuing) else None
    passphrase = None
    if conf.signer_passphrase_file is not None:
        passphrase = _read_passphrase(_resolve(pki, conf.signer_passphrase_file, "signer_passphrase_file"))
    elif key_encrypted(key):
        raise InputError(f"mobileconfig.signer_key {key} is encrypted and no passphrase is configured",
                         hint="set mobileconfig.signer_passphrase_file to a 0600 file holding it (mtlsctl never asks on a terminal)")
    return Signer(cert, key, chain, passphrase)


def sign_commands(signer: Signer, unsigned: str = UNSIGNED, signed: str = SIGNED, check: str = CHECK) -> list[Command]:
    """openssl smime -sign (the key's passphrase on a pipe, always: openssl never prompts), then the read-back."""
    chain = ("-certfile", str(signer.chain)) if signer.chain is not None else ()
    return [
        Command(("openssl", "smime", "-sign", "-signer", str(signer.cert), "-inkey", str(signer.key), *chain,
                 "-outform", "der", "-nodetach", "-binary", "-in", unsigned, "-out", signed, "-passin", "fd:@0"),
                label=f"signing the configuration profile with {signer.cert.name}",
                fd_secrets=(signer.passphrase if signer.passphrase is not None else "",)),
        Command(("openssl", "smime", "-verify", "-noverify", "-inform", "der", "-binary", "-in", signed, "-out", check),
                label="reading the signed profile back"),
    ]


def sign(data: bytes, signer: Signer, runner: Runner, workdir: Path, cwd: Path | None = None) -> bytes:
    """Sign the plist `data` in `workdir` (a private directory this run made; the caller removes it) and return
    the DER SignedData. The read-back must give exactly `data`, or nothing is returned. openssl runs in `cwd`
    (default `workdir`) and names the work files relative to it, as `--dry-run` shows them.

    Raises:
        OpenSSLError: openssl refused (a key that does not match the certificate, a wrong passphrase).
        StateError: the signed profile does not hold the plist it was asked to sign.
    """
    for name in (UNSIGNED, SIGNED, CHECK):
        os.close(create_exclusive(workdir / name, MODE_SECRET))
    (workdir / UNSIGNED).write_bytes(data)
    where = cwd if cwd is not None else workdir
    rel = os.path.relpath(workdir, where)
    for cmd in sign_commands(signer, *(f"{rel}/{name}" for name in (UNSIGNED, SIGNED, CHECK))):
        runner.run(cmd, cwd=where)
    if (workdir / CHECK).read_bytes() != data:
        raise StateError("openssl smime signed something other than the profile; nothing was written",
                         hint="check which openssl is on PATH")
    return (workdir / SIGNED).read_bytes()


def work_files(workdir: Path) -> list[Path]:
    """The files sign() creates in `workdir` (for a caller's journal)."""
    return [workdir / name for name in (UNSIGNED, SIGNED, CHECK)]
