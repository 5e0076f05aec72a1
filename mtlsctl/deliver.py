"""`mtlsctl deliver NAME`: hand a client's bundle to a device once, over HTTPS, from a link and a QR code.

The guide ends every client with "transfer the .p12 file securely to the client device". This is that step:

1. Before anything listens, the bundle is checked like `export` checks it: certs/NAME.crt must be an active
   client certificate (its own row in index.txt: never revoked or expired), certs/NAME.p12 must open with the
   password (private/NAME.p12.password, or --password-file) and hold exactly certs/NAME.crt. The bytes that
   were checked are the bytes served. The PKI is read under its shared lock, released before the wait: a
   delivery never blocks `renew`, `revoke` or `crl`.
2. A short-lived HTTPS server (the standard library's http.server and ssl) listens on the address the user
   names (never a default; an unspecified address, 0.0.0.0 or ::, only as an explicit --bind; an IPv4-mapped
   IPv6 address never), with a certificate the device already trusts: the site's server certificate
   (nginx.server_cert/key, or the PKI's server certificate, its full chain in a two-tier PKI) or --cert/--key.
   Never a CA's: a CA certificate, or the key of ca/ca.crt or ca/root.crt, is refused.
3. The bundle is served at `/TOKEN`, TOKEN = secrets.token_urlsafe(32) (256 bits). Any other path gets 404
   with one fixed body (compared with hmac.compare_digest: no hint how close a guess was); any method but GET
   gets 405. The GET that claims the link first re-checks, under the PKI's shared lock for that moment, that
   certs/NAME.crt is still the certificate checked at the start (same serial, V in index.txt, not expired) and
   certs/NAME.p12 still the same bytes: if not (revoked, renewed, replaced, expired while the link waited), it
   gets 410, nothing is sent, and the delivery ends as failed.
4. The link is used up once the whole body has been SENT: written to the connection, then the TLS session
   closed (close_notify) and the device given CLOSE_WAIT_SECONDS to close its end, so the last bytes are not
   lost to a reset. The server cannot know the device kept the file, and a device that resets the connection
   after the last byte may well have it (many clients close that way): re-opening the link then could hand out
   a second copy, so it stays used; a device that lost the file needs a new `deliver`. A transfer that breaks
   off before the last byte is written leaves the link open; while one is in flight, another GET gets 409 —
   two requests can never both receive the bundle. Once used, and once the lifetime has passed unused, the
   link answers 410 and the server stops after a short linger.
5. The password is never in the URL, the QR code or the server's log lines (the path is logged as
   "/<token>"); it is shown on the terminal for the person to type on the device.

`deliver()` returns a DeliverResult (to whom the bundle was sent, from where, when; or that the link expired or
was withdrawn) and records one line in the PKI's audit log.
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
from mtlsctl.errors import InputError, LockError, MtlsError, OpenSSLError, StateError
from mtlsctl.pki import ClientFiles, Pki, Settings
from mtlsctl.runner import Command, Runner

if TYPE_CHECKING:
    import segno

FORMATS = ("p12", "mobileconfig")
TOKEN_BYTES = 32  # secrets.token_urlsafe(32): 256 bits, 43 characters
LINGER_SECONDS = 3.0  # after the download (or expiry): a browser's retry sees 410, not a refused connection
REQUEST_TIMEOUT = 30.0  # a client that stalls a handshake or a transfer longer than this is dropped
CLOSE_WAIT_SECONDS = 5.0  # after the last byte and close_notify: how long the device has to close its end
RECHECK_LOCK_SECONDS = 10.0  # the re-check before sending waits this long for a writer (renew, revoke) to finish
REQUEST_LINE_MAX = 65536  # the stdlib's own limit (414 beyond it)
BUNDLE_MAX_BYTES = 1 << 20
IOS_MAX_SERVER_DAYS = 825  # iOS refuses TLS server certificates valid longer than this

BODY_NOT_FOUND = b"not found\n"
BODY_GONE = b"gone: this link was used or has expired\n"
BODY_BUSY = b"busy: a download of this link is in progress\n"
BODY_METHOD = b"method not allowed: only GET\n"
BODY_TOO_LONG = b"request line too long\n"
BODY_PKI_BUSY = b"busy: the certificate authority is being changed; try the link again in a minute\n"
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


def _spki(cert: Any) -> bytes:
    """A certificate's public key (SubjectPublicKeyInfo, DER): read only, to compare keys."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return bytes(cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # symbolic and hard links too
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def refuse_ca_server_files(pki: Pki, cert: Path, key: Path) -> None:
    """A CA's certificate or key never runs in a network TLS server (a bug or a misread in the server would put
    the key that signs every client's certificate within reach of the network).

    Refused: a certificate (the first of the file: the one presented) with basicConstraints CA:TRUE; a key that
    is private/ca.key or private/root.key (the same file, whatever path or link names it); a certificate whose
    public key is that of ca/ca.crt or ca/root.crt (a copy of a CA key, paired with a leaf certificate for it).

    Raises:
        InputError: one of the above, or a certificate that cannot be read.
    """
    from mtlsctl import x509read

    hint = "give the site's server certificate and its key, e.g. --cert certs/HOST.crt --key private/HOST.key " \
           "(mtlsctl add-server HOST --san IP:ADDR makes one)"
    for rel in (pki.ca_key, pki.root_key):
        if os.path.lexists(pki.path(rel)) and _same_file(key, pki.path(rel)):
            raise InputError(f"the server key {key} is the CA's private key ({rel}): deliver never serves with a CA key",
                             hint=hint)
    try:
        leaf = x509read.read_certificate(cert)
        bc = x509read.basic_constraints(x509read.extensions(leaf, str(cert)))
    except (StateError, ValueError) as exc:
        raise InputError(f"the server certificate {cert} cannot be read: {getattr(exc, 'message', exc)}") from None
    if bc is not None and bc[0]:
        raise InputError(f"the server certificate {cert} is a CA certificate (basicConstraints CA:TRUE): deliver never "
                         "serves as a CA", hint=hint)
    for rel in (pki.ca_cert, pki.root_cert):
        try:
            ca = x509read.read_certificate(pki.path(rel))
        except StateError:
            continue  # no such CA (a single-tier PKI has no root.crt)
        if _spki(ca) == _spki(leaf):
            raise InputError(f"the server certificate {cert} has the public key of {rel}: its key is the CA's private "
                             "key, and deliver never serves with a CA key", hint=hint)


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
    refuse_ca_server_files(settings.pki, cert_path, key_path)
    return DeliverOptions(name=name, bind=address, port=chosen_port, lifetime=float(lifetime), fmt=chosen_fmt,
                          cert=cert_path, key=key_path, host=url_host(host, address), password=password, with_ca=with_ca)


# ------------------------------------------------------------------ results

CLOSE_ENDINGS = {
    "closed": "the device closed the connection",
    "reset": "the device reset the connection",
    "timeout": f"the device did not close the connection within {CLOSE_WAIT_SECONDS:g}s",
}


@dataclass(frozen=True)
class Sent:
    """The bundle went out: every byte written, the TLS session closed. Not proof the device kept it (module docstring)."""

    address: str
    port: int
    at: datetime
    ending: str = "closed"  # how the connection ended after the last byte: a key of CLOSE_ENDINGS

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "port": self.port, "at": self.at.isoformat(), "connection_end": self.ending}


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
    """How the delivery ended: `sent` (to whom, when), `withdrawn` (the certificate or the bundle changed before
    a GET could have it: nothing sent), or neither (the link expired unused)."""

    name: str
    serial: str
    fmt: str
    bind: str
    port: int
    started_at: datetime
    expires_at: datetime
    sent: Sent | None
    signed: bool = False
    withdrawn: str | None = None  # why the bundle may no longer go out

    @property
    def delivered(self) -> bool:
        """The bundle was sent (module docstring: sent, the server cannot know it was kept)."""
        return self.sent is not None

    def to_json(self) -> dict[str, Any]:
        """Never the token, never the password."""
        return {"name": self.name, "serial": self.serial, "format": self.fmt, "bind": self.bind, "port": self.port,
                "started_at": self.started_at.isoformat(), "expires_at": self.expires_at.isoformat(),
                "sent": self.delivered, "sent_to": self.sent.to_json() if self.sent else None,
                "withdrawn": self.withdrawn, "expired": not self.delivered and self.withdrawn is None, "signed": self.signed}


# ------------------------------------------------------------------ the link: one download, then gone


class Link:
    """The one-time link's state, shared by the request threads (every change under one lock).

    open -> sending (one GET claimed it) -> done (the whole body sent) ; sending -> open (the transfer broke off
    before the last byte) ; sending -> withdrawn (the re-check before sending found the certificate or the bundle
    changed) ; open -> expired (the lifetime passed unused). Only one request can hold "sending".
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = "open"
        self.sent: Sent | None = None
        self.withdrawn: str | None = None

    def claim(self) -> str:
        """"go" (this request sends the bundle), "busy" (another is sending it) or "gone" (done, withdrawn or expired)."""
        with self._lock:
            if self.state == "open":
                self.state = "sending"
                return "go"
            return "busy" if self.state == "sending" else "gone"

    def complete(self, address: str, port: int, ending: str = "closed") -> None:
        with self._lock:
            self.state = "done"
            self.sent = Sent(address, port, datetime.now(timezone.utc), ending)

    def release(self) -> None:
        with self._lock:
            if self.state == "sending":
                self.state = "open"

    def withdraw(self, reason: str) -> None:
        """The claimed bundle may not go out any more: the link ends, nothing sent."""
        with self._lock:
            if self.state == "sending":
                self.state = "withdrawn"
                self.withdrawn = reason

    def expire(self) -> bool:
        """Close an unused link; False when a transfer is in flight (it may still complete) or it is done."""
        with self._lock:
            if self.state == "open":
                self.state = "expired"
                return True
            return False

    def finished(self) -> bool:
        with self._lock:
            return self.state in ("done", "withdrawn", "expired")


class Recheck:
    """Before the bundle goes out (in the request that claimed the link): is certs/NAME.crt still the certificate
    checked at the start, active now, and certs/NAME.p12 the same bytes? Read under the PKI's shared lock, held
    for that moment only.

    `stop()` (the delivery ending) waits for a re-check in progress and makes later ones refuse: the audit line is
    then written with no request holding the shared lock, and nothing starts going out after it.
    """

    def __init__(self, pki: Pki, name: str, serial: str, p12: bytes, clock: Callable[[], datetime]) -> None:
        self.pki, self.name, self.serial, self.p12, self.clock = pki, name, serial, p12, clock
        self._lock = threading.Lock()
        self._stopped = False

    def __call__(self) -> str | None:
        """None when the bundle may go out, else why not. Raises LockError: a writer held the PKI too long."""
        with self._lock:
            if self._stopped:
                return "the delivery was stopping"
            return still_current(self.pki, self.name, self.serial, self.p12, self.clock())

    def stop(self) -> None:
        if self._lock.acquire(timeout=RECHECK_LOCK_SECONDS + 5):
            self._stopped = True
            self._lock.release()


def still_current(pki: Pki, name: str, serial: str, p12: bytes, now: datetime) -> str | None:
    """None when certs/NAME.crt is still serial `serial`, valid in index.txt and not expired at `now`, and
    certs/NAME.p12 still holds `p12`; else the reason (one line). The same checks as at the start (export's):
    the row of certs/NAME.crt itself, matched by content, never some other valid row of the name.

    Raises:
        LockError: the shared lock was not free within RECHECK_LOCK_SECONDS.
    """
    from mtlsctl.client import current_row
    from mtlsctl.files import read_lock

    files = ClientFiles(name)
    try:
        with read_lock(pki.root, timeout=RECHECK_LOCK_SECONDS):
            row = current_row(pki, name)
            if row.serial != serial:
                return (f"{files.crt} is now serial {row.serial}, no longer {serial} (renewed or replaced while the "
                        "link waited)")
            if row.status == "R":
                return f"the certificate of {name!r} (serial {serial}) was revoked while the link waited"
            if not row.is_active(now):
                return f"the certificate of {name!r} (serial {serial}) expired while the link waited"
            if not hmac.compare_digest(_read_private(pki.path(files.p12), "the bundle", BUNDLE_MAX_BYTES), p12):
                return f"{files.p12} changed while the link waited"
    except LockError:
        raise
    except MtlsError as exc:
        return exc.message
    except OSError as exc:
        return f"{files.p12} cannot be read again: {exc.strerror or exc}"
    return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64  # the stdlib's 5 drops (and resets) the connections of a burst of requests

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext, link: Link, path: str, payload: bytes,
                 headers: dict[str, str], log: Callable[[str], None], recheck: Callable[[], str | None]) -> None:
        import socket

        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.context = context
        self.link = link
        self.secret_path = path.encode("ascii")
        self.payload = payload
        self.payload_headers = headers
        self.log = log
        self.recheck = recheck
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
            self.raw_requestline = self.rfile.readline(REQUEST_LINE_MAX + 1)
        except (OSError, ssl.SSLError):
            self.close_connection = True
            return
        if len(self.raw_requestline) > REQUEST_LINE_MAX:
            # what the stdlib sets before its own 414: send_response logs (log_request) from these
            self.requestline, self.request_version, self.command = "", "", ""
            self.close_connection = True
            self._reply(414, BODY_TOO_LONG)
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
        try:
            withdrawn = self.server.recheck()
        except LockError:  # a writer (renew, revoke) held the PKI too long: never send unchecked; try again later
            link.release()
            self._reply(503, BODY_PKI_BUSY, {"Retry-After": "30"})
            self._log("GET", REDACTED, 503, "the PKI is locked by another mtlsctl; the link stays open")
            return
        except Exception as exc:  # noqa: BLE001 - whatever stopped the check, the bundle is not sent unchecked
            withdrawn = f"the PKI could not be checked again ({type(exc).__name__})"
        if withdrawn is not None:
            link.withdraw(withdrawn)  # before the reply: no other request can get the bundle meanwhile
            self._reply(410, BODY_GONE)
            self._log("GET", REDACTED, 410, f"not sent: {withdrawn}; the link is closed")
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
            link.release()  # the last byte was not written: the link stays open for the next try
            self._log("GET", REDACTED, 200, f"transfer broke off: {type(exc).__name__}; the link stays open")
            return
        # every byte written: the link is used up, however the connection ends (a reset does not show the device
        # lacks the file, and re-opening could hand out a second copy: module docstring)
        ending = self._close_tls()
        link.complete(_peer(self.client_address), int(self.client_address[1]), ending)
        self._log("GET", REDACTED, 200, f"{len(payload)} bytes sent, {CLOSE_ENDINGS[ending]}; the link is used up")

    def _close_tls(self) -> str:
        """After the last byte: close_notify, then wait (CLOSE_WAIT_SECONDS at most) for the device to close its end,
        so the kernel never resets the connection under bytes the device has not read yet. A key of CLOSE_ENDINGS."""
        conn = self.connection
        try:
            conn.settimeout(CLOSE_WAIT_SECONDS)
            conn.unwrap()  # our close_notify, then reads until the device's close_notify
        except TimeoutError:
            return "timeout"
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return "closed"  # the device closed the TCP connection without a close_notify (as many clients do)
        except (OSError, ssl.SSLError):
            return "reset"
        return "closed"


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
                                 hint="give --password-file FILE holding the password printed when the bundle was made; "
                                      "if it is lost, put a new one in FILE, run `mtlsctl export "
                                      f"{opts.name} --force --password-file FILE`, then deliver with the same --password-file FILE")
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
            headers: dict[str, str], log: Callable[[str], None], recheck: Callable[[], str | None]) -> _Server:
    try:
        return _Server((opts.bind, opts.port), context, link, path, payload, headers, log, recheck)
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


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def deliver(settings: Settings, opts: DeliverOptions, runner: Runner, *, announce: Callable[[Ready], None],
            log: Callable[[str], None], linger: float | None = None,
            clock: Callable[[], datetime] = _utcnow) -> DeliverResult:
    """Serve NAME's bundle once (see the module docstring) and say how it ended.

    Args:
        settings: the PKI and profile.
        opts: from `options()`.
        runner: runs openssl (the bundle check, a mobileconfig's signature).
        announce: called once the server listens, with the URL and the password for the person.
        log: receives the server's log lines (redacted: never the token, never the password); called from the
            request threads, concurrently.
        linger: seconds the server keeps answering 410 after the bundle was sent, withdrawn or the link expired
            (default LINGER_SECONDS).
        clock: the time the re-check before sending judges the certificate's expiry by (tests move it on).

    Returns:
        a DeliverResult: `sent` set when every byte of the bundle went out (sent, not known to be kept: module
        docstring), `withdrawn` when a GET came after the certificate or the bundle changed (nothing sent),
        neither when the link expired unused.

    Raises:
        InputError: refused before the server starts (revoked, expired, no bundle, wrong password, a CA's
            certificate or key for the server, ...).
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
    recheck = Recheck(settings.pki, opts.name, bundle.serial, bundle.p12, clock)
    path = "/" + secrets.token_urlsafe(TOKEN_BYTES)
    headers = {"Content-Type": content_type, "Content-Disposition": f'attachment; filename="{file_name}"'}
    server = _listen(opts, context, link, path, payload, headers, log, recheck)
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
        how = "sent" if link.sent else "withdrawn: nothing sent" if link.withdrawn else "expired unused"
        log(f"{how}; answering 410 for {linger:g}s, then stopping")
        end = time.monotonic() + linger
        while time.monotonic() < end:
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))
        if link.sent is None:
            error = f"not sent: {link.withdrawn}" if link.withdrawn else "the link expired unused"
    except KeyboardInterrupt:
        error = "interrupted before the bundle was sent"
        raise
    except BaseException as exc:
        error = f"stopped: {getattr(exc, 'message', None) or type(exc).__name__}"
        raise
    finally:
        link.expire()  # from here on nothing is served, whatever happened
        recheck.stop()  # no request holds the PKI's shared lock while the audit line is written; none sends after
        if thread.is_alive():
            server.shutdown()
        server.server_close()
        _audit(settings, opts, bundle.serial, link.sent, error)
    return DeliverResult(name=opts.name, serial=bundle.serial, fmt=opts.fmt, bind=opts.bind, port=opts.port,
                         started_at=started, expires_at=expires, sent=link.sent, signed=signed, withdrawn=link.withdrawn)


def _wait(link: Link, deadline: float) -> None:
    """Until the link is used up or withdrawn, or the deadline passes with no transfer in flight (one in flight may
    finish; a stalled one is dropped by the request timeout, and then the link expires)."""
    while not link.finished():
        if time.monotonic() >= deadline and link.expire():
            return
        time.sleep(0.05)


def _audit(settings: Settings, opts: DeliverOptions, serial: str, sent: Sent | None, error: str | None) -> None:
    """One line in the audit log: to whom the bundle was sent (address, time, how the connection ended), or why
    nothing was sent. No token, no password."""
    from mtlsctl import audit

    audit.record(settings.pki, "deliver", names=[opts.name], serials=[serial], result="ok" if sent else "failed",
                 error=None if sent else error, address=sent.address if sent else None,
                 sent_at=sent.at.isoformat() if sent else None, connection_end=sent.ending if sent else None,
                 format=opts.fmt, bind=f"{opts.bind}:{opts.port}")
