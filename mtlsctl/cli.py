"""The command line: parse arguments, call one core function, print. No PKI logic lives here.

Human status goes to stderr, data (and --json) to stdout. One error boundary (`main`) turns every
MtlsError into `error: ...` + `hint: ...` and its exit code; nothing else reaches the user as a
traceback unless --debug is given.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click
import typer

from mtlsctl import __version__
from mtlsctl.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    InputError,
    MtlsError,
    os_error_exit_code,
    os_error_lines,
)

app = typer.Typer(
    name="mtlsctl",
    help=(
        "Run the private Certificate Authority behind nginx mutual TLS.\n\n"
        "mtlsctl lays out the PKI exactly as the guide does (/etc/nginx/pki: ca/ certs/ crl/ private/ "
        "newcerts/, index.txt, serial, crlnumber, openssl.cnf) and drives the openssl binary for every "
        "cryptographic step. Add --dry-run to see the exact openssl commands.\n\n"
        "The options below may also follow the command (mtlsctl add-client NAME --pki-dir DIR). Choice values "
        "(--key-type EC, --status Revoked) are read in any case. Shell completion: mtlsctl completion bash|zsh|fish.\n\n"
        "Exit codes: 0 ok, 1 operation failed (rolled back where it can be; a completed step, such as a "
        "revocation, is kept and said so), 2 bad input (nothing written), 3 internal error, 130 interrupted."
    ),
    no_args_is_help=True,
    # typer's --install-completion guesses the shell and appends to ~/.bashrc; `mtlsctl completion SHELL`
    # (below) prints or installs the same machinery's script for a named shell and never overwrites a file.
    add_completion=False,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,  # locals can hold passwords
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


@dataclass
class GlobalOptions:
    pki_dir: Path | None
    profile: Path | None
    debug: bool
    ca_passphrase_file: Path | None = None
    ca_passphrase_fd: int | None = None
    _ca_passphrase: str | None = None

    def ca_passphrase(self, confirm: bool = False) -> str:
        """The CA key passphrase: --ca-passphrase-file, --ca-passphrase-fd, or asked once on the terminal."""
        if self._ca_passphrase is None:
            value = _read_passphrase(self.ca_passphrase_file, self.ca_passphrase_fd, prompt=True, confirm=confirm,
                                     what="CA key passphrase", option="--ca-passphrase-file FILE or --ca-passphrase-fd N")
            assert value is not None
            self._ca_passphrase = value
        return self._ca_passphrase


_debug = False


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


_OPTIONS: GlobalOptions | None = None


def _runner(settings: Any = None, signs: bool = False) -> Any:
    """The Runner for a command. For commands that sign (`signs`), an encrypted CA key's passphrase is
    obtained and checked first, so a wrong one is refused before anything is written."""
    from mtlsctl.runner import Runner

    if settings is None or not signs or _OPTIONS is None or not settings.pki.ca_key_encrypted():
        return Runner(TerminalReporter())
    from mtlsctl.ca import passphrase_check

    passphrase = _OPTIONS.ca_passphrase()
    if Runner().run(passphrase_check(passphrase), cwd=settings.pki.root, check=False).returncode != 0:
        raise InputError("the CA passphrase does not open private/ca.key", hint="check --ca-passphrase-file / --ca-passphrase-fd")
    root = settings.pki.root
    return Runner(TerminalReporter(), ca_passphrase=lambda cwd: passphrase if cwd == root else None)


def _settings(ctx: typer.Context, recover: bool = True) -> Any:
    from mtlsctl.files import recover_if_needed
    from mtlsctl.pki import resolve_settings

    opts: GlobalOptions = ctx.find_root().obj
    settings = resolve_settings(opts.pki_dir, opts.profile, environ={})
    if recover:
        recover_if_needed(settings.pki.root)  # a run killed mid-way left a journal: roll it back first
    return settings


def _reading(settings: Any) -> Any:
    """Readers hold a shared lock on the PKI: no writer runs meanwhile (`openssl ca` replaces index.txt by two renames)."""
    from mtlsctl.files import read_lock

    return read_lock(settings.pki.root)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _info(message: str) -> None:
    print(message, file=sys.stderr)


def _read_password(password_stdin: bool, password_file: Path | None) -> str | None:
    """The export password from stdin or a file; None means "generate one"."""
    from mtlsctl import validate

    if password_stdin and password_file is not None:
        raise InputError("--password-stdin and --password-file are mutually exclusive", hint="give one of them")
    if password_stdin:
        if sys.stdin is None or sys.stdin.isatty():
            raise InputError("--password-stdin needs the password piped on standard input", hint="e.g. printf '%s\\n' \"$PASS\" | mtlsctl ...")
        return validate.password(validate.strip_one_newline(sys.stdin.read()), source="stdin")
    if password_file is not None:
        try:
            text = password_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read --password-file {password_file}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
        return validate.password(validate.strip_one_newline(text), source=str(password_file))
    return None


def _print_dry_run(pki_dir: Path, commands: list[Any], notes: list[str] = ()) -> None:  # type: ignore[assignment]
    """The plan a command would execute: the openssl commands as you would type them in the PKI directory,
    with notes (file moves, what is checked). With the command's --json, one JSON object on stdout:
    {"dry_run": true, "pki_dir", "commands": [{"argv", "command", "label"}], "notes"}."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.params.get("as_json"):
        _print_json({"dry_run": True, "pki_dir": str(pki_dir), "notes": list(notes),
                     "commands": [{"argv": list(cmd.argv), "command": cmd.display(), "label": cmd.label} for cmd in commands]})
        return
    _info(f"# dry run: nothing is changed. Commands run in {pki_dir}:")
    for note in notes:
        _info(f"# {note}")
    for cmd in commands:
        print(cmd.display())


def _version(value: bool) -> None:
    if value:
        print(f"mtlsctl {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    ctx: typer.Context,
    pki_dir: Path | None = typer.Option(
        None, "--pki-dir", envvar="PKI_DIR", metavar="DIR",
        help="The PKI directory. Order: --pki-dir, $PKI_DIR, the profile's pki_dir, /etc/nginx/pki.",
    ),
    profile: Path | None = typer.Option(
        None, "--profile", envvar="MTLSCTL_PROFILE", metavar="FILE",
        help="YAML site profile. Order: --profile, $MTLSCTL_PROFILE, <pki-dir>/mtls.yaml, built-in defaults (the guide's).",
    ),
    debug: bool = typer.Option(False, "--debug", help="Show a traceback for internal errors."),
    ca_passphrase_file: Path | None = typer.Option(
        None, "--ca-passphrase-file", metavar="FILE", help="Passphrase of an encrypted CA key (ca.key.encrypt), first line of FILE."),
    ca_passphrase_fd: int | None = typer.Option(
        None, "--ca-passphrase-fd", metavar="N", help="Passphrase of an encrypted CA key, read from descriptor N (e.g. 3<file)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    global _debug, _OPTIONS
    _debug = debug
    ctx.obj = _OPTIONS = GlobalOptions(pki_dir, profile, debug, ca_passphrase_file, ca_passphrase_fd)


P12_HELP = "PKCS#12 profile: compat (works everywhere, default), modern (OpenSSL 3 default), legacy (RC2, old importers only)."


@app.command()
def init(
    ctx: typer.Context,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the openssl commands and change nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Create the CA: the guide's directory and database, openssl.cnf, CA key and certificate, first CRL.

    \b
    Refuses if a CA already exists in the PKI directory (nothing is touched).
    The resolved profile is saved as <pki-dir>/mtls.yaml.

    \b
    Examples:
      mtlsctl init                                  # /etc/nginx/pki, the guide's values
      mtlsctl --pki-dir ./pki --profile site.yaml init --dry-run
    """
    from mtlsctl import ca

    settings = _settings(ctx)
    if dry_run:
        ca.refuse_existing_ca(settings.pki)
        _print_dry_run(
            settings.pki.root, ca.init_commands(settings),
            [f"would create {settings.pki.root}/{{ca,certs,crl,private,newcerts}}, index.txt, index.txt.attr, "
             "serial, crlnumber, openssl.cnf, mtls.yaml", f"profile: {settings.profile_source}"],
        )
        return
    passphrase = None
    if settings.profile.ca.key_spec.encrypt:
        from mtlsctl import validate

        passphrase = _OPTIONS.ca_passphrase(confirm=True) if _OPTIONS else None
        if passphrase is not None and len(passphrase) < 8:
            raise InputError("the CA key passphrase is shorter than 8 characters", hint="use a long passphrase; it guards every certificate")
        validate.password(passphrase or "", source="the CA passphrase option")
    runner = _runner()
    if passphrase is not None:
        from mtlsctl.runner import Runner

        root = settings.pki.root
        runner = Runner(TerminalReporter(), ca_passphrase=lambda cwd: passphrase if cwd == root else None)
    result = ca.init_pki(settings, runner, ca_passphrase=passphrase)
    if settings.profile.ocsp is not None:
        from mtlsctl import ocsp

        ocsp.setup(settings, runner)
    if as_json:
        _print_json({
            "pki_dir": str(result.pki_dir), "ca_cert": str(result.ca_cert), "ca_key": str(result.ca_key),
            "crl": str(result.crl), "profile": str(result.profile), "key": result.key, "days": result.days,
            "subject": result.subject,
        })
        return
    print(f"CA created in {result.pki_dir}")
    print(f"  subject  {result.subject}")
    print(f"  key      {result.ca_key} ({result.key}, mode 400)")
    print(f"  cert     {result.ca_cert} ({result.days} days)")
    print(f"  CRL      {result.crl}")
    print(f"  profile  {result.profile}")
    print("Next: mtlsctl add-client NAME")


@app.command("add-client")
def add_client(
    ctx: typer.Context,
    name: str | None = typer.Argument(None, help="Client name: becomes CN=NAME and the file names (letters, digits, . _ -)."),
    from_file: Path | None = typer.Option(None, "--from-file", metavar="NAMES.txt",
                                          help="Issue every name in the file (one per line): keys in parallel, passwords to 0600 files."),
    jobs: int | None = typer.Option(None, "--jobs", metavar="N", help="With --from-file: parallel key generations (default: the number of cores)."),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the export password from standard input."),
    password_file: Path | None = typer.Option(None, "--password-file", metavar="FILE", help="Read the export password from FILE."),
    days: int | None = typer.Option(None, "--days", metavar="N", help="Validity in days (default: profile clients.days, 365)."),
    san: list[str] = typer.Option([], "--san", metavar="TYPE:VALUE", help="Subject alternative name (DNS, IP, email, URI); repeatable."),
    key_type: str | None = typer.Option(None, "--key-type", metavar="rsa|ec", help="Key type (default: profile clients.key)."),
    p12: str | None = typer.Option(None, "--p12", metavar="PROFILE", help=P12_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (with the password when generated)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the openssl commands and change nothing."),
) -> None:
    """Issue a client certificate and its PKCS#12 bundle (the guide's mtls-add-client.sh, safely).

    \b
    Writes private/NAME.key (600), certs/NAME.csr, certs/NAME.crt and certs/NAME.p12 (600).
    Refuses a name that has an active certificate (a lost device: `mtlsctl replace NAME`). A name whose
    certificates are all revoked or expired is issued again: its old files move to
    archive/NAME/SERIAL/ (700) first, and index.txt keeps the history.
    Without a password option a 24-character password is generated and printed once.

    \b
    Examples:
      mtlsctl add-client iphone-jmrp
      printf '%s\\n' "$PASS" | mtlsctl add-client laptop --password-stdin --san email:me@example.com
      mtlsctl add-client sensor-7 --key-type ec --days 90 --json
      mtlsctl add-client --from-file new-devices.txt --json    # one JSON object per line
    """
    from mtlsctl import client

    if (name is None) == (from_file is None):
        raise InputError("give a NAME or --from-file NAMES.txt (not both)", hint="see `mtlsctl add-client --help`")
    settings = _settings(ctx)
    if from_file is not None:
        if password_stdin or password_file or san or dry_run:
            raise InputError("--from-file issues each client with its own generated password and no SANs",
                             hint="leave out --password-*, --san and --dry-run, or issue clients one by one")
        try:
            names = client.read_names(from_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read --from-file {from_file}: {exc}") from None
        if jobs is not None and not 1 <= jobs <= 64:
            raise InputError(f"--jobs {jobs} is out of range", hint="use 1..64")
        batch = client.issue_batch(settings, names, _runner(settings, signs=True), days=days, key_type=key_type, p12=p12,
                                   workers=jobs)
        for r in batch.issued:
            if as_json:
                print(json.dumps({"name": r.name, "serial": r.serial, "not_after": r.not_after.isoformat(), "p12": str(r.p12),
                                  "password_file": str(batch.password_files[r.name])}))
            else:
                print(f"Issued {r.name}: serial {r.serial}; bundle {r.p12}; password in {batch.password_files[r.name]}")
        for failed_name, why in batch.failed:
            print(f"FAILED {failed_name}: {why}", file=sys.stderr)
        if batch.failed:
            raise RenewFailed(f"{len(batch.failed)} of {len(names)} client(s) failed", hint="see the FAILED lines above")
        return
    assert name is not None
    password = None if dry_run else _read_password(password_stdin, password_file)
    req = client.build_request(settings, name, days=days, key_type=key_type, p12=p12, sans=san, password=password)
    if dry_run:
        _print_dry_run(settings.pki.root, client.plan_issue(settings, req), client.retire_notes(settings.pki, name))
        return
    result = client.issue_client(settings, req, _runner(settings, signs=True))
    if as_json:
        data = {
            "name": result.name, "serial": result.serial, "not_after": result.not_after.isoformat(),
            "p12_profile": result.p12_profile, "sans": list(result.sans),
            "files": {"key": str(result.key), "csr": str(result.csr), "crt": str(result.crt), "p12": str(result.p12)},
            "archived": str(settings.pki.path(result.archived)) if result.archived else None,
        }
        if result.password is not None:
            data["password"] = result.password
        _print_json(data)
        return
    print(f"Issued {result.name}: serial {result.serial}, valid until {result.not_after:%Y-%m-%d %H:%M} UTC")
    print(f"  key     {result.key}")
    print(f"  cert    {result.crt}")
    print(f"  bundle  {result.p12} ({result.p12_profile} PKCS#12)")
    _print_archived(settings, result)
    if result.password is not None:
        print(f"Export password: {result.password}")
    print("Transfer the .p12 file securely to the client device.")


def _print_archived(settings: Any, result: Any) -> None:
    if result.archived:
        print(f"  old files (serial {result.archived_serial}) moved to {settings.pki.path(result.archived)}/")


@app.command()
def export(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="An issued client's name."),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the export password from standard input."),
    password_file: Path | None = typer.Option(None, "--password-file", metavar="FILE", help="Read the export password from FILE."),
    p12: str | None = typer.Option(None, "--p12", metavar="PROFILE", help=P12_HELP),
    out: Path | None = typer.Option(None, "--out", metavar="FILE", help="Write the bundle here instead of certs/NAME.p12."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (with the password when generated)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the openssl commands and change nothing."),
) -> None:
    """Write a fresh PKCS#12 bundle for an issued client (new password, same key and certificate).

    \b
    Refuses a certificate that is revoked or expired (certs/NAME.crt's own row in index.txt decides):
    issue a new one with add-client, or `mtlsctl replace NAME` while it is still valid.
    A bundle written to certs/NAME.p12 keeps private/NAME.p12.password true: rewritten (0600) with a
    generated password, removed when you give the password; --out leaves both alone.

    \b
    Examples:
      mtlsctl export iphone-jmrp --force                 # replace certs/iphone-jmrp.p12
      mtlsctl export iphone-jmrp --p12 modern --out /tmp/iphone.p12 --password-file pw.txt
    """
    from mtlsctl import client, validate

    settings = _settings(ctx)
    validate.client_name(name)
    if dry_run:
        settings.pki.require_ca()
        with _reading(settings):
            client.check_exportable(settings.pki, name)  # a revoked or expired certificate gets no bundle, dry run or not
        target = out.absolute() if out else settings.pki.path(f"certs/{name}.p12")
        rel = f"{client.P12_WORKDIR}/{name}.p12"
        _print_dry_run(settings.pki.root, client.export_commands(name, rel, p12 or settings.profile.clients.p12,
                                                                 settings.pki.ca_bundle),
                       [f"then written to {target} (a new file with an unpredictable name, renamed into place)"])
        return
    password = _read_password(password_stdin, password_file)
    result = client.export_client(settings, name, p12=p12, password=password, out=out, force=force, runner=_runner())
    if as_json:
        data = {"name": result.name, "serial": result.serial, "p12": str(result.p12), "p12_profile": result.p12_profile,
                "password_file": str(result.password_file) if result.password_file else None,
                "removed_password_file": str(result.removed_password_file) if result.removed_password_file else None}
        if result.password is not None:
            data["password"] = result.password
        _print_json(data)
        return
    print(f"Exported {result.name} (serial {result.serial}) to {result.p12} ({result.p12_profile} PKCS#12)")
    if result.password is not None:
        print(f"Export password: {result.password}")
    if result.password_file:
        print(f"  the new password is also in {result.password_file} (0600; it replaces the old one)")
    if result.removed_password_file:
        print(f"  removed {result.removed_password_file}: it held the previous bundle's password")


def _crl_json(info: Any) -> Any:
    if info is None:
        return None
    return {"this_update": info.this_update.isoformat(), "next_update": info.next_update.isoformat(),
            "crl_number": info.crl_number, "revoked": info.revoked}


def _crl_line(info: Any) -> str:
    from datetime import datetime, timezone

    from mtlsctl.lifecycle import days_left

    left = days_left(info.next_update, datetime.now(timezone.utc))
    return f"next update {info.next_update:%Y-%m-%d %H:%M} UTC ({left} days), CRL number {info.crl_number}, {info.revoked} revoked"


def _reload(settings: Any, changed: bool, no_reload: bool) -> tuple[bool, str | None]:
    """After a CRL change: the publish command (when set), then nginx test and reload.
    Returns (reloaded, error message)."""
    from mtlsctl.nginx import test_and_reload
    from mtlsctl.publish import publish

    global _LAST_PUBLISH
    _LAST_PUBLISH = None
    if changed and settings.profile.publish is not None:
        _LAST_PUBLISH = publish(settings)
        if _LAST_PUBLISH.ok:
            _info(f"published: `{settings.profile.publish.command}` exited 0")
    if not changed or no_reload:
        return False, None
    try:
        outcome = test_and_reload(settings.profile.nginx)
    except MtlsError as exc:
        return False, exc.message
    if not outcome.reloaded:
        _info(outcome.detail)
    return outcome.reloaded, None


_LAST_PUBLISH: Any = None


def _publish_json() -> Any:
    return _LAST_PUBLISH.to_json() if _LAST_PUBLISH is not None else {"ran": False, "exit": None, "detail": ""}


def _finish_reload(reloaded: bool, error: str | None, as_json: bool) -> None:
    if _LAST_PUBLISH is not None and not _LAST_PUBLISH.ok:
        raise ReloadFailed(f"the publish command failed (exit {_LAST_PUBLISH.returncode}): {_LAST_PUBLISH.detail}"
                           + (f"; also: {error}" if error else ""),
                           hint="the CRL changed here but did not reach the nginx hosts; fix it and run `mtlsctl crl`")
    if error:
        ctx = click.get_current_context(silent=True)
        done = _DONE_BEFORE_RELOAD.get(ctx.info_name if ctx is not None else "", "what this run changed is done and kept")
        if any(sign in error for sign in _NO_SYSTEMD):
            hint = ("this host does not run systemd: pass --no-reload and reload nginx yourself (e.g. `nginx -s reload`), "
                    "or set nginx.reload_command in the profile (e.g. \"nginx -s reload\", or \"\" to never reload)")
        else:
            hint = "fix nginx, then run `mtlsctl nginx reload` (or pass --no-reload when nginx runs elsewhere)"
        raise ReloadFailed(f"{done}; only the nginx reload failed: {error}; nginx still uses the old CRL until it reloads",
                           hint=hint)
    if reloaded and not as_json:
        print("nginx reloaded (it reads the CRL only at reload)")


class ReloadFailed(MtlsError):
    pass


# What a command has completed (and keeps) by the time it reloads nginx: a failed reload does not undo it.
_DONE_BEFORE_RELOAD = {
    "revoke": "the revocation is done and kept (index.txt and the new CRL list it)",
    "replace": "the replacement is done and kept (new certificate issued, old one revoked, CRL regenerated)",
    "crl": "the new CRL is written and kept",
    "renew": "the renewals and the CRL are done and kept",
}
# How a reload command fails on a host (or container) without systemd.
_NO_SYSTEMD = ("booted with systemd", "Failed to connect to bus", "systemctl: not found", "systemctl: command not found",
               "No such file or directory: 'systemctl'")


NO_RELOAD_HELP = "Do not run the profile's nginx test and reload commands."


@app.command()
def revoke(
    ctx: typer.Context,
    name: str | None = typer.Argument(None, help="Client name: revokes its valid certificate(s)."),
    serial: str | None = typer.Option(None, "--serial", metavar="HEX", help="Revoke this serial instead of a name."),
    reason: str = typer.Option("unspecified", "--reason", metavar="REASON",
                               help="unspecified, keyCompromise, CACompromise, affiliationChanged, superseded, "
                                    "cessationOfOperation or certificateHold."),
    no_reload: bool = typer.Option(False, "--no-reload", help=NO_RELOAD_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the openssl commands and change nothing."),
) -> None:
    """Revoke a client's certificate, regenerate the CRL, then test and reload nginx.

    \b
    Idempotent: an already-revoked certificate is reported and exits 0.
    nginx reads the CRL only at reload, so the reload is part of revoking.

    \b
    Examples:
      mtlsctl revoke lost-device --reason keyCompromise
      mtlsctl revoke --serial 1003 --no-reload --json
    """
    from mtlsctl import crl as crl_mod
    from mtlsctl import lifecycle

    if (name is None) == (serial is None):
        raise InputError("give a NAME or --serial HEX (not both)", hint="see `mtlsctl list` for names and serials")
    why = lifecycle.reason(reason)
    serial_hex = lifecycle.serial(serial) if serial is not None else None
    if name is not None:
        from mtlsctl import validate

        validate.client_name(name)
    settings = _settings(ctx)
    if dry_run:
        from datetime import datetime, timezone

        settings.pki.require_ca()
        now = datetime.now(timezone.utc)
        rows = [r for r in lifecycle.select_for_revoke(settings.pki, name, serial_hex) if r.is_active(now)]
        cmds = [lifecycle.revoke_command(lifecycle.cert_file(settings.pki, r), why) for r in rows]
        if cmds:
            cmds.append(crl_mod.gencrl_command(settings.profile.crl.days, now))
        _print_dry_run(settings.pki.root, cmds, [] if cmds else ["nothing to revoke: no valid certificate"])
        return
    result = lifecycle.revoke(settings, name=name, serial_hex=serial_hex, why=why, runner=_runner(settings, signs=True))
    reloaded, error = _reload(settings, bool(result.revoked), no_reload)
    if result.revoked and name is not None:
        from mtlsctl import ocsp

        if ocsp.prime(settings, name, _runner()):
            _info("OCSP responder primed: its next answer for this certificate says revoked")
    if as_json:
        _print_json({"revoked": result.revoked, "already_revoked": result.already, "expired": result.expired,
                     "reason": why, "crl": _crl_json(result.crl), "reloaded": reloaded,
                     "published": _publish_json()})
    else:
        who = name or f"serial {serial_hex}"
        if result.revoked:
            print(f"Revoked {who}: serial {', '.join(result.revoked)} ({why})")
            print(f"CRL regenerated: {_crl_line(result.crl)}")
        if result.already:
            print(f"Already revoked: serial {', '.join(result.already)}")
        if result.expired and not result.revoked:
            print(f"Expired, nothing to revoke: serial {', '.join(result.expired)}")
    _finish_reload(reloaded, error, as_json)


@app.command()
def replace(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The name whose device is lost, stolen or broken (client or server)."),
    reason: str = typer.Option("keyCompromise", "--reason", metavar="REASON",
                               help="Why the old certificate is revoked (default keyCompromise: a lost device's key is "
                                    "presumed in other hands); any reason revoke takes, case-insensitive."),
    days: int | None = typer.Option(None, "--days", metavar="N",
                                    help="Validity of the new certificate (default: profile clients.days, 365)."),
    key_type: str | None = typer.Option(None, "--key-type", metavar="rsa|ec", help="Key type (default: the old certificate's)."),
    p12: str | None = typer.Option(None, "--p12", metavar="PROFILE", help=P12_HELP),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the new bundle's password from standard input."),
    password_file: Path | None = typer.Option(None, "--password-file", metavar="FILE", help="Read the new bundle's password from FILE."),
    no_reload: bool = typer.Option(False, "--no-reload", help=NO_RELOAD_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (with the password when generated)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the moves and openssl commands and change nothing."),
) -> None:
    """Replace a lost device in one step: a new certificate for NAME, then the old one revoked.

    \b
    Under one lock, in this order:
      1. the old files move to archive/NAME/SERIAL/ (mode 700); a new key, CSR, certificate
         and bundle take the guide's paths (same name, kind and SANs: the allowlist entry stays);
      2. only once the new certificate is in index.txt, every earlier one of NAME is revoked;
      3. the CRL is regenerated, then nginx is tested and reloaded (as `revoke` does).

    A failure before step 2 puts everything back: the old certificate stays valid, its files where
    they were. A failure after it exits 1 and says what is done and the command that finishes the rest.

    \b
    Examples:
      mtlsctl replace iphone-jmrp              # new bundle + password, then the old one revoked
      mtlsctl replace iphone-jmrp --dry-run
      printf '%s\\n' "$PASS" | mtlsctl replace laptop --password-stdin --reason superseded --json
    """
    from mtlsctl import lifecycle, validate

    why = lifecycle.reason(reason)
    validate.client_name(name)
    settings = _settings(ctx)
    password = None if dry_run else _read_password(password_stdin, password_file)
    req = lifecycle.replace_request(settings, name, days=days, key_type=key_type, p12=p12, password=password)
    if dry_run:
        notes, commands = lifecycle.plan_replace(settings, req, why)
        if not no_reload:
            notes.append("then the profile's nginx test and reload commands (nginx reads the CRL only at reload)")
        _print_dry_run(settings.pki.root, commands, notes)
        return
    result = lifecycle.replace(settings, req, why, _runner(settings, signs=True))
    issued = result.issued
    reloaded, error = _reload(settings, bool(result.revoked) or result.kind == "server", no_reload)
    if result.revoked:
        from mtlsctl import ocsp

        if ocsp.prime(settings, name, _runner()):
            _info("OCSP responder primed: its next answer for the old certificate says revoked")
    if as_json:
        data: dict[str, Any] = {
            "name": issued.name, "kind": result.kind, "serial": issued.serial, "not_after": issued.not_after.isoformat(),
            "p12_profile": issued.p12_profile, "sans": list(issued.sans),
            "files": {"key": str(issued.key), "csr": str(issued.csr), "crt": str(issued.crt),
                      "p12": str(issued.p12) if issued.p12 else None},
            "archived": str(settings.pki.path(issued.archived)) if issued.archived else None,
            "old_serials": result.old, "revoked": result.revoked, "reason": why, "crl": _crl_json(result.crl),
            "reloaded": reloaded, "published": _publish_json(), "problems": result.problems, "todo": result.todo,
        }
        if issued.password is not None:
            data["password"] = issued.password
        _print_json(data)
    else:
        print(f"Issued {issued.name}: serial {issued.serial}, valid until {issued.not_after:%Y-%m-%d %H:%M} UTC")
        print(f"  key     {issued.key}")
        print(f"  cert    {issued.crt}")
        if issued.p12:
            print(f"  bundle  {issued.p12} ({issued.p12_profile} PKCS#12)")
        _print_archived(settings, issued)
        if result.revoked:
            print(f"Revoked the old certificate: serial {', '.join(result.revoked)} ({why})")
        elif not result.old:
            print(f"Nothing to revoke: {name} had no active certificate")
        if result.crl is not None:
            print(f"CRL regenerated: {_crl_line(result.crl)}")
        if issued.password is not None:
            print(f"Export password: {issued.password}")
    if result.problems:
        done = f"the new certificate for {name} is issued (serial {issued.serial})"
        if result.revoked:
            done += f" and serial {', '.join(result.revoked)} revoked"
        extra = f"; also: {error}" if error else ""
        raise ReplaceIncomplete(f"{done}, but: " + "; ".join(result.problems) + extra,
                                hint="finish with: " + " && ".join(result.todo))
    _finish_reload(reloaded, error, as_json)


class ReplaceIncomplete(MtlsError):
    """The new certificate exists, but a later step of `replace` (bundle, revocation, CRL) failed."""


@app.command()
def crl(
    ctx: typer.Context,
    if_due: bool = typer.Option(False, "--if-due", help="Only when nextUpdate is within crl.refresh_within_days (for timers)."),
    root: bool = typer.Option(False, "--root", help="Regenerate the root's CRL instead (two-tier PKI; needs the root key)."),
    root_key: Path | None = typer.Option(None, "--root-key", metavar="FILE", help="The root key, once exported offline."),
    no_reload: bool = typer.Option(False, "--no-reload", help=NO_RELOAD_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print this_update, next_update, crl_number, revoked count."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the openssl commands and change nothing."),
) -> None:
    """Regenerate crl/ca.crl (atomically, lastUpdate backdated 5 minutes), then test and reload nginx.

    \b
    When the CRL's nextUpdate passes, nginx rejects EVERY client. Run `mtlsctl crl --if-due` daily
    (see docs/operations.md for cron and a systemd timer).

    \b
    Examples:
      mtlsctl crl
      mtlsctl crl --if-due --json
    """
    from datetime import datetime, timezone

    from mtlsctl import crl as crl_mod

    settings = _settings(ctx)
    if dry_run:
        now = datetime.now(timezone.utc)
        if root or root_key is not None:
            commands, notes = crl_mod.plan_root_crl(settings.pki, settings.profile,
                                                    str(root_key.absolute()) if root_key else None, now)
        else:
            commands, notes = crl_mod.plan_crl(settings.pki, settings.profile, if_due=if_due, now=now)
        _print_dry_run(settings.pki.root, commands, notes)
        return
    if root or root_key is not None:
        info = crl_mod.refresh_root_crl(settings.pki, settings.profile, _runner(settings, signs=True),
                                        str(root_key.absolute()) if root_key else None)
        reloaded, error = _reload(settings, True, no_reload)
        if as_json:
            _print_json({"regenerated": True, "root": True, **_crl_json(info), "reloaded": reloaded, "published": _publish_json()})
        else:
            print(f"Root CRL regenerated: {_crl_line(info)}; crl/chain.crl rebuilt")
        _finish_reload(reloaded, error, as_json)
        return
    result = crl_mod.refresh_crl(settings.pki, settings.profile, _runner(settings, signs=True), if_due=if_due)
    reloaded, error = _reload(settings, result.regenerated, no_reload)
    if as_json:
        _print_json({"regenerated": result.regenerated, **_crl_json(result.info), "reloaded": reloaded,
                     "published": _publish_json()})
    elif result.regenerated:
        print(f"CRL regenerated: {_crl_line(result.info)}")
    else:
        print(f"CRL not due: {_crl_line(result.info)}")
    _finish_reload(reloaded, error, as_json)


@app.command("list")
def list_(
    ctx: typer.Context,
    status: str | None = typer.Option(None, "--status", metavar="STATUS", help="Only valid, expiring (within renew.within_days), expired or revoked."),
    expiring_within: int | None = typer.Option(None, "--expiring-within", metavar="DAYS", help="Only valid certificates expiring within DAYS."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array (name, serial, status, not_after, days_left, revoked_at, "
                                                      "reason, subject as nginx shows it (RFC 2253: CN=x,O=y), files)."),
) -> None:
    """List every certificate in index.txt (read directly: no openssl run per certificate).

    \b
    Examples:
      mtlsctl list
      mtlsctl list --expiring-within 30
      mtlsctl list --status revoked --json | jq -r '.[].name'
    """
    from mtlsctl import crl as crl_mod
    from mtlsctl import lifecycle

    if expiring_within is not None:
        from mtlsctl import validate

        validate.days(expiring_within, what="--expiring-within", maximum=36500)
    settings = _settings(ctx)
    with _reading(settings):
        entries = lifecycle.list_certs(settings, status=status, expiring_within=expiring_within)
    if as_json:
        _print_json([e.to_json() for e in entries])
        return
    if not entries:
        print("no certificates" + (" match" if status or expiring_within else " yet: mtlsctl add-client NAME"))
    else:
        width = max(4, *(len(e.name) for e in entries))
        print(f"{'NAME':<{width}}  {'SERIAL':<6}  {'STATUS':<7}  {'NOT AFTER (UTC)':<16}  {'DAYS':>5}  DETAIL")
        for e in entries:
            if e.status == "revoked":
                detail = f"revoked {e.revoked_at:%Y-%m-%d} ({e.reason})"
            else:
                detail = " ".join(Path(f).suffix.lstrip(".") for f in e.files) or "-"
            print(f"{e.name:<{width}}  {e.serial:<6}  {e.status:<7}  {e.not_after:%Y-%m-%d %H:%M}  {e.days_left:>5}  {detail}")
    runner = _runner()
    ca_end = lifecycle.ca_not_after(settings.pki, runner)
    from datetime import datetime, timezone

    info = crl_mod.read_crl_info(settings.pki, runner)
    print(f"CA: expires {ca_end:%Y-%m-%d} ({lifecycle.days_left(ca_end, datetime.now(timezone.utc))} days)")
    print("CRL: " + (_crl_line(info) if info else "MISSING: run `mtlsctl crl`"))


@app.command()
def renew(
    ctx: typer.Context,
    within: int | None = typer.Option(None, "--within", metavar="DAYS", help="Renew what expires within DAYS (default: renew.within_days, 30)."),
    days: int | None = typer.Option(None, "--days", metavar="N", help="Validity of the new certificates (default: renew.days, 365)."),
    show_passwords: bool = typer.Option(False, "--show-passwords", help="Print the new PKCS#12 passwords (default: only the 0600 files that hold them)."),
    no_reload: bool = typer.Option(False, "--no-reload", help=NO_RELOAD_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print renewed, failed, crl and reloaded as JSON."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be renewed and change nothing."),
) -> None:
    """Renew expiring client certificates (the guide's mtls-renew.sh, safely) and keep the CRL fresh.

    \b
    For each valid certificate expiring within the window: archive certs/NAME.crt as
    certs/NAME.crt.old.YYYY-MM-DD, re-sign certs/NAME.csr, and only once the new certificate is in
    the database revoke the old one (superseded); then a new .p12 with a new password, written to
    private/NAME.p12.password (0600). The CRL is regenerated once, and also whenever it is due.
    If anything changed: nginx test, then reload. One failure does not stop the others (exit 1).

    \b
    Examples:
      mtlsctl renew --dry-run
      mtlsctl renew --json
      mtlsctl renew --within 60 --days 180
    """
    from mtlsctl import lifecycle

    settings = _settings(ctx)
    report = lifecycle.renew(settings, within_days=within, days=days, runner=_runner(settings, signs=not dry_run), dry_run=dry_run)
    if dry_run:
        from datetime import datetime, timezone

        now = datetime.now(timezone.utc)
        plan = lifecycle.renew_plan(settings, report, days or settings.profile.renew.days, now)
        _print_dry_run(settings.pki.root, [cmd for _, commands in plan for cmd in commands],
                       [f"{len(report.due)} certificate(s) due"] + [what for what, _ in plan])
        return
    changed = bool(report.renewed) or bool(report.superseded) or report.crl_regenerated
    reloaded, error = _reload(settings, changed, no_reload)
    if as_json:
        renewed = []
        for r in report.renewed:
            item: dict[str, Any] = {"name": r.name, "old_serial": r.old_serial, "new_serial": r.new_serial,
                                    "not_after": r.not_after.isoformat(), "archived": r.archived,
                                    "p12": str(settings.pki.path(r.p12)) if r.p12 else None,
                                    "password_file": str(settings.pki.path(r.password_file)) if r.password_file else None}
            if show_passwords and r.password:
                item["password"] = r.password
            renewed.append(item)
        _print_json({"renewed": renewed, "superseded_revoked": report.superseded,
                     "failed": [{"name": f.name, "serial": f.serial, "error": f.error} for f in report.failed],
                     "crl": {"regenerated": report.crl_regenerated, **(_crl_json(report.crl) or {})},
                     "reloaded": reloaded, "published": _publish_json()})
    else:
        if not report.due:
            print(f"Nothing to renew: no valid certificate expires within {within or settings.profile.renew.within_days} days.")
        for r in report.renewed:
            print(f"Renewed {r.name}: serial {r.old_serial} -> {r.new_serial}, valid until {r.not_after:%Y-%m-%d %H:%M} UTC; "
                  f"old certificate archived as {r.archived}")
            if r.p12:
                print(f"  new bundle {settings.pki.path(r.p12)}; password in {settings.pki.path(r.password_file)}")
                if show_passwords:
                    print(f"  New Export Password: {r.password}")
            if r.warning:
                print(f"  warning: {r.warning}")
        if report.superseded:
            print(f"Revoked superseded certificate(s) left valid by an earlier renewal: serial {', '.join(report.superseded)}")
        for f in report.failed:
            print(f"FAILED {f.name} (serial {f.serial}): {f.error}", file=sys.stderr)
        if report.crl is not None:
            print(("CRL regenerated: " if report.crl_regenerated else "CRL current: ") + _crl_line(report.crl))
    _finish_reload(reloaded, error, as_json)
    if report.failed:
        raise RenewFailed(f"{len(report.failed)} certificate(s) failed to renew", hint="see the FAILED lines above")


class RenewFailed(MtlsError):
    pass


@app.command()
def verify(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Client name (checks certs/NAME.crt)."),
    server: bool = typer.Option(False, "--server", help="Check NAME as a server certificate (add-server) instead."),
    as_json: bool = typer.Option(False, "--json", help="Print name, ok, verdict, message, openssl_output."),
) -> None:
    """Check a client certificate against the CA and the CRL, the way nginx will (exit 1 if it fails).

    The certificate must be a client certificate (extended key usage clientAuth, read from the
    certificate itself): nginx refuses a server certificate as a client ("unsuitable certificate
    purpose"), and so does this. Then it runs the guide's debugging command with the CRL and purpose:

    \b
      openssl verify -purpose sslclient -crl_check \\
          -CAfile ca/ca.crt -CRLfile crl/ca.crl certs/NAME.crt

    \b
    Examples:
      mtlsctl verify iphone-jmrp
      mtlsctl verify --server secure.example.com
    """
    from mtlsctl import lifecycle

    settings = _settings(ctx)
    with _reading(settings):
        result = lifecycle.verify(settings, name, _runner(), purpose="server" if server else "client")
    if as_json:
        _print_json({"name": result.name, "ok": result.ok, "verdict": result.verdict, "message": result.message,
                     "openssl_output": result.openssl_output})
    else:
        print(f"{result.name}: {result.message}")
    if not result.ok:
        raise typer.Exit(1)


@app.command("sign-csr")
def sign_csr(
    ctx: typer.Context,
    csr_file: Path = typer.Argument(..., metavar="FILE", help="The CSR, made on the device (PEM or DER)."),
    name: str = typer.Option(..., "--name", metavar="NAME", help="Client name; the CSR's subject must be exactly CN=NAME."),
    days: int | None = typer.Option(None, "--days", metavar="N", help="Validity in days (default: profile clients.days, 365)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the CSR, print the openssl command and its configuration, change nothing."),
) -> None:
    """Sign a CSR generated elsewhere, so the private key never leaves the device.

    The CSR is read once, parsed (never from openssl's text) and its self-signature verified. It is
    refused, with every reason named, if it asks for CA:TRUE, keyCertSign/cRLSign, nameConstraints,
    certificate policies, AIA or CRL distribution points, an extended key usage other than clientAuth,
    an unknown critical extension, an RSA key under 2048 bits or a curve other than P-256/P-384, SANs
    other than DNS/IP/email/URI (or wildcards), or a subject other than exactly CN=NAME.
    Nothing is copied from the request but its checked SANs: the CA's client section sets the rest
    (copy_extensions = none for this signing); other harmless extensions are listed as not copied.
    The issued certificate is checked again (CA:FALSE, clientAuth, key usage, the request's key).
    The reviewed CSR is kept as certs/NAME.csr for renew.

    \b
    Example (on the device, then on the CA host):
      openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 \\
          -nodes -keyout dev.key -subj /CN=sensor-9 -out sensor-9.csr
      mtlsctl sign-csr sensor-9.csr --name sensor-9 --dry-run
      mtlsctl sign-csr sensor-9.csr --name sensor-9
    """
    from mtlsctl import csr

    settings = _settings(ctx)
    if dry_run:
        review, commands, config = csr.plan_sign_csr(settings, csr_file, name, days)
        notes = [f"{csr_file}: CN={name}, {review.key.describe()}, SANs: {', '.join(review.sans) or 'none'}"]
        if review.not_copied:
            notes.append(f"not copied from the request: {', '.join(review.not_copied)}")
        notes.append("private/.sign-XXXXXX/request.csr = the reviewed request; sign.cnf =")
        notes += [f"  {line}" for line in config.splitlines()]
        _print_dry_run(settings.pki.root, commands, notes)
        return
    result = csr.sign_csr(settings, csr_file, name, days, _runner(settings, signs=True))
    if as_json:
        _print_json({"name": result.name, "serial": result.serial, "not_after": result.not_after.isoformat(),
                     "sans": result.sans, "not_copied": result.not_copied,
                     "files": {"csr": str(result.csr), "crt": str(result.crt)}})
        return
    print(f"Signed {result.name}: serial {result.serial}, valid until {result.not_after:%Y-%m-%d %H:%M} UTC")
    if result.sans:
        print(f"  SANs  {', '.join(result.sans)}")
    if result.not_copied:
        print(f"  not copied from the request: {', '.join(result.not_copied)}")
    print(f"  cert  {result.crt}  (send it to the device; its key never left it)")


@app.command()
def doctor(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print healthy and the findings (check, level, message, fix)."),
) -> None:
    """Check the PKI and explain each problem with how to fix it (exit 0 healthy, 1 problems).

    \b
    Checks: file and directory modes and owners (no private file readable by group or others), CA
    expiry (warns under a year), the CRL (expired, inside the refresh window, lastUpdate in the future,
    number sane, lists every revoked serial), index.txt against newcerts/ and certs/, openssl.cnf's dir
    and unique_subject, the openssl version, an interrupted run's journal, and with nginx.site_file set,
    that the rendered site is current and its files exist.

    \b
    Example:
      mtlsctl doctor || mail -s "PKI needs attention" root < /dev/null
    """
    from mtlsctl.doctor import run_doctor

    settings = _settings(ctx)
    with _reading(settings):
        findings = run_doctor(settings, _runner())
    healthy = all(f.level == "ok" for f in findings)
    if as_json:
        _print_json({"healthy": healthy, "findings": [f.to_json() for f in findings]})
    else:
        for f in findings:
            print(f"{f.level.upper():<5} {f.check:<8} {f.message}")
            if f.fix and f.level != "ok":
                print(f"{'':<14} fix: {f.fix}")
        print("healthy" if healthy else f"{sum(f.level != 'ok' for f in findings)} problem(s)")
    if not healthy:
        raise typer.Exit(1)


@app.command()
def recover(
    ctx: typer.Context,
    discard: bool = typer.Option(False, "--discard", help="Drop the journal without rolling anything back (after a look at it)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only show what the journal would roll back; change nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print state, reason, pid, remove, restore, new_files and action as JSON."),
) -> None:
    """Show and roll back the journal an interrupted run left; drop one mtlsctl will not act on (--discard).

    \b
    Any command rolls a sound journal back by itself. A journal that names an absolute path, `..`, a
    symbolic link, a setuid/setgid/sticky or group/other-writable mode (a private/ file above 600), or
    that is truncated or of the wrong shape, is never acted on: commands that change the PKI refuse to
    run (readers warn) until a person has looked at it here. Exit 1 while such a journal is left.

    \b
    Examples:
      mtlsctl recover --dry-run     # what it would remove and put back
      mtlsctl recover               # roll a sound journal back now
      mtlsctl recover --discard     # drop a journal mtlsctl refuses; then check: mtlsctl doctor
    """
    from mtlsctl import files

    if discard and dry_run:
        raise InputError("--discard and --dry-run exclude each other", hint="look first with --dry-run, then --discard")
    settings = _settings(ctx, recover=False)
    root = settings.pki.root
    view, action = files.JournalView("none", root / files.JOURNAL_DIR), "none"
    if root.is_dir():
        with files.pki_lock(settings.pki.lock_path, recover_journal=False):
            view = files.inspect_journal(root)
            if view.state == "none" or dry_run:
                action = "none"
            elif discard or view.state == "committed":
                files.discard_journal(root)
                action = "discarded" if view.state != "committed" else "cleaned"
            elif view.state == "sound":
                files.recover(root)
                action = "rolled_back"
            else:
                action = "refused"
    if as_json:
        _print_json({**view.to_json(), "action": action})
    elif view.state == "none":
        print("no interrupted run: nothing to recover")
    else:
        head = {"sound": "an interrupted run's journal", "committed": "a committed run's leftovers",
                "damaged": "a journal mtlsctl does not trust"}[view.state]
        print(f"{head} in {view.path}" + (f" (pid {view.pid})" if view.pid is not None else ""))
        if view.reason:
            print(f"  not trusted: {view.reason}")
        verb = "names (unchecked)" if view.state == "damaged" else "removes"
        for label, items in ((f"{verb} as created", view.remove), ("puts back" if view.state != "damaged" else
                              "names as changed", view.restore), ("removes as new", view.new_files)):
            for item in items:
                print(f"  {label}: {item}")
        print({"none": "dry run: nothing changed", "cleaned": "committed leftovers removed",
               "rolled_back": "rolled back", "refused": "nothing was done",
               "discarded": "journal dropped, nothing rolled back: check the PKI with `mtlsctl doctor`"}[action])
    if action == "refused" or (view.state == "damaged" and action == "none"):
        if not as_json:
            raise files.JournalError(root, view.reason)
        raise typer.Exit(1)


def _read_passphrase(file: Path | None, fd: int | None, prompt: bool, confirm: bool, what: str = "backup passphrase",
                     option: str = "--passphrase-file FILE or --passphrase-fd N") -> str | None:
    """A passphrase from a file, an inherited descriptor, or the terminal; never from argv or the environment."""
    from mtlsctl import validate

    if file is not None and fd is not None:
        raise InputError(f"give only one of {option}")
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read --passphrase-file {file}: {exc}") from None
        return validate.password(validate.strip_one_newline(text), source=str(file))
    if fd is not None:
        try:
            with os.fdopen(os.dup(fd), "r", encoding="utf-8") as fh:
                text = fh.read()
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


PASSFILE_HELP = "Read the passphrase from FILE (first line)."
PASSFD_HELP = "Read the passphrase from descriptor N (e.g. 3<pass.txt)."


@app.command()
def backup(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", metavar="FILE", help="The backup file to create (never overwritten); "
                             "a directory: a new pki-backup-DATE-TIME.tgz[.enc] in it."),
    passphrase_file: Path | None = typer.Option(None, "--passphrase-file", metavar="FILE", help=PASSFILE_HELP),
    passphrase_fd: int | None = typer.Option(None, "--passphrase-fd", metavar="N", help=PASSFD_HELP),
    encrypt: bool = typer.Option(False, "--encrypt", help="Encrypt, asking for the passphrase on the terminal."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Back up the whole PKI (CA key included) as a tar, encrypted when given a passphrase; read back before success.

    \b
    Encryption: the tar streams into openssl enc -aes-256-cbc -pbkdf2 (the passphrase on a pipe,
    never argv): no plaintext byte reaches the disk. The file is mode 600, written under a temporary
    name next to --out, read back (decrypted to a pipe) and compared, then renamed; never replaces a
    file. Taken under the lock: a consistent copy. Holds only what restore accepts: a symlink, FIFO or
    device in the PKI is refused (named); the lock and journal are left out; so is anything outside
    the PKI layout (reported). Modes are archived as restore sets them.

    \b
    Examples:
      mtlsctl backup --out /root/pki-$(date +%F).tgz.enc --passphrase-file /root/.pki-backup-pass
      mtlsctl backup --out /mnt/usb/ --encrypt
    """
    from mtlsctl.backup import backup as do_backup

    settings = _settings(ctx)
    passphrase = _read_passphrase(passphrase_file, passphrase_fd, prompt=encrypt, confirm=True)
    result = do_backup(settings, out, passphrase, _runner())
    if as_json:
        _print_json({"backup": str(result.path), "files": result.files, "encrypted": result.encrypted, "verified": True,
                     "note": result.note,
                     "skipped": [{"path": p, "reason": why} for p, why in result.skipped],
                     "modes": [{"path": p, "on_disk": f"{a:o}", "archived": f"{b:o}"} for p, a, b in result.normalised]})
        return
    if result.note:
        _info(result.note)
    for p, why in result.skipped:
        _info(f"left out: {p} ({why})")
    for p, a, b in result.normalised:
        _info(f"mode: {p} is {a:o} in the PKI, archived as {b:o} (what restore sets)")
    print(f"Backed up {result.files} files to {result.path}, read back and checked "
          f"({'encrypted' if result.encrypted else 'NOT encrypted: it holds the CA key'})")


@app.command()
def restore(
    ctx: typer.Context,
    backup_file: Path = typer.Argument(..., metavar="FILE", help="A file made by `mtlsctl backup`."),
    pki_dir: Path | None = typer.Option(None, "--pki-dir", metavar="DIR", help="Where to restore (must not hold a PKI)."),
    passphrase_file: Path | None = typer.Option(None, "--passphrase-file", metavar="FILE", help=PASSFILE_HELP),
    passphrase_fd: int | None = typer.Option(None, "--passphrase-fd", metavar="N", help=PASSFD_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the result and doctor's findings as JSON."),
) -> None:
    """Restore a backup into a new PKI directory, then run doctor on it.

    \b
    Refuses a directory that is not empty, and the whole archive (nothing written) if it holds a
    link, device, FIFO, absolute name, `..` or anything outside the PKI layout. Never restores
    mtlsctl's lock or journal (skipped). Modes are clamped: no setuid/setgid/sticky, nothing
    group/other-writable, private/ 700 and its files 600, ca.key and root.key 400. Every `dir` of
    openssl.cnf and mtls.yaml's pki_dir are pointed at the new place. Each change is reported.

    \b
    Example:
      mtlsctl restore /mnt/usb/pki.tgz.enc --pki-dir /etc/nginx/pki --passphrase-file /root/.pki-backup-pass
    """
    from mtlsctl.backup import is_encrypted
    from mtlsctl.backup import restore as do_restore
    from mtlsctl.doctor import run_doctor
    from mtlsctl.pki import resolve_settings

    opts: GlobalOptions = ctx.find_root().obj
    target = pki_dir or opts.pki_dir
    if target is None:
        raise InputError("restore needs --pki-dir DIR", hint="e.g. mtlsctl restore FILE --pki-dir /etc/nginx/pki")
    passphrase = _read_passphrase(passphrase_file, passphrase_fd, prompt=is_encrypted(backup_file), confirm=False,
                                  what="passphrase for the encrypted backup")
    result = do_restore(backup_file, target, passphrase, _runner())
    try:
        findings = run_doctor(resolve_settings(result.pki_dir, None, environ={}), _runner())
        doctor_error = ""
    except MtlsError as exc:  # the files are restored; say why doctor could not look at them
        findings, doctor_error = [], exc.message
    errors = [f for f in findings if f.level == "error"]
    if as_json:
        _print_json({"pki_dir": str(result.pki_dir), "files": result.files,
                     "clamped": [{"path": p, "archived": f"{a:o}", "restored": f"{b:o}"} for p, a, b in result.clamped],
                     "skipped": [{"member": m, "reason": why} for m, why in result.skipped],
                     "repointed": result.repointed, "warnings": result.warnings,
                     "doctor": [f.to_json() for f in findings], **({"doctor_error": doctor_error} if doctor_error else {})})
    else:
        print(f"Restored {result.files} files into {result.pki_dir}")
        for p, a, b in result.clamped:
            print(f"mode     {p}: {a:o} in the archive, restored as {b:o}")
        for m, why in result.skipped:
            print(f"skipped  {m} ({why})")
        for line in result.repointed:
            print(f"changed  {line}")
        for line in result.warnings:
            print(f"WARN     {line}")
        for f in findings:
            if f.level != "ok":
                print(f"{f.level.upper():<5} {f.check:<8} {f.message}\n{'':<14} fix: {f.fix}")
        if doctor_error:
            print(f"doctor could not run: {doctor_error}")
        else:
            print("doctor: healthy" if not [f for f in findings if f.level != "ok"] else "doctor: see above")
    if errors or doctor_error:
        raise typer.Exit(1)


ca_passphrase_app = typer.Typer(help="The passphrase of an encrypted CA key (profile ca.key.encrypt).", no_args_is_help=True)
app.add_typer(ca_passphrase_app, name="ca-passphrase")


@ca_passphrase_app.command("change")
def ca_passphrase_change(
    ctx: typer.Context,
    new_passphrase_file: Path | None = typer.Option(None, "--new-passphrase-file", metavar="FILE", help="Read the new passphrase from FILE."),
    new_passphrase_fd: int | None = typer.Option(None, "--new-passphrase-fd", metavar="N", help="Read the new passphrase from descriptor N."),
) -> None:
    """Re-encrypt private/ca.key under a new passphrase (AES-256); also encrypts a key that has none.

    \b
    The current passphrase comes from the global --ca-passphrase-file / --ca-passphrase-fd or the
    terminal; passphrases travel to openssl on pipes, never on argv or in the environment.

    \b
    Example:
      mtlsctl --ca-passphrase-file old.txt ca-passphrase change --new-passphrase-file new.txt
    """
    from mtlsctl.ca import change_passphrase, passphrase_check
    from mtlsctl.runner import Runner

    settings = _settings(ctx)
    settings.pki.require_ca()
    old = None
    if settings.pki.ca_key_encrypted():
        old = _OPTIONS.ca_passphrase() if _OPTIONS else None
        if Runner().run(passphrase_check(old), cwd=settings.pki.root, check=False).returncode != 0:
            raise InputError("the current CA passphrase does not open private/ca.key")
    new = _read_passphrase(new_passphrase_file, new_passphrase_fd, prompt=True, confirm=True, what="New CA key passphrase",
                           option="--new-passphrase-file FILE or --new-passphrase-fd N")
    assert new is not None
    if len(new) < 8:
        raise InputError("the new passphrase is shorter than 8 characters", hint="use a long passphrase; it guards every certificate")
    change_passphrase(settings.pki, old, new, _runner())
    print("private/ca.key is now encrypted with the new passphrase")


ocsp_app = typer.Typer(help="OCSP responder for client certificates (nginx ssl_ocsp).", no_args_is_help=True)
app.add_typer(ocsp_app, name="ocsp")


@ocsp_app.command("setup")
def ocsp_setup(ctx: typer.Context) -> None:
    """Put the profile's ocsp.url into openssl.cnf and issue the OCSP signing certificate.

    \b
    Client certificates issued from now on carry the responder URL (authorityInfoAccess); older ones
    do not: nginx then uses ssl_ocsp_responder for them. The signer (certs/ocsp-responder.crt, EKU
    OCSPSigning) has a short validity (ocsp.signer_days) and is renewed by `mtlsctl renew`.

    \b
    Example:
      mtlsctl ocsp setup && mtlsctl ocsp serve
    """
    from mtlsctl import ocsp

    settings = _settings(ctx)
    result = ocsp.setup(settings, _runner(settings, signs=True))
    if result.config_rendered:
        print("openssl.cnf re-rendered: new client certificates carry the OCSP URL")
    print(f"OCSP signer: {'issued, serial ' + result.signer_serial if result.signer_serial else 'already valid'}")


@ocsp_app.command("serve")
def ocsp_serve(
    ctx: typer.Context,
    health_interval: float = typer.Option(10.0, "--health-interval", metavar="SECONDS",
                                          help="Send one real OCSP request this often; restart a responder that does not answer."),
) -> None:
    """Run the responder in the foreground (openssl ocsp -index index.txt -port ... -nmin ...).

    \b
    WARNING: openssl's -port binds EVERY interface; firewall the port so only nginx hosts reach it.
    A systemd unit is in docs/systemd/mtlsctl-ocsp.service. Its pid is kept in <pki>/ocsp.pid, so that
    `mtlsctl revoke` can prime it (its first answer after a change is stale). mtlsctl supervises it:
    OpenSSL 3.0's responder stops answering after a connection that sends no request (a port probe),
    so a responder that does not answer a health request is restarted (waiting 0.5 s, doubling up to
    60 s while it keeps failing); it is also restarted when `renew` replaces its signer certificate.

    \b
    Example:
      mtlsctl ocsp serve
    """
    from mtlsctl import ocsp

    settings = _settings(ctx)
    _info(f"warning: openssl ocsp binds port {settings.profile.ocsp.port if settings.profile.ocsp else '?'} on EVERY interface; "
          "firewall it so only nginx reaches it")
    if not 0.2 <= health_interval <= 3600:
        raise InputError(f"--health-interval {health_interval} is out of range", hint="use 0.2 to 3600 seconds")
    _info("# " + ocsp.serve_command(settings).display())
    code = ocsp.serve(settings, _runner(), health_interval=health_interval, log=lambda m: _info(f"warning: {m}"))
    if code:
        raise typer.Exit(1)


@ocsp_app.command("check")
def ocsp_check(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Client name (asks about certs/NAME.crt)."),
    as_json: bool = typer.Option(False, "--json", help="Print name and status as JSON."),
) -> None:
    """Ask the responder about a client: good, revoked, unknown, unverified or unreachable (exit 0 only for good).

    \b
    Runs: openssl ocsp -issuer ca/ca.crt -cert certs/NAME.crt -url URL -CAfile ca/ca.crt
    (two-tier PKI: -CAfile ca/chain.pem). unverified: it answered, but not verifiably.

    \b
    Example:
      mtlsctl ocsp check iphone-jmrp
    """
    from mtlsctl import ocsp

    settings = _settings(ctx)
    status, detail = ocsp.check(settings, name, _runner())
    if as_json:
        _print_json({"name": name, "status": status})
    else:
        print(f"{name}: {status}" + (f" ({detail})" if status in ("unreachable", "unverified") else ""))
    if status != "good":
        raise typer.Exit(1)


root_app = typer.Typer(help="The root of a two-tier PKI (profile ca.intermediate).", no_args_is_help=True)
app.add_typer(root_app, name="root")


@root_app.command("export-offline")
def root_export_offline(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", metavar="FILE", help="Where the root key goes (removable media); never overwritten."),
) -> None:
    """Move the root key out of the PKI: it signs only the issuing CA and the root CRL.

    \b
    Afterwards `mtlsctl crl --root --root-key FILE` refreshes the root CRL (due every
    ca.intermediate.root_crl_days); everything else keeps working with the issuing CA's key.

    \b
    Example:
      mtlsctl root export-offline --out /media/usb/root.key && umount /media/usb
    """
    from mtlsctl.ca import export_root_offline

    settings = _settings(ctx)
    path = export_root_offline(settings.pki, out)
    print(f"Root key moved to {path} (mode 400) and removed from {settings.pki.path(settings.pki.root_key)}")
    print("Refresh the root CRL before it expires with: mtlsctl crl --root --root-key " + str(path))


@app.command("add-server")
def add_server(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Server name: becomes CN=NAME and certs/NAME.crt, private/NAME.key."),
    san: list[str] = typer.Option([], "--san", metavar="DNS:NAME|IP:ADDR", help="Subject alternative name; repeatable (default: DNS:NAME)."),
    days: int | None = typer.Option(None, "--days", metavar="N", help="Validity in days (default: profile clients.days, 365)."),
    key_type: str | None = typer.Option(None, "--key-type", metavar="rsa|ec", help="Key type (default: profile clients.key)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the openssl commands and change nothing."),
) -> None:
    """Issue a server certificate from the same CA (v3_server: CA:FALSE, serverAuth, the SANs).

    \b
    For internal services and for nginx's own certificate (ssl_certificate).
    A name whose certificates are all revoked or expired is issued again; its old files (key,
    certificate, fullchain) move to archive/NAME/SERIAL/ first.

    \b
    Examples:
      mtlsctl add-server secure.example.com --san DNS:secure.example.com
      mtlsctl add-server localhost --san DNS:localhost --san IP:127.0.0.1
    """
    from mtlsctl import client

    settings = _settings(ctx)
    sans = list(san) or [f"DNS:{name}"]
    for entry in sans:
        if entry.split(":", 1)[0].upper() not in ("DNS", "IP"):
            raise InputError(f"--san {entry!r}: a server certificate takes DNS: or IP: names", hint="e.g. --san DNS:host.example")
    req = client.build_request(settings, name, days=days, key_type=key_type, sans=sans, kind="server")
    if dry_run:
        _print_dry_run(settings.pki.root, client.plan_issue(settings, req), client.retire_notes(settings.pki, name))
        return
    result = client.issue_client(settings, req, _runner(settings, signs=True))
    from mtlsctl.nginx import served_certificate, server_files

    chosen = server_files(settings.pki, settings.profile.nginx)
    served = served_certificate(settings.pki, chosen.cert)
    if as_json:
        _print_json({"name": result.name, "serial": result.serial, "not_after": result.not_after.isoformat(),
                     "sans": list(result.sans), "files": {"key": str(result.key), "csr": str(result.csr), "crt": str(result.crt),
                                                          "fullchain": str(settings.pki.path(settings.pki.client(result.name).fullchain))},
                     "archived": str(settings.pki.path(result.archived)) if result.archived else None,
                     "nginx_render": {"ssl_certificate": served, "ssl_certificate_key": chosen.key, "source": chosen.source,
                                      "uses_this_certificate": chosen.name == result.name, "why": chosen.why}})
        return
    print(f"Issued server certificate {result.name}: serial {result.serial}, valid until {result.not_after:%Y-%m-%d %H:%M} UTC")
    print(f"  SANs   {', '.join(result.sans)}")
    print(f"  cert   {result.crt}")
    print(f"  chain  {settings.pki.path(settings.pki.client(result.name).fullchain)}   (the certificate + issuing CA: ssl_certificate)")
    print(f"  key    {result.key}   (ssl_certificate_key)")
    _print_archived(settings, result)
    if chosen.name == result.name:
        print(f"`mtlsctl nginx render` will use it ({chosen.why}; nginx.server_cert/server_key are at their placeholders):")
    elif chosen.source == "pki":
        print(f"`mtlsctl nginx render` will serve {chosen.name} instead ({chosen.why}); set nginx.server_name: {result.name} "
              "or nginx.server_cert/server_key to serve this one:")
    elif chosen.candidates:
        print(f"`mtlsctl nginx render` will not pick one: {chosen.why}; set nginx.server_name: {result.name}, or "
              "nginx.server_cert/server_key. It renders:")
    else:
        print(f"`mtlsctl nginx render` uses the profile's nginx.server_cert/server_key, not this certificate; to serve it "
              f"set nginx.server_cert: {result.crt} and nginx.server_key: {result.key}. It renders:")
    print(f"  ssl_certificate     {served};\n  ssl_certificate_key {chosen.key};")


nginx_app = typer.Typer(help="Render the mTLS site for nginx, test it, and reload safely.", no_args_is_help=True)
app.add_typer(nginx_app, name="nginx")


@nginx_app.command("render")
def nginx_render(
    ctx: typer.Context,
    out: Path | None = typer.Option(None, "--out", metavar="FILE", help="Write here atomically (e.g. /etc/nginx/conf.d/mtls.conf); default: stdout."),
    verify_client: str | None = typer.Option(None, "--verify-client", metavar="on|optional", help="Override nginx.verify_client."),
    rate_limit: str | None = typer.Option(None, "--rate-limit", metavar="RATE", help="Rate limit for unverified clients, e.g. 5r/s (overrides nginx.rate_limit)."),
    burst: int | None = typer.Option(None, "--burst", metavar="N", help="Burst for --rate-limit (default 10)."),
    force: bool = typer.Option(False, "--force", help="Write the site even when a file it names is missing (each is still reported)."),
) -> None:
    """Render the site (server block, allowlist and rate-limit maps, log format) for the http {} context.

    \b
    The profile's nginx: section drives it (docs/profile.md). Values that would inject nginx syntax
    are refused. Allowlist regexes are anchored; verify failures are logged at info.

    \b
    Refused where there is no CA (exit 2). Every file the site names is checked as nginx's master
    (root) will read it: ssl_certificate, ssl_certificate_key (also: not world-readable),
    ssl_client_certificate, ssl_crl and the logs' directories. A missing one is named with its fix,
    and nothing is written (exit 1) unless --force. With nginx.server_cert/server_key left at their
    placeholders, the PKI's server certificate (`mtlsctl add-server`) is served: the one named like
    nginx.server_name, or the only one.

    \b
    Examples:
      mtlsctl nginx render --out /etc/nginx/conf.d/secure.example.com.conf && mtlsctl nginx reload
      mtlsctl nginx render --verify-client optional --rate-limit 5r/s --burst 20
    """
    from mtlsctl.files import MODE_PUBLIC, atomic_write
    from mtlsctl.nginx import render_checked
    from mtlsctl.profile import RateLimit

    if verify_client is not None and verify_client not in ("on", "optional"):
        raise InputError(f"--verify-client {verify_client!r} is not allowed", hint="use on or optional (optional_no_ca admits self-signed certificates)")
    limit = None
    if rate_limit is not None or burst is not None:
        from pydantic import ValidationError

        if rate_limit is None:
            raise InputError("--burst needs --rate-limit", hint="e.g. --rate-limit 5r/s --burst 20")
        try:
            limit = RateLimit(rate=rate_limit, burst=burst if burst is not None else 10)
        except ValidationError as exc:
            raise InputError(f"--rate-limit {rate_limit!r} / --burst {burst!r}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}",
                             hint="e.g. --rate-limit 5r/s --burst 10") from None
    if out is not None:  # where it goes is input: checked before anything is rendered
        from mtlsctl.files import refuse_symlink

        if not out.parent.is_dir():
            raise InputError(f"--out {out}: directory {out.parent} does not exist")
        refuse_symlink(out)
        if out.is_dir():
            raise InputError(f"--out {out} is a directory", hint=f"name the file, e.g. --out {out / 'mtls.conf'}")
    settings = _settings(ctx)
    settings.pki.require_ca()
    with _reading(settings):
        text, warnings = render_checked(settings.pki, settings.profile.nginx, verify_client=verify_client, rate_limit=limit,
                                        ocsp=settings.profile.ocsp, force=force)
    for w in warnings:
        _info(f"warning: {w}")
    if out is None:
        sys.stdout.write(text)
        return
    atomic_write(out, text, MODE_PUBLIC)
    _info(f"wrote {out}; next: mtlsctl nginx reload")


@nginx_app.command("check")
def nginx_check(ctx: typer.Context) -> None:
    """Run the profile's nginx.test_command (nginx -t); exit 1 with nginx's message if it fails.

    \b
    Example:
      mtlsctl nginx check
    """
    from mtlsctl.nginx import check

    settings = _settings(ctx)
    print(check(settings.profile.nginx))


@nginx_app.command("reload")
def nginx_reload(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print reloaded and detail as JSON."),
) -> None:
    """Test, reload, then confirm nginx started new workers (a failed reload keeps the old CRL silently).

    \b
    Uses nginx.test_command, nginx.reload_command and nginx.pid_file from the profile.

    \b
    Example:
      mtlsctl nginx reload
    """
    from mtlsctl.nginx import reload as do_reload

    settings = _settings(ctx)
    outcome = do_reload(settings.profile.nginx)
    if as_json:
        _print_json({"reloaded": outcome.reloaded, "detail": outcome.detail})
    else:
        print(outcome.detail)


systemd_app = typer.Typer(help="systemd units for the nightly renew, the CRL refresh and the OCSP responder.", no_args_is_help=True)
app.add_typer(systemd_app, name="systemd")


@systemd_app.command("install")
def systemd_install(
    ctx: typer.Context,
    directory: Path = typer.Option(Path("/etc/systemd/system"), "--dir", metavar="DIR", help="Where the units go."),
    force: bool = typer.Option(False, "--force", help="Replace units that exist (default: refuse, nothing written)."),
    as_json: bool = typer.Option(False, "--json", help="Print dir, mtlsctl, units (name, path, written, replaced) and next as JSON."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the units and write nothing."),
) -> None:
    """Write systemd units that run this mtlsctl, by its absolute path, on this PKI.

    \b
    mtlsctl-renew.service + .timer (daily renew), mtlsctl-crl.service + .timer (crl --if-due twice a
    day, a unit of its own: systemd skips ExecStartPost= when ExecStart= fails, so the CRL is refreshed
    even when renew fails) and, with an ocsp: section in the profile, mtlsctl-ocsp.service. ExecStart=
    names the running mtlsctl and --pki-dir (and --profile, --ca-passphrase-file when given). Existing
    units are never replaced without --force; new files are created exclusively.

    \b
    Examples:
      mtlsctl systemd install --dry-run
      mtlsctl systemd install
      systemctl daemon-reload && systemctl enable --now mtlsctl-renew.timer mtlsctl-crl.timer
    """
    from mtlsctl import systemd

    settings = _settings(ctx)
    settings.pki.require_ca()
    opts: GlobalOptions = ctx.find_root().obj
    exe = systemd.running_mtlsctl()
    units = systemd.render_units(settings, exe, directory.absolute(), opts.ca_passphrase_file)
    if settings.pki.ca_key_encrypted() and opts.ca_passphrase_file is None:
        _info("warning: private/ca.key is encrypted and no --ca-passphrase-file was given: renew and crl cannot ask for "
              "the passphrase under systemd and will fail; run `mtlsctl --ca-passphrase-file FILE systemd install --force`")
    done = systemd.install(units, directory, force=force, dry_run=dry_run)
    if as_json:
        _print_json({"dir": str(directory), "mtlsctl": str(exe), "dry_run": dry_run, "next": systemd.next_steps(units),
                     "units": [{"name": u.name, "path": str(d.path), "written": d.written, "replaced": d.replaced,
                                **({"text": u.text} if dry_run else {})} for u, d in zip(units, done, strict=True)]})
        return
    if dry_run:
        _info(f"# dry run: nothing is written. {len(units)} unit(s) for {directory}:")
        for unit, d in zip(units, done, strict=True):
            exists = (" (exists: --force replaces it)" if force else " (exists: refused without --force)") if d.replaced else ""
            print(f"# ---- {d.path}{exists}")
            print(unit.text, end="" if unit.text.endswith("\n") else "\n")
        return
    for d in done:
        print(f"{'replaced' if d.replaced else 'wrote'} {d.path}")
    print(f"ExecStart= runs {exe}")
    print(f"next: {systemd.next_steps(units)}")


@app.command()
def demo(
    directory: Path = typer.Option(Path("mtls-demo"), "--dir", metavar="DIR", help="Where to build the demo PKI (default ./mtls-demo)."),
    port: int | None = typer.Option(None, "--port", metavar="N", help="nginx port on 127.0.0.1 (default: a free one)."),
    keep: bool = typer.Option(False, "--keep", help="Leave nginx and the echo backend running."),
    as_json: bool = typer.Option(False, "--json", help="Print the outcomes as JSON."),
) -> None:
    """The guide end to end on the built-in defaults, proven with a real nginx.

    \b
    Builds a PKI in ./mtls-demo: CA, a localhost server certificate, clients iphone-jmrp (allowed),
    guest (valid, not allowed) and lost-device (revoked), the CRL and the rendered site. When nginx is
    installed it starts it on 127.0.0.1 with a tiny echo backend and checks the guide's outcomes:
    no certificate 400, iphone-jmrp 200, lost-device 400, guest 403. Safe to run again.

    \b
    Example:
      mtlsctl demo --keep     # then paste the curl commands it prints
    """
    from mtlsctl.demo import run_demo

    if port is not None and not 1024 <= port <= 65535:
        raise InputError(f"--port {port} is out of range", hint="use 1024..65535, or leave it out for a free port")
    report = run_demo(directory, port, keep, _runner())
    if as_json:
        _print_json({"pki_dir": str(report.pki_dir), "port": report.port, "nginx_ran": report.nginx_ran, "ok": report.ok,
                     "cases": [{"case": c.label, "expected": c.expected, "status": c.status, "command": c.command}
                               for c in report.cases]})
    else:
        print(f"Demo PKI in {report.pki_dir}" + (f" (created: {', '.join(report.created)})" if report.created else " (reused)"))
        if not report.nginx_ran:
            print("nginx is not installed, so the checks did not run. Install it (Debian: apt-get install nginx) and run `mtlsctl demo` again.")
            print("The commands a person would run against it:")
            for c in report.cases:
                print(f"  expect {c.expected}  {c.command}")
            return
        print(f"nginx on https://127.0.0.1:{report.port}/ (mTLS, CRL, allowlist CN={'iphone-jmrp'})\n")
        width = max(len(c.label) for c in report.cases)
        print(f"{'CASE':<{width}}  EXPECTED  GOT   RESULT")
        for c in report.cases:
            print(f"{c.label:<{width}}  {c.expected:<8}  {c.status or '-':<4}  {'ok' if c.ok else 'WRONG'}")
            print(f"{'':<{width}}  $ {c.command}")
        allowed = next(c for c in report.cases if c.expected == 200)
        if allowed.body:
            print(f"\nbackend saw: {allowed.body.splitlines()[0]}")
        if report.kept:
            print(f"\nnginx and the backend are still running. Stop them with:\n  {report.stop_hint}")
    for note in report.notes:
        _info(f"note: {note}")
    if report.nginx_ran and not report.ok:
        raise DemoFailed("the demo's outcomes differ from the guide's",
                         hint=report.notes[0] if report.notes else f"see {report.pki_dir}/nginx/logs/")


class DemoFailed(MtlsError):
    pass


def _reflow(doc: str | None) -> str | None:
    """Join the lines of each prose paragraph of a docstring, so rich wraps it to the terminal; a
    paragraph that starts with \\b (examples, commands to paste) keeps its lines as written."""
    if not doc:
        return doc
    def is_block(paragraph: str) -> bool:  # \b with indented lines (examples, commands); \b prose is re-flowed
        lines = paragraph.split("\n")
        return lines[0].strip() == "\b" and any(line.startswith(" ") for line in lines[1:])

    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(p if is_block(p) else " ".join(line.strip() for line in p.replace("\b", "").splitlines()).strip()
                        for p in paragraphs)


def _reflow_help(typer_app: typer.Typer) -> None:
    for command in typer_app.registered_commands:
        if command.callback is not None and command.help is None:
            command.callback.__doc__ = _reflow(command.callback.__doc__)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _reflow_help(group.typer_instance)


COMPLETION_SHELLS = ("bash", "zsh", "fish")


def completion_file(shell: str, environ: Any = os.environ) -> Path:
    """Where `completion SHELL --install` writes: the per-user place each shell loads completions from."""
    home = Path(environ.get("HOME") or Path.home())
    if shell == "bash":  # bash-completion (2.x) loads it on demand
        data = Path(environ.get("XDG_DATA_HOME") or home / ".local/share")
        return Path(environ.get("BASH_COMPLETION_USER_DIR") or data / "bash-completion") / "completions/mtlsctl"
    if shell == "zsh":
        return Path(environ.get("ZDOTDIR") or home) / ".zfunc/_mtlsctl"
    return Path(environ.get("XDG_CONFIG_HOME") or home / ".config") / "fish/completions/mtlsctl.fish"


def completion_script(shell: str) -> str:
    """The completion script for a shell: typer's completion classes (click's machinery), _MTLSCTL_COMPLETE."""
    from click.shell_completion import get_completion_class
    from typer._completion_classes import completion_init

    completion_init()
    cls = get_completion_class(shell)
    assert cls is not None
    return cls(typer.main.get_command(app), {}, "mtlsctl", "_MTLSCTL_COMPLETE").source().strip() + "\n"


@app.command()
def completion(
    shell: str = typer.Argument(..., metavar="bash|zsh|fish", help="The shell to complete in."),
    install: bool = typer.Option(False, "--install", help="Write the script where the shell loads completions instead of printing it."),
    force: bool = typer.Option(False, "--force", help="With --install: replace a different file already there."),
) -> None:
    """Print (or install) shell completion for bash, zsh or fish: commands, options and choice values.

    \b
    The script asks mtlsctl what to complete (click's completion, _MTLSCTL_COMPLETE), so it follows
    the installed version. --install writes one file, never replaces a different one without --force,
    and edits no rc file:
      bash  ~/.local/share/bash-completion/completions/mtlsctl (the bash-completion package loads it)
      zsh   ~/.zfunc/_mtlsctl (needs `fpath+=~/.zfunc` before `compinit` in ~/.zshrc)
      fish  ~/.config/fish/completions/mtlsctl.fish

    \b
    Examples:
      mtlsctl completion bash --install
      eval "$(mtlsctl completion bash)"       # this shell only (or that line in ~/.bashrc)
      mtlsctl completion zsh > /usr/local/share/zsh/site-functions/_mtlsctl
    """
    from mtlsctl.files import MODE_PUBLIC, atomic_write

    chosen = shell.lower()
    if chosen not in COMPLETION_SHELLS:
        raise InputError(f"shell {shell!r} is not supported", hint="use bash, zsh or fish")
    script = completion_script(chosen)
    if not install:
        sys.stdout.write(script)
        return
    target = completion_file(chosen)
    if target.is_symlink() or target.exists():
        try:
            same = not target.is_symlink() and target.read_text(encoding="utf-8") == script
        except (OSError, UnicodeDecodeError):
            same = False
        if same:
            print(f"{chosen} completion is already installed in {target}")
            return
        if not force:
            raise InputError(f"{target} already exists and differs from mtlsctl's {chosen} completion",
                             hint="look at it; --force replaces it")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, script, MODE_PUBLIC)
    print(f"{chosen} completion installed in {target}")
    if chosen == "bash":
        print("It loads in new shells when the bash-completion package is installed; otherwise add to ~/.bashrc: "
              f"source {target}")
    elif chosen == "zsh":
        print(f"Make sure ~/.zshrc has, before compinit: fpath+={target.parent}   (then: autoload -Uz compinit && compinit)")
    else:
        print("It loads in new fish shells.")


_reflow_help(app)


# ------------------------------------------------------------------ habits: global options anywhere, choices in any
# case, "did you mean", completion. All of it acts on the click command main() builds, before click parses.

# Choice options, by name, wherever a command has one: accepted in any case, handed on in one canonical spelling
# (the core's own check still names a value that is not one of them). tests/test_cli_habits.py finds every
# option with a choice metavar (a|b) and checks it is here, and checks these against the core's lists.
CHOICES: dict[str, tuple[str, ...]] = {
    "--key-type": ("rsa", "ec"),
    "--p12": ("compat", "modern", "legacy"),
    "--status": ("valid", "expiring", "expired", "revoked"),
    "--verify-client": ("on", "optional"),
    "--reason": ("unspecified", "keyCompromise", "CACompromise", "affiliationChanged", "superseded",
                 "cessationOfOperation", "certificateHold"),
}


def _option_arity(command: click.Command, *, eager: bool = True) -> dict[str, int]:
    """Each option name of a command -> how many values follow it (0 for a flag)."""
    out: dict[str, int] = {}
    for param in command.params:
        if isinstance(param, click.Option) and (eager or not param.is_eager):
            for name in (*param.opts, *param.secondary_opts):
                out[name] = 0 if (param.is_flag or param.count) else param.nargs
    return out


def global_options(root: click.Command) -> dict[str, int]:
    """The global options (the callback's, --version and --help left out) and how many values each takes."""
    return _option_arity(root, eager=False)


def hoist_global_options(root: click.Group, args: list[str]) -> list[str]:
    """Move the global options given after the command path (and their values) to just before it.

    Walks the arguments as click will parse them: the root's own options and values, the command path,
    then each arg after it — an option of the command itself keeps its place and its value (so a value
    that happens to be spelled --pki-dir stays a value, and restore's own --pki-dir stays restore's),
    `--opt=value` counts as one arg, and `--` ends the walk. Unknown commands and options are left
    alone for click to refuse.
    """
    root_arity, globals_ = _option_arity(root), global_options(root)
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "-":
        if args[i] == "--":
            return args
        i += 1 + (0 if "=" in args[i] else root_arity.get(args[i], 0))
    if i >= len(args) or not isinstance(root, click.Group) or args[i] not in root.commands:
        return args
    start, command = i, root.commands[args[i]]
    own, hoisted, rest = _option_arity(command), [], [args[i]]
    i += 1
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i:])
            break
        if arg.startswith("-") and arg != "-":
            name = arg.split("=", 1)[0] if arg.startswith("--") else arg
            if name in own:
                n = 0 if "=" in arg else own[name]
                rest.extend(args[i:i + 1 + n])
            elif name in globals_:
                n = 0 if "=" in arg else globals_[name]
                if i + n >= len(args):
                    raise click.UsageError(f"Option '{name}' requires an argument.")
                hoisted.extend(args[i:i + 1 + n])
            else:
                n = 0
                rest.append(arg)
            i += 1 + n
            continue
        rest.append(arg)
        if isinstance(command, click.Group):  # a sub-command name: its options from here on
            sub = command.commands.get(arg)
            if sub is None:
                rest.extend(args[i + 1:])
                break
            command, own = sub, _option_arity(sub)
        i += 1
    return args[:start] + hoisted + rest


def _canonical_choice(choices: tuple[str, ...], then: Any) -> Any:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if isinstance(value, str):
            value = next((c for c in choices if c.lower() == value.lower()), value)
        return then(ctx, param, value) if then is not None else value
    return callback


def _complete_choice(choices: tuple[str, ...]) -> Any:
    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
        from click.shell_completion import CompletionItem

        return [CompletionItem(c) for c in choices if c.lower().startswith(incomplete.lower())]
    return complete


def accept_any_case(command: click.Command) -> None:
    """Every CHOICES option of every command: any case in, the canonical spelling out; its values complete."""
    for param in command.params:
        if isinstance(param, click.Option) and not param.is_flag:
            choices = next((CHOICES[o] for o in param.opts if o in CHOICES), None)
            if choices is not None:
                param.callback = _canonical_choice(choices, param.callback)
                param._custom_shell_complete = _complete_choice(choices)
    for sub in getattr(command, "commands", {}).values():
        accept_any_case(sub)


def build_command() -> click.Group:
    """The click command main() runs: typer's, with the habits above applied."""
    import typer.main

    root = typer.main.get_command(app)
    assert isinstance(root, click.Group)
    accept_any_case(root)
    return root


def _suggest(word: str, candidates: list[str]) -> list[str]:
    """Close spellings (difflib), and names the word begins (add -> add-client, add-server); at most three."""
    import difflib

    starts = [c for c in candidates if len(word.lstrip("-")) >= 2 and c.startswith(word) and c != word]
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)
    return list(dict.fromkeys(starts + close))[:3]


def _one_of(names: list[str], quote: str = "") -> str:
    shown = [f"{quote}{n}{quote}" for n in names]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]


def usage_error_lines(exc: click.UsageError, root: click.Command | None = None) -> list[str]:
    """click's usage error as mtlsctl prints it: `error: ...` and a hint; a mistyped command or option gets
    one line instead, with what it probably meant."""
    import re

    ctx = exc.ctx
    where = ctx.command_path if ctx is not None else "mtlsctl"
    if isinstance(exc, click.NoSuchOption) and ctx is not None:
        candidates = [o for o in _option_arity(ctx.command) if o.startswith("--")]
        if ctx.parent is not None and root is not None:  # global options are accepted after the command too
            candidates += [o for o in global_options(root) if o not in candidates]
        found = _suggest(exc.option_name, candidates)
        if found:
            return [f"error: {exc.message.rstrip('.')}. Did you mean {_one_of(found)}?"]
    match = re.fullmatch(r"No such command (['\"])(.*)\1\.", exc.message, re.S)
    if match and ctx is not None and isinstance(ctx.command, click.Group):
        found = _suggest(match.group(2), ctx.command.list_commands(ctx))
        if found:
            return [f"error: {exc.message.rstrip('.')}. Did you mean {_one_of(found, quote=chr(39))}?"]
    # click's multi-line usage block becomes our one-line error + hint
    return [f"error: {exc.format_message()}", f"hint: run `{where} --help`"]


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> NoReturn:
    """Console entry point: the one error boundary."""
    from mtlsctl.files import set_private_umask

    set_private_umask()
    signal.signal(signal.SIGTERM, _on_sigterm)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger = logging.getLogger("mtlsctl")
    logger.handlers[:] = [handler]
    logger.propagate = False
    code = EXIT_OK
    root: click.Group | None = None
    try:
        root = build_command()
        if os.environ.get("_MTLSCTL_COMPLETE"):  # a shell asks what to complete: typer's classes answer
            from typer._completion_classes import completion_init

            completion_init()
        args = hoist_global_options(root, list(sys.argv[1:] if argv is None else argv))
        rv = root.main(args=args, prog_name="mtlsctl", standalone_mode=False)
        code = rv if isinstance(rv, int) else EXIT_OK
        if code == EXIT_INTERRUPTED:  # typer turns KeyboardInterrupt (and our SIGTERM) into Exit(130)
            print("interrupted; what this run wrote was rolled back", file=sys.stderr)
    except MtlsError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        code = exc.exit_code
    except click.exceptions.Abort:
        print("interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except click.UsageError as exc:
        for line in usage_error_lines(exc, root):
            print(line, file=sys.stderr)
        code = EXIT_BAD_INPUT
    except click.ClickException as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
        code = EXIT_BAD_INPUT if exc.exit_code == 2 else exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; what this run wrote was rolled back", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except OSError as exc:
        for line in os_error_lines(exc):
            print(line, file=sys.stderr)
        code = os_error_exit_code(exc)
    except Exception as exc:  # noqa: BLE001 - the boundary: a bug must not print a traceback holding secrets
        if _debug or os.environ.get("MTLSCTL_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("hint: this is a bug in mtlsctl; run again with --debug and report the traceback", file=sys.stderr)
        code = EXIT_INTERNAL
    sys.stdout.flush()
    sys.exit(code)
