"""`mtlsctl backup` / `mtlsctl restore`: the whole PKI as a tar (modes kept), optionally encrypted
with `openssl enc -aes-256-cbc -pbkdf2`; the passphrase reaches openssl on stdin, never argv.

Restore refuses to write over an existing PKI, accepts only regular files and directories under
one top folder (no absolute paths, `..`, links or devices), re-points openssl.cnf's `dir` and
mtls.yaml's `pki_dir` at the new place, and runs `doctor`.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mtlsctl.errors import InputError
from mtlsctl.files import JOURNAL_DIR, MODE_SECRET, Transaction, atomic_write, pki_lock
from mtlsctl.pki import LOCK_NAME, Settings
from mtlsctl.runner import Command, Runner

TOP = "pki"
MAGIC = b"Salted__"


def enc_command(src: str, dst: str, decrypt: bool) -> Command:
    argv = ["openssl", "enc", "-aes-256-cbc", "-pbkdf2", "-iter", "200000", "-md", "sha256", "-salt",
            "-in", src, "-out", dst, "-pass", "stdin"]
    if decrypt:
        argv.insert(2, "-d")
    return Command(tuple(argv), label="decrypting the backup" if decrypt else "encrypting the backup", secret="")


@dataclass(frozen=True)
class BackupResult:
    path: Path
    files: int
    encrypted: bool


def _tar_filter(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    name = PurePosixPath(info.name)
    if LOCK_NAME in name.parts or JOURNAL_DIR in name.parts or "nginx" in name.parts[1:2]:
        return None
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def backup(settings: Settings, out: Path, passphrase: str | None, runner: Runner) -> BackupResult:
    pki = settings.pki
    pki.require_ca()
    out = out.absolute()
    if out.exists():
        raise InputError(f"{out} already exists", hint="pick another --out; a backup never overwrites a file")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: directory {out.parent} does not exist")
    if pki.root in out.parents:
        raise InputError("--out is inside the PKI directory", hint="write the backup somewhere else")
    fd, plain = tempfile.mkstemp(prefix=".mtlsctl-backup.", dir=out.parent)
    os.close(fd)
    try:
        with pki_lock(pki.lock_path):  # one consistent copy: nobody changes the PKI meanwhile
            with tarfile.open(plain, "w:gz") as tar:
                tar.add(str(pki.root), arcname=TOP, filter=_tar_filter)
                count = sum(1 for m in tar.getmembers() if m.isfile())
        if passphrase is not None:
            sealed = plain + ".enc"
            cmd = enc_command(plain, sealed, decrypt=False)
            runner.run(Command(cmd.argv, cmd.label, secret=passphrase))
            os.replace(sealed, plain)
        os.chmod(plain, MODE_SECRET)
        os.link(plain, out)  # never replaces an existing file (unlike rename)
    finally:
        for leftover in (plain, plain + ".enc"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return BackupResult(out, count, passphrase is not None)


@dataclass(frozen=True)
class RestoreResult:
    pki_dir: Path
    files: int


def _safe_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for m in members:
        path = PurePosixPath(m.name)
        if path.is_absolute() or ".." in path.parts or not path.parts or path.parts[0] != TOP:
            raise InputError(f"the backup holds {m.name!r}, outside {TOP}/: refused", hint="this is not an mtlsctl backup")
        if not (m.isfile() or m.isdir()):
            raise InputError(f"the backup holds {m.name!r}, a link or device: refused", hint="this is not an mtlsctl backup")
    return members


def restore(backup_file: Path, target: Path, passphrase: str | None, runner: Runner) -> RestoreResult:
    from mtlsctl import validate

    target = validate.pki_dir(target)
    if not backup_file.is_file():
        raise InputError(f"backup {backup_file} does not exist")
    if target.exists() and any(target.iterdir()):
        raise InputError(f"{target} exists and is not empty", hint="restore into a new directory; mtlsctl never overwrites a PKI")
    data = backup_file.read_bytes()
    encrypted = data.startswith(MAGIC)
    if encrypted:
        if passphrase is None:
            raise InputError("the backup is encrypted", hint="give --passphrase-file FILE or --passphrase-fd N (or run on a terminal)")
        with tempfile.TemporaryDirectory(prefix="mtlsctl-restore.") as tmp:
            dst = os.path.join(tmp, "plain.tgz")
            cmd = enc_command(str(backup_file.absolute()), dst, decrypt=True)
            res = runner.run(Command(cmd.argv, cmd.label, secret=passphrase), check=False)
            if res.returncode != 0:
                raise InputError("cannot decrypt the backup: wrong passphrase, or the file is damaged")
            data = Path(dst).read_bytes()
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        tar.getmembers()  # reads the whole archive: gzip's CRC catches garbage
    except (tarfile.TarError, EOFError, OSError):
        if encrypted:  # openssl enc has no MAC: about 1 wrong passphrase in 256 "decrypts" to garbage
            raise InputError("cannot decrypt the backup: wrong passphrase, or the file is damaged") from None
        raise InputError(f"{backup_file} is not an mtlsctl backup (not a tar archive)") from None
    with tar:
        members = _safe_members(tar)
        created_root = not target.exists()
        target.mkdir(parents=True, exist_ok=True, mode=0o755)
        with Transaction() as tx:
            if created_root:
                tx.created(target)
            count = 0
            for m in sorted(members, key=lambda m: m.name):
                rel = PurePosixPath(m.name).relative_to(TOP)
                dest = target.joinpath(*rel.parts) if rel.parts else target
                if m.isdir():
                    if not dest.exists():
                        dest.mkdir(mode=0o700)
                        tx.created(dest)
                    os.chmod(dest, m.mode & 0o7777)
                    continue
                source = tar.extractfile(m)
                assert source is not None
                tx.created(dest)
                atomic_write(dest, source.read(), m.mode & 0o7777)
                count += 1
            _repoint(target, tx)
    return RestoreResult(target, count)


def _repoint(target: Path, tx: Transaction) -> None:
    """openssl.cnf's `dir` and mtls.yaml's `pki_dir` name the old place: point them here."""
    cnf = target / "openssl.cnf"
    if cnf.exists():
        text = cnf.read_text()
        atomic_write(cnf, re.sub(r"^(dir\s*=\s*).*$", lambda m: m.group(1) + str(target), text, count=1, flags=re.M),
                     cnf.stat().st_mode & 0o7777)
    prof = target / "mtls.yaml"
    if prof.exists():
        text = prof.read_text()
        atomic_write(prof, re.sub(r"^pki_dir: .*$", f"pki_dir: {target}", text, count=1, flags=re.M), prof.stat().st_mode & 0o7777)

