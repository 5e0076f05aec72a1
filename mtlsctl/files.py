"""File safety: umask, modes, atomic writes, the PKI lock, and rollback of what a run created."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mtlsctl.errors import LockError

PRIVATE_UMASK = 0o077

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
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def produce(tx: Transaction, path: Path, mode: int, step: Callable[[], object]) -> None:
    """Run a step that writes `path` (an openssl command), remember the file for rollback, set its mode."""
    tx.may_create(path)
    step()
    os.chmod(path, mode)


class Transaction:
    """What one run created or changed, so that a failure removes/restores it.

    - `created(p)`: a file or directory this run made (removed on rollback, newest first);
    - `may_create(p)`: a file a command might make (removed on rollback if it appears);
    - `snapshot(p)`: a file whose bytes (or absence) are restored on rollback;
    - `checkpoint()`: everything so far is kept, even if a later step fails.
    """

    def __init__(self) -> None:
        self._created: list[Path] = []
        self._snapshots: dict[Path, tuple[bytes, int] | None] = {}

    def created(self, path: Path) -> None:
        self._created.append(path)

    def may_create(self, path: Path) -> None:
        if not path.exists():
            self._created.append(path)

    def snapshot(self, path: Path) -> None:
        if path not in self._snapshots:
            self._snapshots[path] = (path.read_bytes(), path.stat().st_mode & 0o7777) if path.exists() else None

    def checkpoint(self) -> None:
        self._created.clear()
        self._snapshots.clear()

    def rollback(self) -> None:
        for path, saved in self._snapshots.items():
            if saved is None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            else:
                atomic_write(path, saved[0], mode=saved[1])
        for path in reversed(self._created):
            with contextlib.suppress(FileNotFoundError, OSError):
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                else:
                    path.unlink()
        self.checkpoint()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.rollback()
