"""A two-tier PKI end to end: root (pathlen:1) -> issuing CA (pathlen:0) -> clients, with nginx and curl."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from http.server import ThreadingHTTPServer

import pytest
import yaml

from mtlsctl.demo import LocalNginx, free_port, nginx_binary
from mtlsctl.demo_backend import EchoHandler

from .conftest import openssl, run_cli, x509_text

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (.ci/run installs it)"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (.ci/run installs it)"),
]


@pytest.fixture
def chain_site(tmp_path):
    pki, local = tmp_path / "pki", LocalNginx(tmp_path / "nginx")
    port, bport = free_port(), free_port()
    backend = ThreadingHTTPServer(("127.0.0.1", bport), EchoHandler)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump({
        "ca": {"subject": {"CN": "Lab Root CA"}, "key": {"type": "ec", "curve": "P-384"}, "days": 3650,
               "intermediate": {"subject": {"CN": "Lab Issuing CA"}, "key": {"type": "ec", "curve": "P-256"}, "days": 1000}},
        "clients": {"key": {"type": "ec"}},
        "nginx": local.nginx_section(pki, port, bport),
    }))
    assert run_cli(["--pki-dir", str(pki), "--profile", str(prof), "init"]).code == 0
    assert run_cli(["--pki-dir", str(pki), "add-server", "localhost", "--san", "IP:127.0.0.1"]).code == 0
    for name in ("phone", "lost"):
        assert run_cli(["--pki-dir", str(pki), "add-client", name]).code == 0
    local.prefix.mkdir()
    assert run_cli(["--pki-dir", str(pki), "nginx", "render", "--out", str(local.prefix / "site.conf")]).code == 0
    local.write((local.prefix / "site.conf").read_text())
    local.start(port)

    def curl(cert: str, key: str) -> int:
        res = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", "ca/chain.pem",
                              "--cert", cert, "--key", key, f"https://127.0.0.1:{port}/"], cwd=pki, capture_output=True, text=True)
        return int(res.stdout or 0)
    yield pki, curl, local
    local.stop()
    backend.shutdown()


def test_the_chain_is_built_as_documented(chain_site):
    pki, _, local = chain_site
    root, inter = x509_text(pki / "ca/root.crt"), x509_text(pki / "ca/ca.crt")
    assert re.search(r"CA:TRUE, pathlen:1", root) and re.search(r"CA:TRUE, pathlen:0", inter)
    assert "Issuer: CN = Lab Root CA" in inter and "ecdsa-with-SHA384" in inter  # the root (P-384) signed it
    assert "Issuer: CN = Lab Issuing CA" in x509_text(pki / "certs/phone.crt")
    assert openssl("verify", "-CAfile", "ca/root.crt", "-untrusted", "ca/ca.crt", "certs/phone.crt", cwd=pki).returncode == 0
    assert (pki / "ca/chain.pem").read_text().count("BEGIN CERTIFICATE") == 2
    assert (pki / "crl/chain.crl").read_text().count("BEGIN X509 CRL") == 2
    site = (local.prefix / "site.conf").read_text()
    assert f"ssl_client_certificate {pki}/ca/chain.pem;" in site and f"ssl_crl {pki}/crl/chain.crl;" in site
    # the device gets the whole chain in its bundle
    res = run_cli(["--pki-dir", str(pki), "export", "phone", "--force", "--json"])
    import json

    pw = json.loads(res.out)["password"]
    certs = openssl("pkcs12", "-in", str(pki / "certs/phone.p12"), "-nokeys", "-passin", "stdin", input=pw + "\n").stdout
    assert certs.count("BEGIN CERTIFICATE") == 3


def test_clients_of_the_intermediate_pass_and_revoked_ones_do_not(chain_site):
    pki, curl, _ = chain_site
    assert curl("certs/phone.crt", "private/phone.key") == 200
    assert curl("certs/lost.crt", "private/lost.key") == 200
    res = run_cli(["--pki-dir", str(pki), "revoke", "lost"])  # regenerates ca.crl and chain.crl, reloads nginx
    assert res.code == 0 and "nginx reloaded" in res.out, res.err
    assert curl("certs/lost.crt", "private/lost.key") == 400
    assert curl("certs/phone.crt", "private/phone.key") == 200
    assert run_cli(["--pki-dir", str(pki), "verify", "lost"]).code == 1
    assert run_cli(["--pki-dir", str(pki), "verify", "phone"]).code == 0


def test_a_csr_minted_sub_ca_attempt_fails(chain_site, tmp_path):
    """A client asks for CA:TRUE; v3_client pins CA:FALSE and the issuing CA has pathlen:0: a certificate
    'signed' by the client is refused by nginx."""
    pki, curl, _ = chain_site
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(tmp_path / "evil.key"))
    openssl("req", "-new", "-key", str(tmp_path / "evil.key"), "-out", str(tmp_path / "evil.csr"), "-subj", "/CN=evil",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    res = run_cli(["--pki-dir", str(pki), "sign-csr", str(tmp_path / "evil.csr"), "--name", "evil"])
    assert res.code == 2 and "CA:TRUE" in res.err
    # even signed the guide's raw way, the certificate is not a CA ...
    openssl("ca", "-config", "openssl.cnf", "-extensions", "v3_client", "-days", "5", "-batch",
            "-in", str(tmp_path / "evil.csr"), "-out", str(tmp_path / "evil.crt"), cwd=pki)
    assert re.search(r"CA:FALSE", x509_text(tmp_path / "evil.crt"))
    # ... so what it signs is refused by nginx
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(tmp_path / "leaf.key"))
    openssl("req", "-new", "-key", str(tmp_path / "leaf.key"), "-out", str(tmp_path / "leaf.csr"), "-subj", "/CN=phone")
    openssl("x509", "-req", "-in", str(tmp_path / "leaf.csr"), "-CA", str(tmp_path / "evil.crt"), "-CAkey",
            str(tmp_path / "evil.key"), "-out", str(tmp_path / "leaf.crt"), "-days", "5")
    both = tmp_path / "leaf-chain.crt"
    both.write_text((tmp_path / "leaf.crt").read_text() + (tmp_path / "evil.crt").read_text())
    assert curl(str(both), str(tmp_path / "leaf.key")) == 400


def test_the_root_key_goes_offline_and_comes_back_by_path(chain_site, tmp_path):
    pki, _, _ = chain_site
    usb = tmp_path / "usb"
    usb.mkdir()
    res = run_cli(["--pki-dir", str(pki), "root", "export-offline", "--out", str(usb / "root.key")])
    assert res.code == 0, res.err
    assert not (pki / "private/root.key").exists() and (usb / "root.key").stat().st_mode & 0o777 == 0o400
    # clients are still issued and revoked with the issuing CA's key alone
    assert run_cli(["--pki-dir", str(pki), "add-client", "later"]).code == 0
    res = run_cli(["--pki-dir", str(pki), "crl", "--root"])
    assert res.code == 2 and "--root-key" in res.err
    res = run_cli(["--pki-dir", str(pki), "crl", "--root", "--root-key", str(usb / "root.key"), "--json", "--no-reload"])
    assert res.code == 0, res.err
    text = openssl("crl", "-in", str(pki / "crl/root.crl"), "-noout", "-text").stdout
    assert "Issuer: CN = Lab Root CA" in text and "CRL Number: \n                4097" in text
