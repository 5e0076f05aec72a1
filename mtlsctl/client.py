"""`add-client` and `export`: the guide's mtls-add-client.sh, done safely.

Order of work (the guide's four commands): key, CSR, signature by the CA, PKCS#12 bundle.
Everything is checked before the first write; a failure removes what this run created; once the
certificate is in the database it stays (and the error says so and points at `export`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from mtlsctl import db, openssl, validate
from mtlsctl.errors import InputError, MtlsError, StateError
from mtlsctl.files import (
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
from mtlsctl.profile import KeySpec
from mtlsctl.runner import Command, Runner

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


class IssuedButExportFailed(MtlsError):
    """The certificate is issued and in the database; only the PKCS#12 bundle is missing."""


def build_request(settings: Settings, name: str, *, days: int | None = None, key_type: str | None = None,
                  p12: str | None = None, sans: tuple[str, ...] | list[str] = (), password: str | None = None,
                  kind: str = "client") -> IssueRequest:
    """Validate user input against the profile's defaults (raises InputError, writes nothing)."""
    clients = settings.profile.clients
    key = clients.key_spec
    if key_type is not None and key_type not in ("rsa", "ec"):
        raise InputError(f"--key-type {key_type!r} is not a key type", hint="use rsa or ec")
    if key_type is not None and key_type != key.type:
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


def refuse_conflicts(pki: Pki, name: str) -> None:
    rows = db.read_index(pki.path(pki.index))
    # nginx compares allowlist map keys without case: `Admin` must not be issued beside an active `admin`.
    active = [r for r in rows if (r.cn or "").lower() == name.lower() and r.is_active()]
    if active:
        serials = ", ".join(r.serial for r in active)
        holder = active[-1].cn
        if holder != name:
            raise InputError(
                f"{name!r} differs only in case from {holder!r}, which has an active certificate (serial {serials})",
                hint="names are unique regardless of case (nginx allowlists compare them without case); pick another name",
            )
        has_key = pki.path(ClientFiles(name).key).exists()
        raise InputError(
            f"{name!r} already has an active certificate (serial {serials})",
            hint=(f"revoke it first, or renew it; to make a new bundle use `mtlsctl export {name}`" if has_key else
                  f"revoke it first (mtlsctl revoke {name}), or renew it (mtlsctl renew); its key is not on this host"),
        )
    links = [rel for rel in (*ClientFiles(name).all(), f"private/{name}.p12.password") if pki.path(rel).is_symlink()]
    if links:  # a dangling one too: openssl would create its target wherever it points
        raise InputError(f"{pki.path(links[0])} is a symbolic link; mtlsctl never writes through one",
                         hint="remove it: mtlsctl creates the files of a client itself")
    existing = [rel for rel in ClientFiles(name).all() if os.path.lexists(pki.path(rel))]
    if existing:
        raise InputError(
            f"files for {name!r} already exist: {', '.join(existing)}",
            hint="mtlsctl never overwrites a key or certificate; pick another name or move the files away",
        )


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
    rows = [r for r in db.read_index(pki.path(pki.index)) if r.serial == serial]
    if len(rows) != 1 or rows[0].status != "V" or rows[0].cn != name:
        raise StateError(
            f"openssl ca exited 0 but serial {serial} for {name} is not (uniquely) in index.txt",
            hint="the database was restored; run the command again",
        )
    if not db.same_certificate(pki.path(crt), pki.path(newcert)):
        raise StateError(f"{crt} does not match {newcert}", hint="the database was restored; run the command again")
    chmod_nofollow(pki.path(crt), MODE_PUBLIC)
    return rows[0]


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
    password = req.password if req.password is not None else generate_password()
    files = ClientFiles(req.name)
    keygen, csr, sign = issue_commands(req)[:3]
    with pki_lock(pki.lock_path), Transaction(pki.root) as tx:
        refuse_conflicts(pki, req.name)  # again, under the lock
        produce(tx, pki.path(files.key), MODE_SECRET, lambda: runner.run(keygen, cwd=pki.root))
        produce(tx, pki.path(files.csr), MODE_PUBLIC, lambda: runner.run(csr, cwd=pki.root))
        row = sign_into_database(pki, sign, req.name, files.crt, runner, tx)
        if req.kind == "server":
            write_fullchain(pki, req.name, tx)
        tx.checkpoint()  # issued: the key, CSR, certificate and database change stay
        if req.kind != "client":
            return IssueResult(
                name=req.name, serial=row.serial, not_after=row.expires, key=pki.path(files.key),
                csr=pki.path(files.csr), crt=pki.path(files.crt), p12=None, p12_profile=None, password=None, sans=req.sans,
            )
        try:
            write_p12(pki, req.name, files.p12, password, req.p12, runner, tx)
        except MtlsError as exc:
            raise IssuedButExportFailed(
                f"certificate for {req.name} issued (serial {row.serial}), but the PKCS#12 export failed: {exc.message}",
                hint=f"fix the cause, then run `mtlsctl export {req.name}`",
            ) from exc
    return IssueResult(
        name=req.name, serial=row.serial, not_after=row.expires,
        key=pki.path(files.key), csr=pki.path(files.csr), crt=pki.path(files.crt), p12=pki.path(files.p12),
        p12_profile=req.p12, password=None if req.password is not None else password, sans=req.sans,
    )


@dataclass(frozen=True)
class ExportResult:
    name: str
    serial: str
    p12: Path
    p12_profile: str
    password: str | None = field(repr=False)  # only when generated


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
    for row in reversed(db.read_index(pki.path(pki.index))):
        if row.cn == name and db.same_certificate(crt, pki.path(db.newcert_path(row.serial))):
            return row
    raise StateError(f"{files.crt} is not in this CA's database", hint="it was not issued by this PKI")


def export_client(settings: Settings, name: str, *, p12: str | None, password: str | None,
                  out: Path | None, force: bool, runner: Runner) -> ExportResult:
    """Write a fresh PKCS#12 bundle for an issued, active client (atomically; old bundle kept unless --force)."""
    pki = settings.pki
    validate.client_name(name, role="client")
    profile = p12 or settings.profile.clients.p12
    if profile not in openssl.P12_FLAGS:
        raise InputError(f"--p12 {profile!r} is not a PKCS#12 profile", hint="use compat, modern or legacy")
    if password is not None:
        validate.password(password, source="the password option")
    with read_lock(pki.root, writer=True):
        pki.require_ca()
    files = ClientFiles(name)
    target = (out if out is not None else pki.path(files.p12)).absolute()
    if out is not None and target.is_dir() and not target.is_symlink():
        target = target / f"{name}.p12"  # --out DIR: the bundle's usual name in that directory
    refuse_symlink(target)  # a link planted at --out (or certs/NAME.p12) is refused by name, before openssl runs
    if target.exists() and not force:
        raise InputError(f"{target} already exists", hint="add --force to replace it, or --out to write elsewhere")
    if not target.parent.is_dir():
        raise InputError(f"--out {target}: directory {target.parent} does not exist")
    if not pki.path(files.key).exists():
        raise InputError(f"no private key for {name!r} ({files.key} missing)", hint="a bundle needs the key; a CSR signed elsewhere has none here")
    secret = password if password is not None else generate_password()
    with pki_lock(pki.lock_path), Transaction(pki.root) as tx:
        row = current_row(pki, name)
        if not row.is_active():
            state = "revoked" if row.status == "R" else "expired"
            raise InputError(f"the certificate of {name!r} (serial {row.serial}) is {state}", hint=f"issue a new one: mtlsctl add-client {name}")
        from mtlsctl.x509read import kind_of, read_certificate

        kind = kind_of(read_certificate(pki.path(files.crt)))
        if kind != "client":
            raise InputError(f"{name!r} is not a client certificate (its extended key usage says {kind}); no bundle is made for it",
                             hint="a PKCS#12 bundle carries a client's key to a device; a server's key stays on the server")
        # openssl writes into a private directory of the PKI; mtlsctl then writes the bytes to an unpredictable
        # mkstemp name next to the target (never followed) and renames it into place.
        workdir = p12_workdir(pki, name, tx)
        try:
            data = build_p12(pki, name, secret, profile, runner, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        tx.snapshot(target)
        atomic_write(target, data, MODE_SECRET)
    return ExportResult(name, row.serial, target, profile, None if password is not None else secret)


# ------------------------------------------------------------------ bulk issuance (add-client --from-file)


@dataclass
class BatchResult:
    issued: list[IssueResult] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    password_files: dict[str, Path] = field(default_factory=dict)


def read_names(text: str) -> list[str]:
    """One name per line; blank lines and # comments are skipped; every name is validated, duplicates refused."""
    names: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            validate.client_name(line)
        except InputError as exc:
            raise InputError(f"line {lineno}: {exc.message}", hint=exc.hint) from None
        if line.lower() in (n.lower() for n in names):
            raise InputError(f"line {lineno}: {line!r} is listed twice (names are unique regardless of case)")
        names.append(line)
    if not names:
        raise InputError("the names file lists no names", hint="one client name per line")
    return names


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
    with pki_lock(pki.lock_path), Transaction(pki.root) as tx:
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

    for req in reqs:
        files, row = ClientFiles(req.name), rows[req.name]
        error = outcomes[req.name]
        if error:
            result.failed.append((req.name, f"issued (serial {row.serial}) but the bundle failed: {error}; run `mtlsctl export {req.name}`"))
            continue
        result.issued.append(IssueResult(
            name=req.name, serial=row.serial, not_after=row.expires, key=pki.path(files.key), csr=pki.path(files.csr),
            crt=pki.path(files.crt), p12=pki.path(files.p12), p12_profile=req.p12, password=None, sans=()))
        result.password_files[req.name] = pki.path(f"private/{req.name}.p12.password")
    return result
