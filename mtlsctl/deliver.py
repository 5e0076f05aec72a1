"""`mtlsctl deliver NAME`: hand a client's bundle to a device once, over HTTPS, from a link and a QR code.

The guide ends every client with "transfer the .p12 file securely to the client device". This is that step:

1. Before anything listens, the bundle is checked like `export` checks it: certs/NAME.crt must be an active
   client certificate (its own row in index.txt: never revoked or expired), certs/NAME.p12 must open with the
   password (private/NAME.p12.password, or --password-file) and hold exactly certs/NAME.crt. The bytes that
   were checked are the bytes served. The PKI is read under its shared lock, released before the wait: a
   delivery never blocks `renew`, `revoke` or `crl`.
2. A short-lived HTTPS server (the standard library's http.server and ssl) listens on the address the user
   names (never a default; the unspecified 0.0.0.0 or :: only as an explicit --bind), with a certificate the
   device already trusts: the site's server certificate (nginx.server_cert/key, or the PKI's server
   certificate, its full chain in a two-tier PKI) or --cert/--key.
3. The bundle is served at `/TOKEN`, TOKEN = secrets.token_urlsafe(32) (256 bits). Any other path gets 404
   with one fixed body (compared with hmac.compare_digest: no hint how close a guess was); any method but GET
   gets 405. The first COMPLETE download (the whole body written) uses the link up: from then on, and once
   the lifetime has passed unused, the link answers 410 and the server stops after a short linger.
   A transfer that breaks off leaves the link open; while one is in flight, another GET gets 409 — two
   downloads can never both receive the bundle.
4. The password is never in the URL, the QR code or the server's log lines (the path is logged as
   "/<token>"); it is shown on the terminal for the person to type on the device.

`deliver()` returns a DeliverResult (who downloaded, from where, when; or that the link expired) and records
one line in the PKI's audit log.
"""

from __future__ import annotations

import errno
import hmac
import os
import re
import secrets
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtlsctl import db, validate
from mtlsctl.errors import InputError, MtlsError, OpenSSLError, StateError
from mtlsctl.pki import ClientFiles, Settings
from mtlsctl.runner import Command, Runner

if TYPE_CHECKING:
    import segno

FORMATS = ("p12", "mobileconfig")
TOKEN_BYTES = 32  # secrets.token_urlsafe(32): 256 bits, 43 characters
LINGER_SECONDS = 3.0  # after the download (or expiry): a browser's retry sees 410, not a refused connection
REQUEST_TIMEOUT = 30.0  # a client that stalls a handshake or a transfer longer than this is dropped
BUNDLE_MAX_BYTES = 1 << 20
IOS_MAX_SERVER_DAYS = 825  # iOS refuses TLS server certificates valid longer than this

BODY_NOT_FOUND = b"not found\n"
BODY_GONE = b"gone: this link was used or has expired\n"
BODY_BUSY = b"busy: a download of this link is in progress\n"
BODY_METHOD = b"method not allowed: only GET\n"
REDACTED = "/<token>"
_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


# ------------------------------------------------------------------ the options, checked before anything starts


@dataclass(frozen=True)
class DeliverOptions:
    """What one delivery serves, where and for how long (built by `options`, which refuses bad input)."""

    name: str
    bind: str  # an IP literal
    port: int
    lifetime: float  # seconds the link stays open unused
    fmt: str  # p12 or mobileconfig
    cert: Path  # the TLS certificate (chain) the server presents
    key: Path
    host: str  # the host in the URL: must be in the certificate and reach `bind` from the device
    password: str | None = field(default=None, repr=False)  # None: private/NAME.p12.password
    with_ca: bool = False  # mobileconfig: the trust anchor as a root payload


def parse_duration(text: str, what: str = "--for") -> int:
    """--for / deliver.valid_for in seconds (90s, 10m, 1h; 10s..24h). Raises InputError."""
    from mtlsctl.profile import parse_duration as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise InputError(f"{what} {exc}", hint="e.g. --for 90s, --for 10m or --for 1h") from None


def _server_files(settings: Settings, cert: Path | None, key: Path | None) -> tuple[Path, Path]:
    """--cert/--key, else the certificate and key the nginx site serves (the PKI's full chain when it is the
    PKI's own server certificate)."""
    if (cert is None) != (key is None):
        raise InputError("--cert and --key go together", hint="give both, or neither to use the site's certificate")
    if cert is not None and key is not None:
        chosen = (cert, key, "--cert/--key")
    else:
        from mtlsctl.nginx import served_certificate, server_files

        files = server_files(settings.pki, settings.profile.nginx)
        where = (f"the PKI's server certificate {files.name}" if files.source == "pki"
                 else "the profile's nginx.server_cert/server_key")
        chosen = (Path(served_certificate(settings.pki, files.cert)), Path(files.key), where)
    cert_path, key_path, where = chosen
    for path, what in ((cert_path, "certificate"), (key_path, "key")):
        if not path.is_file():
            raise InputError(f"the server {what} {path} ({where}) is not a file",
                             hint="give --cert FILE --key FILE, or issue one the device trusts: "
                                  "mtlsctl add-server HOST --san DNS:HOST --san IP:ADDR")
    return cert_path.absolute(), key_path.absolute()


def url_host(host: str | None, bind: str) -> str:
    """The URL's host: --host (a DNS name or an IP literal), else the bind address. Raises InputError."""
    import ipaddress

    if host is None:
        return bind
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if len(host) > 253 or not _HOST_RE.fullmatch(host):
        raise InputError(f"--host {host!r} is neither a DNS name nor an IP address", hint="e.g. --host ca.example.lan")
    return host.lower()


def options(settings: Settings, name: str, *, bind: str | None, port: int | None, valid_for: str | None,
            fmt: str | None, cert: Path | None = None, key: Path | None = None, host: str | None = None,
            password: str | None = None, with_ca: bool = False) -> DeliverOptions:
    """Check a delivery's options against the profile (deliver.*), before anything is read or started.

    `bind` is what the user typed (--bind): only then are 0.0.0.0 and :: accepted. There is no default address.

    Raises:
        InputError: no address, a bad address, port or duration, a missing server certificate, and so on.
    """
    from mtlsctl.profile import listen_address

    validate.client_name(name)
    conf = settings.profile.deliver
    chosen_fmt = (fmt or "p12").lower()
    if chosen_fmt not in FORMATS:
        raise InputError(f"--format {fmt!r} is not a delivery format", hint="use p12 or mobileconfig")
    if with_ca and chosen_fmt != "mobileconfig":
        raise InputError("--with-ca is for --format mobileconfig", hint="a .p12 already carries the CA chain")
    if bind is None and conf.bind is None:
        raise InputError("deliver needs an address to listen on, and has no default",
                         hint="give --bind ADDR (this host's address on the device's network, e.g. --bind 192.0.2.10), "
                              "or set deliver.bind in the profile")
    try:
        address = listen_address(bind, explicit=True) if bind is not None else listen_address(str(conf.bind), explicit=False)
    except ValueError as exc:
        raise InputError(f"--bind {exc}" if bind is not None else f"deliver.bind {exc}",
                         hint="give this host's IP address on the device's network") from None
    chosen_port = conf.port if port is None else port
    if isinstance(chosen_port, bool) or not 1 <= chosen_port <= 65535:
        raise InputError(f"--port {chosen_port} is out of range", hint="use a port from 1 to 65535, e.g. --port 8443")
    lifetime = parse_duration(valid_for if valid_for is not None else conf.valid_for,
                              "--for" if valid_for is not None else "deliver.valid_for")
    if password is not None:
        validate.password(password, source="--password-file")
    cert_path, key_path = _server_files(settings, cert, key)
    return DeliverOptions(name=name, bind=address, port=chosen_port, lifetime=float(lifetime), fmt=chosen_fmt,
                          cert=cert_path, key=key_path, host=url_host(host, address), password=password, with_ca=with_ca)


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class Download:
    address: str
    port: int
    at: datetime

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "port": self.port, "at": self.at.isoformat()}


@dataclass(frozen=True)
class Ready:
    """What the person needs, handed to `announce` once the server listens (and before it waits)."""

    url: str
    password: str = field(repr=False)
    expires_at: datetime
    file_name: str
    content_type: str
    password_source: str
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"event": "ready", "url": self.url, "password": self.password, "expires_at": self.expires_at.isoformat(),
                "file": self.file_name, "content_type": self.content_type, "warnings": list(self.warnings)}


@dataclass(frozen=True)
class DeliverResult:
    """How the delivery ended: `download` (who, from where, when), or `expired` (nobody downloaded in time)."""

    name: str
    serial: str
    fmt: str
    bind: str
    port: int
    started_at: datetime
    expires_at: datetime
    download: Download | None
    signed: bool = False

    @property
    def delivered(self) -> bool:
        return self.download is not None

    def to_json(self) -> dict[str, Any]:
        """Never the token, never the password."""
        return {"name": self.name, "serial": self.serial, "format": self.fmt, "bind": self.bind, "port": self.port,
                "started_at": self.started_at.isoformat(), "expires_at": self.expires_at.isoformat(),
                "delivered": self.delivered, "downloaded_by": self.download.to_json() if self.download else None,
                "expired": not self.delivered, "signed": self.signed}


# ------------------------------------------------------------------ the link: one download, then gone


class Link:
    """The one-time link's state, shared by the request threads (every change under one lock).

    open -> sending (one GET claimed it) -> done (the whole body written) ; sending -> open (the transfer broke
    off) ; open -> expired (the lifetime passed unused). Only one request can hold "sending".
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = "open"
        self.download: Download | None = None

    def claim(self) -> str:
        """"go" (this request sends the bundle), "busy" (another is sending it) or "gone" (done or expired)."""
        with self._lock:
            if self.state == "open":
                self.state = "sending"
                return "go"
            return "busy" if self.state == "sending" else "gone"

    def complete(self, address: str, port: int) -> None:
        with self._lock:
            self.state = "done"
            self.download = Download(address, port, datetime.now(timezone.utc))

    def release(self) -> None:
        with self._lock:
            if self.state == "sending":
                self.state = "open"

    def expire(self) -> bool:
        """Close an unused link; False when a transfer is in flight (it may still complete) or it is done."""
        with self._lock:
            if self.state == "open":
                self.state = "expired"
                return True
            return False

    def finished(self) -> bool:
        with self._lock:
            return self.state in ("done", "expired")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext, link: Link, path: str, payload: bytes,
                 headers: dict[str, str], log: Callable[[str], None]) -> None:
        import socket

        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.context = context
        self.link = link
        self.secret_path = path.encode("ascii")
        self.payload = payload
        self.payload_headers = headers
        self.log = log
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """The TLS handshake in the request's own thread (a slow client never holds up the others)."""
        request.settimeout(REQUEST_TIMEOUT)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            self.log(f"{_peer(client_address)} TLS handshake failed ({reason})")
            return
        try:
            _Handler(tls, client_address, self)
        finally:
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """The stdlib prints a traceback here; a broken connection is one log line (never the request)."""
        self.log(f"{_peer(client_address)} connection error")


def _peer(client_address: Any) -> str:
    return str(client_address[0]) if isinstance(client_address, tuple) and client_address else "?"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "mtlsctl-deliver"
    sys_version = ""
    protocol_version = "HTTP/1.0"  # one request per connection
    timeout = REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        """The stdlib logs the request line, which holds the token: never. _log writes redacted lines."""

    def _log(self, method: str, path: str, status: int, note: str = "") -> None:
        self.server.log(f"{_peer(self.client_address)} {method} {path} {status}" + (f" ({note})" if note else ""))

    def handle_one_request(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except (OSError, ssl.SSLError):
            self.close_connection = True
            return
        if len(self.raw_requestline) > 65536:
            self._reply(414, BODY_NOT_FOUND)
            self._log("?", "<long request line>", 414)
            return
        if not self.raw_requestline:
            self.close_connection = True
            return
        if not self.parse_request():  # it answered 400 (or 505) itself
            self._log("?", "<malformed request>", 400)
            return
        if self.command != "GET":
            self._reply(405, BODY_METHOD, {"Allow": "GET"})
            self._log(_method(self.command), self._shown_path(), 405)
            return
        self._get()
        self.wfile.flush()

    def _shown_path(self) -> str:
        return REDACTED if self._is_token() else "/<wrong path>"

    def _is_token(self) -> bool:
        return hmac.compare_digest(self.path.encode("latin-1", "replace"), self.server.secret_path)

    def _reply(self, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": "text/plain; charset=utf-8", **(extra or {})}.items():
            self.send_header(name, value)
        self._common_headers(len(body))
        self.wfile.write(body)

    def _common_headers(self, length: int) -> None:
        self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Connection", "close")
        self.end_headers()

    def _get(self) -> None:
        if not self._is_token():
            self._reply(404, BODY_NOT_FOUND)  # one body for every wrong path, near or far
            self._log("GET", "/<wrong path>", 404)
            return
        link = self.server.link
        verdict = link.claim()
        if verdict != "go":
            status, body = (409, BODY_BUSY) if verdict == "busy" else (410, BODY_GONE)
            self._reply(status, body)
            self._log("GET", REDACTED, status)
            return
        payload = self.server.payload
        try:
            self.send_response(200)
            for name, value in self.server.payload_headers.items():
                self.send_header(name, value)
            self._common_headers(len(payload))
            self.wfile.write(payload)
            self.wfile.flush()
        except (OSError, ssl.SSLError) as exc:
            link.release()  # nothing complete went out: the link stays open for the next try
            self._log("GET", REDACTED, 200, f"transfer broke off: {type(exc).__name__}; the link stays open")
            return
        link.complete(_peer(self.client_address), int(self.client_address[1]))
        self._log("GET", REDACTED, 200, f"{len(payload)} bytes: downloaded; the link is used up")


def _method(command: str | None) -> str:
    """The method as logged: letters only, at most 16 (a request line is the client's to fill)."""
    text = command or "?"
    return text[:16] if text.isascii() and text.isalpha() else "<method>"


# ------------------------------------------------------------------ preparing the bundle


@dataclass(frozen=True)
class _Bundle:
    serial: str
    p12: bytes
    crt_pem: str | None
    password: str = field(repr=False)
    password_source: str


def _read_private(path: Path, what: str, limit: int) -> bytes:
    """A regular file's bytes (no symlink followed, at most `limit`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{path} is a symbolic link; mtlsctl does not follow it here") from None
        raise
    with os.fdopen(fd, "rb") as fh:
        import stat

        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise InputError(f"{what} {path} is not a regular file")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"{what} {path} is larger than {limit} bytes")
    return data


def _read_bundle(settings: Settings, opts: DeliverOptions) -> _Bundle:
    """Under the PKI's shared lock: the checks `export` makes (active, a client's), then the bundle's bytes and
    its password, read once."""
    from mtlsctl.client import check_exportable, password_file
    from mtlsctl.files import read_lock

    pki, files = settings.pki, ClientFiles(opts.name)
    with read_lock(pki.root):
        pki.require_ca()
        row = check_exportable(pki, opts.name)  # revoked, expired, not a client: refused before any server starts
        bundle = pki.path(files.p12)
        if not os.path.lexists(bundle):
            raise InputError(f"{opts.name} has no bundle ({files.p12} missing)",
                             hint=f"make one: mtlsctl export {opts.name}")
        p12 = _read_private(bundle, "the bundle", BUNDLE_MAX_BYTES)
        crt_pem = db.pem_certificate(pki.path(files.crt).read_text(errors="replace"))
        if opts.password is not None:
            password, source = opts.password, "--password-file"
        else:
            secret = pki.path(password_file(opts.name))
            if not os.path.lexists(secret):
                raise InputError(f"the password of {files.p12} is not stored ({password_file(opts.name)} missing)",
                                 hint="give --password-file FILE (the password printed when the bundle was made), or make "
                                      f"a fresh bundle with a password you choose: mtlsctl export {opts.name} --force "
                                      "--password-file FILE")
            text = _read_private(secret, "the password file", 4096).decode("utf-8", "replace")
            password = validate.password(validate.strip_one_newline(text), source=str(secret))
            source = password_file(opts.name)
    return _Bundle(row.serial, p12, crt_pem, password, source)


def _check_bundle(bundle: _Bundle, name: str, runner: Runner, workdir: Path) -> None:
    """The bundle opens with the password and holds certs/NAME.crt (not a stale bundle of an older certificate)."""
    from mtlsctl.files import MODE_SECRET, create_exclusive

    fd = create_exclusive(workdir / "bundle.p12", MODE_SECRET)
    with os.fdopen(fd, "wb") as fh:
        fh.write(bundle.p12)
    out = None
    for legacy in ((), ("-legacy",)):  # compat and modern open without the legacy provider; RC2 (legacy) needs it
        cmd = Command(("openssl", "pkcs12", "-in", "bundle.p12", "-nokeys", "-clcerts", "-passin", "fd:@0", *legacy),
                      label=f"checking certs/{name}.p12 opens with its password", fd_secrets=(bundle.password,))
        result = runner.run(cmd, cwd=workdir, check=False)
        if result.returncode == 0:
            out = result.stdout
            break
    if out is None:
        raise InputError(f"certs/{name}.p12 does not open with the password from {bundle.password_source}",
                         hint=f"give the right one with --password-file FILE, or make a fresh bundle: mtlsctl export {name} --force")
    if bundle.crt_pem is None or db.pem_certificate(out) != bundle.crt_pem:
        raise InputError(f"certs/{name}.p12 does not hold certs/{name}.crt (serial {bundle.serial}): it is an older bundle",
                         hint=f"make a fresh one: mtlsctl export {name} --force")


def _payload(settings: Settings, opts: DeliverOptions, bundle: _Bundle, runner: Runner,
             workdir: Path) -> tuple[bytes, str, str, bool]:
    """(bytes, file name, content type, signed): the bundle itself, or a configuration profile made around it."""
    if opts.fmt == "p12":
        return bundle.p12, f"{opts.name}.p12", "application/x-pkcs12", False
    from mtlsctl import mobileconfig

    pki = settings.pki
    signer = mobileconfig.signer(settings)
    anchor = mobileconfig.trust_anchor(pki)
    data = mobileconfig.build(opts.name, bundle.p12, prefix=mobileconfig.identifier_prefix(settings),
                              organization=mobileconfig.organization(settings),
                              ca_der=mobileconfig.certificate_der(pki.path(anchor)) if opts.with_ca else None,
                              ca_file_name=Path(anchor).name)
    if signer is not None:
        data = mobileconfig.sign(data, signer, runner, workdir)
    return data, f"{opts.name}{mobileconfig.SUFFIX}", mobileconfig.CONTENT_TYPE, signer is not None


def _no_password() -> bytes:
    """An encrypted server key is never unlocked by a prompt on the terminal: the load fails instead."""
    return b""


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context (TLS 1.2+) with the certificate chain and key. Raises InputError when they do not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key), password=_no_password)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise InputError(f"the server certificate {cert} and key {key} cannot be used ({reason})",
                         hint="they must be PEM, the key unencrypted and matching the certificate; give --cert/--key") from None
    return context


def certificate_warnings(cert: Path, host: str, now: datetime) -> list[str]:
    """What would make the device refuse the server (its own words come later, on the device): read from the
    certificate. An expired certificate is refused here (InputError)."""
    import ipaddress

    from mtlsctl import x509read

    try:
        facts = x509read.facts(x509read.read_certificate(cert))
    except (StateError, ValueError) as exc:
        raise InputError(f"the server certificate {cert} cannot be read: {exc}") from None
    if facts.not_after <= now:
        raise InputError(f"the server certificate {cert} expired on {facts.not_after:%Y-%m-%d}",
                         hint="renew it (mtlsctl renew) or give another with --cert/--key")
    warnings = []
    try:
        wanted = ("IP", str(ipaddress.ip_address(host)))
    except ValueError:
        wanted = ("DNS", host)
    names = [(kind, (value or "").lower()) for kind, value in facts.sans]
    if wanted not in names and not (wanted[0] == "DNS" and any(
            kind == "DNS" and value.startswith("*.") and host.split(".", 1)[-1] == value[2:] for kind, value in names)):
        shown = ", ".join(f"{k}:{v}" for k, v in names) or "none"
        warnings.append(f"the server certificate does not name {host} (its SANs: {shown}); the device will refuse the "
                        "connection: use --host with one of them, or a certificate for this address")
    if (facts.not_after - facts.not_before).days > IOS_MAX_SERVER_DAYS:
        warnings.append(f"the server certificate is valid for more than {IOS_MAX_SERVER_DAYS} days: iOS and macOS refuse it")
    if facts.kind != "server":
        warnings.append("the server certificate has no serverAuth extended key usage: browsers refuse it")
    return warnings


def _listen(opts: DeliverOptions, context: ssl.SSLContext, link: Link, path: str, payload: bytes,
            headers: dict[str, str], log: Callable[[str], None]) -> _Server:
    try:
        return _Server((opts.bind, opts.port), context, link, path, payload, headers, log)
    except OSError as exc:
        why = {errno.EADDRINUSE: f"port {opts.port} is in use on {opts.bind}",
               errno.EADDRNOTAVAIL: f"{opts.bind} is not an address of this host",
               errno.EACCES: f"port {opts.port} needs privileges"}.get(exc.errno or 0, exc.strerror or str(exc))
        raise InputError(f"cannot listen on {opts.bind} port {opts.port}: {why}",
                         hint="pick another --port, or --bind one of this host's addresses (ip -brief address)") from None


def format_url(host: str, port: int, path: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"https://{shown}:{port}{path}"


def qr_code(url: str) -> segno.QRCode:
    """The QR code of the URL (and of nothing else: never the password). segno is imported only here."""
    import segno

    return segno.make(url, error="m", micro=False)


# ------------------------------------------------------------------ the delivery


def deliver(settings: Settings, opts: DeliverOptions, runner: Runner, *, announce: Callable[[Ready], None],
            log: Callable[[str], None], linger: float | None = None) -> DeliverResult:
    """Serve NAME's bundle once (see the module docstring) and say how it ended.

    Args:
        settings: the PKI and profile.
        opts: from `options()`.
        runner: runs openssl (the bundle check, a mobileconfig's signature).
        announce: called once the server listens, with the URL and the password for the person.
        log: receives the server's log lines (redacted: never the token, never the password).
        linger: seconds the server keeps answering 410 after the download or the expiry (default LINGER_SECONDS).

    Returns:
        a DeliverResult: `download` set when the bundle went out completely, else the link expired.

    Raises:
        InputError: refused before the server starts (revoked, expired, no bundle, wrong password, ...).
        KeyboardInterrupt: Ctrl-C while waiting (the server is stopped first and the audit log says so).
    """
    linger = LINGER_SECONDS if linger is None else linger
    workdir = Path(tempfile.mkdtemp(prefix="mtlsctl-deliver-"))  # 0700: the bundle check and the profile's signature
    try:
        bundle = _read_bundle(settings, opts)
        try:
            _check_bundle(bundle, opts.name, runner, workdir)
            payload, file_name, content_type, signed = _payload(settings, opts, bundle, runner, workdir)
        except OpenSSLError as exc:
            raise MtlsError(f"the bundle could not be prepared: {exc.message}") from None
        now = datetime.now(timezone.utc)
        warnings = certificate_warnings(opts.cert, opts.host, now)
        context = tls_context(opts.cert, opts.key)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    link = Link()
    path = "/" + secrets.token_urlsafe(TOKEN_BYTES)
    headers = {"Content-Type": content_type, "Content-Disposition": f'attachment; filename="{file_name}"'}
    server = _listen(opts, context, link, path, payload, headers, log)
    started = datetime.now(timezone.utc)
    expires = started + timedelta(seconds=opts.lifetime)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    error: str | None = None
    try:
        thread.start()
        announce(Ready(url=format_url(opts.host, opts.port, path), password=bundle.password, expires_at=expires,
                       file_name=file_name, content_type=content_type, password_source=bundle.password_source,
                       warnings=tuple(warnings)))
        _wait(link, time.monotonic() + opts.lifetime)
        log(("downloaded; " if link.download else "expired unused; ") + f"answering 410 for {linger:g}s, then stopping")
        end = time.monotonic() + linger
        while time.monotonic() < end:
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))
        if link.download is None:
            error = "the link expired unused"
    except KeyboardInterrupt:
        error = "interrupted before a download"
        raise
    except BaseException as exc:
        error = f"stopped: {getattr(exc, 'message', None) or type(exc).__name__}"
        raise
    finally:
        link.expire()  # from here on nothing is served, whatever happened
        if thread.is_alive():
            server.shutdown()
        server.server_close()
        _audit(settings, opts, bundle.serial, link.download, error)
    return DeliverResult(name=opts.name, serial=bundle.serial, fmt=opts.fmt, bind=opts.bind, port=opts.port,
                         started_at=started, expires_at=expires, download=link.download, signed=signed)


def _wait(link: Link, deadline: float) -> None:
    """Until the link is used up, or the deadline passes with no transfer in flight (one in flight may finish;
    a stalled one is dropped by the request timeout, and then the link expires)."""
    while not link.finished():
        if time.monotonic() >= deadline and link.expire():
            return
        time.sleep(0.05)


def _audit(settings: Settings, opts: DeliverOptions, serial: str, download: Download | None, error: str | None) -> None:
    """One line in the audit log: who downloaded (address, time), or why nothing was delivered. No token, no password."""
    from mtlsctl import audit

    audit.record(settings.pki, "deliver", names=[opts.name], serials=[serial], result="ok" if download else "failed",
                 error=None if download else error, address=download.address if download else None,
                 downloaded_at=download.at.isoformat() if download else None, format=opts.fmt,
                 bind=f"{opts.bind}:{opts.port}")
