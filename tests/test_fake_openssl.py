"""Second-line checks, exercised by an openssl that misbehaves.

A real openssl behaves, so the checks mtlsctl makes after each openssl step never fire in the rest of the suite.
Here a fake `openssl` earlier on PATH runs the real one, but does one thing wrong on one kind of command: it signs
another request than the one it was given, signs with the CA section (CA:TRUE), a server's section or another
CA's key, exits 0
having written nothing, leaves the database without the new row or with another CN in it, writes a CRL another
key signed or one already expired, pretends to revoke. Each misbehaviour must be caught by mtlsctl's own checks
(client.check_signed and sign_into_database, csr.check_issued, crl.check_new_crl, lifecycle.revoke_row, the bundle's
read-back): exit 1, the message names what is wrong, and the PKI is exactly as before (rolled back, nothing
half-done). Each test also proves the fake really misbehaved (its log), so none can pass because it did not.

The fake also records the environment openssl gets: no OPENSSL_* or SSL_CERT_* variable reaches it, and a hostile
OPENSSL_CONF in mtlsctl's environment changes nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import _copy_pki, ca_status, openssl, require_tool, run_cli, set_profile, tree, verify_crl

pytestmark = pytest.mark.integration

FAKE = r'''#!{python} -I
"""A misbehaving openssl (tests/test_fake_openssl.py): MTLS_FAKE_MODE says what it does wrong."""
import datetime, json, os, subprocess, sys

real = os.environ["MTLS_REAL_OPENSSL"]
mode = os.environ.get("MTLS_FAKE_MODE", "")
args = sys.argv[1:]


def log(action):
    env = sorted(k for k in os.environ if k.startswith(("OPENSSL_", "SSL_CERT_")))
    with open(os.environ["MTLS_FAKE_LOG"], "a") as fh:
        fh.write(json.dumps({{"action": action, "args": args, "env": env}}) + "\n")


def value(flag):
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


def replace_value(flag, new):
    args[args.index(flag) + 1] = new


def run():
    return subprocess.run([real, *args], close_fds=False).returncode


is_ca = args[:1] == ["ca"]
signs = is_ca and "-in" in args and "-gencrl" not in args and "-revoke" not in args
gencrl = is_ca and "-gencrl" in args
revokes = is_ca and "-revoke" in args
exports = args[:1] == ["pkcs12"] and "-export" in args

if signs and mode == "sign-other-request":
    log(mode); replace_value("-in", os.environ["MTLS_FAKE_OTHER_CSR"]); sys.exit(run())
if signs and mode == "sign-ca-true":
    log(mode); replace_value("-extensions", "v3_ca"); sys.exit(run())
if signs and mode == "sign-server-section":
    log(mode); replace_value("-extensions", "v3_server_ec"); sys.exit(run())
if signs and mode == "sign-other-ca":
    log(mode); args += ["-keyfile", os.environ["MTLS_FAKE_EVIL_KEY"], "-cert", os.environ["MTLS_FAKE_EVIL_CRT"]]; sys.exit(run())
if signs and mode == "sign-no-output":
    log(mode); sys.exit(0)
if signs and mode in ("sign-no-row", "sign-other-cn"):
    log(mode)
    index = open("index.txt").read()
    code = run()
    if mode == "sign-no-row":
        open("index.txt", "w").write(index)  # the certificate is written, the row is not
    else:
        rows = open("index.txt").read().splitlines(True)
        fields = rows[-1].split("\t")
        fields[5] = fields[5].rsplit("/CN=", 1)[0] + "/CN=someone-else\n"
        rows[-1] = "\t".join(fields)
        open("index.txt", "w").write("".join(rows))
    sys.exit(code)
if signs and mode == "sign-swapped-output":
    log(mode)
    code = run()
    open(value("-out"), "w").write(open(os.environ["MTLS_FAKE_EVIL_CRT"]).read())
    sys.exit(code)
if gencrl and mode == "crl-no-output":
    log(mode); sys.exit(0)
if gencrl and mode == "crl-other-ca":
    log(mode); args += ["-keyfile", os.environ["MTLS_FAKE_EVIL_KEY"], "-cert", os.environ["MTLS_FAKE_EVIL_CRT"]]; sys.exit(run())
if gencrl and mode == "crl-expired":
    log(mode)
    now = datetime.datetime.now(datetime.timezone.utc)
    replace_value("-crl_lastupdate", (now - datetime.timedelta(days=2)).strftime("%y%m%d%H%M%SZ"))
    replace_value("-crl_nextupdate", (now - datetime.timedelta(days=1)).strftime("%y%m%d%H%M%SZ"))
    sys.exit(run())
if revokes and mode == "revoke-no-op":
    log(mode); sys.exit(0)
if exports and mode == "export-no-output":
    log(mode); sys.exit(0)
log("passed-through")
os.execv(real, [real, *args])
'''


@pytest.fixture(scope="session")
def evil_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Another CA with the same subject as the test CA: only the key (the signature) tells them apart."""
    d = tmp_path_factory.mktemp("evil")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "30",
            "-keyout", str(d / "evil.key"), "-out", str(d / "evil.crt"), "-subj", "/CN=Test Root CA/O=mtlsctl tests",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return d / "evil.key", d / "evil.crt"


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, evil_ca: tuple[Path, Path]):
    """fake(mode): from now on `openssl` on PATH is the misbehaving one; returns its log (one entry per run)."""
    real = require_tool("openssl")
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    script = bin_dir / "openssl"
    script.write_text(FAKE.format(python=sys.executable))
    script.chmod(0o755)
    log = tmp_path / "fake-openssl.log"
    monkeypatch.setenv("MTLS_REAL_OPENSSL", real)
    monkeypatch.setenv("MTLS_FAKE_LOG", str(log))
    monkeypatch.setenv("MTLS_FAKE_EVIL_KEY", str(evil_ca[0]))
    monkeypatch.setenv("MTLS_FAKE_EVIL_CRT", str(evil_ca[1]))

    def activate(mode: str) -> Path:
        monkeypatch.setenv("MTLS_FAKE_MODE", mode)
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        return log
    return activate


def entries(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def misbehaved(log: Path, mode: str) -> bool:
    return any(e["action"] == mode for e in entries(log))


def cli(pki: Path, *args: str, stdin: str | None = None):
    return run_cli(["--pki-dir", str(pki), *args], stdin=stdin)


def device_csr(tmp_path: Path, cn: str, stem: str | None = None) -> Path:
    """A request for CN=cn with a P-256 key of its own, made by the real openssl outside the PKI."""
    key, csr = tmp_path / f"{stem or cn}.key", tmp_path / f"{stem or cn}.csr"
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key))
    openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={cn}")
    return csr


# --------------------------------------------------------------------------- signing

SIGN_MODES = {
    # misbehaviour -> what mtlsctl's message says
    "sign-other-request": "its public key is not the one of",
    "sign-ca-true": "CA certificate (basicConstraints CA:TRUE)",
    "sign-server-section": "extended key usage",
    "sign-other-ca": "is not signed by ca/ca.crt",
    "sign-no-output": "is not (uniquely) in index.txt",
    "sign-no-row": "is not (uniquely) in index.txt",
    "sign-other-cn": "is not (uniquely) in index.txt",
    "sign-swapped-output": "does not match newcerts/",
}


def _prepare(command: str, pki: Path, tmp_path: Path) -> tuple[list[str], str]:
    """The command line that signs (with the real openssl for the setup), and the CN it signs for."""
    set_profile(pki, nginx={"test_command": "", "reload_command": ""})
    if command == "add-client":
        return ["add-client", "phone"], "phone"
    if command == "add-client --from-file":
        names = tmp_path / "names.txt"
        names.write_text("phone\ntablet\n")
        return ["add-client", "--from-file", str(names)], "phone"
    if command == "sign-csr":
        return ["sign-csr", str(device_csr(tmp_path, "sensor")), "--name", "sensor"], "sensor"
    if command == "renew":
        assert cli(pki, "add-client", "phone", "--days", "3").code == 0
        return ["renew", "--no-reload"], "phone"
    raise AssertionError(command)


@pytest.mark.parametrize("command", ["add-client", "add-client --from-file", "sign-csr", "renew"])
@pytest.mark.parametrize("mode", sorted(SIGN_MODES))
def test_a_signature_that_is_not_what_was_asked_for_is_withdrawn(fast_pki, tmp_path, monkeypatch, fake, mode, command):
    args, cn = _prepare(command, fast_pki, tmp_path)
    # what the fake signs instead: a request for the same CN, with another key
    monkeypatch.setenv("MTLS_FAKE_OTHER_CSR", str(device_csr(tmp_path, cn, stem=f"other-{cn}")))
    before = tree(fast_pki)
    log = fake(mode)
    res = cli(fast_pki, *args)
    assert misbehaved(log, mode), entries(log)
    assert res.code == 1, (res.code, res.out, res.err)
    assert SIGN_MODES[mode] in res.err, res.err
    assert tree(fast_pki) == before  # rolled back: no key, CSR, certificate, row, newcerts file or serial step left


def test_the_checks_pass_what_a_behaving_openssl_signs(fast_pki, tmp_path, monkeypatch, fake):
    """The same fake with no misbehaviour: every command above succeeds (the checks refuse only what is wrong)."""
    log = fake("none")
    for command in ("add-client", "add-client --from-file", "sign-csr", "renew"):
        pki = _copy_pki(fast_pki, tmp_path / command.replace(" ", "_"))
        args, _ = _prepare(command, pki, tmp_path)
        res = cli(pki, *args)
        assert res.code == 0, (command, res.err)
    assert entries(log) and {e["action"] for e in entries(log)} == {"passed-through"}


# --------------------------------------------------------------------------- the CRL

CRL_MODES = {
    "crl-no-output": "wrote no CRL",
    "crl-other-ca": "it is not signed by ca/ca.crt",
    "crl-expired": "is not in the future",
}


@pytest.mark.parametrize("command", ["crl", "revoke"])
@pytest.mark.parametrize("mode", sorted(CRL_MODES))
def test_a_crl_nginx_could_not_use_is_never_installed(fast_pki, fake, mode, command):
    set_profile(fast_pki, nginx={"test_command": "", "reload_command": ""})
    assert cli(fast_pki, "add-client", "phone").code == 0
    serial = json.loads(cli(fast_pki, "list", "--json").out)[0]["serial"]
    before = tree(fast_pki)
    log = fake(mode)
    res = cli(fast_pki, *(["crl", "--no-reload"] if command == "crl" else ["revoke", "phone", "--no-reload"]))
    assert misbehaved(log, mode), entries(log)
    assert res.code == 1, (res.code, res.err)
    assert CRL_MODES[mode] in res.err, res.err
    assert tree(fast_pki) == before  # the old CRL, crlnumber, and (revoke) the database as they were
    assert ca_status(fast_pki, serial) == "Valid"
    assert verify_crl(fast_pki, "certs/phone.crt").endswith(": OK")


@pytest.mark.parametrize("mode", ["crl-no-output", "crl-other-ca"])
def test_a_root_crl_nginx_could_not_use_is_never_installed(tmp_path, _two_tier_template, fake, mode):
    pki = _copy_pki(_two_tier_template, tmp_path / "pki")
    before = tree(pki)
    log = fake(mode)
    res = cli(pki, "crl", "--root", "--no-reload")
    assert misbehaved(log, mode), entries(log)
    assert res.code == 1, (res.code, res.err)
    assert (CRL_MODES[mode].replace("ca/ca.crt", "ca/root.crt")) in res.err, res.err
    assert tree(pki) == before


# --------------------------------------------------------------------------- revocation, bundles


def test_a_revocation_openssl_did_not_record_is_an_error(fast_pki, fake):
    set_profile(fast_pki, nginx={"test_command": "", "reload_command": ""})
    assert cli(fast_pki, "add-client", "phone").code == 0
    before = tree(fast_pki)
    log = fake("revoke-no-op")
    res = cli(fast_pki, "revoke", "phone", "--no-reload")
    assert misbehaved(log, "revoke-no-op")
    assert res.code == 1 and "is not revoked in index.txt" in res.err, res.err
    assert tree(fast_pki) == before


def test_a_bundle_openssl_did_not_write_is_never_installed(fast_pki, fake):
    assert cli(fast_pki, "add-client", "phone").code == 0
    before = tree(fast_pki)
    log = fake("export-no-output")
    res = cli(fast_pki, "export", "phone", "--force")
    assert misbehaved(log, "export-no-output")
    assert res.code == 1 and "pkcs12" in res.err, res.err
    assert tree(fast_pki) == before  # the old bundle and its password file are kept


# --------------------------------------------------------------------------- what reaches openssl

HOSTILE_ENV = {
    "OPENSSL_CONF": "",  # set below: a configuration that breaks every openssl that loads it
    "OPENSSL_CONF_INCLUDE": "/nonexistent/include",
    "OPENSSL_MODULES": "/nonexistent/modules",
    "OPENSSL_ENGINES": "/nonexistent/engines",
    "OPENSSL_ia32cap": "~0x0",
    "SSL_CERT_FILE": "/nonexistent/cert.pem",
    "SSL_CERT_DIR": "/nonexistent/certs",
}
HOSTILE_CNF = """\
# loads a provider that does not exist and activates nothing else: openssl cannot even make a key
openssl_conf = openssl_init
[openssl_init]
providers = provider_sect
[provider_sect]
evil = evil_sect
[evil_sect]
module = /nonexistent/mtlsctl-evil-provider.so
activate = 1
"""


def _hostile_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cnf = tmp_path / "hostile.cnf"
    cnf.write_text(HOSTILE_CNF)
    for key, value in {**HOSTILE_ENV, "OPENSSL_CONF": str(cnf)}.items():
        monkeypatch.setenv(key, value)
    return cnf


def _lifecycle(pki: Path, tmp_path: Path, csr: Path) -> None:
    """Every command that runs openssl: issue (one, a batch, a device's CSR), export, revoke, CRL, renew, verify."""
    set_profile(pki, nginx={"test_command": "", "reload_command": ""})
    names = tmp_path / "names.txt"
    names.write_text("batch-1\nbatch-2\n")
    for args in (["add-client", "phone", "--days", "3"], ["add-client", "--from-file", str(names)],
                 ["sign-csr", str(csr), "--name", "sensor"], ["export", "phone", "--force"],
                 ["revoke", "batch-1", "--no-reload"], ["crl", "--no-reload"], ["renew", "--no-reload"], ["verify", "phone"],
                 ["add-server", "web.example.com"]):
        res = cli(pki, *args)
        assert res.code == 0, (args, res.err)


def test_no_openssl_or_ssl_cert_variable_reaches_openssl(fast_pki, tmp_path, monkeypatch, fake):
    """runner.child_env: the fake records the environment of every openssl mtlsctl starts."""
    csr = device_csr(tmp_path, "sensor")  # the device's own openssl, before the fake is on PATH
    _hostile_environment(tmp_path, monkeypatch)
    log = fake("none")
    _lifecycle(fast_pki, tmp_path, csr)
    runs = entries(log)
    commands = {e["args"][0] for e in runs}
    assert {"genpkey", "req", "ca", "pkcs12", "verify"} <= commands, commands
    leaked = [(e["args"][:2], e["env"]) for e in runs if e["env"]]
    assert leaked == [], leaked


def test_a_hostile_openssl_conf_in_the_environment_changes_nothing(fast_pki, tmp_path, monkeypatch):
    """The real openssl with OPENSSL_CONF naming a configuration that breaks it: mtlsctl's openssl never reads it."""
    csr = device_csr(tmp_path, "sensor")
    _hostile_environment(tmp_path, monkeypatch)
    # the control: the same environment breaks an openssl started without mtlsctl's scrubbing
    raw = subprocess.run([require_tool("openssl"), "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
                         capture_output=True, text=True, env=dict(os.environ), check=False)
    assert raw.returncode != 0, "the hostile configuration did not break openssl: this test would prove nothing"
    _lifecycle(fast_pki, tmp_path, csr)
    assert openssl("verify", "-CAfile", "ca/ca.crt", "certs/phone.crt", cwd=fast_pki).stdout.strip().endswith("OK")
    assert ca_status(fast_pki, json.loads(cli(fast_pki, "list", "--json", "--status", "revoked").out)[0]["serial"]) == "Revoked"


def test_no_secret_reaches_openssls_argv(tmp_path, monkeypatch, fake):
    """Every argv openssl was started with (recorded by the fake, no strace needed): no export password, no
    generated one, no CA passphrase; those travel on stdin and pipes (`-passout stdin`, `-passin fd:N`)."""
    secrets = {"ca": "Ca-Passphrase-7f3e9", "p12": "Export-Password-4b1d", "file": "File-Password-93ac2"}
    for key, value in secrets.items():
        (tmp_path / f"{key}.txt").write_text(value + "\n")
    prof = tmp_path / "p.yaml"
    prof.write_text("ca: {subject: {CN: Secret CA}, key: {type: ec, curve: P-256, encrypt: true}, days: 800}\n"
                    "clients: {key: {type: ec, curve: P-256}}\nnginx: {test_command: '', reload_command: ''}\n")
    pki, ca = tmp_path / "pki", ["--ca-passphrase-file", str(tmp_path / "ca.txt")]
    log = fake("none")
    outputs = []
    for args, stdin in ((["--profile", str(prof), *ca, "init"], None),
                        ([*ca, "add-client", "phone", "--password-stdin"], secrets["p12"] + "\n"),
                        ([*ca, "add-client", "laptop", "--json"], None),
                        (["export", "phone", "--force", "--password-file", str(tmp_path / "file.txt")], None),
                        ([*ca, "add-client", "soon", "--days", "3"], None), ([*ca, "renew", "--no-reload"], None),
                        ([*ca, "revoke", "laptop", "--no-reload"], None), ([*ca, "crl", "--no-reload"], None)):
        res = cli(pki, *args, stdin=stdin)
        assert res.code == 0, (args, res.err)
        outputs.append(res.out)
    generated = json.loads(outputs[2])["password"]
    renewed = (pki / "private/soon.p12.password").read_text().strip()
    argvs = [" ".join(e["args"]) for e in entries(log)]
    assert sum(a.startswith("ca ") for a in argvs) >= 6 and any(a.startswith("pkcs12 -export") for a in argvs)
    for value in (*secrets.values(), generated, renewed):
        assert not [a for a in argvs if value in a], f"a secret reached openssl's argv: {value}"
    assert any(re.search(r"-passin fd:\d+", a) for a in argvs)  # the CA passphrase went down a pipe
