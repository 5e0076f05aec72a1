"""Unit layer: the exact openssl argv mtlsctl runs (the guide's commands), pinned with pytest-subprocess,
and what happens when openssl fails at each step: exit 1, openssl's message, no new file left."""

from __future__ import annotations

import functools
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mtlsctl import ca, client
from mtlsctl.errors import OpenSSLError, StateError
from mtlsctl.pki import resolve_settings
from mtlsctl.runner import Runner

from .conftest import tree

NOW = datetime(2026, 1, 13, 18, 21, 21, tzinfo=timezone.utc)
OPENSSL_ERR = "40F7:error:0480006C:PEM routines:PEM_read_bio_ex:no start line:../crypto/pem/pem_lib.c:763:Expecting: ANY PRIVATE KEY\n"

INIT_ARGV = [
    ["openssl", "genrsa", "-out", "private/ca.key", "4096"],
    ["openssl", "req", "-new", "-x509", "-days", "3650", "-key", "private/ca.key", "-out", "ca/ca.crt",
     "-config", "openssl.cnf", "-extensions", "v3_ca"],
    ["openssl", "ca", "-config", "openssl.cnf", "-gencrl", "-crl_lastupdate", "260113181621Z",
     "-crl_nextupdate", "260212182121Z", "-out", "crl/.ca.crl.tmp"],
]
INIT_OUTPUTS = ["private/ca.key", "ca/ca.crt", "crl/.ca.crl.tmp"]


def _touch(root: Path, rel: str, text: str = "x\n"):
    def callback(process):
        (root / rel).write_text(text)
    return callback


# What the faked openssl writes is real material (made with pyca/cryptography): mtlsctl reads back what openssl
# wrote (the certificate's key, issuer and CA flag, the CRL's signature) and refuses anything else.


@functools.cache
def _ca() -> tuple[str, str, object, object]:
    """(CA key PEM, CA certificate PEM, key, certificate) of a throwaway P-256 CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Unit CA")])
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(start).not_valid_after(start + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return key_pem.decode(), cert.public_bytes(serialization.Encoding.PEM).decode(), key, cert


@functools.cache
def _client(name: str) -> tuple[str, str, str]:
    """(key PEM, CSR PEM, certificate PEM with serial 1000 signed by _ca()) for CN=name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    _, _, ca_key, ca_cert = _ca()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(0x1000).not_valid_before(NOW).not_valid_after(NOW + timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return key_pem.decode(), csr.public_bytes(serialization.Encoding.PEM).decode(), cert.public_bytes(serialization.Encoding.PEM).decode()


def _crl_pem() -> str:
    """An empty CRL signed by _ca(), valid from before NOW until well after today."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    _, _, ca_key, ca_cert = _ca()
    later = max(NOW, datetime.now(timezone.utc)) + timedelta(days=30)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject).last_update(NOW - timedelta(minutes=5))
           .next_update(later).sign(ca_key, hashes.SHA256()))
    return crl.public_bytes(serialization.Encoding.PEM).decode()


def _init_outputs() -> list[str]:
    return [_ca()[0], _ca()[1], _crl_pem()]


def test_init_runs_the_guides_commands_in_order(fp, tmp_path):
    root = tmp_path / "pki"
    for argv, out, text in zip(INIT_ARGV, INIT_OUTPUTS, _init_outputs(), strict=True):
        fp.register(argv, callback=_touch(root, out, text))
    settings = resolve_settings(root, None, environ={})
    ca.init_pki(settings, Runner(), now=NOW)
    assert [list(c) for c in fp.calls] == INIT_ARGV
    assert (root / "private/ca.key").stat().st_mode & 0o777 == 0o400
    assert (root / "private").stat().st_mode & 0o777 == 0o700
    assert (root / "index.txt.attr").read_text() == "unique_subject = no\n"
    assert (root / "serial").read_text() == "1000\n" and (root / "crlnumber").read_text() == "1000\n"
    assert (root / "crl/ca.crl").exists() and not (root / "crl/.ca.crl.tmp").exists()


@pytest.mark.parametrize("failing", range(3))
def test_init_failure_at_each_step_leaves_nothing(fp, tmp_path, failing):
    root = tmp_path / "pki"
    for i, (argv, out, text) in enumerate(zip(INIT_ARGV, INIT_OUTPUTS, _init_outputs(), strict=True)):
        if i < failing:
            fp.register(argv, callback=_touch(root, out, text))
        elif i == failing:
            # openssl often leaves a partial output file behind when it fails
            fp.register(argv, returncode=1, stderr=OPENSSL_ERR, callback=_touch(root, out))
    settings = resolve_settings(root, None, environ={})
    with pytest.raises(OpenSSLError) as info:
        ca.init_pki(settings, Runner(), now=NOW)
    assert "no start line" in info.value.message
    assert not root.exists(), sorted(p.name for p in root.rglob("*"))


def test_init_failure_in_existing_dir_keeps_only_what_was_there(fp, tmp_path):
    root = tmp_path / "pki"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    before = tree(root)
    fp.register(INIT_ARGV[0], returncode=1, stderr=OPENSSL_ERR)
    with pytest.raises(OpenSSLError):
        ca.init_pki(resolve_settings(root, None, environ={}), Runner(), now=NOW)
    after = tree(root)
    after.pop(".mtlsctl.lock", None)
    assert after == before


def test_init_cli_openssl_failure_is_exit_1_with_openssls_message(fp, tmp_path, mtls):
    fp.register(["openssl", "genrsa", fp.any()], returncode=1, stderr=OPENSSL_ERR)
    res = mtls(["--pki-dir", str(tmp_path / "pki"), "init"])
    assert res.code == 1
    assert res.err.startswith("error: openssl genrsa failed (exit 1): no start line (Expecting: ANY PRIVATE KEY)")
    assert "Traceback" not in res.err
    assert not (tmp_path / "pki").exists()


# ---------------------------------------------------------------- add-client

def _pki(tmp_path: Path) -> Path:
    """A PKI skeleton good enough for add-client's checks (the CA files exist; openssl is faked)."""
    root = tmp_path / "pki"
    for d in ("ca", "certs", "crl", "private", "newcerts"):
        (root / d).mkdir(parents=True)
    for rel, text in {"ca/ca.crt": _ca()[1], "private/ca.key": _ca()[0], "openssl.cnf": "[ v3_client ]\n[ v3_client_ec ]\n[ v3_server ]\n",
                      "index.txt": "", "index.txt.attr": "unique_subject = no\n", "serial": "1000\n", "crlnumber": "1000\n"}.items():
        (root / rel).write_text(text)
    return root


def _fake_sign(root: Path, name: str, row_name: str | None = None):
    def callback(process):
        pem = _client(name)[2]
        (root / f"certs/{name}.crt").write_text("Certificate:\n  text dump\n" + pem)
        (root / "newcerts/1000.pem").write_text(pem)
        with open(root / "index.txt", "a") as fh:
            fh.write(f"V\t270113182136Z\t\t1000\tunknown\t/CN={row_name or name}\n")
        (root / "serial").write_text("1001\n")
    return callback


def _add_client_argv(name: str) -> list[list[str]]:
    return [
        ["openssl", "genrsa", "-out", f"private/{name}.key", "2048"],
        ["openssl", "req", "-new", "-key", f"private/{name}.key", "-out", f"certs/{name}.csr", "-subj", f"/CN={name}",
         "-config", "openssl.cnf"],
        ["openssl", "ca", "-config", "openssl.cnf", "-extensions", "v3_client", "-days", "365", "-batch",
         "-in", f"certs/{name}.csr", "-out", f"certs/{name}.crt"],
        ["openssl", "pkcs12", "-export", "-out", f"certs/{name}.p12", "-inkey", f"private/{name}.key",
         "-in", f"certs/{name}.crt", "-certfile", "ca/ca.crt", "-name", name, "-passout", "stdin",
         "-keypbe", "PBE-SHA1-3DES", "-certpbe", "PBE-SHA1-3DES", "-macalg", "sha1"],
        ["openssl", "pkcs12", "-in", f"certs/{name}.p12", "-noout", "-passin", "stdin"],
    ]


def _register_add_client(fp, root: Path, name: str, failing: int | None = None, stdin_seen: list | None = None):
    key, csr, _ = _client(name)
    outputs = [_touch(root, f"private/{name}.key", key), _touch(root, f"certs/{name}.csr", csr), _fake_sign(root, name),
               _touch(root, f"certs/{name}.p12"), None]
    for i, (argv, cb) in enumerate(zip(_add_client_argv(name), outputs, strict=True)):
        if failing is not None and i > failing:
            break
        kwargs = {"callback": cb} if cb else {}
        if stdin_seen is not None:
            kwargs["stdin_callable"] = lambda data: stdin_seen.append(data)
        if i == failing:
            fp.register(argv, returncode=1, stderr=OPENSSL_ERR, **kwargs)
        else:
            fp.register(argv, **kwargs)


def test_add_client_runs_the_guides_four_commands_then_reads_the_bundle_back(fp, tmp_path):
    root = _pki(tmp_path)
    seen: list = []
    _register_add_client(fp, root, "iphone-jmrp", stdin_seen=seen)
    settings = resolve_settings(root, None, environ={})
    req = client.build_request(settings, "iphone-jmrp", password="s3cret-pass")
    result = client.issue_client(settings, req, Runner())
    assert [list(c) for c in fp.calls] == _add_client_argv("iphone-jmrp")
    assert result.serial == "1000" and result.password is None
    # the password reached openssl on stdin, and never on any argv
    assert b"s3cret-pass\n" in [s if isinstance(s, bytes) else s.encode() for s in seen]
    assert not any("s3cret-pass" in arg for call in fp.calls for arg in call)
    assert (root / "private/iphone-jmrp.key").stat().st_mode & 0o777 == 0o600
    assert (root / "certs/iphone-jmrp.p12").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("failing", range(3))
def test_add_client_failure_before_issuance_leaves_no_new_file(fp, tmp_path, failing):
    root = _pki(tmp_path)
    before = tree(root)
    _register_add_client(fp, root, "laptop", failing=failing)
    settings = resolve_settings(root, None, environ={})
    with pytest.raises(OpenSSLError):
        client.issue_client(settings, client.build_request(settings, "laptop"), Runner())
    after = tree(root)
    after.pop(".mtlsctl.lock", None)
    assert after == before


@pytest.mark.parametrize("failing", [3, 4])
def test_add_client_export_failure_keeps_the_issued_certificate_and_points_to_export(fp, tmp_path, failing, mtls):
    root = _pki(tmp_path)
    _register_add_client(fp, root, "laptop", failing=failing)
    res = mtls(["--pki-dir", str(root), "add-client", "laptop"])
    assert res.code == 1
    assert "issued (serial 1000)" in res.err and "mtlsctl export laptop" in res.err
    assert (root / "certs/laptop.crt").exists() and (root / "private/laptop.key").exists()
    assert not (root / "certs/laptop.p12").exists()
    assert "1000\tunknown\t/CN=laptop" in (root / "index.txt").read_text()


def test_add_client_openssl_ca_exit_0_without_database_row_is_rolled_back(fp, tmp_path):
    """FIELD-NOTES: exit 0 alone proves nothing; the serial must be in index.txt."""
    root = _pki(tmp_path)
    before = tree(root)
    argv = _add_client_argv("laptop")
    fp.register(argv[0], callback=_touch(root, "private/laptop.key", _client("laptop")[0]))
    fp.register(argv[1], callback=_touch(root, "certs/laptop.csr", _client("laptop")[1]))
    fp.register(argv[2], callback=_fake_sign(root, "laptop", row_name="someone-else"))
    settings = resolve_settings(root, None, environ={})
    with pytest.raises(StateError, match="not \\(uniquely\\) in index.txt"):
        client.issue_client(settings, client.build_request(settings, "laptop"), Runner())
    after = tree(root)
    after.pop(".mtlsctl.lock", None)
    assert after == before


def test_add_client_with_sans_and_ec_key_argv(fp, tmp_path):
    root = _pki(tmp_path)
    settings = resolve_settings(root, None, environ={})
    req = client.build_request(settings, "svc", key_type="ec", sans=["dns:Svc.Example.com", "IP:10.0.0.1"], p12="modern")
    cmds = [c.argv for c in client.issue_commands(req)]
    assert cmds[0] == ("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "private/svc.key")
    assert cmds[1][-2:] == ("-addext", "subjectAltName=DNS:svc.example.com,IP:10.0.0.1")
    assert cmds[3][-2:] == ("-passout", "stdin")  # modern: the guide's exact command, no extra flags


def test_add_client_dry_run_prints_commands_and_changes_nothing(tmp_path, mtls):
    root = _pki(tmp_path)
    before = tree(root)
    res = mtls(["--pki-dir", str(root), "add-client", "iphone-jmrp", "--dry-run"])
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    assert lines[0] == "openssl genrsa -out private/iphone-jmrp.key 2048"
    assert lines[2] == ("openssl ca -config openssl.cnf -extensions v3_client -days 365 -batch "
                        "-in certs/iphone-jmrp.csr -out certs/iphone-jmrp.crt")
    assert lines[3].endswith("# password on stdin")
    assert tree(root) == before


def test_init_dry_run_prints_commands_and_changes_nothing(tmp_path, mtls):
    res = mtls(["--pki-dir", str(tmp_path / "pki"), "init", "--dry-run"])
    assert res.code == 0, res.err
    assert res.out.splitlines()[:2] == [
        "openssl genrsa -out private/ca.key 4096",
        "openssl req -new -x509 -days 3650 -key private/ca.key -out ca/ca.crt -config openssl.cnf -extensions v3_ca",
    ]
    assert not (tmp_path / "pki").exists()
