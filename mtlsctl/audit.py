"""The audit log: one JSON line per change to the PKI, in `<pki>/audit.log`.

Who issued, exported, revoked or renewed what, and when. Each line is one JSON object:

    {"v": 1, "time": "2025-01-31T09:12:03Z", "uid": 0, "user": "root", "sudo_user_claimed": "alice",
     "pid": 4242, "command": "revoke", "names": ["alice"], "serials": ["1003"], "result": "ok",
     "error": null, "details": {"reason": "keyCompromise"}}

- **Append only, created never followed.** The file is created 0600 with O_CREAT|O_EXCL|O_NOFOLLOW on first
  use, then opened with O_APPEND|O_NOFOLLOW (a symbolic link, a FIFO or a directory there is refused by
  name); each line is one write(), fsynced.
- **Under the PKI's exclusive lock.** A writer that holds it records directly; a caller that does not (`deliver`
  serves for minutes without it) gets the lock for the moment of the write.
- **After the change commits.** An "ok" line while a transaction of this process still has uncommitted changes
  under the PKI is a programming error (a rollback would leave a line that claims success).
- **Never a secret.** Details are plain scalars; a detail whose key names a secret (password, passphrase, key,
  token, secret) or whose value carries PEM material is refused with ValueError (a bug in the caller, not
  input). `SUDO_USER` comes from the environment, which proves nothing: it is recorded as *claimed*.

The reader (`mtlsctl log`) trusts nothing in the file: every line is checked for shape and types; a damaged or
hostile line is reported by its number and skipped.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
import pwd
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mtlsctl import files
from mtlsctl.errors import InputError

if TYPE_CHECKING:
    from mtlsctl.pki import Pki

log = logging.getLogger("mtlsctl")

AUDIT_FILE = "audit.log"
AUDIT_VERSION = 1
# The commands that write lines (`mtlsctl log --command` takes one of these).
KNOWN_COMMANDS = ("init", "add-client", "add-server", "ocsp-setup", "sign-csr", "export", "deliver", "replace", "revoke",
                  "renew", "crl", "restore", "ca-passphrase-change", "root-export-offline")
MODE_AUDIT = files.MODE_SECRET
LOCK_TIMEOUT = 120.0

# A detail whose key says it holds a secret is a bug in the caller: the audit log never holds one.
_SECRET_KEY_RE = re.compile(r"(?i).*(pass(word|phrase|wd|in|out)?|pwd|secret|token|key|pin|credential|private).*")
_DETAIL_KEY_RE = re.compile(r"[a-z][a-z0-9_]{0,39}")
_COMMAND_RE = re.compile(r"[a-z][a-z0-9-]{0,39}")
_SERIAL_RE = re.compile(r"[0-9A-F]{1,64}")
_MAX_TEXT = 300  # one detail value / one error line, at most
_MAX_ITEMS = 10_000  # names or serials in one line (a batch of add-client, a renew run)
_MAX_LINE = 1 << 20  # the reader skips a longer line (a hostile file)
_PEM_RE = re.compile(r"-----BEGIN |PRIVATE KEY")
# What a shown string may hold: no control characters (terminal escapes), no bidi or zero-width characters.


_HIDDEN_CATEGORIES = ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn")  # controls, format (bidi, zero-width), separators


def _printable(text: str) -> bool:
    """No character that a terminal acts on or that hides text: no controls, format, separator, surrogate,
    private or unassigned code points (by Unicode category)."""
    import unicodedata

    return all(unicodedata.category(c) not in _HIDDEN_CATEGORIES for c in text)


def _one_line(text: str) -> str:
    """A string as the audit log keeps it: every hidden character (a newline, a tab, an escape, a bidi or
    zero-width mark) written as a visible \\xNN / \\uNNNN escape (a backslash as two), never cut off at
    one, so the line is what happened and `mtlsctl log` shows it; at most _MAX_TEXT characters."""
    import unicodedata

    text = text.strip()
    shown = "".join(
        "\\\\" if c == "\\" else
        (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
        if unicodedata.category(c) in _HIDDEN_CATEGORIES else c
        for c in text)
    return shown if len(shown) <= _MAX_TEXT else shown[:_MAX_TEXT - 3] + "..."


def _check_text(what: str, value: str) -> str:
    if _PEM_RE.search(value):
        raise ValueError(f"audit: {what} carries PEM/key material; the audit log never holds a secret")
    return value


def _error_text(text: str) -> str:
    """An error's first line as the audit log keeps it. Unlike a detail it is never refused — a failure must be
    recorded, and openssl's own words can name a key ("Expecting: ANY PRIVATE KEY") — but a PEM block, should
    one ever start on that line, is cut off."""
    start = text.find("-----BEGIN ")
    return text if start < 0 else text[:start] + "[PEM material left out]"


def _invoker() -> dict[str, object]:
    """Who ran this: the real uid and its login name from the password database; SUDO_USER as claimed only."""
    uid = os.getuid()
    try:
        user: str | None = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = None
    out: dict[str, object] = {"uid": uid, "user": user}
    sudo = os.environ.get("SUDO_USER")
    if sudo:
        out["sudo_user_claimed"] = _one_line(sudo)[:64]
    return out


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _uncommitted(root: Path) -> bool:
    """Does a transaction of this process still hold uncommitted changes under `root`?"""
    for tx in files._OPEN:  # noqa: SLF001 - the journal's own record of open transactions
        if tx.root == root and (tx._created or tx._snapshots or tx._listings):  # noqa: SLF001
            return True
    return False


def build_line(command: str, *, names: Sequence[str] = (), serials: Sequence[str] = (), result: str = "ok",
               error: str | None = None, details: dict[str, str | int | bool | None] | None = None) -> str:
    """The JSON line `record` appends (without the newline); ValueError for a call that breaks the rules."""
    if not isinstance(command, str) or not _COMMAND_RE.fullmatch(command):
        raise ValueError(f"audit: command {command!r} is not a plain command name")
    if result not in ("ok", "failed"):
        raise ValueError(f"audit: result {result!r} is neither 'ok' nor 'failed'")
    if isinstance(names, str) or isinstance(serials, str):
        raise ValueError("audit: names and serials are sequences of strings, not one string")
    for what, items in (("name", names), ("serial", serials)):
        for i, item in enumerate(items):  # the message never repeats the value: it may be what must not be written
            if not isinstance(item, str):
                raise ValueError(f"audit: {what} #{i} is a {type(item).__name__}, not a string")
            _check_text(f"{what} #{i}", item)
            if not item or len(item) > _MAX_TEXT or not _printable(item):
                raise ValueError(f"audit: {what} #{i} is not a printable one-line string")
    serials = [s.upper() for s in serials]
    for i, s in enumerate(serials):
        if not _SERIAL_RE.fullmatch(s):
            raise ValueError(f"audit: serial #{i} is not hexadecimal")
    if error is not None and not isinstance(error, str):
        raise ValueError("audit: error is a string (the error's one line)")
    checked: dict[str, str | int | bool | None] = {}
    for key, value in (details or {}).items():
        if not _DETAIL_KEY_RE.fullmatch(key):
            raise ValueError(f"audit: detail key {key!r} is not a plain lower-case name")
        if _SECRET_KEY_RE.fullmatch(key):
            raise ValueError(f"audit: detail {key!r} looks like a secret (password, passphrase, key, token); "
                             "the audit log never holds one")
        if value is not None and not isinstance(value, str | int | bool):
            raise ValueError(f"audit: detail {key!r} is a {type(value).__name__}, not a plain scalar")
        if isinstance(value, str):
            value = _check_text(f"detail {key!r}", _one_line(value))
        if value is not None:  # None: nothing to say (a detail that does not apply), left out
            checked[key] = value
    entry: dict[str, object] = {"v": AUDIT_VERSION, "time": _now(), **_invoker(), "pid": os.getpid(),
                                "command": command, "names": list(names)[:_MAX_ITEMS], "serials": serials[:_MAX_ITEMS],
                                "result": result,
                                "error": _error_text(_one_line(error)) if error else None,
                                "details": checked}
    return json.dumps(entry, ensure_ascii=True, separators=(",", ":"))


def _open_for_append(path: Path) -> int:
    """The audit log, opened to append: created 0600 (O_EXCL|O_NOFOLLOW) the first time; afterwards opened
    O_APPEND|O_NOFOLLOW and checked to be a regular file (a FIFO would block, a symlink is refused by name)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        fd = files.create_exclusive(path, MODE_AUDIT)
        os.fchmod(fd, MODE_AUDIT)  # whatever the umask
        files.fsync_dir(path.parent)
        return fd
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            files.refuse_symlink(path)
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputError(f"{path} is not a regular file", hint="move it away; mtlsctl creates the audit log itself")
    return fd


def _append(path: Path, line: str) -> None:
    fd = _open_for_append(path)
    try:
        data = (line + "\n").encode("ascii")
        written = os.write(fd, data)  # one write(): O_APPEND puts the whole line at the end
        if written != len(data):
            raise OSError(errno.ENOSPC, "short write to the audit log", str(path))
        os.fsync(fd)
    finally:
        os.close(fd)


def record(pki: Pki, command: str, *, names: Sequence[str] = (), serials: Sequence[str] = (),
           result: str = "ok", error: str | None = None, **details: str | int | bool | None) -> None:
    """Append one line to `<pki>/audit.log`: who (uid, login name; SUDO_USER as claimed), when (UTC, RFC 3339),
    which command, on which names and serials, with what result, and small details.

    Call it where the change is made, after it commits (an "ok" line while this process still has uncommitted
    changes under the PKI raises ValueError), or with result="failed" and the error's one line when it failed.
    Callers holding the PKI's exclusive lock write directly; others (deliver) take the lock for the moment of the
    write. Never pass a secret: a detail named like one, a value that is not a plain scalar, or PEM material
    raises ValueError (a bug in the caller).

    A failure to write the log itself (disk full, a symbolic link planted there) does not undo the change that
    was made: it is reported as a warning on stderr, naming what was not recorded.
    """
    _record(pki, command, names, serials, result, error, details, lock=True)


def record_new_pki(pki: Pki, command: str, **details: str | int | bool | None) -> None:
    """`record` for a PKI this process has just made and nobody else can be working on yet (restore, into an
    empty directory it created the contents of): appended without creating the lock file there."""
    _record(pki, command, (), (), "ok", None, details, lock=False)


def _record(pki: Pki, command: str, names: Sequence[str], serials: Sequence[str], result: str, error: str | None,
            details: dict[str, str | int | bool | None], *, lock: bool) -> None:
    line = build_line(command, names=names, serials=serials, result=result, error=error, details=details)
    root = Path(os.path.abspath(pki.root))
    if result == "ok" and _uncommitted(root):
        raise ValueError(f"audit: {command} recorded 'ok' before its transaction committed; record after the commit")
    path = root / AUDIT_FILE
    try:
        if files.holds_lock(root, exclusive=True) or not lock:
            _append(path, line)
        elif files.holds_lock(root, exclusive=False):
            raise ValueError("audit: record() called under a shared (read) lock; release it or take the exclusive one")
        else:
            with files.pki_lock(pki.lock_path, timeout=LOCK_TIMEOUT, recover_journal=False):
                _append(path, line)
    except ValueError:
        raise
    except (OSError, InputError) as exc:
        reason = exc.message if isinstance(exc, InputError) else f"{exc.strerror or exc}"
        log.warning("the audit log %s was not written (%s): %s %s %s", path, reason, command, result,
                    " ".join(names)[:200])
    except Exception as exc:  # noqa: BLE001 - the lock (LockError, StateError): the change itself is done
        log.warning("the audit log %s was not written (%s): %s %s %s", path, getattr(exc, "message", exc), command,
                    result, " ".join(names)[:200])


def record_failure(pki: Pki, command: str, exc: BaseException, *, names: Sequence[str] = (),
                   serials: Sequence[str] = (), **details: str | int | bool | None) -> None:
    """A change that was attempted and failed (after its input was accepted): one "failed" line with the error's
    first line. Bad input (InputError, exit 2) writes nothing: nothing was attempted."""
    if isinstance(exc, InputError) or not isinstance(exc, Exception) or getattr(exc, _RECORDED, False):
        return
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    if isinstance(exc, OSError):
        message = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    record(pki, command, names=names, serials=serials, result="failed", error=str(message), **details)
    mark_recorded(exc)


_RECORDED = "_mtlsctl_audit_recorded"


def mark_recorded(exc: BaseException) -> None:
    """This error has its "failed" line already (written with what only its raiser knew, a serial say): an
    enclosing failures_recorded does not write a second one."""
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, _RECORDED, True)


@contextlib.contextmanager
def failures_recorded(pki: Pki, command: str, *, names: Sequence[str] = (), serials: Sequence[str] = (),
                      **details: str | int | bool | None) -> Iterator[None]:
    """`with failures_recorded(pki, "revoke", names=[name]):` records a "failed" line when the block raises
    (anything but bad input), then lets the error go on. Use it outside the transaction, inside the lock."""
    try:
        yield
    except Exception as exc:
        with contextlib.suppress(Exception):
            record_failure(pki, command, exc, names=names, serials=serials, **details)
        raise


# --------------------------------------------------------------------------- reading it (`mtlsctl log`)


@dataclass(frozen=True)
class AuditEntry:
    """One line of the audit log, checked."""

    line: int
    time: dt.datetime
    uid: int
    user: str | None
    sudo_user_claimed: str | None
    pid: int | None
    command: str
    names: tuple[str, ...]
    serials: tuple[str, ...]
    result: str
    error: str | None
    details: dict[str, str | int | bool | None]

    def to_json(self) -> dict[str, object]:
        return {"line": self.line, "time": self.time.strftime("%Y-%m-%dT%H:%M:%SZ"), "uid": self.uid,
                "user": self.user, "sudo_user_claimed": self.sudo_user_claimed, "pid": self.pid,
                "command": self.command, "names": list(self.names), "serials": list(self.serials),
                "result": self.result, "error": self.error, "details": dict(self.details)}


@dataclass
class AuditLog:
    """What `mtlsctl log` shows: the lines that passed every check and matched the filters, and the problems."""

    path: Path
    entries: list[AuditEntry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "line N: why it was skipped"
    exists: bool = True

    def to_json(self) -> dict[str, object]:
        return {"path": str(self.path), "entries": [e.to_json() for e in self.entries], "problems": self.problems}


class _BadLine(Exception):
    pass


_TIME_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_KEYS = {"v", "time", "uid", "user", "pid", "command", "names", "serials", "result", "error", "details"}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: object, what: str, *, optional: bool = False, limit: int = _MAX_TEXT) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > limit or not _printable(value):
        raise _BadLine(f"{what} is not a printable one-line string")
    return value


def parse_line(number: int, raw: bytes) -> AuditEntry:
    """One line, checked for shape and types (raises _BadLine with the reason)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _BadLine("not a JSON line (damaged or truncated)") from None
    if not isinstance(obj, dict):
        raise _BadLine("not a JSON object")
    keys = set(obj)
    if not _KEYS <= keys or keys - _KEYS - {"sudo_user_claimed"}:
        raise _BadLine("not the audit log's keys")
    if obj["v"] != AUDIT_VERSION or not _is_int(obj["v"]):
        raise _BadLine(f"version {str(obj['v'])[:20]!r}, not {AUDIT_VERSION}")
    if not isinstance(obj["time"], str) or not _TIME_RE.fullmatch(obj["time"]):
        raise _BadLine("time is not UTC RFC 3339 (YYYY-MM-DDTHH:MM:SSZ)")
    try:
        when = dt.datetime.strptime(obj["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        raise _BadLine("time is not a real date") from None
    if not _is_int(obj["uid"]) or not 0 <= obj["uid"] < 2**32:
        raise _BadLine("uid is not a number")
    if obj["pid"] is not None and (not _is_int(obj["pid"]) or not 0 < obj["pid"] < 2**32):
        raise _BadLine("pid is not a number")
    command = _text(obj["command"], "command")
    if command is None or not _COMMAND_RE.fullmatch(command):
        raise _BadLine("command is not a command name")
    if obj["result"] not in ("ok", "failed"):
        raise _BadLine("result is neither ok nor failed")
    for key in ("names", "serials"):
        if not isinstance(obj[key], list) or len(obj[key]) > _MAX_ITEMS:
            raise _BadLine(f"{key} is not a list")
        for item in obj[key]:
            _text(item, f"an item of {key}")
    if not all(_SERIAL_RE.fullmatch(s) for s in obj["serials"]):
        raise _BadLine("a serial is not hexadecimal")
    details = obj["details"]
    if not isinstance(details, dict) or len(details) > 40:
        raise _BadLine("details is not an object")
    for key, value in details.items():
        if not _DETAIL_KEY_RE.fullmatch(key):
            raise _BadLine("a detail key is not a plain name")
        if value is not None and not isinstance(value, str | bool) and not _is_int(value):
            raise _BadLine(f"detail {key} is not a plain value")
        if isinstance(value, str):
            _text(value, f"detail {key}")
    return AuditEntry(
        line=number, time=when, uid=obj["uid"], user=_text(obj["user"], "user", optional=True, limit=64),
        sudo_user_claimed=_text(obj.get("sudo_user_claimed"), "sudo_user_claimed", optional=True, limit=64),
        pid=obj["pid"], command=command, names=tuple(obj["names"]), serials=tuple(obj["serials"]),
        result=obj["result"], error=_text(obj["error"], "error", optional=True), details=dict(details),
    )


def _read_lines(path: Path) -> tuple[list[bytes], bool]:
    """The file's lines (regular file only, never through a symlink); (lines, exists)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return [], False
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            files.refuse_symlink(path)
        raise
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise InputError(f"{path} is not a regular file", hint="move it away; mtlsctl creates the audit log itself")
        return fh.read().split(b"\n"), True


def read_log(pki: Pki, *, since: dt.datetime | None = None, name: str | None = None,
             command: str | None = None) -> AuditLog:
    """The audit log's lines that pass every check and match the filters (`since` inclusive, UTC; `name` one of
    the line's names; `command` exactly). A damaged or hostile line is skipped and named in `problems`."""
    path = Path(os.path.abspath(pki.root)) / AUDIT_FILE
    lines, exists = _read_lines(path)
    out = AuditLog(path, exists=exists)
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        if len(raw) > _MAX_LINE:
            out.problems.append(f"line {number}: longer than {_MAX_LINE >> 20} MiB, skipped")
            continue
        try:
            entry = parse_line(number, raw)
        except _BadLine as exc:
            out.problems.append(f"line {number}: {exc}, skipped")
            continue
        if since is not None and entry.time < since:
            continue
        if name is not None and name not in entry.names:
            continue
        if command is not None and entry.command != command:
            continue
        out.entries.append(entry)
    return out


def last_entry(pki: Pki, command: str) -> AuditEntry | None:
    """The newest well-formed line of `command` (metrics: the last renew run)."""
    entries = read_log(pki, command=command).entries
    return entries[-1] if entries else None
