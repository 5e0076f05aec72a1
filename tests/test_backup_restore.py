"""Backup and restore you can trust (issue 12), in single- and two-tier PKIs.

- restore never restores a journal or the lock, clamps modes and refuses links, devices, FIFOs, absolute and
  `..` names and members outside the PKI layout — crafted archives built here with Python's tarfile; a
  sentinel file next to the target proves nothing outside it is touched;
- the encrypted backup writes no plaintext byte to the disk (every write and every file creation of mtlsctl
  and its openssl child, traced with strace);
- backups are restorable by construction: a symlink or FIFO in the PKI is refused, the tar holds no hard
  links, the finished archive is read back before success, and --out is never replaced;
- the restored two-tier PKI uses its NEW directory for every openssl section (`crl --root` advances the new
  root crlnumber, not the old one), and doctor checks every `dir` of openssl.cnf;
- path errors are one line with the path, never "internal error".
"""

from __future__ import annotations

import codecs
import errno
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from mtlsctl import backup as backup_mod

from .conftest import is_two_tier, openssl, run_cli, set_profile, tree

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
PASSPHRASE = "Backup-Test-Passphrase-9c1f"


def cli(*args: str):
    return run_cli(list(args))


def _one_error(res, code: int, *needles: str) -> None:
    assert res.code == code, (res.code, res.out, res.err)
    assert "Traceback" not in res.err and "internal error" not in res.err, res.err
    first = res.err.splitlines()[0]
    assert first.startswith("error: ") and all(n in first for n in needles), res.err


def nginx_verify(pki: Path, crt: str) -> str:
    """`openssl verify` as nginx checks a client: the chain it trusts and every CRL."""
    if is_two_tier(pki):
        args = ["verify", "-purpose", "sslclient", "-crl_check_all", "-CAfile", "ca/root.crt", "-untrusted", "ca/ca.crt",
                "-CRLfile", "crl/chain.crl", crt]
    else:
        args = ["verify", "-purpose", "sslclient", "-crl_check", "-CAfile", "ca/ca.crt", "-CRLfile", "crl/ca.crl", crt]
    res = openssl(*args, cwd=pki, check=False)
    return (res.stdout + res.stderr).strip()


def cnf_dirs(cnf: Path) -> list[tuple[str, str]]:
    """(section, value) of each `dir =` line of an openssl.cnf."""
    found, section = [], ""
    for line in cnf.read_text().splitlines():
        head = re.match(r"\s*\[\s*(\S+)\s*\]", line)
        section = head.group(1) if head else section
        m = re.match(r"\s*dir\s*=\s*(\S*)", line)
        if m:
            found.append((section, m.group(1)))
    return found


@pytest.fixture
def passfile(tmp_path: Path) -> Path:
    path = tmp_path / "backup-pass"
    path.write_text(PASSPHRASE + "\n")
    return path


@pytest.fixture
def plain_backup(tiered_pki: Path, tmp_path: Path) -> Path:
    """An unencrypted backup of the tiered PKI with a client in it: the base of every crafted archive."""
    assert cli("--pki-dir", str(tiered_pki), "add-client", "phone").code == 0
    out = tmp_path / "base.tgz"
    res = cli("--pki-dir", str(tiered_pki), "backup", "--out", str(out))
    assert res.code == 0, res.err
    return out


def _members(archive: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(archive) as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]


def craft(base: Path, dest: Path, extra=(), change=None) -> Path:
    """A copy of `base` with members changed by `change(info)` and `extra` (TarInfo, data) members added."""
    with tarfile.open(dest, "w:gz") as tar:
        for info, data in _members(base):
            if change is not None:
                change(info)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
        for info, data in extra:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return dest


def member(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info


# ------------------------------------------------------------------------------------------------ restore


def test_restore_never_restores_a_journal_or_the_lock(tiered_pki, plain_backup, tmp_path):
    """A journal in the archive names a file outside the PKI and a setuid file: with it restored, the next
    command (even `list`) would 'roll back' by deleting the one and creating the other."""
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("keep me")
    planted = tmp_path / "planted-setuid"
    payload = b"#!/bin/sh\nid\n"
    record = {"pid": 1, "created": [str(sentinel), str(tmp_path)],
              "snapshots": {str(planted): {"file": "snap-0", "offset": 0, "length": len(payload), "mode": 0o4755}}}
    extra = [
        (member("pki/.mtlsctl.journal", tarfile.DIRTYPE, 0o700), None),
        (member("pki/.mtlsctl.journal/journal.json", mode=0o600), json.dumps(record).encode()),
        (member("pki/.mtlsctl.journal/snap-0", mode=0o600), payload),
        (member("pki/.mtlsctl.lock", mode=0o600), b""),
    ]
    evil = craft(plain_backup, tmp_path / "journal.tgz", extra)
    target = tmp_path / "restored"
    res = cli("restore", str(evil), "--pki-dir", str(target), "--json")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    skipped = {s["member"]: s["reason"] for s in data["skipped"]}
    assert {"pki/.mtlsctl.journal", "pki/.mtlsctl.journal/journal.json", "pki/.mtlsctl.journal/snap-0",
            "pki/.mtlsctl.lock"} <= set(skipped), skipped
    assert all("never restored" in why for why in skipped.values())
    assert not (target / ".mtlsctl.journal").exists() and not (target / ".mtlsctl.lock").exists()
    # the next commands find no journal to "roll back": nothing outside the PKI changes
    assert cli("--pki-dir", str(target), "list").code == 0
    assert cli("--pki-dir", str(target), "add-client", "after-restore").code == 0
    assert sentinel.read_text() == "keep me" and not planted.exists()
    # the human output says so too
    res = cli("restore", str(evil), "--pki-dir", str(tmp_path / "again"))
    assert res.code == 0 and "skipped  pki/.mtlsctl.journal/journal.json (mtlsctl's lock or journal: never restored)" in res.out


def test_restore_clamps_modes_and_reports_each(tiered_pki, plain_backup, tmp_path):
    hostile = {
        "pki/certs/phone.crt": 0o4755,     # setuid
        "pki/serial": 0o6777,              # setuid + setgid + world-writable
        "pki/index.txt": 0o666,            # group/other-writable
        "pki/private/ca.key": 0o644,       # a readable CA key
        "pki/private/phone.key": 0o640,
        "pki/certs/phone.p12": 0o604,
        "pki/private": 0o1777,             # sticky, world-writable
        "pki/ca": 0o2777,                  # setgid, world-writable
    }
    if is_two_tier(tiered_pki):
        hostile["pki/private/root.key"] = 0o666

    def change(info: tarfile.TarInfo) -> None:
        if info.name in hostile:
            info.mode = hostile[info.name]

    evil = craft(plain_backup, tmp_path / "modes.tgz", change=change)
    target = tmp_path / "restored"
    res = cli("restore", str(evil), "--pki-dir", str(target), "--json")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    clamped = {c["path"].rstrip("/"): (c["archived"], c["restored"]) for c in data["clamped"]}
    expected = {
        "certs/phone.crt": 0o644, "serial": 0o644, "index.txt": 0o644, "private/ca.key": 0o400,
        "private/phone.key": 0o600, "certs/phone.p12": 0o600, "private": 0o700, "ca": 0o755,
    }
    if is_two_tier(tiered_pki):
        expected["private/root.key"] = 0o400
    for rel, mode in expected.items():
        assert stat.S_IMODE((target / rel).stat().st_mode) == mode, rel
        assert clamped[rel] == (f"{hostile['pki/' + rel]:o}", f"{mode:o}"), (rel, clamped.get(rel))
    for path in [target, *target.rglob("*")]:  # nothing special, nothing writable by others, anywhere
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert not mode & 0o7000 and not mode & 0o022, (path, oct(mode))
    assert all(f["level"] == "ok" for f in data["doctor"]), data["doctor"]
    res = cli("restore", str(evil), "--pki-dir", str(tmp_path / "text"))
    assert res.code == 0 and "mode     private/ca.key: 644 in the archive, restored as 400" in res.out


HOSTILE = {
    "symlink": lambda t: member("pki/certs/evil.crt", tarfile.SYMTYPE, linkname="/etc/passwd"),
    "symlink_to_sentinel": lambda t: member("pki/newcerts/FF.pem", tarfile.SYMTYPE, linkname=str(t / "sentinel")),
    "hardlink_outside": lambda t: member("pki/certs/hl.crt", tarfile.LNKTYPE, linkname=str(t / "sentinel")),
    "hardlink_inside": lambda t: member("pki/certs/key-copy.crt", tarfile.LNKTYPE, linkname="pki/private/ca.key"),
    "char_device": lambda t: member("pki/certs/null", tarfile.CHRTYPE),
    "block_device": lambda t: member("pki/crl/disk", tarfile.BLKTYPE),
    "fifo": lambda t: member("pki/crl/ca.fifo", tarfile.FIFOTYPE),
    "dotdot": lambda t: member("pki/../sentinel"),
    "dotdot_deep": lambda t: member("pki/certs/../../escape"),
    "absolute": lambda t: member(str(t / "sentinel")),
    "outside_top": lambda t: member("elsewhere/file"),
    "outside_layout_dir": lambda t: member("pki/nginx/site.conf"),
    "nested_in_certs": lambda t: member("pki/certs/sub/x.crt"),
    "unknown_top_file": lambda t: member("pki/run-me.sh", mode=0o755),
    "dir_for_a_file": lambda t: member("pki/serial.new", tarfile.DIRTYPE, 0o755),
    "duplicate": lambda t: member("pki/private/ca.key", mode=0o400),
    "control_chars": lambda t: member("pki/certs/\x1b[2Jx.crt"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_restore_refuses_hostile_members_and_writes_nothing(tiered_pki, plain_backup, tmp_path, case):
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("keep me")
    info = HOSTILE[case](tmp_path)
    data = b"owned\n" if info.isreg() else None
    evil = craft(plain_backup, tmp_path / "evil.tgz", [(info, data)])
    before = tree(tmp_path)  # the source PKI, the archives, the sentinel: everything beside the target
    target = tmp_path / "restored"
    res = cli("restore", str(evil), "--pki-dir", str(target))
    _one_error(res, 2, "refused", "nothing was written")
    assert not target.exists()
    assert tree(tmp_path) == before  # not one byte or mode changed outside the target
    assert sentinel.read_text() == "keep me"


def test_restore_removes_what_it_wrote_when_the_disk_fills(tiered_pki, plain_backup, tmp_path, monkeypatch):
    real, calls = backup_mod._create_file, []

    def full(path, data, mode):
        calls.append(path)
        if len(calls) == 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data, mode)

    monkeypatch.setattr(backup_mod, "_create_file", full)
    target = tmp_path / "restored"
    res = cli("restore", str(plain_backup), "--pki-dir", str(target))
    _one_error(res, 1, str(target), "No space left on device")
    assert not target.exists()


def test_restore_path_errors_are_one_line(plain_backup, tmp_path):
    _one_error(cli("restore", str(plain_backup), "--pki-dir", str(tmp_path / "no/such/parent")), 2, str(tmp_path / "no/such"))
    _one_error(cli("restore", str(tmp_path), "--pki-dir", str(tmp_path / "r")), 2, str(tmp_path))  # a directory as FILE
    _one_error(cli("restore", str(tmp_path / "missing.tgz"), "--pki-dir", str(tmp_path / "r")), 2, "missing.tgz")
    (tmp_path / "a-file").write_text("x")
    _one_error(cli("restore", str(plain_backup), "--pki-dir", str(tmp_path / "a-file")), 2, "a-file")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------ backup


def _trace_backup(pki: Path, out: Path, passfile: Path, tmp_path: Path) -> Path:
    prefix = tmp_path / "trace" / "t"
    prefix.parent.mkdir()
    argv = ["strace", "-ff", "-y", "-qq", "-s", "16", "-o", str(prefix), "-e",
            "trace=execve,open,openat,creat,write,pwrite64,writev,pwritev,pwritev2,rename,renameat,renameat2,link,linkat",
            sys.executable, "-m", "mtlsctl", "--pki-dir", str(pki), "backup", "--out", str(out), "--passphrase-file", str(passfile)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    return prefix.parent


def _c_string(text: str) -> bytes:
    return codecs.escape_decode(text.encode("latin-1"))[0]


@pytest.mark.needs("strace")
def test_the_encrypted_backup_writes_no_plaintext_byte_to_disk(tiered_pki, passfile, tmp_path):
    """Every file written and every file created, by mtlsctl and its openssl child, while an encrypted backup
    runs: the only file that ever receives a byte is the backup's temporary name next to --out, written by
    openssl alone, starting with openssl's `Salted__`, exactly as many bytes as the final file (then renamed)."""
    assert run_cli(["--pki-dir", str(tiered_pki), "add-client", "phone"]).code == 0
    usb = tmp_path / "usb"
    usb.mkdir()
    out = usb / "pki.tgz.enc"
    traces = _trace_backup(tiered_pki, out, passfile, tmp_path)
    writes: list[tuple[str, str, int, bytes]] = []  # (pid, path, bytes written, first bytes)
    created: set[str] = set()
    renames: list[tuple[str, str]] = []
    openssl_pids: set[str] = set()
    for trace in traces.iterdir():
        pid = trace.name.rsplit(".", 1)[1]
        for line in trace.read_text(errors="replace").splitlines():
            if line.startswith("execve(") and re.match(r'execve\("[^"]*openssl"', line) and line.rstrip().endswith("= 0"):
                openssl_pids.add(pid)
            m = re.match(r"(p?writev?2?|pwrite64)\((\d+)<([^>]*)>, (\"(?:[^\"\\]|\\.)*\")?.*\) = (\d+)$", line)
            if m and m.group(3).startswith("/") and not m.group(3).startswith(("/dev/", "/proc/")):
                writes.append((pid, m.group(3), int(m.group(5)), _c_string(m.group(4)[1:-1]) if m.group(4) else b""))
            m = re.match(r'(?:openat\(AT_FDCWD(?:<[^>]*>)?, |open\(|creat\()"((?:[^"\\]|\\.)*)", ([A-Z_|]+).*= (\d+)<', line)
            if m and ("O_CREAT" in m.group(2) or line.startswith("creat(")):
                created.add(_c_string(m.group(1)).decode())
            m = re.match(r'rename(?:at2?)?\((?:AT_FDCWD(?:<[^>]*>)?, )?"([^"]*)", (?:AT_FDCWD(?:<[^>]*>)?, )?"([^"]*)".*= 0$', line)
            if m:
                renames.append((m.group(1), m.group(2)))
    assert openssl_pids, "the trace shows no openssl"
    written_paths = {path for _, path, _, _ in writes}
    assert len(written_paths) == 1, written_paths  # one file on the whole disk received bytes...
    (part,) = written_paths
    assert Path(part).parent == usb and Path(part).name.startswith(".mtlsctl-backup.")
    writers = {pid for pid, *_ in writes}
    assert len(writers) == 1 and writers <= openssl_pids  # ...and only openssl (enc) wrote it: ciphertext
    assert writes[0][3].startswith(b"Salted__")  # its first bytes, in the order that one process wrote them
    assert sum(n for _, _, n, _ in writes) == out.stat().st_size
    assert created <= {part, str(tiered_pki / ".mtlsctl.lock")}, created  # no other file was even created
    assert (part, str(out)) in renames and not Path(part).exists()
    assert out.read_bytes()[:8] == b"Salted__" and out.stat().st_mode & 0o777 == 0o600
    assert os.listdir(usb) == [out.name]


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_round_trip_verifies_and_every_section_uses_the_new_directory(tiered_pki, passfile, tmp_path, encrypted):
    old = tiered_pki
    for name in ("phone", "lost"):
        assert cli("--pki-dir", str(old), "add-client", name).code == 0
    assert cli("--pki-dir", str(old), "revoke", "lost", "--no-reload").code == 0
    pw = ["--passphrase-file", str(passfile)] if encrypted else []
    out = tmp_path / "pki.backup"
    res = cli("--pki-dir", str(old), "backup", "--out", str(out), "--json", *pw)
    assert res.code == 0, res.err
    assert json.loads(res.out)["verified"] is True
    new = tmp_path / "restored"
    res = cli("restore", str(out), "--pki-dir", str(new), "--json", *pw)
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert all(f["level"] == "ok" for f in data["doctor"]), data["doctor"]
    sections = [s for s, _ in cnf_dirs(old / "openssl.cnf")]
    assert "CA_default" in sections and ("root_ca" in sections or not is_two_tier(old))
    assert [re.search(r"\[(\w+)\]", r).group(1) for r in data["repointed"] if r.startswith("openssl.cnf")] == sections
    assert str(old) not in (new / "openssl.cnf").read_text() and str(old) not in (new / "mtls.yaml").read_text()
    # the restored PKI verifies as nginx would: a good client OK, the revoked one refused
    assert nginx_verify(new, "certs/phone.crt").endswith("OK")
    assert "certificate revoked" in nginx_verify(new, "certs/lost.crt")
    # a CRL made in the restored PKI uses the NEW directory's database and key, never the old one's
    db = "root/crlnumber" if is_two_tier(old) else "crlnumber"
    old_before, new_before = (old / db).read_text(), (new / db).read_text()
    old_tree = tree(old)
    args = ["crl", "--root"] if is_two_tier(old) else ["crl"]
    res = cli("--pki-dir", str(new), *args, "--no-reload")
    assert res.code == 0, res.err
    assert int((new / db).read_text(), 16) == int(new_before, 16) + 1
    assert (old / db).read_text() == old_before and tree(old) == old_tree  # the old PKI: not one byte changed
    assert nginx_verify(new, "certs/phone.crt").endswith("OK")
    assert cli("--pki-dir", str(new), "add-client", "tablet").code == 0 and nginx_verify(new, "certs/tablet.crt").endswith("OK")


def test_doctor_checks_every_dir_of_openssl_cnf(tiered_pki, mtls, tmp_path):
    """The last `dir =` (two-tier: [ root_ca ], what `crl --root` uses) pointing elsewhere is an error."""
    assert json.loads(mtls(["--pki-dir", str(tiered_pki), "doctor", "--json"]).out)["healthy"]
    elsewhere = tmp_path / "old-place"
    cnf = tiered_pki / "openssl.cnf"
    lines = cnf.read_text().splitlines(keepends=True)
    last = max(i for i, line in enumerate(lines) if re.match(r"\s*dir\s*=", line))
    lines[last] = f"dir               = {elsewhere}\n"
    cnf.write_text("".join(lines))
    res = mtls(["--pki-dir", str(tiered_pki), "doctor", "--json"])
    section = cnf_dirs(cnf)[-1][0]
    assert section == "root_ca" or not is_two_tier(tiered_pki)
    problems = [f for f in json.loads(res.out)["findings"] if f["level"] == "error" and f["check"] == "config"]
    assert res.code == 1 and any(f"dir is {elsewhere} in [ {section} ]" in f["message"] for f in problems), problems
    # a relative `dir = .` is this PKI (openssl always runs in the PKI directory)
    lines[last] = "dir = .\n"
    cnf.write_text("".join(lines))
    assert json.loads(mtls(["--pki-dir", str(tiered_pki), "doctor", "--json"]).out)["healthy"]


PLANTS = {
    "symlink_out": lambda p: (p / "certs/evil.crt").symlink_to("/etc/passwd"),
    "symlinked_key": lambda p: (p / "private/web.key").symlink_to(p / "private/phone.key"),
    "dangling": lambda p: (p / "newcerts/FF.pem").symlink_to(p / "nowhere"),
    "top_symlink": lambda p: (p / "current").symlink_to(p),
    "fifo": lambda p: os.mkfifo(p / "crl/ca.fifo"),
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_backup_refuses_a_pki_it_could_not_restore(tiered_pki, tmp_path, plant):
    PLANTS[plant](tiered_pki)
    usb = tmp_path / "usb"
    usb.mkdir()
    res = cli("--pki-dir", str(tiered_pki), "backup", "--out", str(usb / "b.tgz"))
    name = {"symlink_out": "certs/evil.crt", "symlinked_key": "private/web.key", "dangling": "newcerts/FF.pem",
            "top_symlink": "current", "fifo": "crl/ca.fifo"}[plant]
    _one_error(res, 2, "cannot restore", name)
    assert os.listdir(usb) == []  # not even a temporary file left


def test_backup_holds_no_hard_links_no_lock_no_journal_and_reports_what_it_left_out(tiered_pki, tmp_path):
    assert cli("--pki-dir", str(tiered_pki), "add-client", "phone").code == 0
    os.link(tiered_pki / "ca/ca.crt", tiered_pki / "ca/ca-copy.crt")  # a hard link inside the PKI
    (tiered_pki / "nginx").mkdir()  # the demo's nginx prefix: not part of the PKI
    (tiered_pki / "notes.txt").write_text("mine")
    (tiered_pki / "certs/.phone.crt.x1y2.tmp").write_text("a crash left me")
    (tiered_pki / "certs/phone.crt").chmod(0o4755)
    out = tmp_path / "b.tgz"
    res = cli("--pki-dir", str(tiered_pki), "backup", "--out", str(out), "--json")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert {s["path"] for s in data["skipped"]} == {"nginx/", "notes.txt", "certs/.phone.crt.x1y2.tmp"}
    assert {"path": "certs/phone.crt", "on_disk": "4755", "archived": "644"} in data["modes"]
    with tarfile.open(out) as tar:
        members = tar.getmembers()
        assert all(m.isreg() or m.isdir() for m in members), [(m.name, m.type) for m in members if not (m.isreg() or m.isdir())]
        names = {m.name for m in members}
        assert not any(".mtlsctl." in n for n in names) and (tiered_pki / ".mtlsctl.lock").exists()
        copy = tar.extractfile("pki/ca/ca-copy.crt").read()
    assert copy == (tiered_pki / "ca/ca.crt").read_bytes()
    res = cli("restore", str(out), "--pki-dir", str(tmp_path / "r"), "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["clamped"] == [] and json.loads(res.out)["skipped"] == []  # restorable as written


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_backup_reads_the_finished_archive_back_before_success(tiered_pki, passfile, tmp_path, monkeypatch, encrypted):
    real = backup_mod._verify

    def damaged_disk(fd, passphrase, written):  # the medium loses the second half of what was written
        size = os.fstat(fd).st_size
        os.ftruncate(fd, size // 2)
        return real(fd, passphrase, written)

    monkeypatch.setattr(backup_mod, "_verify", damaged_disk)
    usb = tmp_path / "usb"
    usb.mkdir()
    pw = ["--passphrase-file", str(passfile)] if encrypted else []
    res = cli("--pki-dir", str(tiered_pki), "backup", "--out", str(usb / "b"), *pw)
    _one_error(res, 1, "finished backup")
    assert os.listdir(usb) == []


def test_backup_never_replaces_a_file_that_appears_meanwhile(tiered_pki, tmp_path, monkeypatch):
    real = backup_mod._verify
    out = tmp_path / "b.tgz"

    def race(fd, passphrase, written):
        real(fd, passphrase, written)
        out.write_text("someone else's file")

    monkeypatch.setattr(backup_mod, "_verify", race)
    res = cli("--pki-dir", str(tiered_pki), "backup", "--out", str(out))
    _one_error(res, 2, str(out))
    assert out.read_text() == "someone else's file"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".mtlsctl-backup")] == []


def test_backup_out_a_directory_writes_a_default_name_and_says_so(tiered_pki, passfile, tmp_path):
    usb = tmp_path / "usb"
    usb.mkdir()
    res = cli("--pki-dir", str(tiered_pki), "backup", "--out", str(usb), "--passphrase-file", str(passfile))
    assert res.code == 0, res.err
    (made,) = usb.iterdir()
    assert re.fullmatch(r"pki-backup-\d{8}-\d{6}\.tgz\.enc", made.name)
    assert f"--out is a directory: writing {made}" in res.err and str(made) in res.out
    res = cli("--pki-dir", str(tiered_pki), "backup", "--out", str(tmp_path), "--json")
    assert res.code == 0 and json.loads(res.out)["note"].startswith("--out is a directory")


def test_backup_path_errors_are_one_line_with_the_path(tiered_pki, tmp_path):
    _one_error(cli("--pki-dir", str(tiered_pki), "backup", "--out", str(tmp_path / "no/such/b.tgz")), 2, str(tmp_path / "no/such"))
    (tmp_path / "a-file").write_text("x")
    _one_error(cli("--pki-dir", str(tiered_pki), "backup", "--out", str(tmp_path / "a-file/b.tgz")), 2, "a-file")
    _one_error(cli("--pki-dir", str(tiered_pki), "backup", "--out", str(tmp_path / "a-file")), 2, "already exists")
    assert (tmp_path / "a-file").read_text() == "x"
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "link-target")
    _one_error(cli("--pki-dir", str(tiered_pki), "backup", "--out", str(link)), 2, "already exists")
    assert link.is_symlink() and not (tmp_path / "link-target").exists()
    _one_error(cli("--pki-dir", str(tiered_pki), "backup", "--out", str(tiered_pki / "b.tgz")), 2, "inside the PKI")


def test_backup_into_a_directory_the_user_cannot_write_is_one_line(tiered_pki):
    """EACCES (a non-root admin, --out in root's directory): exit 1 with the path, in a forked child as nobody."""
    shared = Path(tempfile.mkdtemp(prefix="mtls-backup-eacces-", dir="/tmp"))
    try:
        os.chmod(shared, 0o755)
        pki = shared / "pki"
        shutil.copytree(tiered_pki, pki, symlinks=True)
        for name in ("openssl.cnf", "mtls.yaml"):
            (pki / name).write_text((pki / name).read_text().replace(str(tiered_pki), str(pki)))
        for path in [pki, *pki.rglob("*")]:
            os.lchown(path, 65534, 65534)  # the admin's own PKI...
        usb = shared / "root-only"
        usb.mkdir(mode=0o755)  # ...and a directory only root may write
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                os.setgid(65534)
                os.setuid(65534)
                res = run_cli(["--pki-dir", str(pki), "backup", "--out", str(usb / "b.tgz")])
                os.write(w, f"{res.code}\n{res.err}".encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as fh:
            text = fh.read()
        os.waitpid(pid, 0)
        code, _, err = text.partition("\n")
        assert code == "1", text
        first = err.splitlines()[0]
        assert first.startswith("error: ") and str(usb) in first and "Permission denied" in first, err
        assert "internal error" not in err and "Traceback" not in err
        assert os.listdir(usb) == []
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_restore_warns_about_openssl_cnf_directives_that_load_code(tiered_pki, plain_backup, tmp_path):
    """Restore judges structure, not content, but says when openssl.cnf would make openssl load other files."""
    members = _members(plain_backup)
    evil = tmp_path / "include.tgz"
    with tarfile.open(evil, "w:gz") as tar:
        for info, data in members:
            if info.name == "pki/openssl.cnf":
                data = b".include /etc/ssl/evil.cnf\n" + data
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    res = cli("restore", str(evil), "--pki-dir", str(tmp_path / "r"), "--json")
    warnings = json.loads(res.out)["warnings"]
    assert any("`.include`" in w for w in warnings), warnings
    res = cli("restore", str(plain_backup), "--pki-dir", str(tmp_path / "clean"), "--json")
    assert res.code == 0 and json.loads(res.out)["warnings"] == []


def test_a_replaced_devices_archive_is_backed_up_and_restored_private(fast_pki, tmp_path):
    """archive/NAME/SERIAL/ holds a replaced device's old key: the backup keeps it, restore gives it private modes."""
    set_profile(fast_pki, nginx={"reload_command": "", "test_command": ""})
    assert cli("--pki-dir", str(fast_pki), "add-client", "phone").code == 0
    assert cli("--pki-dir", str(fast_pki), "replace", "phone", "--no-reload").code == 0
    (old_key,) = fast_pki.glob("archive/phone/*/phone.key")
    out = tmp_path / "pki.tgz"
    res = cli("--pki-dir", str(fast_pki), "backup", "--out", str(out), "--json")
    assert res.code == 0, res.err
    assert not any("archive" in s for s in json.dumps(json.loads(res.out).get("skipped", [])).split('"')), res.out
    new = tmp_path / "restored"
    res = cli("restore", str(out), "--pki-dir", str(new))
    assert res.code == 0, res.err
    restored = new / old_key.relative_to(fast_pki)
    assert restored.read_bytes() == old_key.read_bytes()
    assert restored.stat().st_mode & 0o777 == 0o600 and restored.parent.stat().st_mode & 0o777 == 0o700
    assert (new / "archive").stat().st_mode & 0o777 == 0o700
