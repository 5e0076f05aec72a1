"""Secrets in, results out.

In: the export password (--password-stdin / --password-file) and passphrases (a file, an inherited
descriptor, or the terminal), never from argv or the environment.
Out: human status on stderr, data (and every --json) on stdout; progress only on a terminal; dry-run plans
as the commands you would type; what happened after a CRL change (after_change.AfterChange).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtlsctl.errors import InputError

if TYPE_CHECKING:
    from mtlsctl.after_change import AfterChange
    from mtlsctl.crl import CrlInfo
    from mtlsctl.runner import Command


# ------------------------------------------------------------------ out


def info(message: str) -> None:
    """One line of human status, on stderr."""
    print(message, file=sys.stderr)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


class TerminalReporter:
    """Progress on stderr, only when stderr is a terminal (cron logs stay clean)."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self._ticking = False

    def step(self, label: str) -> None:
        if self.enabled:
            self._end_tick()
            print(f"  {label} ...", file=sys.stderr, flush=True)

    def tick(self, label: str, elapsed: float) -> None:
        if self.enabled:
            self._ticking = True
            print(f"\r    still working: {elapsed:.0f}s", end="", file=sys.stderr, flush=True)

    def _end_tick(self) -> None:
        if self._ticking:
            print(file=sys.stderr)
            self._ticking = False


def print_plan(pki_dir: Path, commands: Iterable[Command], notes: Iterable[str] = (), *, as_json: bool = False) -> None:
    """A dry run: the plan the real run executes, as the openssl commands you would type in the PKI directory,
    with notes (file moves, what is checked). With --json, one object on stdout:
    {"dry_run": true, "pki_dir", "commands": [{"argv", "command", "label"}], "notes"}."""
    commands, notes = list(commands), list(notes)
    if as_json:
        print_json({"dry_run": True, "pki_dir": str(pki_dir), "notes": notes,
                    "commands": [{"argv": list(cmd.argv), "command": cmd.display(), "label": cmd.label} for cmd in commands]})
        return
    info(f"# dry run: nothing is changed. Commands run in {pki_dir}:")
    for note in notes:
        info(f"# {note}")
    for cmd in commands:
        print(cmd.display())


def crl_json(crl: CrlInfo | None) -> dict[str, object] | None:
    return crl.to_json() if crl is not None else None


def crl_line(crl: CrlInfo) -> str:
    from datetime import datetime, timezone

    from mtlsctl.lifecycle import days_left

    left = days_left(crl.next_update, datetime.now(timezone.utc))
    when = (f"EXPIRED {crl.next_update:%Y-%m-%d %H:%M} UTC: nginx rejects EVERY client; run `mtlsctl crl`" if left <= 0
            else f"next update {crl.next_update:%Y-%m-%d %H:%M} UTC ({left} days)")
    return f"{when}, CRL number {crl.crl_number}, {crl.revoked} revoked"


RELOAD_NOTE = ("then publish.command (when set), the profile's nginx test and reload commands (nginx reads the CRL "
               "only at reload)")


def tell(after: AfterChange) -> None:
    """What happened after the change (published, not reloaded and why, OCSP primed), on stderr."""
    for note in after.notes:
        info(note)


def finish(after: AfterChange, as_json: bool) -> None:
    """The last word of a writer, after its result is shown: exit 1 if publishing or the reload failed (the
    change stands, and the message says so), else say that nginx reloaded."""
    failure = after.failure()
    if failure is not None:
        raise failure
    if after.reloaded and not as_json:
        print("nginx reloaded (it reads the CRL only at reload)")


# ------------------------------------------------------------------ in


SECRET_READ_LIMIT = 4096  # a password or passphrase is at most 1023 characters; /dev/zero is not one


def read_bounded(source: Any, what: str, limit: int = SECRET_READ_LIMIT) -> str:
    """Text from a path, a descriptor or a text stream, at most `limit` bytes: a device or an endless pipe given
    by mistake (`--password-file /dev/zero`) is refused in one line instead of filling memory."""
    if isinstance(source, Path):
        with open(source, "rb") as fh:
            raw = fh.read(limit + 1)
    elif isinstance(source, int):
        with os.fdopen(os.dup(source), "rb") as fh:
            raw = fh.read(limit + 1)
    else:
        raw = source.read(limit + 1)
        raw = raw.encode("utf-8") if isinstance(raw, str) else raw
    if len(raw) > limit:
        raise InputError(f"{what} is longer than {limit} bytes: that is not a password or a list of names",
                         hint="give a small text file (a device such as /dev/zero never ends)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} is not UTF-8 text (byte {exc.start})") from None


def read_password(password_stdin: bool, password_file: Path | None) -> str | None:
    """The export password from stdin or a file; None means "generate one"."""
    from mtlsctl import validate

    if password_stdin and password_file is not None:
        raise InputError("--password-stdin and --password-file are mutually exclusive", hint="give one of them")
    if password_stdin:
        if sys.stdin is None or sys.stdin.isatty():
            raise InputError("--password-stdin needs the password piped on standard input",
                             hint="e.g. printf '%s\\n' \"$PASS\" | mtlsctl ...")
        return validate.password(validate.strip_one_newline(read_bounded(sys.stdin, "standard input")), source="stdin")
    if password_file is not None:
        return secret_from_file(password_file, "--password-file")
    return None


def secret_from_file(path: Path, option: str) -> str:
    """The password or passphrase in the first line of a file named by `option` (bounded, validated)."""
    from mtlsctl import validate

    try:
        text = read_bounded(path, f"{option} {path}")
    except OSError as exc:
        raise InputError(f"cannot read {option} {path}: {exc.strerror or exc}") from None
    return validate.password(validate.strip_one_newline(text), source=str(path))


def read_passphrase(file: Path | None, fd: int | None, *, prompt: bool, confirm: bool, what: str = "backup passphrase",
                    option: str = "--passphrase-file FILE or --passphrase-fd N") -> str | None:
    """A passphrase from a file, an inherited descriptor, or the terminal (when `prompt`); None when none is
    given and `prompt` is False. Never from argv or the environment."""
    from mtlsctl import validate

    if file is not None and fd is not None:
        raise InputError(f"give only one of {option}")
    if file is not None:
        return secret_from_file(file, "--passphrase-file")
    if fd is not None:
        try:
            text = read_bounded(fd, f"--passphrase-fd {fd}")
        except OSError as exc:
            raise InputError(f"cannot read --passphrase-fd {fd}: {exc.strerror}", hint="open it in the shell, e.g. 3<pass.txt") from None
        return validate.password(validate.strip_one_newline(text), source=f"descriptor {fd}")
    if not prompt:
        return None
    if sys.stdin is None or not sys.stdin.isatty():
        raise InputError(f"a {what} is needed but there is no terminal to ask on", hint=f"give {option}")
    import getpass

    first = validate.password(getpass.getpass(f"{what[0].upper() + what[1:]}: "), source="the terminal")
    if confirm and getpass.getpass("Again: ") != first:
        raise InputError("the two passphrases differ")
    return first
