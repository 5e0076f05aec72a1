"""Monitoring: metrics (Prometheus textfile), log (the audit log)."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer

from mtlsctl.cli import io
from mtlsctl.cli.app import PANEL_MAINTENANCE, app
from mtlsctl.cli.context import load_settings
from mtlsctl.errors import InputError

_DATE_RE = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})(?:[T ]([0-9]{2}:[0-9]{2}(?::[0-9]{2})?)(Z|[+-][0-9]{2}:[0-9]{2})?)?")


def parse_since(text: str) -> datetime:
    """--since: YYYY-MM-DD (midnight UTC) or YYYY-MM-DDTHH:MM[:SS][Z|+HH:MM] (UTC when no offset). Raises InputError."""
    m = _DATE_RE.fullmatch(text.strip())
    hint = "e.g. --since 2025-01-31 or --since 2025-01-31T09:00Z (UTC unless an offset is given)"
    if not m:
        raise InputError(f"--since {text!r} is not a date", hint=hint)
    day, clock, zone = m.groups()
    try:
        value = datetime.fromisoformat(f"{day}T{clock or '00:00'}{'+00:00' if zone in (None, 'Z') else zone}")
    except ValueError:
        raise InputError(f"--since {text!r} is not a real date", hint=hint) from None
    return value.astimezone(timezone.utc)


@app.command(rich_help_panel=PANEL_MAINTENANCE)
def metrics(
    ctx: typer.Context,
    out: Annotated[Path | None, typer.Option(
        "--out", metavar="FILE", help="Write to FILE atomically (mode 644) instead of stdout; its directory must exist.")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="With --out: print out, certificates, metrics, ocsp_up and bytes as JSON.")] = False,
) -> None:
    """Print the PKI's state as Prometheus metrics, for node_exporter's textfile collector.

    \b
    Per certificate its notAfter with name, serial, kind and status; the CA (and root) expiry; the
    CRL's next update and number; counts by status; the OCSP responder's liveness when the profile
    has ocsp:; the time and result of the last renew run. Reads index.txt, the CA and the CRL, never
    every certificate. --out writes a temporary file in the same directory and renames it, so the
    collector never reads half a file. With metrics.textfile in the profile, renew, revoke and crl
    rewrite that file after their change. Alert rules: docs/operations.md.

    \b
    Examples:
      mtlsctl metrics
      mtlsctl metrics --out /var/lib/prometheus/node-exporter/mtlsctl.prom
      mtlsctl metrics | promtool check metrics
    """
    from mtlsctl.metrics import metrics as make_metrics

    if as_json and out is None:
        raise InputError("--json describes what --out wrote; without --out the metrics are the output",
                         hint="add --out FILE, or drop --json")
    settings = load_settings(ctx)
    result = make_metrics(settings, out)
    if result.out is None:
        print(result.text, end="")
    elif as_json:
        io.print_json(result.to_json())
    else:
        print(f"wrote {result.families} metrics ({result.certificates} certificates) to {result.out}")


def _user(entry: object) -> str:
    from mtlsctl.audit import AuditEntry

    assert isinstance(entry, AuditEntry)
    who = f"{entry.user or '?'}({entry.uid})"
    return who + (f" sudo:{entry.sudo_user_claimed}?" if entry.sudo_user_claimed else "")


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


@app.command("log", rich_help_panel=PANEL_MAINTENANCE)
def log_(
    ctx: typer.Context,
    since: Annotated[str | None, typer.Option(
        "--since", metavar="DATE", help="Only from DATE on: YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS][Z|+HH:MM] (UTC by default).")] = None,
    name: Annotated[str | None, typer.Option("--name", metavar="NAME", help="Only lines about NAME.")] = None,
    command: Annotated[str | None, typer.Option(
        "--command", metavar="CMD", help="Only this command (add-client, revoke, renew, crl, export, ...).")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON object per line (line, time, uid, user, sudo_user_claimed, pid, command, names, "
                       "serials, result, error, details).")] = False,
) -> None:
    """Show the audit log: who changed what in the PKI, and when (<pki>/audit.log).

    \b
    Every change (init, add-client, add-server, sign-csr, export, replace, revoke, renew, crl,
    restore, deliver, the CA passphrase, the root key's export, ocsp setup) appends one line: UTC
    time, uid and login name (SUDO_USER is shown as claimed: sudo:NAME?), command, names, serials,
    ok or failed with the error. Never a password, passphrase or key. Each line is checked before it
    is shown; a malformed line (damaged, or crafted with escapes or hidden characters) is reported on
    stderr by its number and skipped. A well-formed line written by someone who can write the PKI cannot
    be told from a real one: ship the log elsewhere if that matters (docs/operations.md).

    \b
    Examples:
      mtlsctl log --since 2025-01-01
      mtlsctl log --name alice
      mtlsctl log --command revoke --json | jq -r .names[]
    """
    from mtlsctl import validate
    from mtlsctl.audit import _COMMAND_RE, KNOWN_COMMANDS, read_log

    start = parse_since(since) if since is not None else None
    if name is not None:
        validate.client_name(name)
    if command is not None and (not _COMMAND_RE.fullmatch(command) or command not in KNOWN_COMMANDS):
        raise InputError(f"--command {command!r} is not a command the audit log records",
                         hint="one of: " + ", ".join(KNOWN_COMMANDS))
    settings = load_settings(ctx)
    settings.pki.require_ca()  # a mistyped --pki-dir is "no CA there", not an empty log
    result = read_log(settings.pki, since=start, name=name, command=command)
    for problem in result.problems:
        io.info(f"warning: {result.path} {problem}")
    if not result.exists:
        io.info(f"no audit log yet: {result.path} (written by the first change)")
    if as_json:
        import json

        for entry in result.entries:
            print(json.dumps(entry.to_json(), ensure_ascii=True))
        return
    if not result.entries:
        if result.exists:
            io.info("no matching lines")
        return
    print(f"{'TIME (UTC)':<19} {'USER':<22} {'COMMAND':<20} {'RESULT':<6} {'NAMES':<28} {'SERIALS':<16} DETAILS")
    for e in result.entries:
        details = " ".join(f"{k}={v}" for k, v in e.details.items())
        if e.error:
            details = f"error: {e.error}" + (f"; {details}" if details else "")
        print(f"{e.time:%Y-%m-%d %H:%M:%S} {_short(_user(e), 22):<22} {_short(e.command, 20):<20} {e.result:<6} "
              f"{_short(','.join(e.names), 28) or '-':<28} {_short(','.join(e.serials), 16) or '-':<16} {_short(details, 200)}")
