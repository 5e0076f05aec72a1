"""`add-client` and `export`: the guide's mtls-add-client.sh, done safely.

Order of work (the guide's four commands): key, CSR, signature by the CA, PKCS#12 bundle.
Everything is checked before the first write; a failure removes what this run created; once the
certificate is in the database it stays (and the error says so and points at `export`).

A name whose certificates are all revoked or expired can be issued again (a lost phone, a new one for the
same person): its old files move to `archive/NAME/SERIAL/` inside the PKI, journaled with the issuance, and
the new ones take the guide's paths; index.txt keeps the history. A name with an active certificate is
refused (`mtlsctl replace` issues the new one first, then revokes the old).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from dataclasses import replace as replace_fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from mtlsctl import audit, db, openssl, validate
from mtlsctl.errors import InputError, MtlsError, StateError
from mtlsctl.files import (
    MODE_PRIVATE_DIR,
    MODE_PUBLIC,
    MODE_SECRET,
    Transaction,
    atomic_write,
    chmod_nofollow,
    create_exclusive,
    normalize_modes,
    pki_lock,
    produce,
    protect_database,
    read_lock,
    refuse_symlink,
)
from mtlsctl.pki import DB_FILES_WITH_BACKUPS, ClientFiles, Pki, Settings
from mtlsctl.runner import Command, Runner

if TYPE_CHECKING:  # annotations only: the profile's models mean pydantic (start-up)
    from mtlsctl.profile import KeySpec

EXTENSIONS = {"client": "v3_client", "server": "v3_server", "ocsp": "v3_ocsp"}


def extensions_section(kind: str, key_type: str) -> str:
    """The openssl.cnf section that signs a certificate of this kind and key type.

    keyUsage depends on the key (RFC 5480): keyEncipherment only for RSA, so EC clients and servers use
    v3_client_ec / v3_server_ec. The OCSP signer's section (digitalSignature only) fits every key.
    """
    base = EXTENSIONS[kind]
    return f"{base}_ec" if key_type != "rsa" and kind in ("client", "server") else base


def generate_password() -> str:
    """24 URL-safe characters from `secrets` (FIELD-NOTES: at least 20)."""
    return secrets.token_urlsafe(18)


@dataclass(frozen=True)
class IssueRequest:
    name: str
    days: int
    key: KeySpec
    p12: str
    sans: tuple[str, ...] = ()
    password: str | None = field(default=None, repr=False)  # None: generate one
    kind: str = "client"  # "server": v3_server (serverAuth); "ocsp": v3_ocsp (OCSPSigning); neither gets a bundle

    @property
    def extensions(self) -> str:
        return extensions_section(self.kind, self.key.type)


@dataclass(frozen=True)
class IssueResult:
    name: str
    serial: str
    not_after: datetime
    key: Path
    csr: Path
    crt: Path
    p12: Path | None
    p12_profile: str | None
    password: str | None = field(repr=False)  # only when generated
    sans: tuple[str, ...] = ()
    archived: str | None = None  # archive/NAME/SERIAL: where the previous certificate's files went
    archived_serial: str | None = None


class IssuedButExportFailed(MtlsError):
    """The certificate is issued and in the database; only the PKCS#12 bundle is missing."""

    def __init__(self, message: str, hint: str | None = None, result: IssueResult | None = None) -> None:
        super().__init__(message, hint)
        self.result = result  # what was issued (p12 None)


def build_request(settings: Settings, name: str, *, days: int | None = None, key_type: str | None = None,
                  p12: str | None = None, sans: tuple[str, ...] | list[str] = (), password: str | None = None,
                  kind: str = "client") -> IssueRequest:
    """Validate user input against the profile's defaults (raises InputError, writes nothing)."""
    clients = settings.profile.clients
    key = clients.key_spec
    if key_type is not None and key_type not in ("rsa", "ec"):
        raise InputError(f"--key-type {key_type!r} is not a key type", hint="use rsa or ec")
    if key_type is not None and key_type != key.type:
        from mtlsctl.profile import KeySpec

        key = KeySpec(type=key_type).resolved(2048, "P-256")  # type: ignore[arg-type]
    if p12 is not None and p12 not in openssl.P12_FLAGS:
        raise InputError(f"--p12 {p12!r} is not a PKCS#12 profile", hint="use compat, modern or legacy")
    if password is not None:
        validate.password(password, source="the password option")
    checked_sans = validate.sans(list(sans))
    wildcards = [s for s in checked_sans if s.startswith("DNS:*")]
    if wildcards and kind != "server":
        raise InputError(f"SAN {wildcards[0]} is a wildcard; wildcards are issued to servers only",
                         hint="name each host (--san DNS:host.example.com), or use add-server for a wildcard server certificate")
    return IssueRequest(
        name=validate.client_name(name, role=kind),
        days=validate.days(days if days is not None else clients.days),
        key=key,
        p12=p12 or clients.p12,
        sans=tuple(checked_sans),
        password=password,
        kind=kind,
    )


def server_request(settings: Settings, name: str, *, sans: tuple[str, ...] | list[str] = (), days: int | None = None,
                   key_type: str | None = None) -> IssueRequest:
    """`add-server`'s request: the SANs given, DNS: and IP: names only (what a TLS client checks a server by),
    or DNS:NAME when none are given. Raises InputError, writes nothing."""
    sans = list(sans) or [f"DNS:{name}"]
    for entry in sans:
        if entry.split(":", 1)[0].upper() not in ("DNS", "IP"):
            raise InputError(f"--san {entry!r}: a server certificate takes DNS: or IP: names", hint="e.g. --san DNS:host.example")
    return build_request(settings, name, days=days, key_type=key_type, sans=sans, kind="server")


def issue_commands(req: IssueRequest, certfile: str = Pki.ca_cert) -> list[Command]:
    """The openssl commands add-client (or add-server) runs, in order (what --dry-run prints)."""
    files = ClientFiles(req.name)
    cmds = [
        openssl.genkey(files.key, req.key),
        openssl.client_csr(files.key, files.csr, req.name, req.sans),
        openssl.ca_sign(files.csr, files.crt, req.days, extensions=req.extensions),
    ]
    if req.kind == "client":  # servers and the OCSP signer get no bundle
        cmds += [
            openssl.pkcs12_export(req.name, files.key, files.crt, files.p12, req.password, req.p12, certfile),
            openssl.pkcs12_check(files.p12, req.password, req.p12),
        ]
    return cmds


def plan_issue(settings: Settings, req: IssueRequest) -> list[Command]:
    """What --dry-run shows: the same checks as a real run (CA present, no conflict), then the commands."""
    settings.pki.require_ca()
    require_section(settings.pki, req.extensions)
    refuse_conflicts(settings.pki, req.name)
    return issue_commands(req, settings.pki.ca_bundle)


def require_section(pki: Pki, section: str) -> None:
    """A PKI whose openssl.cnf predates a feature (or was written by hand) lacks its extension section."""
    if section not in openssl.cnf_sections(pki.path(pki.openssl_cnf).read_text(errors="replace")):
        raise InputError(
            f"{pki.path(pki.openssl_cnf)} has no [ {section} ] section",
            hint=f"add the [ {section} ] section from mtlsctl's openssl.cnf.template and run again",
        )


def password_file(name: str) -> str:
    """Where the password of certs/NAME.p12 is kept when mtlsctl generated it and did not print it (0600)."""
    return f"private/{name}.p12.password"


def refuse_pki_target(pki: Pki, target: Path, own: str) -> None:
    """An export's --out inside the PKI directory is refused unless it is the export's own place (`own`, e.g.
    certs/NAME.p12): --force must never let a bundle replace the CA key, a certificate or the database. Compared
    after resolving links (a PKI reached through a link, a directory link inside it) and, for an existing file, by
    inode (a hard link elsewhere to a file of the PKI)."""
    root = os.path.realpath(pki.root)
    where = os.path.realpath(target)
    inside = where == root or where.startswith(root + os.sep)
    if not inside and target.exists():
        with contextlib.suppress(OSError):
            st = target.stat()
            inside = st.st_nlink > 1 and any(
                os.path.samefile(target, p) for p in pki.root.rglob("*") if p.is_file() and not p.is_symlink())
    if inside and where != os.path.realpath(pki.path(own)):
        raise InputError(f"--out {target} is inside the PKI directory {pki.root}",
                         hint=f"write the export outside the PKI (or to its own place, {own}); nothing there is replaced")


def name_files(name: str) -> tuple[str, ...]:
    """Every file a name owns at the guide's paths: key, CSR, certificate, bundle, fullchain, bundle password, and
    the Apple profile `export --format mobileconfig` writes (it holds a bundle too: archived with the rest)."""
    return (*ClientFiles(name).all(), f"certs/{name}.mobileconfig", password_file(name))


def refuse_conflicts(pki: Pki, name: str, *, replacing: bool = False) -> RetirePlan | None:
    """Refuse (InputError, nothing written) what issuing NAME would clash with; return the files to archive.

    Refused: an active certificate of NAME, or of a name that differs only in case (unless `replacing`: then
    NAME's own active certificates are the ones `replace` revokes); a symbolic link at any of NAME's paths or
    in archive/NAME/; files at NAME's paths that no certificate of NAME in index.txt accounts for. Files of a
    name whose certificates are all revoked or expired are not a conflict: they are archived (plan_retire).
    """
    rows = db.rows_named(pki.path(pki.index), name, ignore_case=True)  # NAME's rows and its case variants
    # nginx compares allowlist map keys without case: `Admin` must not be issued beside an active `admin`.
    active = [r for r in rows if (r.cn or "").lower() == name.lower() and r.is_active()]
    other_case = [r for r in active if r.cn != name]
    if other_case or (active and not replacing):
        serials = ", ".join(r.serial for r in (other_case or active))
        holder = (other_case or active)[-1].cn
        if holder != name:
            raise InputError(
                f"{name!r} differs only in case from {holder!r}, which has an active certificate (serial {serials})",
                hint="names are unique regardless of case (nginx allowlists compare them without case); pick another name",
            )
        has_key = pki.path(ClientFiles(name).key).exists()
        raise InputError(
            f"{name!r} already has an active certificate (serial {serials})",
            hint=(f"a lost or broken device: `mtlsctl replace {name}` (the new certificate first, then the old one "
                  f"revoked); a new bundle of this certificate: `mtlsctl export {name} --force`; or renew it"
                  if has_key else
                  f"a lost or broken device: `mtlsctl replace {name}`; or revoke it first (mtlsctl revoke {name}), "
                  "or renew it (mtlsctl renew); its key is not on this host"),
        )
    links = [rel for rel in name_files(name) if pki.path(rel).is_symlink()]
    if links:  # a dangling one too: openssl would create its target wherever it points
        raise InputError(f"{pki.path(links[0])} is a symbolic link; mtlsctl never writes through one",
                         hint="remove it: mtlsctl creates the files of a client itself")
    return plan_retire(pki, name, [r for r in rows if r.cn == name])


# ------------------------------------------------------------------ the archive of a name's retired files

ARCHIVE = "archive"


@dataclass(frozen=True)
class RetirePlan:
    """The files of NAME's previous certificate, to be moved to archive/NAME/SERIAL/ before a new one is issued."""

    name: str
    serial: str  # the certificate they belong to (certs/NAME.crt's, else NAME's newest row)
    files: tuple[str, ...]  # relative to the PKI, in name_files() order

    @property
    def directory(self) -> str:
        return f"{ARCHIVE}/{self.name}/{self.serial}"

    def moves(self, directory: str | None = None) -> list[tuple[str, str]]:
        where = directory or self.directory
        return [(rel, f"{where}/{Path(rel).name}") for rel in self.files]


@dataclass(frozen=True)
class Retired:
    """What retire() did: `moved` (absolute guide paths, now empty) went to `directory` (relative to the PKI)."""

    serial: str
    directory: str
    moved: frozenset[Path]


def _refuse_archive_links(pki: Pki, name: str) -> None:
    """archive/ and archive/NAME/ must be directories (or absent): never a symbolic link, never a file."""
    for rel in (ARCHIVE, f"{ARCHIVE}/{name}"):
        path = pki.path(rel)
        if path.is_symlink():
            raise InputError(f"{path} is a symbolic link; mtlsctl never writes through one",
                             hint="remove it: mtlsctl creates the archive directories itself (mode 700)")
        if os.path.lexists(path) and not path.is_dir():
            raise InputError(f"{path} is not a directory", hint="move it away: mtlsctl keeps retired files there")


def plan_retire(pki: Pki, name: str, rows: list[db.IndexRow] | None = None) -> RetirePlan | None:
    """The files at NAME's paths and the certificate they belong to, or None when there are none.

    Raises InputError when they belong to no certificate of NAME in index.txt (never overwritten, never
    archived as something they are not), or when the archive path holds a link.
    """
    present = tuple(rel for rel in name_files(name) if os.path.lexists(pki.path(rel)))
    if not present:
        return None
    own = db.rows_named(pki.path(pki.index), name) if rows is None else [r for r in rows if r.cn == name]
    if not own:
        raise InputError(
            f"files for {name!r} already exist: {', '.join(present)}, and index.txt has no certificate of that name",
            hint="mtlsctl never overwrites a key or certificate; pick another name or move the files away",
        )
    crt = ClientFiles(name).crt
    if os.path.lexists(pki.path(crt)):
        match = [r for r in reversed(own) if db.same_certificate(pki.path(crt), pki.path(db.newcert_path(r.serial)))]
        if not match:
            raise InputError(f"{crt} is not a certificate of {name!r} in this CA's database",
                             hint="mtlsctl never overwrites or archives a certificate it did not issue; move it away")
        serial = match[0].serial
    else:
        serial = own[-1].serial
    _refuse_archive_links(pki, name)
    return RetirePlan(name, serial, present)


def _open_dir(dir_fd: int, part: str, path: Path) -> int:
    """Open one directory below `dir_fd` without following a link (refused by name)."""
    try:
        return os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(path):
            raise InputError(f"{path} is a symbolic link; mtlsctl never writes through one",
                             hint="remove it: mtlsctl creates the archive directories itself (mode 700)") from None
        if exc.errno == errno.ENOTDIR:
            raise InputError(f"{path} is not a directory", hint="move it away: mtlsctl keeps retired files there") from None
        raise


def _make_dir(dir_fd: int, part: str, path: Path, tx: Transaction, made: list[Path]) -> bool:
    """Create directory `part` (mode 700) below `dir_fd`, journaled first. False when something exists there
    already (left alone: a link or a file is refused when it is opened)."""
    try:
        os.stat(part, dir_fd=dir_fd, follow_symlinks=False)
        return False
    except FileNotFoundError:
        pass
    tx.created(path)  # journaled before it exists: a kill after mkdir removes it
    made.append(path)
    try:
        os.mkdir(part, MODE_PRIVATE_DIR, dir_fd=dir_fd)
    except FileExistsError:
        made.pop()
        return False
    fd = _open_dir(dir_fd, part, path)
    try:
        os.fchmod(fd, MODE_PRIVATE_DIR)
    finally:
        os.close(fd)
    return True


def retire(pki: Pki, name: str, tx: Transaction, *, replacing: bool = False) -> Retired | None:
    """Under the writer's lock, inside `tx`: refuse conflicts again, then MOVE the files of NAME's previous
    certificate to archive/NAME/SERIAL/ (the directories 700, created with mkdir and opened O_NOFOLLOW from
    the PKI directory down, never followed). The journal holds each file's bytes and mode before it moves,
    and the archive names as created: a failure or a kill before `tx` commits puts every file back.

    The caller must not record the moved paths as created by `tx` (their snapshot restores them): see
    `_output`. Returns None when NAME has no files.
    """
    plan = refuse_conflicts(pki, name, replacing=replacing)
    if plan is None:
        return None
    if any(r.status == "V" for r in db.rows_named(pki.path(pki.index), name)):
        allow_same_subject(pki, tx)  # an expired row is still V: with unique_subject = yes openssl refuses the new one
    made: list[Path] = []
    root_fd = os.open(pki.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fds = [root_fd]
    try:
        rel = ""
        for part in (ARCHIVE, name):
            rel = f"{rel}/{part}" if rel else part
            _make_dir(fds[-1], part, pki.path(rel), tx, made)
            fds.append(_open_dir(fds[-1], part, pki.path(rel)))
        n = 1
        while True:  # always a directory of this run's own: nothing in it to overwrite
            leaf = plan.serial if n == 1 else f"{plan.serial}-{n}"
            if _make_dir(fds[-1], leaf, pki.path(f"{rel}/{leaf}"), tx, made):
                break
            n += 1
        directory = f"{rel}/{leaf}"
        fds.append(_open_dir(fds[-1], leaf, pki.path(directory)))
        moves = plan.moves(directory)
        sources = [pki.path(src) for src, _ in moves]
        targets = [pki.path(dst) for _, dst in moves]
        tx.snapshot(*sources)  # their bytes and modes: a rollback writes them back
        tx.created(*targets)
        for src, target in zip(sources, targets, strict=True):
            parent_fd = _open_dir(root_fd, src.parent.name, src.parent)  # private/ or certs/, not followed
            try:
                os.rename(src.name, target.name, src_dir_fd=parent_fd, dst_dir_fd=fds[-1])
            finally:
                os.close(parent_fd)
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
    return Retired(plan.serial, directory, frozenset(sources))


def retire_committed(pki: Pki, name: str) -> Retired | None:
    """retire() in a transaction of its own, committed at once (under the writer's lock): for callers whose
    own transaction records NAME's paths as created (sign-csr, add-client --from-file). Only the files of a
    revoked or expired certificate are moved, so committing early leaves nothing valid without its files."""
    with Transaction(pki.root) as tx:
        return retire(pki, name, tx)


def allow_same_subject(pki: Pki, tx: Transaction) -> None:
    """A new certificate beside a V row of the same subject (expired, or the one `replace` revokes next) needs
    `unique_subject = no` in index.txt.attr: a PKI made with the guide has `yes` there (FIELD-NOTES)."""
    attr = pki.path(pki.index_attr)
    if not attr.exists() or "unique_subject = no" not in attr.read_text():
        tx.snapshot(attr)
        atomic_write(attr, "unique_subject = no\n", MODE_PUBLIC)


def issue_notes(pki: Pki, req: IssueRequest) -> list[str]:
    """What --dry-run of add-client/add-server says besides the commands: the archive moves, and for a server
    the chain file nginx render serves (a client gets none)."""
    notes = retire_notes(pki, req.name)
    if req.kind == "server":
        notes.append(f"then {ClientFiles(req.name).fullchain} is written (the certificate"
                     + (" and the issuing CA" if pki.has_chain() else "") + "): what nginx render serves")
    return notes


def retire_notes(pki: Pki, name: str, *, replacing: bool = False) -> list[str]:
    """What --dry-run says about the archive: one `move A -> B` line per file."""
    plan = refuse_conflicts(pki, name, replacing=replacing)
    if plan is None:
        return []
    return [f"move {src} -> {dst}" for src, dst in plan.moves()] + [
        f"(the files of serial {plan.serial}; {plan.directory}/ is created mode 700, never followed)"]


def _output(tx: Transaction, path: Path, mode: int, step: Callable[[], object], moved: frozenset[Path]) -> None:
    """produce() for a path retire() may have emptied: such a path is created exclusively but not recorded
    as created (the journal's snapshot of the old file restores it on rollback; recorded as created too, the
    rollback would remove it again after restoring it)."""
    if path not in moved:
        produce(tx, path, mode, step)
        return
    os.close(create_exclusive(path, mode & MODE_SECRET))
    step()
    chmod_nofollow(path, mode)


def sign_into_database(pki: Pki, cmd: Command, name: str, crt: str, runner: Runner, tx: Transaction) -> db.IndexRow:
    """Run one `openssl ca` signing, then prove the certificate is in index.txt.

    FIELD-NOTES: exit code 0 alone proves nothing (without a lock, parallel runs lost rows). The new
    serial must be in index.txt as V with CN=name, and newcerts/SERIAL.pem must be the file we got.
    The database files and the names in newcerts/ are recorded first; a failure restores the database
    and removes whatever file appeared in newcerts/. The serial is read the way openssl writes it
    (`serial` = 00FF gives index row FF and newcerts/FF.pem).
    """
    protect_database(pki.root, tx)
    serial = db.read_serial(pki.path(pki.serial))
    newcert = db.newcert_path(serial)
    tx.may_create(pki.path(newcert), pki.path(crt))  # openssl writes both: a symlink at either is refused first
    runner.run(cmd, cwd=pki.root)
    normalize_modes(pki.root, DB_FILES_WITH_BACKUPS)
    normalize_modes(pki.root, (newcert,))
    rows = db.rows_with_serial(pki.path(pki.index), serial)
    if len(rows) != 1 or rows[0].status != "V" or rows[0].cn != name:
        raise StateError(
            f"openssl ca exited 0 but serial {serial} for {name} is not (uniquely) in index.txt",
            hint="the database was restored; run the command again",
        )
    if not db.same_certificate(pki.path(crt), pki.path(newcert)):
        raise StateError(f"{crt} does not match {newcert}", hint="the database was restored; run the command again")
    section = _argv_value(cmd.argv, "-extensions")
    kind = next((k for k, base in EXTENSIONS.items() if section in (base, f"{base}_ec")), None)
    check_signed(pki, crt, _argv_value(cmd.argv, "-in"), serial, name, kind)
    chmod_nofollow(pki.path(crt), MODE_PUBLIC)
    return rows[0]


def _argv_value(argv: tuple[str, ...], flag: str) -> str | None:
    """The value after `flag` in an argv (the request `openssl ca -in` was given)."""
    for i, arg in enumerate(argv[:-1]):
        if arg == flag:
            return argv[i + 1]
    return None


def check_signed(pki: Pki, crt: str, request: str | None, serial: str, name: str, kind: str | None = None) -> None:
    """The certificate `openssl ca` wrote, read structurally: the serial and CN of its index.txt row, signed by
    the PKI's CA certificate, no CA (basicConstraints CA:TRUE, keyCertSign or cRLSign), the public key of
    `request`, the CSR it was asked to sign, and (with `kind`, from the v3_client/v3_server/v3_ocsp section it
    was signed with) that kind's one extended key usage. A StateError withdraws it (the transaction rolls back).

    The second line behind openssl's exit code and the database row: an openssl that signed another request,
    with another section or another CA key, is caught here whatever it printed."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from mtlsctl import x509read

    cert = x509read.read_certificate(pki.path(crt))
    found: list[str] = []
    if x509read.serial_hex(cert.serial_number) != serial:
        found.append(f"its serial is {x509read.serial_hex(cert.serial_number)}, not {serial}")
    if x509read.common_name(cert.subject) != name:
        found.append(f"its subject is {x509read.describe_name(cert.subject)!r}, not CN={name}")
    exts = x509read.extensions(cert, crt)
    bc = x509read.basic_constraints(exts)
    if bc is not None and bc[0]:
        found.append("it is a CA certificate (basicConstraints CA:TRUE)")
    signing = (x509read.key_usages(exts) or set()) & {"keyCertSign", "cRLSign"}
    if signing:
        found.append(f"its keyUsage has {', '.join(sorted(signing))}")
    if kind is not None and x509read.kind_of(cert) not in (kind, "ca"):
        found.append(f"its extended key usage makes it {x509read.kind_of(cert)!r}, not a {kind} certificate")
    try:
        cert.verify_directly_issued_by(x509read.read_certificate(pki.path(pki.ca_cert)))
    except (InvalidSignature, ValueError, TypeError):
        found.append(f"it is not signed by {pki.ca_cert}")
    if request is not None:
        try:
            csr = x509read.load_csr(pki.path(request).read_bytes(), request)
            asked = csr.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        except (MtlsError, OSError):
            asked = None
        if asked is None or cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) != asked:
            found.append(f"its public key is not the one of {request}")
    if found:
        raise StateError(f"openssl ca exited 0 but {crt} is not the certificate asked for ({'; '.join(found)}); it was withdrawn",
                         hint="the database was restored; check openssl.cnf's extension sections and which openssl is on PATH")


def write_fullchain(pki: Pki, name: str, tx: Transaction) -> str:
    """certs/NAME.fullchain.pem: the server certificate, then (two-tier) the issuing CA's.

    A client that trusts only the root can build the chain only if the server sends the issuing CA too
    (FIELD-NOTES: curl exit 60, Python and Java fail otherwise); nginx's ssl_certificate serves this file.
    """
    files = ClientFiles(name)
    parts = [db.pem_block(pki.path(files.crt).read_text())]
    if pki.has_chain():
        parts.append(db.pem_block(pki.path(pki.ca_cert).read_text()))
    tx.snapshot(pki.path(files.fullchain))
    atomic_write(pki.path(files.fullchain), "".join(p if p.endswith("\n") else p + "\n" for p in parts), MODE_PUBLIC)
    return files.fullchain


def write_p12(pki: Pki, name: str, out: str, password: str, profile: str, runner: Runner, tx: Transaction) -> None:
    """Export the bundle to a new file `out` (created by mtlsctl first, mode 600), then read it back with the password."""
    files = ClientFiles(name)
    export = openssl.pkcs12_export(name, files.key, files.crt, out, password, profile, pki.ca_bundle)
    produce(tx, pki.path(out), MODE_SECRET, lambda: runner.run(export, cwd=pki.root))
    runner.run(openssl.pkcs12_check(out, password, profile), cwd=pki.root)


P12_WORKDIR = "private/.p12-XXXXXXXX"  # what --dry-run shows for the directory build_p12 uses


def p12_workdir(pki: Pki, name: str, tx: Transaction) -> Path:
    """A private directory (0700, unpredictable name, in private/) for one bundle openssl writes, journaled
    with the bundle inside it: a kill leaves nothing, a replaced bundle never has a predictable temp name."""
    workdir = Path(tempfile.mkdtemp(prefix=".p12-", dir=pki.path("private")))
    tx.created(workdir, workdir / f"{name}.p12")
    return workdir


def build_p12(pki: Pki, name: str, password: str, profile: str, runner: Runner, workdir: Path) -> bytes:
    """Export NAME's bundle into `workdir` (from p12_workdir), read it back with the password, return its bytes.

    mtlsctl puts the bytes where they belong itself (atomic_write: mkstemp in the target directory, fchmod,
    fsync, rename), so openssl never writes into a shared directory such as export --out's.
    """
    files = ClientFiles(name)
    rel = f"{os.path.relpath(workdir, pki.root)}/{name}.p12"
    os.close(create_exclusive(pki.path(rel), MODE_SECRET))
    runner.run(openssl.pkcs12_export(name, files.key, files.crt, rel, password, profile, pki.ca_bundle), cwd=pki.root)
    runner.run(openssl.pkcs12_check(rel, password, profile), cwd=pki.root)
    return pki.path(rel).read_bytes()


def issue_client(settings: Settings, req: IssueRequest, runner: Runner) -> IssueResult:
    """Issue a client certificate and its PKCS#12 bundle (the guide's four commands).

    Raises:
        InputError: the name has an active certificate or files already; nothing written.
        OpenSSLError/StateError: a step failed before issuance; what this run wrote is removed.
        IssuedButExportFailed: the certificate exists; only the bundle failed (run `export`).
    """
    pki = settings.pki
    with read_lock(pki.root, writer=True):  # first checks (exit 2 before anything); again under the writer's lock below
        pki.require_ca()
        refuse_conflicts(pki, req.name)
    require_section(pki, req.extensions)
    command = AUDIT_COMMANDS.get(req.kind, "add-client")
    with pki_lock(pki.lock_path), audit.failures_recorded(pki, command, names=[req.name], kind=req.kind):
        try:
            result = issue_locked(settings, req, runner)
        except IssuedButExportFailed as exc:
            if exc.result is not None:  # issued and kept: the line names its serial, and says the bundle failed
                audit.record(pki, command, names=[req.name], serials=[exc.result.serial], result="failed",
                             error=exc.message, kind=req.kind, issued=True)
                audit.mark_recorded(exc)
            raise
        audit.record(pki, command, names=[req.name], serials=[result.serial], kind=req.kind, days=req.days,
                     sans=",".join(req.sans)[:300] or None, archived=result.archived)
        return result


# The audit log's command for an issuance, by kind (the OCSP signer is issued by `ocsp setup`, and by init).
AUDIT_COMMANDS = {"client": "add-client", "server": "add-server", "ocsp": "ocsp-setup"}


def issue_locked(settings: Settings, req: IssueRequest, runner: Runner, *, replacing: bool = False) -> IssueResult:
    """issue_client's work, with the PKI's writer lock already held (by issue_client, or by `replace`, which
    revokes the old certificate under the same lock once this returns).

    One transaction: the previous certificate's files (a revoked or expired one; with `replacing`, the active
    one `replace` revokes next) move to archive/NAME/SERIAL/, then key, CSR and signature. A failure or a kill
    before the signature is confirmed in index.txt puts everything back where it was, the old files included.
    """
    pki = settings.pki
    password = req.password if req.password is not None else generate_password()
    files = ClientFiles(req.name)
    keygen, csr, sign = issue_commands(req)[:3]
    with Transaction(pki.root) as tx:
        retired = retire(pki, req.name, tx, replacing=replacing)  # refuses conflicts again, under the lock
        moved = retired.moved if retired else frozenset()
        _output(tx, pki.path(files.key), MODE_SECRET, lambda: runner.run(keygen, cwd=pki.root), moved)
        _output(tx, pki.path(files.csr), MODE_PUBLIC, lambda: runner.run(csr, cwd=pki.root), moved)
        if pki.path(files.crt) in moved:  # openssl writes into a file mtlsctl made; the snapshot restores the old one
            os.close(create_exclusive(pki.path(files.crt), MODE_SECRET))
        row = sign_into_database(pki, sign, req.name, files.crt, runner, tx)
        if req.kind == "server":
            write_fullchain(pki, req.name, tx)
        tx.checkpoint()  # issued: the key, CSR, certificate, database change and the archive stay
        result = IssueResult(
            name=req.name, serial=row.serial, not_after=row.expires, key=pki.path(files.key),
            csr=pki.path(files.csr), crt=pki.path(files.crt), p12=None, p12_profile=None, password=None, sans=req.sans,
            archived=retired.directory if retired else None, archived_serial=retired.serial if retired else None,
        )
        if req.kind != "client":
            return result
        try:
            write_p12(pki, req.name, files.p12, password, req.p12, runner, tx)
        except MtlsError as exc:
            raise IssuedButExportFailed(
                f"certificate for {req.name} issued (serial {row.serial}), but the PKCS#12 export failed: {exc.message}",
                hint=f"fix the cause, then run `mtlsctl export {req.name}`", result=result,
            ) from exc
    return replace_fields(result, p12=pki.path(files.p12), p12_profile=req.p12,
                          password=None if req.password is not None else password)


@dataclass(frozen=True)
class ExportResult:
    name: str
    serial: str
    p12: Path
    p12_profile: str
    password: str | None = field(repr=False)  # only when generated
    password_file: Path | None = None  # private/NAME.p12.password, rewritten with the generated password
    removed_password_file: Path | None = None  # removed: the user gave the password, the old file was stale
    format: str = "p12"  # or "mobileconfig": the bundle inside an Apple configuration profile
    signed: bool = False  # mobileconfig: signed with the profile's mobileconfig.signer_cert
    ca: str | None = None  # mobileconfig --with-ca: the CA certificate installed with it (relative to the PKI)


EXPORT_FORMATS = ("p12", "mobileconfig")


def export_format(fmt: str | None, with_ca: bool = False) -> str:
    """--format, checked (any case): p12 or mobileconfig; --with-ca only with mobileconfig. Raises InputError."""
    chosen = (fmt or "p12").lower()
    if chosen not in EXPORT_FORMATS:
        raise InputError(f"--format {fmt!r} is not an export format", hint="use p12 or mobileconfig")
    if with_ca and chosen != "mobileconfig":
        raise InputError("--with-ca is for --format mobileconfig",
                         hint="a .p12 already carries the CA chain; --with-ca adds the CA as a trusted root payload")
    return chosen


def export_profile(fmt: str, p12: str | None, settings: Settings) -> str:
    """The PKCS#12 profile of the bundle: --p12, else compat inside a mobileconfig (what iOS imports, FIELD-NOTES),
    else the profile's clients.p12."""
    profile = p12 or ("compat" if fmt == "mobileconfig" else settings.profile.clients.p12)
    if profile not in openssl.P12_FLAGS:
        raise InputError(f"--p12 {profile!r} is not a PKCS#12 profile", hint="use compat, modern or legacy")
    return profile


def export_commands(name: str, out: str, profile: str, certfile: str = Pki.ca_cert) -> list[Command]:
    files = ClientFiles(name)
    return [
        openssl.pkcs12_export(name, files.key, files.crt, out, "", profile, certfile),
        openssl.pkcs12_check(out, "", profile),
    ]


def current_row(pki: Pki, name: str) -> db.IndexRow:
    """The database row of certs/NAME.crt, matched by content against newcerts/SERIAL.pem."""
    files = ClientFiles(name)
    crt = pki.path(files.crt)
    if not crt.exists():
        raise InputError(f"no certificate for {name!r} ({files.crt} missing)", hint="see `mtlsctl list`, or issue one with add-client")
    for row in reversed(db.rows_named(pki.path(pki.index), name)):
        if db.same_certificate(crt, pki.path(db.newcert_path(row.serial))):
            return row
    raise StateError(f"{files.crt} is not in this CA's database", hint="it was not issued by this PKI")


def check_exportable(pki: Pki, name: str, now: datetime | None = None) -> db.IndexRow:
    """The row of the certificate a bundle would carry, refused unless it is active and a client's.

    Decided from certs/NAME.crt's own row (matched by content), never from whether NAME has some valid row:
    a newer valid certificate of the name elsewhere does not make a revoked certs/NAME.crt exportable.
    """
    row = current_row(pki, name)
    now = now or datetime.now(timezone.utc)
    if row.status != "V" or not row.is_active(now):
        state = "revoked" if row.status == "R" else "expired"
        raise InputError(f"the certificate of {name!r} in {ClientFiles(name).crt} (serial {row.serial}) is {state}; "
                         "no bundle is made for it",
                         hint=f"issue a new one: `mtlsctl add-client {name}` (the old files move to "
                              f"{ARCHIVE}/{name}/{row.serial}/); for a lost device that is still valid, `mtlsctl replace {name}`")
    from mtlsctl.x509read import kind_of, read_certificate

    kind = kind_of(read_certificate(pki.path(ClientFiles(name).crt)))
    if kind != "client":
        raise InputError(f"{name!r} is not a client certificate (its extended key usage says {kind}); no bundle is made for it",
                         hint="a PKCS#12 bundle carries a client's key to a device; a server's key stays on the server")
    return row


def plan_export(settings: Settings, name: str, *, p12: str | None, out: Path | None, fmt: str | None = None,
                with_ca: bool = False) -> tuple[list[Command], list[str]]:
    """What `export --dry-run` prints: the refusals of the real run (revoked, expired, not a client) first,
    then the openssl commands (into the private work directory) and where the bundle would be written."""
    from mtlsctl import mobileconfig

    pki = settings.pki
    chosen = export_format(fmt, with_ca)
    profile = export_profile(chosen, p12, settings)
    pki.require_ca()
    with read_lock(pki.root):
        check_exportable(pki, name)  # a revoked or expired certificate gets no bundle, dry run or not
    suffix = mobileconfig.SUFFIX if chosen == "mobileconfig" else ".p12"
    target = out.absolute() if out else pki.path(f"certs/{name}{suffix}")
    commands = export_commands(name, f"{P12_WORKDIR}/{name}.p12", profile, pki.ca_bundle)
    notes = []
    if chosen == "mobileconfig":
        signer = mobileconfig.signer(settings)
        ids = mobileconfig.identifiers(mobileconfig.identifier_prefix(settings), name)
        notes.append(f"the bundle goes into a configuration profile (identifier {ids.profile}"
                     + (f", with {mobileconfig.trust_anchor(pki)} as a root payload" if with_ca else "")
                     + "); its password is not in the profile")
        if signer is None:
            notes.append("unsigned (no mobileconfig.signer_cert): iOS shows it as Not Verified")
        else:
            notes.append(f"signed in the same directory ({P12_WORKDIR}/); the key's passphrase on a pipe")
            commands += mobileconfig.sign_commands(signer, *(f"{P12_WORKDIR}/{work}" for work in (
                mobileconfig.UNSIGNED, mobileconfig.SIGNED, mobileconfig.CHECK)))
    return commands, notes + [f"then written to {target} (a new file with an unpredictable name, renamed into place)"]


def export_client(settings: Settings, name: str, *, p12: str | None, password: str | None,
                  out: Path | None, force: bool, runner: Runner, fmt: str | None = None,
                  with_ca: bool = False) -> ExportResult:
    """Write a fresh PKCS#12 bundle for an issued, active client (atomically; old bundle kept unless --force).

    With `fmt` "mobileconfig" the bundle (compat unless `p12` says otherwise) goes into an Apple configuration
    profile (mtlsctl/mobileconfig.py), with the CA as a root payload when `with_ca`, signed when the profile
    names a signer; written to certs/NAME.mobileconfig (or --out) like a bundle, 0600. Its password is not
    in the profile and no password file is written for it.
    """
    from mtlsctl import mobileconfig

    pki = settings.pki
    validate.client_name(name, role="client")
    chosen = export_format(fmt, with_ca)
    profile = export_profile(chosen, p12, settings)
    signer = mobileconfig.signer(settings) if chosen == "mobileconfig" else None
    if password is not None:
        validate.password(password, source="the password option")
    with read_lock(pki.root, writer=True):
        pki.require_ca()
        check_exportable(pki, name)  # revoked, expired, not a client: exit 2 before anything
    files = ClientFiles(name)
    file_name = f"{name}{mobileconfig.SUFFIX}" if chosen == "mobileconfig" else f"{name}.p12"
    target = (out if out is not None else pki.path(f"certs/{file_name}")).absolute()
    if out is not None and target.is_dir() and not target.is_symlink():
        target = target / file_name  # --out DIR: the bundle's usual name in that directory
    refuse_symlink(target)  # a link planted at --out (or certs/NAME.p12) is refused by name, before openssl runs
    if target.exists() and not force:
        raise InputError(f"{target} already exists", hint="add --force to replace it, or --out to write elsewhere")
    if target.exists() and not target.is_file():  # /dev/zero, a FIFO: never read (snapshotted) nor replaced
        raise InputError(f"--out {target} is not a regular file", hint="give a file name (or a directory) for the bundle")
    if not target.parent.is_dir():
        raise InputError(f"--out {target}: directory {target.parent} does not exist")
    if not pki.path(files.key).exists():
        raise InputError(f"no private key for {name!r} ({files.key} missing)",
                         hint="a bundle needs the key; a CSR signed elsewhere has none here")
    # The password file belongs to certs/NAME.p12: a bundle written there replaces it (a generated password)
    # or removes it (the user's own); a bundle written elsewhere (--out) leaves both alone.
    own_p12 = pki.path(files.p12)  # compared resolved (a PKI reached through a link) and by inode
    own_bundle = os.path.realpath(target) == os.path.realpath(own_p12) or (
        target.exists() and own_p12.exists() and os.path.samefile(target, own_p12))
    if own_bundle and chosen == "mobileconfig":
        raise InputError(f"--out {target} is the client's PKCS#12 bundle", hint=f"write the profile elsewhere, e.g. certs/{file_name}")
    refuse_pki_target(pki, target, f"certs/{file_name}")
    secret_file = pki.path(password_file(name))
    if own_bundle:
        refuse_symlink(secret_file)
    secret = password if password is not None else generate_password()
    with pki_lock(pki.lock_path), audit.failures_recorded(pki, "export", names=[name], format=chosen), \
            Transaction(pki.root) as tx:
        row = check_exportable(pki, name)  # again, under the lock
        # openssl writes into a private directory of the PKI; mtlsctl then writes the bytes to an unpredictable
        # mkstemp name next to the target (never followed) and renames it into place.
        workdir = p12_workdir(pki, name, tx)
        try:
            data = build_p12(pki, name, secret, profile, runner, workdir)
            if chosen == "mobileconfig":
                anchor = mobileconfig.trust_anchor(pki)
                data = mobileconfig.build(name, data, prefix=mobileconfig.identifier_prefix(settings),
                                          organization=mobileconfig.organization(settings),
                                          ca_der=mobileconfig.certificate_der(pki.path(anchor)) if with_ca else None,
                                          ca_file_name=Path(anchor).name)
                if signer is not None:
                    tx.created(*mobileconfig.work_files(workdir))
                    data = mobileconfig.sign(data, signer, runner, workdir, cwd=pki.root)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        tx.snapshot(target)
        atomic_write(target, data, MODE_SECRET)
        written = removed = None
        if own_bundle and os.path.lexists(secret_file):
            tx.snapshot(secret_file)
            if password is None:
                atomic_write(secret_file, secret + "\n", MODE_SECRET)
                written = secret_file
            else:
                os.unlink(secret_file)
                removed = secret_file
        tx.checkpoint()
        audit.record(pki, "export", names=[name], serials=[row.serial], format=chosen, p12_profile=profile,
                     out=None if own_bundle else str(target))
    return ExportResult(name, row.serial, target, profile, None if password is not None else secret,
                        password_file=written, removed_password_file=removed, format=chosen, signed=signer is not None,
                        ca=mobileconfig.trust_anchor(pki) if with_ca else None)


# ------------------------------------------------------------------ bulk issuance (add-client --from-file)


@dataclass
class BatchResult:
    issued: list[IssueResult] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    password_files: dict[str, Path] = field(default_factory=dict)


def read_names(text: str) -> list[str]:
    """One name per line; blank lines and # comments are skipped; every name is validated, duplicates refused.

    Every problem of the file is reported in one run, each with its line number (a list of 200 devices
    is not fixed one error per run); nothing is issued while any remains.
    """
    names: list[str] = []
    first_line: dict[str, int] = {}
    problems: list[str] = []
    hints: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            validate.client_name(line)
        except InputError as exc:
            problems.append(f"line {lineno}: {exc.message}")
            if exc.hint and exc.hint not in hints:
                hints.append(exc.hint)
            continue
        first = first_line.get(line.lower())
        if first is not None:
            problems.append(f"line {lineno}: {line!r} is listed twice (first on line {first}; names are unique regardless of case)")
            continue
        first_line[line.lower()] = lineno
        names.append(line)
    if len(problems) == 1:
        raise InputError(problems[0], hint=hints[0] if hints else "fix that line; nothing was issued")
    if problems:
        raise InputError(f"the names file has {len(problems)} problems; nothing was issued:\n"
                         + "\n".join(f"  {p}" for p in problems),
                         hint="; ".join(hints + ["fix those lines and run the command again"]))
    if not names:
        raise InputError("the names file lists no names", hint="one client name per line")
    return names


@contextlib.contextmanager
def retired_first(pki: Pki, names: list[str]) -> Iterator[None]:
    """Under the writer's lock, before the batch's transaction: every name's conflicts checked, then the files
    of the revoked or expired certificates of those names archived, committed (the batch's journal records
    the guide's paths as created, and its per-client commits would drop the snapshots that restore them)."""
    for name in names:
        refuse_conflicts(pki, name)
    for name in names:
        retire_committed(pki, name)
    yield


MAX_WORKERS = 64


def batch_workers(jobs: int | None) -> int | None:
    """--jobs N for a batch: 1..MAX_WORKERS, or None for one per core. Raises InputError."""
    if jobs is not None and not 1 <= jobs <= MAX_WORKERS:
        raise InputError(f"--jobs {jobs} is out of range", hint=f"use 1..{MAX_WORKERS}")
    return jobs


def issue_batch(settings: Settings, names: list[str], runner: Runner, *, days: int | None = None,
                key_type: str | None = None, p12: str | None = None, workers: int | None = None) -> BatchResult:
    """Issue many clients: keys and CSRs in parallel across cores, `openssl ca` one at a time under the lock
    (it has no locking of its own), then the bundles in parallel. Passwords go to private/NAME.p12.password.

    Everything is checked first (names, conflicts): a bad list writes nothing. One journal guards the batch;
    a failed signing stops the batch there, keeps what was issued before it and removes the rest.
    """
    from concurrent.futures import ThreadPoolExecutor

    pki = settings.pki
    reqs = [build_request(settings, name, days=days, key_type=key_type, p12=p12) for name in names]
    with read_lock(pki.root, writer=True):
        pki.require_ca()
        for req in reqs:
            refuse_conflicts(pki, req.name)
    if reqs:
        require_section(pki, reqs[0].extensions)
    workers = workers or os.cpu_count() or 1
    result = BatchResult()
    with pki_lock(pki.lock_path), audit.failures_recorded(pki, "add-client", names=[r.name for r in reqs], kind="client",
                                                          batch=len(reqs)), \
            retired_first(pki, [r.name for r in reqs]), Transaction(pki.root) as tx:
        for req in reqs:
            refuse_conflicts(pki, req.name)
        for req in reqs:  # mtlsctl creates each output first (O_EXCL|O_NOFOLLOW); openssl writes into it
            files = ClientFiles(req.name)
            tx.created(pki.path(files.key), pki.path(files.csr))
            for rel, mode in ((files.key, MODE_SECRET), (files.csr, MODE_SECRET)):
                os.close(create_exclusive(pki.path(rel), mode))

        def make_key_and_csr(req: IssueRequest) -> None:
            keygen, csr = issue_commands(req)[:2]
            files = ClientFiles(req.name)
            runner.run(keygen, cwd=pki.root)
            chmod_nofollow(pki.path(files.key), MODE_SECRET)
            runner.run(csr, cwd=pki.root)
            chmod_nofollow(pki.path(files.csr), MODE_PUBLIC)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(make_key_and_csr, reqs))  # the first failure is raised here: the whole batch is undone

        rows: dict[str, db.IndexRow] = {}
        for req in reqs:
            files = ClientFiles(req.name)
            sign = openssl.ca_sign(files.csr, files.crt, req.days, extensions=req.extensions)
            row = sign_into_database(pki, sign, req.name, files.crt, runner, tx)
            rows[req.name] = row
            tx.keep([pki.path(files.key), pki.path(files.csr), pki.path(files.crt)])
        tx.checkpoint()

        # The bundles, still under the lock: openssl in parallel, each into its own private directory (journaled
        # before the threads start); then this thread puts each bundle and its password file in place.
        passwords = {req.name: generate_password() for req in reqs}
        workdirs = {req.name: p12_workdir(pki, req.name, tx) for req in reqs}

        def bundle(req: IssueRequest) -> tuple[str, bytes | str]:
            try:
                return req.name, build_p12(pki, req.name, passwords[req.name], req.p12, runner, workdirs[req.name])
            except MtlsError as exc:
                return req.name, exc.message

        with ThreadPoolExecutor(max_workers=workers) as pool:
            built = dict(pool.map(bundle, reqs))
        outcomes: dict[str, str | None] = {}
        for req in reqs:
            data = built[req.name]
            shutil.rmtree(workdirs[req.name], ignore_errors=True)
            if isinstance(data, str):
                outcomes[req.name] = data
                continue
            password_file, bundle_file = pki.path(f"private/{req.name}.p12.password"), pki.path(ClientFiles(req.name).p12)
            tx.snapshot(password_file, bundle_file)
            atomic_write(password_file, passwords[req.name] + "\n", MODE_SECRET)
            atomic_write(bundle_file, data, MODE_SECRET)
            outcomes[req.name] = None
        tx.checkpoint()
        done = [req.name for req in reqs if outcomes[req.name] is None]
        audit.record(pki, "add-client", names=done, serials=[rows[n].serial for n in done], kind="client",
                     batch=len(reqs), failed=len(reqs) - len(done))
        bad = [req.name for req in reqs if outcomes[req.name] is not None]
        if bad:
            audit.record(pki, "add-client", names=bad, serials=[rows[n].serial for n in bad], result="failed",
                         error=f"issued, but the bundle failed: {outcomes[bad[0]]}", kind="client", batch=len(reqs),
                         issued=True)

    for req in reqs:
        files, row = ClientFiles(req.name), rows[req.name]
        error = outcomes[req.name]
        if error:
            result.failed.append((req.name, f"issued (serial {row.serial}) but the bundle failed: {error}; "
                                            f"run `mtlsctl export {req.name}`"))
            continue
        result.issued.append(IssueResult(
            name=req.name, serial=row.serial, not_after=row.expires, key=pki.path(files.key), csr=pki.path(files.csr),
            crt=pki.path(files.crt), p12=pki.path(files.p12), p12_profile=req.p12, password=None, sans=()))
        result.password_files[req.name] = pki.path(f"private/{req.name}.p12.password")
    return result
