"""`mtlsctl demo` on a machine without nginx: everything else is built, and it says how to install nginx."""

from __future__ import annotations

import pytest

from .conftest import openssl

pytestmark = pytest.mark.integration


def test_demo_without_nginx_builds_the_pki_and_says_what_to_do(tmp_path, mtls, monkeypatch):
    import mtlsctl.demo

    monkeypatch.setattr(mtlsctl.demo, "nginx_binary", lambda: None)
    res = mtls(["demo", "--dir", str(tmp_path / "d")])
    assert res.code == 0, res.err
    assert "apt-get install nginx" in res.out and "expect 403" in res.out
    pki = tmp_path / "d"
    status = openssl("ca", "-config", "openssl.cnf", "-status", "1003", cwd=pki, check=False)  # lost-device
    assert "Revoked" in status.stdout + status.stderr
    assert "TLS Web Server Authentication" in openssl("x509", "-in", str(pki / "certs/localhost.crt"), "-noout", "-text").stdout
    site = (pki / "nginx/site.conf").read_text()
    assert '"~^CN=iphone-jmrp$" 1;' in site and f"ssl_crl {pki}/crl/ca.crl;" in site
