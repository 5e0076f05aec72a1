"""File safety: umask, modes, files created (never followed), the PKI lock, and the journal that rolls back
what an interrupted run created.

Three rules, kept here so that no caller can forget them:

- **Created, never followed.** Every file mtlsctl writes is created with O_CREAT|O_EXCL|O_NOFOLLOW (or as an
  unpredictable mkstemp name in the target directory, then renamed). A symbolic link where mtlsctl is about
  to write (its own file, or a file openssl will write) is refused by name, before anything runs.
- **One writer, readers shared.** Writers hold an exclusive flock on `<pki>/.mtlsctl.lock`, readers a shared
  one (so that nobody reads index.txt while `openssl ca` replaces it by two renames). A transaction's
  rollback runs before the lock is released.
- **The journal trusts nothing beyond the PKI.** `<pki>/.mtlsctl.journal/journal.json` names paths
  relative to the PKI only; on load every path, mode, blob and type is checked, and a journal that fails
  any check is left alone for a person (`mtlsctl recover`): writers refuse to run, readers warn. A
  transaction commits in one step: what it produced (openssl's outputs too) and their directories are
  fsynced, then journal.json is removed (the commit point), then the rest of the journal directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from mtlsctl.errors import InputError, LockError, StateError

PRIVATE_UMASK = 0o077

# Descriptors of PKI locks this process holds. runner.py hands them to every child (pass_fds): the lock
# belongs to the open file, so an openssl that outlives a killed mtlsctl still holds it until it exits,
# and no other mtlsctl can roll back underneath it.
HELD_LOCK_FDS: set[int] = set()
_HELD_ROOTS: dict[Path, str] = {}  # PKI root -> "exclusive" | "shared", for the locks this process holds

# Modes as the guide sets them (private/ 700, ca.key 400, keys and .p12 600); public files 644.
MODE_PRIVATE_DIR = 0o700
MODE_PUBLIC_DIR = 0o755
MODE_CA_KEY = 0o400
MODE_SECRET = 0o600
MODE_PUBLIC = 0o644

LOCK_FILE = ".mtlsctl.lock"
JOURNAL_DIR = ".mtlsctl.journal"
JOURNAL_FILE = "journal.json"
JOURNAL_VERSION = 2
JOURNAL_MAX_BYTES = 16 << 20
_BLOB_RE = re.compile(r"(?:snap|list)-[0-9]{1,9}")
_TMP_RE = r"[a-z0-9_]{8}\.tmp"  # what mkstemp (and a rollback's restore) adds after ".NAME."

log = logging.getLogger("mtlsctl")


def _crash_point(point: str, path: Path | None = None) -> None:
    """A named moment of the journal's life: `atomic-write` (a temporary file written, not yet renamed),
    `journal-written`, `commit-synced` (outputs fsynced, journal.json still there), `committed` (journal.json
    removed, the rest not yet), `recover-step` (one action of a rollback done), `recovered` (all actions done,
    journal.json still there). Does nothing; tests/test_crash_and_concurrency.py replaces it in a child
    process to SIGKILL mtlsctl exactly there."""


def set_private_umask() -> None:
    """Every file mtlsctl or its openssl children create starts private; public ones are opened up."""
    os.umask(PRIVATE_UMASK)


# --------------------------------------------------------------------------- created, never followed


def refuse_symlink(path: Path) -> None:
    """A symbolic link where mtlsctl (or the openssl it runs) is about to write: refused by name (exit 2)."""
    if os.path.islink(path):
        raise InputError(f"{path} is a symbolic link; mtlsctl never writes through one",
                         hint="remove the link (mtlsctl creates its files itself), or write somewhere else")


def create_exclusive(path: Path, mode: int) -> int:
    """Create `path` (O_CREAT|O_EXCL|O_NOFOLLOW) and return its descriptor: a symlink or any file there is refused."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError:
        refuse_symlink(path)
        raise InputError(f"{path} already exists", hint="mtlsctl never overwrites it; move it away, or pick another name") from None


def atomic_write(path: Path, data: str | bytes, mode: int = MODE_PUBLIC) -> None:
    """Write to an unpredictable temporary file in the same directory (mkstemp: O_CREAT|O_EXCL|O_NOFOLLOW),
    chmod and fsync it through its descriptor, then rename it over `path`. A symlink at `path` is refused."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    refuse_symlink(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        _crash_point("atomic-write", path)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def chmod_nofollow(path: Path, mode: int) -> None:
    """chmod without following a symlink (Linux has no lchmod: through an O_NOFOLLOW descriptor)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            refuse_symlink(path)
        raise
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def normalize_modes(root: Path, rels: tuple[str, ...], mode: int = MODE_PUBLIC) -> None:
    """openssl rewrites index.txt/serial/crlnumber under our umask 077; give them the guide's 644 back."""
    for rel in rels:
        with contextlib.suppress(FileNotFoundError):
            chmod_nofollow(root / rel, mode)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def clamp_mode(rel: str, mode: int) -> int:
    """The mode a journaled file may be restored with: never setuid/setgid/sticky, never group/other-writable;
    files in private/ at most 600."""
    mode &= 0o755
    if rel.split("/", 1)[0] == "private":
        mode &= 0o600
    return mode


# --------------------------------------------------------------------------- the lock


def _open_lock(lock_path: Path, write: bool) -> int:
    flags = (os.O_RDWR | os.O_CREAT if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(lock_path, flags, MODE_SECRET)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            refuse_symlink(lock_path)
        raise


def _acquire(fd: int, operation: int, timeout: float, root: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if time.monotonic() >= deadline:
                raise LockError(
                    f"another mtlsctl holds the lock on {root} (waited {timeout:.0f}s)",
                    hint="wait for it to finish and run the command again",
                ) from None
            time.sleep(0.05)


def holds_lock(root: Path, exclusive: bool = True) -> bool:
    """Does this process hold the PKI lock on `root` (exclusively, or at all)?"""
    held = _HELD_ROOTS.get(Path(os.path.abspath(root)))
    return held == "exclusive" if exclusive else held is not None


@contextlib.contextmanager
def pki_lock(lock_path: Path, timeout: float = 120.0, *, recover_journal: bool = True) -> Iterator[None]:
    """Hold an exclusive flock on the PKI (openssl ca has no locking of its own: FIELD-NOTES).

    Waits up to `timeout` seconds for another mtlsctl (a cron renew, say) to finish. A journal left by a
    run that died is rolled back first; one that cannot be trusted raises JournalError (writers are
    blocked until `mtlsctl recover`). If the block fails, every transaction of this process on this PKI
    is rolled back BEFORE the lock is released.
    """
    root = Path(os.path.abspath(lock_path.parent))
    fd = _open_lock(lock_path, write=True)
    try:
        _acquire(fd, fcntl.LOCK_EX, timeout, root)
        HELD_LOCK_FDS.add(fd)
        _HELD_ROOTS[root] = "exclusive"
        if recover_journal:
            recover(root)  # a run killed while holding this lock left its journal behind
        from mtlsctl.pki import Pki

        Pki(root).require_own_config()  # every writer: openssl must work on THIS directory
        try:
            yield
        except BaseException:
            _rollback_open(root)
            raise
    finally:
        _HELD_ROOTS.pop(root, None)
        HELD_LOCK_FDS.discard(fd)
        os.close(fd)  # closing the descriptor releases the lock


def _open_read_lock(root: Path) -> int | None:
    """The lock file for a reader; created when missing in a PKI; None when it cannot be opened (a directory
    that is no PKI, a user who may not write it): the read then goes on without the lock."""
    lock = root / LOCK_FILE
    try:
        return _open_lock(lock, write=False)
    except FileNotFoundError:
        if not (root / "index.txt").exists():
            return None
    except PermissionError:
        return None
    try:
        return os.open(lock, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, MODE_SECRET)
    except OSError:
        return None


@contextlib.contextmanager
def read_lock(root: Path, timeout: float = 120.0, *, writer: bool = False) -> Iterator[None]:
    """Readers (list, verify, doctor) hold a SHARED flock: no writer runs meanwhile, so index.txt is never read
    between the two renames by which `openssl ca` replaces it. (Writers use it for their first checks.)

    A journal found under it belongs to a run that died: it is rolled back first (the lock is held
    exclusively for that moment). One that cannot be trusted is reported as a warning and the read goes
    on; for a writer's first checks (`writer`) it is the JournalError that stops the command.
    """
    root = Path(os.path.abspath(root))
    if root in _HELD_ROOTS:  # this process holds the lock already
        yield
        return
    fd = _open_read_lock(root)
    if fd is None:
        yield
        return
    try:
        _acquire(fd, fcntl.LOCK_SH, timeout, root)
        HELD_LOCK_FDS.add(fd)
        _HELD_ROOTS[root] = "shared"
        if os.path.lexists(root / JOURNAL_DIR):
            _acquire(fd, fcntl.LOCK_EX, timeout, root)
            _HELD_ROOTS[root] = "exclusive"
            try:
                recover(root)
            except JournalError as exc:
                if writer:
                    raise
                log.warning("%s; commands that change the PKI refuse to run until `mtlsctl recover` (this one only reads)",
                            exc.summary)
            except OSError as exc:
                log.warning("the journal of an interrupted run in %s was not rolled back: %s (run mtlsctl as the PKI's owner)",
                            root / JOURNAL_DIR, exc.strerror or exc)
            finally:
                _HELD_ROOTS[root] = "shared"
                fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        _HELD_ROOTS.pop(root, None)
        HELD_LOCK_FDS.discard(fd)
        os.close(fd)


def recover_if_needed(root: Path) -> None:
    """Before a command works on the PKI: a journal left by a run that died is rolled back now, if no other
    mtlsctl holds the lock. A running writer's journal is its own: readers wait on their shared lock,
    writers on the exclusive one, and each of those rolls back whatever is left (or refuses a journal that
    cannot be trusted: writers with an error, readers with a warning)."""
    root = Path(os.path.abspath(root))
    if root in _HELD_ROOTS or not os.path.lexists(root / JOURNAL_DIR):
        return
    try:
        fd = _open_lock(root / LOCK_FILE, write=False)
    except (OSError, InputError):
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # a writer is running (or an openssl it started): not ours to touch
        HELD_LOCK_FDS.add(fd)
        _HELD_ROOTS[root] = "exclusive"
        with contextlib.suppress(JournalError, OSError):
            recover(root)
    finally:
        _HELD_ROOTS.pop(root, None)
        HELD_LOCK_FDS.discard(fd)
        os.close(fd)


def produce(tx: Transaction, path: Path, mode: int, step: Callable[[], object]) -> None:
    """Run a step that writes `path` (an openssl command). mtlsctl creates the file first, empty
    (O_CREAT|O_EXCL|O_NOFOLLOW, journaled): a symlink or any file there is refused by name before openssl
    runs, and openssl writes into the file mtlsctl made. Then the file gets `mode`."""
    if os.path.lexists(path):
        os.close(create_exclusive(path, mode))  # refuses: a symlink by name, any other file as existing
    tx.created(path)
    os.close(create_exclusive(path, mode & MODE_SECRET))
    step()
    chmod_nofollow(path, mode)


# --------------------------------------------------------------------------- the journal


class JournalError(StateError):
    """The journal an interrupted run left cannot be trusted: nothing is done with it, writers refuse to run."""

    def __init__(self, root: Path, reason: str) -> None:
        self.root = root
        self.reason = reason
        self.summary = f"the journal of an interrupted run in {root / JOURNAL_DIR} cannot be trusted ({reason})"
        super().__init__(
            f"{self.summary}; nothing was changed",
            hint="see what it names with `mtlsctl recover --dry-run`; drop it with `mtlsctl recover --discard`, "
                 "then check the PKI with `mtlsctl doctor`",
        )


class _Bad(Exception):
    """One reason a journal is not trusted (becomes JournalError)."""


_ACTIVE_JOURNALS: set[Path] = set()  # journals of transactions still open in this process
_OPEN: list[Transaction] = []  # transactions inside their `with` block, oldest first


def _rollback_open(root: Path) -> None:
    """The lock on `root` is about to be released by a failure: roll back what is still open under it."""
    for tx in reversed([t for t in _OPEN if t.root == root]):
        try:
            tx.rollback()
        except Exception as exc:  # noqa: BLE001 - the failure that got us here is the one to report
            log.warning("the rollback of %s failed: %s; run `mtlsctl recover`", root, exc)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_rel(value: object, what: str) -> str:
    """A path the journal names: a plain relative path inside the PKI, nothing else."""
    if not isinstance(value, str) or not value:
        raise _Bad(f"{what} {_short(value)} is not a path")
    if "\x00" in value or "\\" in value:
        raise _Bad(f"{what} {_short(value)} holds a NUL or a backslash")
    pure = PurePosixPath(value)
    if pure.is_absolute():
        raise _Bad(f"{what} {_short(value)} is an absolute path (outside the PKI)")
    if ".." in pure.parts:
        raise _Bad(f"{what} {_short(value)} goes up with '..' (outside the PKI)")
    if str(pure) != value or not pure.parts or pure.parts[0] == JOURNAL_DIR:
        raise _Bad(f"{what} {_short(value)} is not a plain relative path inside the PKI")
    return value


def _check_components(root_fd: int, rel: str, what: str) -> None:
    """No component of `rel` (the last one included) may be a symbolic link; missing ones are fine."""
    parts = rel.split("/")
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            try:
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return
            except NotADirectoryError:
                raise _Bad(f"{what} {rel!r} goes through {'/'.join(parts[:i])!r}, which is not a directory") from None
            if stat.S_ISLNK(st.st_mode):
                raise _Bad(f"{what} {rel!r} goes through the symbolic link {'/'.join(parts[:i + 1])!r}")
            if i < len(parts) - 1:
                if not stat.S_ISDIR(st.st_mode):
                    raise _Bad(f"{what} {rel!r} goes through {'/'.join(parts[:i + 1])!r}, which is not a directory")
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nfd
    finally:
        os.close(fd)


def _mode_problem(rel: str, mode: int) -> str | None:
    if mode & 0o7000:
        return f"asks to restore {rel!r} with the mode {mode:o} (setuid/setgid/sticky)"
    if mode & 0o022:
        return f"asks to restore {rel!r} with the mode {mode:o} (writable by group or others)"
    if mode != clamp_mode(rel, mode):
        return f"asks to restore {rel!r} with the mode {mode:o} (a file in private/ is at most 600)"
    return None


def _read_regular(dir_fd: int, name: str, limit: int) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Bad(f"{name} is not a regular file")
        if st.st_size > limit:
            raise _Bad(f"{name} is larger than {limit >> 20} MiB")
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise _Bad(f"{name} is larger than {limit >> 20} MiB")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class JournalView:
    """What a journal in a PKI asks for (`mtlsctl recover` shows it)."""

    state: str  # none | committed | sound | damaged
    path: Path
    reason: str = ""
    pid: int | None = None
    remove: list[str] = field(default_factory=list)  # created by the run, still there: removed on rollback
    restore: list[str] = field(default_factory=list)  # changed by the run: put back (or removed, if it was new)
    new_files: list[str] = field(default_factory=list)  # appeared in a watched directory (newcerts/): removed

    def to_json(self) -> dict[str, object]:
        return {"state": self.state, "journal": str(self.path), "reason": self.reason or None, "pid": self.pid,
                "remove": self.remove, "restore": self.restore, "new_files": self.new_files}


class Transaction:
    """What one run created or changed, so that a failure removes/restores it.

    - `created(p)`: a file or directory this run made (removed on rollback, newest first);
    - `may_create(p)`: a file a command might make (removed on rollback if it appears);
    - `snapshot(p)`: a file whose bytes (or absence) are restored on rollback;
    - `snapshot_listing(d)`: a directory (newcerts/) in which any file that appears is removed on rollback;
    - `checkpoint()`: commit: everything so far is kept, even if a later step fails.

    With a `root`, the record of what lies inside the PKI is kept on disk in <root>/.mtlsctl.journal/
    (paths relative to the PKI, fsynced before each step it protects, written only while this process
    holds the PKI lock), so that a run killed with SIGKILL or a power cut is rolled back by the next
    mtlsctl command, under the lock (`recover`). Paths outside the PKI (export --out, the parents `init`
    creates) are kept in memory only. Leaving the `with` block normally commits.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(os.path.abspath(root)) if root is not None else None
        self._journal = self.root / JOURNAL_DIR if self.root is not None else None
        self._created: list[Path] = []
        self._snapshots: dict[Path, tuple[bytes, int] | None] = {}
        self._where: dict[Path, dict[str, object]] = {}
        self._listings: dict[Path, frozenset[str]] = {}
        self._listing_blobs: dict[Path, str] = {}
        self._touched: dict[Path, None] = {}  # what to fsync at commit (an ordered set)
        self._blob_count = 0
        self._on_disk = False
        self._pid: int | None = os.getpid()

    # -- paths

    def _rel(self, path: Path) -> str | None:
        """`path` relative to the PKI root; None when it is not strictly inside it (kept in memory only)."""
        if self.root is None:
            return None
        rel = os.path.relpath(os.path.abspath(path), self.root)
        pure = PurePosixPath(rel)
        if rel in ("", ".") or pure.is_absolute() or ".." in pure.parts:
            return None
        return rel

    def _touch(self, *paths: Path) -> None:
        for path in paths:
            self._touched[path] = None

    # -- recording

    def created(self, *paths: Path) -> None:
        self._created.extend(paths)
        self._touch(*paths)
        self._persist()

    def may_create(self, *paths: Path) -> None:
        """Files a command (openssl) is about to write: a symlink at any of them is refused by name first."""
        for path in paths:
            refuse_symlink(path)
        if self._record_may_create(paths):
            self._persist()

    def _record_may_create(self, paths: tuple[Path, ...]) -> bool:
        new = [p for p in paths if not os.path.lexists(p)]
        self._created.extend(new)
        self._touch(*new)
        return bool(new)

    def snapshot(self, *paths: Path) -> None:
        """Remember these files' bytes (or absence) for rollback: one journal write for the whole set."""
        if self._record_snapshots(paths):
            self._persist()

    def _record_snapshots(self, paths: tuple[Path, ...]) -> bool:
        new = [p for p in paths if p not in self._snapshots]
        for path in new:
            refuse_symlink(path)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                self._snapshots[path] = None
                continue
            with os.fdopen(fd, "rb") as fh:
                mode = os.fstat(fh.fileno()).st_mode & 0o7777
                self._snapshots[path] = (fh.read(), clamp_mode(self._rel(path) or path.name, mode))
        self._touch(*new)
        return bool(new)

    def snapshot_listing(self, directory: Path) -> None:
        """Remember the names in `directory` (newcerts/ before `openssl ca`): any file that appears there
        during this transaction is removed on rollback, whatever its name (FIELD-NOTES: `00FF` -> FF.pem)."""
        if self._record_listing(directory):
            self._persist()

    def _record_listing(self, directory: Path) -> bool:
        if directory in self._listings:
            return False
        try:
            self._listings[directory] = frozenset(os.listdir(directory))
        except FileNotFoundError:
            self._listings[directory] = frozenset()
        return True

    def _persist(self) -> None:
        """Write the journal (fsynced) before the step it protects runs. Snapshot contents and listings go to
        blob files (one per call); journal.json says where each one is. Only with the PKI lock held: what is
        recorded before (init records the lock file it creates) is written with the first record after."""
        if self._journal is None or self.root is None or not holds_lock(self.root):
            return
        if not self._on_disk:
            self._open_journal()
        pending = [p for p, saved in self._snapshots.items()
                   if saved is not None and p not in self._where and self._rel(p) is not None]
        if pending:
            blob, offset, parts = self._next_blob("snap"), 0, []
            for path in pending:
                data, mode = self._snapshots[path]  # type: ignore[misc]
                self._where[path] = {"file": blob, "offset": offset, "length": len(data), "mode": mode}
                parts.append(data)
                offset += len(data)
            atomic_write(self._journal / blob, b"".join(parts), MODE_SECRET)
        for directory, names in self._listings.items():
            if directory not in self._listing_blobs and self._rel(directory) is not None:
                blob = self._next_blob("list")
                atomic_write(self._journal / blob, "\n".join(sorted(names)).encode(errors="surrogateescape"), MODE_SECRET)
                self._listing_blobs[directory] = blob
        record = {
            "version": JOURNAL_VERSION,
            "pid": self._pid,
            "created": [rel for p in self._created if (rel := self._rel(p)) is not None],
            "snapshots": {rel: (None if saved is None else self._where[p])
                          for p, saved in self._snapshots.items() if (rel := self._rel(p)) is not None},
            "listings": {rel: blob for d, blob in self._listing_blobs.items() if (rel := self._rel(d)) is not None},
        }
        atomic_write(self._journal / JOURNAL_FILE, json.dumps(record), MODE_SECRET)
        _crash_point("journal-written", self._journal / JOURNAL_FILE)

    def _next_blob(self, kind: str) -> str:
        self._blob_count += 1
        return f"{kind}-{self._blob_count}"

    def _open_journal(self) -> None:
        journal = self._journal
        assert journal is not None and self.root is not None
        if os.path.lexists(journal) and journal not in _ACTIVE_JOURNALS:
            if os.path.islink(journal) or os.path.lexists(journal / JOURNAL_FILE):
                # never overwrite a journal this run did not write (pki_lock refused or rolled it back already)
                raise JournalError(self.root, "another run's journal is still there")
            _remove_journal_dir(journal)  # a committed run's leftovers
        if not os.path.lexists(journal):
            os.mkdir(journal, MODE_PRIVATE_DIR)
        _ACTIVE_JOURNALS.add(journal)
        self._on_disk = True

    def keep(self, paths: list[Path]) -> None:
        """One step of a batch is done: keep its files and its database change, still guard the rest."""
        kept = set(paths)
        self._created = [p for p in self._created if p not in kept]
        self._snapshots.clear()
        self._where.clear()
        self._listings.clear()
        self._listing_blobs.clear()
        self._persist()

    # -- outcomes

    def _appeared(self) -> list[Path]:
        out = []
        for directory, before in self._listings.items():
            with contextlib.suppress(OSError):
                out += [directory / name for name in os.listdir(directory) if name not in before]
        return out

    def _clear(self) -> None:
        self._created.clear()
        self._snapshots.clear()
        self._where.clear()
        self._listings.clear()
        self._listing_blobs.clear()
        self._touched.clear()

    def checkpoint(self) -> None:
        """Commit, in one step: fsync what this run produced (openssl's outputs too: certificates, newcerts/,
        index.txt, the CRL) and their directories, then remove journal.json (the commit point), then the rest."""
        produced = [p for p in self._touched if os.path.lexists(p)] + self._appeared()
        for path in produced:
            _fsync_file(path)
        for directory in {p.parent for p in produced}:
            fsync_dir(directory)
        self._clear()
        if self._on_disk:
            _crash_point("commit-synced", self._journal)
            self._drop_journal()

    def _drop_journal(self) -> None:
        journal = self._journal
        assert journal is not None and self.root is not None
        try:
            dfd = os.open(journal, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            dfd = None
        if dfd is not None:
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(JOURNAL_FILE, dir_fd=dfd)
                os.fsync(dfd)
            finally:
                os.close(dfd)
            _crash_point("committed", journal)
            _remove_journal_dir(journal)
            fsync_dir(self.root)
        _ACTIVE_JOURNALS.discard(journal)
        self._on_disk = False

    # rollback: every path inside the PKI is reached from the PKI root through directory descriptors opened
    # with O_NOFOLLOW, so a symlink swapped in anywhere cannot send a removal or a restore elsewhere.

    def _parent(self, path: Path) -> tuple[int, str] | None:
        rel = self._rel(path)
        if rel is None:  # outside the PKI: recorded in memory by this very process
            try:
                return os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY), path.name
            except FileNotFoundError:
                return None
        assert self.root is not None
        parts = rel.split("/")
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts[:-1]:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except FileNotFoundError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd, parts[-1]

    def _restore(self, path: Path, data: bytes, mode: int) -> None:
        where = self._parent(path)
        if where is None:
            return
        dfd, name = where
        try:
            tmp = f".{name}.{secrets.token_hex(4)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, MODE_SECRET, dir_fd=dfd)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fchmod(fh.fileno(), mode)
                    os.fsync(fh.fileno())
                os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _remove(self, path: Path) -> bool:
        """Remove a file (not following a link); True when `path` is a directory (removed later, if empty)."""
        where = self._parent(path)
        if where is None:
            return False
        dfd, name = where
        try:
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            if stat.S_ISDIR(st.st_mode):
                return True
            os.unlink(name, dir_fd=dfd)
            return False
        finally:
            os.close(dfd)

    def _rmdir(self, path: Path) -> None:
        where = self._parent(path)
        if where is not None:
            dfd, name = where
            try:
                with contextlib.suppress(OSError):
                    os.rmdir(name, dir_fd=dfd)
            finally:
                os.close(dfd)

    def _remove_new_files(self, directory: Path, before: frozenset[str]) -> None:
        where = self._parent(directory)
        if where is None:
            return
        pfd, name = where
        try:
            try:
                dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=pfd)
            except FileNotFoundError:
                return
        finally:
            os.close(pfd)
        try:
            for entry in os.listdir(dfd):
                if entry in before:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if not stat.S_ISDIR(os.stat(entry, dir_fd=dfd, follow_symlinks=False).st_mode):
                        os.unlink(entry, dir_fd=dfd)
                        _crash_point("recover-step", directory / entry)
        finally:
            os.close(dfd)

    def _sweep_temporaries(self, paths: list[Path]) -> None:
        """Temporary files an atomic write of a journaled path left when killed (.NAME.XXXXXXXX.tmp)."""
        by_dir: dict[Path, set[str]] = {}
        for path in paths:
            by_dir.setdefault(path.parent, set()).add(path.name)
        for directory, names in by_dir.items():
            pattern = re.compile("|".join(re.escape(f".{n}.") + _TMP_RE for n in sorted(names)))
            where = self._parent(directory / "x")
            if where is None:
                continue
            dfd, _ = where
            try:
                for entry in os.listdir(dfd):
                    if pattern.fullmatch(entry):
                        with contextlib.suppress(OSError):
                            os.unlink(entry, dir_fd=dfd)
            finally:
                os.close(dfd)

    def rollback(self) -> None:
        """Put back what this run changed and remove what it created (under the lock), then drop the journal.

        Idempotent: a rollback killed half-way is simply done again by the next command. Should an entry
        fail (a symlink swapped into the PKI, a permission), the journal is kept for `mtlsctl recover`."""
        failures: list[str] = []
        journaled = list(self._snapshots) + self._created
        for path, saved in self._snapshots.items():
            try:
                if saved is None:
                    self._remove(path)
                else:
                    self._restore(path, *saved)
            except OSError as exc:
                failures.append(f"{path}: {exc.strerror or exc}")
            _crash_point("recover-step", path)
        dirs = []
        for path in reversed(self._created):
            try:
                if self._remove(path):
                    dirs.append(path)
            except OSError as exc:
                failures.append(f"{path}: {exc.strerror or exc}")
            _crash_point("recover-step", path)
        for directory, before in self._listings.items():
            try:
                self._remove_new_files(directory, before)
            except OSError as exc:
                failures.append(f"{directory}: {exc.strerror or exc}")
        with contextlib.suppress(OSError):
            self._sweep_temporaries(journaled)
        _crash_point("recovered", self._journal)
        self._clear()
        if failures:
            log.warning("the rollback left %s; the journal was kept: run `mtlsctl recover`", "; ".join(failures[:3]))
            if self._journal is not None:
                _ACTIVE_JOURNALS.discard(self._journal)
            self._on_disk = False
            return
        if self._on_disk:
            self._drop_journal()  # the journal goes before the directories that hold it
        for path in dirs:
            with contextlib.suppress(OSError):
                self._rmdir(path)

    def __enter__(self) -> Transaction:
        _OPEN.append(self)
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        with contextlib.suppress(ValueError):
            _OPEN.remove(self)
        if exc_type is not None:
            self.rollback()
        else:
            self.checkpoint()

    # -- an interrupted run's journal

    def view(self) -> JournalView:
        assert self._journal is not None

        def rel(p: Path) -> str:
            return self._rel(p) or str(p)

        return JournalView(
            "sound", self._journal, pid=self._pid,
            remove=[rel(p) for p in self._created if os.path.lexists(p)],
            restore=[rel(p) for p, saved in self._snapshots.items() if saved is not None or os.path.lexists(p)],
            new_files=[rel(p) for p in self._appeared()],
        )

    @classmethod
    def load(cls, root: Path) -> Transaction | None:
        """The journal an interrupted run left in `root`, checked; None when there is none. A journal
        directory without journal.json is a committed run's leftovers: removed. Raises JournalError for a
        journal that cannot be trusted (left in place, untouched)."""
        root = Path(os.path.abspath(root))
        try:
            return _load(cls(root), root)
        except _Bad as exc:
            raise JournalError(root, str(exc)) from None
        except OSError as exc:
            raise JournalError(root, f"{exc.filename or JOURNAL_FILE}: {exc.strerror or exc}") from None


def _remove_journal_dir(journal: Path) -> None:
    if os.path.islink(journal) or not os.path.isdir(journal):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(journal)
    else:
        shutil.rmtree(journal, ignore_errors=True)


def _open_journal_dir(journal: Path) -> int | None:
    try:
        st = os.lstat(journal)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise _Bad(f"{JOURNAL_DIR} is not a directory (a symbolic link?)")
    if st.st_uid != os.geteuid():
        raise _Bad(f"{JOURNAL_DIR} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & 0o077:
        raise _Bad(f"{JOURNAL_DIR} is mode {stat.S_IMODE(st.st_mode):o}, not 700")
    return os.open(journal, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)


def _load(tx: Transaction, root: Path) -> Transaction | None:
    journal = root / JOURNAL_DIR
    jfd = _open_journal_dir(journal)
    if jfd is None:
        return None
    try:
        try:
            raw = _read_regular(jfd, JOURNAL_FILE, JOURNAL_MAX_BYTES)
        except FileNotFoundError:
            os.close(jfd)
            jfd = None
            _remove_journal_dir(journal)  # committed (or killed before its first record): nothing to undo
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _Bad(f"{JOURNAL_FILE} is a symbolic link") from None
            raise
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise _Bad(f"{JOURNAL_FILE} is not complete JSON (truncated or damaged)") from None
        _check_record(record)
        rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for rel in record["created"]:
                _check_components(rootfd, _check_rel(rel, "created"), "created")
            for rel in record["snapshots"]:
                _check_components(rootfd, _check_rel(rel, "snapshot"), "snapshot")
            for rel in record["listings"]:
                _check_components(rootfd, _check_rel(rel, "listing"), "listing")
        finally:
            os.close(rootfd)
        blobs: dict[str, bytes] = {}

        def blob(name: object) -> bytes:
            if not isinstance(name, str) or not _BLOB_RE.fullmatch(name):
                raise _Bad(f"it names the blob {_short(name)}, not one of its own files")
            if name not in blobs:
                try:
                    blobs[name] = _read_regular(jfd, name, JOURNAL_MAX_BYTES << 4)
                except FileNotFoundError:
                    raise _Bad(f"its blob {name} is missing") from None
                except OSError as exc:
                    raise _Bad(f"its blob {name} cannot be read ({exc.strerror})") from None
            return blobs[name]

        tx._pid = record["pid"]
        tx._created = [root / rel for rel in record["created"]]
        for rel, saved in record["snapshots"].items():
            if saved is None:
                tx._snapshots[root / rel] = None
                continue
            problem = _mode_problem(rel, saved["mode"])
            if problem:
                raise _Bad(problem)
            data = blob(saved["file"])
            start, length = saved["offset"], saved["length"]
            if start + length > len(data):
                raise _Bad(f"the snapshot of {rel!r} lies beyond the end of {saved['file']}")
            tx._snapshots[root / rel] = (data[start:start + length], saved["mode"])
            tx._where[root / rel] = dict(saved)
        for rel, name in record["listings"].items():
            text = blob(name).decode("utf-8", errors="surrogateescape")
            names = [n for n in text.split("\n") if n]
            for n in names:
                if n in (".", "..") or "/" in n or "\x00" in n:
                    raise _Bad(f"the listing {name} holds the name {_short(n)}")
            tx._listings[root / rel] = frozenset(names)
            tx._listing_blobs[root / rel] = name
        tx._on_disk = True
        return tx
    finally:
        if jfd is not None:
            os.close(jfd)


def _check_record(record: object) -> None:
    """Types first: a journal is an object with exactly these keys, each of exactly this shape."""
    if not isinstance(record, dict):
        raise _Bad(f"{JOURNAL_FILE} is not a JSON object")
    if record.get("version") != JOURNAL_VERSION:
        raise _Bad(f"{JOURNAL_FILE} has version {_short(record.get('version'))}, not {JOURNAL_VERSION} "
                   "(a journal of an older mtlsctl, with absolute paths, is not acted on)")
    extra = set(record) - {"version", "pid", "created", "snapshots", "listings"}
    if extra:
        raise _Bad(f"{JOURNAL_FILE} has unknown keys: {', '.join(sorted(map(str, extra)))[:80]}")
    if record.get("pid") is not None and not _is_int(record.get("pid")):
        raise _Bad(f"its pid {_short(record.get('pid'))} is not a number")
    record.setdefault("pid", None)
    if not isinstance(record.get("created"), list):
        raise _Bad(f"its 'created' is {_short(record.get('created'))}, not a list of paths")
    if not isinstance(record.get("snapshots"), dict):
        raise _Bad(f"its 'snapshots' is {_short(record.get('snapshots'))}, not an object")
    if not isinstance(record.get("listings", {}), dict):
        raise _Bad(f"its 'listings' is {_short(record.get('listings'))}, not an object")
    record.setdefault("listings", {})
    for rel, saved in record["snapshots"].items():
        if saved is None:
            continue
        if not isinstance(saved, dict) or set(saved) != {"file", "offset", "length", "mode"}:
            raise _Bad(f"the snapshot of {_short(rel)} is {_short(saved)}, not {{file, offset, length, mode}}")
        if not all(_is_int(saved[k]) and saved[k] >= 0 for k in ("offset", "length", "mode")):
            raise _Bad(f"the snapshot of {_short(rel)} has an offset, length or mode that is not a number")


def recover(root: Path) -> bool:
    """Roll back what an interrupted run left (call with the PKI lock held). True if there was one.
    Raises JournalError for a journal that cannot be trusted: it is left for a person."""
    root = Path(os.path.abspath(root))
    if root / JOURNAL_DIR in _ACTIVE_JOURNALS:
        return False  # our own open transaction, not an interrupted run
    tx = Transaction.load(root)
    if tx is None:
        return False
    view = tx.view()
    log.warning("rolled back an interrupted mtlsctl run (pid %s): removed %d new file(s), restored %d file(s)",
                tx._pid if tx._pid is not None else "?", len(view.remove) + len(view.new_files), len(view.restore))
    tx.rollback()
    return True


def inspect_journal(root: Path) -> JournalView:
    """What the journal in `root` asks for, without acting on it (for `mtlsctl recover`)."""
    root = Path(os.path.abspath(root))
    journal = root / JOURNAL_DIR
    if not os.path.lexists(journal):
        return JournalView("none", journal)
    if not os.path.lexists(journal / JOURNAL_FILE) and os.path.isdir(journal) and not os.path.islink(journal):
        return JournalView("committed", journal)
    try:
        tx = _load(Transaction(root), root)
    except _Bad as exc:
        return _damaged_view(journal, str(exc))
    except OSError as exc:
        return _damaged_view(journal, f"{exc.filename or JOURNAL_FILE}: {exc.strerror or exc}")
    if tx is None:
        return JournalView("committed", journal)
    return tx.view()


def _damaged_view(journal: Path, reason: str) -> JournalView:
    """What a journal that is not trusted names, as far as it can be read (shown, never acted on)."""
    view = JournalView("damaged", journal, reason=reason)
    with contextlib.suppress(OSError, ValueError):
        if not os.path.islink(journal / JOURNAL_FILE):
            record = json.loads((journal / JOURNAL_FILE).read_bytes()[:JOURNAL_MAX_BYTES].decode("utf-8", "replace"))
            if isinstance(record, dict):
                view.pid = record.get("pid") if _is_int(record.get("pid")) else None
                created = record.get("created")
                view.remove = [str(p)[:200] for p in created] if isinstance(created, list) else []
                snaps = record.get("snapshots")
                view.restore = [str(p)[:200] for p in snaps] if isinstance(snaps, dict) else []
    return view


def discard_journal(root: Path) -> JournalView:
    """Drop the journal without rolling anything back (`mtlsctl recover --discard`, under the lock)."""
    view = inspect_journal(root)
    journal = Path(os.path.abspath(root)) / JOURNAL_DIR
    if view.state != "none":
        _remove_journal_dir(journal)
        fsync_dir(journal.parent)
    return view


def resolve_journal(root: Path, lock_path: Path, *, discard: bool = False, dry_run: bool = False) -> tuple[JournalView, str]:
    """`mtlsctl recover`: look at the journal under the writer's lock, then act on it; (what it asks for, action).

    action: "none" (no journal, or --dry-run), "cleaned" (a committed run's leftovers removed), "rolled_back"
    (a sound journal), "discarded" (dropped without rolling back: --discard), "refused" (a journal that is not
    trusted, left for a person: the caller exits 1).
    """
    view, action = JournalView("none", root / JOURNAL_DIR), "none"
    if not root.is_dir():
        return view, action
    with pki_lock(lock_path, recover_journal=False):
        view = inspect_journal(root)
        if view.state == "none" or dry_run:
            action = "none"
        elif discard or view.state == "committed":
            discard_journal(root)
            action = "discarded" if view.state != "committed" else "cleaned"
        elif view.state == "sound":
            recover(root)
            action = "rolled_back"
        else:
            action = "refused"
    return view, action


def protect_database(root: Path, tx: Transaction, *, signs: bool = True) -> None:
    """Before an `openssl ca` run: snapshot index.txt, index.txt.attr, serial, crlnumber (and their .old),
    remember the .new files openssl writes on the way and, for a signing (`signs`), the names in newcerts/
    (any new file there is removed on rollback), so a failure or a kill restores the database. One journal
    write for all of it. `openssl ca -revoke` and `-gencrl` write nothing in newcerts/: listing its 100,000
    names before and after them would cost a tenth of a second for nothing."""
    from mtlsctl.pki import DB_FILES_WITH_BACKUPS

    news = tuple(root / rel for rel in ("index.txt.new", "index.txt.attr.new", "serial.new", "crlnumber.new"))
    for path in news:
        refuse_symlink(path)
    changed = tx._record_snapshots(tuple(root / rel for rel in DB_FILES_WITH_BACKUPS))
    changed = tx._record_may_create(news) or changed
    if signs:
        changed = tx._record_listing(root / "newcerts") or changed
    if changed:
        tx._persist()


def check_owned_dir(path: Path, what: str, *, follow: bool = False, allow_root: bool = False,
                    allow_sticky: bool = False) -> os.stat_result | None:
    """Refuse (exit 2, one line with the fix) a directory another user controls: a symbolic link (unless
    `follow`), not a directory, owned by someone other than the euid (root too with `allow_root`), or
    group/other-writable (unless sticky with `allow_sticky`: /tmp). None when `path` does not exist."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise InputError(f"{what} {path} is a symbolic link (to {os.readlink(path)}); mtlsctl never works through one",
                         hint=f"give the real directory instead of the link, or remove {path}")
    if not stat.S_ISDIR(st.st_mode):
        raise InputError(f"{what} {path} is not a directory", hint="move it away, or use another directory")
    euid = os.geteuid()
    if st.st_uid != euid and not (allow_root and st.st_uid == 0):
        raise InputError(f"{what} {path} is owned by uid {st.st_uid}, not by you (uid {euid}): its owner could swap "
                         "what mtlsctl writes or reads there", hint=f"use a directory you own, or check it and run: chown -R {euid} {path}")
    if st.st_mode & 0o022 and not (allow_sticky and st.st_mode & stat.S_ISVTX):
        raise InputError(f"{what} {path} is group/other-writable (mode {stat.S_IMODE(st.st_mode):o}): others could swap "
                         "what mtlsctl writes or reads there", hint=f"check it and run: chmod go-w {path}")
    return st
