"""A lost phone, end to end with a real nginx and curl: `mtlsctl replace phone` under the allowlist entry
`CN=phone`. The old key is refused (400) as soon as replace returns, the new bundle is admitted (200), and the
allowlist is not touched. Single- and two-tier."""

from __future__ import annotations

import subprocess
import threading
from http.server import ThreadingHTTPServer

import pytest
import yaml

from mtlsctl.demo import LocalNginx, free_port
from mtlsctl.demo_backend import EchoHandler

from .conftest import openssl, run_cli

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.needs("nginx", "curl"),  # skipped when missing; a failure under CI=true (tests/conftest.py)
]

NEW_PASSWORD = "new-phone-pass-1"


@pytest.fixture(params=["single", "two-tier"])
def site(request, tmp_path):
    pki, local = tmp_path / "pki", LocalNginx(tmp_path / "nginx")
    port, bport = free_port(), free_port()
    backend = ThreadingHTTPServer(("127.0.0.1", bport), EchoHandler)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    ca = {"subject": {"CN": "Lab CA"}, "key": {"type": "ec", "curve": "P-256"}, "days": 800}
    if request.param == "two-tier":
        ca = {"subject": {"CN": "Lab Root CA"}, "key": {"type": "ec", "curve": "P-256"}, "days": 800,
              "intermediate": {"subject": {"CN": "Lab Issuing CA"}, "key": {"type": "ec", "curve": "P-256"}, "days": 700}}
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump({"ca": ca, "clients": {"key": {"type": "ec"}},
                                    "nginx": {**local.nginx_section(pki, port, bport), "allow": ["CN=phone"]}}))
    mtls = lambda *args, stdin=None: run_cli(["--pki-dir", str(pki), *args], stdin=stdin)  # noqa: E731
    assert mtls("--profile", str(prof), "init").code == 0
    assert mtls("add-server", "localhost", "--san", "IP:127.0.0.1").code == 0
    assert mtls("add-client", "phone").code == 0
    (local.prefix / "logs").mkdir(parents=True)  # the site's logs go there: render checks nginx can write them
    assert mtls("nginx", "render", "--out", str(local.prefix / "site.conf")).code == 0
    local.write((local.prefix / "site.conf").read_text())
    cafile = "ca/chain.pem" if (pki / "ca/root.crt").exists() else "ca/ca.crt"

    def curl(*cert: str) -> tuple[int, str]:
        res = subprocess.run(["curl", "-s", "--max-time", "10", "-w", "\n%{http_code}", "--cacert", cafile, *cert,
                              f"https://127.0.0.1:{port}/"], cwd=pki, capture_output=True, text=True)
        body, _, code = res.stdout.rpartition("\n")
        return int(code or 0), body

    try:
        local.start(port)
        yield pki, mtls, curl
    finally:
        local.stop()
        backend.shutdown()


def test_replace_a_lost_phone_old_key_400_new_bundle_200_same_allowlist(site):
    pki, mtls, curl = site
    old_serial = openssl("x509", "-in", "certs/phone.crt", "-noout", "-serial", cwd=pki).stdout.strip().split("=")[1]
    code, body = curl("--cert", "certs/phone.crt", "--key", "private/phone.key")
    assert code == 200 and "Client DN: CN=phone" in body
    allowlist = yaml.safe_load((pki / "mtls.yaml").read_text())["nginx"]["allow"]

    res = mtls("replace", "phone", "--password-stdin", stdin=NEW_PASSWORD + "\n")
    assert res.code == 0, res.err

    old = f"archive/phone/{old_serial}"
    code, body = curl("--cert", f"{old}/phone.crt", "--key", f"{old}/phone.key")  # the lost phone's key
    assert code == 400 and "The SSL certificate error" in body
    code, body = curl("--cert-type", "P12", "--cert", f"certs/phone.p12:{NEW_PASSWORD}")  # the new bundle
    assert code == 200 and "Client DN: CN=phone" in body
    assert f"Revoked the old certificate: serial {old_serial} (keyCompromise)" in res.out and "nginx reloaded" in res.out
    assert yaml.safe_load((pki / "mtls.yaml").read_text())["nginx"]["allow"] == allowlist == ["CN=phone"]
    assert "certificate revoked" in (pki.parent / "nginx/logs/site.error.log").read_text()
