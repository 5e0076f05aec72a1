"""End to end: a real nginx (Debian package) and real curl on 127.0.0.1, free high ports.

Every promise of the guide is checked against nginx itself: no certificate 400, valid allowlisted 200
with the identity passed to the application, revoked 400, valid but unlisted 403, rate-limit bypass
for verified clients, and that mtlsctl's revoke/reload take effect.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from mtlsctl.demo import LocalNginx, free_port
from mtlsctl.demo_backend import EchoHandler

from .conftest import FAST_PROFILE, _copy_pki, openssl, run_cli

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.needs("nginx", "curl"),  # skipped when missing; a failure under CI=true (tests/conftest.py)
]

# Negative cases that fail without the anchors: iphone-jmrp2 (a DN entry without `$`), ops-x9 (a regex without `$`),
# hand-notreally below (a regex without `^`). (A CN like superadmin-x cannot tell: `CN=admin-` is not in CN=superadmin-x.)
CLIENTS = ["iphone-jmrp", "iphone-jmrp2", "admin-bob", "guest", "lost-device", "admin", "alice", "bob", "alice.evil", "ops-x",
           "ops-x9"]
# Certificates mtlsctl would not issue (a name differing only in case from an active one, a CN with '='), signed
# by hand with `openssl ca` from the same CA: what matters is what nginx does with them. file stem -> CN.
BY_HAND = {"hand-ADMIN": "ADMIN", "hand-OPS-X": "OPS-X", "hand-notreally": "notreally-CN=admin-y"}
P12_PASSWORD = "p12-pass-word"


@pytest.fixture(scope="module")
def backend():
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield port
    server.shutdown()


@pytest.fixture(scope="module")
def e2e_template(tmp_path_factory) -> Path:
    """A PKI with a P-256 CA, a localhost server certificate and the test clients (made once)."""
    base = tmp_path_factory.mktemp("e2e")
    prof = base / "p.yaml"
    prof.write_text(FAST_PROFILE)
    pki = base / "pki"
    assert run_cli(["--pki-dir", str(pki), "--profile", str(prof), "init"]).code == 0
    res = run_cli(["--pki-dir", str(pki), "add-server", "localhost", "--san", "DNS:localhost", "--san", "IP:127.0.0.1"])
    assert res.code == 0, res.err
    for name in CLIENTS:
        assert run_cli(["--pki-dir", str(pki), "add-client", name]).code == 0
    for profile in ("compat", "modern"):
        res = run_cli(["--pki-dir", str(pki), "add-client", f"p12-{profile}", "--p12", profile, "--password-stdin"],
                      stdin=P12_PASSWORD + "\n")
        assert res.code == 0, res.err
    for stem, cn in BY_HAND.items():
        _issue_by_hand(pki, stem, cn)
    return pki


def _issue_by_hand(pki: Path, stem: str, cn: str) -> None:
    """certs/STEM.crt for CN=cn, signed by the PKI's CA with the client section, bypassing mtlsctl's checks."""
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"private/{stem}.key", cwd=pki)
    openssl("req", "-new", "-config", "openssl.cnf", "-key", f"private/{stem}.key", "-subj", f"/CN={cn}",
            "-out", f"certs/{stem}.csr", cwd=pki)
    openssl("ca", "-config", "openssl.cnf", "-batch", "-notext", "-extensions", "v3_client", "-days", "30",
            "-in", f"certs/{stem}.csr", "-out", f"certs/{stem}.crt", cwd=pki)
    subject = openssl("x509", "-in", f"certs/{stem}.crt", "-noout", "-subject", "-nameopt", "RFC2253", cwd=pki).stdout
    assert subject.strip() == f"subject=CN={cn}"


@dataclass
class Site:
    pki: Path
    port: int
    nginx: LocalNginx

    def mtls(self, *args: str, stdin: str | None = None):
        return run_cli(["--pki-dir", str(self.pki), *args], stdin=stdin)

    def curl(self, client: str | None = None, *extra: str, p12: str | None = None) -> tuple[int, str]:
        argv = ["curl", "-s", "--max-time", "10", "-w", "\n%{http_code}", "--cacert", "ca/ca.crt"]
        if p12:
            argv += ["--cert-type", "P12", "--cert", f"certs/{p12}.p12:{P12_PASSWORD}"]
        elif client:
            argv += ["--cert", f"certs/{client}.crt", "--key", f"private/{client}.key"]
        res = subprocess.run([*argv, *extra, f"https://127.0.0.1:{self.port}/"], cwd=self.pki, capture_output=True, text=True)
        body, _, code = res.stdout.rpartition("\n")
        return int(code or 0), body


@pytest.fixture
def make_site(tmp_path, e2e_template, backend):
    sites: list[Site] = []

    def make(**nginx_overrides) -> Site:
        pki = _copy_pki(e2e_template, tmp_path / f"pki{len(sites)}")
        local = LocalNginx(tmp_path / f"nginx{len(sites)}")
        port = free_port()
        data = yaml.safe_load((pki / "mtls.yaml").read_text())
        data["nginx"] = {**local.nginx_section(pki, port, backend),
                         "allow": ["CN=iphone-jmrp", "~CN=admin-.*", "CN=p12-compat", "CN=p12-modern"], **nginx_overrides}
        (pki / "mtls.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        site = Site(pki, port, local)
        assert site.mtls("revoke", "lost-device", "--no-reload").code == 0
        (local.prefix / "logs").mkdir(parents=True)
        res = site.mtls("nginx", "render", "--out", str(local.prefix / "site.conf"))
        assert res.code == 0, res.err
        local.write((local.prefix / "site.conf").read_text())
        local.start(port)
        sites.append(site)
        return site

    yield make
    for site in sites:
        site.nginx.stop()


def test_the_guides_promises(make_site):
    site = make_site()
    assert site.mtls("nginx", "check").code == 0
    code, body = site.curl(None)
    assert code == 400 and "No required SSL certificate was sent" in body
    code, body = site.curl("iphone-jmrp")
    assert code == 200 and body.startswith("mTLS Authentication Successful! Client DN: CN=iphone-jmrp")
    serial = openssl("x509", "-in", str(site.pki / "certs/iphone-jmrp.crt"), "-noout", "-serial").stdout.strip().split("=")[1]
    fingerprint = openssl("x509", "-in", str(site.pki / "certs/iphone-jmrp.crt"), "-noout", "-fingerprint", "-sha1").stdout
    fingerprint = fingerprint.strip().split("=")[1].replace(":", "").lower()
    assert "X-Client-Verify: SUCCESS" in body
    assert f"X-Client-Serial: {serial}" in body
    assert f"X-Client-Fingerprint: {fingerprint}" in body
    code, body = site.curl("lost-device")
    assert code == 400 and "The SSL certificate error" in body
    code, body = site.curl("guest")
    assert code == 403 and "Valid certificate, but not authorized for this resource." in body
    # the access log records who it was
    log = (site.nginx.prefix / "logs/access.log").read_text()
    assert f'client_dn="CN=iphone-jmrp" serial="{serial}" verify="SUCCESS"' in log
    # verify failures are logged at info, with the reason
    assert "certificate revoked" in (site.nginx.prefix / "logs/site.error.log").read_text()


def test_a_client_sent_identity_header_is_replaced(make_site):
    site = make_site()
    code, body = site.curl("iphone-jmrp", "-H", "X-Client-DN: CN=admin-root", "-H", "X-Client-Verify: SUCCESS")
    assert code == 200
    assert re.findall(r"^X-Client-DN: .*$", body, re.M) == ["X-Client-DN: CN=iphone-jmrp"]
    assert re.findall(r"^X-Client-Verify: .*$", body, re.M) == ["X-Client-Verify: SUCCESS"]


def test_regex_allowlist_entries_match_only_what_they_should(make_site):
    site = make_site()
    assert site.curl("admin-bob")[0] == 200  # ~CN=admin-.* admits CN=admin-bob
    assert site.curl("hand-notreally")[0] == 403  # CN=notreally-CN=admin-y: only ^ keeps ~CN=admin-.* out of it
    assert site.curl("iphone-jmrp")[0] == 200
    assert site.curl("iphone-jmrp2")[0] == 403  # only $ keeps the DN entry CN=iphone-jmrp from admitting it


def test_a_dn_entry_is_case_sensitive_and_so_is_a_regex_entry(make_site):
    """nginx compares plain map string keys without case (FIELD-NOTES): `CN=admin` rendered as "CN=admin" admits
    a certificate for CN=ADMIN. Rendered as an escaped regex, "~^CN=admin$", it does not."""
    site = make_site(allow=["CN=admin", "~CN=ops-[a-z]+"])
    code, body = site.curl("admin")
    assert code == 200 and "Client DN: CN=admin" in body
    code, body = site.curl("hand-ADMIN")
    assert code == 403 and "not authorized" in body
    assert site.curl("ops-x")[0] == 200
    assert site.curl("ops-x9")[0] == 403  # only $ keeps ~CN=ops-[a-z]+ from admitting CN=ops-x9
    assert site.curl("hand-OPS-X")[0] == 403
    assert site.curl("admin-bob")[0] == 403  # an exact DN, not a prefix
    access = (site.nginx.prefix / "logs/access.log").read_text()
    assert 'client_dn="CN=ADMIN"' in access  # the certificate was verified: only the allowlist refused it


def test_an_alternation_is_anchored_as_a_whole(make_site):
    """`~^CN=alice|CN=bob$` anchors ^ to the first branch and $ to the second: CN=alice.evil would pass."""
    site = make_site(allow=["~CN=alice|CN=bob"])
    assert site.curl("alice")[0] == 200
    assert site.curl("bob")[0] == 200
    assert site.curl("alice.evil")[0] == 403
    site = make_site(allow=["~^CN=alice|CN=bob$"])  # anchors written by the user are dropped, then the whole anchored
    assert [site.curl(c)[0] for c in ("alice", "bob", "alice.evil")] == [200, 200, 403]


def test_a_prefix_regex_admits_neither_a_longer_name_nor_a_cn_that_contains_it(make_site):
    site = make_site(allow=["~CN=admin-.*"])
    assert site.curl("admin-bob")[0] == 200
    code, _ = site.curl("hand-notreally")  # CN=notreally-CN=admin-y: an unanchored regex would admit it
    assert code == 403
    assert site.curl("iphone-jmrp")[0] == 403  # the site's default list is replaced, not extended


def test_each_p12_profile_openssl3_reads_works_with_curl(make_site):
    site = make_site()
    for profile in ("compat", "modern"):
        code, body = site.curl(p12=f"p12-{profile}")
        assert code == 200 and f"CN=p12-{profile}" in body, (profile, code, body)


def test_mtlsctl_revoke_takes_effect_at_once_for_new_connections(make_site):
    site = make_site()
    assert site.curl("iphone-jmrp")[0] == 200
    res = site.mtls("revoke", "iphone-jmrp", "--reason", "keyCompromise")
    assert res.code == 0 and "nginx reloaded" in res.out, res.err
    for _ in range(5):  # every new connection, right away
        assert site.curl("iphone-jmrp")[0] == 400


def _s_client(site: Site, client: str, sess_in: Path | None, sess_out: Path) -> tuple[bool, str]:
    argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{site.port}", "-tls1_2", "-CAfile", "ca/ca.crt",
            "-cert", f"certs/{client}.crt", "-key", f"private/{client}.key", "-sess_out", str(sess_out), "-ign_eof"]
    if sess_in is not None:
        argv += ["-sess_in", str(sess_in)]
    req = "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    res = subprocess.run(argv, input=req, capture_output=True, text=True, cwd=site.pki, timeout=30)
    out = res.stdout
    status = re.search(r"^HTTP/1\.1 (\d{3})", out, re.M)
    return ("Reused, TLSv1.2" in out), (status.group(1) if status else "no response")


def test_a_resumed_session_of_a_revoked_client_is_refused_once_the_session_timeout_passed(make_site, tmp_path):
    """FIELD-NOTES: the shared session cache survives reload; the short ssl_session_timeout bounds it."""
    site = make_site(session_timeout="3s")
    sess = tmp_path / "sess.pem"
    reused, status = _s_client(site, "iphone-jmrp", None, sess)
    assert not reused and status == "200"
    assert site.mtls("revoke", "iphone-jmrp").code == 0
    reused, status = _s_client(site, "iphone-jmrp", sess, tmp_path / "s2.pem")
    # within the timeout the session resumes (the revocation latency docs/nginx.md documents)
    assert reused and status == "200"
    time.sleep(4)
    reused, status = _s_client(site, "iphone-jmrp", sess, tmp_path / "s3.pem")
    assert not reused and status == "400"


def test_rate_limit_applies_to_anonymous_clients_and_verified_ones_bypass_it(make_site):
    site = make_site(verify_client="optional", rate_limit={"rate": "1r/s", "burst": 1})
    anonymous = [site.curl(None)[0] for _ in range(8)]
    assert 200 in anonymous  # anonymous clients reach the application under the limit
    assert 429 in anonymous
    verified = [site.curl("iphone-jmrp")[0] for _ in range(8)]
    assert verified == [200] * 8
    assert site.curl("guest")[0] == 403  # verified but unlisted: still 403 in optional mode
    assert site.curl("lost-device")[0] == 400  # a revoked certificate is refused even in optional mode


def test_nginx_reload_with_a_broken_crl_exits_1(make_site):
    site = make_site()
    (site.pki / "crl/ca.crl").write_text("not a CRL\n")
    res = site.mtls("nginx", "reload")
    assert res.code == 1 and "was not reloaded" in res.err and "crl" in res.err.lower()
    # `nginx -s reload` parses the config itself and fails loudly; a plain SIGHUP (what an init script
    # or `kill -HUP` sends) fails silently in nginx: mtlsctl notices that no new workers started
    data = yaml.safe_load((site.pki / "mtls.yaml").read_text())
    data["nginx"]["test_command"] = ""
    data["nginx"]["reload_command"] = f"sh -c 'kill -HUP $(cat {site.nginx.pid_file})'"
    (site.pki / "mtls.yaml").write_text(yaml.safe_dump(data))
    res = site.mtls("nginx", "reload")
    assert res.code == 1 and "did not start new workers" in res.err
    assert site.curl("iphone-jmrp")[0] == 200  # the old workers still serve, with the old CRL
    # mtlsctl crl repairs it, and the reload goes through
    res = site.mtls("crl")
    assert res.code == 0 and "nginx reloaded" in res.out, res.err


def test_demo_runs_end_to_end(tmp_path):
    import json

    res = run_cli(["demo", "--dir", str(tmp_path / "demo"), "--json"])
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert data["nginx_ran"] and data["ok"]
    assert [(c["expected"], c["status"]) for c in data["cases"]] == [(400, 400), (200, 200), (400, 400), (403, 403)]
    again = run_cli(["demo", "--dir", str(tmp_path / "demo"), "--json"])  # re-running is safe
    assert again.code == 0 and json.loads(again.out)["ok"]


def test_demo_explains_a_client_revoked_by_hand(tmp_path):
    assert run_cli(["demo", "--dir", str(tmp_path / "demo")]).code == 0
    assert run_cli(["--pki-dir", str(tmp_path / "demo"), "revoke", "iphone-jmrp", "--no-reload"]).code == 0
    res = run_cli(["demo", "--dir", str(tmp_path / "demo")])
    assert res.code == 1 and "iphone-jmrp has no valid certificate" in res.err and "start the demo afresh" in res.err
