"""The CRL: generated the guide's way, but atomically and with lastUpdate backdated.

FIELD-NOTES (CRLs and nginx): a CRL whose lastUpdate is ahead of the nginx host's clock is "not yet
valid" for everyone, and an expired one makes nginx reject every client. So lastUpdate is set a few
minutes in the past, nextUpdate explicitly `crl.days` ahead, and the file is replaced in one rename.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

from mtlsctl.files import MODE_PUBLIC, Transaction, fsync_dir, normalize_modes
from mtlsctl.pki import Pki
from mtlsctl.runner import Command, Runner

CLOCK_SKEW = timedelta(minutes=5)
CRL_TMP = "crl/.ca.crl.tmp"


def asn1_time(when: datetime) -> str:
    """The form openssl takes for -crl_lastupdate/-crl_nextupdate (UTCTime until 2049)."""
    when = when.astimezone(timezone.utc)
    return when.strftime("%y%m%d%H%M%SZ" if when.year < 2050 else "%Y%m%d%H%M%SZ")


def gencrl_command(days: int, now: datetime, out: str = CRL_TMP) -> Command:
    """`openssl ca -config openssl.cnf -gencrl -out ...` with explicit, backdated dates."""
    return Command(
        ("openssl", "ca", "-config", "openssl.cnf", "-gencrl",
         "-crl_lastupdate", asn1_time(now - CLOCK_SKEW),
         "-crl_nextupdate", asn1_time(now + timedelta(days=days)),
         "-out", out),
        label=f"generating the CRL {Pki.crl} (valid {days} days)",
    )


def generate_crl(pki: Pki, days: int, runner: Runner, tx: Transaction, now: datetime | None = None) -> None:
    """Write crl/ca.crl (mode 644) from the database; the crlnumber change is rolled back with `tx`."""
    now = now or datetime.now(timezone.utc)
    for rel in (pki.crlnumber, pki.crlnumber + ".old"):
        tx.snapshot(pki.path(rel))
    tmp = pki.path(CRL_TMP)
    tx.may_create(tmp)
    runner.run(gencrl_command(days, now), cwd=pki.root)
    normalize_modes(pki.root, (pki.crlnumber, pki.crlnumber + ".old"))
    os.chmod(tmp, MODE_PUBLIC)
    final = pki.path(pki.crl)
    tx.snapshot(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
