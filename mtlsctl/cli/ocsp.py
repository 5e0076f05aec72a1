"""OCSP: ocsp setup, ocsp serve, ocsp check (a responder for nginx's ssl_ocsp)."""

from __future__ import annotations

from typing import Annotated

import typer

from mtlsctl.cli import io
from mtlsctl.cli.app import PANEL_REVOCATION, app
from mtlsctl.cli.context import load_settings, runner

ocsp_app = typer.Typer(help="OCSP responder for client certificates (nginx ssl_ocsp).", no_args_is_help=True)
app.add_typer(ocsp_app, name="ocsp", rich_help_panel=PANEL_REVOCATION)


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

    settings = load_settings(ctx)
    result = ocsp.setup(settings, runner(ctx, settings, signs=True))
    if result.config_rendered:
        print("openssl.cnf re-rendered: new client certificates carry the OCSP URL")
    print(f"OCSP signer: {'issued, serial ' + result.signer_serial if result.signer_serial else 'already valid'}")


@ocsp_app.command("serve")
def ocsp_serve(
    ctx: typer.Context,
    health_interval: Annotated[float, typer.Option(
        "--health-interval", metavar="SECONDS",
        help="Send one real OCSP request this often; restart a responder that does not answer.")] = 10.0,
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

    settings = load_settings(ctx)
    io.info(f"warning: openssl ocsp binds port {settings.profile.ocsp.port if settings.profile.ocsp else '?'} on EVERY interface; "
            "firewall it so only nginx reaches it")
    ocsp.check_health_interval(health_interval)
    io.info("# " + ocsp.serve_command(settings).display())
    code = ocsp.serve(settings, runner(), health_interval=health_interval, log=lambda m: io.info(f"warning: {m}"))
    if code:
        raise typer.Exit(1)


@ocsp_app.command("check")
def ocsp_check(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Client name (asks about certs/NAME.crt).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print name and status as JSON.")] = False,
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

    settings = load_settings(ctx)
    status, detail = ocsp.check(settings, name, runner())
    if as_json:
        io.print_json({"name": name, "status": status})
    else:
        print(f"{name}: {status}" + (f" ({detail})" if status in ("unreachable", "unverified") else ""))
    if status != "good":
        raise typer.Exit(1)
