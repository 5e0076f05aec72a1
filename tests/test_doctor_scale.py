"""doctor at scale: `check_database` and `check_modes` at 100,000 rows and 500,000 files, without changing a finding.

`check_database` looked each certs/NAME.crt up by searching every row of index.txt for the name (10^10 steps at
100,000 names: it never finished), on rows parsed into datetimes; `check_modes` walked the PKI with pathlib and
lstat'ed the secret files twice. The new ones look names up in a dict, scan index.txt as text (time keys) and list
each directory once. The old functions are kept below, verbatim, as the reference: on a database of thousands of
synthetic rows with every planted problem, in a single-tier and a two-tier PKI, the new ones report exactly what
they reported (the same findings, messages and fixes, in the same order).
"""

from __future__ import annotations

import os
import shutil
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mtlsctl import db, doctor
from mtlsctl.audit import AUDIT_FILE
from mtlsctl.doctor import Finding
from mtlsctl.errors import MtlsError
from mtlsctl.files import JOURNAL_DIR
from mtlsctl.pki import DIRS, Settings, resolve_settings
from mtlsctl.runner import Runner

from .conftest import set_profile
from .test_scale import NOW, asn1, even_hex, synthetic_rows

# --------------------------------------------------------------------------- the reference: the old functions, verbatim


def _mode(path: os.PathLike[str] | str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def old_check_modes(settings: Settings) -> list[Finding]:
    pki = settings.pki
    out = []
    owner = os.lstat(pki.root).st_uid
    private = pki.path("private")
    if private.is_dir() and _mode(private) & 0o077:
        out.append(Finding("modes", "error", f"private/ is mode {_mode(private):o}; others can list the keys",
                           f"chmod 700 {private}"))
    secret_files = [p for p in private.glob("*") if p.is_file()] if private.is_dir() else []
    secret_files += list(pki.path("certs").glob("*.p12"))
    for path in secret_files:
        mode = _mode(path)
        if mode & 0o077:
            out.append(Finding("modes", "error", f"{path.relative_to(pki.root)} is mode {mode:o}: readable by group or others",
                               f"chmod {'400' if path.name == 'ca.key' else '600'} {path}"))
    ours = [pki.root, *(p for p in pki.root.iterdir() if p.is_file() and p.name != AUDIT_FILE)]  # audit.log: check_audit_log
    for sub in DIRS:
        if pki.path(sub).is_dir():
            ours += [pki.path(sub), *pki.path(sub).rglob("*")]
    for path in ours:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if st.st_uid != owner and st.st_uid != 0:
            out.append(Finding("owners", "error", f"{path} is owned by uid {st.st_uid}, the PKI by uid {owner}",
                               f"chown {owner} {path}"))
        if stat.S_ISLNK(st.st_mode) and path.parent.name == "private":
            out.append(Finding("owners", "error", f"{path} is a symlink inside private/", "replace it with the file"))
        if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o002:
            out.append(Finding("modes", "error", f"{path} is writable by everyone", f"chmod o-w {path}"))
    if not out:
        out.append(Finding("modes", "ok", "private files are readable by their owner only"))
    return out


def old_check_database(settings: Settings, now: datetime | None = None) -> list[Finding]:
    pki = settings.pki
    now = now or datetime.now(timezone.utc)
    out = []
    try:
        rows = db.read_index(pki.path(pki.index))
    except MtlsError as exc:
        return [Finding("database", "error", exc.message, exc.hint or "")]
    serials = {r.serial for r in rows}
    if len(serials) != len(rows):
        out.append(Finding("database", "error", "index.txt has duplicate serials", "restore index.txt from a backup"))
    newcerts = {p.stem.upper() for p in pki.path("newcerts").glob("*.pem")}
    for serial in sorted(serials - newcerts):
        out.append(Finding("database", "error", f"serial {serial} is in index.txt but newcerts/{serial}.pem is missing",
                           "restore newcerts/ from a backup"))
    for serial in sorted(newcerts - serials):
        out.append(Finding("database", "error",
                           f"newcerts/{serial}.pem is not in index.txt (an orphan certificate: it can never be revoked)",
                           f"revoke it by hand: openssl ca -config openssl.cnf -valid newcerts/{serial}.pem, then -revoke"))
    try:
        next_serial = int(db.read_serial(pki.path(pki.serial)), 16)
        if serials and next_serial <= max(int(s, 16) for s in serials):
            out.append(Finding("database", "error", f"serial ({next_serial:X}) is not above the highest issued serial",
                               "write the next free serial to the serial file"))
    except MtlsError as exc:
        out.append(Finding("database", "error", exc.message, exc.hint or ""))
    by_pem = {}
    for row in rows:
        by_pem[row.serial] = row
    for crt in sorted(pki.path("certs").glob("*.crt")):
        name = crt.stem
        if not any(r.cn == name and db.same_certificate(crt, pki.path(f"newcerts/{r.serial}.pem")) for r in rows):
            out.append(Finding("database", "error", f"certs/{crt.name} is not in this CA's database",
                               "move it away if it is not ours; if it is, restore index.txt from a backup"))
    active: dict[str, list[str]] = {}
    for row in rows:
        if row.cn and row.is_active(now):
            active.setdefault(row.cn.lower(), []).append(row.serial)
    for name, held in sorted(active.items()):
        if len(held) > 1 and settings.profile.renew.revoke_superseded:
            out.append(Finding("database", "warn",
                               f"{name} has {len(held)} valid certificates (serials {', '.join(held)}): an interrupted "
                               "replace or renew left the older one valid",
                               f"mtlsctl replace {name} (a lost device), or mtlsctl renew (revokes superseded ones)"))
    if pki.path(JOURNAL_DIR).exists():
        out.append(Finding("database", "error", "an interrupted run left its journal",
                           "mtlsctl recover --dry-run (what it would roll back), then mtlsctl recover"))
    if not out:
        out.append(Finding("database", "ok", f"index.txt ({len(rows)} certificates) matches newcerts/ and certs/"))
    return out


# --------------------------------------------------------------------------- a fleet in openssl's layout

ROWS, NAMES = 1200, 860  # names repeat: renewals, some left with two valid certificates


def pem(serial: str) -> str:
    body = (serial * 40)[:120]
    return f"-----BEGIN CERTIFICATE-----\n{body[:64]}\n{body[64:]}\n-----END CERTIFICATE-----\n"


def build_fleet(pki: Path, *, plants: bool = True) -> dict[str, list[str]]:
    """index.txt of ROWS synthetic rows with newcerts/SERIAL.pem, certs/NAME.crt (the newest row's),
    private/NAME.key and certs/NAME.p12; with `plants`, every problem check_database reports. Returns the
    serials of each name (in index.txt's order)."""
    lines = synthetic_rows(ROWS, names=NAMES, seed=52)
    later = asn1(NOW + timedelta(days=400))
    extra = [f"V\t{later}\t\t{even_hex(0x1000 + ROWS + i)}\tunknown\t{subject}"
             for i, subject in enumerate(["/O=no common name", "/CN=", "/C=ES/CN=Dev-00007", "/CN=dev-00007/O=after"])]
    lines += extra
    if plants:
        lines.append(lines[10].replace("/CN=", "/CN=again-"))  # a duplicate serial
    (pki / "index.txt").write_text("\n".join(lines) + "\n")
    rows = [db.check_line(line, n) for n, line in enumerate(lines, 1)]
    by_name: dict[str, list[str]] = {}
    for row in rows:
        (pki / "newcerts" / f"{row.serial}.pem").write_text(pem(row.serial))
        if row.cn:
            by_name.setdefault(row.cn, []).append(row.serial)
    for i, (name, serials) in enumerate(sorted(by_name.items())):
        text = pem(serials[-1])
        if i % 11 == 3:  # `openssl ca -out` writes a text dump before the certificate
            text = f"Certificate:\n    Data: ...\n        Serial Number: {serials[-1]}\n{text}"
        if i % 13 == 5:  # other line breaks: the same certificate
            text = text.replace("\n", "\r\n")
        (pki / "certs" / f"{name}.crt").write_text(text)
        if i % 3:
            (pki / "private" / f"{name}.key").write_text("key\n")
            (pki / "private" / f"{name}.key").chmod(0o600)
            (pki / "certs" / f"{name}.p12").write_bytes(b"p12")
            (pki / "certs" / f"{name}.p12").chmod(0o600)
    (pki / "serial").write_text(even_hex(0x1000 + len(lines) + 5) + "\n")
    if not plants:
        return by_name
    repeated = sorted(name for name, serials in by_name.items() if len(serials) > 2)
    # a name's certs/NAME.crt holding an OLDER certificate of that name: still in the database
    (pki / "certs" / f"{repeated[0]}.crt").write_text(pem(by_name[repeated[0]][0]))
    # a name whose certificate is gone from newcerts/: its certs/NAME.crt is no longer in the database
    for serial in by_name["dev-00042"]:
        (pki / "newcerts" / f"{serial}.pem").unlink()
    for serial in by_name["dev-00100"] + by_name["dev-00777"]:
        (pki / "newcerts" / f"{serial}.pem").unlink()  # missing newcerts of other names
    # certs/NAME.crt holding another name's certificate
    (pki / "certs" / "dev-00005.crt").write_text(pem(by_name["dev-00006"][-1]))
    # certificates of no row: another CA's, a case variant, odd file names, a link to nowhere
    shutil.copy(pki / "ca/ca.crt", pki / "certs/intruder.crt")
    (pki / "certs" / "DEV-00003.crt").write_text(pem(by_name["dev-00003"][-1]))
    (pki / "certs" / ".crt").write_text(pem(by_name["dev-00004"][-1]))
    (pki / "certs" / "dev.00008.crt").write_text(pem(by_name["dev-00008"][-1]))
    (pki / "certs" / "dangling.crt").symlink_to("nowhere.crt")
    (pki / "certs" / "empty.crt").write_text("")
    # orphans in newcerts/: not in index.txt
    for orphan in ("FFFF01.pem", "0abc.pem", "notes.pem", ".pem", "..pem"):
        (pki / "newcerts" / orphan).write_text(pem("99"))
    (pki / "serial").write_text("1000\n")  # behind the highest serial
    return by_name


def settings_of(pki: Path) -> Settings:
    return resolve_settings(pki, None, environ={})


# --------------------------------------------------------------------------- check_database


@pytest.mark.parametrize("revoke_superseded", [True, False])
def test_database_findings_are_the_old_ones(tiered_pki, revoke_superseded):
    if not revoke_superseded:
        set_profile(tiered_pki, renew={"revoke_superseded": False})
    build_fleet(tiered_pki)
    settings = settings_of(tiered_pki)
    found = doctor.check_database(settings, NOW)
    assert found == old_check_database(settings, NOW)
    messages = [f.message for f in found]
    # every planted problem is there (the comparison is not between two empty lists)
    assert "index.txt has duplicate serials" in messages
    assert any(m.endswith("is not above the highest issued serial") for m in messages)
    for orphan in ("FFFF01", "0ABC", "NOTES", ".PEM", "."):
        assert f"newcerts/{orphan}.pem is not in index.txt (an orphan certificate: it can never be revoked)" in messages
    for crt in ("dev-00042", "dev-00100", "dev-00777", "dev-00005", "intruder", "DEV-00003", "", "dev.00008", "dangling", "empty"):
        assert f"certs/{crt}.crt is not in this CA's database" in messages, crt
    assert "certs/dev-00006.crt is not in this CA's database" not in messages
    missing = [m for m in messages if m.startswith("serial ") and "newcerts/" in m]
    assert len(missing) >= 3
    warns = [f for f in found if f.level == "warn"]
    assert bool(warns) == revoke_superseded
    if revoke_superseded:
        assert len(warns) > 50 and any(f.message.startswith("dev-00007 has ") for f in warns)  # Dev-00007 counts too


def test_a_healthy_fleet_is_healthy_as_before(tiered_pki):
    build_fleet(tiered_pki, plants=False)
    set_profile(tiered_pki, renew={"revoke_superseded": False})
    settings = settings_of(tiered_pki)
    found = doctor.check_database(settings, NOW)
    assert found == old_check_database(settings, NOW)
    assert found == [Finding("database", "ok", f"index.txt ({ROWS + 4} certificates) matches newcerts/ and certs/")]


def test_a_journal_and_a_hostile_row_as_before(tiered_pki):
    build_fleet(tiered_pki, plants=False)
    (tiered_pki / JOURNAL_DIR).mkdir()
    settings = settings_of(tiered_pki)
    assert doctor.check_database(settings, NOW) == old_check_database(settings, NOW)
    assert doctor.check_database(settings, NOW)[-1].message == "an interrupted run left its journal"
    (tiered_pki / JOURNAL_DIR).rmdir()
    with open(tiered_pki / "index.txt", "a") as fh:
        fh.write("V\tsoon\t\t1000\tunknown\t/CN=a\n")
    found = doctor.check_database(settings, NOW)
    assert found == old_check_database(settings, NOW)
    assert len(found) == 1 and f"line {ROWS + 5} has the expiry 'soon'" in found[0].message


def test_the_database_check_is_linear(tiered_pki, monkeypatch):
    """One look at each row's name and one comparison per certs/NAME.crt (and per older row of its name): the
    old search made ROWS x files of them."""
    by_name = build_fleet(tiered_pki)
    settings = settings_of(tiered_pki)
    names, compared = [], []
    real_cn, real_same = db.cn_of, db.same_certificate_at
    monkeypatch.setattr(db, "cn_of", lambda subject: names.append(subject) or real_cn(subject))
    monkeypatch.setattr(db, "same_certificate_at", lambda fd, a, b: compared.append(a) or real_same(fd, a, b))
    doctor.check_database(settings, NOW)
    crts = len(list((tiered_pki / "certs").glob("*.crt")))
    assert len(names) == ROWS + 5
    assert crts <= len(compared) <= crts + sum(len(s) - 1 for s in by_name.values())


# --------------------------------------------------------------------------- check_modes


def plant_modes(pki: Path, nested: bool) -> None:
    names = sorted(p.stem for p in (pki / "private").glob("dev-*.key"))
    (pki / "private" / f"{names[0]}.key").chmod(0o644)
    (pki / "private" / f"{names[1]}.key").chmod(0o666)  # readable and writable by everyone
    (pki / "private" / "ca.key").chmod(0o640)
    (pki / "certs" / f"{names[2]}.p12").chmod(0o640)
    (pki / "certs" / f"{names[3]}.crt").chmod(0o646)
    (pki / "newcerts" / "1000.pem").chmod(0o666)
    (pki / "private" / "linked.key").symlink_to(pki / "private" / f"{names[4]}.key")
    (pki / "private" / "dangling.key").symlink_to("nowhere.key")
    (pki / "certs" / "linked.p12").symlink_to(pki / "certs" / f"{names[5]}.p12")
    (pki / "crl" / "open").write_text("")
    (pki / "crl" / "open").chmod(0o777)
    if nested:  # subdirectories: the walk's order is pathlib's, whatever the Python version
        (pki / "certs" / "dir.p12").mkdir(mode=0o755)
        (pki / "certs" / "old" / "deeper").mkdir(parents=True)
        (pki / "certs" / "old" / "deeper" / "x.crt").write_text("")
        (pki / "certs" / "old" / "deeper" / "x.crt").chmod(0o666)
        (pki / "private" / "attic").mkdir(mode=0o777)
        (pki / "private" / "attic" / "k.key").write_text("")
        (pki / "private" / "attic" / "k.key").chmod(0o644)
        (pki / "private" / "attic" / "link").symlink_to("k.key")
    if os.geteuid() == 0:
        os.chown(pki / "certs" / f"{names[6]}.crt", 12345, -1)
        os.chown(pki / "private" / f"{names[7]}.key", 12345, -1)
        os.lchown(pki / "private" / "dangling.key", 12345, -1)


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_modes_findings_are_the_old_ones(tiered_pki, nested, monkeypatch):
    build_fleet(tiered_pki, plants=False)
    settings = settings_of(tiered_pki)
    assert doctor.check_modes(settings) == old_check_modes(settings) == [
        Finding("modes", "ok", "private files are readable by their owner only")]
    plant_modes(tiered_pki, nested)
    walked = []
    real_rglob = Path.rglob
    with monkeypatch.context() as m:
        m.setattr(Path, "rglob", lambda self, pattern: walked.append(self.name) or real_rglob(self, pattern))
        found = doctor.check_modes(settings)
    assert walked == (["certs", "private"] if nested else [])  # flat directories: one listing, no pathlib walk
    assert found == old_check_modes(settings)
    messages = [f.message for f in found]
    assert len(found) >= 10
    assert "private/ca.key is mode 640: readable by group or others" in messages
    assert "private/linked.key is mode 777: readable by group or others" in messages
    assert f"{tiered_pki}/private/linked.key is a symlink inside private/" in messages
    assert f"{tiered_pki}/crl/open is writable by everyone" in messages
    if os.geteuid() == 0:
        assert any("is owned by uid 12345" in m for m in messages)
    (tiered_pki / "private").chmod(0o755)
    assert doctor.check_modes(settings) == old_check_modes(settings)
    assert doctor.check_modes(settings)[0].message == "private/ is mode 755; others can list the keys"


# --------------------------------------------------------------------------- the whole doctor


def test_the_doctor_reports_what_it_reported(tiered_pki, monkeypatch):
    """run_doctor with the new checks == run_doctor with the old ones; the CRL's count of revoked rows as the
    old read counted them."""
    build_fleet(tiered_pki)
    plant_modes(tiered_pki, nested=False)
    settings = settings_of(tiered_pki)
    found = doctor.run_doctor(settings, Runner(), NOW)
    with monkeypatch.context() as m:
        m.setattr(doctor, "check_database", old_check_database)
        m.setattr(doctor, "check_modes", old_check_modes)
        assert found == doctor.run_doctor(settings, Runner(), NOW)
    revoked = len({r.serial for r in db.read_index(tiered_pki / "index.txt") if r.status == "R"})  # serials, not rows
    assert revoked > 100
    [message] = [f.message for f in found if f.check == "crl" and f.level == "error"]
    assert message.startswith(f"the CRL does not list {revoked} certificate(s) index.txt has revoked (serial 1")
