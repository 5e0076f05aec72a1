"""Certificates: add-client, add-server, export, replace, sign-csr, list, verify, renew."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from json.encoder import encode_basestring_ascii as _json_str  # json.dumps's, for a string
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mtlsctl.cli import io
from mtlsctl.cli.app import DRY_RUN_HELP, JSON_HELP, NO_RELOAD_HELP, P12_HELP, PANEL_CERTIFICATES, app
from mtlsctl.cli.context import load_settings, reading, runner
from mtlsctl.errors import BatchFailed, InputError, RenewFailed, ReplaceIncomplete

if TYPE_CHECKING:
    from mtlsctl.client import IssueResult
    from mtlsctl.lifecycle import CertEntry
    from mtlsctl.pki import Settings

DAYS_HELP = "Validity in days (default: profile clients.days, 365)."
KEY_TYPE_HELP = "Key type (default: profile clients.key)."


def _print_archived(settings: Settings, result: IssueResult) -> None:
    if result.archived:
        print(f"  old files (serial {result.archived_serial}) moved to {settings.pki.path(result.archived)}/")


@app.command("add-client", rich_help_panel=PANEL_CERTIFICATES)
def add_client(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(
        help="Client name: becomes CN=NAME and the file names (letters, digits, . _ -).")] = None,
    from_file: Annotated[Path | None, typer.Option(
        "--from-file", metavar="NAMES.txt",
        help="Issue every name in the file (one per line): keys in parallel, passwords to 0600 files.")] = None,
    jobs: Annotated[int | None, typer.Option(
        "--jobs", metavar="N", help="With --from-file: parallel key generations (default: the number of cores).")] = None,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the export password from standard input.")] = False,
    password_file: Annotated[Path | None, typer.Option(
        "--password-file", metavar="FILE", help="Read the export password from FILE.")] = None,
    days: Annotated[int | None, typer.Option("--days", metavar="N", help=DAYS_HELP)] = None,
    san: Annotated[list[str] | None, typer.Option(
        "--san", metavar="TYPE:VALUE", help="Subject alternative name (DNS, IP, email, URI); repeatable.")] = None,
    key_type: Annotated[str | None, typer.Option("--key-type", metavar="rsa|ec", help=KEY_TYPE_HELP)] = None,
    p12: Annotated[str | None, typer.Option("--p12", metavar="PROFILE", help=P12_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (with the password when generated).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help=DRY_RUN_HELP)] = False,
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
    settings = load_settings(ctx)
    if from_file is not None:
        if password_stdin or password_file or san or dry_run:
            raise InputError("--from-file issues each client with its own generated password and no SANs",
                             hint="leave out --password-*, --san and --dry-run, or issue clients one by one")
        try:
            names = client.read_names(io.read_bounded(from_file, f"--from-file {from_file}", limit=16 << 20))
        except OSError as exc:
            raise InputError(f"cannot read --from-file {from_file}: {exc}") from None
        workers = client.batch_workers(jobs)
        batch = client.issue_batch(settings, names, runner(ctx, settings, signs=True), days=days, key_type=key_type, p12=p12,
                                   workers=workers)
        for r in batch.issued:
            if as_json:
                print(json.dumps({"name": r.name, "serial": r.serial, "not_after": r.not_after.isoformat(), "p12": str(r.p12),
                                  "password_file": str(batch.password_files[r.name])}))
            else:
                print(f"Issued {r.name}: serial {r.serial}; bundle {r.p12}; password in {batch.password_files[r.name]}")
        for failed_name, why in batch.failed:
            print(f"FAILED {failed_name}: {why}", file=sys.stderr)
        if batch.failed:
            raise BatchFailed(f"{len(batch.failed)} of {len(names)} client(s) failed", hint="see the FAILED lines above")
        return
    assert name is not None
    password = None if dry_run else io.read_password(password_stdin, password_file)
    req = client.build_request(settings, name, days=days, key_type=key_type, p12=p12, sans=san or [], password=password)
    if dry_run:
        io.print_plan(settings.pki.root, client.plan_issue(settings, req), client.issue_notes(settings.pki, req),
                      as_json=as_json)
        return
    result = client.issue_client(settings, req, runner(ctx, settings, signs=True))
    if as_json:
        data = {
            "name": result.name, "serial": result.serial, "not_after": result.not_after.isoformat(),
            "p12_profile": result.p12_profile, "sans": list(result.sans),
            "files": {"key": str(result.key), "csr": str(result.csr), "crt": str(result.crt), "p12": str(result.p12)},
            "archived": str(settings.pki.path(result.archived)) if result.archived else None,
        }
        if result.password is not None:
            data["password"] = result.password
        io.print_json(data)
        return
    print(f"Issued {result.name}: serial {result.serial}, valid until {result.not_after:%Y-%m-%d %H:%M} UTC")
    print(f"  key     {result.key}")
    print(f"  cert    {result.crt}")
    print(f"  bundle  {result.p12} ({result.p12_profile} PKCS#12)")
    _print_archived(settings, result)
    if result.password is not None:
        print(f"Export password: {result.password}")
    print("Transfer the .p12 file securely to the client device.")


@app.command("add-server", rich_help_panel=PANEL_CERTIFICATES)
def add_server(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Server name: becomes CN=NAME and certs/NAME.crt, private/NAME.key.")],
    san: Annotated[list[str] | None, typer.Option(
        "--san", metavar="DNS:NAME|IP:ADDR", help="Subject alternative name; repeatable (default: DNS:NAME).")] = None,
    days: Annotated[int | None, typer.Option("--days", metavar="N", help=DAYS_HELP)] = None,
    key_type: Annotated[str | None, typer.Option("--key-type", metavar="rsa|ec", help=KEY_TYPE_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help=DRY_RUN_HELP)] = False,
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

    settings = load_settings(ctx)
    req = client.server_request(settings, name, sans=san or [], days=days, key_type=key_type)
    if dry_run:
        io.print_plan(settings.pki.root, client.plan_issue(settings, req), client.issue_notes(settings.pki, req),
                      as_json=as_json)
        return
    result = client.issue_client(settings, req, runner(ctx, settings, signs=True))
    from mtlsctl.nginx import served_certificate, server_files

    chosen = server_files(settings.pki, settings.profile.nginx)
    served = served_certificate(settings.pki, chosen.cert)
    fullchain = settings.pki.path(settings.pki.client(result.name).fullchain)
    if as_json:
        io.print_json({"name": result.name, "serial": result.serial, "not_after": result.not_after.isoformat(),
                       "sans": list(result.sans), "files": {"key": str(result.key), "csr": str(result.csr), "crt": str(result.crt),
                                                            "fullchain": str(fullchain)},
                       "archived": str(settings.pki.path(result.archived)) if result.archived else None,
                       "nginx_render": {"ssl_certificate": served, "ssl_certificate_key": chosen.key, "source": chosen.source,
                                        "uses_this_certificate": chosen.name == result.name, "why": chosen.why}})
        return
    print(f"Issued server certificate {result.name}: serial {result.serial}, valid until {result.not_after:%Y-%m-%d %H:%M} UTC")
    print(f"  SANs   {', '.join(result.sans)}")
    print(f"  cert   {result.crt}")
    print(f"  chain  {fullchain}   (the certificate + issuing CA: ssl_certificate)")
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


@app.command(rich_help_panel=PANEL_CERTIFICATES)
def export(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="An issued client's name.")],
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the export password from standard input.")] = False,
    password_file: Annotated[Path | None, typer.Option(
        "--password-file", metavar="FILE", help="Read the export password from FILE.")] = None,
    p12: Annotated[str | None, typer.Option("--p12", metavar="PROFILE", help=P12_HELP)] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", metavar="FILE", help="Write the bundle here instead of certs/NAME.p12 (certs/NAME.mobileconfig).")] = None,
    fmt: Annotated[str | None, typer.Option(
        "--format", metavar="p12|mobileconfig",
        help="p12 (default): a PKCS#12 bundle; mobileconfig: the bundle (compat) in an Apple configuration profile "
             "for iOS, iPadOS and macOS.")] = None,
    with_ca: Annotated[bool, typer.Option(
        "--with-ca", help="mobileconfig: also install the trust anchor (ca/ca.crt; in a two-tier PKI the root, "
                          "ca/root.crt) as a root certificate, so Safari trusts a site this CA issued.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing bundle.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (with the password when generated).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help=DRY_RUN_HELP)] = False,
) -> None:
    """Write a fresh PKCS#12 bundle for an issued client (new password, same key and certificate).

    \b
    Refuses a certificate that is revoked or expired (certs/NAME.crt's own row in index.txt decides):
    issue a new one with add-client, or `mtlsctl replace NAME` while it is still valid.
    A bundle written to certs/NAME.p12 keeps private/NAME.p12.password true: rewritten (0600) with a
    generated password, removed when you give the password; --out leaves both alone.

    With --format mobileconfig the bundle goes into an Apple configuration profile, written to
    certs/NAME.mobileconfig (0600). The bundle's password is NOT in the profile: the device asks for it
    while installing, so give it to the person separately. Payload identifiers stay the same on every
    export (PREFIX.NAME, profile mobileconfig.identifier_prefix), so a new profile replaces the old one on
    the device. The profile is signed with openssl smime when the site profile names
    mobileconfig.signer_cert and signer_key; unsigned otherwise, and iOS then shows it as "Not Verified".

    \b
    Examples:
      mtlsctl export iphone-jmrp --force                 # replace certs/iphone-jmrp.p12
      mtlsctl export iphone-jmrp --p12 modern --out /tmp/iphone.p12 --password-file pw.txt
      mtlsctl export iphone-jmrp --format mobileconfig --with-ca   # certs/iphone-jmrp.mobileconfig
    """
    from mtlsctl import client, validate

    settings = load_settings(ctx)
    validate.client_name(name)
    if dry_run:
        commands, notes = client.plan_export(settings, name, p12=p12, out=out, fmt=fmt, with_ca=with_ca)
        io.print_plan(settings.pki.root, commands, notes, as_json=as_json)
        return
    password = io.read_password(password_stdin, password_file)
    result = client.export_client(settings, name, p12=p12, password=password, out=out, force=force, runner=runner(),
                                  fmt=fmt, with_ca=with_ca)
    if as_json:
        data: dict[str, Any] = {
            "name": result.name, "serial": result.serial, "p12": str(result.p12), "p12_profile": result.p12_profile,
            "format": result.format, "file": str(result.p12),
            "password_file": str(result.password_file) if result.password_file else None,
            "removed_password_file": str(result.removed_password_file) if result.removed_password_file else None}
        if result.format == "mobileconfig":
            data.update({"signed": result.signed, "ca": result.ca})
        if result.password is not None:
            data["password"] = result.password
        io.print_json(data)
        return
    if result.format == "mobileconfig":
        print(f"Exported {result.name} (serial {result.serial}) to {result.p12}: a configuration profile with a "
              f"{result.p12_profile} PKCS#12 bundle" + (f" and {result.ca} as a root certificate" if result.ca else ""))
        print("  signed with mobileconfig.signer_cert" if result.signed else
              "  unsigned: iOS shows it as Not Verified (set mobileconfig.signer_cert and signer_key to sign it)")
        print("  the password is not in the profile: the device asks for it while installing")
    else:
        print(f"Exported {result.name} (serial {result.serial}) to {result.p12} ({result.p12_profile} PKCS#12)")
    if result.password is not None:
        print(f"Export password: {result.password}")
    if result.password_file:
        print(f"  the new password is also in {result.password_file} (0600; it replaces the old one)")
    if result.removed_password_file:
        print(f"  removed {result.removed_password_file}: it held the previous bundle's password")


@app.command(rich_help_panel=PANEL_CERTIFICATES)
def replace(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The name whose device is lost, stolen or broken (client or server).")],
    reason: Annotated[str, typer.Option(
        "--reason", metavar="REASON",
        help="Why the old certificate is revoked (default keyCompromise: a lost device's key is "
             "presumed in other hands); any reason revoke takes, case-insensitive.")] = "keyCompromise",
    days: Annotated[int | None, typer.Option(
        "--days", metavar="N", help="Validity of the new certificate (default: profile clients.days, 365).")] = None,
    key_type: Annotated[str | None, typer.Option(
        "--key-type", metavar="rsa|ec", help="Key type (default: the old certificate's).")] = None,
    p12: Annotated[str | None, typer.Option("--p12", metavar="PROFILE", help=P12_HELP)] = None,
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="Read the new bundle's password from standard input.")] = False,
    password_file: Annotated[Path | None, typer.Option(
        "--password-file", metavar="FILE", help="Read the new bundle's password from FILE.")] = None,
    no_reload: Annotated[bool, typer.Option("--no-reload", help=NO_RELOAD_HELP)] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (with the password when generated).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the moves and openssl commands and change nothing.")] = False,
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
    from mtlsctl.after_change import after_crl_change

    why = lifecycle.reason(reason)
    validate.client_name(name)
    settings = load_settings(ctx)
    password = None if dry_run else io.read_password(password_stdin, password_file)
    req = lifecycle.replace_request(settings, name, days=days, key_type=key_type, p12=p12, password=password)
    if dry_run:
        notes, commands = lifecycle.plan_replace(settings, req, why)
        if not no_reload:
            notes.append("then the profile's nginx test and reload commands (nginx reads the CRL only at reload)")
        io.print_plan(settings.pki.root, commands, notes, as_json=as_json)
        return
    result = lifecycle.replace(settings, req, why, runner(ctx, settings, signs=True))
    issued = result.issued
    after = after_crl_change(settings, "replace", changed=result.changed, reload=not no_reload,
                             prime=name if result.revoked else None, runner=runner())
    io.tell(after)
    if as_json:
        data: dict[str, Any] = {
            "name": issued.name, "kind": result.kind, "serial": issued.serial, "not_after": issued.not_after.isoformat(),
            "p12_profile": issued.p12_profile, "sans": list(issued.sans),
            "files": {"key": str(issued.key), "csr": str(issued.csr), "crt": str(issued.crt),
                      "p12": str(issued.p12) if issued.p12 else None},
            "archived": str(settings.pki.path(issued.archived)) if issued.archived else None,
            "old_serials": result.old, "revoked": result.revoked, "reason": why, "crl": io.crl_json(result.crl),
            **after.to_json(), "problems": result.problems, "todo": result.todo,
        }
        if issued.password is not None:
            data["password"] = issued.password
        io.print_json(data)
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
            print(f"CRL regenerated: {io.crl_line(result.crl)}")
        if issued.password is not None:
            print(f"Export password: {issued.password}")
    if result.problems:
        done = f"the new certificate for {name} is issued (serial {issued.serial})"
        if result.revoked:
            done += f" and serial {', '.join(result.revoked)} revoked"
        extra = f"; also: {after.reload_error}" if after.reload_error else ""
        raise ReplaceIncomplete(f"{done}, but: " + "; ".join(result.problems) + extra,
                                hint="finish with: " + " && ".join(result.todo))
    io.finish(after, as_json)


@app.command("sign-csr", rich_help_panel=PANEL_CERTIFICATES)
def sign_csr(
    ctx: typer.Context,
    csr_file: Annotated[Path, typer.Argument(metavar="FILE", help="The CSR, made on the device (PEM or DER).")],
    name: Annotated[str, typer.Option("--name", metavar="NAME", help="Client name; the CSR's subject must be exactly CN=NAME.")],
    days: Annotated[int | None, typer.Option("--days", metavar="N", help=DAYS_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Check the CSR, print the openssl command and its configuration, change nothing.")] = False,
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
    from mtlsctl import client, csr

    settings = load_settings(ctx)
    if dry_run:
        review, commands, config = csr.plan_sign_csr(settings, csr_file, name, days)
        notes = [f"{csr_file}: CN={name}, {review.key.describe()}, SANs: {', '.join(review.sans) or 'none'}"]
        notes += client.retire_notes(settings.pki, name)  # a revoked name's old files move to archive/ first
        if review.not_copied:
            notes.append(f"not copied from the request: {', '.join(review.not_copied)}")
        notes.append("private/.sign-XXXXXX/request.csr = the reviewed request; sign.cnf =")
        notes += [f"  {line}" for line in config.splitlines()]
        io.print_plan(settings.pki.root, commands, notes, as_json=as_json)
        return
    result = csr.sign_csr(settings, csr_file, name, days, runner(ctx, settings, signs=True))
    if as_json:
        io.print_json({"name": result.name, "serial": result.serial, "not_after": result.not_after.isoformat(),
                       "sans": result.sans, "not_copied": result.not_copied,
                       "files": {"csr": str(result.csr), "crt": str(result.crt)}})
        return
    print(f"Signed {result.name}: serial {result.serial}, valid until {result.not_after:%Y-%m-%d %H:%M} UTC")
    if result.sans:
        print(f"  SANs  {', '.join(result.sans)}")
    if result.not_copied:
        print(f"  not copied from the request: {', '.join(result.not_copied)}")
    print(f"  cert  {result.crt}  (send it to the device; its key never left it)")


@app.command("list", rich_help_panel=PANEL_CERTIFICATES)
def list_(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(
        "--status", metavar="STATUS", help="Only valid, expiring (within renew.within_days), expired or revoked.")] = None,
    expiring_within: Annotated[int | None, typer.Option(
        "--expiring-within", metavar="DAYS", help="Only valid certificates expiring within DAYS.")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print a JSON array (name, serial, status, not_after, days_left, revoked_at, "
                       "reason, subject as nginx shows it (RFC 2253: CN=x,O=y), files).")] = False,
    as_jsonl: Annotated[bool, typer.Option(
        "--jsonl", help="Print one JSON object per certificate per line (the --json array's elements), streamed "
                        "as index.txt is read (flushed every 256); nothing else goes to stdout (no CA or CRL line).")] = False,
    no_files: Annotated[bool, typer.Option(
        "--no-files", help="Read index.txt alone: do not look for each name's key, CSR, certificate and bundle "
                           "(files is null in JSON). Twice as fast on a fleet of 100,000 (docs/performance.md).")] = False,
) -> None:
    """List every certificate in index.txt (read directly: no openssl run per certificate).

    The database is read as a stream, twice (first checked whole, then printed), never held in memory:
    --jsonl --no-files suits inventories of 100,000 devices (one object per line for jq, grep or a log
    shipper). A damaged index.txt is refused before anything is printed.

    DETAIL shows a revoked certificate's date and reason; for the others, the files of the name's newest
    certificate that exist (key csr crt p12; crt only when certs/NAME.crt is that certificate), "-" when
    none, and nothing with --no-files. DAYS counts to notAfter, for a revoked certificate too.

    \b
    Examples:
      mtlsctl list
      mtlsctl list --expiring-within 30
      mtlsctl list --status revoked --json | jq -r '.[].name'
      mtlsctl list --jsonl | jq -r 'select(.status == "expiring") | .name'
      mtlsctl list --jsonl --no-files | wc -l
    """
    from mtlsctl import crl as crl_mod
    from mtlsctl import lifecycle

    if as_json and as_jsonl:
        raise InputError("--json and --jsonl are two forms of the same list", hint="give one of them")
    if expiring_within is not None:
        from mtlsctl import validate

        validate.days(expiring_within, what="--expiring-within", maximum=36500)
    settings = load_settings(ctx)
    with reading(settings):  # the two passes over index.txt see the same file: writers wait
        entries = lifecycle.inventory(settings, status=status, expiring_within=expiring_within, with_files=not no_files)
        if as_json or as_jsonl:
            _print_entries_json(entries, lines=as_jsonl, files=not no_files)
            return
        if not entries.count:
            print("no certificates" + (" match" if status or expiring_within else " yet: mtlsctl add-client NAME"))
        else:
            width = max(4, entries.name_width)
            print(f"{'NAME':<{width}}  {'SERIAL':<6}  {'STATUS':<8}  {'NOT AFTER (UTC)':<16}  {'DAYS':>5}  DETAIL")
            for e in entries:
                if e.status == "revoked":
                    detail = f"revoked {e.revoked_at:%Y-%m-%d} ({e.reason})"
                else:
                    detail = " ".join(Path(f).suffix.lstrip(".") for f in e.files) or ("-" if not no_files else "")
                print(f"{e.name:<{width}}  {e.serial:<6}  {e.status:<8}  {e.not_after:%Y-%m-%d %H:%M}  {e.days_left:>5}  {detail}")
    run = runner()
    ca_end = lifecycle.ca_not_after(settings.pki, run)
    from datetime import datetime, timezone

    info = crl_mod.read_crl_info(settings.pki, run)
    print(f"CA: expires {ca_end:%Y-%m-%d} ({lifecycle.days_left(ca_end, datetime.now(timezone.utc))} days)")
    print("CRL: " + (io.crl_line(info) if info else "MISSING: run `mtlsctl crl`"))


def _entry_values(e: CertEntry) -> tuple[str, ...]:
    """The JSON values of one entry but its files, in to_json's order (strings through json's own encoder)."""
    return (_json_str(e.name), _json_str(e.serial), _json_str(e.status), _json_str(e.not_after.isoformat()),
            repr(e.days_left), _json_str(e.revoked_at.isoformat()) if e.revoked_at else "null",
            _json_str(e.reason) if e.reason is not None else "null", _json_str(e.subject))


_KEYS = ("name", "serial", "status", "not_after", "days_left", "revoked_at", "reason", "subject", "files")


def _entry_line(e: CertEntry, files: bool = True) -> str:
    """json.dumps(e.to_json()) written out (files null when they were not checked): 100,000 a run."""
    listed = ("[" + ", ".join(map(_json_str, e.files)) + "]") if files else "null"
    return "{" + ", ".join(f'"{k}": {v}' for k, v in zip(_KEYS, (*_entry_values(e), listed), strict=True)) + "}"


def _entry_element(e: CertEntry, files: bool = True) -> str:
    """The entry as json.dumps(list, indent=2) prints an element of the list (tests/test_scale.py compares them)."""
    listed = (("[\n" + ",\n".join("      " + _json_str(f) for f in e.files) + "\n    ]") if e.files else "[]") if files else "null"
    return "  {\n" + ",\n".join(f'    "{k}": {v}' for k, v in zip(_KEYS, (*_entry_values(e), listed), strict=True)) + "\n  }"


_BATCH = 256  # entries per write: streamed, without a system call per entry


def _print_entries_json(entries: Iterable[CertEntry], *, lines: bool, files: bool = True) -> None:
    """Each entry as it comes: one compact object per line (`lines`), else the elements of one JSON array,
    byte for byte what io.print_json(list) prints (indent 2), without building the list first. Written and
    flushed a batch of entries at a time. A reader that stops early (`| head`) ends the output quietly."""
    from itertools import islice

    render, between = (_entry_line, "\n") if lines else (_entry_element, ",\n")
    out = sys.stdout
    entries = iter(entries)
    try:
        first = True
        while batch := list(islice(entries, _BATCH)):
            text = between.join(render(e, files) for e in batch)
            # lines: each batch ends its last line; an array: elements joined across batches, "[" before the first
            out.write(text + "\n" if lines else ("[\n" if first else between) + text)
            out.flush()
            first = False
        if not lines:
            out.write("[]\n" if first else "\n]\n")
            out.flush()
    except BrokenPipeError:
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())  # nothing more can reach the reader; no error at exit


@app.command(rich_help_panel=PANEL_CERTIFICATES)
def verify(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Client name (checks certs/NAME.crt).")],
    server: Annotated[bool, typer.Option("--server", help="Check NAME as a server certificate (add-server) instead.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print name, ok, verdict, message, openssl_output.")] = False,
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

    settings = load_settings(ctx)
    with reading(settings):
        result = lifecycle.verify(settings, name, runner(), purpose="server" if server else "client")
    if as_json:
        io.print_json({"name": result.name, "ok": result.ok, "verdict": result.verdict, "message": result.message,
                       "openssl_output": result.openssl_output})
    else:
        print(f"{result.name}: {result.message}")
    if not result.ok:
        raise typer.Exit(1)


@app.command(rich_help_panel=PANEL_CERTIFICATES)
def renew(
    ctx: typer.Context,
    within: Annotated[int | None, typer.Option(
        "--within", metavar="DAYS", help="Renew what expires within DAYS (default: renew.within_days, 30).")] = None,
    days: Annotated[int | None, typer.Option(
        "--days", metavar="N", help="Validity of the new certificates (default: renew.days, 365).")] = None,
    show_passwords: Annotated[bool, typer.Option(
        "--show-passwords", help="Print the new PKCS#12 passwords (default: only the 0600 files that hold them).")] = False,
    no_reload: Annotated[bool, typer.Option("--no-reload", help=NO_RELOAD_HELP)] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print renewed, failed, crl and reloaded as JSON.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be renewed and change nothing.")] = False,
) -> None:
    """Renew expiring certificates, each as what it is (client, server, OCSP signer), and keep the CRL fresh.

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
    from mtlsctl.after_change import after_crl_change

    settings = load_settings(ctx)
    report = lifecycle.renew(settings, within_days=within, days=days, runner=runner(ctx, settings, signs=not dry_run),
                             dry_run=dry_run)
    if dry_run:
        from datetime import datetime, timezone

        now = datetime.now(timezone.utc)
        plan = lifecycle.renew_plan(settings, report, days or settings.facts.renew_days, now)
        notes = [f"{len(report.due)} certificate(s) due; each old certificate is first copied to certs/NAME.crt.old.DATE, "
                 "a server's certs/NAME.fullchain.pem is rewritten, a client's new password goes to "
                 "private/NAME.p12.password (0600)"] + [what for what, _ in plan]
        if report.crl_regenerated and not no_reload:
            notes.append(io.RELOAD_NOTE)
        io.print_plan(settings.pki.root, [cmd for _, commands in plan for cmd in commands], notes, as_json=as_json)
        return
    after = after_crl_change(settings, "renew", changed=report.changed, reload=not no_reload)
    io.tell(after)
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
        io.print_json({"renewed": renewed, "superseded_revoked": report.superseded,
                       "failed": [{"name": f.name, "serial": f.serial, "error": f.error} for f in report.failed],
                       "crl": {"regenerated": report.crl_regenerated, **(io.crl_json(report.crl) or {})},
                       **after.to_json()})
    else:
        if not report.due:
            print(f"Nothing to renew: no valid certificate expires within {within or settings.facts.renew_within_days} days.")
        for r in report.renewed:
            print(f"Renewed {r.name}: serial {r.old_serial} -> {r.new_serial}, valid until {r.not_after:%Y-%m-%d %H:%M} UTC; "
                  f"old certificate archived as {r.archived}")
            if r.p12 and r.password_file:
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
            print(("CRL regenerated: " if report.crl_regenerated else "CRL current: ") + io.crl_line(report.crl))
    io.finish(after, as_json)
    if report.failed:
        raise RenewFailed(f"{len(report.failed)} certificate(s) failed to renew", hint="see the FAILED lines above")
