"""nginx: nginx render, nginx check, nginx reload; demo (the guide end to end with a real nginx)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from mtlsctl.cli import io
from mtlsctl.cli.app import PANEL_NGINX, app
from mtlsctl.cli.context import load_settings, runner
from mtlsctl.errors import DemoFailed

DEMO_DIR = Path("mtls-demo")


@app.command(rich_help_panel=PANEL_NGINX)
def demo(
    directory: Annotated[Path, typer.Option(
        "--dir", metavar="DIR", help="Where to build the demo PKI (default ./mtls-demo).")] = DEMO_DIR,
    port: Annotated[int | None, typer.Option("--port", metavar="N", help="nginx port on 127.0.0.1 (default: a free one).")] = None,
    keep: Annotated[bool, typer.Option("--keep", help="Leave nginx and the echo backend running.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcomes as JSON.")] = False,
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
    from mtlsctl.demo import check_port, run_demo

    report = run_demo(directory, check_port(port), keep, runner())
    if as_json:
        io.print_json({"pki_dir": str(report.pki_dir), "port": report.port, "nginx_ran": report.nginx_ran, "ok": report.ok,
                       "cases": [{"case": c.label, "expected": c.expected, "status": c.status, "command": c.command}
                                 for c in report.cases]})
    else:
        print(f"Demo PKI in {report.pki_dir}" + (f" (created: {', '.join(report.created)})" if report.created else " (reused)"))
        if not report.nginx_ran:
            print("nginx is not installed, so the checks did not run. Install it (Debian: apt-get install nginx) "
                  "and run `mtlsctl demo` again.")
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
        io.info(f"note: {note}")
    if report.nginx_ran and not report.ok:
        raise DemoFailed("the demo's outcomes differ from the guide's",
                         hint=report.notes[0] if report.notes else f"see {report.pki_dir}/nginx/logs/")


nginx_app = typer.Typer(help="Render the mTLS site for nginx, test it, and reload safely.", no_args_is_help=True)
app.add_typer(nginx_app, name="nginx", rich_help_panel=PANEL_NGINX)


@nginx_app.command("render")
def nginx_render(
    ctx: typer.Context,
    out: Annotated[Path | None, typer.Option(
        "--out", metavar="FILE", help="Write here atomically (e.g. /etc/nginx/conf.d/mtls.conf); default: stdout.")] = None,
    verify_client: Annotated[str | None, typer.Option(
        "--verify-client", metavar="on|optional", help="Override nginx.verify_client.")] = None,
    rate_limit: Annotated[str | None, typer.Option(
        "--rate-limit", metavar="RATE", help="Rate limit for unverified clients, e.g. 5r/s (overrides nginx.rate_limit).")] = None,
    burst: Annotated[int | None, typer.Option("--burst", metavar="N", help="Burst for --rate-limit (default 10).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Write the site even when a file it names is missing (each is still reported).")] = False,
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
    from mtlsctl import nginx

    limit = nginx.render_options(verify_client=verify_client, rate_limit=rate_limit, burst=burst, out=out)
    settings = load_settings(ctx)
    text, warnings = nginx.render_for(settings, verify_client=verify_client, rate_limit=limit, force=force)
    for w in warnings:
        io.info(f"warning: {w}")
    if out is None:
        sys.stdout.write(text)
        return
    nginx.write_site(out, text)
    io.info(f"wrote {out}; next: mtlsctl nginx reload")


@nginx_app.command("check")
def nginx_check(ctx: typer.Context) -> None:
    """Run the profile's nginx.test_command (nginx -t); exit 1 with nginx's message if it fails.

    \b
    Example:
      mtlsctl nginx check
    """
    from mtlsctl.nginx import check

    settings = load_settings(ctx)
    print(check(settings.profile.nginx))


@nginx_app.command("reload")
def nginx_reload(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print reloaded and detail as JSON.")] = False,
) -> None:
    """Test, reload, then confirm nginx started new workers (a failed reload keeps the old CRL silently).

    \b
    Uses nginx.test_command, nginx.reload_command and nginx.pid_file from the profile.

    \b
    Example:
      mtlsctl nginx reload
    """
    from mtlsctl.after_change import clear_pending_reload
    from mtlsctl.nginx import reload

    settings = load_settings(ctx)
    outcome = reload(settings.profile.nginx)
    if outcome.reloaded:
        clear_pending_reload(settings)  # nginx now reads the current CRL
    if as_json:
        io.print_json({"reloaded": outcome.reloaded, "detail": outcome.detail})
    else:
        print(outcome.detail)
