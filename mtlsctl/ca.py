"""`mtlsctl init`: the guide's directory, database, openssl.cnf, CA key and certificate, first CRL."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from mtlsctl import audit, openssl
from mtlsctl.crl import gencrl_command, generate_crl, generate_root_crl, root_gencrl_command
from mtlsctl.errors import InputError, StateError
from mtlsctl.files import (
    MODE_CA_KEY,
    MODE_PRIVATE_DIR,
    MODE_PUBLIC,
    MODE_PUBLIC_DIR,
    Transaction,
    atomic_write,
    check_owned_dir,
    chmod_nofollow,
    pki_lock,
    produce,
)
from mtlsctl.pki import DIRS, Pki, Settings
from mtlsctl.runner import Command, Reporter, Runner

# The guide: `touch index.txt; echo 1000 > serial; echo 1000 > crlnumber`; FIELD-NOTES: unique_subject.
INITIAL_FILES = {
    "index.txt": "",
    "index.txt.attr": "unique_subject = no\n",
    "serial": "1000\n",
    "crlnumber": "1000\n",
}


@dataclass(frozen=True)
class InitResult:
    pki_dir: Path
    ca_cert: Path
    ca_key: Path
    crl: Path
    profile: Path
    key: str
    days: int
    subject: str


def init_commands(settings: Settings, now: datetime | None = None, ca_passphrase: str | None = None) -> list[Command]:
    """The openssl commands `init` runs, in order (what --dry-run prints)."""
    ca = settings.profile.ca
    now = now or datetime.now(timezone.utc)
    if ca.intermediate is not None:
        inter = ca.intermediate
        enc = ca_passphrase if ca.key_spec.encrypt else None
        return [
            openssl.genkey(Pki.root_key, ca.key_spec, label=f"generating the root key ({ca.key_spec.describe()})", passphrase=enc),
            openssl.root_selfsign(ca.days),
            openssl.genkey(Pki.ca_key, inter.key_spec, label=f"generating the issuing CA key ({inter.key_spec.describe()})",
                           passphrase=enc),
            openssl.intermediate_csr(),
            openssl.intermediate_sign(inter.days),
            root_gencrl_command(inter.root_crl_days, now),
            gencrl_command(settings.profile.crl.days, now),
        ]
    return [
        openssl.genkey(Pki.ca_key, ca.key_spec, label=f"generating the CA key ({ca.key_spec.describe()})",
                       passphrase=ca_passphrase if ca.key_spec.encrypt else None),
        openssl.ca_selfsign(ca.days),
        gencrl_command(settings.profile.crl.days, now),
    ]


def refuse_existing_ca(pki: Pki) -> None:
    if pki.has_ca():
        raise InputError(
            f"a CA already exists in {pki.root}",
            hint="mtlsctl never overwrites a CA; use another --pki-dir, or remove the old PKI yourself",
        )


def _refuse_existing(pki: Pki, config_text: str) -> None:
    refuse_existing_ca(pki)
    # A directory prepared by hand with the guide's first step is fine; anything else is not ours to replace.
    for rel, content in {**INITIAL_FILES, pki.openssl_cnf: config_text}.items():
        path = pki.path(rel)
        if path.exists() and path.read_text(errors="replace").strip() != content.strip():
            raise InputError(f"{path} already exists with other content", hint="move it away or use another --pki-dir")
    for rel in (pki.crl, pki.profile):
        if pki.path(rel).exists():
            raise InputError(f"{pki.path(rel)} already exists", hint="move it away or use another --pki-dir")


def _refuse_untrusted_dirs(pki: Pki) -> None:
    """An existing PKI directory (followed: the user may name it through a link of their own) and its layout
    directories (never followed) must be the euid's and not group/other-writable: another user could plant a
    link (`ca -> /root/victim`) that the chmods below would follow, or swap what openssl reads."""
    if check_owned_dir(pki.root, "the PKI directory", follow=True) is None:
        return
    for rel in DIRS:
        check_owned_dir(pki.path(rel), "the PKI's directory")


def init_pki(settings: Settings, runner: Runner, now: datetime | None = None, ca_passphrase: str | None = None) -> InitResult:
    """Create the PKI; on any failure remove everything this run created.

    Raises:
        InputError: a CA (or other files of a PKI) already exists; nothing is touched.
        OpenSSLError: an openssl step failed; the directory is as it was before.
    """
    pki, profile = settings.pki, settings.profile
    if profile.ca.key_spec.encrypt and ca_passphrase is None:
        raise InputError("ca.key.encrypt is true but no CA passphrase was given",
                         hint="run on a terminal, or give --ca-passphrase-file FILE / --ca-passphrase-fd N")
    config_text = openssl.render_openssl_cnf(profile, pki)
    _refuse_untrusted_dirs(pki)  # before anything is read, created or locked there
    _refuse_existing(pki, config_text)

    missing = []
    for parent in (pki.root, *pki.root.parents):
        if parent.exists():
            break
        missing.append(parent)
    for parent in reversed(missing):
        parent.mkdir(mode=MODE_PUBLIC_DIR)
        os.chmod(parent, MODE_PUBLIC_DIR)
    with Transaction(pki.root) as tx:
        for parent in reversed(missing):
            tx.created(parent)
        lock_created = not pki.lock_path.exists()
        if lock_created:
            tx.created(pki.lock_path)
        with pki_lock(pki.lock_path):
            _refuse_existing(pki, config_text)  # again, now that we hold the lock
            for rel in DIRS:
                path = pki.path(rel)
                mode = MODE_PRIVATE_DIR if rel == "private" else MODE_PUBLIC_DIR
                if not os.path.lexists(path):
                    path.mkdir(mode=mode)
                    tx.created(path)
                check_owned_dir(path, "the PKI's directory")  # never chmod through a link swapped in meanwhile
                chmod_nofollow(path, mode)
            for rel, content in {**INITIAL_FILES, pki.openssl_cnf: config_text}.items():
                path = pki.path(rel)
                if not path.exists():
                    tx.created(path)
                    atomic_write(path, content, MODE_PUBLIC)
            if profile.ca.intermediate is not None:
                _init_two_tier(settings, runner, tx, now, ca_passphrase)
            else:
                keygen, selfsign, _ = init_commands(settings, now, ca_passphrase)
                produce(tx, pki.path(pki.ca_key), MODE_CA_KEY, lambda: runner.run(keygen, cwd=pki.root))
                produce(tx, pki.path(pki.ca_cert), MODE_PUBLIC, lambda: runner.run(selfsign, cwd=pki.root))
            tx.created(pki.path(pki.crl))
            generate_crl(pki, profile.crl.days, runner, tx, now)
            tx.created(pki.path(pki.profile))
            from mtlsctl.profile import dump_profile

            atomic_write(pki.path(pki.profile), dump_profile(profile, pki.root), MODE_PUBLIC)
            tx.checkpoint()
            audit.record(pki, "init", two_tier=profile.ca.intermediate is not None, days=profile.ca.days,
                         algorithm=profile.ca.key_spec.describe(), encrypted=ca_passphrase is not None,
                         subject=", ".join(f"{k}={v}" for k, v in profile.ca.subject.fields()))

    subject = ", ".join(f"{k}={v}" for k, v in profile.ca.subject.fields())
    return InitResult(
        pki_dir=pki.root,
        ca_cert=pki.path(pki.ca_cert),
        ca_key=pki.path(pki.ca_key),
        crl=pki.path(pki.crl),
        profile=pki.path(pki.profile),
        key=profile.ca.key_spec.describe(),
        days=profile.ca.days,
        subject=subject,
    )


def _init_two_tier(settings: Settings, runner: Runner, tx: Transaction, now: datetime | None, passphrase: str | None) -> None:
    """Root (pathlen:1) with its own database under root/, then the issuing CA (pathlen:0) signed by it."""
    from mtlsctl import db

    pki = settings.pki
    root_key, root_cert, inter_key, csr, sign, _root_crl, _crl = init_commands(settings, now, passphrase)
    for rel in ("root", "root/newcerts"):
        pki.path(rel).mkdir(mode=MODE_PUBLIC_DIR)
        tx.created(pki.path(rel))
    for rel, content in INITIAL_FILES.items():
        tx.created(pki.path(f"root/{rel}"))
        atomic_write(pki.path(f"root/{rel}"), content, MODE_PUBLIC)
    produce(tx, pki.path(pki.root_key), MODE_CA_KEY, lambda: runner.run(root_key, cwd=pki.root))
    produce(tx, pki.path(pki.root_cert), MODE_PUBLIC, lambda: runner.run(root_cert, cwd=pki.root))
    produce(tx, pki.path(pki.ca_key), MODE_CA_KEY, lambda: runner.run(inter_key, cwd=pki.root))
    produce(tx, pki.path("ca/ca.csr"), MODE_PUBLIC, lambda: runner.run(csr, cwd=pki.root))
    tx.may_create(pki.path("root/newcerts/1000.pem"))
    produce(tx, pki.path(pki.ca_cert), MODE_PUBLIC, lambda: runner.run(sign, cwd=pki.root))
    rows = db.read_index(pki.path("root/index.txt"))
    if [r.serial for r in rows] != ["1000"]:
        raise StateError("the root's database does not hold the issuing CA after signing", hint="run init again")
    chain = "".join(db.pem_block(pki.path(rel).read_text()) for rel in (pki.ca_cert, pki.root_cert))
    tx.created(pki.path(pki.chain))
    atomic_write(pki.path(pki.chain), chain, MODE_PUBLIC)
    tx.created(pki.path(pki.root_crl))
    generate_root_crl(pki, settings.profile.ca.intermediate.root_crl_days, runner, tx, now)  # type: ignore[union-attr]


def passphrase_check(passphrase: str | None) -> Command:
    """Does the passphrase open private/ca.key? (`openssl pkey -noout`, the passphrase on a pipe)."""
    return Command(("openssl", "pkey", "-in", Pki.ca_key, "-noout", "-passin", "fd:@0"),
                   fd_secrets=(passphrase if passphrase is not None else "",))


# ------------------------------------------------------------------ the passphrase of an encrypted CA key

MIN_PASSPHRASE = 8


def require_passphrase_opens(pki: Pki, passphrase: str, *, current: bool = False) -> None:
    """Refuse (exit 2, nothing written) a passphrase that does not open private/ca.key: checked with openssl
    before a signing command starts, so a typo never gets half-way through a change.

    Raises:
        InputError: openssl could not open the key with it.
    """
    if Runner().run(passphrase_check(passphrase), cwd=pki.root, check=False).returncode != 0:
        if current:
            raise InputError("the current CA passphrase does not open private/ca.key")
        raise InputError("the CA passphrase does not open private/ca.key", hint="check --ca-passphrase-file / --ca-passphrase-fd")


def check_new_passphrase(passphrase: str, *, what: str = "the CA key passphrase") -> str:
    """A passphrase that will encrypt a CA key: at least MIN_PASSPHRASE characters, and one openssl can read.

    Raises:
        InputError: too short, or not a password openssl reads whole (validate.password).
    """
    from mtlsctl import validate

    if len(passphrase) < MIN_PASSPHRASE:
        raise InputError(f"{what} is shorter than {MIN_PASSPHRASE} characters", hint="use a long passphrase; it guards every certificate")
    return validate.password(passphrase, source="the CA passphrase option")


def passphrase_runner(pki: Pki, passphrase: str | None, reporter: Reporter | None = None) -> Runner:
    """A Runner that hands `passphrase` (on a pipe) to every command of this PKI that loads the CA key."""
    if passphrase is None:
        return Runner(reporter)
    root = pki.root
    return Runner(reporter, ca_passphrase=lambda cwd: passphrase if cwd == root else None)


def signing_runner(pki: Pki, passphrase: Callable[[], str], reporter: Reporter | None = None) -> Runner:
    """The Runner for a command that signs. With an encrypted CA key, `passphrase()` is asked once and the
    answer checked first (require_passphrase_opens), so a wrong one is refused before anything is written;
    with a plain key nothing is asked."""
    if not pki.ca_key_encrypted():
        return Runner(reporter)
    value = passphrase()
    require_passphrase_opens(pki, value)
    return passphrase_runner(pki, value, reporter)


def create_ca(settings: Settings, passphrase: str | None, reporter: Reporter | None = None) -> InitResult:
    """`mtlsctl init`: the PKI (init_pki), then, with an ocsp: section in the profile, the OCSP signer.

    `passphrase` encrypts the CA key(s) when the profile's ca.key.encrypt is set (check it first with
    check_new_passphrase)."""
    runner = passphrase_runner(settings.pki, passphrase, reporter)
    result = init_pki(settings, runner, ca_passphrase=passphrase)
    if settings.profile.ocsp is not None:
        from mtlsctl import ocsp

        ocsp.setup(settings, runner)
    return result


def change_passphrase(pki: Pki, old: str | None, new: str, runner: Runner) -> None:
    """Re-encrypt private/ca.key under a new passphrase (or encrypt a plain one): written aside, checked, renamed."""
    from mtlsctl.files import MODE_CA_KEY as KEY_MODE

    tmp = "private/.ca.key.new"
    passin = ("-passin", "fd:@0") if old is not None else ()
    secrets = (old, new) if old is not None else (new,)
    out_fd = "fd:@1" if old is not None else "fd:@0"
    with pki_lock(pki.lock_path), audit.failures_recorded(pki, "ca-passphrase-change"), Transaction(pki.root) as tx:
        tx.snapshot(pki.path(pki.ca_key))
        produce(tx, pki.path(tmp), KEY_MODE, lambda: runner.run(Command(
            ("openssl", "pkey", "-in", pki.ca_key, *passin, "-aes256", "-passout", out_fd, "-out", tmp),
            label="re-encrypting private/ca.key", fd_secrets=secrets), cwd=pki.root))
        runner.run(Command(("openssl", "pkey", "-in", tmp, "-noout", "-passin", "fd:@0"), fd_secrets=(new,)), cwd=pki.root)
        os.replace(pki.path(tmp), pki.path(pki.ca_key))
        tx.checkpoint()
        audit.record(pki, "ca-passphrase-change", was_encrypted=old is not None)


def export_root_offline(pki: Pki, out: Path) -> Path:
    """Move private/root.key out of the PKI (to removable media, say): written to `out` (0400), compared,
    then removed here. Commands that need it (`crl --root`) take it back by path (--root-key FILE)."""
    if not pki.has_chain():
        raise InputError("this PKI has no separate root (profile ca.intermediate is not set)",
                         hint="with a single CA, the CA key signs every client and must stay")
    src = pki.path(pki.root_key)
    if not src.exists():
        raise InputError("private/root.key is not here: it was exported already")
    out = out.absolute()
    if out.exists():
        raise InputError(f"{out} already exists", hint="mtlsctl never overwrites a key")
    if pki.root in out.parents:
        raise InputError("--out is inside the PKI directory", hint="write it to removable media or another host")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: directory {out.parent} does not exist")
    with pki_lock(pki.lock_path), audit.failures_recorded(pki, "root-export-offline", out=str(out)[:300]):
        data = src.read_bytes()
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, MODE_CA_KEY)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if out.read_bytes() != data:
            out.unlink()
            raise StateError(f"the copy at {out} does not match; private/root.key was kept")
        src.unlink()
        audit.record(pki, "root-export-offline", out=str(out)[:300])
    return out
