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
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
NAME_MAX = 64
# Names that would collide with the CA's own files (private/ca.key).
_RESERVED_NAMES = {"ca"}

_DNS_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_EMAIL_RE = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+$")
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[^\s,\"'\\$]+$")
SAN_TYPES = ("DNS", "IP", "email", "URI")

PASSWORD_MAX = 1023  # openssl reads passwords into a 1024-byte buffer


def client_name(name: str) -> str:
    """Check a client (or server) name: it becomes CN=NAME and the file names NAME.key/.crt/.p12.

    Raises:
        InputError: the name is empty, too long, or could escape the PKI directory.
    """
    if not name:
        raise InputError("the name is empty", hint="give a name such as iphone-jmrp")
    if len(name) > NAME_MAX:
        raise InputError(f"name {name!r} is {len(name)} characters; at most {NAME_MAX} are allowed")
    if not _NAME_RE.match(name):
        raise InputError(
            f"name {name!r} contains characters that are not allowed",
            hint="use only letters, digits, '.', '_' and '-'",
        )
    if name.startswith(".") or ".." in name:
        raise InputError(f"name {name!r} starts with '.' or contains '..'", hint="pick a plain name")
    if name.startswith("-"):
        raise InputError(f"name {name!r} starts with '-'", hint="names cannot look like options")
    if name.lower() in _RESERVED_NAMES:
        raise InputError(f"name {name!r} is reserved for the CA's own files", hint="pick another name")
    return name


def san(value: str) -> str:
    """Check one subjectAltName entry written TYPE:VALUE (DNS, IP, email, URI); return it normalised.

    Commas, quotes and whitespace are refused: the entries are joined into one openssl
    `-addext subjectAltName=...` value, where a comma would smuggle in another entry.
    """
    kind, sep, rest = value.partition(":")
    canonical = {t.lower(): t for t in SAN_TYPES}.get(kind.lower())
    if not sep or canonical is None:
        raise InputError(
            f"SAN {value!r} is not TYPE:VALUE", hint="use DNS:host.example, IP:10.0.0.5, email:a@b.example or URI:spiffe://x"
        )
    if not rest or any(c in rest for c in ",\"'\\$ \t\r\n") or not rest.isprintable():
        raise InputError(f"SAN {value!r} has an empty value or a forbidden character (comma, quote, space)")
    if canonical == "DNS":
        host = rest[2:] if rest.startswith("*.") else rest
        labels = host.rstrip(".").split(".")
        if len(host) > 253 or not all(_DNS_LABEL_RE.match(label) for label in labels):
            raise InputError(f"SAN {value!r} is not a valid DNS name", hint="e.g. DNS:device.example.com")
        return f"DNS:{rest.lower()}"
    if canonical == "IP":
        try:
            addr = ipaddress.ip_address(rest)
        except ValueError:
            raise InputError(f"SAN {value!r} is not a valid IP address", hint="e.g. IP:192.0.2.10 or IP:2001:db8::1") from None
        return f"IP:{addr}"
    if canonical == "email":
        if not _EMAIL_RE.match(rest):
            raise InputError(f"SAN {value!r} is not a valid e-mail address", hint="e.g. email:alice@example.com")
        return f"email:{rest}"
    if not _URI_RE.match(rest):
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
        raise InputError(f"the password from {source} ends with a carriage return", hint="the file has Windows line endings; save it with Unix ones")
    if "\n" in value or "\r" in value or "\x00" in value:
        raise InputError(f"the password from {source} contains a line break or NUL byte", hint="give one line only")
    if len(value) > PASSWORD_MAX:
        raise InputError(f"the password from {source} is longer than {PASSWORD_MAX} characters")
    return value


def strip_one_newline(text: str) -> str:
    """Remove exactly one trailing newline, as `echo "$PASS" |` adds one."""
    return text[:-1] if text.endswith("\n") else text


# Characters that openssl.cnf gives a meaning to ($var, # comment, \ escape, quotes) or that break lines.
_CNF_UNSAFE = set("$#\\\"'")


def config_value(value: str, *, what: str) -> str:
    """Check a value that is written into openssl.cnf verbatim (subject fields, the PKI path)."""
    if value != value.strip() or not value:
        raise InputError(f"{what} {value!r} is empty or has leading/trailing spaces")
    bad = sorted({c for c in value if c in _CNF_UNSAFE or not c.isprintable()})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise InputError(f"{what} {value!r} contains {shown}", hint="openssl.cnf would read these as syntax; remove them")
    return value


def pki_dir(path: Path) -> Path:
    """Check and absolutise the PKI directory (it is written into openssl.cnf as `dir`)."""
    text = str(path)
    config_value(text, what="PKI directory")
    return Path(text).expanduser().absolute()
