"""File safety: umask, modes, atomic writes, the PKI lock, and rollback of what a run created."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mtlsctl.errors import LockError

PRIVATE_UMASK = 0o077

# Descriptors of PKI locks this process holds. runner.py hands them to every child (pass_fds): the lock
# belongs to the open file, so an openssl that outlives a killed mtlsctl still holds it until it exits,
# and no other mtlsctl can roll back underneath it.
HELD_LOCK_FDS: set[int] = set()

# Modes as the guide sets them (private/ 700, ca.key 400, keys and .p12 600); public files 644.
MODE_PRIVATE_DIR = 0o700
MODE_PUBLIC_DIR = 0o755
MODE_CA_KEY = 0o400
MODE_SECRET = 0o600
MODE_PUBLIC = 0o644


def set_private_umask() -> None:
    """Every file mtlsctl or its openssl children create starts private; public ones are opened up."""
    os.umask(PRIVATE_UMASK)


def atomic_write(path: Path, data: str | bytes, mode: int = MODE_PUBLIC) -> None:
    """Write to a temporary file in the same directory, fsync, chmod, then rename over `path`."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def normalize_modes(root: Path, rels: tuple[str, ...], mode: int = MODE_PUBLIC) -> None:
    """openssl rewrites index.txt/serial/crlnumber under our umask 077; give them the guide's 644 back."""
    for rel in rels:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(root / rel, mode)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def pki_lock(lock_path: Path, timeout: float = 120.0) -> Iterator[None]:
    """Hold an exclusive flock on the PKI (openssl ca has no locking of its own: FIELD-NOTES).

    Waits up to `timeout` seconds for another mtlsctl (a cron renew, say) to finish.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, MODE_SECRET)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise LockError(
                        f"another mtlsctl holds the lock on {lock_path.parent} (waited {timeout:.0f}s)",
                        hint="wait for it to finish and run the command again",
                    ) from None
                time.sleep(0.05)
        HELD_LOCK_FDS.add(fd)
        recover(lock_path.parent)  # a run killed while holding this lock left its journal behind
        yield
    finally:
        HELD_LOCK_FDS.discard(fd)
        os.close(fd)  # closing the descriptor releases the lock


def produce(tx: Transaction, path: Path, mode: int, step: Callable[[], object]) -> None:
    """Run a step that writes `path` (an openssl command), remember the file for rollback, set its mode."""
    tx.may_create(path)
    step()
    os.chmod(path, mode)


JOURNAL_DIR = ".mtlsctl.journal"
log = logging.getLogger("mtlsctl")
_ACTIVE_JOURNALS: set[Path] = set()  # journals of transactions still open in this process


class Transaction:
    """What one run created or changed, so that a failure removes/restores it.

    - `created(p)`: a file or directory this run made (removed on rollback, newest first);
    - `may_create(p)`: a file a command might make (removed on rollback if it appears);
    - `snapshot(p)`: a file whose bytes (or absence) are restored on rollback;
    - `checkpoint()`: everything so far is kept, even if a later step fails.

    With a `root`, the same record is kept on disk in <root>/.mtlsctl.journal/ (fsynced before each
    step it protects), so that a run killed with SIGKILL or a power cut is rolled back by the next
    mtlsctl command, under the lock (`recover`). Leaving the `with` block normally commits.
    """

    def __init__(self, root: Path | None = None) -> None:
        self._created: list[Path] = []
        self._snapshots: dict[Path, tuple[bytes, int] | None] = {}
        self._where: dict[Path, dict[str, object]] = {}
        self._blobs: list[str] = []
        self._journal = root / JOURNAL_DIR if root is not None else None

    # -- recording

    def created(self, path: Path) -> None:
        self._created.append(path)
        self._persist()

    def may_create(self, *paths: Path) -> None:
        new = [p for p in paths if not p.exists()]
        if new:
            self._created.extend(new)
            self._persist()

    def snapshot(self, *paths: Path) -> None:
        """Remember these files' bytes (or absence) for rollback: one journal write for the whole set."""
        new = [p for p in paths if p not in self._snapshots]
        for path in new:
            self._snapshots[path] = (path.read_bytes(), path.stat().st_mode & 0o7777) if path.exists() else None
        if new:
            self._persist(new_snapshots=new)

    def _persist(self, new_snapshots: list[Path] | None = None) -> None:
        """Write the journal (fsynced) before the step it protects runs. New snapshot contents go into
        one blob file per call; journal.json says where each one is."""
        if self._journal is None:
            return
        if not self._journal.exists():
            self._journal.mkdir(mode=0o700)
        _ACTIVE_JOURNALS.add(self._journal)
        if new_snapshots:
            blob_name = f"snap-{len(self._blobs)}"
            offset, parts = 0, []
            for path in new_snapshots:
                saved = self._snapshots[path]
                if saved is None:
                    continue
                self._where[path] = {"file": blob_name, "offset": offset, "length": len(saved[0]), "mode": saved[1]}
                parts.append(saved[0])
                offset += len(saved[0])
            self._blobs.append(blob_name)
            atomic_write(self._journal / blob_name, b"".join(parts), MODE_SECRET)
        names = {str(path): (None if saved is None else self._where[path]) for path, saved in self._snapshots.items()}
        record = {"pid": os.getpid(), "created": [str(p) for p in self._created], "snapshots": names}
        atomic_write(self._journal / "journal.json", json.dumps(record), MODE_SECRET)

    def keep(self, paths: list[Path]) -> None:
        """One step of a batch is done: keep its files and its database change, still guard the rest."""
        kept = set(paths)
        self._created = [p for p in self._created if p not in kept]
        self._snapshots.clear()
        self._where.clear()
        self._persist()

    # -- outcomes

    def checkpoint(self) -> None:
        self._created.clear()
        self._snapshots.clear()
        self._where.clear()
        self._blobs.clear()
        if self._journal is not None:
            _ACTIVE_JOURNALS.discard(self._journal)
            if self._journal.exists():
                shutil.rmtree(self._journal, ignore_errors=True)
                fsync_dir(self._journal.parent)

    def rollback(self) -> None:
        for path, saved in self._snapshots.items():
            if saved is None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            else:
                atomic_write(path, saved[0], mode=saved[1])
        dirs = []
        for path in reversed(self._created):
            with contextlib.suppress(FileNotFoundError, OSError):
                if path.is_dir() and not path.is_symlink():
                    dirs.append(path)
                else:
                    path.unlink()
        self.checkpoint()  # the journal goes before the directories that hold it
        for path in dirs:
            with contextlib.suppress(FileNotFoundError, OSError):
                path.rmdir()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.rollback()
        else:
            self.checkpoint()

    @classmethod
    def load(cls, root: Path) -> Transaction | None:
        """The journal an interrupted run left in `root`, or None."""
        journal = root / JOURNAL_DIR
        try:
            record = json.loads((journal / "journal.json").read_text())
        except FileNotFoundError:
            if journal.exists():  # killed before its first record was complete: nothing to undo
                shutil.rmtree(journal, ignore_errors=True)
            return None
        except (OSError, ValueError):
            log.warning("the journal in %s is unreadable; it was left in place for inspection", journal)
            return None
        tx = cls(root)
        tx._created = [Path(p) for p in record.get("created", [])]
        blobs: dict[str, bytes] = {}
        for path, saved in record.get("snapshots", {}).items():
            if saved is None:
                tx._snapshots[Path(path)] = None
                continue
            if saved["file"] not in blobs:
                blobs[saved["file"]] = (journal / saved["file"]).read_bytes()
            start = int(saved["offset"])
            tx._snapshots[Path(path)] = (blobs[saved["file"]][start:start + int(saved["length"])], int(saved["mode"]))
        tx._pid = record.get("pid")
        return tx


def recover(root: Path) -> bool:
    """Roll back what an interrupted run left (call with the PKI lock held). True if there was one."""
    if root / JOURNAL_DIR in _ACTIVE_JOURNALS:
        return False  # our own open transaction, not an interrupted run
    tx = Transaction.load(root)
    if tx is None:
        return False
    log.warning("rolled back an interrupted mtlsctl run (pid %s): removed %d new file(s), restored %d file(s)",
                getattr(tx, "_pid", "?"), sum(1 for p in tx._created if p.exists()), sum(1 for v in tx._snapshots.values() if v))
    tx.rollback()
    return True


def recover_if_needed(root: Path) -> None:
    """Before any command reads the PKI: if an interrupted run left a journal, take the lock and roll it back."""
    if (root / JOURNAL_DIR).exists():
        with pki_lock(root / ".mtlsctl.lock"):
            pass  # pki_lock recovers


def protect_database(root: Path, tx: Transaction) -> None:
    """Before an `openssl ca` run: snapshot index.txt, index.txt.attr, serial, crlnumber (and their .old),
    and remember the .new files openssl writes on the way, so a failure or a kill restores the database."""
    from mtlsctl.pki import DB_FILES_WITH_BACKUPS

    tx.snapshot(*(root / rel for rel in DB_FILES_WITH_BACKUPS))
    tx.may_create(*(root / rel for rel in ("index.txt.new", "index.txt.attr.new", "serial.new", "crlnumber.new")))
