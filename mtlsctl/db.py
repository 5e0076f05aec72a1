"""The openssl ca database (index.txt), read in Python: no subprocess per certificate.

Each line has six tab-separated fields (see `openssl ca`, "the index file"):
status (V valid, R revoked, E expired), expiry (YYMMDDHHMMSSZ, or YYYYMMDDHHMMSSZ from 2050),
revocation date[,reason] (empty unless R), serial (hex), file name ("unknown"), subject DN.

The database is read lazily, one line at a time (`iter_index`, `scan_index`): a fleet of 100,000 devices is a
7 MB index.txt, and no reader holds all of its rows at once unless it asks for a list (`read_index`). Nothing in
it is trusted: a row openssl would not write (wrong field count, a date that is not a time, a serial that is not
hex, a line longer than MAX_LINE_BYTES) stops the reader with a StateError naming the line, never a traceback.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

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


_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
# The fixed-width digits openssl writes: month 01-12, day 01-31, hour 00-23, minutes and seconds 00-59.
_TIME_DIGITS = r"(?:\d\d|\d{4})(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(?:[01]\d|2[0-3])[0-5]\d[0-5]\d"
_TIME_RE = re.compile(_TIME_DIGITS + "Z", re.ASCII)


def time_key(text: str) -> str | None:
    """An index.txt time as 14 digits YYYYMMDDHHMMSS (UTCTime's 50..99 are 19xx), or None when `text` is not
    a time openssl writes (UTCTime YYMMDDHHMMSSZ or GeneralizedTime YYYYMMDDHHMMSSZ, a real calendar date).

    Keys compare as the times do: scans decide "expired" or "due" on them without building a datetime."""
    return _key_of(text) if _TIME_RE.fullmatch(text) else None


def _key_of(text: str) -> str | None:
    """time_key of a text already known to have the digits of _TIME_RE: the century, the calendar."""
    key = (("19" if text[0] >= "5" else "20") + text[:12]) if len(text) == 13 else text[:14]
    if key[6:8] > "28":  # the 29th-31st: does this month have that day?
        year, month, day = int(key[:4]), int(key[4:6]), int(key[6:8])
        if day > _MONTH_DAYS[month - 1] or (month == 2 and day == 29 and not (year % 4 == 0 and (year % 100 != 0 or year % 400 == 0))):
            return None
    return key if key[:4] != "0000" else None


def key_time(key: str) -> datetime:
    """The datetime (UTC) of a time_key (ISO 8601's basic form, which datetime parses in C)."""
    return datetime.fromisoformat(f"{key[:8]}T{key[8:]}Z")


def now_key(when: datetime) -> str:
    """A moment as a time_key, to compare with rows' keys: `row > now_key(t)` exactly when the row's time is after
    t (index.txt times are whole seconds, so t's fraction of a second never decides)."""
    return f"{when.astimezone(timezone.utc):%Y%m%d%H%M%S}"


def parse_asn1_time(text: str) -> datetime:
    """UTCTime (YYMMDDHHMMSSZ; 50..99 means 19xx) or GeneralizedTime (YYYYMMDDHHMMSSZ); ValueError otherwise."""
    key = time_key(text)
    if key is None:
        raise ValueError(f"{text[:40]!r} is not an ASN.1 time as openssl writes it")
    return key_time(key)


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
        return cn_of(self.subject)

    def is_active(self, now: datetime | None = None) -> bool:
        """Valid in the database and not yet past its notAfter (openssl leaves expired rows V)."""
        now = now or datetime.now(timezone.utc)
        return self.status == "V" and self.expires > now


_RFC2253_SPECIAL = frozenset(',+"\\<>;')


# A subject of plain printable ASCII values, none of which RFC 2253 escapes: `/CN=dev-00042/O=Example Org`.
_PLAIN_SUBJECT_RE = re.compile(r'(?:/[A-Za-z0-9.]+=[^/\\+,"<>;\x00-\x1f\x7f-\U0010ffff]*)+')


def rfc2253(oneline: str) -> str:
    """index.txt's subject in RFC 2253 form (see _rfc2253); a plain subject (the common case) without the
    byte-by-byte walk: its RDNs reversed and joined, the result _rfc2253 gives (tests/test_scale.py compares them)."""
    if _PLAIN_SUBJECT_RE.fullmatch(oneline):
        parts = oneline[1:].split("/")
        if all(not (value := part.partition("=")[2]) or (value[0] not in "# " and value[-1] != " ") for part in parts):
            return ",".join(reversed(parts))
    return _rfc2253(oneline)


def _rfc2253(oneline: str) -> str:
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


MAX_LINE_BYTES = 64 * 1024  # an openssl ca row is a few hundred bytes; a longer line is not one (nor read whole)

# A row as openssl writes it: status, expiry, [revocation date[,reason]], serial (upper-case hex), file, subject.
_ROW_RE = re.compile(rf"([VRE])\t({_TIME_DIGITS}Z)\t(?:({_TIME_DIGITS}Z)(?:,([^\t]*))?)?\t([0-9A-F]+)\t([^\t]*)\t([^\t]*)",
                     re.ASCII)


class IndexLine(NamedTuple):
    """One row of index.txt, checked but not turned into objects (scans: list, renew): every value that is
    an IndexRow field is here as text, the times as time_keys."""

    lineno: int
    status: str
    expires: str  # time_key
    revoked: str | None  # time_key of the revocation date
    reason: str | None
    serial: str  # normalised (normalize_serial)
    subject: str

    @property
    def cn(self) -> str | None:
        return cn_of(self.subject)

    def row(self) -> IndexRow:
        return IndexRow(self.status, key_time(self.expires), key_time(self.revoked) if self.revoked else None,
                        self.reason, self.serial, self.subject)


def cn_of(subject: str) -> str | None:
    """The last CN= in a oneline subject (/C=ES/.../CN=name), as IndexRow.cn."""
    for part in reversed(subject.split("/")):
        if part.startswith("CN="):
            return part[3:]
    return None


def _refused(source: str, lineno: int, what: str) -> StateError:
    return StateError(f"{source} line {lineno} {what}", hint="restore index.txt from index.txt.old or a backup")


def check_line(line: str, lineno: int, source: str = "index.txt") -> IndexLine:
    """One line of index.txt, checked field by field (StateError naming the line and what is wrong)."""
    match = _ROW_RE.fullmatch(line)
    if match is not None:  # the shape openssl writes; only the calendar and the serial's spelling are left to check
        status, expiry, revoked, why, serial, _filename, subject = match.groups()
        expires = _key_of(expiry)
        revoked_key = _key_of(revoked) if revoked else None
        if expires is not None and (revoked is None or revoked_key is not None):
            if len(serial) % 2 or serial.startswith("00"):
                serial = normalize_serial(serial)
            return IndexLine(lineno, status, expires, revoked_key, (why or "unspecified") if revoked else None, serial, subject)
    return _check_slowly(line, lineno, source)


def _check_slowly(line: str, lineno: int, source: str) -> IndexLine:
    """A line that is not in openssl's exact shape: accepted as before (a lower-case or space-padded serial),
    or refused with the reason."""
    fields = line.split("\t")
    if len(fields) != 6:
        raise _refused(source, lineno, f"has {len(fields)} tab-separated fields, not 6: it is not an openssl ca database row")
    status, expiry, revocation, serial, _filename, subject = fields
    if status not in ("V", "R", "E"):
        raise _refused(source, lineno, f"has the status {status[:20]!r} (not V, R or E): it is not an openssl ca database row")
    expires = time_key(expiry)
    if expires is None:
        raise _refused(source, lineno, f"has the expiry {expiry[:40]!r}, a date openssl would not write")
    revoked = reason = None
    if revocation:
        date, _, why = revocation.partition(",")
        revoked = time_key(date)
        if revoked is None:
            raise _refused(source, lineno, f"has the revocation date {date[:40]!r}, a date openssl would not write")
        reason = why or "unspecified"
    try:
        serial = normalize_serial(serial)
    except ValueError:
        raise _refused(source, lineno, f"has the serial {serial[:40]!r}, which is not hex") from None
    return IndexLine(lineno, status, expires, revoked, reason, serial, subject)


_BLOCK = 1 << 18


def index_lines(path: Path, needle: str | None = None, *, ignore_case: bool = False) -> Iterator[tuple[int, str]]:
    """The non-blank lines of index.txt with their numbers, read lazily, a block of 256 kB at a time.

    A line longer than MAX_LINE_BYTES is refused as soon as that much of it is read; bytes that are not
    UTF-8 are replaced (openssl writes ASCII: its subjects escape everything else as \\xHH).

    With `needle` (ASCII), only the lines that may hold it: a block without it is counted and skipped without
    being split into lines (a lookup of one name or serial in 100,000 rows reads 7 MB and splits a block or
    two). `ignore_case`: compared in ASCII lower case, and every line of a block with a byte outside ASCII is
    given (the caller's Unicode comparison decides there). The caller still checks each line it is given."""
    wanted = None
    if needle is not None:
        wanted = needle.encode("ascii").lower() if ignore_case else needle.encode("ascii")
    source = str(path)
    lineno = 0
    rest = b""
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            if wanted is not None:
                joined = rest + block
                del block
                if wanted not in (joined.lower() if ignore_case else joined) and not (ignore_case and not joined.isascii()):
                    end = joined.rfind(b"\n") + 1  # only the last, unfinished line is carried to the next block
                    lineno += joined.count(b"\n", 0, end)
                    rest = joined[end:]
                    if len(rest) > MAX_LINE_BYTES:
                        raise _refused(source, lineno + 1, f"is longer than {MAX_LINE_BYTES} bytes: "
                                       "it is not an openssl ca database row")
                    continue
                lines = joined.split(b"\n")
                del joined
            else:
                lines = block.split(b"\n")
                del block  # one block's lines in memory at a time, whatever the size of the file
                lines[0] = rest + lines[0]  # the line the last block ended in
            rest = lines.pop()
            if len(rest) > MAX_LINE_BYTES:
                raise _refused(source, lineno + len(lines) + 1, f"is longer than {MAX_LINE_BYTES} bytes: "
                               "it is not an openssl ca database row")
            for raw in lines:
                lineno += 1
                if len(raw) > MAX_LINE_BYTES:
                    raise _refused(source, lineno, f"is longer than {MAX_LINE_BYTES} bytes: it is not an openssl ca database row")
                if wanted is not None and wanted not in (raw.lower() if ignore_case else raw) and raw.isascii():
                    continue
                line = raw.decode("utf-8", "replace").removesuffix("\r")
                if line and not line.isspace():
                    yield lineno, line
            del lines
    line = rest.decode("utf-8", "replace").removesuffix("\r")
    if line and not line.isspace() and (wanted is None or wanted in (rest.lower() if ignore_case else rest)
                                        or not rest.isascii()):
        yield lineno + 1, line


def scan_index(path: Path) -> Iterator[IndexLine]:
    """Every row of index.txt, lazily, checked but not parsed into datetimes (see IndexLine)."""
    return _checked(index_lines(path), str(path))


def _checked(lines: Iterable[tuple[int, str]], source: str) -> Iterator[IndexLine]:
    match, new = _ROW_RE.fullmatch, tuple.__new__
    for lineno, line in lines:
        found = match(line)
        if found is not None:  # the fast path of check_line, inline: 100,000 rows
            status, expiry, revoked, why, serial, _filename, subject = found.groups()
            expires = _key_of(expiry)
            revoked_key = _key_of(revoked) if revoked else None
            if expires is not None and (revoked is None or revoked_key is not None) and not (len(serial) % 2 or serial[:2] == "00"):
                yield new(IndexLine, (lineno, status, expires, revoked_key, (why or "unspecified") if revoked else None,
                                      serial, subject))
                continue
        yield check_line(line, lineno, source)


def iter_index(path: Path) -> Iterator[IndexRow]:
    """Every row of index.txt as an IndexRow, lazily, in the file's order (oldest first)."""
    return _rows(scan_index(path))


def _rows(lines: Iterable[IndexLine]) -> Iterator[IndexRow]:
    for line in lines:
        yield IndexRow(line.status, key_time(line.expires), key_time(line.revoked) if line.revoked else None,
                       line.reason, line.serial, line.subject)


def rows_with_serial(path: Path, serial: str) -> list[IndexRow]:
    """The rows of index.txt with this serial (normalised), found without parsing the others: the check after
    each `openssl ca` run, which at 100,000 rows would otherwise parse them all. Lines that do not hold the
    serial as a field are skipped unread; the rows that do are checked like every row."""
    wanted = normalize_serial(serial)
    source = str(path)
    out = []
    # a serial may be written in lower case or with leading zeros (check_line accepts both): its digits, any case
    for lineno, line in index_lines(path, wanted.lstrip("0") or "0", ignore_case=True):
        if (row := check_line(line, lineno, source)).serial == wanted:
            out.append(row.row())
    return out


def rows_named(path: Path, name: str, *, ignore_case: bool = False) -> list[IndexRow]:
    """The rows of index.txt whose subject's CN is `name` (or, `ignore_case`, equal to it in lower case), in the
    file's order, found without parsing the others (index_lines with the needle `CN=name`). Each one is checked
    like every row."""
    source = str(path)
    folded = name.lower()
    out = []
    for lineno, line in index_lines(path, f"CN={name}" if name.isascii() else None, ignore_case=ignore_case):
        cn = cn_of(line.rpartition("\t")[2])
        if cn is not None and (cn.lower() == folded if ignore_case else cn == name):
            out.append(check_line(line, lineno, source).row())
    return out


def parse_index(text: str, source: str = "index.txt") -> list[IndexRow]:
    """The rows of an index.txt already in memory (the same checks as iter_index)."""
    return list(_rows(_checked(_text_lines(text, source), source)))


def _text_lines(text: str, source: str) -> Iterator[tuple[int, str]]:
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if len(line) > MAX_LINE_BYTES:
            raise _refused(source, lineno, f"is longer than {MAX_LINE_BYTES} bytes: it is not an openssl ca database row")
        if line and not line.isspace():
            yield lineno, line


def read_index(path: Path) -> list[IndexRow]:
    """All rows of index.txt in a list: for callers that need them together (a few at a time: prefer iter_index).

    A command that reads the same index.txt again (a writer's first checks, then the same checks under the lock)
    gets the rows of the first read without parsing them again: the file is read and hashed each time (15 ms at
    100,000 rows), and when its bytes are those of the last file read here (this process only), the rows are
    that read's (IndexRow is immutable; the list is new)."""
    data = path.read_bytes()
    key = (os.path.abspath(path), hashlib.blake2b(data, digest_size=16).digest())
    last = _LAST_READ.get("rows")
    if last is not None and last[0] == key:
        return list(last[1])
    rows = parse_index(data.decode("utf-8", "replace"), str(path))
    _LAST_READ["rows"] = (key, tuple(rows))
    return rows


_LAST_READ: dict[str, tuple[tuple[str, bytes], tuple[IndexRow, ...]]] = {}  # read_index's one-file memory


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
    return _same_pem(ra, rb)


def _same_pem(ra: bytes, rb: bytes) -> bool:
    if ra == rb:  # `openssl ca -out` and newcerts/ hold the same bytes: no parsing needed
        return b"-----BEGIN CERTIFICATE-----" in ra
    pa, pb = pem_certificate(ra.decode(errors="replace")), pem_certificate(rb.decode(errors="replace"))
    return pa is not None and pa == pb


MAX_CERT_FILE_BYTES = 1 << 20  # a certificate file is a few kB; a bigger one is not compared (it is not this one)


def exists_at(dir_fd: int, rel: str) -> bool:
    """Whether `rel` (relative to the open directory `dir_fd`) exists; one stat. A name the system refuses
    (too long, a NUL byte: names come from index.txt, which is not trusted) does not."""
    try:
        return os.access(rel, os.F_OK, dir_fd=dir_fd)  # no exception for a missing file: most of 100,000 may be
    except (OSError, ValueError):
        return False


def read_small_at(dir_fd: int, rel: str, limit: int = MAX_CERT_FILE_BYTES) -> bytes | None:
    """The bytes of a file of at most `limit` bytes, relative to `dir_fd`, in one read; None for anything else:
    missing, a directory, unreadable, bigger (a device), or a FIFO with a writer (opened non-blocking: it never
    waits). Three system calls: at 100,000 names, each one counts."""
    try:
        fd = os.open(rel, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except (OSError, ValueError):
        return None
    try:
        data = os.read(fd, 16384)  # a regular file's read returns all it can up to the end (Linux, local files)
        if len(data) == 16384:  # not a certificate's size: read on, up to the limit
            chunks = [data]
            while (size := sum(map(len, chunks))) <= limit and (chunk := os.read(fd, limit + 1 - size)):
                chunks.append(chunk)
            data = b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) <= limit else None


def same_certificate_at(dir_fd: int, a: str, b: str) -> bool:
    """same_certificate for two paths relative to an open directory (`list`: one pair per name, 100,000 names),
    two reads and no parsing when the bytes are equal."""
    ra = read_small_at(dir_fd, a)
    if ra is None:
        return False
    rb = read_small_at(dir_fd, b)
    return rb is not None and _same_pem(ra, rb)
