"""The CRL: generated the guide's way, but atomically and with lastUpdate backdated.

FIELD-NOTES (CRLs and nginx): a CRL whose lastUpdate is ahead of the nginx host's clock is "not yet
valid" for everyone, and an expired one makes nginx reject every client. So lastUpdate is set a few
minutes in the past, nextUpdate explicitly `crl.days` ahead, and the file is replaced in one rename.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from mtlsctl import audit
from mtlsctl.errors import InputError, StateError
from mtlsctl.files import MODE_PUBLIC, Transaction, atomic_write, fsync_dir, normalize_modes, pki_lock, protect_database
from mtlsctl.pki import Pki
from mtlsctl.runner import Command, Runner

if TYPE_CHECKING:  # annotations only: the profile's models mean pydantic (start-up)
    from mtlsctl.profile import Profile

CLOCK_SKEW = timedelta(minutes=5)
CRL_TMP = "crl/.ca.crl.tmp"


def asn1_time(when: datetime) -> str:
    """The form openssl takes for -crl_lastupdate/-crl_nextupdate (UTCTime until 2049)."""
    when = when.astimezone(timezone.utc)
    return when.strftime("%y%m%d%H%M%SZ" if when.year < 2050 else "%Y%m%d%H%M%SZ")


ROOT_CRL_TMP = "crl/.root.crl.tmp"


def root_gencrl_command(days: int, now: datetime, root_key: str | None = None) -> Command:
    """The root's CRL (`openssl ca -name root_ca -gencrl`); `-keyfile` when the root key is kept offline."""
    keyfile = ("-keyfile", root_key) if root_key else ()
    return Command(
        ("openssl", "ca", "-config", "openssl.cnf", "-name", "root_ca", "-gencrl", *keyfile,
         "-crl_lastupdate", asn1_time(now - CLOCK_SKEW), "-crl_nextupdate", asn1_time(now + timedelta(days=days)),
         "-out", ROOT_CRL_TMP),
        label=f"generating the root CRL {Pki.root_crl} (valid {days} days)", uses_ca_key=True)


def write_chain_crl(pki: Pki, tx: Transaction) -> None:
    """crl/chain.crl = the issuing CA's CRL + the root's: nginx's ssl_crl needs a CRL for every CA in the chain."""
    if not pki.has_chain():
        return
    parts = [pki.path(rel).read_text() for rel in (pki.crl, pki.root_crl) if pki.path(rel).exists()]
    tx.snapshot(pki.path(pki.chain_crl))
    atomic_write(pki.path(pki.chain_crl), "".join(p if p.endswith("\n") else p + "\n" for p in parts), MODE_PUBLIC)


def generate_root_crl(pki: Pki, days: int, runner: Runner, tx: Transaction, now: datetime | None = None,
                      root_key: str | None = None) -> None:
    """crl/root.crl from root/index.txt, then crl/chain.crl."""
    now = now or datetime.now(timezone.utc)
    for rel in ("root/crlnumber", "root/crlnumber.old", "root/crlnumber.new"):
        tx.snapshot(pki.path(rel))
    tmp = pki.path(ROOT_CRL_TMP)
    tx.may_create(tmp)
    runner.run(root_gencrl_command(days, now, root_key), cwd=pki.root)
    check_new_crl(pki, ROOT_CRL_TMP, pki.root_cert, now)
    os.chmod(tmp, MODE_PUBLIC)
    normalize_modes(pki.root, ("root/crlnumber", "root/crlnumber.old"))
    tx.snapshot(pki.path(pki.root_crl))
    os.replace(tmp, pki.path(pki.root_crl))
    write_chain_crl(pki, tx)


def gencrl_command(days: int, now: datetime, out: str = CRL_TMP) -> Command:
    """`openssl ca -config openssl.cnf -gencrl -out ...` with explicit, backdated dates."""
    return Command(
        ("openssl", "ca", "-config", "openssl.cnf", "-gencrl",
         "-crl_lastupdate", asn1_time(now - CLOCK_SKEW),
         "-crl_nextupdate", asn1_time(now + timedelta(days=days)),
         "-out", out),
        label=f"generating the CRL {Pki.crl} (valid {days} days)",
        uses_ca_key=True,
    )


def check_new_crl(pki: Pki, rel: str, ca: str, now: datetime) -> None:
    """The CRL `openssl ca -gencrl` wrote to `rel`, before it replaces the one nginx reads: a regular file, a
    readable CRL, signed by the CA certificate `ca`, with a nextUpdate after `now`. Otherwise a StateError
    (the transaction rolls back: the CRL in place, the crlnumber and a revocation in the same run stay as they were).

    The second line behind openssl's exit code: a CRL nginx cannot verify, or one already expired, makes nginx
    reject every client."""
    from mtlsctl.x509read import crl_signed_by, read_crl_facts

    path = pki.path(rel)
    if os.path.islink(path) or not path.is_file():
        raise StateError(f"openssl ca -gencrl exited 0 but wrote no CRL ({rel} is missing)",
                         hint="the CRL in place was kept; run the command again")
    facts = read_crl_facts(path)
    problems = []
    if not crl_signed_by(path, pki.path(ca)):
        problems.append(f"it is not signed by {ca}")
    if facts.next_update is None or facts.next_update <= now:
        problems.append(f"its nextUpdate ({facts.next_update or 'none'}) is not in the future")
    if problems:
        raise StateError(f"the CRL openssl wrote is refused ({'; '.join(problems)}); the CRL in place was kept",
                         hint="check which openssl is on PATH and the CA section of openssl.cnf; then run the command again")


def generate_crl(pki: Pki, days: int, runner: Runner, tx: Transaction, now: datetime | None = None) -> None:
    """Write crl/ca.crl (mode 644) from the database; the crlnumber change is rolled back with `tx`."""
    now = now or datetime.now(timezone.utc)
    protect_database(pki.root, tx, signs=False)
    tmp = pki.path(CRL_TMP)
    tx.may_create(tmp)
    runner.run(gencrl_command(days, now), cwd=pki.root)
    check_new_crl(pki, CRL_TMP, pki.ca_cert, now)
    normalize_modes(pki.root, (pki.crlnumber, pki.crlnumber + ".old"))
    os.chmod(tmp, MODE_PUBLIC)
    final = pki.path(pki.crl)
    tx.snapshot(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    write_chain_crl(pki, tx)


@dataclass(frozen=True)
class CrlInfo:
    this_update: datetime
    next_update: datetime
    crl_number: str  # hex, as in the crlnumber file
    revoked: int

    def to_json(self) -> dict[str, object]:
        return {"this_update": self.this_update.isoformat(), "next_update": self.next_update.isoformat(),
                "crl_number": self.crl_number, "revoked": self.revoked}


def crl_text_command(path: str = Pki.crl) -> Command:
    """For display only (`openssl crl -text`): decisions read the CRL through mtlsctl.x509read."""
    return Command(("openssl", "crl", "-in", path, "-noout", "-text"))


def parse_openssl_date(text: str) -> datetime:
    """`Nov  7 01:55:29 2026 GMT` (openssl's -enddate form, still used by the drop-in scripts' output)."""
    return datetime.strptime(" ".join(text.split()), "%b %d %H:%M:%S %Y GMT").replace(tzinfo=timezone.utc)


def crl_info_from_file(path: Path) -> CrlInfo:
    """lastUpdate, nextUpdate, the CRL number and the revoked count, from the CRL's parsed DER."""
    from mtlsctl.x509read import read_crl_facts

    facts = read_crl_facts(path)
    if facts.next_update is None:
        raise StateError(f"{path.name} has no nextUpdate", hint="regenerate it: mtlsctl crl")
    return CrlInfo(this_update=facts.this_update, next_update=facts.next_update, crl_number=facts.crl_number,
                   revoked=facts.revoked)


def read_crl_info(pki: Pki, runner: Runner) -> CrlInfo | None:
    """The current CRL's dates and size, or None when crl/ca.crl does not exist."""
    if not pki.path(pki.crl).exists():
        return None
    return crl_info_from_file(pki.path(pki.crl))


def read_crl_info_or_none(pki: Pki, runner: Runner) -> CrlInfo | None:
    """Like read_crl_info, but an unreadable CRL counts as missing (so it gets regenerated)."""
    from mtlsctl.errors import MtlsError

    try:
        return read_crl_info(pki, runner)
    except MtlsError:
        return None


def is_due(info: CrlInfo | None, refresh_within_days: int, now: datetime | None = None, pki: Pki | None = None,
           revoked: set[str] | None = None) -> bool:
    """A CRL is due when missing, when its nextUpdate is within the refresh window, or (given the PKI) when it
    lacks a serial that index.txt says is revoked: a run killed between `openssl ca -revoke` and `-gencrl`
    leaves the revocation in the database but not in the CRL nginx reads, and only a new CRL closes that.
    `revoked`: index.txt's revoked serials when the caller has just read them (see missing_revocations)."""
    now = now or datetime.now(timezone.utc)
    if info is None or info.next_update - now <= timedelta(days=refresh_within_days):
        return True
    return pki is not None and bool(missing_revocations(pki, revoked))


def revoked_serials(index: Path) -> set[str]:
    """The serials index.txt marks revoked (R), normalised; every row checked, none made into objects."""
    from mtlsctl import db

    return {line.serial for line in db.scan_index(index) if line.status == "R"}


def missing_revocations(pki: Pki, revoked: set[str] | None = None) -> list[str]:
    """Serials index.txt marks revoked (R) that crl/ca.crl does not list (parsed, not text). `revoked`: those
    serials, when the caller read them from this index.txt under the lock it still holds (renew's one pass)."""
    from mtlsctl.x509read import crl_serials

    if revoked is None:
        revoked = revoked_serials(pki.path(pki.index))
    if not revoked:
        return []
    try:
        listed = crl_serials(pki.path(pki.crl))
    except StateError:
        return sorted(revoked)
    return sorted(revoked - listed)  # both normalised (db.normalize_serial, x509read.serial_hex)


@dataclass(frozen=True)
class CrlResult:
    regenerated: bool
    info: CrlInfo

    @property
    def changed(self) -> bool:
        """The CRL changed: publish it and reload nginx (after_change)."""
        return self.regenerated


def refresh_crl(pki: Pki, profile: Profile, runner: Runner, *, if_due: bool, now: datetime | None = None) -> CrlResult:
    """`mtlsctl crl`: regenerate crl/ca.crl (only when due with if_due), under the PKI lock."""
    now = now or datetime.now(timezone.utc)
    pki.require_ca()
    with pki_lock(pki.lock_path):
        current = read_crl_info_or_none(pki, runner)
        if if_due and not is_due(current, profile.crl.refresh_within_days, now, pki):
            assert current is not None
            return CrlResult(False, current)
        with audit.failures_recorded(pki, "crl", if_due=if_due), Transaction(pki.root) as tx:
            generate_crl(pki, profile.crl.days, runner, tx, now)
            info = read_crl_info(pki, runner)
            tx.checkpoint()
        assert info is not None
        audit.record(pki, "crl", crl_number=info.crl_number, next_update=f"{info.next_update:%Y-%m-%dT%H:%M:%SZ}",
                     revoked=info.revoked, if_due=if_due)
    assert info is not None
    return CrlResult(True, info)


def plan_crl(pki: Pki, profile: Profile, *, if_due: bool, now: datetime) -> tuple[list[Command], list[str]]:
    """What `crl [--if-due]` would run (--dry-run): the same due check as the real run, then its command."""
    pki.require_ca()
    current = read_crl_info_or_none(pki, None)  # type: ignore[arg-type]
    if if_due and not is_due(current, profile.crl.refresh_within_days, now, pki):
        assert current is not None
        return [], [f"not due: the CRL is valid until {current.next_update:%Y-%m-%d %H:%M} UTC (crl.refresh_within_days "
                    f"{profile.crl.refresh_within_days})"]
    notes = ["there is no CRL yet: one is made"] if current is None else []
    return [gencrl_command(profile.crl.days, now)], notes + [f"then {CRL_TMP} is renamed to {Pki.crl}"
                                                            + (f" and {Pki.chain_crl} rebuilt" if pki.has_chain() else "")]


def plan_root_crl(pki: Pki, profile: Profile, root_key: str | None, now: datetime) -> tuple[list[Command], list[str]]:
    """What `crl --root` would run (--dry-run): the ROOT's command (`-name root_ca`), with the same checks."""
    if not pki.has_chain() or profile.ca.intermediate is None:
        raise InputError("this PKI has no separate root (profile ca.intermediate is not set)")
    if root_key is None and not pki.path(pki.root_key).exists():
        raise InputError("the root key is offline (exported with `mtlsctl root export-offline`)",
                         hint="bring it back by path: mtlsctl crl --root --root-key /media/usb/root.key")
    return ([root_gencrl_command(profile.ca.intermediate.root_crl_days, now, root_key)],
            [f"then {ROOT_CRL_TMP} is renamed to {Pki.root_crl} and {Pki.chain_crl} rebuilt"])


def read_root_crl_info(pki: Pki, runner: Runner) -> CrlInfo | None:
    if not pki.path(pki.root_crl).exists():
        return None
    return crl_info_from_file(pki.path(pki.root_crl))


def refresh_root_crl(pki: Pki, profile: Profile, runner: Runner, root_key: str | None = None,
                     now: datetime | None = None) -> CrlInfo:
    """Regenerate the root's CRL (and crl/chain.crl); the root key is private/root.key or, once exported, `root_key`."""
    if not pki.has_chain() or profile.ca.intermediate is None:
        raise InputError("this PKI has no separate root (profile ca.intermediate is not set)")
    if root_key is None and not pki.path(pki.root_key).exists():
        raise InputError("the root key is offline (exported with `mtlsctl root export-offline`)",
                         hint="bring it back by path: mtlsctl crl --root --root-key /media/usb/root.key")
    if root_key is not None and not os.path.isfile(root_key):
        raise InputError(f"--root-key {root_key} does not exist")
    with pki_lock(pki.lock_path):
        with audit.failures_recorded(pki, "crl", root=True), Transaction(pki.root) as tx:
            generate_root_crl(pki, profile.ca.intermediate.root_crl_days, runner, tx, now, root_key)
        info = read_root_crl_info(pki, runner)
        assert info is not None
        audit.record(pki, "crl", root=True, crl_number=info.crl_number, next_update=f"{info.next_update:%Y-%m-%dT%H:%M:%SZ}",
                     revoked=info.revoked, root_offline=root_key is not None)
    return info
