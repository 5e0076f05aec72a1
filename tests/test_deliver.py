"""`mtlsctl deliver` (issue 15): a one-time HTTPS link, tried with real clients (curl, and Python's ssl trusting only
the CA) on a free loopback port, in single- and two-tier PKIs. The first GET that is sent the whole bundle gets the exact
bundle, then 410; an unused link expires with 410 and exit 1; wrong paths get one 404 body; two concurrent GETs never both get
the bundle; the password is never in the URL, the QR code, the server's log lines or any argv; refusals happen
before anything listens; the PKI is not locked while the link waits."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mtlsctl import deliver, files
from mtlsctl.errors import InputError
from mtlsctl.pki import resolve_settings
from mtlsctl.runner import Runner

from .conftest import is_two_tier, openssl, set_profile

pytestmark = pytest.mark.integration

PASSWORD = "Deliver-Password-5d2a"
REPO = Path(__file__).resolve().parent.parent
URL_RE = re.compile(r"https://127\.0\.0\.1:[0-9]+/[A-Za-z0-9_-]+")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Nothing listens there (connections in TIME_WAIT do not count: SO_REUSEADDR, like the server's own)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def anchor(pki: Path) -> Path:
    """The one certificate a device trusts: the root in a two-tier PKI (the server sends its chain)."""
    return pki / ("ca/root.crt" if is_two_tier(pki) else "ca/ca.crt")


@pytest.fixture
def site(tiered_pki: Path, mtls) -> Path:
    """A PKI with the site's server certificate for 127.0.0.1 and client `phone`, its password in
    private/phone.p12.password (as add-client --from-file and renew leave it)."""
    pki = str(tiered_pki)
    assert mtls(["--pki-dir", pki, "add-server", "localhost", "--san", "DNS:localhost", "--san", "IP:127.0.0.1"]).code == 0
    assert mtls(["--pki-dir", pki, "add-client", "phone", "--password-stdin"], stdin=PASSWORD + "\n").code == 0
    secret = tiered_pki / "private/phone.p12.password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    set_profile(tiered_pki, nginx={"reload_command": "", "test_command": ""})
    return tiered_pki


def client_context(pki: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(anchor(pki)))  # trusts only the CA: verifies chain and IP SAN


def request(pki: Path, url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    m = re.fullmatch(r"https://([^/:]+):([0-9]+)(/.*)", url)
    assert m
    conn = http.client.HTTPSConnection(m.group(1), int(m.group(2)), context=client_context(pki), timeout=30)
    try:
        conn.request(method, m.group(3))
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


class Serving:
    """deliver.deliver() in a thread of this process, as the CLI calls it; `ready` is what the person sees."""

    def __init__(self, pki: Path, linger: float = 0.3, clock=None, **kwargs: object) -> None:  # type: ignore[no-untyped-def]
        settings = resolve_settings(pki, None, environ={})
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        args: dict = {"bind": "127.0.0.1", "port": free_port(), "valid_for": "60s", "fmt": None, **kwargs}
        self.opts = deliver.options(settings, "phone", **args)
        self.settings, self.linger = settings, linger
        self.ready: deliver.Ready | None = None
        self.result: deliver.DeliverResult | None = None
        self.error: BaseException | None = None
        self.logs: list[str] = []
        self._announced = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.result = deliver.deliver(self.settings, self.opts, Runner(), announce=self._announce,
                                          log=self.logs.append, linger=self.linger, clock=self.clock)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc
        finally:
            self._announced.set()

    def _announce(self, ready: deliver.Ready) -> None:
        self.ready = ready
        self._announced.set()

    def start(self) -> Serving:
        self._thread.start()
        assert self._announced.wait(60)
        if self.error is not None:
            raise self.error
        return self

    @property
    def url(self) -> str:
        assert self.ready is not None
        return self.ready.url

    def join(self) -> deliver.DeliverResult:
        self._thread.join(60)
        assert not self._thread.is_alive()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


SHORT_LINGER = "import mtlsctl.deliver as d\nd.LINGER_SECONDS = 1.5"


def start_cli(pki: Path, *args: str, patch: str = SHORT_LINGER, trace: Path | None = None,
              env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """`mtlsctl deliver phone ...` as a process (optionally under strace, optionally with module constants patched
    in the child, or more environment); returns it and its URL, read from its stdout once it listens."""
    code = f"{patch}\nfrom mtlsctl.cli import main\nmain(sys.argv[1:])"
    argv = [sys.executable, "-c", "import sys\n" + code, "--pki-dir", str(pki), "deliver", "phone", "--bind", "127.0.0.1",
            "--port", str(free_port()), *args]
    if trace is not None:
        argv = ["strace", "-f", "-v", "-s", "4096", "-e", "trace=execve", "-o", str(trace), *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("Waiting for the download") or line.startswith('{"event": "ready"'):
            break
    text = "".join(seen)
    m = URL_RE.search(text)
    assert m, (text, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
    return proc, text


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def last_audit(pki: Path) -> dict:
    return json.loads((pki / "audit.log").read_text().splitlines()[-1])


# ------------------------------------------------------------------ the bundle, sent once


@pytest.mark.needs("curl")
def test_the_first_get_is_sent_the_exact_bundle_then_410_and_exit_0(site):
    proc, shown = start_cli(site)
    url = URL_RE.search(shown).group(0)
    got = site.parent / "got.p12"
    curl = subprocess.run(["curl", "-sS", "--cacert", str(anchor(site)), "-o", str(got), "-w", "%{http_code} %{content_type}",
                           url], capture_output=True, text=True, timeout=60)
    assert curl.stdout == "200 application/x-pkcs12", curl.stderr
    assert got.read_bytes() == (site / "certs/phone.p12").read_bytes()
    # the bundle that came over the wire opens with the password shown, and holds the client's certificate
    opened = openssl("pkcs12", "-in", str(got), "-nokeys", "-clcerts", "-passin", "stdin", input=PASSWORD + "\n")
    assert "CN = phone" in opened.stdout or "CN=phone" in opened.stdout
    with pytest.raises(urllib.error.HTTPError) as again:  # Python's urllib, trusting only the CA
        urllib.request.urlopen(url, context=client_context(site), timeout=30)
    assert again.value.code == 410 and again.value.read() == deliver.BODY_GONE
    code, out, err = finish(proc)
    assert code == 0, err
    assert "Sent phone's bundle" in out and "to 127.0.0.1" in out and "the device closed the connection" in out
    assert f"Password to type on the device: {PASSWORD}" in shown
    # the server's log (stderr) shows the path redacted, never the token or the password
    token = url.rsplit("/", 1)[1]
    assert "GET /<token> 200" in err and "GET /<token> 410" in err
    assert token not in err and PASSWORD not in err
    entry = last_audit(site)
    assert (entry["command"], entry["names"], entry["result"], entry["details"]["address"]) == ("deliver", ["phone"], "ok",
                                                                                                 "127.0.0.1")
    audit_text = (site / "audit.log").read_text()
    assert token not in audit_text and PASSWORD not in audit_text
    assert port_is_free(int(url.split(":")[2].split("/")[0]))


def test_an_unused_link_expires_with_410_and_exit_1(site):
    """--for runs out: the link answers 410, the server stops, exit 1 (the minimum duration and the linger are
    shortened in the child, so the test takes seconds)."""
    proc, shown = start_cli(site, "--for", "1s", "--json",
                            patch="import mtlsctl.profile as p, mtlsctl.deliver as d\np.DURATION_MIN_SECONDS = 1\n"
                                  "d.LINGER_SECONDS = 2.0")
    ready = json.loads(shown.strip().splitlines()[-1])
    assert ready["event"] == "ready" and ready["password"] == PASSWORD
    expires = datetime.fromisoformat(ready["expires_at"])
    time.sleep(max(0.0, (expires - datetime.now(timezone.utc)).total_seconds()) + 0.5)  # no GET before: it would download
    status, _, body = request(site, ready["url"])
    assert status == 410 and body == deliver.BODY_GONE
    code, out, err = finish(proc)
    assert code == 1 and "expired" in err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["sent"] is False and result["expired"] is True and result["sent_to"] is None
    assert result["withdrawn"] is None
    assert last_audit(site)["result"] == "failed" and "expired" in last_audit(site)["error"]


def test_wrong_paths_get_one_404_body_near_or_far_and_other_methods_405(site):
    """Planted: a 404 that says how close the guess was (e.g. a different body for a token of the right length);
    the token compared with == instead of hmac.compare_digest is caught by review, not by timing here."""
    serving = Serving(site).start()
    base, token = serving.url.rsplit("/", 1)
    near = token[:-1] + ("A" if token[-1] != "A" else "B")
    wrong = [near, token[:-1], token + "x", "x" * len(token), "", "favicon.ico", token.upper() if token != token.upper() else
             token.lower(), token + "?download=1", token + "/"]
    answers = [request(site, f"{base}/{path}") for path in wrong]
    for status, headers, body in answers:
        headers.pop("date")
        assert status == 404 and body == deliver.BODY_NOT_FOUND
    assert all(a[1] == answers[0][1] for a in answers)  # the same headers, whatever the guess
    for method in ("POST", "HEAD", "PUT", "DELETE", "OPTIONS"):
        status, headers, _ = request(site, serving.url, method)
        assert status == 405 and headers["allow"] == "GET"
    status, headers, body = request(site, serving.url)  # wrong guesses and methods used nothing up
    assert status == 200 and body == (site / "certs/phone.p12").read_bytes()
    assert headers["content-disposition"] == 'attachment; filename="phone.p12"' and headers["cache-control"] == "no-store"
    assert serving.join().delivered
    assert all(token not in line for line in serving.logs) and any("/<wrong path> 404" in line for line in serving.logs)


def test_two_concurrent_gets_never_both_get_the_bundle(site, monkeypatch):
    """Planted: Link.claim checks the state without reserving it (both requests would be sent the bundle).
    The first transfer is held between its last byte and `complete`, so the second GET deterministically
    arrives while a download is in flight."""
    hold, held = threading.Event(), threading.Event()
    real_complete = deliver.Link.complete

    def slow_complete(self, *args):  # type: ignore[no-untyped-def]
        held.set()
        assert hold.wait(30)
        real_complete(self, *args)

    monkeypatch.setattr(deliver.Link, "complete", slow_complete)
    serving = Serving(site).start()
    first: list = []
    t = threading.Thread(target=lambda: first.append(request(site, serving.url)))
    t.start()
    assert held.wait(30)
    second = request(site, serving.url)
    assert second[0] == 409 and second[2] == deliver.BODY_BUSY
    hold.set()
    t.join(30)
    assert first[0][0] == 200 and first[0][2] == (site / "certs/phone.p12").read_bytes()
    third = request(site, serving.url)
    assert third[0] == 410
    assert serving.join().delivered


def test_many_parallel_gets_one_bundle(site):
    serving = Serving(site, linger=2.0).start()  # a GET that connects late still gets its answer (410)
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(request(site, serving.url)[0])) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results).count(200) == 1 and set(results) <= {200, 409, 410}
    serving.join()


def test_a_transfer_that_breaks_off_leaves_the_link_open(site, monkeypatch):
    """Planted: the link used up when the transfer starts (a dropped connection would lose the delivery)."""
    real = deliver._Handler._common_headers
    calls = []

    def flaky(self, length):  # type: ignore[no-untyped-def]
        calls.append(length)
        if len(calls) == 1:
            raise BrokenPipeError("the client went away")
        return real(self, length)

    monkeypatch.setattr(deliver._Handler, "_common_headers", flaky)
    serving = Serving(site).start()
    with pytest.raises((http.client.HTTPException, OSError)):
        request(site, serving.url)
    status, _, body = request(site, serving.url)
    assert status == 200 and body == (site / "certs/phone.p12").read_bytes()
    assert any("broke off" in line for line in serving.logs)
    assert serving.join().delivered


def test_the_pki_is_not_locked_while_the_link_waits(site):
    """Planted: the shared lock held across the wait (renew, revoke and crl would block for the link's lifetime)."""
    serving = Serving(site).start()
    with files.pki_lock(site / files.LOCK_FILE, timeout=1):
        pass
    assert request(site, serving.url)[0] == 200
    serving.join()


def test_mobileconfig_delivery_is_signed_and_typed_for_ios(site, mtls):
    set_profile(site, mobileconfig={"signer_cert": "certs/localhost.crt", "signer_key": "private/localhost.key"})
    serving = Serving(site, fmt="mobileconfig", with_ca=True).start()
    status, headers, body = request(site, serving.url)
    assert status == 200 and headers["content-type"] == "application/x-apple-aspen-config"
    assert headers["content-disposition"] == 'attachment; filename="phone.mobileconfig"'
    signed = site.parent / "phone.mobileconfig"
    signed.write_bytes(body)
    content = site.parent / "content.plist"
    verify = openssl("smime", "-verify", "-inform", "der", "-in", str(signed), "-CAfile", str(anchor(site)), "-purpose", "any",
                     "-out", str(content), check=False)
    assert verify.returncode == 0, verify.stderr
    import plistlib

    profile = plistlib.loads(content.read_bytes())
    inner = next(p for p in profile["PayloadContent"] if p["PayloadType"] == "com.apple.security.pkcs12")
    assert inner["PayloadContent"] == (site / "certs/phone.p12").read_bytes() and PASSWORD.encode() not in content.read_bytes()
    result = serving.join()
    assert result.signed and result.to_json()["format"] == "mobileconfig"


# ------------------------------------------------------------------ secrets


@pytest.mark.needs("strace", "curl")
def test_the_password_is_never_in_the_url_the_qr_code_the_log_or_any_argv(site, tmp_path):
    """Planted: the password in the URL (?pw=...), in the QR payload, in a log line, or on openssl's argv
    (-passin pass:...) when the bundle is checked."""
    import segno

    trace = tmp_path / "trace"
    proc, shown = start_cli(site, trace=trace)
    url = URL_RE.search(shown).group(0)
    token = url.rsplit("/", 1)[1]
    assert PASSWORD not in url and len(token) >= 43  # token_urlsafe(32): 256 bits
    # the QR code drawn is exactly the URL's (segno's own rendering of the URL and nothing else)
    expected = _terminal_qr(segno.make(url, error="m", micro=False))
    assert expected in shown
    assert _terminal_qr(segno.make(url + PASSWORD, error="m", micro=False)) not in shown
    curl = subprocess.run(["curl", "-sS", "--cacert", str(anchor(site)), "-o", "/dev/null", "-w", "%{http_code}", url],
                          capture_output=True, text=True, timeout=60)
    assert curl.stdout == "200"
    code, out, err = finish(proc)
    assert code == 0, err
    logged = trace.read_text(errors="replace")
    execs = [line for line in logged.splitlines() if "execve(" in line]
    assert any('"pkcs12"' in line and '"-passin", "fd:' in line for line in execs), execs
    assert PASSWORD not in logged and token not in logged
    assert PASSWORD not in err and token not in err


def _terminal_qr(qr) -> str:  # type: ignore[no-untyped-def]
    import io

    buf = io.StringIO()
    qr.terminal(out=buf, compact=True)
    return buf.getvalue()


def test_the_qr_code_is_made_from_the_url_only(monkeypatch):
    import segno

    given: list = []
    real = segno.make
    monkeypatch.setattr(segno, "make", lambda content, **kw: given.append(content) or real(content, **kw))
    url = deliver.format_url("192.0.2.10", 8443, "/tok")
    qr = deliver.qr_code(url)
    assert given == ["https://192.0.2.10:8443/tok"]
    assert qr.designator and qr.matrix == real(url, error="m", micro=False).matrix
    assert deliver.format_url("2001:db8::1", 443, "/t") == "https://[2001:db8::1]:443/t"


# ------------------------------------------------------------------ refusals, before anything listens


def _refused(mtls, pki: Path, *args: str, port: int | None = None) -> str:
    port = port or free_port()
    # --for 10s: should a refusal ever be missed, the test fails in seconds instead of serving for 10 minutes
    res = mtls(["--pki-dir", str(pki), "deliver", "phone", "--port", str(port), "--for", "10s", *args])
    assert res.code == 2, (args, res.out, res.err)
    assert "Traceback" not in res.err and "https://" not in res.out
    assert port_is_free(port)  # nothing was left listening
    return res.err


def test_refusals_before_anything_listens(site, mtls, tmp_path):
    bind = ["--bind", "127.0.0.1"]
    assert "no default" in _refused(mtls, site)  # no address
    assert "not an IP address" in _refused(mtls, site, "--bind", "localhost")
    res = mtls(["--pki-dir", str(site), "deliver", "phone", "--bind", "127.0.0.1", "--port", "0"])
    assert res.code == 2 and "out of range" in res.err
    res = mtls(["--pki-dir", str(site), "deliver", "phone", "--bind", "127.0.0.1", "--port", "70000"])
    assert res.code == 2 and "out of range" in res.err
    for bad in ("5s", "25h", "10", "ten minutes", "1d"):
        assert "--for" in _refused(mtls, site, *bind, "--for", bad)
    assert "not a delivery format" in _refused(mtls, site, *bind, "--format", "zip")
    assert "go together" in _refused(mtls, site, *bind, "--cert", str(site / "certs/localhost.crt"))
    assert "is not a file" in _refused(mtls, site, *bind, "--cert", str(tmp_path / "none.crt"), "--key", str(tmp_path / "none.key"))
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not the password\n")
    assert "does not open with the password" in _refused(mtls, site, *bind, "--password-file", str(wrong))
    # the profile may not open every interface; the command line may
    bad = tmp_path / "bad.yaml"
    bad.write_text("deliver: {bind: 0.0.0.0}\n")
    res = mtls(["--pki-dir", str(site), "--profile", str(bad), "deliver", "phone"])
    assert res.code == 2 and "invalid profile" in res.err and "only as --bind 0.0.0.0" in res.err
    # and the core refuses it too, for a profile that reached it unvalidated
    from mtlsctl.pki import Settings
    from mtlsctl.profile import DeliverProfile, default_profile

    settings = resolve_settings(site, None, environ={})
    unchecked = Settings(settings.pki, default_profile().model_copy(
        update={"deliver": DeliverProfile.model_construct(bind="::", port=8443, valid_for="10m")}), "test")
    with pytest.raises(InputError, match="only as --bind ::"):
        deliver.options(unchecked, "phone", bind=None, port=None, valid_for=None, fmt=None)
    opts = deliver.options(resolve_settings(site, None, environ={}), "phone", bind="0.0.0.0", port=8443, valid_for=None,
                           fmt=None)
    assert opts.bind == "0.0.0.0" and opts.lifetime == 600  # the default --for: 10 minutes
    set_profile(site, deliver={"bind": "127.0.0.1"})
    assert deliver.options(resolve_settings(site, None, environ={}), "phone", bind=None, port=None, valid_for=None,
                           fmt=None).bind == "127.0.0.1"


def test_refused_for_a_revoked_certificate(site, mtls):
    assert mtls(["--pki-dir", str(site), "revoke", "phone", "--no-reload"]).code == 0
    err = _refused(mtls, site, "--bind", "127.0.0.1")
    assert "revoked" in err and "no bundle is made" in err


@pytest.mark.needs("faketime")
def test_refused_for_an_expired_certificate(site):
    when = (datetime.now(timezone.utc) + timedelta(days=400)).strftime("%Y-%m-%d %H:%M:%S")
    port = free_port()
    res = subprocess.run(["faketime", when, sys.executable, "-m", "mtlsctl", "--pki-dir", str(site), "deliver", "phone",
                          "--bind", "127.0.0.1", "--port", str(port), "--for", "10s", "--cert", str(site / "certs/localhost.crt"),
                          "--key", str(site / "private/localhost.key")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 2 and "https://" not in res.stdout, res.stderr
    assert "the certificate of 'phone'" in res.stderr and "is expired; no bundle is made" in res.stderr
    assert port_is_free(port)


def test_refused_without_a_server_certificate_or_a_stored_password(tiered_pki, mtls, tmp_path):
    pki = str(tiered_pki)
    assert mtls(["--pki-dir", pki, "add-client", "phone", "--password-stdin"], stdin=PASSWORD + "\n").code == 0
    err = _refused(mtls, tiered_pki, "--bind", "127.0.0.1")
    assert "server certificate" in err and "is not a file" in err and "add-server" in err  # the profile's placeholder
    assert mtls(["--pki-dir", pki, "add-server", "localhost", "--san", "IP:127.0.0.1"]).code == 0
    err = _refused(mtls, tiered_pki, "--bind", "127.0.0.1")
    assert "not stored" in err and "--password-file" in err


def test_refused_for_an_older_bundle(site, mtls, tmp_path):
    """Planted: the bundle served without checking it holds certs/NAME.crt (a stale bundle of an older certificate)."""
    assert mtls(["--pki-dir", str(site), "add-client", "tablet", "--password-stdin"], stdin=PASSWORD + "\n").code == 0
    (site / "certs/phone.p12").write_bytes((site / "certs/tablet.p12").read_bytes())
    assert "older bundle" in _refused(mtls, site, "--bind", "127.0.0.1")


@pytest.mark.needs("faketime")
def test_an_expired_server_certificate_is_refused(site, mtls, tmp_path):
    key, crt = tmp_path / "old.key", tmp_path / "old.crt"
    subprocess.run(["faketime", "2020-01-01 00:00:00", "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(crt), "-subj", "/CN=old",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-addext", "basicConstraints=critical,CA:FALSE", "-days", "1"],
                   check=True, capture_output=True)
    err = _refused(mtls, site, "--bind", "127.0.0.1", "--cert", str(crt), "--key", str(key))
    assert f"the server certificate {crt} expired on 2020-01-02" in err


# ------------------------------------------------------------------ Ctrl-C, units


def test_ctrl_c_stops_the_server_exit_130(site):
    proc, shown = start_cli(site, "--no-qr")
    url = URL_RE.search(shown).group(0)
    assert "█" not in shown
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc)
    assert code == 130 and "interrupted" in err
    assert port_is_free(int(url.split(":")[2].split("/")[0]))
    entry = last_audit(site)
    assert entry["result"] == "failed" and "interrupted" in entry["error"]


def test_the_link_state_machine():
    link = deliver.Link()
    assert link.claim() == "go" and link.claim() == "busy"
    link.release()
    assert link.claim() == "go"
    assert not link.expire()  # a transfer in flight may still complete
    link.complete("192.0.2.7", 50000)
    assert link.claim() == "gone" and link.finished() and link.sent and link.sent.address == "192.0.2.7"
    other = deliver.Link()
    assert other.expire() and other.claim() == "gone" and other.sent is None


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("10m", 600), ("1h", 3600), ("24h", 86400), ("10s", 10)])
def test_durations(text, seconds):
    assert deliver.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["9s", "25h", "0m", "10", "1.5h", "10M", " 10m", "10m\n", "-1m"])
def test_bad_durations(text):
    with pytest.raises(InputError):
        deliver.parse_duration(text)


def test_the_result_json_never_holds_the_token_or_the_password(site):
    serving = Serving(site).start()
    assert request(site, serving.url)[0] == 200
    result = serving.join()
    text = json.dumps(result.to_json())
    assert serving.url.rsplit("/", 1)[1] not in text and PASSWORD not in text
    assert replace(serving.opts, password="x") != serving.opts and "password" not in repr(serving.opts)


# ------------------------------------------------------------------ review findings (F1, F3, F5, F6, F7, F8)


def raw_get(pki: Path, url: str, path: str | None = None) -> ssl.SSLSocket:
    """A GET over a TLS socket this test controls (when to read, close or reset); a ragged EOF raises here."""
    m = re.fullmatch(r"https://([^/:]+):([0-9]+)(/.*)", url)
    assert m
    sock = socket.create_connection((m.group(1), int(m.group(2))), timeout=30)
    tls = client_context(pki).wrap_socket(sock, server_hostname=m.group(1), suppress_ragged_eofs=False)
    tls.sendall(f"GET {path if path is not None else m.group(3)} HTTP/1.1\r\nHost: {m.group(1)}\r\n\r\n".encode("latin-1"))
    return tls


def read_response(tls: ssl.SSLSocket) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and exactly Content-Length bytes of body: nothing after them is read."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        assert chunk, data
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = tls.recv(65536)
        assert chunk
        body += chunk
    return int(lines[0].split()[1]), headers, body


def wait_for(predicate, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


# F1: the certificate or the bundle changed while the link waited


def test_a_certificate_revoked_while_the_link_waits_is_not_sent(site, mtls):
    """F1. Planted: no re-check before sending (the revoked certificate's bundle went out, exit 0)."""
    proc, shown = start_cli(site)
    url = URL_RE.search(shown).group(0)
    assert mtls(["--pki-dir", str(site), "revoke", "phone", "--no-reload"]).code == 0  # the real revoke, the link open
    status, _, body = request(site, url)
    assert status == 410 and body == deliver.BODY_GONE  # the bundle's bytes never went out
    assert request(site, url)[0] == 410  # and the link is closed
    code, out, err = finish(proc)
    assert code == 1, err
    assert "Sent" not in out and "Nothing was sent" in err and "revoked while the link waited" in err
    assert re.search(r"GET /<token> 410 \(not sent: the certificate of 'phone' \(serial [0-9A-F]+\) was revoked", err)
    entry = last_audit(site)
    assert entry["command"] == "deliver" and entry["result"] == "failed"
    assert "not sent" in entry["error"] and "revoked" in entry["error"] and entry["details"].get("sent_at") is None


def test_a_certificate_that_expires_while_the_link_waits_is_not_sent(site):
    """F1, by the injected clock (the re-check judges expiry by it). Planted: expiry not re-checked."""
    later = [timedelta(0)]
    serving = Serving(site, clock=lambda: datetime.now(timezone.utc) + later[0]).start()
    later[0] = timedelta(days=4000)  # past any test certificate's notAfter
    status, _, body = request(site, serving.url)
    assert status == 410 and body == deliver.BODY_GONE
    result = serving.join()
    assert result.sent is None and result.withdrawn and "expired while the link waited" in result.withdrawn
    assert result.to_json()["withdrawn"] == result.withdrawn and result.to_json()["expired"] is False
    assert any("GET /<token> 410 (not sent:" in line for line in serving.logs)
    entry = last_audit(site)
    assert entry["result"] == "failed" and "expired while the link waited" in entry["error"]


def test_a_certificate_renewed_while_the_link_waits_is_not_sent(site, mtls):
    """F1: renew supersedes certs/phone.crt (a new serial, a new bundle). Planted: the serial not compared."""
    serving = Serving(site).start()
    res = mtls(["--pki-dir", str(site), "renew", "--within", "3650", "--no-reload"])
    assert res.code == 0, res.err
    status, _, body = request(site, serving.url)
    assert status == 410 and body == deliver.BODY_GONE
    result = serving.join()
    assert result.sent is None and "is now serial" in (result.withdrawn or "") and result.serial in (result.withdrawn or "")


def test_a_bundle_rewritten_while_the_link_waits_is_not_sent(site, mtls):
    """F1: certs/phone.p12 is no longer the bytes checked. Planted: the bundle file not re-read."""
    assert mtls(["--pki-dir", str(site), "add-client", "tablet", "--password-stdin"], stdin=PASSWORD + "\n").code == 0
    serving = Serving(site).start()
    (site / "certs/phone.p12").write_bytes((site / "certs/tablet.p12").read_bytes())
    status, _, body = request(site, serving.url)
    assert status == 410 and body == deliver.BODY_GONE
    assert "certs/phone.p12 changed" in (serving.join().withdrawn or "")


def test_while_a_writer_holds_the_pki_nothing_is_sent_unchecked(site, monkeypatch):
    """F1: the re-check waits RECHECK_LOCK_SECONDS for the shared lock; a writer holding the PKI longer gets the GET
    a 503 and the link stays open. Planted: the bundle sent when the lock could not be had."""
    monkeypatch.setattr(deliver, "RECHECK_LOCK_SECONDS", 0.5)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom pathlib import Path\nfrom mtlsctl import files\n"
         "with files.pki_lock(Path(sys.argv[1]) / files.LOCK_FILE):\n    print('held', flush=True)\n    sys.stdin.read()\n",
         str(site)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        serving = Serving(site).start()
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        status, headers, body = request(site, serving.url)
        assert status == 503 and body == deliver.BODY_PKI_BUSY and headers["retry-after"] == "30"
    finally:
        holder.communicate("", timeout=30)
    status, _, body = request(site, serving.url)
    assert status == 200 and body == (site / "certs/phone.p12").read_bytes()
    assert serving.join().delivered


@pytest.mark.parametrize("tiered_pki", ["single"], indirect=True)
def test_a_recheck_that_breaks_sends_nothing_and_ends_the_link(site, monkeypatch):
    """F1: an unexpected error in the re-check. Planted: no catch-all (the request died holding the claim: the link
    stayed 'sending' and the delivery never ended)."""

    def broken(*args):  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug")

    monkeypatch.setattr(deliver, "still_current", broken)
    serving = Serving(site, valid_for="10s").start()
    status, _, body = request(site, serving.url)
    assert status == 410 and body == deliver.BODY_GONE
    result = serving.join()
    assert result.sent is None and result.withdrawn == "the PKI could not be checked again (RuntimeError)"


# F3: every spelling of "every interface", and IPv4-mapped addresses


EVERY_INTERFACE = [("0.0.0.0", "0.0.0.0"), ("::", "::"), ("::0.0.0.0", "::"), ("0:0:0:0:0:0:0:0", "::")]
IPV4_MAPPED = [("::ffff:0.0.0.0", "0.0.0.0"), ("::ffff:0:0", "0.0.0.0"), ("::ffff:127.0.0.1", "127.0.0.1")]


def _profile_refuses(mtls, pki: Path, tmp_path: Path, bind: str) -> str:  # type: ignore[no-untyped-def]
    profile = tmp_path / "bind.yaml"
    profile.write_text(f"deliver: {{bind: '{bind}'}}\n")
    res = mtls(["--pki-dir", str(pki), "--profile", str(profile), "deliver", "phone", "--port", str(free_port()),
                "--for", "10s"])
    assert res.code == 2 and "invalid profile" in res.err and "Traceback" not in res.err and "https://" not in res.out, res
    return res.err


def _core_refuses(pki: Path, bind: str) -> str:
    """For a profile that reached the core unvalidated (model_construct)."""
    from mtlsctl.pki import Settings
    from mtlsctl.profile import DeliverProfile, default_profile

    settings = resolve_settings(pki, None, environ={})
    unchecked = Settings(settings.pki, default_profile().model_copy(
        update={"deliver": DeliverProfile.model_construct(bind=bind, port=8443, valid_for="10m")}), "test")
    with pytest.raises(InputError) as refused:
        deliver.options(unchecked, "phone", bind=None, port=None, valid_for=None, fmt=None)
    return refused.value.message


@pytest.mark.parametrize("tiered_pki", ["single"], indirect=True)
def test_every_interface_in_any_spelling_only_as_bind(site, mtls, tmp_path):
    """F3. Planted: ::0.0.0.0 or 0:0:0:0:0:0:0:0 taken for a particular address."""
    for form, canonical in EVERY_INTERFACE:
        assert f"only as --bind {canonical}" in _profile_refuses(mtls, site, tmp_path, form), form
        assert f"only as --bind {canonical}" in _core_refuses(site, form), form
        opts = deliver.options(resolve_settings(site, None, environ={}), "phone", bind=form, port=8443, valid_for=None,
                               fmt=None)
        assert opts.bind == canonical, form


@pytest.mark.parametrize("tiered_pki", ["single"], indirect=True)
def test_ipv4_mapped_addresses_are_refused_everywhere(site, mtls, tmp_path):
    """F3: ::ffff:0.0.0.0 listens on every IPv4 interface (Python 3.11 does not call it unspecified). Planted: no
    IPv4-mapped check (the profile's ::ffff:0.0.0.0 was accepted)."""
    for form, ipv4 in IPV4_MAPPED:
        wanted = f"IPv4-mapped IPv6 address{' (every IPv4 interface)' if ipv4 == '0.0.0.0' else ''}; give its IPv4 form, {ipv4}"
        assert wanted in _profile_refuses(mtls, site, tmp_path, form), form
        assert wanted in _core_refuses(site, form), form
        err = _refused(mtls, site, "--bind", form)
        assert f"--bind {form} is an {wanted}" in err, err


# F5: sent, then the TLS session closed; a reset does not re-open the link


def test_the_bundle_counts_as_sent_once_the_tls_session_is_closed(site):
    """F5. Planted: the link used up as soon as the last byte reached the kernel (no close_notify, no waiting for
    the device): the server's close is then a ragged EOF here, and the 'sent' line comes before the device closed."""
    serving = Serving(site).start()
    tls = raw_get(site, serving.url)
    status, headers, body = read_response(tls)
    assert status == 200 and body == (site / "certs/phone.p12").read_bytes()
    assert tls.recv(1) == b""  # the server's close_notify: a TCP close without one raises SSLEOFError here
    time.sleep(0.5)
    assert not any(" 200 (" in line for line in serving.logs) and serving.result is None  # it waits for the device
    tls.unwrap()  # the device's close_notify
    tls.close()
    result = serving.join()
    assert result.sent is not None and result.sent.ending == "closed"
    assert any(re.fullmatch(r"127\.0\.0\.1 GET /<token> 200 \([0-9]+ bytes sent, the device closed the connection; "
                            r"the link is used up\)", line) for line in serving.logs), serving.logs
    details = last_audit(site)["details"]
    assert details["connection_end"] == "closed" and details["sent_at"] == result.sent.at.isoformat()


@pytest.mark.parametrize("tiered_pki", ["single"], indirect=True)
@pytest.mark.parametrize("ending", ["reset", "timeout"])
def test_a_device_that_resets_or_never_closes_still_used_the_link(site, monkeypatch, ending):
    """F5: the whole body was sent; a reset (or no close) after it does not show the device lacks the file, so the
    link stays used (re-opening it could hand out a second copy). Planted: the link released on a reset."""
    import struct

    monkeypatch.setattr(deliver, "CLOSE_WAIT_SECONDS", 0.5)
    serving = Serving(site, linger=2.0).start()
    tls = raw_get(site, serving.url)
    status, _, body = read_response(tls)
    assert status == 200 and body == (site / "certs/phone.p12").read_bytes()
    if ending == "reset":
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        tls.close()
    wait_for(lambda: any(" 200 (" in line for line in serving.logs))
    assert request(site, serving.url)[0] == 410  # no second copy
    tls.close()
    result = serving.join()
    assert result.sent is not None and result.sent.ending == ending
    assert any(deliver.CLOSE_ENDINGS[ending] in line and "bytes sent" in line for line in serving.logs), serving.logs


# F6: never a CA's certificate or key in the server


def test_a_ca_certificate_or_key_is_never_the_servers(site, mtls, tmp_path):
    """F6. Planted, each alone: no basicConstraints check; no same-file check on the key; no public-key comparison."""
    bind = ["--bind", "127.0.0.1"]
    server_crt, server_key = str(site / "certs/localhost.crt"), str(site / "private/localhost.key")
    # a CA certificate from elsewhere, with its own key (openssl req -x509 makes CA:TRUE by default): would serve
    other_key, other = tmp_path / "other.key", tmp_path / "other.crt"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(other_key),
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1", "-out", str(other))
    assert "is a CA certificate (basicConstraints CA:TRUE)" in _refused(mtls, site, *bind, "--cert", str(other), "--key",
                                                                        str(other_key))
    cas = [("ca/ca.crt", "private/ca.key")] + ([("ca/root.crt", "private/root.key")] if is_two_tier(site) else [])
    for crt, key in cas:
        err = _refused(mtls, site, *bind, "--cert", str(site / crt), "--key", str(site / key))
        assert f"is the CA's private key ({key})" in err and len(err.strip().splitlines()) <= 2
        err = _refused(mtls, site, *bind, "--cert", str(site / crt), "--key", server_key)
        assert "is a CA certificate (basicConstraints CA:TRUE)" in err
    # the CA key under another name: a symbolic link (samefile; without the check tls_context refuses it as a mismatch)
    link = tmp_path / "server.key"
    link.symlink_to(site / "private/ca.key")
    assert "is the CA's private key (private/ca.key)" in _refused(mtls, site, *bind, "--cert", server_crt, "--key", str(link))
    # a copy of the CA key behind a leaf certificate made for it (no CA, names 127.0.0.1, serverAuth): would serve
    copy, leaf = tmp_path / "copy.key", tmp_path / "leaf.crt"
    copy.write_bytes((site / "private/ca.key").read_bytes())
    copy.chmod(0o600)
    openssl("req", "-x509", "-key", str(copy), "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-addext", "basicConstraints=critical,CA:FALSE", "-addext", "extendedKeyUsage=serverAuth", "-days", "1",
            "-out", str(leaf))
    assert "has the public key of ca/ca.crt" in _refused(mtls, site, *bind, "--cert", str(leaf), "--key", str(copy))


# F7, F8: an overlong request line; log lines from many threads at once


@pytest.mark.parametrize("tiered_pki", ["single"], indirect=True)
def test_an_overlong_request_line_gets_414_without_a_traceback(site):
    """F7. Planted: requestline/request_version/command not set before the 414 (AttributeError in send_response:
    no answer, 'connection error')."""
    proc, shown = start_cli(site)
    url = URL_RE.search(shown).group(0)
    tls = raw_get(site, url, path="/" + "a" * 70_000)
    status, _, body = read_response(tls)
    tls.close()
    assert status == 414 and body == deliver.BODY_TOO_LONG
    assert request(site, url)[0] == 200  # the link was not used up
    code, _, err = finish(proc)
    assert code == 0, err
    assert "Traceback" not in err and "connection error" not in err and "? <long request line> 414" in err


LOG_LINE = re.compile(r"[0-9]{2}:[0-9]{2}:[0-9]{2} (?:127\.0\.0\.1 (?:GET|\?) /<(?:token|wrong path)> [0-9]{3}(?: \(.*\))?"
                      r"|127\.0\.0\.1 (?:TLS handshake failed \(.*\)|connection error)"
                      r"|sent; answering 410 for [0-9.]+s, then stopping)")


# The child's stderr as an unbuffered stream on a slow reader (PYTHONUNBUFFERED=1, a terminal over ssh): every write()
# is its own syscall, and the thread gives up the interpreter while it waits. print() writes the line and its newline
# apart: between the two, another request thread writes its own line.
SLOW_STDERR = """\
import io, os, sys, time
import mtlsctl.deliver as d
d.LINGER_SECONDS = 5.0


class SlowStderr(io.RawIOBase):
    def writable(self):
        return True

    def write(self, data):
        written = os.write(2, bytes(data))
        time.sleep(0.002)
        return written


sys.stderr = io.TextIOWrapper(SlowStderr(), encoding="utf-8", write_through=True)
"""


@pytest.mark.parametrize("tiered_pki", ["single"], indirect=True)
def test_log_lines_from_60_concurrent_requests_never_interleave(site):
    """F8: each line one write, under a lock. Planted: print() (the line, then the newline: two writes, and
    the lines of concurrent requests run into each other)."""
    proc, shown = start_cli(site, patch=SLOW_STDERR)
    url = URL_RE.search(shown).group(0)
    base = url.rsplit("/", 1)[0]
    go = threading.Barrier(60)
    statuses: list[int | str] = []

    def one(i: int) -> None:
        go.wait()
        try:
            statuses.append(request(site, url if i % 3 else f"{base}/wrong{i}")[0])
        except (OSError, http.client.HTTPException) as exc:
            statuses.append(repr(exc))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    code, _, err = finish(proc)
    assert code == 0, err
    assert statuses.count(200) == 1 and len(statuses) == 60 and set(statuses) <= {200, 404, 409, 410}, statuses
    lines = err.split("\n")
    assert lines[-1] == "" and len(lines) > 60
    bad = [line for line in lines[:-1] if not LOG_LINE.fullmatch(line)]
    assert not bad, bad
