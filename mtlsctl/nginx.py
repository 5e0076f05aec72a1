"""nginx: render the mTLS site from nginx/ templates, test the configuration, reload, and confirm.

nginx reads the CRL only at start or reload, and a reload whose new configuration fails (a broken
CRL, say) fails silently: the old workers keep running with the old CRL (FIELD-NOTES). So a reload
here is: test command, reload command, then wait for the master to start new workers; no new
workers means the reload did not take effect, and that is an error.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from mtlsctl import db
from mtlsctl.errors import ExternalCommandError, InputError, MtlsError, StateError
from mtlsctl.pki import ClientFiles, Pki, Settings
from mtlsctl.profile import NginxProfile, OcspProfile, RateLimit, allow_regex, nginx_safe
from mtlsctl.runner import run_argv
from mtlsctl.templates import render_file

FORBIDDEN_403 = "Valid certificate, but not authorized for this resource."


@dataclass(frozen=True)
class ReloadOutcome:
    reloaded: bool
    detail: str  # what happened, in words


# ------------------------------------------------------------------ render


def site_id(server_name: str) -> str:
    """A name for this site's variables, zones and log format (several sites can share http {})."""
    return "mtls_" + (re.sub(r"[^a-z0-9]+", "_", server_name.lower()).strip("_")[:40] or "site")


def _listen_lines(listen: str, http2: bool) -> str:
    params = " ssl http2" if http2 else " ssl"
    if listen.isdigit():
        return f"    listen {listen}{params};\n    listen [::]:{listen}{params};"
    return f"    listen {listen}{params};"


def _allow_entry(entry: str) -> str:
    """One map line: every entry is a case-sensitive regex anchored as a whole (profile.allow_regex says why).

    Quoted whole, with the `~` inside the quotes: in a map, quotes count only at the start of a token, so the
    guide's `~"CN=admin-.*"` is a regex that includes the quote characters (FIELD-NOTES).
    """
    return f'    "~{allow_regex(entry)}" 1;'


def served_certificate(pki: Pki, server_cert: str) -> str:
    """What ssl_certificate serves: for a server certificate of this PKI (certs/NAME.crt), the full chain
    mtlsctl writes beside it (certs/NAME.fullchain.pem: leaf + issuing CA), so that a client trusting only
    the root of a two-tier PKI can build the chain. Any other path is served as given."""
    path = Path(server_cert)
    if path.parent == pki.path("certs") and path.suffix == ".crt":
        chain = path.with_name(path.stem + ".fullchain.pem")
        if chain.is_file():
            return str(chain)
    return server_cert


PLACEHOLDER_CERT = NginxProfile.model_fields["server_cert"].default
PLACEHOLDER_KEY = NginxProfile.model_fields["server_key"].default


@dataclass(frozen=True)
class ServerFiles:
    """What the site's ssl_certificate / ssl_certificate_key name, and why.

    source "profile": nginx.server_cert / server_key as the profile gives them. source "pki": both were left
    at their placeholders (/etc/ssl/...secure.example.com...) and the PKI holds the server certificate to
    serve (`mtlsctl add-server NAME`): certs/NAME.crt (served as its fullchain) and private/NAME.key.
    """

    cert: str
    key: str
    source: str
    name: str | None = None
    why: str = ""  # pki source: which rule picked NAME; profile source: why no PKI certificate was chosen
    candidates: tuple[str, ...] = ()  # the PKI's active server certificates (names)


def active_server_names(pki: Pki) -> list[str]:
    """Names of the PKI's active server certificates (index.txt valid and unexpired, certs/NAME.crt holding that
    serial, EKU serverAuth read from the certificate); none when there is no database."""
    from mtlsctl.x509read import kind_of, read_certificate

    try:
        rows = db.read_index(pki.path(pki.index))
    except (OSError, StateError):
        return []
    names: list[str] = []
    for row in rows:
        if not row.is_active() or not row.cn or row.cn in names:
            continue
        crt = pki.path(ClientFiles(row.cn).crt)
        try:
            nginx_safe(str(pki.path(ClientFiles(row.cn).key)), "path")  # a hand-made CN nginx could not read as a path
            nginx_safe(str(crt), "path")
        except ValueError:
            continue
        if "/" in row.cn or row.cn.startswith(".") or not db.same_certificate(crt, pki.path(db.newcert_path(row.serial))):
            continue
        try:
            if kind_of(read_certificate(crt)) == "server":
                names.append(row.cn)
        except (MtlsError, ValueError):
            continue
    return sorted(names)


def server_files(pki: Pki, nginx: NginxProfile) -> ServerFiles:
    """The certificate and key the rendered site names: the profile's, or, when both are left at their
    placeholders, the PKI's server certificate named like nginx.server_name, or else its only one."""
    if nginx.server_cert != PLACEHOLDER_CERT or nginx.server_key != PLACEHOLDER_KEY:
        return ServerFiles(nginx.server_cert, nginx.server_key, "profile", why="set in the profile")
    names = tuple(active_server_names(pki))
    if nginx.server_name in names:
        name, why = nginx.server_name, "the one named like nginx.server_name"
    elif len(names) == 1:
        name, why = names[0], "the only active server certificate in the PKI"
    else:
        why = ("the PKI has no active server certificate" if not names else
               f"the PKI has {len(names)} active server certificates ({', '.join(names)}) and none is named "
               f"like nginx.server_name ({nginx.server_name})")
        return ServerFiles(nginx.server_cert, nginx.server_key, "profile", why=why, candidates=names)
    files = ClientFiles(name)
    return ServerFiles(str(pki.path(files.crt)), str(pki.path(files.key)), "pki", name=name, why=why, candidates=names)


def render_site(pki: Pki, nginx: NginxProfile, *, verify_client: str | None = None,
                rate_limit: RateLimit | None = None, ocsp: OcspProfile | None = None) -> tuple[str, list[str]]:
    """The site file for the http {} context, and warnings for the admin.

    Pure rendering: it names files but does not check them (`render_checked` does, and refuses a PKI
    without a CA)."""
    verify = verify_client or nginx.verify_client
    if verify not in ("on", "optional"):
        raise InputError(f"--verify-client {verify!r} is not allowed",
                         hint="use on or optional (optional_no_ca admits self-signed certificates)")
    for rel in (pki.ca_bundle, pki.crl_bundle):
        try:
            nginx_safe(str(pki.path(rel)), "path")
        except ValueError as exc:
            raise InputError(f"the PKI path {pki.root} cannot be written into nginx config: {exc}",
                             hint="use a PKI directory without spaces, quotes, $ or ;") from None
    limit = rate_limit or nginx.rate_limit
    site = site_id(nginx.server_name)
    warnings: list[str] = []
    snippets: list[str] = []
    checks: list[str] = []
    if nginx.allow:
        snippets.append(render_file("nginx/allowlist.conf.template", {
            "site": site,
            "entries": "\n".join(_allow_entry(e) for e in nginx.allow),
            "anonymous": '    "NONE:0" 0;\n' if verify == "optional" else "",
            "deny_note": ("Anonymous clients reach the application (ssl_verify_client optional); a verified "
                          "but unlisted client gets 403." if verify == "optional" else
                          "Only verified and allowlisted clients pass (ssl_verify_client on)."),
        }))
        checks.append(f'        if (${site}_deny) {{\n            return 403 "{FORBIDDEN_403}";\n        }}')
    if limit is not None:
        if verify == "on":
            warnings.append("rate_limit with verify_client on: nginx rejects unverified clients before the limiter "
                            "runs, so the limit applies to nobody; use --verify-client optional (the guide's note)")
        key_source, exempt = ((f'"$ssl_client_verify:${site}_allowed"', '"SUCCESS:1"') if nginx.allow
                              else ("$ssl_client_verify", '"SUCCESS"'))
        snippets.append(render_file("nginx/ratelimit.conf.template", {
            "site": site, "zone": f"{site}_req", "rate": limit.rate, "key_source": key_source, "exempt": exempt,
            "allow_note": " and allowlisted" if nginx.allow else "",
        }))
        checks.append(f"        limit_req zone={site}_req burst={limit.burst} nodelay;\n        limit_req_status 429;")
    if not nginx.crl:
        warnings.append("nginx.crl is false: revoked certificates are ACCEPTED by nginx")
    chosen = server_files(pki, nginx)
    served = served_certificate(pki, chosen.cert)
    if pki.has_chain() and served == chosen.cert and Path(served).parent == pki.path("certs"):
        chain = Path(served).with_name(Path(served).stem + ".fullchain.pem")
        warnings.append(f"{served} is served without the issuing CA: clients that trust only the root cannot build the "
                        f"chain; write {chain} (`cat {served} {pki.path(pki.ca_cert)} > {chain}`, or renew the server "
                        "certificate) and render again")
    crl_line = (f"    ssl_crl {pki.path(pki.crl_bundle)};\n" if nginx.crl else
                "    # ssl_crl is off (nginx.crl: false in the profile): revoked certificates are accepted!\n")
    if ocsp is not None:
        crl_line += ("    # OCSP for client certificates (nginx >= 1.19.0): every new handshake asks the responder;\n"
                     f"    # revocation latency = {ocsp.nmin} min (ocsp.nmin, the answers' nextUpdate) + ssl_session_timeout.\n"
                     "    ssl_ocsp leaf;\n"
                     f"    ssl_ocsp_responder {ocsp.url};\n")
        crl_line += (f"    ssl_ocsp_cache shared:{site}_ocsp:10m;\n" if ocsp.cache else
                     "    # ssl_ocsp_cache off (ocsp.cache: false): no caching, every handshake asks\n")
    text = render_file("nginx/site.conf.template", {
        "server_name": nginx.server_name,
        "site": site,
        "http_snippets": "".join(snippets),
        "listen": _listen_lines(nginx.listen, nginx.http2),
        "server_note": (f"    # nginx.server_cert and server_key are left at their placeholders, so this serves the PKI's\n"
                        f"    # server certificate {chosen.name} ({chosen.why}; `mtlsctl add-server`).\n"
                        "    # Set nginx.server_cert / server_key in the profile to serve another one.\n"
                        if chosen.source == "pki" else ""),
        "server_cert": served,
        "server_key": chosen.key,
        "client_ca": str(pki.path(pki.ca_bundle)),
        "verify_client": verify,
        "verify_depth": str(nginx.verify_depth),
        "crl": crl_line,
        "session_timeout": nginx.session_timeout,
        "access_log": nginx.access_log,
        "error_log": nginx.error_log,
        "location_checks": ("\n\n".join(checks) + "\n") if checks else "",
        "upstream": nginx.upstream,
    })
    return text, warnings


# ------------------------------------------------------------------ the files the site names


@dataclass(frozen=True)
class FileProblem:
    """A file the rendered site names that nginx could not use: which directive, which path, what, and the fix."""

    directive: str
    path: str
    problem: str
    fix: str

    def line(self) -> str:
        return f"{self.directive} {self.path} {self.problem}; fix: {self.fix}"


class SiteFilesMissing(StateError):
    """The rendered site names files nginx cannot use: nothing was written (exit 1); --force writes anyway."""

    def __init__(self, problems: list[FileProblem]) -> None:
        self.problems = problems
        super().__init__(f"the site names {len(problems)} file(s) nginx cannot use, so nothing was written",
                         hint="fix them (see above) and render again, or add --force to write it anyway")

    def lines(self) -> list[str]:
        return ([f"error: {p.line()}" for p in self.problems]
                + [f"error: {self.message}", f"hint: {self.hint}"])


def _stat_problem(path: str, directory: bool = False) -> str | None:
    """None when `path` is a regular file (a directory for `directory`), following symlinks as nginx does;
    else what is wrong. PermissionError propagates: whether root can read it is not knowable from here."""
    import stat as stat_mod

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "is a symbolic link to nothing" if os.path.islink(path) else "does not exist"
    except NotADirectoryError:
        return "does not exist (a component of the path is not a directory)"
    if directory:
        return None if stat_mod.S_ISDIR(st.st_mode) else "is not a directory"
    if not stat_mod.S_ISREG(st.st_mode):
        return "is not a regular file"
    return None


def check_site_files(pki: Pki, nginx: NginxProfile) -> tuple[list[FileProblem], list[str]]:
    """Every file the rendered site names, checked as nginx will need it: (problems, warnings).

    nginx's master process reads ssl_certificate, ssl_certificate_key, ssl_client_certificate and ssl_crl
    as root, at start and reload, and opens the logs as root: so "readable by nginx" is checked as exists
    and is a regular file (a directory, for the logs' directories: nginx does not create it), following
    symbolic links as nginx does. The key must also not be world-readable. A path mtlsctl itself cannot
    look at (permission denied, say when not run as root) is a warning, not a problem: root may read it.
    """
    chosen = server_files(pki, nginx)
    served = served_certificate(pki, chosen.cert)
    at_placeholders = nginx.server_cert == PLACEHOLDER_CERT and nginx.server_key == PLACEHOLDER_KEY
    if chosen.source == "pki":
        cert_fix = key_fix = (f"issue the server certificate again: `mtlsctl add-server {chosen.name}` (after moving "
                              "its files away), or set nginx.server_cert and nginx.server_key in the profile")
    elif at_placeholders and chosen.candidates:
        cert_fix = key_fix = (f"{chosen.why}: set nginx.server_name to one of them, or nginx.server_cert and "
                              "nginx.server_key in the profile")
    elif at_placeholders:
        cert_fix = key_fix = (f"issue one with `mtlsctl add-server {nginx.server_name}` (render then uses it), or set "
                              "nginx.server_cert and nginx.server_key in the profile to your certificate and key")
    else:
        cert_fix = ("set nginx.server_cert in the profile to your certificate's path (or `mtlsctl add-server NAME` "
                    "and point it at <pki>/certs/NAME.crt)")
        key_fix = "set nginx.server_key in the profile to the certificate's key (<pki>/private/NAME.key for add-server)"
    checks = [("ssl_certificate", served, False, cert_fix),
              ("ssl_certificate_key", chosen.key, False, key_fix),
              ("ssl_client_certificate", str(pki.path(pki.ca_bundle)), False,
               "the PKI's CA certificate is missing: check the PKI with `mtlsctl doctor`")]
    if nginx.crl:
        checks.append(("ssl_crl", str(pki.path(pki.crl_bundle)), False, "run `mtlsctl crl` (it writes the CRL)"))
    for directive, log in (("access_log", nginx.access_log), ("error_log", nginx.error_log)):
        parent = str(Path(log).parent)
        checks.append((f"{directive} directory", parent, True,
                       f"create it (`mkdir -p {parent}`: nginx does not), or set nginx.{directive} in the profile"))
    problems: list[FileProblem] = []
    warnings: list[str] = []
    seen: set[tuple[str, str]] = set()
    for directive, path, is_dir, fix in checks:
        if (directive, path) in seen:
            continue
        seen.add((directive, path))
        try:
            problem = _stat_problem(path, directory=is_dir)
            if problem is None and directive == "ssl_certificate_key" and os.stat(path).st_mode & 0o004:
                problems.append(FileProblem(directive, path, "is readable by every user of this host",
                                            f"`chmod 600 {path}` (nginx's master reads it as root)"))
                continue
        except PermissionError:
            warnings.append(f"{directive} {path}: cannot check it (permission denied); nginx's master reads it as root, "
                            "so run `mtlsctl nginx render` as root to check it")
            continue
        if problem is not None:
            problems.append(FileProblem(directive, path, problem, fix))
    return problems, warnings


def render_checked(pki: Pki, nginx: NginxProfile, *, verify_client: str | None = None,
                   rate_limit: RateLimit | None = None, ocsp: OcspProfile | None = None,
                   force: bool = False) -> tuple[str, list[str]]:
    """`mtlsctl nginx render`: refuse a directory without a CA (exit 2), render, then check every file the site
    names (check_site_files). A problem raises SiteFilesMissing (exit 1, nothing written) unless `force`,
    which returns the text with each problem as a warning."""
    pki.require_ca()
    text, warnings = render_site(pki, nginx, verify_client=verify_client, rate_limit=rate_limit, ocsp=ocsp)
    problems, unchecked = check_site_files(pki, nginx)
    warnings += unchecked
    if problems and not force:
        raise SiteFilesMissing(problems)
    warnings += [f"written anyway (--force): {p.line()}" for p in problems]
    return text, warnings


def render_options(*, verify_client: str | None, rate_limit: str | None, burst: int | None,
                   out: Path | None) -> RateLimit | None:
    """The options of `nginx render`, checked before anything is read or rendered: --verify-client on|optional,
    --rate-limit/--burst (as the profile's nginx.rate_limit would be), and --out (a file in an existing
    directory, not a symbolic link). Returns the rate limit to render with, if any. Raises InputError."""
    if verify_client is not None and verify_client not in ("on", "optional"):
        raise InputError(f"--verify-client {verify_client!r} is not allowed",
                         hint="use on or optional (optional_no_ca admits self-signed certificates)")
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
    return limit


def render_for(settings: Settings, *, verify_client: str | None = None, rate_limit: RateLimit | None = None,
               force: bool = False) -> tuple[str, list[str]]:
    """`mtlsctl nginx render` for this PKI and profile, under the readers' lock: (the site, warnings)."""
    from mtlsctl.files import read_lock

    settings.pki.require_ca()
    with read_lock(settings.pki.root):
        return render_checked(settings.pki, settings.profile.nginx, verify_client=verify_client, rate_limit=rate_limit,
                              ocsp=settings.profile.ocsp, force=force)


def write_site(out: Path, text: str) -> None:
    """The rendered site, written atomically (a new file renamed into place), mode 644."""
    from mtlsctl.files import MODE_PUBLIC, atomic_write

    atomic_write(out, text, MODE_PUBLIC)


# ------------------------------------------------------------------ test and reload


def check(nginx: NginxProfile) -> str:
    """Run the profile's test command (`nginx -t`); raise with nginx's own message when it fails."""
    if not nginx.test_command:
        return "no test: nginx.test_command is empty in the profile"
    result = run_argv(shlex.split(nginx.test_command), check=False)
    output = (result.stderr + result.stdout).strip()
    if result.returncode != 0:
        lines = [line for line in output.splitlines() if "[emerg]" in line or "failed" in line] or output.splitlines()
        raise ExternalCommandError(
            f"`{nginx.test_command}` failed: {lines[0].strip() if lines else 'no output'}",
            hint="fix the nginx configuration; nginx keeps running the old one",
        )
    return output or "ok"


def master_pid(pid_file: str) -> int | None:
    try:
        pid = int(Path(pid_file).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def worker_pids(master: int) -> set[int]:
    """Children of the nginx master, read from /proc (Linux)."""
    out = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(master):
            out.add(int(entry.name))
    return out


def reload(nginx: NginxProfile, *, test: bool = True, timeout: float = 10.0) -> ReloadOutcome:
    """Test, reload, then confirm that the master started new workers.

    Raises:
        ExternalCommandError: the test failed (nothing reloaded), the reload command failed, or nginx
        did not start new workers (the new configuration or CRL was rejected; the old one still runs).
    """
    if not nginx.reload_command:
        return ReloadOutcome(False, "no reload: nginx.reload_command is empty in the profile")
    if test:
        try:
            check(nginx)
        except ExternalCommandError as exc:
            raise ExternalCommandError(f"{exc.message}, so nginx was not reloaded", hint=exc.hint) from None
    master = master_pid(nginx.pid_file)
    before = worker_pids(master) if master else None
    run_argv(shlex.split(nginx.reload_command))
    if master is None or before is None:
        return ReloadOutcome(True, f"ran `{nginx.reload_command}` (not confirmed: no running master in {nginx.pid_file})")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker_pids(master) - before:
            break
        time.sleep(0.05)
    else:
        raise ExternalCommandError(
        f"nginx did not start new workers within {timeout:.0f}s of `{nginx.reload_command}`: the reload failed "
        "and nginx still runs the old configuration and CRL",
            hint="look for [emerg] in nginx's error log, fix it, then run `mtlsctl nginx reload`",
        )
    # An old worker keeps accepting connections until it handles the master's QUIT; right after the new
    # workers appear, a new client can still meet the old CRL (seen: 403 instead of 400 for a client
    # revoked a moment before). The reload has taken effect once the old workers are gone.
    while time.monotonic() < deadline:
        if not (worker_pids(master) & before):
            return ReloadOutcome(True, f"ran `{nginx.reload_command}`; nginx replaced its workers")
        time.sleep(0.05)
    return ReloadOutcome(True, f"ran `{nginx.reload_command}`; nginx started new workers, old ones are still "
                               "finishing long requests")


def test_and_reload(nginx: NginxProfile) -> ReloadOutcome:
    """After a CRL change: test, reload only when the test passes, confirm it took effect."""
    return reload(nginx, test=True)
