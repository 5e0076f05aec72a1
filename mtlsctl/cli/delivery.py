"""Certificates: deliver (a client's bundle to a device, once, over a one-time HTTPS link and a QR code)."""

from __future__ import annotations

import json
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mtlsctl.cli import io
from mtlsctl.cli.app import PANEL_CERTIFICATES, app
from mtlsctl.cli.context import load_settings, runner

if TYPE_CHECKING:
    from mtlsctl.deliver import Ready


@app.command(rich_help_panel=PANEL_CERTIFICATES)
def deliver(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="An issued client's name (its certs/NAME.p12 is served).")],
    bind: Annotated[str | None, typer.Option(
        "--bind", metavar="ADDR",
        help="IP address to listen on: this host's address on the device's network. No default (or profile "
             "deliver.bind); 0.0.0.0 and :: (every interface) only when typed here; not ::ffff:a.b.c.d (give a.b.c.d).")] = None,
    port: Annotated[int | None, typer.Option(
        "--port", metavar="N", help="TCP port (default: profile deliver.port, 8443).")] = None,
    valid_for: Annotated[str | None, typer.Option(
        "--for", metavar="DURATION",
        help="How long the link waits for its one download: 90s, 10m, 1h (10s..24h; default: deliver.valid_for, 10m).")] = None,
    fmt: Annotated[str | None, typer.Option(
        "--format", metavar="p12|mobileconfig",
        help="p12 (default): the bundle itself; mobileconfig: the bundle in an Apple configuration profile "
             "(signed when the profile names mobileconfig.signer_cert).")] = None,
    with_ca: Annotated[bool, typer.Option(
        "--with-ca", help="mobileconfig: also install the trust anchor (ca/ca.crt; in a two-tier PKI the root, ca/root.crt).")] = False,
    cert: Annotated[Path | None, typer.Option(
        "--cert", metavar="FILE",
        help="TLS certificate (chain, PEM) the server presents (default: the nginx site's: nginx.server_cert, or "
             "the PKI's server certificate with its chain). Never a CA certificate.")] = None,
    key: Annotated[Path | None, typer.Option(
        "--key", metavar="FILE", help="Its private key (PEM, unencrypted). Never the CA's (private/ca.key, root.key).")] = None,
    host: Annotated[str | None, typer.Option(
        "--host", metavar="HOST",
        help="Host name put in the URL: one the certificate names and the device resolves to ADDR (default: ADDR).")] = None,
    password_file: Annotated[Path | None, typer.Option(
        "--password-file", metavar="FILE",
        help="The bundle's password, to show and to check it opens the bundle (default: private/NAME.p12.password).")] = None,
    no_qr: Annotated[bool, typer.Option("--no-qr", help="Do not draw the QR code of the link.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print JSON lines: first {event: ready, url, password, expires_at, ...}, then the result "
                       "{sent, sent_to, withdrawn, expired, ...}.")] = False,
) -> None:
    """Hand a client's bundle to a device once: a one-time HTTPS link, shown as a URL and a QR code.

    Starts a small HTTPS server on the address you name, with a certificate the device already trusts (the
    site's), and serves certs/NAME.p12 (or a .mobileconfig made from it) at an unguessable path (256 random
    bits). The link works once: once the whole bundle has been sent (every byte written and the connection
    closed; whether the device kept it only the device knows: a lost one needs a new deliver), or when --for
    runs out, it answers 410 and the server stops. Exit 0 when the bundle was sent (to whom and when are
    shown), 1 when the link expired unused or was withdrawn, 130 on Ctrl-C.

    Before sending, the GET re-checks the PKI: if the certificate was revoked, renewed, replaced or expired
    while the link waited (or certs/NAME.p12 changed), it gets 410, nothing is sent, and the command exits 1.

    There is no default address: give --bind (or the profile's deliver.bind), the address the device
    reaches this host on. 0.0.0.0 or :: (every interface, the Internet too on a public host) is accepted
    only when typed as --bind, never from the profile.

    The password is never in the link or the QR code: it is shown here, for the person to type on the
    device (from private/NAME.p12.password, or --password-file). Refused before anything listens: a revoked
    or expired certificate, a bundle that does not open with the password or holds an older certificate,
    a server certificate that is missing or expired, a CA certificate or CA key as the server's. Nothing in
    the PKI is locked while the link waits.
    Server log lines (stderr) show the path as /<token>.

    \b
    Examples:
      mtlsctl deliver iphone-jmrp --bind 192.168.1.20
      mtlsctl deliver iphone-jmrp --bind 192.168.1.20 --port 9443 --for 5m --format mobileconfig --with-ca
      mtlsctl deliver laptop --bind 10.0.0.5 --host ca.example.lan --password-file pw.txt --no-qr
    """
    from mtlsctl import deliver as core

    settings = load_settings(ctx)
    password = io.read_password(False, password_file)
    opts = core.options(settings, name, bind=bind, port=port, valid_for=valid_for, fmt=fmt, cert=cert, key=key,
                        host=host, password=password, with_ca=with_ca)

    def announce(ready: Ready) -> None:
        for warning in ready.warnings:
            io.info(f"warning: {warning}")
        if as_json:
            print(json.dumps(ready.to_json()), flush=True)
            return
        print(f"Open this link on the device, once, before {ready.expires_at:%H:%M:%S} UTC ({ready.file_name}):\n")
        print(f"  {ready.url}\n")
        if not no_qr:
            core.qr_code(ready.url).terminal(out=sys.stdout, compact=True)
            print()
        print(f"Password to type on the device: {ready.password}   (from {ready.password_source})")
        print("Waiting for the download (Ctrl-C stops the server) ...", flush=True)

    log_lock = threading.Lock()

    def log(line: str) -> None:
        """Called from the request threads at once: each line one write (print writes the newline apart)."""
        with log_lock:
            sys.stderr.write(f"{datetime.now(timezone.utc):%H:%M:%S} {line}\n")
            sys.stderr.flush()

    result = core.deliver(settings, opts, runner(), announce=announce, log=log)
    if as_json:
        print(json.dumps(result.to_json()), flush=True)
    elif result.sent is not None:
        print(f"Sent {result.name}'s bundle (serial {result.serial}) to {result.sent.address} at "
              f"{result.sent.at:%Y-%m-%d %H:%M:%S} UTC ({core.CLOSE_ENDINGS[result.sent.ending]}); the link is used up.")
    if result.withdrawn is not None:
        io.info(f"Nothing was sent: {result.withdrawn}. The link is closed.")
        raise typer.Exit(1)
    if result.sent is None:
        io.info(f"The link expired at {result.expires_at:%H:%M:%S} UTC unused: nothing was sent.")
        raise typer.Exit(1)
