"""The scale changes attacked (db.rows_named / rows_with_serial, the CRL serials remembered by renew, the hand-written
JSON writers, doctor's linear checks): each one must give what the code it replaced gave, on hostile input.

- a lookup of one name or serial (blocks of index.txt skipped unread) returns the rows the full parse returned, on
  databases with escaped subjects, multi-valued RDNs, CN= inside other values, lower-case and zero-padded serials,
  CRLF, bytes that are not UTF-8, KELVIN SIGN, names that are prefixes of others, lines cut at every block boundary;
- add-client still refuses a case variant whose row straddles the 256 kB block boundary, or is spelled with
  KELVIN SIGN in a CRLF index.txt;
- renew, with the CRL's serials already remembered, still sees a revocation made afterwards;
- the JSON writers are json.dumps for strings with quotes, backslashes, control characters, U+2028, surrogates;
- doctor's database and modes findings are the old ones on randomly planted trees (links, directories named
  NAME.crt, hidden names, other owners, world-writable files).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mtlsctl import db, doctor
from mtlsctl.cli.certificates import _entry_element, _entry_line
from mtlsctl.lifecycle import CertEntry

from .conftest import openssl, run_cli, set_profile, verify_crl
from .test_scale import NOW, asn1, even_hex, synthetic_rows

# --------------------------------------------------------------------------- lookups against the full parse

NAMES = ["admin", "Admin", "ADMIN", "adm", "admin2", "k", "K", "key", "x.y", "dev-1", "\u212aey"]
PIECES = ["admin", "Admin", "adm", "\\x41dmin", "\u212a", "K", "k", "ey", "in", "x", "\u2028", "\u00e9", "\udcff", "+",
          "\\/", "/", "CN=", "cn=", ",", "\\", '"', "\x00"]
HOSTILE = [  # rows written out: each one a way a needle could be missed or matched where it should not be
    "V\t300101000000Z\t\t0a\tunknown\t/CN=admin",                      # a lower-case serial
    "V\t300101000000Z\t\t000B\tunknown\t/CN=Admin",                    # a zero-padded serial
    "R\t300101000000Z\t230101000000Z,keyCompromise\t0C\tunknown\t/O=x/CN=\u212aey",  # KELVIN SIGN, raw UTF-8
    "V\t300101000000Z\t\t0D\tunknown\t/CN=\\x41dmin",                  # an escaped byte: not "Admin"
    "V\t300101000000Z\t\t0E\tunknown\t/O=CN=admin",                    # CN= inside another attribute's value
    "V\t300101000000Z\t\t0F\tunknown\t/CN=admin+O=x",                  # a multi-valued RDN
    "V\t300101000000Z\t\t10\tunknown\t/O=x+CN=admin",
    "V\t300101000000Z\t\t11\tunknown\t/CN=admin2",                     # "admin" is its prefix
    "V\t300101000000Z\t\t12\tunknown\t/CN=adm\udcffin",                # a byte that is not UTF-8
    "V\t300101000000Z\t\t13\tunknown\t/cn=admin",                      # lower-case attribute: no CN
    "E\t300101000000Z\t\t 14\tunknown\t/CN=ADMIN/O=after",             # a space-padded serial
]


def _subject(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(0, 4)):
        value = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 3)))
        if rng.random() < 0.2:
            value += "+" + rng.choice(["CN=", "O="]) + rng.choice(PIECES)
        parts.append(f"/{rng.choice(['CN', 'CN', 'CN', 'O', 'OU', 'cn'])}={value}")
    return "".join(parts)


def _serial(rng: random.Random) -> str:
    text = even_hex(rng.randint(1, 40))
    return rng.choice([text, text, text.lower(), "00" + text, "0" + text, " " + text])


def _database(rng: random.Random) -> bytes:
    lines = [f"{rng.choice('VVVRE')}\t{rng.choice(['300101000000Z', '200101000000Z', '20600101000000Z'])}\t"
             f"{'230101000000Z,keyCompromise' if rng.random() < 0.3 else ''}\t{_serial(rng)}\tunknown\t{_subject(rng)}"
             for _ in range(rng.randint(0, 30))]
    lines = [line.replace("\t\t", "\t230101000000Z\t", 1) if line.startswith("R") and "\t\t" in line[:20] else line
             for line in lines]
    lines += rng.sample(HOSTILE, rng.randint(0, len(HOSTILE)))
    rng.shuffle(lines)
    eol = rng.choice(["\n", "\r\n"])
    data = (eol.join(lines) + rng.choice(["", eol, "\n\n"])).encode("utf-8", "surrogateescape")
    return data.replace("\u00e9".encode(), b"\xe9") if rng.random() < 0.3 else data


@pytest.mark.parametrize("block", [1, 5, 64, 4096])
def test_lookups_return_the_rows_of_the_full_parse(tmp_path, monkeypatch, block):
    monkeypatch.setattr(db, "_BLOCK", block)
    path = tmp_path / "index.txt"
    rng = random.Random(block)
    for _ in range(40):
        data = _database(rng)
        path.write_bytes(data)
        rows = db.parse_index(data.decode("utf-8", "replace"))
        for name in NAMES:
            assert db.rows_named(path, name) == [r for r in rows if r.cn == name], (data, name)
            assert db.rows_named(path, name, ignore_case=True) == [r for r in rows if (r.cn or "").lower() == name.lower()]
        for serial in {r.serial for r in rows} | {"00", "0A", "0B", "14", "28"}:
            assert db.rows_with_serial(path, serial) == [r for r in rows if r.serial == serial], (data, serial)


def _case_variant_refused(pki: Path, name: str, holder: str) -> None:
    res = run_cli(["--pki-dir", str(pki), "add-client", name])
    assert res.code == 2 and f"differs only in case from {holder!r}" in res.err, res.err
    assert not (pki / f"certs/{name}.crt").exists()


def test_a_case_variant_across_a_block_boundary_or_in_kelvin_sign_is_refused(fast_pki):
    later = asn1(NOW + timedelta(days=300))
    rows = synthetic_rows(4000, first_serial=0x100000)
    text = "\n".join(rows) + "\n"
    head = text[:text.rfind("\n", 0, db._BLOCK - 300) + 1]
    row = f"V\t{later}\t\t0FFFFFFF\tunknown\t/O=x/CN=Admin"
    filler = f"V\t{later}\t\t0FFFFFFE\tunknown\t/CN=filler"
    filler += "x" * (db._BLOCK - len(head) - row.index("CN=Ad") - 4 - len(filler) - 1)  # "CN=Admin" cut after "CN=A"
    data = (head + filler + "\n" + row + "\n" + text[len(head):]).encode()
    at = data.index(b"CN=Admin")
    assert at < db._BLOCK < at + len(b"CN=Admin")
    (fast_pki / "index.txt").write_bytes(data)
    _case_variant_refused(fast_pki, "admin", "Admin")
    rows.insert(3000, f"V\t{later}\t\t0FFFFFFF\tunknown\t/O=x/CN=\u212aey")  # KELVIN SIGN K: lower() is "k"
    (fast_pki / "index.txt").write_bytes(("\r\n".join(rows) + "\r\n").encode())
    _case_variant_refused(fast_pki, "key", "\u212aey")


# --------------------------------------------------------------------------- renew and the remembered CRL serials


@pytest.mark.integration
def test_renew_sees_a_revocation_the_crl_lacks_whatever_serials_it_remembered(fast_pki):
    """renew remembers a CRL's serials by its bytes: a revocation made afterwards (a run killed before -gencrl), and
    an older CRL put back in place of the one that listed it, are both seen as due."""
    set_profile(fast_pki, nginx={"reload_command": "", "test_command": ""})

    def renew() -> bool:
        res = run_cli(["--pki-dir", str(fast_pki), "renew", "--no-reload", "--json"])
        assert res.code == 0, res.err
        return bool(json.loads(res.out)["crl"]["regenerated"])

    for name in ("a", "b", "c"):
        assert run_cli(["--pki-dir", str(fast_pki), "add-client", name]).code == 0
    assert run_cli(["--pki-dir", str(fast_pki), "revoke", "c", "--no-reload"]).code == 0
    older = (fast_pki / "crl/ca.crl").read_bytes()  # lists c
    assert renew() is False
    assert list(Path(os.environ["MTLSCTL_CACHE_DIR"]).glob("crl_serials-*.json"))  # the CRL's serials remembered
    openssl("ca", "-config", "openssl.cnf", "-revoke", "certs/a.crt", cwd=fast_pki)  # a run killed before -gencrl
    assert verify_crl(fast_pki, "certs/a.crt").endswith(": OK")
    assert renew() is True  # the CRL now lists a and c, and is remembered so
    assert "certificate revoked" in verify_crl(fast_pki, "certs/a.crt")
    assert renew() is False
    (fast_pki / "crl/ca.crl").write_bytes(older)  # an older CRL back in place (a restore, a copy): it lacks a
    assert verify_crl(fast_pki, "certs/a.crt").endswith(": OK")
    assert renew() is True
    assert "certificate revoked" in verify_crl(fast_pki, "certs/a.crt")


# --------------------------------------------------------------------------- the JSON writers


def test_the_entry_writers_are_json_dumps_for_hostile_strings():
    rng = random.Random(2028)
    alphabet = ['"', "\\", "\n", "\r", "\t", "\x00", "\x1f", "\x7f", "\u2028", "\u2029", "\u00e9", "\U0001f600", "\ud800",
                "\udcff", "\ufeff", "/", "<", " ", "a"]

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))

    for _ in range(2000):
        entry = CertEntry(text(), text(), text(), datetime(2030, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=rng.randint(0, 10**8)),
                          rng.randint(-10**6, 10**6), rng.choice([None, datetime(2020, 1, 1, tzinfo=timezone.utc)]),
                          rng.choice([None, text()]), text(), [text() for _ in range(rng.randint(0, 3))])
        data = entry.to_json()
        assert _entry_line(entry) == json.dumps(data)
        assert "[\n" + _entry_element(entry) + "\n]" == json.dumps([data], indent=2)
        data["files"] = None
        assert _entry_line(entry, False) == json.dumps(data)
        assert "[\n" + _entry_element(entry, False) + "\n]" == json.dumps([data], indent=2)


# --------------------------------------------------------------------------- doctor against the old checks


def _plant(pki: Path, rng: random.Random) -> None:
    from .test_doctor_scale import pem

    for sub in ("newcerts", "certs"):
        shutil.rmtree(pki / sub)
        (pki / sub).mkdir()
    names = ["a", "A", "b", "x.y", ".crt", "dev-1", "a b", "\u00e9"]
    lines = []
    for _ in range(rng.randint(0, 12)):
        status = rng.choice("VVRE")
        serial = even_hex(0x10 + rng.randint(0, 15))
        subject = rng.choice(["/CN={}", "/O=x/CN={}", "/O=none", "/CN={}/O=after", "/CN={}+O=m"]).format(rng.choice(names))
        lines.append(f"{status}\t{asn1(NOW + timedelta(days=rng.choice([-3, 30, 400])))}\t{asn1(NOW) if status == 'R' else ''}"
                     f"\t{serial}\tunknown\t{subject}")
        if rng.random() < 0.8:
            (pki / "newcerts" / f"{serial}.pem").write_text(pem(serial))
    (pki / "index.txt").write_text("".join(line + "\n" for line in lines))
    (pki / "serial").write_text(even_hex(0x10 + rng.randint(0, 20)) + "\n")
    for _ in range(rng.randint(0, 10)):
        path = pki / rng.choice(["certs", "private", "newcerts", "crl", "ca"]) / (
            rng.choice([*names, "z"]) + rng.choice([".crt", ".p12", ".key", ".pem", "", ".CRT"]))
        if os.path.lexists(path):
            continue
        kind = rng.random()
        if kind < 0.5:
            path.write_text(rng.choice([pem(even_hex(0x10 + rng.randint(0, 15))), "Certificate:\n" + pem("11"), "", "junk"]))
            path.chmod(rng.choice([0o600, 0o644, 0o602, 0o777, 0o400]))
            if os.geteuid() == 0 and rng.random() < 0.2:
                os.chown(path, 1234, 1234)
        elif kind < 0.65:
            path.symlink_to(rng.choice(["nowhere", "../ca/ca.crt", "..", "../newcerts/11.pem", "/etc"]))
        elif kind < 0.8:
            path.mkdir(mode=rng.choice([0o700, 0o777]))
            if rng.random() < 0.5:
                (path / "inner").write_text("x")
        else:
            path.write_bytes(b"p")
            path.chmod(0o666)


def test_doctor_findings_are_the_old_ones_on_planted_trees(fast_pki):
    from .test_doctor_scale import old_check_database, old_check_modes, settings_of

    rng = random.Random(5)
    settings = settings_of(fast_pki)
    for _ in range(25):
        _plant(fast_pki, rng)
        assert doctor.check_modes(settings) == old_check_modes(settings)
        found = doctor.check_database(settings, NOW)
        try:
            old = old_check_database(settings, NOW)
        except IsADirectoryError:  # the old check read a directory named NAME.crt and stopped with a traceback
            continue
        assert found == old
