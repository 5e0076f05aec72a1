"""`mtlsctl sign-csr`: sign a CSR made on the device, so the private key never leaves it.

A CSR is hostile input. `copy_extensions = copy` copies every extension the signing section does not
set (FIELD-NOTES: a CSR asking for CA:TRUE got a working sub-CA from a section that did not pin
basicConstraints), so the CSR is verified and read with openssl first and refused, naming each
reason, if it asks for anything a client certificate must not have. The issued certificate is
checked again afterwards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from mtlsctl import openssl, validate
from mtlsctl.client import refuse_conflicts, sign_into_database
from mtlsctl.errors import InputError, StateError
from mtlsctl.files import MODE_PUBLIC, Transaction, atomic_write, pki_lock
from mtlsctl.pki import ClientFiles, Settings
from mtlsctl.runner import Command, Runner

ALLOWED_CURVES = {"P-256", "P-384"}
# Extensions a client CSR may carry; anything else is refused (v3_client pins KU, EKU and BC anyway).
_ALLOWED_EXTENSIONS = {"X509v3 Subject Alternative Name", "X509v3 Extended Key Usage", "X509v3 Key Usage",
                       "X509v3 Basic Constraints", "X509v3 Subject Key Identifier"}
_SAN_TYPES = {"DNS": "DNS", "IP Address": "IP", "email": "email", "URI": "URI"}


@dataclass
class CsrInfo:
    subject: str
    key: str  # "RSA 2048-bit", "EC P-256", ...
    extensions: dict[str, str] = field(default_factory=dict)
    sans: list[str] = field(default_factory=list)


def verify_command(path: str) -> Command:
    return Command(("openssl", "req", "-in", path, "-noout", "-verify"), label=f"verifying the signature of {path}")


def text_command(path: str) -> Command:
    return Command(("openssl", "req", "-in", path, "-noout", "-text", "-nameopt", "RFC2253"))


def parse_csr_text(text: str) -> CsrInfo:
    subject = re.search(r"^\s+Subject: ?(.*)$", text, re.M)
    info = CsrInfo(subject=subject.group(1).strip() if subject else "", key="unknown key")
    bits = re.search(r"Public-Key: \((\d+) bit\)", text)
    if "rsaEncryption" in text and bits:
        info.key = f"RSA {bits.group(1)}-bit"
    else:
        curve = re.search(r"NIST CURVE: (\S+)", text)
        algo = re.search(r"Public Key Algorithm: (\S+)", text)
        info.key = f"EC {curve.group(1)}" if curve else (algo.group(1) if algo else "unknown key")
    if "Requested Extensions:" in text:
        section = text.split("Requested Extensions:", 1)[1].split("Signature Algorithm:", 1)[0]
        current = None
        base_indent = 0
        for line in section.splitlines():
            if not line.strip():
                continue
            indent = len(line) - len(line.lstrip())
            header = re.match(r"^\s+(\S.*?):\s*(critical)?\s*$", line)
            if header and (current is None or indent <= base_indent):
                current = header.group(1)
                base_indent = indent
                info.extensions[current] = ""
            elif current is not None:
                info.extensions[current] = (info.extensions[current] + " " + line.strip()).strip()
    san = info.extensions.get("X509v3 Subject Alternative Name", "")
    info.sans = [part.strip() for part in san.split(", ") if part.strip()]
    return info


def problems(info: CsrInfo, name: str) -> tuple[list[str], list[str]]:
    """Every reason to refuse the CSR, and its SANs in mtlsctl's TYPE:VALUE form."""
    found = []
    if info.subject != f"CN={name}":
        found.append(f"its subject is {info.subject or '(empty)'!r}, not CN={name}")
    if info.key.startswith("RSA "):
        if int(info.key.split()[1].split("-")[0]) < 2048:
            found.append(f"its key is {info.key}; at least RSA 2048-bit is required")
    elif info.key.startswith("EC "):
        if info.key[3:] not in ALLOWED_CURVES:
            found.append(f"its key is {info.key}; use P-256 or P-384")
    else:
        found.append(f"its key type {info.key} is not supported; use RSA ≥ 2048 or EC P-256/P-384")
    ext = info.extensions
    if "CA:TRUE" in ext.get("X509v3 Basic Constraints", ""):
        found.append("it asks for basicConstraints CA:TRUE (a sub-CA)")
    ku = ext.get("X509v3 Key Usage", "")
    if "Certificate Sign" in ku or "CRL Sign" in ku:
        found.append("it asks for keyUsage keyCertSign/cRLSign")
    eku = ext.get("X509v3 Extended Key Usage", "")
    if eku and [u.strip() for u in eku.split(",")] != ["TLS Web Client Authentication"]:
        found.append(f"it asks for extended key usage {eku!r}; only clientAuth is allowed")
    for bad, why in (("X509v3 Name Constraints", "nameConstraints"), ("Authority Information Access", "authorityInfoAccess"),
                     ("X509v3 CRL Distribution Points", "CRL distribution points")):
        if bad in ext:
            found.append(f"it carries {why}")
    for other in sorted(set(ext) - _ALLOWED_EXTENSIONS - {"X509v3 Name Constraints", "Authority Information Access",
                                                           "X509v3 CRL Distribution Points"}):
        found.append(f"it carries an extension mtlsctl does not accept: {other}")
    sans = []
    for entry in info.sans:
        kind, _, value = entry.partition(":")
        if kind not in _SAN_TYPES:
            found.append(f"its SAN {entry!r} is of a type mtlsctl does not accept")
            continue
        try:
            sans.append(validate.san(f"{_SAN_TYPES[kind]}:{value}"))
        except InputError as exc:
            found.append(f"its SAN is refused: {exc.message}")
    return found, sans


@dataclass(frozen=True)
class SignResult:
    name: str
    serial: str
    not_after: datetime
    sans: list[str]
    csr: Path
    crt: Path


def inspect(settings: Settings, csr_path: Path, name: str, runner: Runner) -> CsrInfo:
    """Verify the CSR's self-signature and refuse it (exit 2) for every reason it has."""
    validate.client_name(name)
    if not csr_path.is_file():
        raise InputError(f"CSR {csr_path} does not exist")
    if csr_path.stat().st_size > 64 * 1024:
        raise InputError(f"CSR {csr_path} is larger than 64 KiB; that is not a CSR")
    path = str(csr_path.absolute())
    result = runner.run(verify_command(path), check=False)
    said = result.stdout + result.stderr
    # FIELD-NOTES: openssl 3.0 exits 0 even when the self-signature is broken; read its words.
    if result.returncode != 0 or "verify OK" not in said or "verify failure" in said:
        raise InputError(f"CSR {csr_path} is unreadable or its self-signature does not verify",
                         hint="generate the CSR again on the device (openssl req -new -key ... -subj /CN=NAME)")
    info = parse_csr_text(runner.run(text_command(path)).stdout)
    found, info.sans = problems(info, name)
    if found:
        raise InputError(f"CSR refused: {'; '.join(found)}", hint=f"the device must request CN={name}, a clientAuth key of RSA ≥ 2048 or EC P-256/P-384, and nothing more")
    return info


def sign_csr(settings: Settings, csr_path: Path, name: str, days: int | None, runner: Runner) -> SignResult:
    pki = settings.pki
    pki.require_ca()
    days = validate.days(days if days is not None else settings.profile.clients.days)
    info = inspect(settings, csr_path, name, runner)
    files = ClientFiles(name)
    refuse_conflicts(pki, name)
    content = csr_path.read_bytes()
    with pki_lock(pki.lock_path), Transaction(pki.root) as tx:
        refuse_conflicts(pki, name)
        tx.created(pki.path(files.csr))
        atomic_write(pki.path(files.csr), content, MODE_PUBLIC)
        row = sign_into_database(pki, openssl.ca_sign(files.csr, files.crt, days), name, files.crt, runner, tx)
        issued = runner.run(Command(("openssl", "x509", "-in", files.crt, "-noout", "-text")), cwd=pki.root).stdout
        if not re.search(r"Basic Constraints: critical\s+CA:FALSE", issued) or "TLS Web Client Authentication" not in issued \
                or "Certificate Sign" in issued:
            raise StateError("the issued certificate is not a plain client certificate (CA:FALSE, clientAuth); it was withdrawn",
                             hint="check the [ v3_client ] section of openssl.cnf")
    return SignResult(name, row.serial, row.expires, info.sans, pki.path(files.csr), pki.path(files.crt))

