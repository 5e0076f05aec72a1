"""The CA: init, ca-passphrase change, root export-offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtlsctl.cli import io
from mtlsctl.cli.app import DRY_RUN_HELP, JSON_HELP, PANEL_CA, app
from mtlsctl.cli.context import load_settings, run_state


@app.command(rich_help_panel=PANEL_CA)
def init(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option("--dry-run", help=DRY_RUN_HELP)] = False,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
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

    settings = load_settings(ctx)
    if dry_run:
        ca.refuse_existing_ca(settings.pki)
        io.print_plan(
            settings.pki.root, ca.init_commands(settings),
            [f"would create {settings.pki.root}/{{ca,certs,crl,private,newcerts}}, index.txt, index.txt.attr, "
             "serial, crlnumber, openssl.cnf, mtls.yaml", f"profile: {settings.profile_source}"],
            as_json=as_json,
        )
        return
    passphrase = None
    if settings.profile.ca.key_spec.encrypt:
        passphrase = ca.check_new_passphrase(run_state(ctx).ca_passphrase(confirm=True))
    result = ca.create_ca(settings, passphrase, io.TerminalReporter())
    if as_json:
        io.print_json({
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


ca_passphrase_app = typer.Typer(help="The passphrase of an encrypted CA key (profile ca.key.encrypt).", no_args_is_help=True)
app.add_typer(ca_passphrase_app, name="ca-passphrase", rich_help_panel=PANEL_CA)


@ca_passphrase_app.command("change")
def ca_passphrase_change(
    ctx: typer.Context,
    new_passphrase_file: Annotated[Path | None, typer.Option(
        "--new-passphrase-file", metavar="FILE", help="Read the new passphrase from FILE.")] = None,
    new_passphrase_fd: Annotated[int | None, typer.Option(
        "--new-passphrase-fd", metavar="N", help="Read the new passphrase from descriptor N.")] = None,
) -> None:
    """Re-encrypt private/ca.key under a new passphrase (AES-256); also encrypts a key that has none.

    \b
    The current passphrase comes from the global --ca-passphrase-file / --ca-passphrase-fd or the
    terminal; passphrases travel to openssl on pipes, never on argv or in the environment.

    \b
    Example:
      mtlsctl --ca-passphrase-file old.txt ca-passphrase change --new-passphrase-file new.txt
    """
    from mtlsctl import ca
    from mtlsctl.cli.context import runner

    settings = load_settings(ctx)
    settings.pki.require_ca()
    old = None
    if settings.pki.ca_key_encrypted():
        old = run_state(ctx).ca_passphrase()
        ca.require_passphrase_opens(settings.pki, old, current=True)  # before the new one is asked for
    new = io.read_passphrase(new_passphrase_file, new_passphrase_fd, prompt=True, confirm=True, what="New CA key passphrase",
                             option="--new-passphrase-file FILE or --new-passphrase-fd N")
    assert new is not None
    ca.change_passphrase(settings.pki, old, ca.check_new_passphrase(new, what="the new passphrase"), runner())
    print("private/ca.key is now encrypted with the new passphrase")


root_app = typer.Typer(help="The root of a two-tier PKI (profile ca.intermediate).", no_args_is_help=True)
app.add_typer(root_app, name="root", rich_help_panel=PANEL_CA)


@root_app.command("export-offline")
def root_export_offline(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(
        "--out", metavar="FILE", help="Where the root key goes (removable media); never overwritten.")],
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

    settings = load_settings(ctx)
    path = export_root_offline(settings.pki, out)
    print(f"Root key moved to {path} (mode 400) and removed from {settings.pki.path(settings.pki.root_key)}")
    print("Refresh the root CRL before it expires with: mtlsctl crl --root --root-key " + str(path))
