"""Scale (issue 16): index.txt read as a stream, on databases of thousands of rows built here in openssl's own format.

- the new reader gives the rows the old one (strptime, the whole file in memory) gave, and refuses hostile rows
  (field counts, statuses, dates, serials, huge lines) with one line naming the row, never a traceback;
- `list`, `list --json` and `list --jsonl` print what the old list_certs printed (kept below as the reference), and
  --jsonl's lines are --json's elements; the array is byte for byte json.dumps(indent=2);
- renew's streaming scans pick the rows the list-based ones pick;
- memory: the --jsonl path does not grow with the number of rows (tracemalloc, 5,000 vs 20,000);
- `python benchmarks/scale.py --quick` runs end to end (real nginx), so the benchmark never rots.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tracemalloc
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mtlsctl import crl, db, lifecycle
from mtlsctl.errors import StateError
from mtlsctl.pki import ClientFiles, resolve_settings

from .conftest import run_cli, set_profile

REPO = Path(__file__).resolve().parent.parent
NOW = datetime.now(timezone.utc).replace(microsecond=0)


# --------------------------------------------------------------------------- a database in openssl's format


def asn1(when: datetime) -> str:
    return when.strftime("%y%m%d%H%M%SZ") if when.year < 2050 else when.strftime("%Y%m%d%H%M%SZ")


def even_hex(value: int) -> str:
    text = f"{value:X}"
    return text.zfill(len(text) + len(text) % 2)


def synthetic_rows(count: int, *, first_serial: int = 0x1000, seed: int = 16, names: int | None = None) -> list[str]:
    """Rows as `openssl ca` writes them: V, R (with and without a reason) and E; UTCTime and, past 2049,
    GeneralizedTime; names that repeat (renewals) when `names` < count; a few subjects with more RDNs."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        name = f"dev-{(i % names) if names else i:05d}"
        expiry = NOW + timedelta(days=rng.randint(-400, 9000), seconds=rng.randint(0, 86399))
        subject = f"/CN={name}" if i % 7 else f"/C=ES/O=Example Org/OU=fleet {i % 3}/CN={name}"
        kind = rng.random()
        if kind < 0.2:
            revoked = NOW - timedelta(days=rng.randint(0, 900), seconds=rng.randint(0, 86399))
            reason = rng.choice(["", ",keyCompromise", ",superseded", ",cessationOfOperation"])
            out.append(f"R\t{asn1(expiry)}\t{asn1(revoked)}{reason}\t{even_hex(first_serial + i)}\tunknown\t{subject}")
        elif kind < 0.25:
            out.append(f"E\t{asn1(expiry)}\t\t{even_hex(first_serial + i)}\tunknown\t{subject}")
        else:
            out.append(f"V\t{asn1(expiry)}\t\t{even_hex(first_serial + i)}\tunknown\t{subject}")
    return out


def old_parse_index(text: str) -> list[db.IndexRow]:
    """The reader before issue 16 (strptime, the whole text split at once): the reference for the new one."""

    def when(value: str) -> datetime:
        if len(value) == 13:
            value = ("19" if int(value[:2]) >= 50 else "20") + value
        return datetime.strptime(value, "%Y%m%d%H%M%SZ").replace(tzinfo=timezone.utc)

    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        status, expiry, revocation, serial, _file, subject = line.split("\t")
        revoked_at = reason = None
        if revocation:
            date, _, why = revocation.partition(",")
            revoked_at, reason = when(date), why or "unspecified"
        rows.append(db.IndexRow(status, when(expiry), revoked_at, reason, db.normalize_serial(serial), subject))
    return rows


def test_the_stream_reads_what_the_old_reader_read(tmp_path):
    lines = synthetic_rows(4000, names=2500)
    lines.insert(20, "")  # a blank line is skipped, as before
    lines.append(f"V\t{asn1(NOW + timedelta(days=9))}\t\t0abc\tunknown\t/CN=lower-case-odd-serial")  # the slow path
    text = "\n".join(lines) + "\n"
    index = tmp_path / "index.txt"
    index.write_text(text)
    expected = old_parse_index(text)
    assert db.read_index(index) == expected
    assert list(db.iter_index(index)) == expected
    assert db.parse_index(text) == expected
    assert [line.row() for line in db.scan_index(index)] == expected
    assert expected[-1].serial == "0ABC"
    # the last line without its newline is still a row
    index.write_text(text.rstrip("\n"))
    assert db.read_index(index) == expected


def test_time_keys_order_and_refuse_as_strptime_does():
    rng = random.Random(7)
    samples = [asn1(NOW + timedelta(seconds=rng.randint(-10**9, 10**9))) for _ in range(2000)]
    samples += ["991231235959Z", "500101000000Z", "491231235959Z", "20500101000000Z", "99991231235959Z",
                "240229120000Z", "230229120000Z", "21000229120000Z", "20000229120000Z", "270230120000Z", "271301120000Z",
                "270100120000Z", "270132120000Z", "270131240000Z", "270131236000Z", "270131235960Z", "2701311200Z",
                "27013112000Z0", "27013112000 Z", "２70131120000Z", "270131120000z", "00000101000000Z", "", "Z"]
    for text in samples:
        try:
            padded = (("19" if int(text[:2]) >= 50 else "20") + text) if len(text) == 13 else text
            expected = datetime.strptime(padded, "%Y%m%d%H%M%SZ").replace(tzinfo=timezone.utc)
        except ValueError:
            expected = None
        if expected is not None and not (text.isascii() and len(text) in (13, 15) and text.endswith("Z")):
            expected = None  # strptime is lenient about widths, digits and the case of Z; openssl writes none of these
        key = db.time_key(text)
        assert (key is None) == (expected is None), text
        if expected is not None:
            assert db.parse_asn1_time(text) == expected == db.key_time(key)
        else:
            with pytest.raises(ValueError):
                db.parse_asn1_time(text)
    valid = sorted((t for t in samples if db.time_key(t)), key=db.parse_asn1_time)
    assert valid == sorted(valid, key=db.time_key)  # keys order as the times do
    moment = NOW + timedelta(microseconds=500_000)
    assert db.time_key(asn1(NOW)) <= db.now_key(moment) < db.time_key(asn1(NOW + timedelta(seconds=1)))


HOSTILE = [
    ("V\t270101000000Z\t\t1000\tunknown", "has 5 tab-separated fields, not 6"),
    ("V\t270101000000Z\t\t1000\tunknown\t/CN=a\textra", "has 7 tab-separated fields, not 6"),
    ("X\t270101000000Z\t\t1000\tunknown\t/CN=a", "has the status 'X'"),
    ("V\t271301000000Z\t\t1000\tunknown\t/CN=a", "has the expiry '271301000000Z'"),
    ("V\t270230000000Z\t\t1000\tunknown\t/CN=a", "has the expiry '270230000000Z'"),
    ("V\tsoon\t\t1000\tunknown\t/CN=a", "has the expiry 'soon'"),
    ("R\t270101000000Z\tyesterday,keyCompromise\t1000\tunknown\t/CN=a", "has the revocation date 'yesterday'"),
    ("V\t270101000000Z\t\t10G0\tunknown\t/CN=a", "has the serial '10G0', which is not hex"),
    ("V\t270101000000Z\t\t\tunknown\t/CN=a", "has the serial '', which is not hex"),
    ("V\t270101000000Z\t\t1000\tunknown\t/CN=" + "x" * (db.MAX_LINE_BYTES + 10), f"is longer than {db.MAX_LINE_BYTES} bytes"),
    ("\x00\x01garbage", "has 1 tab-separated fields, not 6"),
]


@pytest.mark.parametrize(("bad", "message"), HOSTILE, ids=[m[:30] for _, m in HOSTILE])
def test_a_hostile_row_is_refused_naming_its_line(tmp_path, bad, message):
    lines = synthetic_rows(3000)
    lines.insert(1234, bad)
    index = tmp_path / "index.txt"
    index.write_text("\n".join(lines) + "\n")
    for read in (db.read_index, lambda p: list(db.scan_index(p)), lambda p: db.parse_index(p.read_text())):
        with pytest.raises(StateError) as err:
            read(index)
        assert "line 1235 " in err.value.message and message in err.value.message, err.value.message
        assert "restore index.txt" in (err.value.hint or "")


def test_a_huge_line_is_refused_before_it_is_read_whole(tmp_path, monkeypatch):
    """A 64 MB line (no newline) is refused after MAX_LINE_BYTES + one block, not loaded."""
    index = tmp_path / "index.txt"
    with open(index, "wb") as fh:
        fh.write(("\n".join(synthetic_rows(10)) + "\n").encode())
        fh.write(b"V\t" + b"9" * (64 << 20))
    reads = []
    real_open = open

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def read(self, size):
            data = self.fh.read(size)
            reads.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(db, "open", lambda path, mode: Counting(real_open(path, mode)), raising=False)
    with pytest.raises(StateError, match="line 11 is longer than"):
        list(db.index_lines(index))
    assert sum(reads) <= db.MAX_LINE_BYTES + 2 * (1 << 18)


@pytest.mark.parametrize("bad", [bad for bad, _ in HOSTILE[:3]] + [HOSTILE[9][0]])
@pytest.mark.parametrize("form", [["list"], ["list", "--json"], ["list", "--jsonl"], ["renew", "--no-reload"]])
def test_the_cli_refuses_a_hostile_database_before_printing_anything(fast_pki, bad, form):
    set_profile(fast_pki, nginx={"reload_command": "", "test_command": ""})
    lines = synthetic_rows(2000)
    lines.insert(1500, bad)
    (fast_pki / "index.txt").write_text("\n".join(lines) + "\n")
    res = run_cli(["--pki-dir", str(fast_pki), *form])
    assert res.code == 1, (res.code, res.err)
    assert res.out == "" and "line 1501 " in res.err and "Traceback" not in res.err, res.err
    assert len(res.err.splitlines()) == 2  # error: ... / hint: ...


# --------------------------------------------------------------------------- list, as before


def old_list_certs(settings, *, status=None, expiring_within=None, now=None, with_files=True):
    """list_certs before issue 16 (every row in memory; the reference for the streaming inventory)."""
    pki = settings.pki
    rows = db.read_index(pki.path(pki.index))
    latest = {row.cn: row.serial for row in rows if row.cn}
    out = []
    for row in rows:
        st = lifecycle.status_of(row, now, settings.profile.renew.within_days)
        if status is not None and st != status:
            continue
        if expiring_within is not None and not (st in ("valid", "expiring") and row.expires <= now + timedelta(days=expiring_within)):
            continue
        name = row.cn or ""
        files: list[str] = []
        if with_files and name and latest.get(name) == row.serial:
            cf = ClientFiles(name)
            files = [rel for rel in (cf.key, cf.csr, cf.p12) if pki.path(rel).exists()]
            if db.same_certificate(pki.path(cf.crt), pki.path(f"newcerts/{row.serial}.pem")):
                files.insert(2, cf.crt)
        out.append(lifecycle.CertEntry(name, row.serial, st, row.expires, lifecycle.days_left(row.expires, now),
                                       row.revoked_at, row.reason, db.rfc2253(row.subject), files))
    return out


@pytest.fixture
def fleet(fast_pki) -> Path:
    """A PKI with real clients (one renewed: two rows of one name; one revoked) and 3,000 synthetic rows after
    them, names repeating; placeholder files for some synthetic names (a matching certificate, a different one,
    a CSR only)."""
    set_profile(fast_pki, nginx={"reload_command": "", "test_command": ""}, renew={"within_days": 30})
    for name, days in (("phone", 365), ("soon", 10), ("lost", 365)):
        assert run_cli(["--pki-dir", str(fast_pki), "add-client", name, "--days", str(days)]).code == 0
    assert run_cli(["--pki-dir", str(fast_pki), "renew", "--no-reload"]).code == 0  # soon: renewed, two rows
    assert run_cli(["--pki-dir", str(fast_pki), "revoke", "lost", "--no-reload"]).code == 0
    first = int((fast_pki / "serial").read_text(), 16)
    rows = synthetic_rows(3000, first_serial=first, names=2200)
    with open(fast_pki / "index.txt", "a") as fh:
        fh.write("\n".join(rows) + "\n")
    (fast_pki / "serial").write_text(even_hex(first + 3000) + "\n")
    real = (fast_pki / "certs/phone.crt").read_bytes()
    for i, line in enumerate(rows[::5]):
        serial, name = line.split("\t")[3], line.split("CN=")[-1]
        (fast_pki / f"newcerts/{serial}.pem").write_bytes(real)
        if i % 3 == 0:
            (fast_pki / f"certs/{name}.crt").write_bytes(real)  # the same bytes: "crt"
        elif i % 3 == 1:
            (fast_pki / f"certs/{name}.crt").write_bytes(real.replace(b"Certificate:", b"Cert:"))  # same PEM, other text
            (fast_pki / f"private/{name}.key").write_text("k")
        else:
            (fast_pki / f"certs/{name}.csr").write_text("csr")
            (fast_pki / f"certs/{name}.p12").write_text("p12")
    return fast_pki


@pytest.mark.parametrize("options", [{}, {"status": "revoked"}, {"status": "expiring"}, {"status": "expired"},
                                     {"status": "valid"}, {"expiring_within": 45}, {"with_files": False}])
def test_the_inventory_is_the_old_list(fleet, options):
    settings = resolve_settings(fleet, None, environ={})
    now = datetime.now(timezone.utc)
    new = lifecycle.list_certs(settings, now=now, **options)
    assert new == old_list_certs(settings, now=now, **options)
    assert len(new) > (0 if options else 3000)
    inv = lifecycle.inventory(settings, now=now, **options)
    assert inv.count == len(new) and inv.name_width == max(len(e.name) for e in new)
    if not options:
        assert sum(1 for e in new if "certs/phone.crt" in e.files) == 1  # real files are found
        assert any(len(e.files) == 2 and e.files[1].endswith(".crt") for e in new)  # key + a same-PEM certificate


def test_jsonl_lines_are_the_json_elements_and_the_table_is_unchanged(fleet):
    args = ["--pki-dir", str(fleet), "list"]
    as_json = run_cli([*args, "--json"])
    as_jsonl = run_cli([*args, "--jsonl"])
    assert as_json.code == as_jsonl.code == 0
    elements = json.loads(as_json.out)
    assert [json.loads(line) for line in as_jsonl.out.splitlines()] == elements
    assert as_json.out == json.dumps(elements, indent=2) + "\n"  # the array, byte for byte as print_json printed it
    assert len(elements) > 3000
    settings = resolve_settings(fleet, None, environ={})
    old = old_list_certs(settings, now=datetime.now(timezone.utc))
    assert elements == [e.to_json() for e in old] or _only_days_moved(elements, old)
    table = run_cli(args).out.splitlines()
    width = max(4, *(len(e.name) for e in old))
    assert table[0] == f"{'NAME':<{width}}  {'SERIAL':<6}  {'STATUS':<8}  {'NOT AFTER (UTC)':<16}  {'DAYS':>5}  DETAIL"
    assert len(table) == 1 + len(old) + 2 and table[-2].startswith("CA: expires") and table[-1].startswith("CRL: ")
    soon = [line for line in table if line.startswith("soon ")]
    assert len(soon) == 2 and soon[0].split()[2] == "revoked" and soon[1].endswith("key csr crt p12")
    # --jsonl prints only the objects, and --json with --jsonl is refused
    assert all(line.startswith("{") for line in as_jsonl.out.splitlines())
    both = run_cli([*args, "--json", "--jsonl"])
    assert both.code == 2 and both.out == ""
    empty = run_cli([*args, "--status", "expired", "--expiring-within", "3", "--json"])
    assert empty.code == 0 and empty.out == "[]\n"


def _only_days_moved(elements: list[dict], old: list[lifecycle.CertEntry]) -> bool:
    """The two runs straddled a second that changes a days_left: equal but for that."""
    return [{**e, "days_left": 0} for e in elements] == [{**o.to_json(), "days_left": 0} for o in old]


def test_the_entry_writers_are_json_dumps():
    """--json's elements and --jsonl's lines are written out by hand (100,000 a run): byte for byte json.dumps."""
    from mtlsctl.cli.certificates import _entry_element, _entry_line

    when = datetime(2031, 2, 3, 4, 5, 6, tzinfo=timezone.utc)
    cases = [lifecycle.CertEntry("dé\"v\\\u2028\x01", "0A", "revoked", when, -3, when, "keyCompromise",
                                 "CN=d\\C3\\A9,O=x\\,y", ["private/a.key", "certs/b\n.crt"]),
             lifecycle.CertEntry("", "00", "valid", when, 0, None, None, "", []),
             lifecycle.CertEntry("x", "1000", "expiring", when.replace(year=1999), 12345, None, None, "CN=x", ["certs/x.p12"])]
    for e in cases:
        assert "[\n" + _entry_element(e) + "\n]" == json.dumps([e.to_json()], indent=2)
        assert _entry_line(e) == json.dumps(e.to_json())
        unchecked = {**e.to_json(), "files": None}
        assert "[\n" + _entry_element(e, files=False) + "\n]" == json.dumps([unchecked], indent=2)
        assert _entry_line(e, files=False) == json.dumps(unchecked)


def test_list_no_files_reads_the_index_alone(fleet, monkeypatch):
    """--no-files: the same entries, files null (JSON) or no DETAIL (table), and not one file of a name opened."""
    args = ["--pki-dir", str(fleet), "list"]
    full = json.loads(run_cli([*args, "--json"]).out)
    bare = json.loads(run_cli([*args, "--json", "--no-files"]).out)
    assert [{**e, "files": None, "days_left": 0} for e in full] == [{**e, "days_left": 0} for e in bare]
    assert all(e["files"] is None for e in bare) and any(e["files"] for e in full)
    lines = [json.loads(line) for line in run_cli([*args, "--jsonl", "--no-files"]).out.splitlines()]
    assert [{**e, "days_left": 0} for e in lines] == [{**e, "days_left": 0} for e in bare]
    opened: list[str] = []
    real_open = os.open

    def spy(path, *a, **kw):
        opened.append(str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", spy)
    monkeypatch.setattr(os, "access", lambda *a, **kw: opened.append(str(a[0])) or True)
    table = run_cli([*args, "--no-files"]).out.splitlines()
    assert not [p for p in opened if "certs/" in p or "private/" in p], opened[:5]
    soon = [line for line in table if line.startswith("soon ")]
    assert len(soon) == 2 and soon[1].split()[2] == "valid" and not soon[1].endswith("p12")


def test_list_jsonl_into_a_closed_pipe_ends_quietly(fleet):
    """`mtlsctl list --jsonl | head -1`: the reader goes away; no traceback, no error at exit."""
    code = f"from mtlsctl.cli import main; main(['--pki-dir', {str(fleet)!r}, 'list', '--jsonl'])"
    proc = subprocess.run(f"{sys.executable} -c \"{code}\" | head -1", shell=True, capture_output=True, text=True,  # noqa: S602
                          timeout=60)
    assert proc.stdout.startswith("{") and len(proc.stdout.splitlines()) == 1
    assert "Traceback" not in proc.stderr and "Broken pipe" not in proc.stderr, proc.stderr


def test_a_name_no_file_can_have_is_listed_without_files(fast_pki):
    """Names come from index.txt (not trusted): a NUL byte or a name too long for the system is no crash."""
    rows = [f"V\t{asn1(NOW + timedelta(days=90))}\t\t1000\tunknown\t/CN=a\x00b",
            f"V\t{asn1(NOW + timedelta(days=90))}\t\t1002\tunknown\t/CN={'n' * 5000}",
            f"V\t{asn1(NOW + timedelta(days=90))}\t\t1004\tunknown\t/CN=.."]
    (fast_pki / "index.txt").write_text("\n".join(rows) + "\n")
    res = run_cli(["--pki-dir", str(fast_pki), "list", "--json"])
    assert res.code == 0, res.err
    assert [e["files"] for e in json.loads(res.out)] == [[], [], []]


def test_plain_subjects_take_the_fast_rfc2253_path_with_the_same_result():
    rng = random.Random(3)
    alphabet = "abcXYZ019 -_.=#,+\"\\<>;/\x01é"
    subjects = ["/CN=a", "/CN=a b", "/CN= a", "/CN=a ", "/CN=#a", "/CN=a=b", "/1.2.3=x", "CN=no-slash", "", "/CN",
                "/CN=a\\/b", "/CN=a+b", "/CN=x\\xC3\\xA9", "/C=ES/O=Example Org/OU=fleet 1/CN=dev-00001"]
    for _ in range(3000):
        rdns = ["/" + rng.choice(["CN", "O", "OU", "C", "emailAddress"]) + "="
                + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) for _ in range(rng.randint(1, 4))]
        subjects.append("".join(rdns))
    for subject in subjects:
        assert db.rfc2253(subject) == db._rfc2253(subject), subject


# --------------------------------------------------------------------------- renew's scans


@pytest.mark.parametrize("seed", range(6))
def test_renew_scans_pick_what_the_list_based_ones_picked(tmp_path, seed):
    """Names repeat (renewals, ties on the expiry), windows vary: due_in_index == due_for_renewal and
    superseded_in_index == superseded_rows, in the same order."""
    rng = random.Random(seed)
    lines = []
    for i in range(3000):
        name = f"n{rng.randint(0, 1200)}"
        expiry = NOW + timedelta(days=rng.choice([-5, 1, 10, 20, 29, 30, 31, 40, 90, 400, 40000]), seconds=rng.choice([0, 0, 7]))
        status = rng.choice("VVVVVRE")
        revocation = asn1(NOW - timedelta(days=3)) if status == "R" else ""
        lines.append(f"{status}\t{asn1(expiry)}\t{revocation}\t{even_hex(0x1000 + i)}\tunknown\t/CN={name}")
    index = tmp_path / "index.txt"
    index.write_text("\n".join(lines) + "\n")
    rows = db.read_index(index)
    for within in (0, 10, 30, 45, 400):
        now = NOW + timedelta(microseconds=rng.randint(0, 999_999))
        revoked: set[str] = set()
        due, repeated = lifecycle.scan_for_renewal(index, within, now, revoked)
        assert due == lifecycle.due_for_renewal(rows, within, now)
        assert revoked == {r.serial for r in rows if r.status == "R"} == crl.revoked_serials(index) and revoked
        expected = lifecycle.superseded_rows(rows, now)
        assert lifecycle.superseded_in_index(index, now) == expected and expected
        assert lifecycle.superseded_in_index(index, now, repeated) == expected  # renew reuses the scan's candidates
        assert {r.cn for r in expected} <= repeated


def test_the_row_of_one_serial_is_found_without_parsing_the_others(tmp_path):
    """revoke_row's check after `openssl ca -revoke`: the same rows as filtering the whole parse."""
    lines = synthetic_rows(3000)
    lines += [f"V\t{asn1(NOW)}\t\t0abc\tunknown\t/CN=odd", f"V\t{asn1(NOW)}\t\t1000\tunknown\t/CN=again-1000",
              f"V\t{asn1(NOW)}\t\t001234\tunknown\t/CN=padded"]
    index = tmp_path / "index.txt"
    index.write_text("\n".join(lines) + "\n")
    rows = db.read_index(index)
    for serial in ("1000", "0ABC", "abc", "1234", "00", "1A2B", "FFFFFF"):
        wanted = db.normalize_serial(serial)
        assert db.rows_with_serial(index, serial) == [r for r in rows if r.serial == wanted]
    assert len(db.rows_with_serial(index, "1000")) == 2


@pytest.mark.parametrize("block", [64, 1000, 1 << 18])
def test_the_rows_of_one_name_are_found_without_parsing_the_others(tmp_path, monkeypatch, block):
    """revoke, add-client, export, replace look up one name (or a serial) in 100,000 rows: blocks without it are
    skipped unsplit. The same rows, in the same order, as filtering the whole parse; case variants and lines
    with bytes outside ASCII when asked to ignore case; line numbers as the full reader counts them."""
    monkeypatch.setattr(db, "_BLOCK", block)  # lines cut across blocks, blocks without a line end
    lines = synthetic_rows(3000, names=1200)
    lines += [f"V\t{asn1(NOW)}\t\t0abc\tunknown\t/CN=Dev-00042", f"V\t{asn1(NOW)}\t\t0ABD\tunknown\t/CN=dev-00042x",
              f"V\t{asn1(NOW)}\t\t0ABE\tunknown\t/CN=DEV-\u212a0042", f"V\t{asn1(NOW)}\t\t0ABF\tunknown\t/CN=dev-00042/O=x",
              f"V\t{asn1(NOW)}\t\t0AC0\tunknown\t/O=CN=dev-00042", f"V\t{asn1(NOW)}\t\t0AC1\tunknown\t/OU=CN=dev-00042/CN=DEV-00042"]
    index = tmp_path / "index.txt"
    index.write_text("\n".join(lines))  # no newline after the last row
    rows = db.read_index(index)
    for name in ("dev-00042", "dev-01199", "dev-00000", "Dev-00042", "nobody", "dev-0004", "dev-k0042"):
        assert db.rows_named(index, name) == [r for r in rows if r.cn == name]
        folded = [r for r in rows if (r.cn or "").lower() == name.lower()]
        assert db.rows_named(index, name, ignore_case=True) == folded
    assert [r.serial for r in db.rows_named(index, "dev-k0042", ignore_case=True)] == ["0ABE"]  # KELVIN SIGN folds to k
    assert len(db.rows_named(index, "dev-00042", ignore_case=True)) == 2 + len(db.rows_named(index, "dev-00042"))
    assert db.rows_named(index, "dev-00042")[-1].serial == "0ABF"  # the last CN decides, not a CN= inside a value
    full = {n: line for n, line in db.index_lines(index)}
    for needle in ("CN=dev-00042", "cn=DEV-00042", "/CN=dev-01199", "0abc"):
        for n, line in db.index_lines(index, needle, ignore_case=True):
            assert full[n] == line  # numbered as the full reader numbers them
        assert {n for n, _ in db.index_lines(index, needle, ignore_case=True)} >= {
            n for n, line in full.items() if needle.lower() in line.lower()}
    assert db.rows_with_serial(index, "abc") == [r for r in rows if r.serial == "0ABC"]


def test_a_lookup_refuses_a_hostile_row_it_reads_and_never_carries_a_huge_line(tmp_path, monkeypatch):
    monkeypatch.setattr(db, "_BLOCK", 4096)
    lines = synthetic_rows(500)
    index = tmp_path / "index.txt"
    index.write_text("\n".join([*lines, "V\tnot-a-date\t\t0ABC\tunknown\t/CN=target", *lines[:5]]) + "\n")
    with pytest.raises(StateError, match="line 501 has the expiry"):
        db.rows_named(index, "target")
    assert [r.serial for r in db.rows_named(index, "dev-00003")] == [db.normalize_serial(lines[3].split("\t")[3])] * 2
    index.write_text("\n".join([*lines, "V" * (db.MAX_LINE_BYTES + 10) + "/CN=nobody", *lines[:5]]) + "\n")
    with pytest.raises(StateError, match="line 501 is longer than"):
        db.rows_named(index, "nobody")
    # a line without the name: refused when it shares a block with it, else passed over without being decoded;
    # either way the lookup never returns other rows, and never holds more than MAX_LINE_BYTES and a block
    try:
        found = [r.serial for r in db.rows_named(index, "dev-00003")]
    except StateError as exc:
        assert "line 501 is longer than" in exc.message
    else:
        assert found == [db.normalize_serial(lines[3].split("\t")[3])] * 2
    index.write_text("\n".join([*lines, "V" * (db.MAX_LINE_BYTES * 3)]))  # no line end: refused while it is carried
    with pytest.raises(StateError, match="line 501 is longer than"):
        db.rows_named(index, "nobody")


def test_renew_with_nothing_due_makes_no_row_object(tmp_path, monkeypatch):
    """Nothing due: one pass over the text, no IndexRow, no datetime per row."""
    lines = synthetic_rows(5000)
    index = tmp_path / "index.txt"
    index.write_text("\n".join(line for line in lines if not line.startswith("V")) + "\n"
                     + "\n".join(line for line in lines if line.startswith("V") and db.time_key(line.split("\t")[1]) >
                                 db.now_key(NOW + timedelta(days=30))) + "\n")
    made = []
    monkeypatch.setattr(db.IndexLine, "row", lambda self: made.append(self) or None)
    assert lifecycle.due_in_index(index, 30, NOW) == []
    assert lifecycle.superseded_in_index(index, NOW) == []
    assert made == []


# --------------------------------------------------------------------------- memory


def _jsonl_peak(pki: Path) -> int:
    """tracemalloc's peak while `list --jsonl`'s path (the inventory, the line writer) runs over the PKI."""
    from mtlsctl.cli import certificates

    class Sink(io.TextIOBase):
        def write(self, text: str) -> int:
            return len(text)

    settings = resolve_settings(pki, None, environ={})
    old = sys.stdout
    sys.stdout = Sink()
    try:
        certificates._print_entries_json(lifecycle.inventory(settings), lines=True)  # warm: imports, caches
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            certificates._print_entries_json(lifecycle.inventory(settings), lines=True)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        sys.stdout = old


def test_the_jsonl_path_does_not_grow_with_the_rows(fast_pki, tmp_path):
    """5,000 rows and 20,000 rows: the same peak within 64 kB (what grows is the exact entries for names whose bit
    in the fixed bitmap was taken: ~N^2/16M, 24 at 20,000). Holding the rows would cost ~1 kB each: 15 MB more."""
    peaks = {}
    first = int((fast_pki / "serial").read_text(), 16)
    for count in (5000, 20000):
        (fast_pki / "index.txt").write_text("\n".join(synthetic_rows(count, first_serial=first)) + "\n")
        (fast_pki / "serial").write_text(even_hex(first + count) + "\n")
        peaks[count] = _jsonl_peak(fast_pki)
    assert peaks[20000] - peaks[5000] < 64 * 1024, peaks
    assert peaks[20000] < 4 << 20, peaks  # the 1 MB name bitmap, a block, one entry


# --------------------------------------------------------------------------- the benchmark's smoke mode


@pytest.mark.needs("nginx", "curl", "openssl")
def test_the_scale_benchmark_runs_quick(tmp_path):
    """CI runs the benchmark's smoke mode so that it never rots (N=200, one run, a real nginx)."""
    argv = [sys.executable, str(REPO / "benchmarks/scale.py"), "--quick", "--save", str(tmp_path / "scale.json")]
    try:
        import matplotlib  # noqa: F401  (a benchmark-only extra: plotted when it is installed)

        argv += ["--plot", str(tmp_path / "scale.png")]
    except ImportError:
        pass
    res = subprocess.run(argv, capture_output=True, text=True, timeout=150, cwd=tmp_path,
                         env={**os.environ, "MTLSCTL_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "openssl accepted the synthetic database" in res.stdout and "| 200 (20 %) |" in res.stdout
    assert "a revoked client gets 400" in res.stdout
    figures = json.loads((tmp_path / "scale.json").read_text())
    assert figures[0]["n"] == 200 and all(figures[0]["ours"][k] > 0 for k in ("list_json", "renew_none", "revoke", "add"))
    assert figures[0]["guide"]["renew_none"] > 0  # the guide's loop ran
    if "--plot" in argv:
        assert (tmp_path / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_crl_serials_remembered_are_those_openssl_listed(tiered_pki, monkeypatch):
    """renew asks every night whether the CRL lists every revocation: the serials read from the CRL's DER once,
    then remembered by its bytes; what the cache returns is what openssl's CRL lists, and a cache entry that is
    not a list of serials is read again from the CRL."""
    from mtlsctl import cache
    from mtlsctl.x509read import crl_serials

    from .conftest import openssl

    pki = tiered_pki
    set_profile(pki, nginx={"reload_command": "", "test_command": ""})
    serials = []
    for name in ("a", "b", "c"):
        serials.append(json.loads(run_cli(["--pki-dir", str(pki), "add-client", name, "--json"]).out)["serial"])
    for name in ("a", "c"):
        assert run_cli(["--pki-dir", str(pki), "revoke", name, "--no-reload"]).code == 0
    text = openssl("crl", "-in", "crl/ca.crl", "-noout", "-text", cwd=pki).stdout
    listed = {line.split(":")[1].strip() for line in text.splitlines() if line.strip().startswith("Serial Number:")}
    assert listed == {serials[0], serials[2]}
    path = pki / "crl/ca.crl"
    assert crl_serials(path) == listed == crl_serials(path)  # computed, then from the cache
    assert crl.missing_revocations(resolve_settings(str(pki), None, environ={}).pki) == []
    for junk in ("zz", "0A,", 7, ["0A"], "0A,0B;rm", "000A", ",".join(f"00{s}" for s in listed), "a0"):
        monkeypatch.setattr(cache, "get", lambda kind, key, junk=junk: junk)
        assert crl_serials(path) == listed
