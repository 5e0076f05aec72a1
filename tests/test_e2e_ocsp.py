"""OCSP end to end: `mtlsctl ocsp serve` (real `openssl ocsp`), nginx with ssl_ocsp, curl on loopback; single-tier
and two-tier (root -> issuing CA -> OCSP signer and clients). And the supervisor's restart policy, with fakes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from mtlsctl import ocsp
from mtlsctl.demo import LocalNginx, free_port, wait_for_port
from mtlsctl.demo_backend import EchoHandler
from mtlsctl.pki import resolve_settings
from mtlsctl.runner import Runner

from .conftest import openssl, require_tool, run_cli, set_profile

REPO = Path(__file__).resolve().parent.parent
e2e = pytest.mark.e2e


def halt(local: LocalNginx) -> None:
    """SIGTERM to the nginx master this test started; a zombie counts as stopped (init reaps it late here)."""
    pid = local.master()
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except (OSError, IndexError):
            return
        time.sleep(0.02)


TIERS = {
    "single": {"subject": {"CN": "OCSP CA"}, "key": {"type": "ec"}, "days": 800},
    "two-tier": {"subject": {"CN": "OCSP Root CA"}, "key": {"type": "ec"}, "days": 800,
                 "intermediate": {"subject": {"CN": "OCSP Issuing CA"}, "key": {"type": "ec"}, "days": 700}},
}


@pytest.fixture
def ocsp_site(tmp_path):
    require_tool("nginx")
    require_tool("curl")
    started: list = []

    def make(cache: bool, nmin: int = 1, tier: str = "single"):
        pki, local = tmp_path / "pki", LocalNginx(tmp_path / "nginx")
        port, oport, bport = free_port(), free_port(), free_port()
        backend = ThreadingHTTPServer(("127.0.0.1", bport), EchoHandler)
        threading.Thread(target=backend.serve_forever, daemon=True).start()
        started.append(backend.shutdown)
        prof = tmp_path / "p.yaml"
        prof.write_text(yaml.safe_dump({
            "ca": TIERS[tier],
            "clients": {"key": {"type": "ec"}},
            "ocsp": {"url": f"http://127.0.0.1:{oport}", "port": oport, "nmin": nmin, "cache": cache},
            "nginx": local.nginx_section(pki, port, bport),
        }))
        assert run_cli(["--pki-dir", str(pki), "--profile", str(prof), "init"]).code == 0
        assert run_cli(["--pki-dir", str(pki), "add-server", "localhost", "--san", "IP:127.0.0.1"]).code == 0
        for name in ("phone", "tablet"):
            assert run_cli(["--pki-dir", str(pki), "add-client", name]).code == 0
        responder = subprocess.Popen([sys.executable, "-m", "mtlsctl", "--pki-dir", str(pki), "ocsp", "serve",
                                      "--health-interval", "1"], env={**os.environ, "PYTHONPATH": str(REPO)},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(lambda: (responder.terminate(), responder.wait()))
        deadline = time.monotonic() + 10  # ready when it answers a real request (a bare port probe would hang it)
        while run_cli(["--pki-dir", str(pki), "ocsp", "check", "tablet"]).code != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        (local.prefix / "logs").mkdir(parents=True)
        res = run_cli(["--pki-dir", str(pki), "nginx", "render", "--out", str(local.prefix / "site.conf")])
        assert res.code == 0, res.err
        local.write((local.prefix / "site.conf").read_text())
        local.start(port)
        started.append(lambda: halt(local))
        trust = "ca/chain.pem" if tier == "two-tier" else "ca/ca.crt"

        def curl(name: str) -> int:
            res = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", trust,
                                  "--cert", f"certs/{name}.crt", "--key", f"private/{name}.key", f"https://127.0.0.1:{port}/"],
                                 cwd=pki, capture_output=True, text=True)
            return int(res.stdout or 0)
        return pki, curl, responder

    yield make
    for stop in reversed(started):
        stop()


def responder_pid(pki: Path) -> int:
    return int((pki / ocsp.PID_FILE).read_text())


@e2e
@pytest.mark.parametrize("tier", ["single", "two-tier"])
def test_ocsp_revocation_reaches_nginx_without_a_reload(ocsp_site, tier):
    pki, curl, _ = ocsp_site(cache=False, tier=tier)
    site = (pki.parent / "nginx/site.conf").read_text()
    assert "ssl_ocsp leaf;" in site and "ssl_ocsp_responder http://127.0.0.1:" in site
    assert curl("phone") == 200
    ok = run_cli(["--pki-dir", str(pki), "ocsp", "check", "phone", "--json"])  # verified against the chain in two-tier
    assert ok.code == 0 and '"status": "good"' in ok.out, ok.out + ok.err
    res = run_cli(["--pki-dir", str(pki), "revoke", "phone", "--no-reload"])  # nginx keeps the old CRL
    assert res.code == 0 and "primed" in res.err
    check = run_cli(["--pki-dir", str(pki), "ocsp", "check", "phone", "--json"])
    assert check.code == 1 and '"status": "revoked"' in check.out  # at once
    assert curl("phone") == 400  # no reload: OCSP alone refuses it
    assert curl("tablet") == 200


@e2e
def test_two_tier_liveness_is_not_verification(ocsp_site):
    """Two-tier: answers verify against ca/chain.pem (the issuing CA alone cannot verify them), and the supervisor
    restarts a responder only when it does not answer, never because an answer does not verify."""
    pki, curl, _ = ocsp_site(cache=False, tier="two-tier")
    pid = responder_pid(pki)
    time.sleep(2.5)  # health requests every second
    assert responder_pid(pki) == pid
    chain = (pki / "ca/chain.pem").read_text()
    (pki / "ca/chain.pem").write_text((pki / "ca/ca.crt").read_text())  # what `ocsp check` used to trust
    try:
        check = run_cli(["--pki-dir", str(pki), "ocsp", "check", "tablet"])
        assert check.code == 1 and "tablet: unverified (Verify error: unable to get issuer certificate)" in check.out, check.out
        time.sleep(2.5)
        assert responder_pid(pki) == pid  # it answers: a restart would not help, and none happened
    finally:
        (pki / "ca/chain.pem").write_text(chain)
    assert run_cli(["--pki-dir", str(pki), "ocsp", "check", "tablet"]).code == 0
    assert curl("tablet") == 200


def _response_signer_serial(pki: Path, name: str) -> int:
    from cryptography.x509 import ocsp as x509_ocsp

    url = yaml.safe_load((pki / "mtls.yaml").read_text())["ocsp"]["url"]
    openssl("ocsp", "-issuer", "ca/ca.crt", "-cert", f"certs/{name}.crt", "-url", url, "-noverify", "-respout", "resp.der",
            "-timeout", "5", cwd=pki)
    resp = x509_ocsp.load_der_ocsp_response((pki / "resp.der").read_bytes())
    return resp.certificates[0].serial_number


def _serial(pki: Path, crt: str) -> int:
    return int(openssl("x509", "-in", crt, "-noout", "-serial", cwd=pki).stdout.strip().split("=", 1)[1], 16)


@e2e
@pytest.mark.parametrize("tier", ["two-tier"])
def test_the_responder_restarts_when_its_signer_is_renewed(ocsp_site, tier):
    pki, curl, _ = ocsp_site(cache=False, tier=tier)
    old = _serial(pki, "certs/ocsp-responder.crt")
    assert _response_signer_serial(pki, "tablet") == old
    pid = responder_pid(pki)
    res = run_cli(["--pki-dir", str(pki), "renew", "--within", "100", "--no-reload", "--json"])  # signer: 90 days
    assert res.code == 0, res.err
    assert [r["name"] for r in yaml.safe_load(res.out)["renewed"]] == ["ocsp-responder"]
    new = _serial(pki, "certs/ocsp-responder.crt")
    assert new != old
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and responder_pid(pki) == pid:
        time.sleep(0.2)
    assert responder_pid(pki) != pid
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and run_cli(["--pki-dir", str(pki), "ocsp", "check", "tablet"]).code != 0:
        time.sleep(0.2)
    assert _response_signer_serial(pki, "tablet") == new  # answers are signed with the renewed certificate
    assert curl("tablet") == 200


@e2e
def test_responder_down_means_clients_are_refused(ocsp_site):
    """Documented behaviour: with ssl_ocsp, nginx refuses a client it cannot check (fail closed)."""
    pki, curl, responder = ocsp_site(cache=False)
    assert curl("tablet") == 200
    responder.terminate()
    responder.wait()
    time.sleep(0.2)
    check = run_cli(["--pki-dir", str(pki), "ocsp", "check", "tablet"])
    assert check.code == 1 and "unreachable" in check.out
    assert curl("tablet") == 400


@e2e
@pytest.mark.slow
def test_a_cached_good_answer_expires_after_nmin(ocsp_site):
    pki, curl, _ = ocsp_site(cache=True, nmin=1)
    assert curl("phone") == 200  # nginx caches "good" until the answer's nextUpdate (1 minute)
    assert run_cli(["--pki-dir", str(pki), "revoke", "phone", "--no-reload"]).code == 0
    assert curl("phone") == 200  # the revocation latency docs/ocsp.md documents
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and curl("phone") != 400:
        time.sleep(5)
    assert curl("phone") == 400


@e2e
def test_a_port_probe_does_not_take_revocation_checking_down(ocsp_site):
    """openssl ocsp busy-loops after an empty connection; `ocsp serve` notices and restarts it."""
    pki, curl, _ = ocsp_site(cache=False)
    oport = int(yaml.safe_load((pki / "mtls.yaml").read_text())["ocsp"]["port"])
    assert wait_for_port(oport)  # connect and close without a request: what a scanner does
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and run_cli(["--pki-dir", str(pki), "ocsp", "check", "phone"]).code != 0:
        time.sleep(0.5)
    assert run_cli(["--pki-dir", str(pki), "ocsp", "check", "phone"]).code == 0
    assert curl("phone") == 200


# The supervisor's restart policy, with a fake responder and a fake clock (no nginx, no waiting).

class FakeProc:
    def __init__(self, pid: int, exits: bool) -> None:
        self.pid, self.returncode = pid, (1 if exits else None)

    def poll(self):  # type: ignore[no-untyped-def]
        return self.returncode

    def terminate(self) -> None:
        self.returncode = -15

    kill = terminate

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode or 0


@pytest.fixture
def supervised(fast_pki: Path, monkeypatch: pytest.MonkeyPatch):
    """Settings with an ocsp: section and signer files (never used: the responder is faked)."""
    set_profile(fast_pki, ocsp={"url": "http://127.0.0.1:1", "port": 1})
    (fast_pki / "certs/ocsp-responder.crt").write_text("fake\n")
    (fast_pki / "private/ocsp-responder.key").write_text("fake\n")
    return resolve_settings(fast_pki, None, environ={})


def run_supervisor(settings, monkeypatch, *, exits: bool, answers: list[bool], on_tick=None, ticks: int = 40):  # type: ignore[no-untyped-def]
    """Drive ocsp.serve with fakes; return (pauses after a stop, number of starts)."""
    events: list[tuple[str, float]] = []
    starts: list[FakeProc] = []
    replies = iter(answers)
    monkeypatch.setattr(ocsp, "answered", lambda s, r: next(replies, True))

    def start(argv, cwd=None):  # type: ignore[no-untyped-def]
        starts.append(FakeProc(1000 + len(starts), exits))
        events.append(("start", 0.0))
        return starts[-1]

    def sleep(seconds: float) -> None:
        events.append(("sleep", seconds))
        if on_tick is not None:
            on_tick(len(events))
        if len(events) > ticks:
            raise KeyboardInterrupt

    assert ocsp.serve(settings, Runner(), health_interval=1.0, sleep=sleep, start=start) == 0
    # the pause before each restart: the last sleep between one start and the next
    pauses, last = [], None
    for kind, value in events:
        if kind == "sleep":
            last = value
        elif last is not None:
            pauses.append(last)
    return pauses, len(starts)


def test_restarts_back_off_exponentially_up_to_a_cap(supervised, monkeypatch):
    """A responder that exits at once (port taken, bad key) is restarted after 0.5, 1, 2, 4 ... 60 s: not hammered."""
    pauses, _ = run_supervisor(supervised, monkeypatch, exits=True, answers=[])
    assert pauses[:9] == [0.5, 1, 2, 4, 8, 16, 32, 60, 60]
    assert ocsp.BACKOFF_MAX == 60


def test_an_answered_health_request_resets_the_backoff(supervised, monkeypatch):
    """Unresponsive twice in a row (the port-probe spin), then it answers once: the next restart waits 0.5 s again."""
    pauses, starts = run_supervisor(supervised, monkeypatch, exits=False, answers=[False, False, True, False], ticks=14)
    assert pauses[:3] == [0.5, 1, 0.5]


def test_a_renewed_signer_restarts_the_responder_at_once(supervised, monkeypatch):
    crt = supervised.pki.path("certs/ocsp-responder.crt")

    def renew(n: int) -> None:
        if n == 3:  # while the first responder runs: what `mtlsctl renew` does (a new file in its place)
            new = crt.with_name("new.crt")
            new.write_text("renewed\n")
            new.replace(crt)

    pauses, starts = run_supervisor(supervised, monkeypatch, exits=False, answers=[True] * 20, on_tick=renew, ticks=8)
    assert starts == 2 and pauses == [1.0]  # restarted after the health interval that saw it, with no back-off pause
