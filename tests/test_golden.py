"""Golden files for rendered configuration: a change to a template or the renderer shows up as a diff.

Regenerate after an intended change: MTLSCTL_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mtlsctl import __version__
from mtlsctl.nginx import render_site
from mtlsctl.openssl import render_openssl_cnf
from mtlsctl.pki import Pki
from mtlsctl.profile import parse_profile

GOLDEN = Path(__file__).parent / "data" / "golden"
PKI = Pki(Path("/etc/nginx/pki"))

CASES = {
    "nginx-defaults.conf": {},
    "nginx-allowlist-optional-ratelimit.conf": {
        "nginx": {"server_name": "secure.example.com", "listen": "10.0.0.1:8443", "verify_client": "optional",
                  "allow": ["CN=iphone-jmrp", "~CN=admin-.*", "~^CN=alice|CN=bob$", "CN=web.example (lab)"],
                  "rate_limit": {"rate": "5r/s", "burst": 10},
                  "http2": False, "crl": True, "session_timeout": "5m"},
    },
    "nginx-ocsp.conf": {"ocsp": {"url": "http://10.0.0.2:8889", "port": 8889, "nmin": 5}},
    "openssl-ocsp.cnf": {"ocsp": {"url": "http://10.0.0.2:8889", "port": 8889}},
    "openssl-defaults.cnf": {},
    "openssl-ec-p384.cnf": {"ca": {"subject": {"CN": "Lab CA", "O": "Lab"}, "key": {"type": "ec", "curve": "P-384"}},
                            "clients": {"days": 90}, "crl": {"days": 7, "refresh_within_days": 2}},
}


def _render(name: str, data: dict) -> str:
    profile = parse_profile(data, name)
    if name.startswith("nginx"):
        text, _ = render_site(PKI, profile.nginx, ocsp=profile.ocsp)
    else:
        text = render_openssl_cnf(profile, PKI)
    return text.replace(f"mtlsctl {__version__} ", "mtlsctl VERSION ")


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_config_matches_the_golden_file(name):
    text = _render(name, CASES[name])
    path = GOLDEN / name
    if os.environ.get("MTLSCTL_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.read_text() == text, f"{name} changed; if intended: MTLSCTL_UPDATE_GOLDEN=1 python -m pytest {__file__}"


def test_the_golden_openssl_cnf_is_one_openssl_accepts(tmp_path):
    """The rendered config must parse: openssl req uses it to make a CA certificate."""
    import subprocess

    text = (GOLDEN / "openssl-ec-p384.cnf").read_text().replace("/etc/nginx/pki", str(tmp_path))
    (tmp_path / "openssl.cnf").write_text(text)
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384", "-out", "k.pem"],
                   cwd=tmp_path, check=True, capture_output=True)
    res = subprocess.run(["openssl", "req", "-new", "-x509", "-days", "1", "-key", "k.pem", "-config", "openssl.cnf",
                          "-extensions", "v3_ca", "-noout", "-text"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "Subject: O = Lab, CN = Lab CA" in res.stdout and "ecdsa-with-SHA384" in res.stdout


def test_rendered_nginx_config_passes_nginx_t(tmp_path):
    """The golden site, pointed at real files, passes `nginx -t` (the e2e tests run it for real)."""
    from .conftest import require_tool, run_cli

    require_tool("nginx")

    pki = tmp_path / "pki"
    prof = tmp_path / "p.yaml"
    prof.write_text("ca: {subject: {CN: T}, key: {type: ec}}\nclients: {key: {type: ec}}\n")
    assert run_cli(["--pki-dir", str(pki), "--profile", str(prof), "init"]).code == 0
    assert run_cli(["--pki-dir", str(pki), "add-server", "localhost"]).code == 0
    from mtlsctl.demo import LocalNginx, free_port

    local = LocalNginx(tmp_path / "nginx")
    data = dict(CASES["nginx-allowlist-optional-ratelimit.conf"]["nginx"])
    data.update(listen=f"127.0.0.1:{free_port()}", server_cert=str(pki / "certs/localhost.crt"),
                server_key=str(pki / "private/localhost.key"), access_log=str(tmp_path / "a.log"),
                error_log=str(tmp_path / "e.log"))
    text, _ = render_site(Pki(pki), parse_profile({"nginx": data}, "t").nginx)
    local.write(text)
    import subprocess

    res = subprocess.run(local.argv("-t"), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "syntax is ok" in res.stderr and "[warn]" not in res.stderr
