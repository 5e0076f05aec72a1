"""Replace a device: the guide's main scenario (a phone is lost: revoke it, issue the person a new one under the
same name), with real openssl, in a single- and a two-tier PKI.

- `add-client NAME` on a name whose certificates are all revoked or expired archives the old files in
  archive/NAME/SERIAL/ (journaled with the issuance) and issues a new one; an active name is still refused;
- `replace NAME` issues the new certificate first, then revokes the old one, then the CRL;
- `export` refuses a revoked or expired certificate, and keeps private/NAME.p12.password true or removes it.

Each test names the protection it is about; each fails when that protection is removed.
"""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import pytest

from mtlsctl import client
from mtlsctl.errors import StateError
from mtlsctl.runner import Runner

from .conftest import ca_status, is_two_tier, openssl, set_profile, tree
from .test_crash_and_concurrency import assert_consistent, injector, mtlsctl  # noqa: F401 (injector: a fixture)

pytestmark = pytest.mark.integration

GUIDE_FILES = ("private/{n}.key", "certs/{n}.csr", "certs/{n}.crt", "certs/{n}.p12")


def cli(mtls, pki: Path, *args: str, stdin: str | None = None):
    return mtls(["--pki-dir", str(pki), *args], stdin=stdin)


def ok(res):
    assert res.code == 0, (res.code, res.out, res.err)
    return res


def serial_of(path: Path) -> str:
    return openssl("x509", "-in", str(path), "-noout", "-serial").stdout.strip().split("=")[1]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def verify_with_crl(pki: Path, crt: str) -> str:
    """openssl verify as nginx checks a client: the chain, the purpose and every CA's CRL."""
    if is_two_tier(pki):
        argv = ["verify", "-purpose", "sslclient", "-crl_check_all", "-CAfile", "ca/root.crt", "-untrusted", "ca/ca.crt",
                "-CRLfile", "crl/chain.crl", crt]
    else:
        argv = ["verify", "-purpose", "sslclient", "-crl_check", "-CAfile", "ca/ca.crt", "-CRLfile", "crl/ca.crl", crt]
    res = openssl(*argv, cwd=pki, check=False)
    return (res.stdout + res.stderr).strip()


def files_of(pki: Path, name: str) -> dict[str, bytes]:
    return {rel.format(n=name): (pki / rel.format(n=name)).read_bytes() for rel in GUIDE_FILES}


@pytest.fixture
def pki(tiered_pki: Path) -> Path:
    set_profile(tiered_pki, nginx={"test_command": "", "reload_command": ""})
    return tiered_pki


def without_lock(snapshot: dict) -> dict:
    return {k: v for k, v in snapshot.items() if not k.startswith(".mtlsctl.lock")}


def ltree(root: Path) -> dict[str, object]:
    """tree() that records a symbolic link (a dangling one too) as its target instead of following it."""
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            out[rel + "/"] = mode(path)
        elif rel != ".mtlsctl.lock":
            out[rel] = (mode(path), path.read_bytes())
    return out


# --------------------------------------------------------------------------- the lost phone, by hand


def test_lost_device_revoke_then_add_client_again(pki, mtls):
    """Protection: add-client archives a revoked name's files instead of refusing (the dead end of issue 13),
    keeps index.txt's history, and the archive is private (700 directories, the key 600)."""
    first = json.loads(ok(cli(mtls, pki, "add-client", "phone", "--san", "email:pat@example.com", "--json")).out)
    old_serial = first["serial"]
    old = files_of(pki, "phone")
    ok(cli(mtls, pki, "revoke", "phone", "--reason", "keyCompromise", "--no-reload"))
    assert "certificate revoked" in verify_with_crl(pki, "certs/phone.crt")

    again = json.loads(ok(cli(mtls, pki, "add-client", "phone", "--san", "email:pat@example.com", "--json")).out)
    new_serial = again["serial"]
    assert new_serial != old_serial and serial_of(pki / "certs/phone.crt") == new_serial
    assert ca_status(pki, new_serial) == "Valid" and ca_status(pki, old_serial) == "Revoked"
    rows = [line.split("\t") for line in (pki / "index.txt").read_text().splitlines() if line.endswith("/CN=phone")]
    assert [(r[0], r[3]) for r in rows] == [("R", old_serial), ("V", new_serial)]  # the history stays

    archive = pki / "archive/phone" / old_serial
    assert again["archived"] == str(archive)
    assert {p.name: p.read_bytes() for p in archive.iterdir()} == {Path(k).name: v for k, v in old.items()}
    assert mode(pki / "archive") == mode(pki / "archive/phone") == mode(archive) == 0o700
    assert mode(archive / "phone.key") == 0o600 and mode(archive / "phone.p12") == 0o600
    assert mode(pki / "private/phone.key") == 0o600 and mode(pki / "certs/phone.crt") == 0o644

    assert verify_with_crl(pki, "certs/phone.crt").endswith("OK")
    assert "certificate revoked" in verify_with_crl(pki, f"archive/phone/{old_serial}/phone.crt")
    assert ok(cli(mtls, pki, "verify", "phone")).out.startswith("phone: OK")
    key_pub = openssl("pkey", "-in", "private/phone.key", "-pubout", cwd=pki).stdout
    assert openssl("x509", "-in", "certs/phone.crt", "-noout", "-pubkey", cwd=pki).stdout == key_pub
    assert "email:pat@example.com" in openssl("x509", "-in", "certs/phone.crt", "-noout", "-ext", "subjectAltName", cwd=pki).stdout
    assert not (pki / ".mtlsctl.journal").exists()


def test_an_active_name_is_still_refused_and_pointed_at_replace(pki, mtls):
    ok(cli(mtls, pki, "add-client", "phone"))
    before = tree(pki)
    res = cli(mtls, pki, "add-client", "phone")
    assert res.code == 2 and "already has an active certificate" in res.err and "mtlsctl replace phone" in res.err
    assert tree(pki) == before


def test_a_case_variant_of_an_active_name_is_refused_even_with_retired_files(pki, mtls):
    """Protection: names stay unique regardless of case; retiring `Phone`'s dead files must not bypass that."""
    ok(cli(mtls, pki, "add-client", "Phone"))
    ok(cli(mtls, pki, "revoke", "Phone", "--no-reload"))
    ok(cli(mtls, pki, "add-client", "phone"))
    before = tree(pki)
    for command in (["add-client", "Phone"], ["add-server", "Phone"]):
        res = cli(mtls, pki, *command)
        assert res.code == 2 and "differs only in case" in res.err, res.err
    assert tree(pki) == before


def test_files_no_certificate_of_the_name_accounts_for_are_never_archived(pki, mtls):
    (pki / "certs/stray.crt").write_text("not mine\n")
    before = tree(pki)
    res = cli(mtls, pki, "add-client", "stray")
    assert res.code == 2 and "files for 'stray' already exist" in res.err
    assert tree(pki) == before


def test_an_expired_certificate_in_a_guide_made_pki(pki, mtls, tmp_path):
    """An expired row stays V in index.txt, and a PKI made with the guide has unique_subject = yes: openssl
    then refuses a new certificate of the same subject. Protections: expired counts as retired; export refuses
    an expired certificate; index.txt.attr is set to unique_subject = no for the new one."""
    key, csr = tmp_path / "k.pem", tmp_path / "r.csr"
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key))
    openssl("req", "-new", "-key", str(key), "-subj", "/CN=phone", "-out", str(csr))
    openssl("ca", "-config", "openssl.cnf", "-batch", "-notext", "-extensions", "v3_client_ec", "-startdate", "20200101000000Z",
            "-enddate", "20200201000000Z", "-in", str(csr), "-out", "certs/phone.crt", cwd=pki)
    (pki / "private/phone.key").write_bytes(key.read_bytes())
    os.chmod(pki / "private/phone.key", 0o600)
    (pki / "certs/phone.csr").write_bytes(csr.read_bytes())
    (pki / "index.txt.attr").write_text("unique_subject = yes\n")
    old_serial = serial_of(pki / "certs/phone.crt")
    assert (pki / "index.txt").read_text().startswith("V\t")

    before = tree(pki)
    res = cli(mtls, pki, "export", "phone", "--force")
    assert res.code == 2 and "is expired" in res.err and "add-client phone" in res.err
    res = cli(mtls, pki, "export", "phone", "--dry-run")
    assert res.code == 2 and "is expired" in res.err
    assert tree(pki) == before

    new = json.loads(ok(cli(mtls, pki, "add-client", "phone", "--json")).out)
    assert ca_status(pki, new["serial"]) == "Valid"
    assert sorted(p.name for p in (pki / "archive/phone" / old_serial).iterdir()) == ["phone.crt", "phone.csr", "phone.key"]
    assert "unique_subject = no" in (pki / "index.txt.attr").read_text()


# --------------------------------------------------------------------------- replace


@pytest.fixture
def spy(monkeypatch):
    """Every argv the runner runs, with the status of the new and old rows in index.txt at that moment."""
    calls: list[tuple[tuple[str, ...], str]] = []
    real = Runner.run

    def run(self, cmd, cwd=None, check=True):
        index = (Path(cwd) / "index.txt").read_text() if cwd else ""
        calls.append((cmd.argv, index))
        return real(self, cmd, cwd=cwd, check=check)

    monkeypatch.setattr(Runner, "run", run)
    return calls


def _shape(argv: tuple[str, ...]) -> str:
    for flag in ("-revoke", "-gencrl", "-export", "-extensions", "-noout"):
        if flag in argv:
            return f"{argv[1]} {flag}"
    return argv[1]


def test_replace_signs_first_then_revokes_then_the_crl(pki, mtls, spy):
    """Protection: the order. The new certificate is in index.txt (V) before the old one is revoked; the CRL
    comes last, once."""
    old_serial = json.loads(ok(cli(mtls, pki, "add-client", "phone", "--json")).out)["serial"]
    spy.clear()
    out = json.loads(ok(cli(mtls, pki, "replace", "phone", "--json")).out)
    new_serial = out["serial"]
    shapes = [_shape(argv) for argv, _ in spy]
    assert shapes == ["genpkey", "req", "ca -extensions", "pkcs12 -export", "pkcs12 -noout", "ca -revoke", "ca -gencrl"]
    revoke_argv, index_at_revoke = spy[5]
    assert revoke_argv == ("openssl", "ca", "-config", "openssl.cnf", "-revoke", f"archive/phone/{old_serial}/phone.crt",
                           "-crl_reason", "keyCompromise")
    # when the old one is revoked, both are valid in index.txt: the new one was issued first
    valid_then = [line.split("\t")[3] for line in index_at_revoke.splitlines() if line.startswith("V")]
    assert valid_then == [old_serial, new_serial]
    assert out["revoked"] == [old_serial] and out["reason"] == "keyCompromise" and out["password"]
    assert ca_status(pki, old_serial) == "Revoked" and ca_status(pki, new_serial) == "Valid"
    assert "certificate revoked" in verify_with_crl(pki, f"archive/phone/{old_serial}/phone.crt")
    assert verify_with_crl(pki, "certs/phone.crt").endswith("OK")
    # the bundle is the new key and certificate, with the password printed once
    dump = openssl("pkcs12", "-in", "certs/phone.p12", "-nodes", "-passin", "stdin", input=out["password"] + "\n", cwd=pki).stdout
    assert serial_of(pki / "certs/phone.crt") == new_serial and "BEGIN PRIVATE KEY" in dump


def test_replace_keeps_the_kind_and_sans_and_the_reason_is_case_insensitive(pki, mtls):
    ok(cli(mtls, pki, "add-client", "laptop", "--san", "email:me@example.com", "--san", "DNS:laptop.lan"))
    out = json.loads(ok(cli(mtls, pki, "replace", "laptop", "--reason", "SUPERSEDED", "--json")).out)
    assert out["reason"] == "superseded" and out["sans"] == ["email:me@example.com", "DNS:laptop.lan"]
    assert "superseded" in (pki / "index.txt").read_text().splitlines()[0]
    before = tree(pki)
    res = cli(mtls, pki, "replace", "laptop", "--reason", "removeFromCRL")
    assert res.code == 2 and "not a revocation reason" in res.err
    assert tree(pki) == before


def test_replace_a_server_rewrites_its_fullchain(pki, mtls):
    ok(cli(mtls, pki, "add-server", "web.example.com", "--san", "DNS:web.example.com"))
    old_serial = serial_of(pki / "certs/web.example.com.crt")
    out = json.loads(ok(cli(mtls, pki, "replace", "web.example.com", "--json")).out)
    assert out["kind"] == "server" and out["files"]["p12"] is None and out["sans"] == ["DNS:web.example.com"]
    archived = sorted(p.name for p in (pki / "archive/web.example.com" / old_serial).iterdir())
    assert archived == ["web.example.com.crt", "web.example.com.csr", "web.example.com.fullchain.pem", "web.example.com.key"]
    chain = (pki / "certs/web.example.com.fullchain.pem").read_text()
    assert chain.startswith(openssl("x509", "-in", "certs/web.example.com.crt", cwd=pki).stdout.strip().split("\n")[0])
    assert serial_of(pki / "certs/web.example.com.fullchain.pem") == out["serial"]
    assert ca_status(pki, old_serial) == "Revoked"


def test_add_server_over_a_revoked_server_archives_its_fullchain(pki, mtls):
    ok(cli(mtls, pki, "add-server", "web"))
    old_serial = serial_of(pki / "certs/web.crt")
    ok(cli(mtls, pki, "revoke", "web", "--no-reload"))
    ok(cli(mtls, pki, "add-server", "web"))
    assert (pki / "archive/web" / old_serial / "web.fullchain.pem").exists()
    assert serial_of(pki / "certs/web.fullchain.pem") == serial_of(pki / "certs/web.crt") != old_serial


def test_sign_csr_over_a_revoked_name_archives_the_old_key(pki, mtls, tmp_path):
    """No key on the host afterwards: the old private/NAME.key (which does not match the new certificate) goes
    to the archive with the rest."""
    ok(cli(mtls, pki, "add-client", "dev"))
    old_serial = serial_of(pki / "certs/dev.crt")
    ok(cli(mtls, pki, "revoke", "dev", "--no-reload"))
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(tmp_path / "d.key"),
            "-subj", "/CN=dev", "-out", str(tmp_path / "d.csr"))
    ok(cli(mtls, pki, "sign-csr", str(tmp_path / "d.csr"), "--name", "dev"))
    assert not (pki / "private/dev.key").exists() and not (pki / "certs/dev.p12").exists()
    assert sorted(p.name for p in (pki / "archive/dev" / old_serial).iterdir()) == ["dev.crt", "dev.csr", "dev.key", "dev.p12"]
    assert verify_with_crl(pki, "certs/dev.crt").endswith("OK")


def test_add_client_from_file_archives_retired_names(pki, mtls, tmp_path):
    ok(cli(mtls, pki, "add-client", "a"))
    old_serial = serial_of(pki / "certs/a.crt")
    ok(cli(mtls, pki, "revoke", "a", "--no-reload"))
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    ok(cli(mtls, pki, "add-client", "--from-file", str(names)))
    assert (pki / "archive/a" / old_serial / "a.key").exists()
    assert verify_with_crl(pki, "certs/a.crt").endswith("OK") and verify_with_crl(pki, "certs/b.crt").endswith("OK")


def test_replace_with_nothing_active_just_issues(pki, mtls):
    ok(cli(mtls, pki, "add-client", "phone"))
    ok(cli(mtls, pki, "revoke", "phone", "--no-reload"))
    res = ok(cli(mtls, pki, "replace", "phone"))
    assert "Nothing to revoke" in res.out and verify_with_crl(pki, "certs/phone.crt").endswith("OK")


def test_replace_dry_run_names_the_moves_and_commands_and_changes_nothing(pki, mtls):
    ok(cli(mtls, pki, "add-client", "phone"))
    old_serial = serial_of(pki / "certs/phone.crt")
    before = tree(pki)
    res = ok(cli(mtls, pki, "replace", "phone", "--dry-run"))
    assert tree(pki) == before
    assert f"# move private/phone.key -> archive/phone/{old_serial}/phone.key" in res.err
    lines = res.out.splitlines()
    assert [line.split()[1] for line in lines] == ["genpkey", "req", "ca", "pkcs12", "pkcs12", "ca", "ca"]
    assert f"-revoke archive/phone/{old_serial}/phone.crt -crl_reason keyCompromise" in lines[5]
    assert "-gencrl" in lines[6]


# --------------------------------------------------------------------------- failures and kills


def _fail_on(monkeypatch, needle: str):
    real = Runner.run

    def run(self, cmd, cwd=None, check=True):
        if needle in cmd.argv:
            raise StateError(f"injected failure of {' '.join(cmd.argv[:3])}")
        return real(self, cmd, cwd=cwd, check=check)

    monkeypatch.setattr(Runner, "run", run)


@pytest.mark.parametrize("needle", ["genpkey", "req", "-extensions"])
def test_a_failure_before_the_new_certificate_leaves_everything_as_it_was(pki, mtls, monkeypatch, needle):
    """Protection: the moves are journaled with the issuance, and a moved path is not also recorded as created
    (a rollback would then remove the old file it had just put back)."""
    ok(cli(mtls, pki, "add-client", "phone"))
    old_serial = serial_of(pki / "certs/phone.crt")
    before = without_lock(tree(pki))
    _fail_on(monkeypatch, needle)
    res = cli(mtls, pki, "replace", "phone")
    assert res.code == 1 and "injected failure" in res.err
    assert without_lock(tree(pki)) == before  # the old files are back, byte for byte; no archive directory is left
    assert ca_status(pki, old_serial) == "Valid"


@pytest.mark.parametrize("needle", ["genpkey", "-extensions"])
def test_a_failed_add_client_over_a_revoked_name_puts_the_old_files_back(pki, mtls, monkeypatch, needle):
    ok(cli(mtls, pki, "add-client", "phone"))
    ok(cli(mtls, pki, "revoke", "phone", "--no-reload"))
    before = without_lock(tree(pki))
    _fail_on(monkeypatch, needle)
    assert cli(mtls, pki, "add-client", "phone").code == 1
    assert without_lock(tree(pki)) == before


def test_a_failure_after_the_new_certificate_says_what_is_done_and_what_to_run(pki, mtls, monkeypatch):
    old_serial = json.loads(ok(cli(mtls, pki, "add-client", "phone", "--json")).out)["serial"]
    _fail_on(monkeypatch, "-revoke")
    res = cli(mtls, pki, "replace", "phone")
    assert res.code == 1
    new_serial = serial_of(pki / "certs/phone.crt")
    assert f"the new certificate for phone is issued (serial {new_serial})" in res.err
    assert f"the old certificate (serial {old_serial}) is NOT revoked" in res.err
    assert f"hint: finish with: mtlsctl revoke --serial {old_serial} --reason keyCompromise" in res.err
    assert "Export password: " in res.out  # the new bundle's password is not lost with the error
    assert ca_status(pki, old_serial) == "Valid" and ca_status(pki, new_serial) == "Valid"
    monkeypatch.undo()
    ok(cli(mtls, pki, "revoke", "--serial", old_serial, "--reason", "keyCompromise", "--no-reload"))
    assert "certificate revoked" in verify_with_crl(pki, f"archive/phone/{old_serial}/phone.crt")


REPLACE_STEPS = 7  # genpkey, req, ca (sign), pkcs12 -export, pkcs12 (check), ca -revoke, ca -gencrl


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("step", range(1, REPLACE_STEPS + 1))
def test_replace_killed_at_each_step(fast_pki, injector, step, when):  # noqa: F811
    """SIGKILL before or after each openssl step: the next command rolls back the open step, the PKI is
    consistent, and running `replace` again ends with exactly one valid certificate for the name, every
    earlier one revoked and in the CRL."""
    pki = fast_pki
    set_profile(pki, nginx={"reload_command": ""})
    assert mtlsctl(pki, "add-client", "phone").returncode == 0
    old_serial = serial_of(pki / "certs/phone.crt")
    old = files_of(pki, "phone")
    before = without_lock(tree(pki))
    res = mtlsctl(pki, "replace", "phone", env=injector(step, when))
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr)
    follow = mtlsctl(pki, "list", "--json")
    assert follow.returncode == 0, follow.stderr
    valid = assert_consistent(pki)
    rows = [line.split("\t") for line in (pki / "index.txt").read_text().splitlines()]
    if step <= 3:  # killed before the new certificate was confirmed: as if nothing had run
        assert without_lock(tree(pki)) == before
        assert valid == ["phone"] and [r[0] for r in rows] == ["V"]
    else:  # issued: the new certificate at the guide's paths, the old files in the archive
        # the new key and certificate (a bundle killed half-way is removed: `export` or the next replace makes one)
        assert (pki / "private/phone.key").read_bytes() != old["private/phone.key"]
        assert serial_of(pki / "certs/phone.crt") != old_serial
        archived = pki / "archive/phone" / old_serial
        assert {p.name: p.read_bytes() for p in archived.iterdir() if p.name != "phone.p12"} == \
            {Path(k).name: v for k, v in old.items() if not k.endswith(".p12")}
        assert mode(archived) == 0o700
    again = mtlsctl(pki, "replace", "phone", "--json")
    assert again.returncode == 0, again.stderr
    assert_consistent(pki)
    rows = [line.split("\t") for line in (pki / "index.txt").read_text().splitlines()]
    final = json.loads(again.stdout)["serial"]
    assert [r[3] for r in rows if r[0] == "V"] == [final] and serial_of(pki / "certs/phone.crt") == final
    crl = openssl("crl", "-in", str(pki / "crl/ca.crl"), "-noout", "-text").stdout
    assert all(f"Serial Number: {r[3]}" in crl for r in rows if r[0] == "R") and f"Serial Number: {old_serial}" in crl


# --------------------------------------------------------------------------- export


def test_export_refuses_a_revoked_certificate_on_every_path(pki, mtls, tmp_path):
    """Protection: export decides by certs/NAME.crt's own row. A newer valid row of the name for another file
    (signed here by hand) does not make the revoked certs/NAME.crt exportable; --out and --dry-run refuse too."""
    ok(cli(mtls, pki, "add-client", "phone"))
    ok(cli(mtls, pki, "revoke", "phone", "--no-reload"))
    # a newer, valid certificate of CN=phone for another file, from the same CA
    openssl("req", "-new", "-config", "openssl.cnf", "-key", "private/phone.key", "-subj", "/CN=phone", "-out", str(tmp_path / "o.csr"),
            cwd=pki)
    openssl("ca", "-config", "openssl.cnf", "-batch", "-notext", "-extensions", "v3_client_ec", "-days", "30",
            "-in", str(tmp_path / "o.csr"), "-out", str(tmp_path / "other.crt"), cwd=pki)
    assert (pki / "index.txt").read_text().splitlines()[-1].startswith("V\t")
    before = tree(pki)
    for extra in ([], ["--force"], ["--out", str(tmp_path / "x.p12")], ["--dry-run"], ["--force", "--password-stdin"]):
        res = cli(mtls, pki, "export", "phone", *extra, stdin="a-good-password\n")
        assert res.code == 2 and "is revoked" in res.err and "add-client phone" in res.err, (extra, res.err)
    assert tree(pki) == before and not (tmp_path / "x.p12").exists()


def test_export_keeps_the_password_file_true(pki, mtls):
    """Protection: a bundle written to certs/NAME.p12 rewrites private/NAME.p12.password with a generated password
    and removes it when the user gave one; no stale secret file survives (issue 13: after renew, export --force
    left the old password in the file)."""
    ok(cli(mtls, pki, "add-client", "phone", "--days", "10"))
    ok(cli(mtls, pki, "renew", "--within", "30", "--no-reload"))
    secret = pki / "private/phone.p12.password"
    assert secret.exists() and mode(secret) == 0o600
    renewed = secret.read_text().strip()

    out = json.loads(ok(cli(mtls, pki, "export", "phone", "--force", "--json")).out)
    assert out["password"] != renewed and secret.read_text() == out["password"] + "\n" and mode(secret) == 0o600
    assert out["password_file"] == str(secret)
    openssl("pkcs12", "-in", "certs/phone.p12", "-noout", "-passin", f"file:{secret}", cwd=pki)  # the file opens the bundle

    # --out elsewhere: certs/NAME.p12 and its password file are left as they are
    ok(cli(mtls, pki, "export", "phone", "--out", str(pki.parent / "copy.p12"), "--json"))
    assert secret.read_text() == out["password"] + "\n"

    res = json.loads(ok(cli(mtls, pki, "export", "phone", "--force", "--password-stdin", "--json", stdin="my-own-password\n")).out)
    assert not os.path.lexists(secret) and res["removed_password_file"] == str(secret)
    openssl("pkcs12", "-in", "certs/phone.p12", "-noout", "-passin", "stdin", input="my-own-password\n", cwd=pki)


def test_add_client_over_a_retired_name_archives_its_password_file(pki, mtls):
    ok(cli(mtls, pki, "add-client", "phone", "--days", "10"))
    ok(cli(mtls, pki, "renew", "--within", "30", "--no-reload"))  # writes private/phone.p12.password
    serial = serial_of(pki / "certs/phone.crt")
    ok(cli(mtls, pki, "revoke", "phone", "--no-reload"))
    ok(cli(mtls, pki, "add-client", "phone"))
    assert not (pki / "private/phone.p12.password").exists()
    archived = pki / "archive/phone" / serial / "phone.p12.password"
    assert archived.exists() and mode(archived) == 0o600


# --------------------------------------------------------------------------- the archive is created, never followed


@pytest.mark.parametrize("where", ["archive", "archive/phone"])
@pytest.mark.parametrize("dangling", [False, True])
def test_a_symlink_planted_in_the_archive_path_is_refused(pki, mtls, tmp_path, where, dangling):
    """Protection: the first checks refuse a link at archive/ or archive/NAME/ by name (exit 2, nothing written)."""
    ok(cli(mtls, pki, "add-client", "phone"))
    ok(cli(mtls, pki, "revoke", "phone", "--no-reload"))
    elsewhere = tmp_path / "elsewhere"
    if not dangling:
        elsewhere.mkdir()
    (pki / where).parent.mkdir(exist_ok=True, mode=0o700)
    os.symlink(elsewhere, pki / where)
    before = ltree(pki)
    for command in (["add-client", "phone"], ["replace", "phone"], ["add-client", "phone", "--dry-run"],
                    ["replace", "phone", "--dry-run"]):
        res = cli(mtls, pki, *command)
        assert res.code == 2 and f"{pki / where} is a symbolic link" in res.err, res.err
    assert ltree(pki) == before
    assert not elsewhere.exists() or list(elsewhere.iterdir()) == []


def test_a_symlink_that_appears_after_the_first_checks_is_not_followed(pki, mtls, tmp_path, monkeypatch):
    """Protection: under the lock the archive path is opened O_NOFOLLOW from the PKI down (the first check is
    switched off here, as if the link appeared between the two); the run is rolled back."""
    ok(cli(mtls, pki, "add-client", "phone"))
    ok(cli(mtls, pki, "revoke", "phone", "--no-reload"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (pki / "archive").mkdir(mode=0o700)
    os.symlink(elsewhere, pki / "archive/phone")
    before = ltree(pki)
    monkeypatch.setattr(client, "_refuse_archive_links", lambda pki, name: None)
    res = cli(mtls, pki, "add-client", "phone")
    assert res.code == 2 and "is a symbolic link" in res.err, res.err
    assert list(elsewhere.iterdir()) == []
    assert ltree(pki) == before


def test_a_link_at_the_serial_directory_is_left_alone(pki, mtls, tmp_path):
    """archive/NAME/SERIAL/ is always a directory the run makes itself: a link there is never written through."""
    ok(cli(mtls, pki, "add-client", "phone"))
    serial = serial_of(pki / "certs/phone.crt")
    ok(cli(mtls, pki, "revoke", "phone", "--no-reload"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (pki / "archive/phone").mkdir(parents=True, mode=0o700)
    os.symlink(elsewhere, pki / "archive/phone" / serial)
    out = json.loads(ok(cli(mtls, pki, "add-client", "phone", "--json")).out)
    assert out["archived"] == str(pki / "archive/phone" / f"{serial}-2") and list(elsewhere.iterdir()) == []
    assert mode(pki / "archive/phone" / f"{serial}-2") == 0o700
