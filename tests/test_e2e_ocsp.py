"""OCSP end to end: `mtlsctl ocsp serve` (real `openssl ocsp`), nginx with ssl_ocsp, curl on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from mtlsctl.demo import LocalNginx, free_port, nginx_binary, wait_for_port
from mtlsctl.demo_backend import EchoHandler

from .conftest import run_cli

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (.ci/run installs it)"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (.ci/run installs it)"),
]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def ocsp_site(tmp_path):
    started: list = []

    def make(cache: bool, nmin: int = 1):
        pki, local = tmp_path / "pki", LocalNginx(tmp_path / "nginx")
        port, oport, bport = free_port(), free_port(), free_port()
        backend = ThreadingHTTPServer(("127.0.0.1", bport), EchoHandler)
        threading.Thread(target=backend.serve_forever, daemon=True).start()
        started.append(backend.shutdown)
        prof = tmp_path / "p.yaml"
        prof.write_text(yaml.safe_dump({
            "ca": {"subject": {"CN": "OCSP CA"}, "key": {"type": "ec"}, "days": 800},
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
        local.prefix.mkdir()
        res = run_cli(["--pki-dir", str(pki), "nginx", "render", "--out", str(local.prefix / "site.conf")])
        assert res.code == 0, res.err
        local.write((local.prefix / "site.conf").read_text())
        local.start(port)
        started.append(local.stop)

        def curl(name: str) -> int:
            res = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", "ca/ca.crt",
                                  "--cert", f"certs/{name}.crt", "--key", f"private/{name}.key", f"https://127.0.0.1:{port}/"],
                                 cwd=pki, capture_output=True, text=True)
            return int(res.stdout or 0)
        return pki, curl, responder

    yield make
    for stop in reversed(started):
        stop()


def test_ocsp_revocation_reaches_nginx_without_a_reload(ocsp_site):
    pki, curl, _ = ocsp_site(cache=False)
    site = (pki.parent / "nginx/site.conf").read_text()
    assert "ssl_ocsp leaf;" in site and "ssl_ocsp_responder http://127.0.0.1:" in site
    assert curl("phone") == 200
    res = run_cli(["--pki-dir", str(pki), "revoke", "phone", "--no-reload"])  # nginx keeps the old CRL
    assert res.code == 0 and "primed" in res.err
    check = run_cli(["--pki-dir", str(pki), "ocsp", "check", "phone", "--json"])
    assert check.code == 1 and '"status": "revoked"' in check.out  # at once
    assert curl("phone") == 400  # no reload: OCSP alone refuses it
    assert curl("tablet") == 200


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
