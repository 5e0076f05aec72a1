"""A per-user cache of what mtlsctl derives from a file (the validated profile), keyed by the file's content.

mtlsctl runs from cron and shell loops; validating the same `mtls.yaml` on every run costs more than the
command itself (YAML, then pydantic building and running its validators). An entry here is only ever a
cache of a file that was just read and hashed again:

- **Keyed by content.** The key is a SHA-256 over the exact bytes read and everything else that decides the
  result (the deriving code's own source files, the versions of what it runs on). Different bytes, or another
  mtlsctl, miss. Nothing is keyed by path or modification time.
- **Trusted by nobody else.** The directory is `$MTLSCTL_CACHE_DIR`, else `$XDG_CACHE_HOME/mtlsctl`, else
  `~/.cache/mtlsctl` — the running user's own, never the PKI directory (a reader may not write there, and a
  backup or a tree comparison must not see it). It is used only when it is a real directory (not a link),
  owned by this user and closed to others (0700); an entry only when it is a regular file owned by this user
  with no access for others (0600). Entries are created exclusively under an unpredictable name (never
  followed) and renamed into place; they hold JSON only (never pickle: reading an entry runs no code).
- **Never needed.** Any problem — missing, foreign, damaged, too large, a different key inside — is a miss:
  the file is validated again as if there were no cache. `MTLSCTL_NO_CACHE=1` turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ENTRY_MAX_BYTES = 1 << 20
KEEP_ENTRIES = 32  # per kind: the newest entries stay, older ones are removed when a new one is written
FORMAT = 1


def digest(*parts: bytes) -> str:
    """SHA-256 over length-prefixed parts (no two different part lists hash alike)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def cache_dir(environ: dict[str, str] | None = None) -> Path | None:
    """Where entries live for this user, or None when caching is off (MTLSCTL_NO_CACHE, no home)."""
    env = os.environ if environ is None else environ
    if env.get("MTLSCTL_NO_CACHE"):
        return None
    if "MTLSCTL_CACHE_DIR" in env:
        return Path(env["MTLSCTL_CACHE_DIR"]) if env["MTLSCTL_CACHE_DIR"] else None
    base = env.get("XDG_CACHE_HOME") or ""
    if not os.path.isabs(base):
        home = os.path.expanduser("~")
        if not os.path.isabs(home):
            return None
        base = os.path.join(home, ".cache")
    return Path(base) / "mtlsctl"


def _private(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _open_dir(path: Path) -> int | None:
    """A descriptor on the cache directory if it is ours and private, else None (never follows a link)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if _private(os.fstat(fd)):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _name(kind: str, key: str) -> str:
    if not kind.isidentifier() or not all(c in "0123456789abcdef" for c in key) or len(key) != 64:
        raise ValueError(f"bad cache name {kind!r}/{key!r}")
    return f"{kind}-{key}.json"


def get(kind: str, key: str) -> Any | None:
    """The value stored for (kind, key), or None on any miss."""
    where = cache_dir()
    if where is None:
        return None
    dfd = _open_dir(where)
    if dfd is None:
        return None
    try:
        fd = os.open(_name(kind, key), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or not _private(st) or st.st_size > ENTRY_MAX_BYTES:
                return None
            raw = b""
            while len(raw) <= ENTRY_MAX_BYTES:
                chunk = os.read(fd, ENTRY_MAX_BYTES + 1 - len(raw))
                if not chunk:
                    break
                raw += chunk
        finally:
            os.close(fd)
        if len(raw) > ENTRY_MAX_BYTES:
            return None
        doc = json.loads(raw.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("kind") != kind or doc.get("key") != key:
            return None
        return doc.get("value")
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    finally:
        os.close(dfd)


def put(kind: str, key: str, value: Any) -> None:
    """Store a JSON-serialisable value for (kind, key); silently does nothing when it cannot."""
    where = cache_dir()
    if where is None:
        return
    try:
        name = _name(kind, key)
        data = json.dumps({"format": FORMAT, "kind": kind, "key": key, "value": value}, separators=(",", ":")).encode()
    except (TypeError, ValueError):
        return
    if len(data) > ENTRY_MAX_BYTES:
        return
    with contextlib.suppress(OSError):
        if not where.is_symlink() and not where.exists():
            old = os.umask(0o077)
            try:
                where.mkdir(mode=0o700, parents=True, exist_ok=True)
            finally:
                os.umask(old)
    dfd = _open_dir(where)
    if dfd is None:
        return
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        # No fsync: a torn entry after a crash fails to parse or carries another key, which is a miss.
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        tmp = ""
        _prune(dfd, kind)
    except OSError:
        pass
    finally:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
        os.close(dfd)


def _prune(dfd: int, kind: str) -> None:
    """Keep the newest KEEP_ENTRIES entries of a kind (tests and edits make new ones; old ones are dead), and
    remove temporary files a killed run left (older than an hour: a running writer's is seconds old)."""
    import time

    entries = []
    for name in os.listdir(dfd):
        if name.startswith(f"{kind}-") and name.endswith(".json"):
            with contextlib.suppress(OSError):
                entries.append((os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mtime_ns, name))
        elif name.startswith(f".{kind}-") and name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                if os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mtime < time.time() - 3600:
                    os.unlink(name, dir_fd=dfd)
    for _, name in sorted(entries, reverse=True)[KEEP_ENTRIES:]:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dfd)


def code_key(*modules: str) -> bytes:
    """A digest of the source of the named modules (e.g. "mtlsctl.x509read") and of the packages' own files for
    top-level names (e.g. "cryptography": its __about__.py/__init__.py), found without importing them. Part of
    a key: other code, or another version of a library, misses. Raises OSError when a source cannot be read."""
    import importlib.util

    parts = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not os.path.isfile(spec.origin):
            raise OSError(f"no source for {name}")
        parts.append(name.encode())
        parts.append(Path(spec.origin).read_bytes())
        if spec.submodule_search_locations:  # a package: its version files, and its compiled core's identity
            home = Path(spec.origin).parent
            for version_file in ("__about__.py", "version.py", "_version.py"):
                if (home / version_file).is_file():
                    parts.append((home / version_file).read_bytes())
            for entry in sorted(os.scandir(home), key=lambda e: e.name):
                if entry.name.endswith(".so") and entry.is_file():  # e.g. pydantic_core's: no version file beside it
                    st = entry.stat()
                    parts.append(f"{entry.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest(*parts).encode()


def derived(kind: str, key_parts: Sequence[bytes], compute: Callable[[], T], dump: Callable[[T], Any],
            load: Callable[[Any], T]) -> T:
    """compute(), or what an earlier compute() with the same key_parts returned (stored as dump(value), read back
    with load). key_parts must hold everything compute() depends on: the input's bytes and code_key() of the code
    that derives it. Errors of compute() propagate and are not stored; a load() that fails is a miss."""
    if cache_dir() is None:
        return compute()
    key = digest(kind.encode(), *key_parts)
    stored = get(kind, key)
    if stored is not None:
        try:
            return load(stored)
        except (TypeError, ValueError, KeyError, IndexError):
            pass
    value = compute()
    put(kind, key, dump(value))
    return value

