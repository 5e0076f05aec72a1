"""`mtlsctl nginx render` cannot lie: no CA, no render; every file the site names exists and is usable by nginx
(or the render says which and how to fix it, exit 1, nothing written; --force writes anyway); after
`add-server NAME` the placeholders follow the PKI's server certificate; `listen: 443` as a number."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mtlsctl.pki import Pki
from mtlsctl.profile import load_profile, parse_profile

from .conftest import is_two_tier, openssl, set_profile

pytestmark = pytest.mark.integration


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    d = tmp_path / "logs"
    d.mkdir()
    return d


def _point_logs(pki: Path, logs: Path) -> None:
    set_profile(pki, nginx={"access_log": str(logs / "access.log"), "error_log": str(logs / "error.log")})


def render(mtls, pki: Path, *args: str):
    return mtls(["--pki-dir", str(pki), "nginx", "render", *args])


def directive(text: str, name: str) -> str:
    [line] = [ln for ln in text.splitlines() if ln.strip().startswith(name + " ")]
    return line.split(None, 1)[1].rstrip(";").strip()


# ------------------------------------------------------------------ refusals


def test_no_ca_no_render(tmp_path, mtls):
    out = tmp_path / "site.conf"
    res = render(mtls, tmp_path / "empty", "--out", str(out))
    assert res.code == 2 and "no CA in" in res.err and "mtlsctl init" in res.err, res.err
    assert not out.exists() and res.out == ""
    assert not (tmp_path / "empty").exists()


def test_placeholders_without_a_server_certificate_are_refused(fast_pki, mtls, logs, tmp_path):
    _point_logs(fast_pki, logs)
    out = tmp_path / "site.conf"
    res = render(mtls, fast_pki, "--out", str(out))
    assert res.code == 1, res.err
    assert "ssl_certificate /etc/ssl/certs/secure.example.com.crt does not exist" in res.err
    assert "ssl_certificate_key /etc/ssl/private/secure.example.com.key does not exist" in res.err
    assert "`mtlsctl add-server secure.example.com`" in res.err and "--force" in res.err
    assert not out.exists() and res.out == ""
    stdout = render(mtls, fast_pki)
    assert stdout.code == 1 and stdout.out == ""  # nothing on stdout either


def test_force_writes_anyway_and_says_what_is_wrong(fast_pki, mtls, logs, tmp_path):
    _point_logs(fast_pki, logs)
    out = tmp_path / "site.conf"
    res = render(mtls, fast_pki, "--out", str(out), "--force")
    assert res.code == 0, res.err
    assert "warning: written anyway (--force): ssl_certificate /etc/ssl/certs/secure.example.com.crt does not exist" in res.err
    assert directive(out.read_text(), "ssl_certificate") == "/etc/ssl/certs/secure.example.com.crt"


def test_a_profile_path_that_does_not_exist_is_named_with_its_profile_key(fast_pki, mtls, logs, tmp_path):
    assert mtls(["--pki-dir", str(fast_pki), "add-server", "web"]).code == 0
    _point_logs(fast_pki, logs)
    set_profile(fast_pki, nginx={"server_cert": str(tmp_path / "nope.crt"), "server_key": str(fast_pki / "private/web.key")})
    res = render(mtls, fast_pki)
    assert res.code == 1 and f"ssl_certificate {tmp_path / 'nope.crt'} does not exist" in res.err, res.err
    assert "set nginx.server_cert in the profile" in res.err and "ssl_certificate_key" not in res.err


def test_a_world_readable_key_is_refused(fast_pki, mtls, logs):
    assert mtls(["--pki-dir", str(fast_pki), "add-server", "web"]).code == 0
    _point_logs(fast_pki, logs)
    key = fast_pki / "private/web.key"
    key.chmod(0o644)
    res = render(mtls, fast_pki)
    assert res.code == 1 and f"ssl_certificate_key {key} is readable by every user" in res.err, res.err
    assert f"chmod 600 {key}" in res.err
    key.chmod(0o640)  # group-readable (Debian's ssl-cert group) is fine: nginx's master reads it as root
    assert render(mtls, fast_pki).code == 0


def test_a_directory_where_the_certificate_belongs_is_refused(fast_pki, mtls, logs, tmp_path):
    assert mtls(["--pki-dir", str(fast_pki), "add-server", "web"]).code == 0
    _point_logs(fast_pki, logs)
    (tmp_path / "cert-dir").mkdir()
    set_profile(fast_pki, nginx={"server_cert": str(tmp_path / "cert-dir"), "server_key": str(fast_pki / "private/web.key")})
    res = render(mtls, fast_pki)
    assert res.code == 1 and "cert-dir is not a regular file" in res.err, res.err


def test_a_dangling_symlink_is_named_as_one(fast_pki, mtls, logs, tmp_path):
    assert mtls(["--pki-dir", str(fast_pki), "add-server", "web"]).code == 0
    _point_logs(fast_pki, logs)
    (tmp_path / "live.crt").symlink_to(tmp_path / "gone.crt")
    set_profile(fast_pki, nginx={"server_cert": str(tmp_path / "live.crt"), "server_key": str(fast_pki / "private/web.key")})
    res = render(mtls, fast_pki)
    assert res.code == 1 and "live.crt is a symbolic link to nothing" in res.err, res.err
    (tmp_path / "gone.crt").write_text((fast_pki / "certs/web.crt").read_text())
    assert render(mtls, fast_pki).code == 0  # nginx follows links (Let's Encrypt's live/ are links): so do we


def test_a_missing_crl_is_refused_with_the_command_that_makes_it(tiered_pki, mtls, logs):
    assert mtls(["--pki-dir", str(tiered_pki), "add-server", "web"]).code == 0
    _point_logs(tiered_pki, logs)
    crl = tiered_pki / Pki(tiered_pki).crl_bundle
    crl.unlink()
    res = render(mtls, tiered_pki)
    assert res.code == 1 and f"ssl_crl {crl} does not exist" in res.err and "`mtlsctl crl`" in res.err, res.err
    set_profile(tiered_pki, nginx={"crl": False})  # no ssl_crl line, nothing to check (and the usual warning)
    res = render(mtls, tiered_pki)
    assert res.code == 0 and "revoked certificates are ACCEPTED" in res.err, res.err


def test_a_missing_client_ca_bundle_is_refused(tiered_pki, mtls, logs):
    assert mtls(["--pki-dir", str(tiered_pki), "add-server", "web"]).code == 0
    _point_logs(tiered_pki, logs)
    if not is_two_tier(tiered_pki):
        pytest.skip("one tier: ssl_client_certificate is ca/ca.crt, whose absence is `no CA` (exit 2)")
    (tiered_pki / "ca/chain.pem").unlink()
    res = render(mtls, tiered_pki)
    assert res.code == 1 and f"ssl_client_certificate {tiered_pki / 'ca/chain.pem'} does not exist" in res.err, res.err


def test_a_missing_log_directory_is_refused(fast_pki, mtls, logs, tmp_path):
    assert mtls(["--pki-dir", str(fast_pki), "add-server", "web"]).code == 0
    set_profile(fast_pki, nginx={"access_log": str(tmp_path / "nolog/a.log"), "error_log": str(logs / "e.log")})
    out = tmp_path / "site.conf"
    res = render(mtls, fast_pki, "--out", str(out))
    assert res.code == 1 and f"access_log directory {tmp_path / 'nolog'} does not exist" in res.err, res.err
    assert f"mkdir -p {tmp_path / 'nolog'}" in res.err and not out.exists()
    (tmp_path / "nolog").mkdir()
    assert render(mtls, fast_pki, "--out", str(out)).code == 0 and out.exists()


# ------------------------------------------------------------------ the placeholders follow add-server


def _nginx_t(text: str, tmp_path: Path) -> None:
    from mtlsctl.demo import LocalNginx, nginx_binary

    if nginx_binary() is None:
        return
    local = LocalNginx(tmp_path / "nginx")
    local.write(text)
    res = subprocess.run(local.argv("-t"), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_after_add_server_render_serves_the_pkis_certificate(tiered_pki, mtls, logs, tmp_path):
    _point_logs(tiered_pki, logs)
    set_profile(tiered_pki, nginx={"listen": "127.0.0.1:18443"})
    added = mtls(["--pki-dir", str(tiered_pki), "add-server", "localhost", "--san", "DNS:localhost"])
    assert added.code == 0, added.err
    chain = tiered_pki / "certs/localhost.fullchain.pem"
    key = tiered_pki / "private/localhost.key"
    assert "`mtlsctl nginx render` will use it (the only active server certificate in the PKI" in added.out
    assert f"ssl_certificate     {chain};" in added.out and f"ssl_certificate_key {key};" in added.out

    out = tmp_path / "site.conf"
    res = render(mtls, tiered_pki, "--out", str(out))
    assert res.code == 0, res.err
    text = out.read_text()
    assert directive(text, "ssl_certificate") == str(chain)
    assert directive(text, "ssl_certificate_key") == str(key)
    assert "# server certificate localhost (the only active server certificate in the PKI" in text
    assert "Set nginx.server_cert / server_key in the profile to serve another one." in text
    # what is served is the leaf, then (two-tier) the issuing CA: a client trusting only the root builds the chain
    assert chain.read_text().count("BEGIN CERTIFICATE") == (2 if is_two_tier(tiered_pki) else 1)
    root = "ca/root.crt" if is_two_tier(tiered_pki) else "ca/ca.crt"
    verify = openssl("verify", "-purpose", "sslserver", "-CAfile", root, "-untrusted", str(chain), str(chain),
                     cwd=tiered_pki, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    _nginx_t(text, tmp_path)


def test_add_server_json_says_what_render_uses(fast_pki, mtls):
    res = mtls(["--pki-dir", str(fast_pki), "add-server", "web", "--json"])
    assert res.code == 0, res.err
    import json

    data = json.loads(res.out)["nginx_render"]
    assert data == {"ssl_certificate": str(fast_pki / "certs/web.fullchain.pem"),
                    "ssl_certificate_key": str(fast_pki / "private/web.key"), "source": "pki",
                    "uses_this_certificate": True, "why": "the only active server certificate in the PKI"}


def test_two_server_certificates_the_one_named_like_server_name_wins(tiered_pki, mtls, logs):
    _point_logs(tiered_pki, logs)
    assert mtls(["--pki-dir", str(tiered_pki), "add-server", "internal"]).code == 0
    second = mtls(["--pki-dir", str(tiered_pki), "add-server", "other"])
    assert second.code == 0 and "will not pick one: the PKI has 2 active server certificates (internal, other)" in second.out
    res = render(mtls, tiered_pki)
    assert res.code == 1 and "2 active server certificates (internal, other)" in res.err, res.err
    assert "set nginx.server_name to one of them" in res.err

    third = mtls(["--pki-dir", str(tiered_pki), "add-server", "secure.example.com"])  # nginx.server_name's default
    assert third.code == 0 and "will use it (the one named like nginx.server_name" in third.out, third.out
    res = render(mtls, tiered_pki)
    assert res.code == 0, res.err
    assert directive(res.out, "ssl_certificate") == str(tiered_pki / "certs/secure.example.com.fullchain.pem")
    set_profile(tiered_pki, nginx={"server_name": "other"})
    res = render(mtls, tiered_pki)
    assert directive(res.out, "ssl_certificate_key") == str(tiered_pki / "private/other.key")


def test_a_revoked_server_certificate_is_not_followed(fast_pki, mtls, logs):
    _point_logs(fast_pki, logs)
    assert mtls(["--pki-dir", str(fast_pki), "add-server", "web"]).code == 0
    assert render(mtls, fast_pki).code == 0
    assert mtls(["--pki-dir", str(fast_pki), "revoke", "web", "--no-reload"]).code == 0
    res = render(mtls, fast_pki)
    assert res.code == 1 and "/etc/ssl/certs/secure.example.com.crt does not exist" in res.err, res.err


def test_a_client_certificate_is_never_served(fast_pki, mtls, logs):
    _point_logs(fast_pki, logs)
    assert mtls(["--pki-dir", str(fast_pki), "add-client", "phone"]).code == 0
    res = render(mtls, fast_pki)
    assert res.code == 1 and "certs/phone" not in res.err, res.err


def test_profile_paths_are_never_replaced(fast_pki, mtls, logs, tmp_path):
    """Only the placeholders follow the PKI: a path the admin set (even one of the two) is rendered as set."""
    _point_logs(fast_pki, logs)
    assert mtls(["--pki-dir", str(fast_pki), "add-server", "web"]).code == 0
    own = tmp_path / "own.crt"
    shutil.copy(fast_pki / "certs/web.crt", own)
    set_profile(fast_pki, nginx={"server_cert": str(own)})
    res = render(mtls, fast_pki)
    assert res.code == 1 and "ssl_certificate_key /etc/ssl/private/secure.example.com.key does not exist" in res.err
    set_profile(fast_pki, nginx={"server_key": str(fast_pki / "private/web.key")})
    res = render(mtls, fast_pki)
    assert res.code == 0 and directive(res.out, "ssl_certificate") == str(own) and "placeholders" not in res.out
    server = mtls(["--pki-dir", str(fast_pki), "add-server", "web2"])
    assert "uses the profile's nginx.server_cert/server_key, not this certificate" in server.out
    assert f"nginx.server_cert: {fast_pki / 'certs/web2.crt'}" in server.out


# ------------------------------------------------------------------ listen


@pytest.mark.parametrize("value,lines", [
    (443, ["listen 443 ssl http2;", "listen [::]:443 ssl http2;"]),
    ("443", ["listen 443 ssl http2;", "listen [::]:443 ssl http2;"]),
    (8443, ["listen 8443 ssl http2;", "listen [::]:8443 ssl http2;"]),
    ("127.0.0.1:8443", ["listen 127.0.0.1:8443 ssl http2;"]),
    ("[::1]:8443", ["listen [::1]:8443 ssl http2;"]),
])
def test_listen_as_a_number_or_a_string(value, lines):
    from mtlsctl.nginx import render_site

    text, _ = render_site(Pki(Path("/etc/nginx/pki")), parse_profile({"nginx": {"listen": value}}, "t").nginx)
    assert [ln.strip() for ln in text.splitlines() if ln.strip().startswith("listen ")] == lines


def test_listen_443_unquoted_in_a_yaml_file(tmp_path):
    path = tmp_path / "mtls.yaml"
    path.write_text("nginx:\n  listen: 443\n")
    assert load_profile(path).nginx.listen == "443"
    path.write_text("nginx:\n  listen: 127.0.0.1:8443\n")  # unquoted: YAML reads a string
    assert load_profile(path).nginx.listen == "127.0.0.1:8443"


@pytest.mark.parametrize("value,needle", [(True, "valid string"), (0, "1..65535"), (70000, "1..65535"), (443.0, "valid string")])
def test_listen_refuses_what_is_not_a_port(value, needle):
    from mtlsctl.errors import ProfileError

    with pytest.raises(ProfileError) as info:
        parse_profile({"nginx": {"listen": value}}, "t")
    assert "nginx.listen" in info.value.message + "".join(info.value.problems) and needle in "".join(info.value.problems)
