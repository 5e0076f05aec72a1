"""`mtlsctl backup` / `mtlsctl restore`: the whole PKI as a gzipped tar, optionally encrypted with
`openssl enc -aes-256-cbc -pbkdf2` (the passphrase on its own pipe, `-pass fd:N`, never argv).

Backups are restorable by construction, and nothing in an archive is trusted:

- one PKI layout (`_layout` below, with archive/NAME/SERIAL/ for replaced devices' old files) decides what a backup
  holds and what a restore accepts. Backup archives only regular files and directories of that layout, read without
  following links; it refuses a PKI with a symlink, FIFO, socket or device in it (naming them), leaves out mtlsctl's
  own state (`.mtlsctl.lock`, `.mtlsctl.journal/`, `ocsp.pid`) and reports anything else it left out. Every member
  is written as a regular file or directory (never a hard link), with the mode restore would give it.
- the encrypted backup streams the tar into `openssl enc` on stdin; openssl writes the ciphertext to a
  mkstemp file next to --out: no plaintext byte reaches the disk. The finished file is read back (decrypted
  to a pipe) and its members compared with what was written before it is renamed to --out (never replacing
  anything).
- restore refuses absolute names, `..`, members outside `pki/` or the layout, links, devices and FIFOs (the
  whole archive: nothing is written); never restores mtlsctl's lock or journal (skipped, reported); clamps
  modes (no setuid/setgid/sticky, nothing group/other-writable, private/ 700, its files 600, ca.key and
  root.key 400, .p12 600), reports each change, creates every file with O_EXCL|O_NOFOLLOW in a directory
  that is mode 700 until the end, re-points every `dir =` of openssl.cnf and mtls.yaml's `pki_dir` at the new
  place, and removes what it wrote when anything fails.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import os
import re
import stat
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, BinaryIO

from mtlsctl import audit
from mtlsctl.audit import AUDIT_FILE
from mtlsctl.errors import InputError, MtlsError, OpenSSLError
from mtlsctl.files import (
    MODE_CA_KEY,
    MODE_PRIVATE_DIR,
    MODE_PUBLIC_DIR,
    MODE_SECRET,
    atomic_write,
    check_owned_dir,
    fsync_dir,
    read_lock,
)
from mtlsctl.pki import DB_FILES_WITH_BACKUPS, DIRS, PROFILE_NAME, Settings
from mtlsctl.runner import Runner, summarize_stderr

if TYPE_CHECKING:
    from mtlsctl.doctor import Finding

TOP = "pki"
MAGIC = b"Salted__"
ENC_ARGS = ("-aes-256-cbc", "-pbkdf2", "-iter", "200000", "-md", "sha256")

# The PKI layout: what a backup holds and a restore accepts.
TOP_FILES = frozenset((*DB_FILES_WITH_BACKUPS, "openssl.cnf", PROFILE_NAME, AUDIT_FILE))
FLAT_DIRS = frozenset(DIRS)          # ca/ certs/ crl/ private/ newcerts/: regular files, no subdirectories
ROOT_DIR = "root"                    # two-tier: the root's own database and root/newcerts/
ROOT_FILES = frozenset(DB_FILES_WITH_BACKUPS)
ARCHIVE_DIR = "archive"              # archive/NAME/SERIAL/: a replaced device's old files (keys too: private)
# mtlsctl's own state: never archived, never restored (a journal from elsewhere would be "rolled back").
STATE_PREFIX = ".mtlsctl."
RUNTIME_FILES = frozenset(("ocsp.pid",))
_NAME_RE = re.compile(r"[^\x00-\x1f\x7f/\\]+")

# A PKI is small; these only stop a hostile archive from eating the machine.
MAX_ARCHIVE_BYTES = 1 << 30
MAX_UNPACKED_BYTES = 4 << 30
MAX_MEMBERS = 1_000_000


def clamp_mode(rel: tuple[str, ...], is_dir: bool, mode: int) -> int:
    """The mode a restored (and archived) entry gets: never setuid/setgid/sticky or group/other-writable;
    private/ 700 and its files at most 600; ca.key and root.key 400; .p12 at most 600."""
    if is_dir:
        return MODE_PRIVATE_DIR if rel == ("private",) or (rel and rel[0] == ARCHIVE_DIR) else (mode & 0o755) | 0o700
    if rel in (("private", "ca.key"), ("private", "root.key")):
        return MODE_CA_KEY
    if rel == (AUDIT_FILE,):
        return MODE_SECRET  # the audit log: its owner appends, nobody else reads
    secret_in_archive = rel[0] == ARCHIVE_DIR and rel[-1].endswith((".key", ".p12", ".password"))
    if rel[0] == "private" or secret_in_archive or (rel[0] == "certs" and rel[-1].endswith(".p12")):
        return (mode & 0o600) | 0o400
    return (mode & 0o644) | 0o400


def _layout(rel: tuple[str, ...], is_dir: bool) -> str | None:
    """None when `rel` (relative to the PKI) belongs to the layout as a file (is_dir False) or directory."""
    if not rel:
        return None if is_dir else "the PKI directory itself must be a directory"
    if any(not _NAME_RE.fullmatch(part) for part in rel):
        return "a name with control characters or a backslash"
    if rel[0] == ARCHIVE_DIR:  # archive/ NAME/ SERIAL/ files
        if len(rel) <= 3:
            return None if is_dir else "must be a directory (archive/NAME/SERIAL/)"
        if len(rel) == 4:
            return None if not is_dir else "a directory inside archive/NAME/SERIAL/ is not part of the PKI layout"
        return "not part of the PKI layout"
    if len(rel) == 1:
        if rel[0] in FLAT_DIRS or rel[0] == ROOT_DIR:
            return None if is_dir else "must be a directory"
        if rel[0] in TOP_FILES:
            return None if not is_dir else "must be a file"
        return "not part of the PKI layout"
    if len(rel) == 2 and rel[0] in FLAT_DIRS:
        return None if not is_dir else f"a directory inside {rel[0]}/ is not part of the PKI layout"
    if len(rel) == 2 and rel[0] == ROOT_DIR:
        if rel[1] == "newcerts":
            return None if is_dir else "must be a directory"
        if rel[1] in ROOT_FILES:
            return None if not is_dir else "must be a file"
        return "not part of the PKI layout"
    if len(rel) == 3 and rel[:2] == (ROOT_DIR, "newcerts"):
        return None if not is_dir else "a directory inside root/newcerts/ is not part of the PKI layout"
    return "not part of the PKI layout"


def _state_skip(rel: tuple[str, ...]) -> str | None:
    """Why a member is skipped whatever its type (mtlsctl's own state, never restored), else None."""
    if rel and rel[0].startswith(STATE_PREFIX):
        return "mtlsctl's lock or journal: never restored"
    if len(rel) == 1 and rel[0] in RUNTIME_FILES:
        return "runtime state: never restored"
    return None


def _hidden_skip(rel: tuple[str, ...]) -> str | None:
    """A hidden entry inside a layout directory (a temporary file left by a crash): left out, said so."""
    if len(rel) >= 2 and rel[-1].startswith("."):
        return "a hidden (temporary) file: not part of the PKI"
    return None


def _show(rel: tuple[str, ...]) -> str:
    return "/".join(rel) if rel else "."


# -------------------------------------------------------------------------------------------- errors


def _os_error(exc: OSError, what: str) -> MtlsError:
    """An OSError as one line with the path and the reason; exit 2 for a wrong path (missing directory, a
    file for a directory...), 1 for the system (permission denied, disk full), as everywhere in mtlsctl."""
    from mtlsctl.errors import EXIT_BAD_INPUT, os_error_exit_code, os_error_lines

    where = os.fsdecode(exc.filename) if exc.filename is not None else ""
    text = f"{what}: {exc.strerror or exc}" + (f" ({where})" if where and where not in what else "")
    hints = [line[len("hint: "):] for line in os_error_lines(exc) if line.startswith("hint: ")]
    cls = InputError if os_error_exit_code(exc) == EXIT_BAD_INPUT else MtlsError
    return cls(text, hint=hints[0] if hints else None)


# -------------------------------------------------------------------------------------------- openssl enc


def _secret_pipe(secret: str) -> int:
    """A pipe holding the passphrase; the read end goes to openssl as `-pass fd:N`."""
    r, w = os.pipe()
    try:
        os.write(w, (secret + "\n").encode())
    finally:
        os.close(w)
    return r


def enc_argv(fd: int, decrypt: bool) -> tuple[str, ...]:
    return ("openssl", "enc", *(("-d",) if decrypt else ()), *ENC_ARGS, *(() if decrypt else ("-salt",)), "-pass", f"fd:{fd}")


class _Enc:
    """`openssl enc` with binary stdin/stdout, the passphrase on its own pipe, stderr drained in a thread."""

    def __init__(self, passphrase: str, decrypt: bool, stdin: int | BinaryIO | None, stdout: int | None) -> None:
        from mtlsctl.runner import spawn_stream

        self._fd = _secret_pipe(passphrase)
        self.argv = enc_argv(self._fd, decrypt)
        try:
            self.proc = spawn_stream(self.argv, stdin, stdout, extra_fds=(self._fd,))
        except BaseException:
            os.close(self._fd)
            raise
        os.close(self._fd)
        self._err = b""
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        self._err = self.proc.stderr.read()

    def finish(self) -> tuple[int, str]:
        rc = self.proc.wait()
        self._reader.join()
        return rc, self._err.decode("utf-8", "replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join()


def _decrypt_to_memory(src: BinaryIO, passphrase: str) -> bytes | None:
    """Decrypt an encrypted backup into memory (never to disk); None when openssl refuses it."""
    enc = _Enc(passphrase, decrypt=True, stdin=src, stdout=None)
    assert enc.proc.stdout is not None
    chunks, total = [], 0
    try:
        while chunk := enc.proc.stdout.read(1 << 20):
            total += len(chunk)
            if total > MAX_ARCHIVE_BYTES:
                enc.kill()
                raise InputError(f"the decrypted backup is larger than {MAX_ARCHIVE_BYTES >> 20} MiB: refused")
            chunks.append(chunk)
    except BaseException:
        enc.kill()
        raise
    rc, _ = enc.finish()
    return b"".join(chunks) if rc == 0 else None


# -------------------------------------------------------------------------------------------- backup


@dataclass(frozen=True)
class Member:
    """One archive member as backup wrote it (and as the re-read must find it)."""

    name: str
    is_dir: bool
    mode: int
    size: int = 0
    sha256: str = ""


@dataclass(frozen=True)
class BackupResult:
    path: Path
    files: int
    encrypted: bool
    skipped: list[tuple[str, str]] = field(default_factory=list)      # (path, why it was left out)
    normalised: list[tuple[str, int, int]] = field(default_factory=list)  # (path, mode on disk, mode archived)
    note: str = ""  # e.g. "--out is a directory: writing DIR/NAME"


def default_name(encrypted: bool) -> str:
    return time.strftime("pki-backup-%Y%m%d-%H%M%S.tgz") + (".enc" if encrypted else "")


def _scan(root: Path) -> tuple[list[tuple[tuple[str, ...], os.stat_result]], list[tuple[str, str]], list[str]]:
    """Walk the PKI without following anything: (entries of the layout, left out + why, refused + why)."""
    entries: list[tuple[tuple[str, ...], os.stat_result]] = []
    skipped: list[tuple[str, str]] = []
    refused: list[str] = []

    def visit(rel: tuple[str, ...]) -> None:
        path = root.joinpath(*rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if _state_skip(rel) is not None:
            return  # mtlsctl's own state: left out silently, by design
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFLNK:
            refused.append(f"{_show(rel)} (a symlink to {os.readlink(path)})")
            return
        if kind not in (stat.S_IFREG, stat.S_IFDIR):
            refused.append(f"{_show(rel)} ({_kind_name(kind)})")
            return
        why = _hidden_skip(rel) or _layout(rel, kind == stat.S_IFDIR)
        if why is not None:
            skipped.append((_show(rel) + ("/" if kind == stat.S_IFDIR else ""), why))
            return
        entries.append((rel, st))
        if kind == stat.S_IFDIR:
            try:
                names = sorted(os.listdir(path))
            except OSError as exc:
                raise _os_error(exc, f"cannot read {path}") from None
            for name in names:
                visit((*rel, name))

    entries.append(((), os.stat(root)))  # the PKI directory itself may be reached through the user's symlink
    for name in sorted(os.listdir(root)):
        visit((name,))
    return entries, skipped, refused


def _kind_name(kind: int) -> str:
    return {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
            stat.S_IFBLK: "a block device", stat.S_IFLNK: "a symlink"}.get(kind, "not a regular file")


def _read_nofollow(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MtlsError(f"{path} changed into something other than a regular file during the backup")
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read()
    finally:
        os.close(fd)


def _write_tar(tar: tarfile.TarFile, root: Path, entries: list[tuple[tuple[str, ...], os.stat_result]]) -> list[Member]:
    """Each entry as a regular file or directory (never a link), with the mode restore gives it."""
    written = []
    for rel, st in entries:
        name = "/".join((TOP, *rel))
        info = tarfile.TarInfo(name)
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = int(st.st_mtime)
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
            info.mode = clamp_mode(rel, True, st.st_mode)
            tar.addfile(info)
            written.append(Member(name, True, info.mode))
            continue
        try:
            data = _read_nofollow(root.joinpath(*rel))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InputError(f"{root.joinpath(*rel)} became a symlink during the backup: refused") from None
            raise _os_error(exc, f"cannot read {root.joinpath(*rel)}") from None
        info.type = tarfile.REGTYPE
        info.mode = clamp_mode(rel, False, st.st_mode)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        written.append(Member(name, False, info.mode, len(data), hashlib.sha256(data).hexdigest()))
    return written


def _read_back(fh: IO[bytes]) -> list[Member]:
    """The members of a finished archive, read as a stream (with each file's hash)."""
    found = []
    with tarfile.open(fileobj=fh, mode="r|gz") as tar:
        for m in tar:
            if m.isfile():
                src = tar.extractfile(m)
                assert src is not None
                found.append(Member(m.name, False, m.mode & 0o7777, m.size, hashlib.sha256(src.read()).hexdigest()))
            elif m.isdir():
                found.append(Member(m.name, True, m.mode & 0o7777))
            else:
                found.append(Member(f"{m.name} (tar type {m.type!r})", False, 0))
    return found


def _verify(fd: int, passphrase: str | None, written: list[Member]) -> None:
    """Read the finished file back (decrypting to a pipe) and check it holds exactly what was written, as
    members restore accepts."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        if passphrase is None:
            with os.fdopen(os.dup(fd), "rb") as fh:
                found = _read_back(fh)
        else:
            src = os.dup(fd)
            try:
                enc = _Enc(passphrase, decrypt=True, stdin=src, stdout=None)
            finally:
                os.close(src)
            assert enc.proc.stdout is not None
            try:
                found = _read_back(enc.proc.stdout)
                enc.proc.stdout.read()
            except BaseException:
                enc.kill()
                raise
            rc, err = enc.finish()
            if rc != 0:
                raise MtlsError(f"the finished backup does not decrypt: {summarize_stderr(err)}")
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise MtlsError(f"the finished backup does not read back as a tar archive: {exc}") from None
    if found != written:
        missing = sorted({m.name for m in written} - {m.name for m in found})
        extra = sorted({m.name for m in found} - {m.name for m in written})
        differ = sorted(a.name for a, b in zip(written, found, strict=False) if a != b and a.name == b.name)
        raise MtlsError(f"the finished backup differs from what was written (missing {missing[:3]}, extra {extra[:3]}, "
                        f"different {differ[:3]})", hint="the disk may be failing: write the backup somewhere else")
    problems = _plan_problems([_as_tarinfo(m) for m in found])
    if problems:
        raise MtlsError(f"the finished backup would not restore: {problems[0]}", hint="this is a bug in mtlsctl; please report it")


def _as_tarinfo(m: Member) -> tarfile.TarInfo:
    info = tarfile.TarInfo(m.name)
    info.type = tarfile.DIRTYPE if m.is_dir else tarfile.REGTYPE
    info.mode = m.mode
    info.size = m.size
    return info


def _rename_noreplace(src: str, dst: str) -> None:
    """rename(2) that never replaces `dst` (renameat2 RENAME_NOREPLACE; no hard links: vfat has none)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), dst)
    if os.path.lexists(dst):  # a filesystem without RENAME_NOREPLACE: check, then rename
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def _resolve_out(out: Path, encrypted: bool, pki_root: Path) -> tuple[Path, str]:
    out = out.expanduser().absolute()
    note = ""
    if out.is_symlink():  # to a directory, it would put the backup wherever the link's owner points it
        raise InputError(f"{out} already exists (a symbolic link, to {os.readlink(out)}): a backup is never written through a link",
                         hint="give the real file or directory as --out")
    if out.is_dir():
        out = out / default_name(encrypted)
        note = f"--out is a directory: writing {out}"
    if os.path.lexists(out):
        kind = " (a symlink)" if out.is_symlink() else ""
        raise InputError(f"{out} already exists{kind}", hint="pick another --out; a backup never overwrites a file")
    parent = out.parent
    if not parent.exists():
        raise InputError(f"--out {out}: directory {parent} does not exist", hint="create it first, or pick another --out")
    if not parent.is_dir():
        raise InputError(f"--out {out}: {parent} is not a directory")
    # Its owner (or anyone, when it is group/other-writable and not sticky) could swap the verified file
    # before the rename: only the euid's, root's, or a sticky directory such as /tmp.
    check_owned_dir(parent, "--out's directory", follow=True, allow_root=True, allow_sticky=True)
    real_parent, real_pki = Path(os.path.realpath(parent)), Path(os.path.realpath(pki_root))
    if real_parent == real_pki or real_pki in real_parent.parents:
        raise InputError("--out is inside the PKI directory", hint="write the backup somewhere else")
    return out, note


def backup(settings: Settings, out: Path, passphrase: str | None, runner: Runner | None = None) -> BackupResult:
    """Write the PKI to `out` (a new file, or a new file in the directory `out`), verified before success."""
    pki = settings.pki
    pki.require_ca()
    encrypted = passphrase is not None
    out, note = _resolve_out(out, encrypted, pki.root)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".mtlsctl-backup.", suffix=".part", dir=out.parent)  # 0600, O_EXCL
    except OSError as exc:
        raise _os_error(exc, f"cannot create the backup in {out.parent}") from None
    done = False
    try:
        try:
            with read_lock(pki.root):  # one consistent copy: no writer runs meanwhile (shared: a reader, not a writer)
                entries, skipped, refused = _scan(pki.root)
                if refused:
                    raise InputError(f"the PKI holds what a backup cannot restore: {'; '.join(refused)}",
                                     hint="replace each symlink with the file itself (or move it out of the PKI), then run again")
                written = _stream(pki.root, entries, fd, passphrase)
        except OSError as exc:
            raise _os_error(exc, "backup failed") from None
        normalised = [(_show(rel), stat.S_IMODE(st.st_mode), m.mode) for (rel, st), m in zip(entries, written, strict=True)
                      if stat.S_IMODE(st.st_mode) != m.mode]
        try:
            os.fsync(fd)
            _verify(fd, passphrase, written)
            os.close(fd)
            fd = -1
            _rename_noreplace(tmp, str(out))
        except FileExistsError:
            raise InputError(f"{out} appeared while the backup was written; it was left alone",
                             hint="pick another --out") from None
        except OSError as exc:
            raise _os_error(exc, f"cannot finish the backup {out}") from None
        fsync_dir(out.parent)
        done = True
    finally:
        if fd >= 0:
            os.close(fd)
        if not done:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            except OSError:  # pragma: no cover - the directory went read-only meanwhile
                pass
    files = sum(1 for m in written if not m.is_dir)
    return BackupResult(out, files, encrypted, skipped, normalised, note)


def _stream(root: Path, entries: list[tuple[tuple[str, ...], os.stat_result]], fd: int, passphrase: str | None) -> list[Member]:
    """The tar, gzipped, into `fd` — through `openssl enc` on a pipe when encrypting (no plaintext on disk)."""
    if passphrase is None:
        with os.fdopen(os.dup(fd), "wb") as fh, tarfile.open(fileobj=fh, mode="w|gz") as tar:
            return _write_tar(tar, root, entries)
    enc = _Enc(passphrase, decrypt=False, stdin=None, stdout=fd)
    assert enc.proc.stdin is not None
    try:
        with tarfile.open(fileobj=enc.proc.stdin, mode="w|gz") as tar:
            written = _write_tar(tar, root, entries)
        enc.proc.stdin.close()
    except BrokenPipeError:
        rc, err = enc.finish()
        raise OpenSSLError(" ".join(enc.argv), rc, summarize_stderr(err), err) from None
    except BaseException:
        enc.kill()
        raise
    rc, err = enc.finish()
    if rc != 0:
        raise OpenSSLError(" ".join(enc.argv), rc, summarize_stderr(err), err)
    return written


# -------------------------------------------------------------------------------------------- restore


@dataclass(frozen=True)
class RestoreResult:
    pki_dir: Path
    files: int
    clamped: list[tuple[str, int, int]] = field(default_factory=list)   # (path, mode in the archive, mode given)
    skipped: list[tuple[str, str]] = field(default_factory=list)        # (member, why)
    repointed: list[str] = field(default_factory=list)                  # "openssl.cnf [root_ca] dir", ...
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Plan:
    dirs: list[tuple[tuple[str, ...], tarfile.TarInfo]] = field(default_factory=list)
    files: list[tuple[tuple[str, ...], tarfile.TarInfo]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def _type_name(m: tarfile.TarInfo) -> str:
    if m.issym():
        return f"a symlink to {m.linkname!r}"
    if m.islnk():
        return f"a hard link to {m.linkname!r}"
    if m.ischr() or m.isblk():
        return "a device"
    if m.isfifo():
        return "a FIFO"
    return f"an entry of tar type {m.type!r}"


def _plan(members: list[tarfile.TarInfo]) -> _Plan:
    """Sort the archive's members into directories and files to create, members skipped, and refusals."""
    plan = _Plan()
    seen: set[tuple[str, ...]] = set()
    for m in members:
        path = PurePosixPath(m.name)
        if path.is_absolute() or ".." in path.parts or not path.parts or path.parts[0] != TOP:
            plan.refused.append(f"{m.name!r} (outside {TOP}/)")
            continue
        rel = path.parts[1:]
        why = _state_skip(rel)
        if why is not None:
            plan.skipped.append((m.name, why))
            continue
        if not (m.isreg() or m.isdir()):
            plan.refused.append(f"{m.name!r} ({_type_name(m)})")
            continue
        why = _hidden_skip(rel)
        if why is not None:
            plan.skipped.append((m.name, why))
            continue
        why = _layout(rel, m.isdir())
        if why is not None:
            plan.refused.append(f"{m.name!r} ({why})")
            continue
        if rel in seen:
            plan.refused.append(f"{m.name!r} (appears twice)")
            continue
        seen.add(rel)
        (plan.dirs if m.isdir() else plan.files).append((rel, m))
    return plan


def _plan_problems(members: list[tarfile.TarInfo]) -> list[str]:
    plan = _plan(members)
    return plan.refused


def is_encrypted(backup_file: Path) -> bool:
    """True when the file is an `openssl enc` backup (starts with Salted__)."""
    try:
        with open(backup_file, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except FileNotFoundError:
        raise InputError(f"backup {backup_file} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"backup {backup_file} is a directory, not a backup file") from None
    except OSError as exc:
        raise _os_error(exc, f"cannot read the backup {backup_file}") from None


def _read_archive(backup_file: Path, passphrase: str | None) -> tuple[bytes, bool]:
    try:
        fh = open(backup_file, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise _os_error(exc, f"cannot read the backup {backup_file}") from None
    with fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise InputError(f"backup {backup_file} is not a regular file")
        if os.fstat(fh.fileno()).st_size > MAX_ARCHIVE_BYTES:
            raise InputError(f"backup {backup_file} is larger than {MAX_ARCHIVE_BYTES >> 20} MiB: refused")
        encrypted = fh.read(len(MAGIC)) == MAGIC
        fh.seek(0)
        if not encrypted:
            return fh.read(), False
        os.lseek(fh.fileno(), 0, os.SEEK_SET)  # openssl reads the descriptor itself, not Python's buffer
        if passphrase is None:
            raise InputError("the backup is encrypted", hint="give --passphrase-file FILE or --passphrase-fd N (or run on a terminal)")
        data = _decrypt_to_memory(fh, passphrase)
    if data is None:
        raise InputError("cannot decrypt the backup: wrong passphrase, or the file is damaged")
    return data, True


class _Undo:
    """What restore created, removed newest first when anything fails."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def rollback(self) -> None:
        for path in reversed(self.paths):
            try:
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                else:
                    path.unlink()
            except OSError:
                pass


def restore(backup_file: Path, target: Path, passphrase: str | None, runner: Runner | None = None) -> RestoreResult:
    from mtlsctl import validate

    target = validate.pki_dir(target)
    if target.exists() and not target.is_dir():
        raise InputError(f"--pki-dir {target} is not a directory")
    # An existing target must be ours and writable by us alone: another user could swap ca/ for a link
    # while we write, and the final chmods would follow it.
    check_owned_dir(target, "--pki-dir", follow=True)
    try:
        if target.exists() and any(target.iterdir()):
            raise InputError(f"{target} exists and is not empty", hint="restore into a new directory; mtlsctl never overwrites a PKI")
    except OSError as exc:
        raise _os_error(exc, f"cannot read --pki-dir {target}") from None
    if not target.parent.is_dir():
        raise InputError(f"--pki-dir {target}: directory {target.parent} does not exist", hint="create it first")
    data, encrypted = _read_archive(backup_file, passphrase)
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        members = []
        for m in tar:  # reads the whole archive: gzip's CRC catches garbage
            members.append(m)
            if len(members) > MAX_MEMBERS:
                raise InputError(f"the backup holds more than {MAX_MEMBERS} members: refused")
    except (tarfile.TarError, EOFError, OSError, ValueError):
        if encrypted:  # openssl enc has no MAC: about 1 wrong passphrase in 256 "decrypts" to garbage
            raise InputError("cannot decrypt the backup: wrong passphrase, or the file is damaged") from None
        raise InputError(f"{backup_file} is not an mtlsctl backup (not a tar archive)") from None
    with tar:
        plan = _plan(members)
        if plan.refused:
            shown = "; ".join(plan.refused[:5]) + (f"; and {len(plan.refused) - 5} more" if len(plan.refused) > 5 else "")
            raise InputError(f"the backup holds members restore refuses: {shown}: refused, nothing was written",
                             hint="this is not a backup made by mtlsctl, or it was tampered with")
        if sum(m.size for _, m in plan.files) > MAX_UNPACKED_BYTES:
            raise InputError(f"the backup unpacks to more than {MAX_UNPACKED_BYTES >> 30} GiB: refused")
        undo = _Undo()
        try:
            result = _extract(tar, plan, target, undo)
        except BaseException as exc:
            undo.rollback()
            if isinstance(exc, OSError):
                raise _os_error(exc, f"restore into {target} failed (what it wrote was removed)") from None
            raise
    from mtlsctl.pki import Pki

    # The restored PKI's audit log (restored too) says where it came from. Restore made this PKI a moment ago
    # and holds no lock on it (nor leaves a lock file there): nobody else can be writing to it yet.
    audit.record_new_pki(Pki(result.pki_dir), "restore", backup=str(Path(backup_file).absolute())[:300], files=result.files,
                         encrypted=encrypted, clamped=len(result.clamped), skipped=len(result.skipped))
    return result


@dataclass(frozen=True)
class CheckedRestore:
    """A restore, then doctor on the restored PKI (`mtlsctl restore`)."""

    restored: RestoreResult
    findings: list[Finding] = field(default_factory=list)
    doctor_error: str = ""  # why doctor could not look at the restored files (they are restored all the same)

    @property
    def healthy(self) -> bool:
        """Exit 0: doctor ran and found no error (warnings are shown, not failed on)."""
        return not self.doctor_error and not any(f.level == "error" for f in self.findings)


def restore_and_check(backup_file: Path, target: Path, passphrase: str | None, runner: Runner | None = None) -> CheckedRestore:
    """restore(), then doctor on the new PKI with its own profile (mtls.yaml as restored, no environment)."""
    from mtlsctl.doctor import run_doctor
    from mtlsctl.pki import resolve_settings

    result = restore(backup_file, target, passphrase, runner)
    try:
        findings = run_doctor(resolve_settings(result.pki_dir, None, environ={}), runner or Runner())
    except MtlsError as exc:  # the files are restored; say why doctor could not look at them
        return CheckedRestore(result, [], exc.message)
    return CheckedRestore(result, findings)


def _create_file(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def _extract(tar: tarfile.TarFile, plan: _Plan, target: Path, undo: _Undo) -> RestoreResult:
    clamped: list[tuple[str, int, int]] = []
    created_root = not target.exists()
    if created_root:
        target.mkdir(mode=0o700)  # nobody else can plant anything in it while we write
        undo.paths.append(target)
    final_dir_modes: dict[tuple[str, ...], int] = {}

    def ensure_dir(rel: tuple[str, ...]) -> None:
        if not rel:
            return
        ensure_dir(rel[:-1])
        path = target.joinpath(*rel)
        if rel not in final_dir_modes:
            path.mkdir(mode=0o700)
            undo.paths.append(path)
            final_dir_modes[rel] = clamp_mode(rel, True, 0o755)

    for rel, m in sorted(plan.dirs, key=lambda d: len(d[0])):
        ensure_dir(rel)
        mode = clamp_mode(rel, True, m.mode)
        final_dir_modes[rel] = mode
        if mode != m.mode & 0o7777:
            clamped.append((_show(rel) + "/", m.mode & 0o7777, mode))
    count = 0
    for rel, m in sorted(plan.files, key=lambda f: f[0]):
        ensure_dir(rel[:-1])
        source = tar.extractfile(m)
        assert source is not None
        mode = clamp_mode(rel, False, m.mode)
        if mode != m.mode & 0o7777:
            clamped.append((_show(rel), m.mode & 0o7777, mode))
        dest = target.joinpath(*rel)
        undo.paths.append(dest)
        _create_file(dest, source.read(), mode)
        count += 1
    repointed, warnings = _repoint(target)
    for rel in sorted(final_dir_modes, key=len, reverse=True):
        if rel or created_root:
            _chmod_dir(target.joinpath(*rel), final_dir_modes[rel])
    if created_root and () not in final_dir_modes:
        _chmod_dir(target, MODE_PUBLIC_DIR)
    fsync_dir(target)
    return RestoreResult(target, count, clamped, plan.skipped, repointed, warnings)


def _chmod_dir(path: Path, mode: int) -> None:
    """chmod a directory restore created, never through a link swapped in meanwhile (O_NOFOLLOW|O_DIRECTORY,
    then fchmod: Linux has no lchmod)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise InputError(f"{path} is no longer the directory restore created (a link or file was swapped in): "
                             "refused, what restore wrote was removed", hint="restore into a directory only you can write") from None
        raise
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


_DIR_LINE = re.compile(r"^(?P<lead>\s*dir\s*=\s*)(?P<value>[^#\n]*?)(?P<tail>\s*(#.*)?)$")
_SECTION_LINE = re.compile(r"^\s*\[\s*([^\]\s]+)\s*\]")
# openssl.cnf directives that load code or other files: restore does not judge them, it says so.
_LOADS = re.compile(r"^\s*(\.include|\.pragma|openssl_conf|dynamic_path|module|engines|providers)\b", re.M)


def repoint_cnf(text: str, target: Path) -> tuple[str, list[str]]:
    """Every `dir =` line (each section: [CA_default], [root_ca], ...) set to `target`; what was changed."""
    out, changed, section = [], [], ""
    for line in text.split("\n"):
        head = _SECTION_LINE.match(line)
        if head:
            section = head.group(1)
        m = _DIR_LINE.match(line)
        if m:
            if m.group("value") != str(target):
                changed.append(f"openssl.cnf [{section or 'top'}] dir ({m.group('value') or 'empty'} -> {target})")
            line = f"{m.group('lead')}{target}{m.group('tail')}"
        out.append(line)
    return "\n".join(out), changed


def _repoint(target: Path) -> tuple[list[str], list[str]]:
    """openssl.cnf's `dir` (every section) and mtls.yaml's `pki_dir` name the old place: point them here."""
    repointed: list[str] = []
    warnings: list[str] = []
    cnf = target / "openssl.cnf"
    if cnf.exists():
        text = cnf.read_text(encoding="utf-8", errors="replace")
        new, changed = repoint_cnf(text, target)
        if changed:
            atomic_write(cnf, new, stat.S_IMODE(cnf.stat().st_mode))
            repointed += changed
        for m in _LOADS.finditer(new):
            warnings.append(f"openssl.cnf has `{m.group(1)}`: it makes openssl load other files or code; check it")
    prof = target / PROFILE_NAME
    if prof.exists():
        text = prof.read_text(encoding="utf-8", errors="replace")
        new, why = repoint_profile(text, target)
        if why:
            warnings.append(f"{PROFILE_NAME}: {why}; its pki_dir was not re-pointed")
        elif new != text:
            atomic_write(prof, new, stat.S_IMODE(prof.stat().st_mode))
            repointed.append(f"{PROFILE_NAME} pki_dir -> {target}")
    return repointed, warnings


# A top-level `pki_dir:` line, the key bare or quoted, with whatever value (plain, quoted) and comment.
_PKI_DIR_LINE = re.compile(r"""^(?:pki_dir|"pki_dir"|'pki_dir')[ \t]*:(?:[ \t].*)?$""", re.M)


def repoint_profile(text: str, target: Path) -> tuple[str, str]:
    """mtls.yaml with its `pki_dir` set to `target` (the text unchanged when it has none), and why it could
    not be (or ""). The line is replaced in place (comments kept) when that gives exactly the same mapping
    with the new pki_dir; otherwise (flow style, a value over several lines) the mapping is written again with
    mtlsctl's own dumper (dump_profile's)."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return text, "not valid YAML"
    if data is None:
        return text, ""
    if not isinstance(data, dict):
        return text, "not a mapping"
    if "pki_dir" not in data:
        return text, ""
    wanted = {**data, "pki_dir": str(target)}
    line = yaml.safe_dump({"pki_dir": str(target)}, default_flow_style=False).strip()
    new, n = _PKI_DIR_LINE.subn(lambda _m: line, text)
    if n == 1:
        try:
            if yaml.safe_load(new) == wanted:
                return new, ""
        except yaml.YAMLError:
            pass
    header = "# mtlsctl site profile (pki_dir re-pointed by mtlsctl restore; see docs/profile.md)\n"
    return header + yaml.safe_dump(wanted, sort_keys=False, default_flow_style=False), ""
