"""The audit log (<pki>/audit.log): one line per change, after it commits, never a secret, mode 600; `mtlsctl log`
shows only lines that pass every check; backup keeps it, restore gives it 600, doctor watches its mode and owner."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from mtlsctl import audit, files
from mtlsctl.pki import Pki

from .conftest import is_two_tier, openssl, run_cli, set_profile

pytestmark = pytest.mark.integration

PASSWORDS = {  # every secret this file hands to mtlsctl: none may reach the audit log
    "client": "Client-Pass-7f3a91",
    "export": "Export-Pass-c4d2e8",
    "replace": "Replace-Pass-5b6a0c",
    "ca": "CA-Passphrase-91d7e3aa",
    "backup": "Backup-Passphrase-2e8f41",
}


def cli(pki: Path, *args: str, stdin: str | None = None):
    return run_cli(["--pki-dir", str(pki), *args], stdin=stdin)


def lines(pki: Path) -> list[dict]:
    return [json.loads(line) for line in (pki / "audit.log").read_text().splitlines()]


def secret_file(tmp_path: Path, key: str) -> Path:
    path = tmp_path / f"{key}.txt"
    path.write_text(PASSWORDS[key] + "\n")
    return path


# --------------------------------------------------------------------------- record(): the rules it enforces


@pytest.mark.parametrize("details", [
    {"password": "x"}, {"passphrase": "x"}, {"export_password": "x"}, {"ca_passphrase": "x"}, {"key": "x"},
    {"private_key": "x"}, {"key_pem": "x"}, {"token": "x"}, {"secret": "x"}, {"passin": "x"},
])
def test_a_detail_named_like_a_secret_is_a_programming_error(fast_pki, details):
    before = (fast_pki / "audit.log").read_bytes()
    with pytest.raises(ValueError, match="secret"):
        audit.record(Pki(fast_pki), "export", names=["alice"], **details)
    assert (fast_pki / "audit.log").read_bytes() == before


@pytest.mark.parametrize("value", [["a"], {"a": 1}, 1.5, b"bytes", Path("/x"), object()])
def test_a_detail_that_is_not_a_plain_scalar_is_a_programming_error(fast_pki, value):
    with pytest.raises(ValueError, match="plain scalar"):
        audit.record(Pki(fast_pki), "export", names=["alice"], out=value)


def test_key_material_in_a_value_or_a_name_is_refused(fast_pki):
    pem = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49\n-----END PRIVATE KEY-----"
    with pytest.raises(ValueError, match="PEM"):
        audit.record(Pki(fast_pki), "export", names=["alice"], note=pem)
    with pytest.raises(ValueError, match="PEM"):
        audit.record(Pki(fast_pki), "export", names=[pem])
    with pytest.raises(ValueError):
        audit.record(Pki(fast_pki), "export", serials=["not-hex"])
    with pytest.raises(ValueError):
        audit.record(Pki(fast_pki), "Bad Command")
    with pytest.raises(ValueError):
        audit.record(Pki(fast_pki), "export", result="maybe")


def test_an_ok_line_before_the_commit_is_a_programming_error(fast_pki):
    """A line written while the change can still roll back would claim a success that did not happen."""
    pki = Pki(fast_pki)
    before = (fast_pki / "audit.log").read_bytes()
    with pytest.raises(ValueError, match="committed"), files.pki_lock(pki.lock_path), files.Transaction(pki.root) as tx:
        tx.created(fast_pki / "certs" / "new.crt")
        (fast_pki / "certs" / "new.crt").write_text("x")
        audit.record(pki, "add-client", names=["new"])
    assert (fast_pki / "audit.log").read_bytes() == before
    assert not (fast_pki / "certs" / "new.crt").exists()  # rolled back, and no line says otherwise
    with files.pki_lock(pki.lock_path), files.Transaction(pki.root) as tx:  # after the commit: fine
        tx.created(fast_pki / "certs" / "new.crt")
        (fast_pki / "certs" / "new.crt").write_text("x")
        tx.checkpoint()
        audit.record(pki, "add-client", names=["new"])
    assert lines(fast_pki)[-1]["names"] == ["new"]


def test_a_caller_without_the_lock_takes_it_briefly(fast_pki, monkeypatch, caplog):
    """deliver records without holding the lock for its minutes of serving: record() takes it for the write, and
    waits for a writer that holds it. A caller that holds it already writes at once (no deadlock)."""
    pki = Pki(fast_pki)
    fd = os.open(pki.lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another mtlsctl is writing
        monkeypatch.setattr(audit, "LOCK_TIMEOUT", 0.3)
        audit.record(pki, "deliver", names=["alice"], serials=["1000"], downloaded_by="192.0.2.7")
        assert lines(fast_pki)[-1]["command"] == "init"  # not written while another writer holds the lock
        assert "audit log" in caplog.text and "deliver" in caplog.text  # ... and said so
    finally:
        os.close(fd)
    audit.record(pki, "deliver", names=["alice"], serials=["1000"], downloaded_by="192.0.2.7")
    assert lines(fast_pki)[-1]["details"] == {"downloaded_by": "192.0.2.7"}
    assert not files.holds_lock(pki.root, exclusive=False)  # given back
    with files.pki_lock(pki.lock_path):  # reentrant-safe for a writer that holds it
        audit.record(pki, "crl", crl_number="1001")
    assert lines(fast_pki)[-1]["command"] == "crl"


def test_the_invoker_uid_login_and_a_claimed_sudo_user(fast_pki, monkeypatch):
    import pwd

    monkeypatch.setenv("SUDO_USER", "alice")
    audit.record(Pki(fast_pki), "crl", crl_number="1001")
    line = lines(fast_pki)[-1]
    assert line["uid"] == os.getuid() and line["user"] == pwd.getpwuid(os.getuid()).pw_name
    assert line["sudo_user_claimed"] == "alice"  # the environment proves nothing: marked as claimed
    assert line["time"].endswith("Z") and line["result"] == "ok" and line["pid"] == os.getpid()
    monkeypatch.delenv("SUDO_USER")
    audit.record(Pki(fast_pki), "crl", crl_number="1002")
    assert "sudo_user_claimed" not in lines(fast_pki)[-1]


def test_created_0600_exclusively_and_never_through_a_link(fast_pki, tmp_path, caplog):
    pki = Pki(fast_pki)
    (fast_pki / "audit.log").unlink()
    os.umask(0o022)
    audit.record(pki, "crl", crl_number="1001")
    assert stat.S_IMODE(os.lstat(fast_pki / "audit.log").st_mode) == 0o600
    (fast_pki / "audit.log").unlink()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, fast_pki / "audit.log")
    audit.record(pki, "crl", crl_number="1002")
    assert victim.read_text() == "precious\n"  # never written through the link
    assert "symbolic link" in caplog.text
    os.unlink(fast_pki / "audit.log")
    os.mkfifo(fast_pki / "audit.log")
    audit.record(pki, "crl", crl_number="1003")  # a FIFO neither blocks the command nor takes the line
    assert stat.S_ISFIFO(os.lstat(fast_pki / "audit.log").st_mode)


# --------------------------------------------------------------------------- every change, one line


def test_one_line_per_change_across_a_full_lifecycle(tiered_pki, tmp_path):
    pki = tiered_pki
    two = is_two_tier(pki)
    set_profile(pki, nginx={"reload_command": "", "test_command": ""})
    pw = {k: str(secret_file(tmp_path, k)) for k in PASSWORDS}
    names_file = tmp_path / "names.txt"
    names_file.write_text("tablet\nlaptop\n")
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
            str(tmp_path / "dev.key"), "-out", str(tmp_path / "dev.csr"), "-subj", "/CN=device")
    steps = [
        (["add-client", "alice", "--password-file", pw["client"]], "add-client"),
        (["add-client", "--from-file", str(names_file)], "add-client"),
        (["add-server", "web.example", "--san", "DNS:web.example"], "add-server"),
        (["sign-csr", str(tmp_path / "dev.csr"), "--name", "device"], "sign-csr"),
        (["export", "alice", "--force", "--password-file", pw["export"]], "export"),
        (["replace", "tablet", "--no-reload", "--password-file", pw["replace"]], "replace"),
        (["revoke", "laptop", "--no-reload"], "revoke"),
        (["crl", "--no-reload"], "crl"),
        (["renew", "--within", "2000", "--no-reload"], "renew"),
    ]
    if two:
        steps += [(["crl", "--root", "--no-reload"], "crl"),
                  (["root", "export-offline", "--out", str(tmp_path / "root.key")], "root-export-offline")]
    steps += [(["ca-passphrase", "change", "--new-passphrase-file", pw["ca"]], "ca-passphrase-change")]
    assert [line["command"] for line in lines(pki)] == ["init"]
    for args, command in steps:
        res = cli(pki, *args)
        assert res.code == 0, (args, res.err)
        assert lines(pki)[-1]["command"] == command, args
    got = lines(pki)
    assert [line["command"] for line in got] == ["init"] + [c for _, c in steps]  # exactly one line per change
    assert {line["command"] for line in got} <= set(audit.KNOWN_COMMANDS)  # what `log --command` accepts
    assert all(line["result"] == "ok" for line in got)
    by_command = {}
    for line in got:
        by_command.setdefault(line["command"], []).append(line)
    # names and serials match what list --json says
    listed = json.loads(cli(pki, "list", "--json").out)
    serial_of = {(e["name"], e["serial"]) for e in listed}
    for line in got:
        for name, serial in zip(line["names"], line["serials"], strict=False):
            assert (name, serial) in serial_of, line
    batch = by_command["add-client"][1]
    assert batch["names"] == ["tablet", "laptop"] and batch["details"]["batch"] == 2
    revoked = by_command["revoke"][0]
    assert revoked["names"] == ["laptop"] and revoked["serials"] == [e["serial"] for e in listed
                                                                     if e["name"] == "laptop" and e["status"] == "revoked"]
    renew = by_command["renew"][0]
    assert set(renew["names"]) == {"alice", "web.example", "device", "tablet"}
    # a backup, restored elsewhere: the log travels with it (0600) and says where it came from
    out = tmp_path / "pki.tgz.enc"
    assert cli(pki, "backup", "--out", str(out), "--passphrase-file", pw["backup"]).code == 0
    restored = tmp_path / "restored"
    res = run_cli(["restore", str(out), "--pki-dir", str(restored), "--passphrase-file", pw["backup"]])
    assert res.code == 0, res.err
    assert stat.S_IMODE(os.lstat(restored / "audit.log").st_mode) == 0o600
    again = lines(restored)
    assert again[:-1] == got and again[-1]["command"] == "restore" and again[-1]["details"]["encrypted"] is True
    assert not (restored / ".mtlsctl.lock").exists()
    # never a secret: no password, passphrase or key material, and no generated bundle password either
    text = (pki / "audit.log").read_text() + (restored / "audit.log").read_text()
    generated = [p.read_text().strip() for p in (pki / "private").glob("*.p12.password")]
    assert generated
    for secret in [*PASSWORDS.values(), *generated]:
        assert secret not in text
    assert "BEGIN" not in text and "PRIVATE" not in text
    assert stat.S_IMODE(os.lstat(pki / "audit.log").st_mode) == 0o600
    # mtlsctl log shows all of it, and agrees with the file
    res = cli(pki, "log", "--json")
    assert res.code == 0 and not res.err
    shown = [json.loads(line) for line in res.out.splitlines()]
    assert [s["command"] for s in shown] == [line["command"] for line in got]


def test_ocsp_setup_and_init_are_recorded(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("ca: {subject: {CN: T}, key: {type: ec, curve: P-256}}\nclients: {key: {type: ec, curve: P-256}}\n"
                       "ocsp: {url: 'http://127.0.0.1:18999', port: 18999}\n")
    pki = tmp_path / "pki"
    assert run_cli(["--pki-dir", str(pki), "--profile", str(profile), "init"]).code == 0
    got = lines(pki)
    assert [line["command"] for line in got] == ["init", "ocsp-setup"]
    assert got[1]["names"] == ["ocsp-responder"] and got[1]["details"]["kind"] == "ocsp"


def test_dry_runs_and_refused_input_write_no_line(fast_pki, tmp_path):
    set_profile(fast_pki, nginx={"reload_command": "", "test_command": ""})
    assert cli(fast_pki, "add-client", "alice").code == 0
    assert cli(fast_pki, "revoke", "alice", "--no-reload").code == 0
    assert cli(fast_pki, "add-client", "bob").code == 0
    before = (fast_pki / "audit.log").read_bytes()
    for args in (["add-client", "carol", "--dry-run"], ["revoke", "bob", "--dry-run"], ["crl", "--dry-run"],
                 ["renew", "--within", "2000", "--dry-run"], ["export", "bob", "--dry-run"], ["replace", "bob", "--dry-run"]):
        res = cli(fast_pki, *args)
        assert res.code == 0, (args, res.err)
    for args in (["add-client", "bad name!"], ["add-client", "bob"], ["revoke", "nobody"], ["revoke", "--serial", "zz"],
                 ["export", "alice"], ["export", "bob", "--p12", "nonsense"], ["renew", "--within", "-1"],
                 ["sign-csr", str(tmp_path / "missing.csr"), "--name", "x"], ["crl", "--root"]):
        res = cli(fast_pki, *args)
        assert res.code == 2, (args, res.code, res.err)
    assert (fast_pki / "audit.log").read_bytes() == before


def test_a_failed_change_is_recorded_failed_after_its_rollback(fast_pki, monkeypatch):
    """The CRL step of a revocation fails: the whole revocation rolls back, and the one line says failed."""
    from mtlsctl import crl
    from mtlsctl.errors import StateError

    set_profile(fast_pki, nginx={"reload_command": "", "test_command": ""})
    assert cli(fast_pki, "add-client", "alice").code == 0
    index = (fast_pki / "index.txt").read_text()

    def refuse(*args, **kwargs):
        raise StateError("the CRL openssl wrote is refused (test)")

    monkeypatch.setattr(crl, "check_new_crl", refuse)
    res = cli(fast_pki, "revoke", "alice", "--no-reload")
    assert res.code == 1
    assert (fast_pki / "index.txt").read_text() == index  # rolled back: alice is valid
    last = lines(fast_pki)[-1]
    assert (last["command"], last["result"], last["names"]) == ("revoke", "failed", ["alice"])
    assert "refused (test)" in last["error"]
    assert not [line for line in lines(fast_pki) if line["command"] == "revoke" and line["result"] == "ok"]


def test_a_bundle_that_failed_after_issuance_names_the_kept_serial(fast_pki, monkeypatch):
    from mtlsctl import client
    from mtlsctl.errors import StateError

    def broken(*args, **kwargs):
        raise StateError("pkcs12 broke (test)")

    monkeypatch.setattr(client, "write_p12", broken)
    res = cli(fast_pki, "add-client", "alice")
    assert res.code == 1
    last = lines(fast_pki)[-1]
    serial = json.loads(cli(fast_pki, "list", "--json").out)[-1]["serial"]
    assert (last["result"], last["serials"], last["details"]["issued"]) == ("failed", [serial], True)
    assert sum(line["command"] == "add-client" for line in lines(fast_pki)) == 1  # one line, not two


# --------------------------------------------------------------------------- mtlsctl log: nothing in the file is trusted


GOOD = {"v": 1, "time": "2031-02-03T04:05:06Z", "uid": 0, "user": "root", "pid": 42, "command": "revoke",
        "names": ["alice"], "serials": ["1000"], "result": "ok", "error": None, "details": {"reason": "keyCompromise"}}


def hostile_lines() -> list[bytes]:
    def j(**changes):
        return json.dumps({**GOOD, **changes}).encode()

    nested = b"[" * 100000 + b"]" * 100000
    return [
        b'{"v": 1, "time": "2031-02-03T04:05:06Z", "uid": 0',             # truncated
        b"[1, 2, 3]",                                                       # not an object
        j(v=2),                                                             # another version
        j(time="2031-02-03 04:05:06"),                                      # not RFC 3339 UTC
        j(time="2031-02-30T04:05:06Z"),                                     # not a date
        j(uid="0"),                                                         # wrong type
        j(uid=True),
        j(command="revoke\x1b[2J\x1b[1;1H"),                               # terminal escapes
        j(names=["alice\x1b]0;pwned\x07"]),
        j(names=["ali\u202ece"]),                                           # bidi override: reads as another name
        j(names=["ali\u200bce"]), j(names=["ali\ufeffce"]), j(names=["ali\u2060ce"]),  # zero-width: looks like alice
        j(names=["ali\u00adce"]), j(names=["ali\u061cce"]), j(names=["ali\U000e0041ce"]),  # soft hyphen, marks, tags
        j(names="alice"),                                                   # a string, not a list
        j(serials=["1000; rm -rf /"]),
        j(result="success"),
        j(error="line one\nline two"),
        j(details={"reason": ["a"]}),
        j(details={"Reason With Spaces": "x"}),
        j(details={"nan": float("nan")}),
        j(extra="field"),
        json.dumps({k: v for k, v in GOOD.items() if k != "result"}).encode(),
        b"\xff\xfe not utf-8",
        nested,
        b"x" * (2 << 20),                                                   # longer than a line may be
    ]


def test_hostile_lines_are_reported_and_skipped_never_shown(fast_pki):
    hostile = hostile_lines()
    good = json.dumps({**GOOD, "names": ["bob"], "serials": ["1001"]}).encode()
    (fast_pki / "audit.log").write_bytes(b"\n".join([*hostile, good]) + b"\n")
    res = cli(fast_pki, "log")
    assert res.code == 0, res.err
    assert "\x1b" not in res.out and "\u202e" not in res.out and "pwned" not in res.out and "rm -rf" not in res.out
    assert "bob" in res.out and "alice" not in res.out  # only the well-formed line
    assert len([line for line in res.out.splitlines() if line.strip()]) == 2  # header + the one line
    warned = [line for line in res.err.splitlines() if "skipped" in line]
    assert len(warned) == len(hostile)
    for number in range(1, len(hostile) + 1):
        assert any(f"line {number}:" in w for w in warned), number
    res = cli(fast_pki, "log", "--json")
    assert res.code == 0
    shown = [json.loads(line) for line in res.out.splitlines()]
    assert [s["names"] for s in shown] == [["bob"]] and shown[0]["line"] == len(hostile) + 1
    res = cli(fast_pki, "log", "--name", "alice")
    assert res.code == 0 and "alice" not in res.out


def test_a_symlinked_audit_log_is_refused_by_log(fast_pki, tmp_path):
    target = tmp_path / "elsewhere.log"
    target.write_text(json.dumps(GOOD) + "\n")
    (fast_pki / "audit.log").unlink()
    os.symlink(target, fast_pki / "audit.log")
    res = cli(fast_pki, "log")
    assert res.code == 2 and "symbolic link" in res.err


def test_log_filters(fast_pki):
    set_profile(fast_pki, nginx={"reload_command": "", "test_command": ""})
    assert cli(fast_pki, "add-client", "alice").code == 0
    assert cli(fast_pki, "add-client", "bob").code == 0
    assert cli(fast_pki, "revoke", "bob", "--no-reload").code == 0
    old = {**GOOD, "time": "2001-01-01T00:00:00Z", "names": ["bob"], "serials": ["10"], "command": "export", "details": {}}
    with open(fast_pki / "audit.log", "r+") as fh:
        body = fh.read()
        fh.seek(0)
        fh.write(json.dumps(old) + "\n" + body)

    def shown(*args):
        res = cli(fast_pki, "log", "--json", *args)
        assert res.code == 0, res.err
        return [(e["command"], e["names"]) for e in map(json.loads, res.out.splitlines())]

    assert shown("--name", "bob") == [("export", ["bob"]), ("add-client", ["bob"]), ("revoke", ["bob"])]
    assert shown("--command", "revoke") == [("revoke", ["bob"])]
    assert ("export", ["bob"]) not in shown("--since", "2020-01-01")
    assert shown("--since", "2001-01-01T00:00:00Z", "--command", "export") == [("export", ["bob"])]
    assert shown("--since", "2001-01-01T01:00+02:00", "--command", "export") == [("export", ["bob"])]
    text = cli(fast_pki, "log", "--name", "bob").out
    assert "revoke" in text and "bob" in text and "alice" not in text
    for bad in (["--since", "yesterday"], ["--since", "2020-02-30"], ["--name", "../x"], ["--command", "Rm -rf"]):
        res = cli(fast_pki, "log", *bad)
        assert res.code == 2 and "Traceback" not in res.err, bad


# --------------------------------------------------------------------------- backup, restore, doctor


def test_backup_keeps_it_and_restore_gives_it_600(fast_pki, tmp_path):
    os.chmod(fast_pki / "audit.log", 0o644)
    out = tmp_path / "b.tgz"
    res = cli(fast_pki, "backup", "--out", str(out), "--json")
    assert res.code == 0, res.err
    import tarfile

    with tarfile.open(out) as tar:
        member = tar.getmember("pki/audit.log")
        assert member.mode & 0o777 == 0o600  # archived as restore sets it
    restored = tmp_path / "r"
    assert run_cli(["restore", str(out), "--pki-dir", str(restored)]).code == 0
    assert stat.S_IMODE(os.lstat(restored / "audit.log").st_mode) == 0o600
    assert [line["command"] for line in lines(restored)] == ["init", "restore"]


def test_doctor_reports_a_readable_writable_or_foreign_audit_log(fast_pki):
    def audit_findings():
        res = cli(fast_pki, "doctor", "--json")
        return [f for f in json.loads(res.out)["findings"] if f["check"] == "audit"], res.code

    found, _ = audit_findings()
    assert [f["level"] for f in found] == ["ok"]
    os.chmod(fast_pki / "audit.log", 0o640)
    found, code = audit_findings()
    assert code == 1 and [f["level"] for f in found] == ["warn"] and "chmod 600" in found[0]["fix"]
    os.chmod(fast_pki / "audit.log", 0o622)
    found, code = audit_findings()
    assert code == 1 and [f["level"] for f in found] == ["error"] and "forge" in found[0]["message"]
    os.chmod(fast_pki / "audit.log", 0o600)
    if os.geteuid() == 0:
        os.chown(fast_pki / "audit.log", 4242, -1)
        found, code = audit_findings()
        assert code == 1 and any("uid 4242" in f["message"] for f in found)
        os.chown(fast_pki / "audit.log", 0, -1)
    with open(fast_pki / "audit.log", "ab") as fh:
        fh.write(b"{forged\n")
    found, code = audit_findings()
    assert code == 1 and "1 line(s)" in found[0]["message"]


def test_the_log_is_never_the_place_for_a_password_given_on_stdin(fast_pki):
    """--password-stdin: the password reaches openssl, never the log (and never argv: tests/test_secrets.py)."""
    res = cli(fast_pki, "add-client", "alice", "--password-stdin", stdin=PASSWORDS["client"] + "\n")
    assert res.code == 0, res.err
    assert PASSWORDS["client"] not in (fast_pki / "audit.log").read_text()
    out = subprocess.run(["openssl", "pkcs12", "-in", str(fast_pki / "certs/alice.p12"), "-nokeys", "-passin", "stdin"],
                         input=PASSWORDS["client"] + "\n", capture_output=True, text=True)
    assert out.returncode == 0  # the bundle really has that password: it was used, just not logged


def test_input_refused_under_the_lock_writes_no_line(fast_pki, monkeypatch):
    """A check repeated under the lock (another run changed the PKI meanwhile) that refuses the input: exit 2, and
    like every refusal, no line (nothing was attempted)."""
    from mtlsctl import lifecycle
    from mtlsctl.errors import InputError

    set_profile(fast_pki, nginx={"reload_command": "", "test_command": ""})
    assert cli(fast_pki, "add-client", "alice").code == 0
    before = (fast_pki / "audit.log").read_bytes()
    real, calls = lifecycle.select_for_revoke, []

    def gone_meanwhile(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise InputError("no certificate named 'alice' in index.txt (test)")
        return real(*args, **kwargs)

    monkeypatch.setattr(lifecycle, "select_for_revoke", gone_meanwhile)
    res = cli(fast_pki, "revoke", "alice", "--no-reload")
    assert res.code == 2 and len(calls) == 2, res.err
    assert (fast_pki / "audit.log").read_bytes() == before


def test_hidden_characters_in_what_is_recorded_are_escaped_not_cut_and_log_shows_the_line(fast_pki, monkeypatch, tmp_path):
    """A claimed SUDO_USER or an --out path may hold anything: the line is still written, with every hidden
    character as a visible escape (never cut at a newline, which would record another path), and `mtlsctl log`
    shows it (a review found such lines written and then hidden by the reader)."""
    monkeypatch.setenv("SUDO_USER", "mallory\x1b[2K\x1b[1A\u200b")
    odd = tmp_path / "eve\nreal\tx.p12"
    res = cli(fast_pki, "add-client", "eve", "--password-stdin", stdin=PASSWORDS["client"] + "\n")
    assert res.code == 0, res.err
    res = cli(fast_pki, "export", "eve", "--out", str(odd), "--password-file", str(secret_file(tmp_path, "export")))
    assert res.code == 0, res.err
    raw = (fast_pki / "audit.log").read_text()
    assert "\x1b" not in raw and "\u200b" not in raw  # as characters: ensure_ascii JSON escapes would decode to them
    recorded = lines(fast_pki)
    assert recorded[-1]["sudo_user_claimed"] == "mallory\\x1b[2K\\x1b[1A\\u200b"
    assert recorded[-1]["details"]["out"] == str(odd).replace("\n", "\\x0a").replace("\t", "\\x09")
    shown = cli(fast_pki, "log", "--name", "eve")
    assert shown.code == 0 and "skipped" not in shown.err, shown.err
    assert "\x1b" not in shown.out and "\u200b" not in shown.out
    assert len([line for line in shown.out.splitlines() if " eve " in line]) == 2  # add-client and export, both shown
    assert "eve\\x0areal\\x09x.p12" in shown.out


def test_log_refuses_an_unknown_command_and_a_pki_that_is_not_one(fast_pki, tmp_path):
    res = cli(fast_pki, "log", "--command", "bogus")
    assert res.code == 2 and "is not a command the audit log records" in res.err and "revoke" in res.err
    res = cli(tmp_path / "nope", "log")  # a mistyped --pki-dir: not "no audit log yet"
    assert res.code == 2 and "no CA in" in res.err
    assert cli(fast_pki, "log", "--command", "add-server").code == 0
