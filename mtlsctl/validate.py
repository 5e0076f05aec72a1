"""Validation of everything a user types: names, SANs, days, passwords, paths.

Every function raises InputError (exit 2) with one line that says what is wrong and how to fix it,
and is called before anything is written.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from mtlsctl.errors import InputError

# The guide's rule (mtls-add-client.sh), plus: no leading '-', at most 64 characters (the CN limit).
# Every pattern here is used with fullmatch: `^...$` with match() lets a trailing newline through.
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
NAME_MAX = 64

# Names a client or server cannot take, compared without case (case-insensitive file systems, nginx's
# case-insensitive map keys): a client NAME owns private/NAME.key and certs/NAME.{csr,crt,p12}, and the
# PKI's own files share those stems (pki.Pki). The OCSP signer is a role: `ocsp setup` adopts an active
# certificate named ocsp-responder as its signer, so a client of that name would sign OCSP answers without
# the OCSPSigning EKU (nginx then refuses everyone), and `export` would bundle the signer's key. Written
# out here because pki.py imports this module; tests/test_names.py checks it against pki.Pki and ocsp.SIGNER.
_RESERVED_NAMES: dict[str, str] = {
    "ca": "the CA's own files (private/ca.key, ca/ca.crt, crl/ca.crl)",
    "root": "the root CA's files of a two-tier PKI (private/root.key, ca/root.crt, crl/root.crl)",
    "chain": "the CA chain files (ca/chain.pem, crl/chain.crl)",
    "ocsp-responder": "the OCSP signer (certs/ocsp-responder.crt, private/ocsp-responder.key)",
}
# Reserved names that are a role rather than a file: the one caller that plays the role may use the name.
_ROLE_NAMES: dict[str, str] = {"ocsp-responder": "ocsp"}
NAME_ROLES = ("client", "server", "ocsp")

_DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+")
_URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[!-~]+")
SAN_TYPES = ("DNS", "IP", "email", "URI")
# What a SAN value may not contain, and why: the entries are joined into one openssl
# `-addext subjectAltName=...` value, which openssl's config parser reads (FIELD-NOTES: `#` silently cuts
# the SAN list there), and a comma starts another entry.
_SAN_UNSAFE = {
    ",": "a comma starts another SAN entry",
    "#": "openssl's config parser reads it as a comment and silently cuts the SAN list there",
    "$": "openssl's config parser expands it as a variable",
    "\\": "openssl's config parser reads it as an escape",
    '"': "openssl's config parser reads it as a quote",
    "'": "openssl's config parser reads it as a quote",
    "`": "openssl's config parser reads it as a quote and silently drops it",
}

PASSWORD_MAX = 1023  # openssl reads passwords into a 1024-byte buffer


def client_name(name: str, *, role: str | None = None) -> str:
    """Check a client (or server) name: it becomes CN=NAME and the file names NAME.key/.crt/.p12.

    Args:
        name: the name as typed.
        role: why the name is checked. "client" or "server": a new certificate is about to be issued
            under it, so every reserved name is refused. "ocsp": the OCSP signer is being issued or
            looked up, so its own name (and only that) is accepted. None: an existing certificate is
            looked up by name (verify, revoke, export): the OCSP signer's name is accepted, names that
            are the PKI's own files never are.

    Raises:
        InputError: the name is empty, too long, could escape the PKI directory, or is reserved.
    """
    if not name:
        raise InputError("the name is empty", hint="give a name such as iphone-jmrp")
    if len(name) > NAME_MAX:
        raise InputError(f"name {name!r} is {len(name)} characters; at most {NAME_MAX} are allowed")
    if not _NAME_RE.fullmatch(name):
        bad = next(c for c in name if not _NAME_RE.fullmatch(c))
        raise InputError(
            f"name {name!r} contains {bad!r}, which is not allowed",
            hint="use only letters, digits, '.', '_' and '-'",
        )
    if name.startswith(".") or ".." in name:
        raise InputError(f"name {name!r} starts with '.' or contains '..'", hint="pick a plain name")
    if name.startswith("-"):
        raise InputError(f"name {name!r} starts with '-'", hint="names cannot look like options")
    if role is not None and role not in NAME_ROLES:
        raise ValueError(f"role {role!r} is not one of {NAME_ROLES}")  # a caller's bug, not the user's input
    reserved = _RESERVED_NAMES.get(name.lower())
    if reserved is not None:
        owner = _ROLE_NAMES.get(name)  # exact spelling only: a case variant never plays the role
        if owner is None or role not in (None, owner):
            raise InputError(
                f"name {name!r} is reserved: it collides with {reserved}",
                hint="pick another name (reserved names are compared without case)",
            )
    return name


def san(value: str) -> str:
    """Check one subjectAltName entry written TYPE:VALUE (DNS, IP, email, URI); return it normalised.

    The entries are joined into one openssl `-addext subjectAltName=...` value, which openssl's config
    parser reads: a comma would smuggle in another entry, `#` cuts the list silently (FIELD-NOTES),
    `$`, `\\` and quotes are its syntax. Those, whitespace, control and non-ASCII characters are refused,
    each named in the message.
    """
    kind, sep, rest = value.partition(":")
    canonical = {t.lower(): t for t in SAN_TYPES}.get(kind.lower())
    if not sep or canonical is None:
        raise InputError(
            f"SAN {value!r} is not TYPE:VALUE", hint="use DNS:host.example, IP:10.0.0.5, email:a@b.example or URI:spiffe://x"
        )
    if not rest:
        raise InputError(f"SAN {value!r} has an empty value", hint="e.g. DNS:device.example.com")
    for c in rest:
        if c in _SAN_UNSAFE:
            raise InputError(f"SAN {value!r} contains the forbidden character {c!r}: {_SAN_UNSAFE[c]}",
                             hint="drop the #fragment: a URI SAN cannot carry one through openssl -addext"
                             if c == "#" else "remove it")
        if c.isspace() or not c.isprintable() or not c.isascii():
            what = "whitespace" if c.isspace() else "a control character" if not c.isprintable() else "a non-ASCII character"
            raise InputError(f"SAN {value!r} contains the forbidden character {c!r} ({what})",
                             hint="SAN values are ASCII without spaces; write an IDN host in its xn-- form")
    if canonical == "DNS":
        host = rest[2:] if rest.startswith("*.") else rest
        labels = host.rstrip(".").split(".")
        if len(host) > 253 or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
            raise InputError(f"SAN {value!r} is not a valid DNS name", hint="e.g. DNS:device.example.com")
        return f"DNS:{rest.lower()}"
    if canonical == "IP":
        try:
            addr = ipaddress.ip_address(rest)
        except ValueError:
            raise InputError(f"SAN {value!r} is not a valid IP address", hint="e.g. IP:192.0.2.10 or IP:2001:db8::1") from None
        zone = getattr(addr, "scope_id", None)  # IPv6 fe80::1%eth0: openssl cannot encode it
        if zone:
            raise InputError(f"SAN {value!r} has a zone (%{zone}), which a certificate cannot hold", hint="give the address without %zone")
        return f"IP:{addr}"
    if canonical == "email":
        if not _EMAIL_RE.fullmatch(rest):
            raise InputError(f"SAN {value!r} is not a valid e-mail address", hint="e.g. email:alice@example.com")
        return f"email:{rest}"
    if not _URI_RE.fullmatch(rest):
        raise InputError(f"SAN {value!r} is not a valid URI", hint="e.g. URI:spiffe://example.org/device/1")
    return f"URI:{rest}"


def sans(values: list[str] | tuple[str, ...]) -> list[str]:
    """Validate and de-duplicate a list of SAN entries, keeping their order."""
    out: list[str] = []
    for value in values:
        checked = san(value)
        if checked not in out:
            out.append(checked)
    return out


def days(value: int, *, what: str = "--days", maximum: int = 3650) -> int:
    """Check a validity period in days (openssl ca would happily sign 0 or negative periods)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value > maximum:
        raise InputError(f"{what} {value!r} is out of range", hint=f"use a whole number of days from 1 to {maximum}")
    return value


def password(value: str, *, source: str) -> str:
    """Check an export password read from stdin or a file (one trailing newline already removed)."""
    if value == "":
        raise InputError(f"the password from {source} is empty", hint="an empty export password is refused (macOS rejects such bundles)")
    if value.endswith("\r"):
        raise InputError(f"the password from {source} ends with a carriage return",
                         hint="the file has Windows line endings; save it with Unix ones")
    if "\n" in value or "\r" in value or "\x00" in value:
        raise InputError(f"the password from {source} contains a line break or NUL byte", hint="give one line only")
    if len(value) > PASSWORD_MAX:
        raise InputError(f"the password from {source} is longer than {PASSWORD_MAX} characters")
    return value


def strip_one_newline(text: str) -> str:
    """Remove exactly one trailing newline, as `echo "$PASS" |` adds one."""
    return text[:-1] if text.endswith("\n") else text


# Characters that openssl.cnf gives a meaning to ($var, # comment, \ escape, quotes) or that break lines.
_CNF_UNSAFE = set("$#\\\"'`")


def config_unsafe(value: str) -> list[str]:
    """The characters of value that openssl.cnf would read as syntax (or that break its line), sorted."""
    return sorted({c for c in value if c in _CNF_UNSAFE or not c.isprintable()})


def config_value(value: str, *, what: str) -> str:
    """Check a value that is written into openssl.cnf verbatim (subject fields, the PKI path)."""
    bad = config_unsafe(value)
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise InputError(f"{what} {value!r} contains {shown}", hint="openssl.cnf would read these as syntax; remove them")
    if value != value.strip() or not value:
        raise InputError(f"{what} {value!r} is empty or has leading/trailing spaces")
    return value


def pki_dir(path: Path) -> Path:
    """Check and absolutise the PKI directory (it is written into openssl.cnf as `dir`).

    The path checked is the one written: after `~` expansion and made absolute (the current directory or
    $HOME can hold a `#` or a backtick that openssl.cnf would cut or drop, pointing `dir` at another PKI).
    """
    config_value(str(path), what="PKI directory")
    final = Path(str(path)).expanduser().absolute()
    config_value(str(final), what="PKI directory (absolute)")
    return final
