"""`export --format mobileconfig` (issue 15): an Apple configuration profile that plistlib reads back, whose bundle
opens with openssl and its password (which is not in the profile), signed with openssl smime when the profile names
a signer (verified against the CA by openssl), with stable identifiers and fresh UUIDs; refused like `export`."""

from __future__ import annotations

import json
import os
import plistlib
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from .conftest import is_two_tier, openssl, set_profile, tree

pytestmark = pytest.mark.integration

PASSWORD = "Mobile-Config-Pw-7c1e"
REPO = Path(__file__).resolve().parent.parent


def anchor(pki: Path) -> Path:
    """What a device trusts: the root in a two-tier PKI, else the one CA."""
    return pki / ("ca/root.crt" if is_two_tier(pki) else "ca/ca.crt")


def der(cert: Path) -> bytes:
    return subprocess.run(["openssl", "x509", "-in", str(cert), "-outform", "der"], capture_output=True, check=True).stdout


@pytest.fixture
def phone(tiered_pki: Path, mtls, tmp_path: Path) -> Path:
    """A PKI with client `phone`; tmp_path/pw.txt holds the password used for its exports."""
    assert mtls(["--pki-dir", str(tiered_pki), "add-client", "phone", "--password-stdin"], stdin=PASSWORD + "\n").code == 0
    (tmp_path / "pw.txt").write_text(PASSWORD + "\n")
    return tiered_pki


def export(pki: Path, mtls, tmp_path: Path, *extra: str):
    return mtls(["--pki-dir", str(pki), "export", "phone", "--format", "mobileconfig", "--password-file",
                 str(tmp_path / "pw.txt"), *extra])


def payloads(profile: dict, kind: str) -> list[dict]:
    return [p for p in profile["PayloadContent"] if p["PayloadType"] == kind]


def opens_with(p12: bytes, password: str, tmp_path: Path) -> bool:
    path = tmp_path / "inner.p12"
    path.write_bytes(p12)
    res = openssl("pkcs12", "-info", "-noout", "-in", str(path), "-passin", "stdin", input=password + "\n", check=False)
    return res.returncode == 0


def test_an_unsigned_profile_is_a_plain_xml_plist_whose_bundle_opens_with_the_password(phone, mtls, tmp_path):
    res = export(phone, mtls, tmp_path, "--with-ca", "--json")
    assert res.code == 0, res.err
    out = json.loads(res.out)
    path = phone / "certs/phone.mobileconfig"
    assert out["file"] == str(path) and out["format"] == "mobileconfig" and out["signed"] is False
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = path.read_bytes()
    assert raw.startswith(b"<?xml") and b"<!DOCTYPE plist" in raw  # unsigned: the XML plist itself
    profile = plistlib.loads(raw)
    assert profile["PayloadType"] == "Configuration" and profile["PayloadVersion"] == 1
    [bundle] = payloads(profile, "com.apple.security.pkcs12")
    assert opens_with(bundle["PayloadContent"], PASSWORD, tmp_path)
    assert not opens_with(bundle["PayloadContent"], "not the password", tmp_path)
    # the password is typed on the device: not in the profile, under no key
    assert PASSWORD.encode() not in raw and "Password" not in bundle
    # --with-ca: the trust anchor (the root in a two-tier PKI), as DER
    [root] = payloads(profile, "com.apple.security.root")
    assert root["PayloadContent"] == der(anchor(phone))
    assert root["PayloadCertificateFileName"] == anchor(phone).name
    # the bundle inside is the compat profile (3DES, SHA-1 MAC: what iOS imports)
    info = openssl("pkcs12", "-info", "-noout", "-in", str(tmp_path / "inner.p12"), "-passin", "stdin",
                   input=PASSWORD + "\n").stderr
    assert "pbeWithSHA1And3-KeyTripleDES-CBC" in info and "MAC: sha1" in info


def test_without_with_ca_there_is_no_root_payload(phone, mtls, tmp_path):
    assert export(phone, mtls, tmp_path).code == 0
    profile = plistlib.loads((phone / "certs/phone.mobileconfig").read_bytes())
    assert [p["PayloadType"] for p in profile["PayloadContent"]] == ["com.apple.security.pkcs12"]


def test_identifiers_are_stable_across_exports_and_uuids_are_not(phone, mtls, tmp_path):
    """Planted: identifiers from uuid4 (the device would keep both profiles), or UUIDs reused across exports."""
    def ids_and_uuids() -> tuple[list[str], list[str]]:
        profile = plistlib.loads((phone / "certs/phone.mobileconfig").read_bytes())
        items = [profile, *profile["PayloadContent"]]
        return [p["PayloadIdentifier"] for p in items], [p["PayloadUUID"] for p in items]

    assert export(phone, mtls, tmp_path, "--with-ca").code == 0
    first_ids, first_uuids = ids_and_uuids()
    assert export(phone, mtls, tmp_path, "--with-ca").code == 2  # never overwritten without --force
    assert export(phone, mtls, tmp_path, "--with-ca", "--force").code == 0
    second_ids, second_uuids = ids_and_uuids()
    assert first_ids == second_ids == ["com.example.secure.mtlsctl.phone", "com.example.secure.mtlsctl.phone.pkcs12",
                                       "com.example.secure.mtlsctl.phone.ca"]  # nginx.server_name reversed
    assert len(set(first_uuids)) == 3 and not set(first_uuids) & set(second_uuids)
    set_profile(phone, mobileconfig={"identifier_prefix": "org.example.lab", "organization": "Example Lab"})
    assert export(phone, mtls, tmp_path, "--force").code == 0
    profile = plistlib.loads((phone / "certs/phone.mobileconfig").read_bytes())
    assert profile["PayloadIdentifier"] == "org.example.lab.phone" and profile["PayloadOrganization"] == "Example Lab"


def _signer(pki: Path, mtls) -> None:
    """The site's server certificate (issued by this PKI) signs the profiles; PKI-relative paths."""
    res = mtls(["--pki-dir", str(pki), "add-server", "ca.example.lan", "--san", "DNS:ca.example.lan"])
    assert res.code == 0, res.err
    set_profile(pki, mobileconfig={"signer_cert": "certs/ca.example.lan.crt", "signer_key": "private/ca.example.lan.key"})


def test_a_signed_profile_verifies_against_the_ca_and_holds_the_plist(phone, mtls, tmp_path):
    """Planted: no -certfile with the PKI's chain (a two-tier profile no longer verifies against the root alone);
    -outform pem / detached signature (not DER with the content inside)."""
    _signer(phone, mtls)
    res = export(phone, mtls, tmp_path, "--with-ca", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["signed"] is True
    signed = phone / "certs/phone.mobileconfig"
    assert not signed.read_bytes().startswith(b"<?xml")  # DER CMS, not the plist
    content = tmp_path / "content.plist"
    verify = openssl("smime", "-verify", "-inform", "der", "-in", str(signed), "-CAfile", str(anchor(phone)),
                     "-purpose", "any", "-out", str(content), check=False)
    assert verify.returncode == 0 and "Verification successful" in verify.stderr, verify.stderr
    profile = plistlib.loads(content.read_bytes())
    [bundle] = payloads(profile, "com.apple.security.pkcs12")
    assert opens_with(bundle["PayloadContent"], PASSWORD, tmp_path)
    # signed by the signer named in the profile
    signer_pem = tmp_path / "signer.pem"
    openssl("smime", "-pk7out", "-inform", "der", "-in", str(signed), "-out", str(tmp_path / "p7.pem"))
    openssl("pkcs7", "-print_certs", "-in", str(tmp_path / "p7.pem"), "-out", str(signer_pem))
    assert "CN = ca.example.lan" in signer_pem.read_text() or "CN=ca.example.lan" in signer_pem.read_text()
    # a different CA does not verify it
    other = tmp_path / "other.pem"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
            str(tmp_path / "other.key"), "-out", str(other), "-subj", "/CN=Other CA", "-days", "2")
    assert openssl("smime", "-verify", "-inform", "der", "-in", str(signed), "-CAfile", str(other), "-purpose", "any",
                   "-out", "/dev/null", check=False).returncode != 0


def test_the_dry_run_shows_the_signing_and_writes_nothing(phone, mtls, tmp_path):
    _signer(phone, mtls)
    before = tree(phone)
    res = mtls(["--pki-dir", str(phone), "export", "phone", "--format", "mobileconfig", "--dry-run", "--json"])
    assert res.code == 0, res.err
    plan = json.loads(res.out)
    argvs = [c["argv"] for c in plan["commands"]]
    sign = next(a for a in argvs if a[1:3] == ["smime", "-sign"])
    assert sign[sign.index("-passin") + 1] == "fd:@0" and "-nodetach" in sign and sign[sign.index("-outform") + 1] == "der"
    assert any("password is not in the profile" in n for n in plan["notes"])
    assert tree(phone) == before


@pytest.mark.needs("strace")
def test_an_encrypted_signer_key_gets_its_passphrase_on_a_pipe_never_argv(phone, mtls, tmp_path):
    """Planted: -passin pass:PASSPHRASE (the passphrase in ps and in this trace)."""
    passphrase = "Signer-Passphrase-91ab"
    (tmp_path / "pp.txt").write_text(passphrase + "\n")
    key, cert = tmp_path / "signer.key", tmp_path / "signer.crt"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-keyout", str(key), "-out", str(cert),
            "-subj", "/CN=Profile Signer", "-days", "30", "-passout", f"file:{tmp_path / 'pp.txt'}")
    assert "ENCRYPTED" in key.read_text()
    set_profile(phone, mobileconfig={"signer_cert": str(cert), "signer_key": str(key)})
    res = export(phone, mtls, tmp_path)
    assert res.code == 2 and "encrypted" in res.err and "signer_passphrase_file" in res.err
    assert not (phone / "certs/phone.mobileconfig").exists()
    set_profile(phone, mobileconfig={"signer_passphrase_file": str(tmp_path / "pp.txt")})
    trace = tmp_path / "trace"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["strace", "-f", "-v", "-s", "4096", "-e", "trace=execve", "-o", str(trace), sys.executable, "-m",
                           "mtlsctl", "--pki-dir", str(phone), "export", "phone", "--format", "mobileconfig",
                           "--password-file", str(tmp_path / "pw.txt")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    logged = trace.read_text(errors="replace")
    execs = [line for line in logged.splitlines() if "execve(" in line and '"smime"' in line]
    assert any('"-sign"' in line and '"-passin", "fd:' in line for line in execs), execs
    assert passphrase not in logged and PASSWORD not in logged
    assert openssl("smime", "-verify", "-inform", "der", "-in", str(phone / "certs/phone.mobileconfig"), "-CAfile",
                   str(cert), "-purpose", "any", "-out", "/dev/null", check=False).returncode == 0


def test_refused_for_a_revoked_certificate(phone, mtls, tmp_path):
    set_profile(phone, nginx={"reload_command": "", "test_command": ""})
    assert mtls(["--pki-dir", str(phone), "revoke", "phone", "--no-reload"]).code == 0
    before = tree(phone)
    res = export(phone, mtls, tmp_path, "--force")
    assert res.code == 2 and "revoked" in res.err and "no bundle is made" in res.err
    dry = mtls(["--pki-dir", str(phone), "export", "phone", "--format", "mobileconfig", "--dry-run"])
    assert dry.code == 2 and "revoked" in dry.err
    assert tree(phone) == before


@pytest.mark.needs("faketime")
def test_refused_for_an_expired_certificate(phone, tmp_path):
    """The whole command under a clock 400 days ahead (the client is valid for 365): refused, nothing written."""
    when = (datetime.now(timezone.utc) + timedelta(days=400)).strftime("%Y-%m-%d %H:%M:%S")
    before = tree(phone)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(["faketime", when, sys.executable, "-m", "mtlsctl", "--pki-dir", str(phone), "export", "phone",
                          "--format", "mobileconfig", "--password-file", str(tmp_path / "pw.txt")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "expired" in res.stderr, res.stderr
    assert tree(phone) == before


def test_bad_options_and_profile_values_are_refused_before_anything(phone, mtls, tmp_path):
    before = tree(phone)
    pki = ["--pki-dir", str(phone)]
    for args, needle in ((["export", "phone", "--format", "pem"], "not an export format"),
                         (["export", "phone", "--with-ca"], "--with-ca is for --format mobileconfig"),
                         (["export", "phone", "--format", "mobileconfig", "--out", str(phone / "certs/phone.p12"), "--force"],
                          "PKCS#12 bundle")):
        res = mtls([*pki, *args, "--password-file", str(tmp_path / "pw.txt")])
        assert res.code == 2 and needle in res.err, (args, res.err)
    assert tree(phone) == before
    for section, needle in (({"identifier_prefix": "not reverse dns"}, "reverse-DNS"),
                            ({"identifier_prefix": "com.example\n"}, "reverse-DNS"),
                            ({"signer_cert": "certs/x.crt"}, "go together"),
                            ({"signer_chain": "ca/chain.pem"}, "need signer_cert")):
        path = tmp_path / "bad.yaml"
        path.write_text(json.dumps({"mobileconfig": section}))
        res = mtls([*pki, "--profile", str(path), "export", "phone", "--format", "mobileconfig"])
        assert res.code == 2 and needle in res.err and "Traceback" not in res.err, (section, res.err)
    set_profile(phone, mobileconfig={"signer_cert": "certs/missing.crt", "signer_key": "private/missing.key"})
    before = tree(phone)
    res = export(phone, mtls, tmp_path)
    assert res.code == 2 and "certs/missing.crt" in res.err and "is not a file" in res.err
    assert tree(phone) == before


def test_the_format_is_read_in_any_case_and_out_dir_gets_the_usual_name(phone, mtls, tmp_path):
    out = tmp_path / "outdir"
    out.mkdir()
    res = mtls(["--pki-dir", str(phone), "export", "phone", "--format", "MobileConfig", "--out", str(out),
                "--password-file", str(tmp_path / "pw.txt")])
    assert res.code == 0, res.err
    written = out / "phone.mobileconfig"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600 and plistlib.loads(written.read_bytes())["PayloadType"] == "Configuration"
    assert "Not Verified" in res.out and "the device asks for it" in res.out


def test_a_signature_over_anything_but_the_plist_is_refused(phone, mtls, tmp_path):
    """Planted: the read-back after signing skipped (a profile holding other content would be written)."""
    from mtlsctl import mobileconfig
    from mtlsctl.errors import StateError
    from mtlsctl.pki import resolve_settings
    from mtlsctl.runner import Runner

    _signer(phone, mtls)
    signer = mobileconfig.signer(resolve_settings(phone, None, environ={}))
    assert signer is not None

    class Swapping(Runner):
        """An openssl that signs something else than it was given."""

        def run(self, cmd, cwd=None, check=True):  # type: ignore[no-untyped-def]
            if cmd.argv[1:3] == ("smime", "-sign"):
                (Path(cwd) / cmd.argv[cmd.argv.index("-in") + 1]).write_bytes(b"<plist>other</plist>")
            return super().run(cmd, cwd=cwd, check=check)

    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    with pytest.raises(StateError, match="signed something other than the profile"):
        mobileconfig.sign(b"<plist>mine</plist>", signer, Swapping(), work)
    work2 = tmp_path / "work2"
    work2.mkdir(mode=0o700)
    assert mobileconfig.sign(b"<plist>mine</plist>", signer, Runner(), work2)[:1] == b"\x30"  # DER SEQUENCE


@pytest.mark.parametrize("fmt", ["p12", "mobileconfig"])
@pytest.mark.parametrize("where", ["private/ca.key", "certs/phone.crt", "index.txt", "private", "ca/ca.crt",
                                   "hard link outside"])
def test_force_never_lets_an_export_replace_a_file_of_the_pki(where, fmt, phone, mtls, tmp_path):
    """--out inside the PKI is refused (exit 2, nothing changed) unless it is the export's own place; --force does
    not change that (a review wrote a mobileconfig over private/ca.key with --force)."""
    if where == "hard link outside":
        out = tmp_path / "innocent.bin"
        os.link(phone / "private/ca.key" if (phone / "private/ca.key").exists() else phone / "index.txt", out)
    else:
        out = phone / where
    before = tree(phone)
    res = mtls(["--pki-dir", str(phone), "export", "phone", "--format", fmt, "--password-file", str(tmp_path / "pw.txt"),
                "--out", str(out), "--force"])
    assert res.code == 2 and "inside the PKI directory" in res.err, (res.code, res.err)
    assert tree(phone) == before
    # its own place, and anywhere outside, still work
    own = phone / ("certs/phone.p12" if fmt == "p12" else "certs/phone.mobileconfig")
    assert mtls(["--pki-dir", str(phone), "export", "phone", "--format", fmt, "--password-file", str(tmp_path / "pw.txt"),
                 "--out", str(own), "--force"]).code == 0
    assert mtls(["--pki-dir", str(phone), "export", "phone", "--format", fmt, "--password-file", str(tmp_path / "pw.txt"),
                 "--out", str(tmp_path / "elsewhere.bin")]).code == 0
