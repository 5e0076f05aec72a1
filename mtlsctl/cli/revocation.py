"""Revocation: revoke, crl. Both end like every writer of the CRL: publish, nginx test and reload (after_change)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtlsctl.cli import io
from mtlsctl.cli.app import DRY_RUN_HELP, JSON_HELP, NO_RELOAD_HELP, PANEL_REVOCATION, app
from mtlsctl.cli.context import load_settings, runner
from mtlsctl.errors import InputError


@app.command(rich_help_panel=PANEL_REVOCATION)
def revoke(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Client name: revokes its valid certificate(s).")] = None,
    serial: Annotated[str | None, typer.Option("--serial", metavar="HEX", help="Revoke this serial instead of a name.")] = None,
    reason: Annotated[str, typer.Option(
        "--reason", metavar="REASON",
        help="unspecified, keyCompromise, CACompromise, affiliationChanged, superseded, "
             "cessationOfOperation or certificateHold.")] = "unspecified",
    no_reload: Annotated[bool, typer.Option("--no-reload", help=NO_RELOAD_HELP)] = False,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help=DRY_RUN_HELP)] = False,
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
    from mtlsctl import lifecycle, validate
    from mtlsctl.after_change import after_crl_change

    if (name is None) == (serial is None):
        raise InputError("give a NAME or --serial HEX (not both)", hint="see `mtlsctl list` for names and serials")
    why = lifecycle.reason(reason)
    serial_hex = lifecycle.serial(serial) if serial is not None else None
    if name is not None:
        validate.client_name(name)
    settings = load_settings(ctx)
    if dry_run:
        commands, notes = lifecycle.plan_revoke(settings, name=name, serial_hex=serial_hex, why=why)
        if commands and not no_reload:
            notes = [*notes, io.RELOAD_NOTE]
        io.print_plan(settings.pki.root, commands, notes, as_json=as_json)
        return
    result = lifecycle.revoke(settings, name=name, serial_hex=serial_hex, why=why, runner=runner(ctx, settings, signs=True))
    after = after_crl_change(settings, "revoke", changed=result.changed, reload=not no_reload,
                             prime=name if result.revoked and name is not None else None, runner=runner())
    io.tell(after)
    if as_json:
        io.print_json({"revoked": result.revoked, "already_revoked": result.already, "expired": result.expired,
                       "reason": why, "crl": io.crl_json(result.crl), **after.to_json()})
    else:
        who = name or f"serial {serial_hex}"
        if result.revoked:
            print(f"Revoked {who}: serial {', '.join(result.revoked)} ({why})")
            print(f"CRL regenerated: {io.crl_line(result.crl)}" if result.crl is not None else "CRL regenerated")
        if result.already:
            print(f"Already revoked: serial {', '.join(result.already)}")
        if result.expired and not result.revoked:
            print(f"Expired, nothing to revoke: serial {', '.join(result.expired)}")
    io.finish(after, as_json)


@app.command(rich_help_panel=PANEL_REVOCATION)
def crl(
    ctx: typer.Context,
    if_due: Annotated[bool, typer.Option(
        "--if-due", help="Only when nextUpdate is within crl.refresh_within_days (for timers).")] = False,
    root: Annotated[bool, typer.Option(
        "--root", help="Regenerate the root's CRL instead (two-tier PKI; needs the root key).")] = False,
    root_key: Annotated[Path | None, typer.Option("--root-key", metavar="FILE", help="The root key, once exported offline.")] = None,
    no_reload: Annotated[bool, typer.Option("--no-reload", help=NO_RELOAD_HELP)] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print this_update, next_update, crl_number, revoked count.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help=DRY_RUN_HELP)] = False,
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
    from mtlsctl.after_change import after_crl_change

    settings = load_settings(ctx)
    root_key_path = str(root_key.absolute()) if root_key else None
    if dry_run:
        now = datetime.now(timezone.utc)
        if root or root_key is not None:
            commands, notes = crl_mod.plan_root_crl(settings.pki, settings.profile, root_key_path, now)
        else:
            commands, notes = crl_mod.plan_crl(settings.pki, settings.profile, if_due=if_due, now=now)
        if commands and not no_reload:
            notes = [*notes, io.RELOAD_NOTE]
        io.print_plan(settings.pki.root, commands, notes, as_json=as_json)
        return
    if root or root_key is not None:
        info = crl_mod.refresh_root_crl(settings.pki, settings.profile, runner(ctx, settings, signs=True), root_key_path)
        after = after_crl_change(settings, "crl", changed=True, reload=not no_reload)
        io.tell(after)
        if as_json:
            io.print_json({"regenerated": True, "root": True, **info.to_json(), **after.to_json()})
        else:
            print(f"Root CRL regenerated: {io.crl_line(info)}; crl/chain.crl rebuilt")
        io.finish(after, as_json)
        return
    result = crl_mod.refresh_crl(settings.pki, settings.profile, runner(ctx, settings, signs=True), if_due=if_due)
    after = after_crl_change(settings, "crl", changed=result.changed, reload=not no_reload)
    io.tell(after)
    if as_json:
        io.print_json({"regenerated": result.regenerated, **result.info.to_json(), **after.to_json()})
    elif result.regenerated:
        print(f"CRL regenerated: {io.crl_line(result.info)}")
    else:
        print(f"CRL not due: {io.crl_line(result.info)}")
    io.finish(after, as_json)
