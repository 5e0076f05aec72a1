"""The openssl ca database (index.txt), read in Python: no subprocess per certificate.

Each line has six tab-separated fields (see `openssl ca`, "the index file"):
status (V valid, R revoked, E expired), expiry (YYMMDDHHMMSSZ, or YYYYMMDDHHMMSSZ from 2050),
revocation date[,reason] (empty unless R), serial (hex), file name ("unknown"), subject DN.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from mtlsctl.errors import StateError

_PEM_RE = re.compile(r"-----BEGIN CERTIFICATE-----\s.*?-----END CERTIFICATE-----", re.S)


def parse_asn1_time(text: str) -> datetime:
    """UTCTime (YYMMDDHHMMSSZ; 50..99 means 19xx) or GeneralizedTime (YYYYMMDDHHMMSSZ)."""
    if len(text) == 13:
        year = int(text[:2])
        text = ("19" if year >= 50 else "20") + text
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class IndexRow:
    status: str
    expires: datetime
    revoked_at: datetime | None
    reason: str | None
    serial: str
    subject: str

    @property
    def cn(self) -> str | None:
        """The last CN= in the subject (/C=ES/.../CN=name)."""
        for part in reversed(self.subject.split("/")):
            if part.startswith("CN="):
                return part[3:]
        return None

    def is_active(self, now: datetime | None = None) -> bool:
        """Valid in the database and not yet past its notAfter (openssl leaves expired rows V)."""
        now = now or datetime.now(timezone.utc)
        return self.status == "V" and self.expires > now


def parse_index(text: str, source: str = "index.txt") -> list[IndexRow]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 6 or fields[0] not in ("V", "R", "E"):
            raise StateError(f"{source} line {lineno} is not an openssl ca database row", hint="restore index.txt from index.txt.old or a backup")
        status, expiry, revocation, serial, _filename, subject = fields
        revoked_at = reason = None
        if revocation:
            date, _, why = revocation.partition(",")
            revoked_at = parse_asn1_time(date)
            reason = why or "unspecified"
        try:
            rows.append(IndexRow(status, parse_asn1_time(expiry), revoked_at, reason, serial.upper(), subject))
        except ValueError:
            raise StateError(f"{source} line {lineno} has a date openssl would not write", hint="restore index.txt from a backup") from None
    return rows


def read_index(path: Path) -> list[IndexRow]:
    return parse_index(path.read_text(encoding="utf-8", errors="replace"), str(path))


def read_serial(path: Path) -> str:
    """The next serial `openssl ca` will use (the `serial` file), upper-case hex."""
    text = path.read_text(encoding="ascii", errors="replace").strip().upper()
    if not text or len(text) % 2 or not all(c in "0123456789ABCDEF" for c in text):
        raise StateError(f"{path} holds {text!r}, not an even-length hex serial", hint="openssl ca needs e.g. 1000")
    return text


def pem_certificate(text: str) -> str | None:
    """The first PEM certificate block in a file (openssl ca -out writes a text dump before it)."""
    match = _PEM_RE.search(text)
    return "".join(match.group(0).split()) if match else None


def pem_block(text: str) -> str:
    """The first PEM certificate block of a file, as text with its line breaks (for chain files)."""
    match = _PEM_RE.search(text)
    if not match:
        raise StateError("no PEM certificate in the file")
    return match.group(0).strip() + "\n"


def same_certificate(a: Path, b: Path) -> bool:
    """True when both files hold the same PEM certificate (ignoring text dumps and line breaks)."""
    try:
        ra, rb = a.read_bytes(), b.read_bytes()
    except FileNotFoundError:
        return False
    if ra == rb:  # `openssl ca -out` and newcerts/ hold the same bytes: no parsing needed
        return b"-----BEGIN CERTIFICATE-----" in ra
    pa, pb = pem_certificate(ra.decode(errors="replace")), pem_certificate(rb.decode(errors="replace"))
    return pa is not None and pa == pb
