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
_HEX = frozenset("0123456789ABCDEF")


def normalize_serial(text: str) -> str:
    """A serial as openssl spells it in index.txt and names it in newcerts/: upper-case hex without leading
    zero bytes, even length (`00FF` -> `FF`, `0100` stays, `0` -> `00`).

    FIELD-NOTES: a `serial` file of `00FF` makes openssl write `newcerts/FF.pem` and an index row `FF`.
    Every reader of `serial`, index.txt and newcerts/ compares serials in this form. Raises ValueError
    for anything that is not hex.
    """
    value = text.strip().upper()
    if not value or not set(value) <= _HEX:
        raise ValueError(f"{text!r} is not a hexadecimal serial")
    value = value.lstrip("0")
    return value.zfill(len(value) + len(value) % 2) if value else "00"


def newcert_path(serial: str) -> str:
    """Where `openssl ca` keeps the certificate with this serial (relative to the PKI): newcerts/SERIAL.pem."""
    return f"newcerts/{normalize_serial(serial)}.pem"


def newcerts_serials(directory: Path) -> set[str]:
    """The serials of the files in newcerts/ (normalised; names that are not SERIAL.pem are skipped)."""
    out = set()
    for path in directory.glob("*.pem"):
        try:
            out.add(normalize_serial(path.stem))
        except ValueError:
            continue
    return out


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


_RFC2253_SPECIAL = frozenset(',+"\\<>;')


def rfc2253(oneline: str) -> str:
    """index.txt's subject (`/C=ES/O=Org/CN=x`, openssl's X509_NAME_oneline) in RFC 2253 form, exactly as
    nginx's $ssl_client_s_dn and `openssl x509 -nameopt RFC2253` show it: `CN=x,O=Org,C=ES`.

    The oneline form escapes `/` and `+` with a backslash and writes bytes outside printable ASCII as
    `\\xHH`; an unescaped `+` joins the values of one multi-valued RDN. RFC 2253 reverses the order, escapes
    `, + " \\ < > ;`, a leading `#` or space and a trailing space with a backslash, and writes control
    characters and every byte of a non-ASCII character as `\\XX` (openssl's XN_FLAG_RFC2253).
    """
    rdns: list[list[bytearray]] = []
    cur: bytearray | None = None
    i, text = 0, oneline
    while i < len(text):
        c = text[i]
        if c == "/" or (c == "+" and rdns):
            if c == "/":
                rdns.append([])
            cur = bytearray()
            rdns[-1].append(cur)
            i += 1
            continue
        if cur is None:  # text before the first `/`: not a oneline subject, shown as it is
            return oneline
        if c == "\\" and text[i + 1:i + 2] in ("/", "+"):
            cur += text[i + 1].encode()
            i += 2
        elif c == "\\" and re.fullmatch(r"x[0-9A-Fa-f]{2}", text[i + 1:i + 4]):
            cur.append(int(text[i + 2:i + 4], 16))
            i += 4
        else:
            cur += c.encode("utf-8", "replace")
            i += 1
    out = []
    for rdn in reversed(rdns):
        avas = []
        for ava in reversed(rdn):
            key, _, value = bytes(ava).partition(b"=")
            shown = []
            for n, b in enumerate(value):
                ch = chr(b)
                if b < 0x20 or b >= 0x7F:
                    shown.append(f"\\{b:02X}")
                elif ch in _RFC2253_SPECIAL or (n == 0 and ch in "# ") or (n == len(value) - 1 and ch == " "):
                    shown.append("\\" + ch)
                else:
                    shown.append(ch)
            avas.append(key.decode("ascii", "replace") + "=" + "".join(shown))
        out.append("+".join(avas))
    return ",".join(out)


def parse_index(text: str, source: str = "index.txt") -> list[IndexRow]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 6 or fields[0] not in ("V", "R", "E"):
            raise StateError(f"{source} line {lineno} is not an openssl ca database row",
                             hint="restore index.txt from index.txt.old or a backup")
        status, expiry, revocation, serial, _filename, subject = fields
        revoked_at = reason = None
        if revocation:
            date, _, why = revocation.partition(",")
            revoked_at = parse_asn1_time(date)
            reason = why or "unspecified"
        try:
            serial = normalize_serial(serial)
        except ValueError:
            raise StateError(f"{source} line {lineno} has the serial {serial[:40]!r}, which is not hex",
                             hint="restore index.txt from index.txt.old or a backup") from None
        try:
            rows.append(IndexRow(status, parse_asn1_time(expiry), revoked_at, reason, serial, subject))
        except ValueError:
            raise StateError(f"{source} line {lineno} has a date openssl would not write", hint="restore index.txt from a backup") from None
    return rows


def read_index(path: Path) -> list[IndexRow]:
    return parse_index(path.read_text(encoding="utf-8", errors="replace"), str(path))


def read_serial(path: Path) -> str:
    """The next serial `openssl ca` will use (the `serial` file), as openssl will write it in index.txt and
    name it in newcerts/ (normalised: a file holding `00FF` gives `FF`)."""
    text = path.read_text(encoding="ascii", errors="replace").strip().upper()
    if not text or len(text) % 2 or not set(text) <= _HEX:
        raise StateError(f"{path} holds {text[:40]!r}, not an even-length hex serial", hint="openssl ca needs e.g. 1000")
    return normalize_serial(text)


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
