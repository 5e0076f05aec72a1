"""Where things live: the guide's PKI layout, and how --pki-dir / --profile are resolved."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mtlsctl import validate
from mtlsctl.errors import InputError

if TYPE_CHECKING:
    from mtlsctl.profile import Profile
    from mtlsctl.profile_file import Facts, ProfileSource

PROFILE_NAME = "mtls.yaml"
DEFAULT_PKI_DIR = "/etc/nginx/pki"
LOCK_NAME = ".mtlsctl.lock"
DIRS = ("ca", "certs", "crl", "private", "newcerts")
# The openssl ca database: copied aside before each `openssl ca` run and restored if it fails.
DB_FILES = ("index.txt", "index.txt.attr", "serial", "crlnumber")
DB_FILES_WITH_BACKUPS = DB_FILES + tuple(f + ".old" for f in DB_FILES)


@dataclass(frozen=True)
class ClientFiles:
    """A client's files, relative to the PKI directory, exactly where the guide puts them."""

    name: str

    @property
    def key(self) -> str:
        return f"private/{self.name}.key"

    @property
    def csr(self) -> str:
        return f"certs/{self.name}.csr"

    @property
    def crt(self) -> str:
        return f"certs/{self.name}.crt"

    @property
    def p12(self) -> str:
        return f"certs/{self.name}.p12"

    @property
    def fullchain(self) -> str:
        """A server's certificate followed by the issuing CA (two-tier): what nginx's ssl_certificate serves."""
        return f"certs/{self.name}.fullchain.pem"

    def all(self) -> tuple[str, ...]:
        return (self.key, self.csr, self.crt, self.p12, self.fullchain)


@dataclass(frozen=True)
class Pki:
    """The PKI directory (`/etc/nginx/pki` in the guide) and the guide's relative paths in it."""

    root: Path

    openssl_cnf = "openssl.cnf"
    index = "index.txt"
    index_attr = "index.txt.attr"
    serial = "serial"
    crlnumber = "crlnumber"
    ca_cert = "ca/ca.crt"
    ca_key = "private/ca.key"
    crl = "crl/ca.crl"
    profile = PROFILE_NAME
    # two-tier PKI (profile ca.intermediate): ca/ca.crt and private/ca.key are then the issuing CA
    root_cert = "ca/root.crt"
    root_key = "private/root.key"
    root_crl = "crl/root.crl"
    chain = "ca/chain.pem"
    chain_crl = "crl/chain.crl"

    def has_chain(self) -> bool:
        return self.path(self.root_cert).exists()

    @property
    def ca_bundle(self) -> str:
        """What nginx trusts and bundles carry: the chain with an intermediate, else the CA certificate."""
        return self.chain if self.has_chain() else self.ca_cert

    @property
    def crl_bundle(self) -> str:
        """What nginx's ssl_crl reads: with an intermediate, the CRLs of every CA in the chain (nginx needs all)."""
        return self.chain_crl if self.has_chain() else self.crl

    def path(self, rel: str) -> Path:
        return self.root / rel

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_NAME

    def client(self, name: str) -> ClientFiles:
        return ClientFiles(name)

    def has_ca(self) -> bool:
        return self.path(self.ca_cert).exists() or self.path(self.ca_key).exists()

    def ca_key_encrypted(self) -> bool:
        """True when private/ca.key is passphrase-protected (PKCS#8 or traditional PEM encryption)."""
        try:
            with open(self.path(self.ca_key), encoding="ascii", errors="replace") as fh:
                head = fh.read(200)
        except OSError:
            return False
        return "ENCRYPTED" in head

    def config_dirs(self) -> list[tuple[str, str]]:
        """(section, value) of every `dir =` in openssl.cnf (quotes and comments removed); [] without one."""
        import re

        try:
            text = self.path(self.openssl_cnf).read_text(errors="replace")
        except OSError:
            return []
        found, section = [], "default"
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            head = re.fullmatch(r"\[\s*([^\]\s]+)\s*\]", line)
            if head:
                section = head.group(1)
                continue
            m = re.fullmatch(r"dir\s*=\s*(.*)", line)
            if m:
                value = m.group(1).strip()
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                    value = value[1:-1]
                found.append((section, value))
        return found

    def foreign_dirs(self) -> list[tuple[str, str]]:
        """(section, value) of every `dir =` in openssl.cnf that does not lead to this PKI directory.

        openssl works on the files `dir` names, not on --pki-dir: a copied or moved PKI whose openssl.cnf still
        names the old directory would sign into, revoke in and take the keys of that other PKI.
        """
        found = []
        for section, value in self.config_dirs():
            here = value if os.path.isabs(value) else os.path.join(self.root, value)  # openssl runs in the PKI
            if not value or "$" in value or os.path.realpath(here) != os.path.realpath(self.root):
                found.append((section, value))
        return found

    def require_own_config(self) -> None:
        """Writers refuse a PKI whose openssl.cnf names another directory (doctor says the same)."""
        foreign = self.foreign_dirs()
        if foreign:
            from mtlsctl.errors import StateError

            section, value = foreign[0]
            raise StateError(f"openssl.cnf's dir is {value or '(empty)'} in [ {section} ], not {self.root}: openssl would "
                             "sign, revoke and use the keys of that other directory; nothing was changed",
                             hint=f"set `dir = {self.root}` in every section of openssl.cnf (was the PKI copied or moved?)")

    def require_ca(self) -> None:
        """Refuse to work on a directory that holds no CA (wrong --pki-dir, or init not run)."""
        def absent() -> list[str]:
            return [rel for rel in (self.ca_cert, self.ca_key, self.openssl_cnf, self.index, self.serial)
                    if not self.path(rel).exists()]

        missing = absent()
        if missing and self.path(LOCK_NAME).exists():
            # Another mtlsctl's `openssl ca` may be between the two renames by which it replaces index.txt and
            # serial: look again once no writer runs (a shared lock; free when this process holds the lock).
            from mtlsctl.files import read_lock

            with read_lock(self.root):
                missing = absent()
        if missing:
            raise InputError(
                f"no CA in {self.root} ({', '.join(missing)} missing)",
                hint="run `mtlsctl init` first, or point --pki-dir / PKI_DIR at your PKI",
            )


class Settings:
    """What every command works on: the PKI directory and the validated profile.

    `facts` holds the few profile values the frequent commands read (list, renew, the CRL refresh); `profile`,
    the whole validated model, is built on first use when the run took the profile from the cache
    (mtlsctl/profile_file.py) — a run that never asks for it never imports pydantic.
    """

    __slots__ = ("_source", "pki", "profile_source")

    def __init__(self, pki: Pki, profile: Profile | ProfileSource, profile_source: str) -> None:
        from mtlsctl.profile_file import ProfileSource

        self.pki = pki
        self._source = profile if isinstance(profile, ProfileSource) else ProfileSource.of(profile)
        self.profile_source = profile_source  # a path, or "built-in defaults"

    @property
    def profile(self) -> Profile:
        return self._source.profile

    @property
    def facts(self) -> Facts:
        return self._source.facts

    @property
    def profile_loaded(self) -> bool:
        return self._source.loaded

    def __repr__(self) -> str:
        return f"Settings(pki={self.pki!r}, profile_source={self.profile_source!r})"


def resolve_settings(
    pki_dir: Path | None, profile_path: Path | None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Resolve the PKI directory and profile.

    PKI directory: --pki-dir > PKI_DIR > the profile's pki_dir > /etc/nginx/pki.
    Profile: --profile > MTLSCTL_PROFILE > <pki-dir>/mtls.yaml > built-in defaults (the guide's values).
    (Typer already folds the environment variables into the options; `environ` is for library callers.)
    """
    from mtlsctl.profile_file import default_source, open_profile

    env = os.environ if environ is None else environ
    if pki_dir is None and env.get("PKI_DIR"):
        pki_dir = Path(env["PKI_DIR"])
    if profile_path is None and env.get("MTLSCTL_PROFILE"):
        profile_path = Path(env["MTLSCTL_PROFILE"])

    profile: ProfileSource | None = None
    source = "built-in defaults"
    if profile_path is not None:
        profile = open_profile(profile_path)
        source = str(profile_path)
        if pki_dir is None and profile.facts.pki_dir:
            given = Path(profile.facts.pki_dir).expanduser()
            pki_dir = given if given.is_absolute() else profile_path.parent / given
    root = validate.pki_dir(pki_dir if pki_dir is not None else Path(DEFAULT_PKI_DIR))
    if root.exists() and not root.is_dir():
        raise InputError(f"the PKI directory {root} is not a directory", hint="point --pki-dir / PKI_DIR at the PKI's directory")
    if profile is None:
        candidate = root / PROFILE_NAME
        if candidate.exists():
            profile = open_profile(candidate)
            source = str(candidate)
        else:
            profile = default_source()
    return Settings(Pki(root), profile, source)
