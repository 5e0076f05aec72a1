"""Integration layer: real openssl in a temporary directory; results checked with openssl itself."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from .conftest import openssl, require_tool, tree, x509_text

pytestmark = pytest.mark.integration


def _days_valid(text: str) -> int:
    nb = re.search(r"Not Before: (.+ GMT)", text).group(1)
    na = re.search(r"Not After : (.+ GMT)", text).group(1)
    fmt = "%b %d %H:%M:%S %Y GMT"
    return round((datetime.strptime(na, fmt) - datetime.strptime(nb, fmt)).total_seconds() / 86400)


def test_init_on_the_guides_defaults(tmp_path, mtls):
    """The one test that pays for the guide's 4096-bit CA key."""
    pki = tmp_path / "pki"
    res = mtls(["--pki-dir", str(pki), "init"])
    assert res.code == 0, res.err
    # layout and modes, as the guide sets them
    for d in ("ca", "certs", "crl", "newcerts"):
        assert (pki / d).is_dir()
    assert (pki / "private").stat().st_mode & 0o777 == 0o700
    assert (pki / "private/ca.key").stat().st_mode & 0o777 == 0o400
    assert (pki / "ca/ca.crt").stat().st_mode & 0o777 == 0o644
    assert (pki / "serial").read_text() == "1000\n"
    assert (pki / "index.txt").read_text() == ""
    assert "unique_subject = no" in (pki / "index.txt.attr").read_text()
    assert "unique_subject    = no" in (pki / "openssl.cnf").read_text()

    text = x509_text(pki / "ca/ca.crt")
    assert "Public-Key: (4096 bit)" in text
    assert "sha256WithRSAEncryption" in text
    assert "Subject: C = ES, ST = Valencia, L = Valencia, O = JMRP-IO-LAB, OU = Infrastructure Security, CN = JMRP-IO-LAB Root CA" in text
    assert re.search(r"Basic Constraints: critical\s+CA:TRUE, pathlen:0", text)
    assert re.search(r"Key Usage: critical\s+Digital Signature, Certificate Sign, CRL Sign", text)
    assert _days_valid(text) == 3650

    crl = openssl("crl", "-in", str(pki / "crl/ca.crl"), "-noout", "-text").stdout
    assert "No Revoked Certificates" in crl
    last = datetime.strptime(re.search(r"Last Update: (.+ GMT)", crl).group(1), "%b %d %H:%M:%S %Y GMT")
    assert last < datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(minutes=4)  # backdated for clock skew
    assert "mtls.yaml" in res.out
    # a second init refuses and touches nothing
    before = tree(pki)
    again = mtls(["--pki-dir", str(pki), "init"])
    assert again.code == 2 and "a CA already exists" in again.err
    assert tree(pki) == before


def test_add_client_on_default_client_settings(fast_pki, mtls):
    """Clients default to the guide's RSA 2048, 365 days, serial 1000, CA:FALSE, clientAuth."""
    profile = fast_pki / "mtls.yaml"
    profile.write_text(profile.read_text().replace("  key:\n    type: ec\n    curve: P-256\n  days: 365\n  p12",
                                                   "  key:\n    type: rsa\n    bits: 2048\n  days: 365\n  p12"))
    res = mtls(["--pki-dir", str(fast_pki), "add-client", "iphone-jmrp"])
    assert res.code == 0, res.err
    password = re.search(r"Export password: (\S+)", res.out).group(1)
    assert len(password) >= 20
    text = x509_text(fast_pki / "certs/iphone-jmrp.crt")
    assert "Public-Key: (2048 bit)" in text
    assert "Serial Number: 4096 (0x1000)" in text
    assert "Subject: CN = iphone-jmrp" in text
    assert re.search(r"Basic Constraints: critical\s+CA:FALSE", text)
    # keyUsage by key type (RFC 5280/5480): RSA digitalSignature + keyEncipherment, no nonRepudiation
    assert re.search(r"Key Usage: critical\s+Digital Signature, Key Encipherment\n", text)
    assert re.search(r"Extended Key Usage: \s*TLS Web Client Authentication", text)
    assert _days_valid(text) == 365
    ok = openssl("verify", "-CAfile", str(fast_pki / "ca/ca.crt"), str(fast_pki / "certs/iphone-jmrp.crt"))
    assert ok.stdout.strip().endswith(": OK")
    assert (fast_pki / "private/iphone-jmrp.key").stat().st_mode & 0o777 == 0o600
    assert (fast_pki / "certs/iphone-jmrp.p12").stat().st_mode & 0o777 == 0o600
    info = openssl("pkcs12", "-in", str(fast_pki / "certs/iphone-jmrp.p12"), "-info", "-noout", "-passin", "stdin",
                   input=password + "\n")
    assert "pbeWithSHA1And3-KeyTripleDES-CBC" in info.stderr  # the compat profile


@pytest.mark.parametrize("profile,legacy_flag,marker", [
    ("compat", False, "pbeWithSHA1And3-KeyTripleDES-CBC"),
    ("modern", False, "PBES2"),
    ("legacy", True, "pbeWithSHA1And40BitRC2-CBC"),
])
def test_each_p12_profile_opens_with_its_password(fast_pki, mtls, profile, legacy_flag, marker):
    res = mtls(["--pki-dir", str(fast_pki), "add-client", "dev", "--p12", profile, "--password-stdin"],
               stdin="correct horse\n")
    assert res.code == 0, res.err
    assert "correct horse" not in res.out + res.err  # a given password is never echoed
    args = ["pkcs12", "-in", str(fast_pki / "certs/dev.p12"), "-info", "-noout", "-passin", "stdin"]
    if legacy_flag:
        args.append("-legacy")
    info = openssl(*args, input="correct horse\n")
    assert marker in info.stderr
    wrong = openssl(*args, input="wrong\n", check=False)
    assert wrong.returncode != 0
    if profile != "legacy":
        # and OpenSSL 3 reads compat and modern without the legacy provider
        certs = openssl("pkcs12", "-in", str(fast_pki / "certs/dev.p12"), "-nokeys", "-passin", "stdin",
                        input="correct horse\n").stdout
        assert certs.count("BEGIN CERTIFICATE") == 2  # the client and the CA (-certfile ca/ca.crt)


def test_sans_and_json(fast_pki, mtls):
    import json

    res = mtls(["--pki-dir", str(fast_pki), "add-client", "svc-1", "--san", "DNS:svc-1.example.com",
                "--san", "IP:192.0.2.7", "--san", "email:ops@example.com", "--san", "URI:spiffe://example.org/svc-1",
                "--days", "30", "--json"])
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert data["serial"] == "1000" and len(data["password"]) >= 20
    assert set(data["files"]) == {"key", "csr", "crt", "p12"}
    text = x509_text(Path(data["files"]["crt"]))
    assert "DNS:svc-1.example.com, IP Address:192.0.2.7, email:ops@example.com, URI:spiffe://example.org/svc-1" in text
    assert _days_valid(text) == 30


def test_guides_raw_revoke_and_gencrl_work_on_our_layout(fast_pki, mtls):
    assert mtls(["--pki-dir", str(fast_pki), "add-client", "lost-device"]).code == 0
    openssl("ca", "-config", "openssl.cnf", "-revoke", "certs/lost-device.crt", cwd=fast_pki)
    openssl("ca", "-config", "openssl.cnf", "-gencrl", "-out", "crl/ca.crl", cwd=fast_pki)
    crl = openssl("crl", "-in", "crl/ca.crl", "-text", "-noout", cwd=fast_pki).stdout
    assert "Serial Number: 1000" in crl
    res = openssl("verify", "-crl_check", "-CAfile", "ca/ca.crt", "-CRLfile", "crl/ca.crl", "certs/lost-device.crt",
                  cwd=fast_pki, check=False)
    assert "certificate revoked" in res.stdout + res.stderr


def test_a_csr_asking_for_ca_true_still_gets_ca_false(fast_pki):
    """copy_extensions = copy never overrides what v3_client pins (FIELD-NOTES: CSR extensions)."""
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "private/evil.key", cwd=fast_pki)
    openssl("req", "-new", "-key", "private/evil.key", "-out", "certs/evil.csr", "-subj", "/CN=evil",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-addext", "extendedKeyUsage=serverAuth,codeSigning", "-config", "openssl.cnf", cwd=fast_pki)
    openssl("ca", "-config", "openssl.cnf", "-extensions", "v3_client", "-days", "5", "-batch",
            "-in", "certs/evil.csr", "-out", "certs/evil.crt", cwd=fast_pki)
    text = x509_text(fast_pki / "certs/evil.crt")
    assert re.search(r"Basic Constraints: critical\s+CA:FALSE", text)
    assert "Certificate Sign" not in text and "Code Signing" not in text
    assert re.search(r"Extended Key Usage: \s*TLS Web Client Authentication\s", text)


def test_a_pki_built_by_the_guides_own_commands_is_adopted(tmp_path, mtls):
    """No mtls.yaml, the guide's openssl.cnf: add-client and export work on it."""
    pki = tmp_path / "guide"
    for d in ("ca", "certs", "crl", "private", "newcerts"):
        (pki / d).mkdir(parents=True)
    (pki / "private").chmod(0o700)
    (pki / "index.txt").touch()
    (pki / "serial").write_text("1000\n")
    (pki / "crlnumber").write_text("1000\n")
    cnf = (Path(__file__).parent / "data/guide-openssl.cnf").read_text().replace("@DIR@", str(pki))
    (pki / "openssl.cnf").write_text(cnf)
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "private/ca.key", cwd=pki)
    openssl("req", "-new", "-x509", "-days", "3650", "-key", "private/ca.key", "-out", "ca/ca.crt",
            "-config", "openssl.cnf", "-extensions", "v3_ca", cwd=pki)
    # The guide's openssl.cnf has no [ v3_client_ec ]: an EC client would get keyEncipherment (RFC 5480
    # forbids it), so mtlsctl refuses before writing anything and says which section to add.
    before = tree(pki)
    ec = mtls(["--pki-dir", str(pki), "add-client", "iphone-jmrp", "--key-type", "ec"])
    assert ec.code == 2 and "[ v3_client_ec ]" in ec.err, ec.err
    assert tree(pki) == before
    res = mtls(["--pki-dir", str(pki), "add-client", "iphone-jmrp", "--key-type", "rsa"])
    assert res.code == 0, res.err
    ok = openssl("verify", "-CAfile", "ca/ca.crt", "certs/iphone-jmrp.crt", cwd=pki)
    assert ok.stdout.strip().endswith("OK")
    exp = mtls(["--pki-dir", str(pki), "export", "iphone-jmrp", "--out", str(tmp_path / "x.p12"), "--p12", "modern",
                "--password-stdin"], stdin="pw-for-export\n")
    assert exp.code == 0, exp.err
    openssl("pkcs12", "-in", str(tmp_path / "x.p12"), "-noout", "-passin", "stdin", input="pw-for-export\n")


def test_export_refuses_to_overwrite_without_force_and_replaces_with_it(fast_pki, mtls):
    assert mtls(["--pki-dir", str(fast_pki), "add-client", "tab"]).code == 0
    before = (fast_pki / "certs/tab.p12").read_bytes()
    res = mtls(["--pki-dir", str(fast_pki), "export", "tab"])
    assert res.code == 2 and "--force" in res.err
    assert (fast_pki / "certs/tab.p12").read_bytes() == before
    res = mtls(["--pki-dir", str(fast_pki), "export", "tab", "--force", "--json", "--p12", "modern"])
    assert res.code == 0, res.err
    import json

    password = json.loads(res.out)["password"]
    info = openssl("pkcs12", "-in", str(fast_pki / "certs/tab.p12"), "-info", "-noout", "-passin", "stdin",
                   input=password + "\n")
    assert "PBES2" in info.stderr
    assert (fast_pki / "certs/tab.p12").stat().st_mode & 0o777 == 0o600
    assert not list(fast_pki.glob("certs/.*tmp"))


def test_add_client_twice_is_refused_and_the_live_key_survives(fast_pki, mtls):
    """The guide's script overwrites the live client's key first; mtlsctl refuses before any write."""
    assert mtls(["--pki-dir", str(fast_pki), "add-client", "phone"]).code == 0
    before = tree(fast_pki)
    res = mtls(["--pki-dir", str(fast_pki), "add-client", "phone"])
    assert res.code == 2 and "already has an active certificate (serial 1000)" in res.err
    after = tree(fast_pki)
    assert after == before


def test_files_left_by_hand_are_never_overwritten(fast_pki, mtls):
    (fast_pki / "private/orphan.key").write_text("precious")
    before = tree(fast_pki)
    res = mtls(["--pki-dir", str(fast_pki), "add-client", "orphan"])
    assert res.code == 2 and "private/orphan.key" in res.err
    assert tree(fast_pki) == before


def test_add_client_without_a_ca_says_run_init(tmp_path, mtls):
    res = mtls(["--pki-dir", str(tmp_path / "nothing"), "add-client", "x"])
    assert res.code == 2 and "mtlsctl init" in res.err
    assert not (tmp_path / "nothing").exists()


def test_an_ec_p384_ca_signs_with_sha384(tmp_path, mtls):
    prof = tmp_path / "p.yaml"
    prof.write_text("ca: {key: {type: ec, curve: P-384}, subject: {CN: P384 CA}}\nclients: {key: {type: ec}}\n")
    res = mtls(["--pki-dir", str(tmp_path / "pki"), "--profile", str(prof), "init"])
    assert res.code == 0, res.err
    assert "ecdsa-with-SHA384" in x509_text(tmp_path / "pki/ca/ca.crt")
    assert mtls(["--pki-dir", str(tmp_path / "pki"), "add-client", "a"]).code == 0
    text = x509_text(tmp_path / "pki/certs/a.crt")
    assert "ecdsa-with-SHA384" in text and "prime256v1" in text


def test_wheel_ships_the_templates_and_runs_from_another_directory(tmp_path):
    """`pip install .` (not -e) must work: build the wheel, unpack it, run from elsewhere."""
    import subprocess
    import sys
    import zipfile

    repo = Path(__file__).resolve().parent.parent
    require_tool("git")
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(repo)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(wheel_dir.glob("mtlsctl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for template in ("openssl.cnf.template", "nginx/site.conf.template", "nginx/allowlist.conf.template",
                     "nginx/ratelimit.conf.template", "nginx/demo-nginx.conf.template", "scripts/mtls-renew.sh"):
        assert f"mtlsctl/_templates/{template}" in names, template
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin:/usr/local/bin"}
    run = subprocess.run([sys.executable, "-m", "mtlsctl", "--pki-dir", str(tmp_path / "p"), "init", "--dry-run"],
                         cwd=elsewhere, capture_output=True, text=True, env={**env, "PYTHONNOUSERSITE": "1"})
    assert run.returncode == 0, run.stderr
    import mtlsctl

    # it really used the wheel's copy, not this checkout
    probe = subprocess.run([sys.executable, "-c", "import mtlsctl.templates as t; print(t.template_path('openssl.cnf.template'))"],
                           cwd=elsewhere, capture_output=True, text=True, env=env)
    assert probe.stdout.strip().startswith(str(site)), (probe.stdout, probe.stderr, mtlsctl.__file__)
