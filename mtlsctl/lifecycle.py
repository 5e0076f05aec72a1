"""Revoke, list, renew and verify: the certificate lifecycle, driven by index.txt.

Scans read index.txt once in Python (no subprocess per certificate: the guide's renew loop runs
openssl three times per file). Changes hold the PKI lock and roll back what a failed step wrote.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from mtlsctl import audit, db, openssl, validate
from mtlsctl.client import generate_password, write_fullchain
from mtlsctl.crl import CrlInfo, gencrl_command, generate_crl, is_due, missing_revocations, read_crl_info, read_crl_info_or_none
from mtlsctl.csr import check_renewal, read_request_file, review_request, sign_reviewed
from mtlsctl.errors import InputError, MtlsError, StateError
from mtlsctl.files import (
    MODE_PUBLIC,
    MODE_SECRET,
    Transaction,
    atomic_write,
    create_exclusive,
    normalize_modes,
    pki_lock,
    protect_database,
    read_lock,
)
from mtlsctl.pki import DB_FILES_WITH_BACKUPS, ClientFiles, Pki, Settings
from mtlsctl.runner import Command, Runner

if TYPE_CHECKING:
    from mtlsctl.client import IssueRequest, IssueResult

# RFC 5280 reasons openssl ca accepts; never removeFromCRL (it marks R but is not treated as revoked).
REASONS = ("unspecified", "keyCompromise", "CACompromise", "affiliationChanged", "superseded",
           "cessationOfOperation", "certificateHold")


def reason(value: str) -> str:
    """Canonical spelling of a revocation reason, case-insensitive."""
    for known in REASONS:
        if value.lower() == known.lower():
            return known
    raise InputError(f"--reason {value!r} is not a revocation reason", hint="use one of: " + ", ".join(REASONS))


def serial(value: str) -> str:
    """A serial as index.txt writes it: upper-case, even-length hex (0x prefix and colons allowed)."""
    text = value.strip().upper().removeprefix("0X").replace(":", "")
    if not text or not all(c in "0123456789ABCDEF" for c in text):
        raise InputError(f"--serial {value!r} is not a hexadecimal serial", hint="e.g. --serial 1000 (see `mtlsctl list`)")
    text = text.lstrip("0") or "0"
    return text.zfill(len(text) + len(text) % 2)


STATUSES = ("valid", "expiring", "expired", "revoked")


def status_of(row: db.IndexRow, now: datetime, expiring_days: int = 0) -> str:
    """revoked; expired (past notAfter: openssl leaves such rows V until -updatedb); expiring (valid, but
    notAfter within `expiring_days`, the profile's renew.within_days); else valid. Computed at run time."""
    if row.status == "R":
        return "revoked"
    if not row.is_active(now):
        return "expired"
    return "expiring" if row.expires <= now + timedelta(days=expiring_days) else "valid"


def days_left(when: datetime, now: datetime) -> int:
    """Whole days until `when`, counting a started day: 365 for a certificate issued for 365 days a moment
    ago, 1 when it ends within the next 24 hours, 0 or less once it has ended. Every day count mtlsctl
    prints (list, the CA and CRL lines) uses this one rule."""
    return math.ceil((when - now).total_seconds() / 86400)


def cert_file(pki: Pki, row: db.IndexRow) -> str:
    """The file that holds a row's certificate: certs/NAME.crt (the guide's) when it is this serial's."""
    newcert = f"newcerts/{row.serial}.pem"
    if row.cn and db.same_certificate(pki.path(f"certs/{row.cn}.crt"), pki.path(newcert)):
        return f"certs/{row.cn}.crt"
    if pki.path(newcert).exists():
        return newcert
    raise StateError(f"no file holds the certificate with serial {row.serial}", hint=f"{newcert} is missing")


def cert_kind(pki: Pki, row: db.IndexRow) -> str:
    """client, server or ocsp: read from the certificate's EKU OIDs (mtlsctl.x509read), never from text.

    Raises StateError for anything else (a CA, several or no EKUs): such a certificate is not renewed
    as something it may not be.
    """
    from mtlsctl.x509read import kind_of, read_certificate

    kind = kind_of(read_certificate(pki.path(cert_file(pki, row))))
    if kind not in ("client", "server", "ocsp"):
        raise StateError(f"serial {row.serial} is not a client, server or OCSP signer certificate (its EKU says {kind}); "
                         "it is not renewed", hint=f"issue a new certificate for {row.cn} instead")
    return kind


def revoke_command(cert: str, why: str) -> Command:
    """The guide's revocation, with the reason: `openssl ca -config openssl.cnf -revoke FILE -crl_reason R`."""
    return Command(("openssl", "ca", "-config", "openssl.cnf", "-revoke", cert, "-crl_reason", why),
                   label=f"revoking {cert} ({why})", uses_ca_key=True)


def revoke_row(pki: Pki, row: db.IndexRow, why: str, runner: Runner, tx: Transaction, cert: str | None = None) -> None:
    """Revoke one database row (from `cert`, else the file that holds it) and prove it is R afterwards."""
    protect_database(pki.root, tx, signs=False)
    runner.run(revoke_command(cert or cert_file(pki, row), why), cwd=pki.root)
    normalize_modes(pki.root, DB_FILES_WITH_BACKUPS)
    after = db.rows_with_serial(pki.path(pki.index), row.serial)
    if len(after) != 1 or after[0].status != "R":
        raise StateError(f"openssl ca exited 0 but serial {row.serial} is not revoked in index.txt",
                         hint="the database was restored; run the command again")


@dataclass(frozen=True)
class RevokeResult:
    revoked: list[str]  # serials revoked now
    already: list[str]  # serials that were revoked before
    expired: list[str]  # serials that had expired (nothing to do)
    crl: CrlInfo | None

    @property
    def changed(self) -> bool:
        """The CRL changed: publish it and reload nginx (after_change)."""
        return bool(self.revoked) or self.crl is not None


def select_for_revoke(pki: Pki, name: str | None, serial_hex: str | None) -> list[db.IndexRow]:
    """The rows `revoke` acts on: the serial's, else the name's (only those rows are parsed: db.rows_named)."""
    if serial_hex is not None:
        found = db.rows_with_serial(pki.path(pki.index), serial_hex)
        if not found:
            raise InputError(f"no certificate with serial {serial_hex} in index.txt", hint="see `mtlsctl list`")
        return found
    assert name is not None
    found = db.rows_named(pki.path(pki.index), name)
    if not found:
        raise InputError(f"no certificate named {name!r} in index.txt", hint="see `mtlsctl list`")
    return found


def plan_revoke(settings: Settings, *, name: str | None, serial_hex: str | None, why: str,
                now: datetime | None = None) -> tuple[list[Command], list[str]]:
    """What `revoke --dry-run` prints: one `openssl ca -revoke` per active certificate, then the CRL's command."""
    pki = settings.pki
    now = now or datetime.now(timezone.utc)
    pki.require_ca()
    rows = [r for r in select_for_revoke(pki, name, serial_hex) if r.is_active(now)]
    commands = [revoke_command(cert_file(pki, r), why) for r in rows]
    if commands:
        commands.append(gencrl_command(settings.profile.crl.days, now))
    return commands, [] if commands else ["nothing to revoke: no valid certificate"]


def revoke(settings: Settings, *, name: str | None, serial_hex: str | None, why: str, runner: Runner,
           now: datetime | None = None) -> RevokeResult:
    """Revoke a name's valid certificate(s), or one serial, then regenerate the CRL.

    Idempotent: already-revoked certificates are reported, not an error.
    """
    pki = settings.pki
    now = now or datetime.now(timezone.utc)
    pki.require_ca()
    with read_lock(pki.root, writer=True):
        select_for_revoke(pki, name, serial_hex)  # unknown name/serial: exit 2 before the lock
    with pki_lock(pki.lock_path), audit.failures_recorded(pki, "revoke", names=[name] if name else (),
                                                          serials=[serial_hex] if serial_hex else (), reason=why), \
            Transaction(pki.root) as tx:
        rows = select_for_revoke(pki, name, serial_hex)
        todo = [r for r in rows if r.status == "V" and r.is_active(now)]
        already = [r.serial for r in rows if r.status == "R"]
        expired = [r.serial for r in rows if r.status != "R" and not r.is_active(now)]
        for row in todo:
            revoke_row(pki, row, why, runner, tx)
        crl = None
        # "Already revoked" is not the end of it when the CRL does not list it yet (a run killed between
        # -revoke and -gencrl): nginx would still accept the certificate, so the CRL is made now.
        if todo or (already and missing_revocations(pki)):
            generate_crl(pki, settings.profile.crl.days, runner, tx, now)
            crl = read_crl_info(pki, runner)
        tx.checkpoint()
        if todo or crl is not None:  # a change (after its commit): the revocation, or the CRL that now lists it
            audit.record(pki, "revoke", names=sorted({r.cn for r in rows if r.cn}), serials=[r.serial for r in todo],
                         reason=why, already_revoked=len(already),
                         crl_number=crl.crl_number if crl is not None else None)
    return RevokeResult([r.serial for r in todo], already, expired, crl)


# ------------------------------------------------------------------ replace (a lost or broken device)

# The default reason is keyCompromise: `replace` is for a device that is lost, stolen or broken, whose key must
# be presumed in other hands. nginx refuses a revoked certificate whatever the reason, so the reason only tells
# whoever reads the CRL what happened: erring towards keyCompromise costs nothing, erring the other way
# understates an incident. A routine swap (a new phone, the old one wiped) can say --reason superseded.
REPLACE_REASON = "keyCompromise"


@dataclass
class ReplaceResult:
    name: str
    kind: str  # client or server
    reason: str
    issued: IssueResult  # the new certificate (with the password when it was generated)
    old: list[str]  # the serials of NAME that were active before: revoked by this run unless `problems` says not
    revoked: list[str]
    crl: CrlInfo | None = None
    problems: list[str] = field(default_factory=list)  # what failed once the new certificate existed
    todo: list[str] = field(default_factory=list)  # the command that finishes each problem

    @property
    def changed(self) -> bool:
        """What nginx reads changed (the CRL, or the server certificate it serves): publish and reload (after_change)."""
        return bool(self.revoked) or self.kind == "server"


def replace_request(settings: Settings, name: str, *, days: int | None = None, key_type: str | None = None,
                    p12: str | None = None, password: str | None = None) -> IssueRequest:
    """The new certificate's request, modelled on NAME's newest certificate: its kind (client or server) and
    its SANs (read from the parsed certificate), its key type unless --key-type; --days or the profile's."""
    from mtlsctl.client import build_request
    from mtlsctl.x509read import facts, read_certificate

    pki = settings.pki
    validate.client_name(name)
    pki.require_ca()
    with read_lock(pki.root, writer=True):
        rows = db.rows_named(pki.path(pki.index), name)
        if not rows:
            raise InputError(f"no certificate named {name!r} in index.txt", hint=f"issue one: mtlsctl add-client {name}")
        old = facts(read_certificate(pki.path(cert_file(pki, rows[-1]))))
    if old.kind not in ("client", "server"):
        raise InputError(f"{name!r} is not a client or server certificate (its extended key usage says {old.kind}); "
                         "replace re-issues those only",
                         hint="the OCSP signer is re-issued by `mtlsctl ocsp setup`" if old.kind == "ocsp"
                         else f"revoke it: mtlsctl revoke {name}")
    sans = [f"{kind}:{value}" for kind, value in old.sans if value is not None]
    same_type = old.key.type if old.key.type in ("rsa", "ec") else None
    return build_request(settings, name, days=days, key_type=key_type or same_type, p12=p12, sans=sans,
                         password=password, kind=old.kind)


def _replace_targets(pki: Pki, name: str, now: datetime) -> list[db.IndexRow]:
    """NAME's active certificates, which replace revokes once the new one exists. Each must have a file
    `openssl ca -revoke` can read (certs/NAME.crt or newcerts/SERIAL.pem): refused before anything is written."""
    rows = [r for r in db.rows_named(pki.path(pki.index), name) if r.is_active(now)]
    for row in rows:
        cert_file(pki, row)  # StateError naming the missing file
    return rows


def _old_cert_file(pki: Pki, row: db.IndexRow, issued: IssueResult) -> str:
    """The file to revoke an old row from: its archived certs/NAME.crt (as the guide revokes certs/NAME.crt),
    else newcerts/SERIAL.pem."""
    if issued.archived and issued.archived_serial == row.serial:
        archived = f"{issued.archived}/{issued.name}.crt"
        if db.same_certificate(pki.path(archived), pki.path(db.newcert_path(row.serial))):
            return archived
    return cert_file(pki, row)


def plan_replace(settings: Settings, req: IssueRequest, why: str, now: datetime | None = None) -> tuple[list[str], list[Command]]:
    """What `replace --dry-run` prints: the moves to the archive, then the commands in the order they run."""
    from mtlsctl.client import issue_commands, refuse_conflicts, require_section
    from mtlsctl.crl import gencrl_command

    pki = settings.pki
    now = now or datetime.now(timezone.utc)
    require_section(pki, req.extensions)
    with read_lock(pki.root, writer=True):
        old = _replace_targets(pki, req.name, now)
        plan = refuse_conflicts(pki, req.name, replacing=True)
        files = {row.serial: cert_file(pki, row) for row in old}
    notes = [f"move {src} -> {dst}" for src, dst in plan.moves()] if plan else []
    if plan:
        notes.append(f"({plan.directory}/ is created mode 700; the old files are put back if anything fails before "
                     "the new certificate is in index.txt)")
    commands = issue_commands(req, pki.ca_bundle)
    for row in old:
        held = files[row.serial]
        if plan and plan.serial == row.serial and held == ClientFiles(req.name).crt:
            held = f"{plan.directory}/{req.name}.crt"
        commands.append(revoke_command(held, why))
    if old:
        commands.append(gencrl_command(settings.profile.crl.days, now))
    else:
        notes.append(f"nothing to revoke: {req.name} has no active certificate")
    return notes, commands


def replace(settings: Settings, req: IssueRequest, why: str, runner: Runner, now: datetime | None = None) -> ReplaceResult:
    """Replace NAME's certificate in one step, under one lock: the new certificate first (the old files move to
    archive/NAME/SERIAL/; the old certificate stays valid until the new one is in index.txt), then every
    certificate of NAME that was active before is revoked with `why`, then the CRL is regenerated.

    A failure (or a kill) before the new certificate exists puts everything back: the old one is valid and
    its files are where they were. A failure after it is reported in `problems`, each with the command that
    finishes it in `todo` (the new certificate stays: the device may already have it).
    """
    from mtlsctl.client import IssuedButExportFailed, issue_locked, refuse_conflicts, require_section

    pki = settings.pki
    name = req.name
    require_section(pki, req.extensions)
    with read_lock(pki.root, writer=True):  # first checks: exit 2 (or 1) before anything is written
        pki.require_ca()
        _replace_targets(pki, name, now or datetime.now(timezone.utc))
        refuse_conflicts(pki, name, replacing=True)
    with pki_lock(pki.lock_path), audit.failures_recorded(pki, "replace", names=[name], reason=why):
        now = now or datetime.now(timezone.utc)
        old = _replace_targets(pki, name, now)  # again, under the lock: exactly these are revoked below
        problems: list[str] = []
        todo: list[str] = []
        try:
            issued = issue_locked(settings, req, runner, replacing=True)
        except IssuedButExportFailed as exc:
            assert exc.result is not None
            issued = exc.result
            problems.append(f"the PKCS#12 bundle was not written: {exc.message}")
            todo.append(f"mtlsctl export {name}")
        # The new certificate exists from here on: now the old ones go.
        revoked: list[str] = []
        for row in old:
            try:
                with Transaction(pki.root) as tx:
                    revoke_row(pki, row, why, runner, tx, cert=_old_cert_file(pki, row, issued))
                revoked.append(row.serial)
            except MtlsError as exc:
                problems.append(f"the old certificate (serial {row.serial}) is NOT revoked: {exc.message}")
                todo.append(f"mtlsctl revoke --serial {row.serial} --reason {why}")
        crl = None
        if revoked:
            try:
                with Transaction(pki.root) as tx:
                    generate_crl(pki, settings.profile.crl.days, runner, tx, now)
                crl = read_crl_info(pki, runner)
            except MtlsError as exc:
                problems.append(f"serial {', '.join(revoked)} is revoked in index.txt, but the CRL was not regenerated, "
                                f"so nginx still accepts it: {exc.message}")
                todo.append("mtlsctl crl")
        audit.record(pki, "replace", names=[name], serials=[issued.serial, *revoked], result="failed" if problems else "ok",
                     error=problems[0] if problems else None, reason=why, kind=req.kind, new_serial=issued.serial,
                     not_revoked=len(old) - len(revoked), crl_number=crl.crl_number if crl is not None else None)
    return ReplaceResult(name, req.kind, why, issued, [r.serial for r in old], revoked, crl, problems, todo)


# ------------------------------------------------------------------ list


@dataclass(frozen=True)
class CertEntry:
    name: str
    serial: str
    status: str
    not_after: datetime
    days_left: int
    revoked_at: datetime | None
    reason: str | None
    subject: str
    files: list[str]

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name, "serial": self.serial, "status": self.status,
            "not_after": self.not_after.isoformat(), "days_left": self.days_left,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None, "reason": self.reason,
            "subject": self.subject, "files": self.files,
        }


# Which row is each name's newest, found without a dictionary of every name: a fixed bitmap (1 MB) remembers
# the names seen; a name whose bit is already set may repeat and gets an exact entry (its last line). A name
# seen once never does, so the entries are the repeated names plus ~1 % of the others at 100,000 rows.
_SEEN_BITS = 1 << 23


class _SeenNames:
    """Names seen so far, in fixed memory: `again(name)` is True for every name seen before, and (rarely,
    a shared bit) for a new one; False means certainly new."""

    def __init__(self) -> None:
        self._bits = bytearray(_SEEN_BITS // 8)

    def again(self, name: str) -> bool:
        h = hash(name) & (_SEEN_BITS - 1)
        byte, bit = h >> 3, 1 << (h & 7)
        if self._bits[byte] & bit:
            return True
        self._bits[byte] |= bit
        return False


def _line_status(line: db.IndexLine, now_key: str, soon_key: str) -> str:
    """status_of, on a scanned row's time keys (soon_key: now + renew.within_days)."""
    if line.status == "R":
        return "revoked"
    if line.status != "V" or line.expires <= now_key:
        return "expired"
    return "expiring" if line.expires <= soon_key else "valid"


class Inventory:
    """What `list` shows, read from index.txt in two passes and never held whole (a fleet is 100,000 rows).

    Building it is the first pass: every row is checked (a row openssl would not write stops the command
    here, before anything is printed), the matching rows are counted with the width of their names, and the
    names that appear more than once are found (the files belong to a name's newest row). Iterating it is the
    second pass: one CertEntry per matching row, oldest first, each made as it is read, with its files
    checked by a stat of each (a certificate file is read only to compare it with newcerts/SERIAL.pem).
    Iterate it under the PKI's read lock, as `list` does: the two passes must see the same index.txt.
    """

    def __init__(self, settings: Settings, *, status: str | None = None, expiring_within: int | None = None,
                 now: datetime | None = None, with_files: bool = True) -> None:
        if status is not None and status not in STATUSES:
            raise InputError(f"--status {status!r} is not a status", hint="use " + ", ".join(STATUSES))
        self.pki = settings.pki
        self.pki.require_ca()
        self.status, self.with_files = status, with_files
        self.now = now or datetime.now(timezone.utc)
        self._now_key = db.now_key(self.now)
        self._soon_key = db.now_key(self.now + timedelta(days=settings.facts.renew_within_days))
        self._within_key = (db.now_key(self.now + timedelta(days=expiring_within))
                            if expiring_within is not None else None)
        self.count = 0  # the rows that match
        self.name_width = 0  # the longest name among them
        self._last_line: dict[str, int] = {}  # name -> its newest row's line, for names that may repeat
        seen = _SeenNames()
        for line in db.scan_index(self.pki.path(self.pki.index)):
            cn = line.cn
            if cn and seen.again(cn):
                self._last_line[cn] = line.lineno
            if self._matches(line) is not None:
                self.count += 1
                self.name_width = max(self.name_width, len(cn or ""))

    def _matches(self, line: db.IndexLine) -> str | None:
        """The row's status when it passes --status and --expiring-within, else None."""
        st = _line_status(line, self._now_key, self._soon_key)
        if self.status is not None and st != self.status:
            return None
        if self._within_key is not None and not (st in ("valid", "expiring") and line.expires <= self._within_key):
            return None
        return st

    def __iter__(self) -> Iterator[CertEntry]:
        dir_fd = os.open(self.pki.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if self.with_files else None
        try:
            for line in db.scan_index(self.pki.path(self.pki.index)):
                st = self._matches(line)
                if st is None:
                    continue
                expires = db.key_time(line.expires)
                name = line.cn or ""
                files: list[str] = []
                if dir_fd is not None and name and self._last_line.get(name, line.lineno) == line.lineno:
                    files = _files_of(dir_fd, name, line.serial)
                yield CertEntry(name, line.serial, st, expires, days_left(expires, self.now),
                                db.key_time(line.revoked) if line.revoked else None, line.reason, db.rfc2253(line.subject),
                                files)
        finally:
            if dir_fd is not None:
                os.close(dir_fd)


def _files_of(dir_fd: int, name: str, serial: str) -> list[str]:
    """The files a name's newest row has (key, csr, crt, p12 in that order): each one's existence is a stat;
    certs/NAME.crt counts when it holds this serial's certificate (db.same_certificate_at)."""
    cf = ClientFiles(name)
    files = [rel for rel in (cf.key, cf.csr, cf.p12) if db.exists_at(dir_fd, rel)]
    if db.same_certificate_at(dir_fd, cf.crt, f"newcerts/{serial}.pem"):
        files.insert(2, cf.crt)
    return files


def inventory(settings: Settings, *, status: str | None = None, expiring_within: int | None = None,
              now: datetime | None = None, with_files: bool = True) -> Inventory:
    """`mtlsctl list`: the rows of index.txt that match, as an Inventory to iterate (see there)."""
    return Inventory(settings, status=status, expiring_within=expiring_within, now=now, with_files=with_files)


def list_certs(settings: Settings, *, status: str | None = None, expiring_within: int | None = None,
               now: datetime | None = None, with_files: bool = True) -> list[CertEntry]:
    """Every certificate in index.txt, oldest first, with the files that exist for it (`with_files`; without,
    index.txt alone is read: `metrics` at thousands of certificates). A list: iterate `inventory` to stream."""
    return list(inventory(settings, status=status, expiring_within=expiring_within, now=now, with_files=with_files))


def ca_not_after(pki: Pki, runner: Runner | None = None) -> datetime:
    from mtlsctl.x509read import not_after

    return not_after(pki.path(pki.ca_cert))


# ------------------------------------------------------------------ renew


@dataclass
class Renewed:
    name: str
    old_serial: str
    new_serial: str
    not_after: datetime
    archived: str
    p12: str | None = None
    password_file: str | None = None
    password: str | None = field(default=None, repr=False)
    warning: str | None = None


@dataclass
class RenewFailure:
    name: str
    serial: str
    error: str


@dataclass
class RenewReport:
    renewed: list[Renewed] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)  # older valid serials revoked by the sweep
    failed: list[RenewFailure] = field(default_factory=list)
    due: list[db.IndexRow] = field(default_factory=list)
    crl_regenerated: bool = False
    crl: CrlInfo | None = None

    @property
    def changed(self) -> bool:
        """What nginx reads changed (the CRL, a renewed certificate): publish and reload (after_change)."""
        return bool(self.renewed) or bool(self.superseded) or self.crl_regenerated


def due_for_renewal(rows: list[db.IndexRow], within_days: int, now: datetime) -> list[db.IndexRow]:
    """The newest valid certificate of each name, when it expires within the window.

    Revoked and expired rows are skipped; an older still-valid row of a renewed name is not renewed again.
    """
    newest: dict[str, db.IndexRow] = {}
    for row in rows:
        if row.cn and row.is_active(now):
            if row.cn not in newest or row.expires >= newest[row.cn].expires:
                newest[row.cn] = row
    horizon = now + timedelta(days=within_days)
    return [row for row in newest.values() if row.expires <= horizon]


def superseded_rows(rows: list[db.IndexRow], now: datetime) -> list[db.IndexRow]:
    """Valid rows that a newer valid row of the same name replaces (left by an interrupted renewal)."""
    newest = {row.cn: row for row in due_for_renewal(rows, 36500, now)}
    return [row for row in rows if row.cn in newest and row.is_active(now) and row.serial != newest[row.cn].serial]


def scan_for_renewal(index: Path, within_days: int, now: datetime,
                     revoked: set[str] | None = None) -> tuple[list[db.IndexRow], set[str]]:
    """One pass over index.txt for `renew` (every night, over 100,000 rows): what is due (due_for_renewal's rows,
    in its order) and the names that may have more than one valid row (superseded_in_index's candidates: exact
    for names seen twice, plus a few whose bit in the fixed bitmap another name took).

    A row becomes an IndexRow only when it is valid and ends within the window. When some do, a second pass over
    those names alone drops a name that also has a valid certificate ending after the window (its newest). Same
    rows, same order as due_for_renewal: a name is due only when all its valid rows end within the window, so its
    first valid row is its first row inside the window, where due_for_renewal's dictionary placed it.

    `revoked`, when given, gets the serials of the revoked rows (the same pass: is the CRL missing one?)."""
    now_key, horizon = db.now_key(now), db.now_key(now + timedelta(days=within_days))
    found: dict[str, db.IndexLine] = {}
    seen, repeated = _SeenNames(), set()
    for line in db.scan_index(index):
        if line.status != "V" or line.expires <= now_key or not (cn := line.cn):
            if revoked is not None and line.status == "R":
                revoked.add(line.serial)
            continue
        if seen.again(cn):
            repeated.add(cn)
        if line.expires <= horizon:
            held = found.get(cn)
            if held is None or line.expires >= held.expires:
                found[cn] = line
    if found:
        for line in _lines_named(index, set(found)):
            if line.status == "V" and line.expires > horizon and (cn := line.cn) in found:
                del found[cn]
    return [line.row() for line in found.values()], repeated


def due_in_index(index: Path, within_days: int, now: datetime) -> list[db.IndexRow]:
    """due_for_renewal over index.txt read as a stream (scan_for_renewal)."""
    return scan_for_renewal(index, within_days, now)[0]


def _lines_named(index: Path, names: set[str]) -> Iterator[db.IndexLine]:
    """The rows whose subject's CN is in `names`, found from the subject field alone: the other rows are not
    parsed (a pass before this one checked the whole file, under the same lock)."""
    source = str(index)
    for lineno, line in db.index_lines(index):
        if db.cn_of(line.rpartition("\t")[2]) in names:
            yield db.check_line(line, lineno, source)


def superseded_in_index(index: Path, now: datetime, repeated: set[str] | None = None) -> list[db.IndexRow]:
    """superseded_rows over index.txt read as a stream: the names that may have more than one valid row
    (`repeated`, from scan_for_renewal when index.txt has not changed since, else found here in fixed memory);
    only when there are some does a second pass read their rows."""
    now_key, horizon = db.now_key(now), db.now_key(now + timedelta(days=36500))
    if repeated is None:
        seen, repeated = _SeenNames(), set()
        for line in db.scan_index(index):
            if line.status == "V" and line.expires > now_key and (cn := line.cn) and seen.again(cn):
                repeated.add(cn)
    if not repeated:
        return []
    active: list[db.IndexLine] = []
    newest: dict[str, db.IndexLine] = {}
    for line in _lines_named(index, repeated):
        if line.status == "V" and line.expires > now_key and (cn := line.cn) in repeated:
            active.append(line)
            held = newest.get(cn)
            if held is None or line.expires >= held.expires:
                newest[cn] = line
    return [line.row() for line in active
            if newest[line.cn or ""].expires <= horizon and line.serial != newest[line.cn or ""].serial]


def _archive_name(pki: Pki, crt: str, now: datetime) -> str:
    base = f"{crt}.old.{now:%Y-%m-%d}"
    candidate, n = base, 1
    while os.path.lexists(pki.path(candidate)):
        candidate, n = f"{base}.{n}", n + 1
    return candidate


def renew_plan(settings: Settings, report: RenewReport, days: int, now: datetime) -> list[tuple[str, list[Command]]]:
    """Every openssl command a real `renew` runs, in its order (what --dry-run prints, --json too): per due
    certificate its signing, the old one's revocation (superseded), a client's new bundle and its read-back;
    then the CRL, once. Temporary directories show as XXXXXX; the CRL dates as of `now`."""
    from mtlsctl.client import P12_WORKDIR
    from mtlsctl.crl import gencrl_command

    pki, profile = settings.pki, settings.profile
    plan: list[tuple[str, list[Command]]] = []
    for row in report.due:
        name = row.cn or ""
        files = ClientFiles(name)
        kind, commands = renew_commands(settings, row, days)
        if profile.renew.revoke_superseded:
            commands.append(revoke_command(_archive_name(pki, files.crt, now), "superseded"))
        if kind == "client" and pki.path(files.key).exists():
            rel = f"{P12_WORKDIR}/{name}.p12"
            commands += [openssl.pkcs12_export(name, files.key, files.crt, rel, None, profile.clients.p12, pki.ca_bundle),
                         openssl.pkcs12_check(rel, None, profile.clients.p12)]
        plan.append((f"{name} ({kind}): serial {row.serial} expires {row.expires:%Y-%m-%d %H:%M} UTC", commands))
    if report.crl_regenerated:
        plan.append(("the CRL, once", [gencrl_command(profile.crl.days, now)]))
    return plan


def renew_commands(settings: Settings, row: db.IndexRow, days: int) -> tuple[str, list[Command]]:
    """What renewing a row runs (--dry-run): its kind, and certs/NAME.csr reviewed and signed with
    nothing copied from it (the kind's section and its checked SANs), with the kind's validity."""
    from mtlsctl.csr import sign_command

    kind = cert_kind(settings.pki, row)
    if kind == "ocsp" and settings.profile.ocsp is not None:
        days = settings.profile.ocsp.signer_days
    from mtlsctl.csr import ca_section

    ca_name = ca_section(openssl.cnf_sections(settings.pki.path(settings.pki.openssl_cnf).read_text(errors="replace")))
    return kind, [sign_command("private/.sign-XXXXXX", ClientFiles(row.cn or "").crt, days, ca_name)]


def _allow_overlap(pki: Pki, tx: Transaction) -> None:
    """Renewal overlaps two valid certificates of one name: index.txt.attr must say unique_subject = no.

    A PKI made with the guide's openssl.cnf has `unique_subject = yes` there after its first issuance
    (FIELD-NOTES); going from yes to no is always safe.
    """
    attr = pki.path(pki.index_attr)
    if not attr.exists() or "unique_subject = no" not in attr.read_text():
        tx.snapshot(attr)
        atomic_write(attr, "unique_subject = no\n", MODE_PUBLIC)


def _renew_one(settings: Settings, row: db.IndexRow, days: int, now: datetime, runner: Runner) -> Renewed:
    pki = settings.pki
    name = row.cn or ""
    files = ClientFiles(name)
    if not pki.path(files.csr).exists():
        raise StateError(f"CSR not found at {files.csr}; cannot renew automatically",
                         hint=f"issue a new certificate: mtlsctl revoke {name} && mtlsctl add-client {name}")
    kind = cert_kind(pki, row)
    if kind == "ocsp" and settings.profile.ocsp is not None:
        days = settings.profile.ocsp.signer_days  # the OCSP signer keeps its short validity
    # The stored request is read once and reviewed like sign-csr's (it may have come from a device).
    review = review_request(read_request_file(pki.path(files.csr)), name, kind, source=files.csr)
    check_renewal(review, pki.path(cert_file(pki, row)))
    with Transaction(pki.root) as tx:
        _allow_overlap(pki, tx)
        archived = _archive_name(pki, files.crt, now)
        source = cert_file(pki, row)
        tx.created(pki.path(archived))
        data = pki.path(source).read_bytes()
        with os.fdopen(create_exclusive(pki.path(archived), MODE_PUBLIC), "wb") as fh:  # created, never followed
            fh.write(data)
        tx.snapshot(pki.path(files.crt))
        new_row = sign_reviewed(settings, review, files.crt, days, runner, tx)
        if kind == "server":
            write_fullchain(pki, name, tx)
        tx.checkpoint()  # the new certificate is issued: keep it whatever happens next
    result = Renewed(name, row.serial, new_row.serial, new_row.expires, archived)
    problems = []
    if settings.facts.renew_revoke_superseded:
        try:
            with Transaction(pki.root) as tx:
                revoke_row(pki, row, "superseded", runner, tx, cert=archived)
                tx.checkpoint()
        except MtlsError as exc:
            problems.append(f"the old certificate {row.serial} was not revoked: {exc.message}")
    if kind == "server":
        result.warning = f"server certificate: reload nginx to serve the new one ({ClientFiles(name).fullchain})"
    elif kind == "ocsp":
        result.warning = "OCSP signer renewed: a running `mtlsctl ocsp serve` restarts its responder with it by itself"
    elif pki.path(files.key).exists():
        try:
            result.password = generate_password()
            result.p12, result.password_file = _replace_p12(settings, name, result.password, runner)
        except MtlsError as exc:
            result.password = None
            problems.append(f"new PKCS#12 not written ({exc.message}); run `mtlsctl export {name} --force`")
    else:
        result.warning = f"private key {files.key} not found; no PKCS#12 bundle written"
    if problems:
        raise PartialRenewal(result, "; ".join(problems))
    return result


class PartialRenewal(MtlsError):
    """The new certificate is issued, but a later step (revoking the old one, the bundle) failed."""

    def __init__(self, result: Renewed, message: str) -> None:
        super().__init__(message)
        self.result = result


def _replace_p12(settings: Settings, name: str, password: str, runner: Runner) -> tuple[str, str]:
    """A new bundle with a new password: written aside, read back, then renamed over the old one.

    The password goes to private/NAME.p12.password (0600), never to stdout by default.
    """
    from mtlsctl.client import build_p12, p12_workdir

    pki = settings.pki
    files = ClientFiles(name)
    password_file = f"private/{name}.p12.password"
    with Transaction(pki.root) as tx:
        workdir = p12_workdir(pki, name, tx)  # openssl writes into a private directory with an unpredictable name
        try:
            bundle = build_p12(pki, name, password, settings.profile.clients.p12, runner, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        tx.snapshot(pki.path(password_file), pki.path(files.p12))
        atomic_write(pki.path(password_file), password + "\n", MODE_SECRET)
        atomic_write(pki.path(files.p12), bundle, MODE_SECRET)
        tx.checkpoint()
    return files.p12, password_file


def renew(settings: Settings, *, within_days: int | None = None, days: int | None = None, runner: Runner,
          now: datetime | None = None, dry_run: bool = False) -> RenewReport:
    """Renew every valid certificate that expires within the window; refresh the CRL when due.

    One failing certificate does not stop the others; the CRL is regenerated once per run.
    """
    pki, facts = settings.pki, settings.facts  # the profile's few values this needs (no pydantic when cached)
    now = now or datetime.now(timezone.utc)
    within = validate.days(within_days if within_days is not None else facts.renew_within_days, what="--within")
    new_days = validate.days(days if days is not None else facts.renew_days)
    pki.require_ca()
    report = RenewReport()
    if dry_run:
        with read_lock(pki.root):
            report.due = due_in_index(pki.path(pki.index), within, now)
            report.crl = read_crl_info_or_none(pki, runner)
        report.crl_regenerated = bool(report.due) or is_due(report.crl, facts.crl_refresh_within_days, now, pki)
        return report
    from mtlsctl.metrics import renew_run_recorded

    # The run is remembered as it ends (metrics: the last renew run, even one with nothing due); the audit log
    # gets its changes once they are committed, and a run that stops on an error a "failed" line.
    with pki_lock(pki.lock_path), renew_run_recorded(pki, report), audit.failures_recorded(pki, "renew"):
        revoked: set[str] = set()
        report.due, repeated = scan_for_renewal(pki.path(pki.index), within, now, revoked)
        for row in report.due:
            try:
                report.renewed.append(_renew_one(settings, row, new_days, now, runner))
            except PartialRenewal as exc:
                report.renewed.append(exc.result)
                report.failed.append(RenewFailure(exc.result.name, exc.result.old_serial, exc.message))
            except MtlsError as exc:
                report.failed.append(RenewFailure(row.cn or "", row.serial, exc.message))
        if facts.renew_revoke_superseded:
            # A renewal interrupted between issuing the new certificate and revoking the old one (or whose
            # revocation failed above) is finished here: an older valid certificate of a renewed name goes.
            # nothing renewed: index.txt is as the scan above read it (the lock is held), its candidates hold
            for row in superseded_in_index(pki.path(pki.index), now, None if report.due else repeated):
                try:
                    with Transaction(pki.root) as tx:
                        revoke_row(pki, row, "superseded", runner, tx)
                    report.superseded.append(row.serial)
                    report.failed = [f for f in report.failed if not (f.serial == row.serial and "was not revoked" in f.error)]
                except MtlsError as exc:
                    report.failed.append(RenewFailure(row.cn or "", row.serial, f"superseded, not revoked: {exc.message}"))
        current = read_crl_info_or_none(pki, runner)
        # nothing renewed or revoked: index.txt is still the one scanned above (under this lock), so are its revocations
        if report.renewed or report.superseded or is_due(current, facts.crl_refresh_within_days, now, pki, revoked):
            with Transaction(pki.root) as tx:
                generate_crl(pki, settings.profile.crl.days, runner, tx, now)
                tx.checkpoint()
            report.crl_regenerated = True
            current = read_crl_info(pki, runner)
        report.crl = current
        _audit_renew(pki, report)
    return report


def _audit_renew(pki: Pki, report: RenewReport) -> None:
    """A renew run's lines: what it renewed (names and new serials, in the same order), what failed, and a CRL
    regenerated because it was due. A run that changed nothing writes none (metrics remembers every run)."""
    if report.renewed or report.superseded:
        audit.record(pki, "renew", names=[r.name for r in report.renewed], serials=[r.new_serial for r in report.renewed],
                     renewed=len(report.renewed), old_serials=",".join(r.old_serial for r in report.renewed)[:300] or None,
                     superseded_revoked=",".join(report.superseded)[:300] or None, failed=len(report.failed),
                     crl_number=report.crl.crl_number if report.crl_regenerated and report.crl else None)
    if report.failed:
        audit.record(pki, "renew", names=[f.name for f in report.failed if f.name], serials=[f.serial for f in report.failed],
                     result="failed", error=report.failed[0].error, failed=len(report.failed))
    if report.crl_regenerated and not (report.renewed or report.superseded) and report.crl is not None:
        audit.record(pki, "crl", crl_number=report.crl.crl_number, next_update=f"{report.crl.next_update:%Y-%m-%dT%H:%M:%SZ}",
                     by="renew")


# ------------------------------------------------------------------ verify


@dataclass(frozen=True)
class VerifyResult:
    name: str
    ok: bool
    verdict: str  # ok | revoked | expired | crl_expired | crl_not_yet_valid | untrusted | failed
    message: str
    openssl_output: str


_VERDICTS = {
    "23": ("revoked", "the certificate is REVOKED (listed in crl/ca.crl)"),
    "10": ("expired", "the certificate has EXPIRED"),
    "12": ("crl_expired", "the CRL has expired: nginx rejects every client until you run `mtlsctl crl`"),
    "11": ("crl_not_yet_valid", "the CRL is not yet valid (clock skew?): run `mtlsctl crl`"),
    "9": ("not_yet_valid", "the certificate is not yet valid"),
    "20": ("untrusted", "the certificate was not issued by this CA"),
    "2": ("untrusted", "the certificate was not issued by this CA"),
    "3": ("no_crl", "no CRL for the CA: run `mtlsctl crl`"),
    "26": ("wrong_purpose", "openssl says the certificate is not usable for this purpose (unsuitable certificate purpose)"),
}


_PURPOSE = {"client": "sslclient", "server": "sslserver"}
_KIND_WORDS = {"client": "clientAuth (a client certificate)", "server": "serverAuth (a server certificate)",
               "ocsp": "OCSPSigning (the OCSP signer)", "ca": "CA:TRUE (a CA)", "unknown": "no single known purpose"}
_VERIFY_ERROR_RE = re.compile(r"error (\d+) at \d+ depth lookup: .*")


def verify_command(crt: str, chain: bool = False, purpose: str = "client") -> Command:
    """The guide's debugging command, with the CRL and the purpose nginx checks:
    `openssl verify -purpose sslclient -crl_check -CAfile ... -CRLfile ...`; with an intermediate CA,
    the whole chain and every CA's CRL (-crl_check_all), as nginx checks it."""
    if chain:
        return Command(("openssl", "verify", "-purpose", _PURPOSE[purpose], "-crl_check_all", "-CAfile", Pki.root_cert,
                        "-untrusted", Pki.ca_cert, "-CRLfile", Pki.chain_crl, crt))
    return Command(("openssl", "verify", "-purpose", _PURPOSE[purpose], "-crl_check", "-CAfile", Pki.ca_cert,
                    "-CRLfile", Pki.crl, crt))


def verify(settings: Settings, name: str, runner: Runner, purpose: str = "client") -> VerifyResult:
    """Verify certs/NAME.crt as nginx would: as a client (or, with purpose="server", as a server) certificate.

    The purpose is decided twice: from the certificate's EKU OIDs (structure), and by openssl's
    `-purpose`; the chain, dates and CRL by openssl verify, whose exit status decides.
    """
    from mtlsctl.x509read import kind_of, read_certificate

    pki = settings.pki
    validate.client_name(name)
    pki.require_ca()
    crt = ClientFiles(name).crt
    if not pki.path(crt).exists():
        raise InputError(f"no certificate for {name!r} ({crt} missing)", hint="see `mtlsctl list`")
    if not pki.path(pki.crl).exists():
        raise StateError("crl/ca.crl is missing", hint="run `mtlsctl crl`")
    kind = kind_of(read_certificate(pki.path(crt)))
    if kind != purpose:
        other = "--server " if kind == "server" else ""
        hint = f"; check it with `mtlsctl verify {other}{name}`" if kind in _PURPOSE else ""
        return VerifyResult(name, False, "wrong_purpose",
                            f"not usable as a {purpose} certificate: its extended key usage is {_KIND_WORDS[kind]}{hint}", "")
    result = runner.run(verify_command(crt, pki.has_chain(), purpose), cwd=pki.root, check=False)
    output = (result.stdout + result.stderr).strip()
    if result.returncode == 0:
        return VerifyResult(name, True, "ok", f"OK: signed by this CA, within its validity, not revoked (CRL checked), "
                            f"usable as a {purpose} certificate", output)
    codes = [m.group(1) for line in output.splitlines() if (m := _VERIFY_ERROR_RE.fullmatch(line.strip()))]
    verdict, message = _VERDICTS.get(codes[0] if codes else "", ("failed", "verification failed"))
    detail = output.splitlines()[-2] if len(output.splitlines()) >= 2 else output
    return VerifyResult(name, False, verdict, f"{message} ({detail.strip()})", output)
