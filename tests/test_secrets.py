"""Secrets: a full lifecycle under `strace -f -e trace=execve` shows no password or passphrase in any argv
or environment; no private file is readable by group or others afterwards; no password is printed unless asked."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import openssl

pytestmark = [pytest.mark.integration, pytest.mark.needs("strace")]

REPO = Path(__file__).resolve().parent.parent


def test_no_secret_on_any_command_line_in_a_full_lifecycle(tmp_path):
    pki = tmp_path / "pki"
    trace = tmp_path / "trace.log"
    secrets = {
        "ca": "Ca-Passphrase-7f3e9",
        "p12": "Export-Password-4b1d",
        "file": "File-Password-93ac2",
        "backup": "Backup-Passphrase-c0de",
        "newca": "New-Ca-Passphrase-5e5e",
    }
    files = {}
    for k, v in secrets.items():
        files[k] = tmp_path / f"{k}.txt"
        files[k].write_text(v + "\n")
    prof = tmp_path / "p.yaml"
    prof.write_text("ca: {subject: {CN: Secret CA}, key: {type: ec, curve: P-256, encrypt: true}, days: 800}\n"
                    "clients: {key: {type: ec, curve: P-256}}\nnginx: {reload_command: ''}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ca = ["--ca-passphrase-file", str(files["ca"])]
    outputs: list[str] = []

    def run(*args: str, stdin: str = "", fds: dict | None = None) -> subprocess.CompletedProcess:
        argv = ["strace", "-f", "-v", "-s", "4096", "-e", "trace=execve", "-o", f"{trace}.{len(outputs)}",
                sys.executable, "-m", "mtlsctl", "--pki-dir", str(pki), *args]
        res = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env)
        assert res.returncode == 0, (args, res.stderr)
        outputs.append(res.stdout + res.stderr)
        return res

    run("--profile", str(prof), *ca, "init")
    run(*ca, "add-client", "phone", "--password-stdin", stdin=secrets["p12"] + "\n")
    gen = json.loads(run(*ca, "add-client", "laptop", "--json").stdout)["password"]
    run("export", "phone", "--force", "--password-file", str(files["file"]))
    run(*ca, "add-client", "soon", "--days", "3")
    renew = json.loads(run(*ca, "renew", "--json").stdout)
    renewed_pw = Path(renew["renewed"][0]["password_file"]).read_text().strip()
    run(*ca, "revoke", "laptop")
    run(*ca, "crl")
    run("--ca-passphrase-file", str(files["ca"]), "ca-passphrase", "change", "--new-passphrase-file", str(files["newca"]))
    run("backup", "--out", str(tmp_path / "b.enc"), "--passphrase-file", str(files["backup"]))
    run("restore", str(tmp_path / "b.enc"), "--pki-dir", str(tmp_path / "restored"), "--passphrase-file", str(files["backup"]))

    logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("trace.log.*"))
    execs = [line for line in logs.splitlines() if "execve(" in line]
    assert sum('"openssl"' in line or "/openssl\"" in line for line in execs) >= 20  # the trace really saw openssl run
    for value in [*secrets.values(), gen, renewed_pw]:
        assert value not in logs, f"a secret reached an argv or environment: {value}"
    # passwords are printed only where asked: the generated one (no password option), never given ones
    printed = "\n".join(outputs)
    for key in ("ca", "p12", "file", "backup", "newca"):
        assert secrets[key] not in printed
    assert renewed_pw not in printed  # renew writes it to a 0600 file unless --show-passwords
    # the passphrase reached openssl on a descriptor
    assert any(re.search(r'"-passin", "fd:\d+"', line) for line in execs)
    # nothing private is readable by group or others
    for root in (pki, tmp_path / "restored"):
        for path in [*root.joinpath("private").rglob("*"), *root.glob("certs/*.p12")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode & 0o077 == 0, f"{path} is mode {mode:o}"
    # and the encrypted CA key still works with the new passphrase only
    assert openssl("pkey", "-in", str(pki / "private/ca.key"), "-noout", "-passin", f"file:{files['newca']}",
                   check=False).returncode == 0
    assert openssl("pkey", "-in", str(pki / "private/ca.key"), "-noout", "-passin", f"file:{files['ca']}",
                   check=False).returncode != 0


def test_encrypted_ca_refuses_without_the_right_passphrase_before_writing(tmp_path, mtls):
    from .conftest import tree

    prof = tmp_path / "p.yaml"
    prof.write_text("ca: {subject: {CN: E}, key: {type: ec, encrypt: true}, days: 800}\nclients: {key: {type: ec}}\n")
    right, wrong = tmp_path / "right", tmp_path / "wrong"
    right.write_text("the right passphrase\n")
    wrong.write_text("not the passphrase\n")
    pki = tmp_path / "pki"
    res = mtls(["--pki-dir", str(pki), "--profile", str(prof), "init"])
    assert res.code == 2 and "no terminal" in res.err and not pki.exists()
    short = tmp_path / "short"
    short.write_text("short\n")
    res = mtls(["--pki-dir", str(pki), "--profile", str(prof), "--ca-passphrase-file", str(short), "init"])
    assert res.code == 2 and "shorter than 8" in res.err and not pki.exists()
    assert mtls(["--pki-dir", str(pki), "--profile", str(prof), "--ca-passphrase-file", str(right), "init"]).code == 0
    assert "ENCRYPTED" in (pki / "private/ca.key").read_text()
    before = tree(pki)
    for extra in ([], ["--ca-passphrase-file", str(wrong)]):
        res = mtls(["--pki-dir", str(pki), *extra, "add-client", "x"])
        assert res.code == 2 and "Traceback" not in res.err
        assert tree(pki) == before
    res = mtls(["--pki-dir", str(pki), "--ca-passphrase-file", str(right), "add-client", "x"])
    assert res.code == 0, res.err
