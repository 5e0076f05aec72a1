"""One run's site profile, read without pydantic when the same bytes were validated before.

`mtlsctl list` and `renew` with nothing due need a handful of profile values; importing pydantic and the
profile's models (mtlsctl/profile.py) to get them costs more than the rest of the run (docs/performance.md).
So a profile file is opened here:

- its bytes are read and hashed on every run (a regular file, at most 256 KiB);
- when this user's cache (mtlsctl/cache.py: private, content-keyed) holds the validated dump of exactly these
  bytes, made by this very code (the key covers mtlsctl/profile.py, validate.py, and the versions of PyYAML,
  pydantic and pydantic-core), the run takes its values from that dump: `Facts` (the few values the
  frequent commands read, type-checked) at once, the full `Profile` model only when a command asks for it
  (then built from the dump without validating again, or validated from the same bytes if the dump does
  not fit);
- otherwise the bytes are validated now, before the command does anything (a bad profile is refused with
  exit 2, as always), and the dump is stored for the next run.

Nothing here decides what a valid profile is: mtlsctl/profile.py does, and this module only ever hands on
what it validated (tests/test_profile_cache.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtlsctl.errors import InputError

if TYPE_CHECKING:
    from mtlsctl.profile import Profile

PROFILE_MAX_BYTES = 256 * 1024
CACHE_KIND = "profile"


def read_bytes(path: Path) -> bytes:
    """The profile's bytes: a regular file (a FIFO would hang, a device never ends), at most 256 KiB."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise InputError(f"profile {path} does not exist", hint="check --profile / MTLSCTL_PROFILE") from None
    except OSError as exc:
        raise InputError(f"profile {path} cannot be opened: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"profile {path} is not a regular file", hint="give the path of a YAML file")
        with os.fdopen(os.dup(fd), "rb") as fh:
            raw = fh.read(PROFILE_MAX_BYTES + 1)
    except OSError as exc:
        raise InputError(f"profile {path} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > PROFILE_MAX_BYTES:
        raise InputError(f"profile {path} is larger than {PROFILE_MAX_BYTES // 1024} KiB; that is not a site profile")
    return raw


def decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"profile {path} is not UTF-8 text (byte {exc.start})") from None


# ------------------------------------------------------------------ the few values frequent commands read


@dataclass(frozen=True)
class Facts:
    """The profile values `list`, `renew` and the CRL refresh read on every run, typed. Taken from the
    validated model (from_profile) or its JSON dump (from_dump); both give the same (tests)."""

    pki_dir: str | None
    renew_within_days: int
    renew_days: int
    renew_revoke_superseded: bool
    crl_refresh_within_days: int
    metrics_textfile: str | None

    @classmethod
    def from_profile(cls, profile: Profile) -> Facts:
        return cls(pki_dir=profile.pki_dir, renew_within_days=profile.renew.within_days, renew_days=profile.renew.days,
                   renew_revoke_superseded=profile.renew.revoke_superseded,
                   crl_refresh_within_days=profile.crl.refresh_within_days,
                   metrics_textfile=profile.metrics.textfile if profile.metrics is not None else None)

    @classmethod
    def from_dump(cls, dump: Any) -> Facts:
        """From Profile.model_dump(mode="json"); ValueError when the dump does not have that shape."""

        def pick(*path: str) -> Any:
            node = dump
            for key in path:
                if not isinstance(node, dict) or key not in node:
                    raise ValueError("/".join(path) + " missing")
                node = node[key]
            return node

        def whole(value: Any) -> int:
            if type(value) is not int:
                raise ValueError("not an integer")
            return value

        pki_dir, superseded, metrics = pick("pki_dir"), pick("renew", "revoke_superseded"), pick("metrics")
        textfile = pick("metrics", "textfile") if metrics is not None else None
        if not all(v is None or isinstance(v, str) for v in (pki_dir, textfile)) or type(superseded) is not bool:
            raise ValueError("not a profile dump")
        return cls(pki_dir=pki_dir, renew_within_days=whole(pick("renew", "within_days")),
                   renew_days=whole(pick("renew", "days")), renew_revoke_superseded=superseded,
                   crl_refresh_within_days=whole(pick("crl", "refresh_within_days")), metrics_textfile=textfile)


# ------------------------------------------------------------------ one run's profile


class ProfileSource:
    """One run's profile: its Facts now, the full Profile model on first use (see the module's docstring)."""

    def __init__(self, *, profile: Profile | None = None, dump: Any = None, facts: Facts | None = None,
                 raw: bytes | None = None, path: Path | None = None) -> None:
        if profile is None and (dump is None or facts is None):
            raise ValueError("a ProfileSource needs the validated profile, or a dump and its facts")
        self._profile, self._dump, self._raw, self._path = profile, dump, raw, path
        self.facts = facts if facts is not None else Facts.from_profile(profile)  # type: ignore[arg-type]

    @classmethod
    def of(cls, profile: Profile) -> ProfileSource:
        return cls(profile=profile)

    @property
    def loaded(self) -> bool:
        """Whether the Profile model exists yet (tests: the frequent commands never build it)."""
        return self._profile is not None

    @property
    def profile(self) -> Profile:
        if self._profile is None:
            self._profile = _materialize(self._dump, self._raw, self._path)
        return self._profile


def _materialize(dump: Any, raw: bytes | None, path: Path | None) -> Profile:
    """The Profile of a cached dump: rebuilt without validating (the dump is what this code validated from these
    bytes), or, if it does not fit the models, validated from the same bytes."""
    from mtlsctl import profile as prof

    try:
        return prof.rebuild(dump)
    except (TypeError, ValueError, KeyError):
        pass
    if raw is None or path is None:
        return prof.default_profile()
    return prof.validate_text(decode(raw, path), path)


def code_key() -> bytes:
    """Everything besides the file's bytes that decides the validated profile: the models and rules
    (mtlsctl/profile.py, validate.py), PyYAML (it parses), pydantic and pydantic-core (they validate), and
    mtlsctl's version — found and hashed without importing any of them. OSError when a source is missing."""
    from mtlsctl import __version__, cache

    return cache.digest(__version__.encode(),
                        cache.code_key("mtlsctl.profile", "mtlsctl.validate", "mtlsctl.profile_file", "yaml", "pydantic",
                                       "pydantic_core")).encode()


def _cache_key(*parts: bytes) -> str | None:
    from mtlsctl import cache

    if cache.cache_dir() is None:
        return None
    try:
        return cache.digest(*parts, code_key())
    except OSError:  # an install without sources: no cache
        return None


def _cached(key: str | None) -> tuple[Any, Facts] | None:
    if key is None:
        return None
    from mtlsctl import cache

    dump = cache.get(CACHE_KIND, key)
    if dump is None:
        return None
    try:
        return dump, Facts.from_dump(dump)
    except ValueError:
        return None


def _store(key: str | None, profile: Profile) -> None:
    if key is not None:
        from mtlsctl import cache

        cache.put(CACHE_KIND, key, profile.model_dump(mode="json"))


def open_profile(path: Path) -> ProfileSource:
    """The profile in this file: validated now unless this very code validated the same bytes before."""
    raw = read_bytes(path)
    key = _cache_key(b"mtlsctl profile", raw)
    hit = _cached(key)
    if hit is not None:
        return ProfileSource(dump=hit[0], facts=hit[1], raw=raw, path=path)
    from mtlsctl import profile as prof

    validated = prof.validate_text(decode(raw, path), path)
    _store(key, validated)
    return ProfileSource(profile=validated)


def default_source() -> ProfileSource:
    """The built-in defaults (the guide's values)."""
    key = _cache_key(b"mtlsctl default profile")
    hit = _cached(key)
    if hit is not None:
        return ProfileSource(dump=hit[0], facts=hit[1])
    from mtlsctl import profile as prof

    defaults = prof.default_profile()
    _store(key, defaults)
    return ProfileSource(profile=defaults)
