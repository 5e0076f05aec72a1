"""State you can trust: the journal names nothing beyond the PKI, the commit is one step, serials are read the
way openssl writes them, and every file mtlsctl writes is created, never followed.

Each test here fails when the protection it is about is removed (see the docstrings for which one).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from mtlsctl import db, files
from mtlsctl.files import JOURNAL_DIR

from .conftest import run_cli, set_profile

pytestmark = pytest.mark.integration

REAL_OPENSSL = shutil.which("openssl")
NOBODY = 65534


def cli(pki: Path, *args: str, stdin: str | None = None):
    return run_cli(["--pki-dir", str(pki), *args], stdin=stdin)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(("error:", "internal error:"))]


# --------------------------------------------------------------------------- crafted journals


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the PKI with a sentinel file nobody may touch."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "sentinel").write_text("precious\n")
    return d


def _journal(pki: Path, record: object | bytes, blobs: dict[str, bytes] | None = None) -> Path:
    j = pki / JOURNAL_DIR
    j.mkdir(mode=0o700)
    raw = record if isinstance(record, bytes) else json.dumps(record).encode()
    (j / "journal.json").write_bytes(raw)
    for name, data in (blobs or {}).items():
        (j / name).write_bytes(data)
    return j


def _v2(created=(), snapshots=None, listings=None) -> dict:
    return {"version": 2, "pid": 4242, "created": list(created), "snapshots": snapshots or {}, "listings": listings or {}}


def _snap(mode: int, length: int, file: str = "snap-1", offset: int = 0) -> dict:
    return {"file": file, "offset": offset, "length": length, "mode": mode}


CRAFTED = {
    # what the journal asks for                      -> a word of the refusal
    "absolute": (lambda o: _v2(created=[str(o / "sentinel")]), None, "absolute path"),
    "dotdot": (lambda o: _v2(created=["../outside/sentinel"]), None, "'..'"),
    "dotdot-inside": (lambda o: _v2(created=["certs/../../outside/sentinel"]), None, "'..'"),
    "absolute-snapshot": (lambda o: _v2(snapshots={str(o / "sentinel"): None}), None, "absolute path"),
    "symlink-component": (lambda o: _v2(created=["certs/escape/sentinel"]), "certs/escape", "symbolic link 'certs/escape'"),
    "symlink-final": (lambda o: _v2(created=["certs/escape"]), "certs/escape", "symbolic link 'certs/escape'"),
    "truncated": (lambda o: json.dumps(_v2(created=["certs/x"])).encode()[:25], None, "not complete JSON"),
    "not-an-object": (lambda o: [1, 2, 3], None, "not a JSON object"),
    "created-not-a-list": (lambda o: {**_v2(), "created": "certs/x"}, None, "not a list"),
    "snapshots-not-an-object": (lambda o: {**_v2(), "snapshots": ["index.txt"]}, None, "not an object"),
    "offset-not-a-number": (lambda o: _v2(snapshots={"index.txt": {**_snap(0o644, 4), "offset": "0"}}), None, "not a number"),
    "path-not-a-string": (lambda o: _v2(created=[17]), None, "is not a path"),
    "unknown-key": (lambda o: {**_v2(), "run": "rm -rf /"}, None, "unknown keys"),
    "old-format": (lambda o: {"pid": 1, "created": [str(o / "sentinel")], "snapshots": {}}, None, "version"),
    "setuid": (lambda o: _v2(snapshots={"certs/evil": _snap(0o4755, 4)}), None, "setuid"),
    "world-writable": (lambda o: _v2(snapshots={"certs/evil": _snap(0o666, 4)}), None, "writable by group or others"),
    "private-too-open": (lambda o: _v2(snapshots={"private/evil.key": _snap(0o644, 4)}), None, "at most 600"),
    "blob-outside": (lambda o: _v2(snapshots={"certs/evil": _snap(0o644, 4, file="../../outside/sentinel")}), None, "blob"),
    "blob-missing": (lambda o: _v2(snapshots={"certs/evil": _snap(0o644, 4, file="snap-9")}), None, "missing"),
    "blob-too-short": (lambda o: _v2(snapshots={"certs/evil": _snap(0o644, 400)}), None, "beyond the end"),
    "in-the-journal": (lambda o: _v2(created=[f"{JOURNAL_DIR}/journal.json"]), None, "not a plain relative path"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_journal_is_refused_and_nothing_outside_is_touched(fast_pki, outside, case):
    """Protection: the checks in files._load (relative paths, no '..', no symlink component, types, clamped
    modes, own blobs). Without them the sentinel outside is deleted or certs/evil created setuid."""
    make, link, word = CRAFTED[case]
    if link:
        (fast_pki / link).symlink_to(outside)
    j = _journal(fast_pki, make(outside), {"snap-1": b"evil"})
    before = {p.name: p.read_bytes() for p in j.iterdir()}
    index = (fast_pki / "index.txt").read_bytes()

    reader = cli(fast_pki, "list", "--json")  # readers keep working, with a warning
    assert reader.code == 0, reader.err
    assert json.loads(reader.out) == []
    assert "cannot be trusted" in reader.err and word in reader.err, reader.err

    writer = cli(fast_pki, "add-client", "phone")  # writers are blocked with one error and its hint
    assert writer.code == 1, writer.err
    assert len(error_lines(writer.err)) == 1 and word in writer.err, writer.err
    assert "mtlsctl recover" in writer.err
    assert not (fast_pki / "private/phone.key").exists() and (fast_pki / "index.txt").read_bytes() == index

    assert (outside / "sentinel").read_text() == "precious\n"  # nothing outside the PKI touched
    assert not (fast_pki / "certs/evil").exists() and not (fast_pki / "private/evil.key").exists()
    assert {p.name: p.read_bytes() for p in j.iterdir()} == before  # left for a person, never overwritten

    shown = cli(fast_pki, "recover", "--dry-run", "--json")
    assert shown.code == 1 and json.loads(shown.out)["state"] == "damaged"
    assert cli(fast_pki, "recover").code == 1 and j.exists()  # a plain recover does not act on it either
    dropped = cli(fast_pki, "recover", "--discard")
    assert dropped.code == 0 and "nothing rolled back" in dropped.out and not j.exists()
    assert (outside / "sentinel").read_text() == "precious\n"
    assert cli(fast_pki, "add-client", "phone").code == 0


@pytest.mark.parametrize("plant", ["journal.json-symlink", "journal-dir-symlink", "journal-dir-777"])
def test_a_journal_reached_through_a_link_or_open_to_others_is_refused(fast_pki, outside, plant):
    """Protection: _open_journal_dir / _read_regular (O_NOFOLLOW, owner, mode 700)."""
    real = outside / "journal"
    real.mkdir(mode=0o700)
    (real / "journal.json").write_text(json.dumps(_v2(created=["../outside/sentinel"])))
    j = fast_pki / JOURNAL_DIR
    if plant == "journal.json-symlink":
        j.mkdir(mode=0o700)
        (j / "journal.json").symlink_to(real / "journal.json")
    elif plant == "journal-dir-symlink":
        j.symlink_to(real)
    else:
        j.mkdir()
        os.chmod(j, 0o777)
        (j / "journal.json").write_text(json.dumps(_v2(created=["certs/x"])))
    res = cli(fast_pki, "add-client", "phone")
    assert res.code == 1 and "cannot be trusted" in res.err, res.err
    assert (outside / "sentinel").exists() and (real / "journal.json").exists()
    assert cli(fast_pki, "list").code == 0


def test_a_sound_journal_inside_the_pki_is_still_rolled_back(fast_pki):
    """The checks do not refuse everything: a journal naming PKI files, with sane modes, is acted on."""
    (fast_pki / "certs/half.crt").write_text("half-written\n")
    good = (fast_pki / "index.txt").read_bytes()
    (fast_pki / "index.txt").write_text("garbage\n")
    _journal(fast_pki, _v2(created=["certs/half.crt"], snapshots={"index.txt": _snap(0o644, len(good))}), {"snap-1": good})
    res = cli(fast_pki, "list", "--json")
    assert res.code == 0 and "rolled back an interrupted mtlsctl run (pid 4242)" in res.err, res.err
    assert not (fast_pki / "certs/half.crt").exists() and (fast_pki / "index.txt").read_bytes() == good
    assert not (fast_pki / JOURNAL_DIR).exists()


def test_a_journal_dir_without_journal_json_is_a_committed_run(fast_pki):
    """The commit point is journal.json's removal: what is left is only cleaned, never rolled back."""
    j = fast_pki / JOURNAL_DIR
    j.mkdir(mode=0o700)
    (j / "snap-1").write_bytes(b"old index")
    index = (fast_pki / "index.txt").read_bytes()
    res = cli(fast_pki, "add-client", "phone")
    assert res.code == 0, res.err
    assert "rolled back" not in res.err and not j.exists()
    assert (fast_pki / "index.txt").read_bytes() != index  # phone's row, not the blob's bytes


def test_a_writer_never_overwrites_a_journal_it_did_not_write(fast_pki):
    """Protection: Transaction._open_journal (a second line behind pki_lock's refusal)."""
    j = _journal(fast_pki, b'{"version": 2, "created": ["certs/x"]')
    with files.pki_lock(fast_pki / ".mtlsctl.lock", recover_journal=False):
        tx = files.Transaction(fast_pki)
        with pytest.raises(files.JournalError, match="another run's journal is still there"):
            tx.created(fast_pki / "certs/new.crt")
    assert (j / "journal.json").read_bytes() == b'{"version": 2, "created": ["certs/x"]'


# --------------------------------------------------------------------------- mtlsctl recover


def _interrupted(pki: Path) -> bytes:
    """A run that died under the lock: it created certs/ghost.crt, rewrote index.txt, and wrote newcerts/77.pem."""
    good = (pki / "index.txt").read_bytes()
    with files.pki_lock(pki / ".mtlsctl.lock"):
        tx = files.Transaction(pki)
        tx.created(pki / "certs/ghost.crt")
        (pki / "certs/ghost.crt").write_text("ghost\n")
        tx.snapshot(pki / "index.txt")
        tx.snapshot_listing(pki / "newcerts")
        (pki / "index.txt").write_text("V\t300101000000Z\t\t77\tunknown\t/CN=ghost\n")
        (pki / "newcerts/77.pem").write_text("ghost\n")
        files._ACTIVE_JOURNALS.discard(pki.absolute() / JOURNAL_DIR)  # this "process" dies here
    return good


def test_recover_shows_then_rolls_back(fast_pki):
    good = _interrupted(fast_pki)
    shown = cli(fast_pki, "recover", "--dry-run", "--json")
    assert shown.code == 0, shown.err
    view = json.loads(shown.out)
    assert view["state"] == "sound" and view["action"] == "none" and view["pid"] == os.getpid()
    assert view["remove"] == ["certs/ghost.crt"] and view["restore"] == ["index.txt"] and view["new_files"] == ["newcerts/77.pem"]
    assert (fast_pki / "certs/ghost.crt").exists()  # a dry run changes nothing
    human = cli(fast_pki, "recover")
    assert human.code == 0 and "rolled back" in human.out and "removes as created: certs/ghost.crt" in human.out, human.out
    assert (fast_pki / "index.txt").read_bytes() == good
    assert not (fast_pki / "certs/ghost.crt").exists() and not (fast_pki / "newcerts/77.pem").exists()
    again = cli(fast_pki, "recover", "--json")
    assert again.code == 0 and json.loads(again.out)["state"] == "none"


def test_recover_discard_drops_a_sound_journal_without_rolling_back(fast_pki):
    _interrupted(fast_pki)
    res = cli(fast_pki, "recover", "--discard", "--json")
    assert res.code == 0 and json.loads(res.out)["action"] == "discarded"
    assert (fast_pki / "certs/ghost.crt").exists() and not (fast_pki / JOURNAL_DIR).exists()
    assert cli(fast_pki, "recover", "--discard", "--dry-run").code == 2


# --------------------------------------------------------------------------- the lock, through rollback


FAILING_OPENSSL = """#!/bin/sh
case " $* " in *" $FAIL_ON "*) echo "forced failure" >&2; exit 1;; esac
exec "$REAL_OPENSSL" "$@"
"""


@pytest.fixture
def failing_openssl(tmp_path, monkeypatch):
    bin_dir = tmp_path / "failbin"
    bin_dir.mkdir()
    (bin_dir / "openssl").write_text(FAILING_OPENSSL)
    (bin_dir / "openssl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("REAL_OPENSSL", REAL_OPENSSL)

    def fail_on(word: str) -> None:
        monkeypatch.setenv("FAIL_ON", word)
    return fail_on


@pytest.fixture
def rollbacks(monkeypatch):
    """Every rollback that had something to undo, with whether this process held the PKI lock then."""
    seen: list[bool] = []
    real = files.Transaction.rollback

    def spy(self):
        if self.root is not None and (self._created or self._snapshots):
            seen.append(files.holds_lock(self.root))
        return real(self)
    monkeypatch.setattr(files.Transaction, "rollback", spy)
    return seen


WRITERS = {
    "init": ("-x509", ["init"]),
    "add-client": ("-extensions", ["add-client", "phone"]),
    "revoke": ("-revoke", ["revoke", "old", "--no-reload"]),
    "crl": ("-gencrl", ["crl", "--no-reload"]),
    "export": ("-export", ["export", "old", "--force"]),
    "renew": ("-extensions", ["renew", "--within", "400", "--no-reload"]),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_every_writer_rolls_back_while_it_still_holds_the_lock(fast_pki, tmp_path, failing_openssl, rollbacks, writer):
    """Protection: pki_lock rolls back the open transactions before it releases the lock (init took the lock
    inside its transaction, so its rollback ran after the release)."""
    word, args = WRITERS[writer]
    pki = fast_pki
    if writer == "init":
        pki = tmp_path / "fresh"
        (tmp_path / "p.yaml").write_text("ca: {key: {type: ec, curve: P-256}}\n")
        args = ["--profile", str(tmp_path / "p.yaml"), "init"]
    else:
        assert cli(pki, "add-client", "old").code == 0
    failing_openssl(word)
    res = run_cli(["--pki-dir", str(pki), *args])
    assert res.code != 0 or writer == "renew", res.err
    assert rollbacks and all(rollbacks), rollbacks
    assert not (pki / JOURNAL_DIR).exists()


# --------------------------------------------------------------------------- the commit


def test_the_commit_fsyncs_openssls_outputs_before_journal_json_goes(fast_pki, monkeypatch):
    """Protection: Transaction.checkpoint fsyncs what the run produced (openssl's files too) before the
    commit point (the removal of journal.json)."""
    synced: set[tuple[int, int]] = set()
    commits: list[set[tuple[int, int]]] = []
    real_fsync, real_unlink = os.fsync, os.unlink

    def fsync(fd):
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))
        return real_fsync(fd)

    def unlink(path, *a, **kw):
        if os.fspath(path) == "journal.json":
            commits.append(set(synced))
        return real_unlink(path, *a, **kw)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "unlink", unlink)
    assert cli(fast_pki, "add-client", "phone").code == 0
    monkeypatch.undo()

    def ino(rel: str) -> tuple[int, int]:
        st = os.stat(fast_pki / rel)
        return st.st_dev, st.st_ino
    issued = ["private/phone.key", "certs/phone.csr", "certs/phone.crt", "newcerts/1000.pem", "index.txt", "serial",
              "index.txt.old", "certs", "newcerts", "private", "."]
    assert len(commits) == 2, commits
    missing = [rel for rel in issued if ino(rel) not in commits[0]]
    assert missing == [], f"not fsynced before the issuance was committed: {missing}"
    assert ino("certs/phone.p12") in commits[1]


# --------------------------------------------------------------------------- serials


@pytest.mark.parametrize("text,normal", [("00FF", "FF"), ("ff", "FF"), ("0100", "0100"), ("1000", "1000"), ("00", "00"),
                                         ("0", "00"), ("000A", "0A"), (" 10ab\n", "10AB")])
def test_one_serial_normaliser(text, normal):
    assert db.normalize_serial(text) == normal
    assert db.newcert_path(text) == f"newcerts/{normal}.pem"


def test_a_serial_file_of_00FF_issues_FF(fast_pki):
    """Protection: db.read_serial/parse_index normalise (openssl names the file newcerts/FF.pem and writes
    the row FF). Without it the post-check fails and the signed certificate is an orphan."""
    (fast_pki / "serial").write_text("00FF\n")
    res = cli(fast_pki, "add-client", "phone", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["serial"] == "FF"
    assert sorted(p.name for p in (fast_pki / "newcerts").iterdir()) == ["FF.pem"]
    assert "\tFF\tunknown\t/CN=phone" in (fast_pki / "index.txt").read_text()
    rows = json.loads(cli(fast_pki, "list", "--json").out)
    assert [r["serial"] for r in rows] == ["FF"] and "certs/phone.crt" in rows[0]["files"]  # matched to newcerts/FF.pem
    assert cli(fast_pki, "export", "phone", "--force").code == 0  # finds its row through newcerts/FF.pem
    assert cli(fast_pki, "revoke", "phone", "--no-reload").code == 0
    doctor = json.loads(cli(fast_pki, "doctor", "--json").out)
    assert [f for f in doctor["findings"] if f["check"] == "database" and f["level"] != "ok"] == []


def test_rollback_removes_whatever_appeared_in_newcerts(fast_pki, monkeypatch):
    """Protection: the newcerts/ listing taken before `openssl ca` (not a predicted name): a failed
    post-check leaves no signed orphan, whatever openssl called the file."""
    (fast_pki / "serial").write_text("00FF\n")
    # a prediction that misses openssl's name (as mtlsctl's did before the serial normaliser)
    monkeypatch.setattr(db, "read_serial", lambda path: "00FF")
    monkeypatch.setattr(db, "newcert_path", lambda serial: f"newcerts/{serial}.pem")
    res = cli(fast_pki, "add-client", "phone")
    # the index row is found by its normalised serial (FF); the certificate is not at the predicted newcerts/00FF.pem
    assert res.code == 1 and "does not match newcerts/00FF.pem" in res.err, res.err
    assert list((fast_pki / "newcerts").iterdir()) == []
    assert (fast_pki / "index.txt").read_text() == "" and (fast_pki / "serial").read_text() == "00FF\n"
    assert not (fast_pki / "certs/phone.crt").exists()


# --------------------------------------------------------------------------- created, never followed


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    v = tmp_path / "victim"
    v.write_text("do not touch\n")
    os.chmod(v, 0o644)
    return v


def _intact(victim: Path) -> None:
    assert victim.read_text() == "do not touch\n" and stat.S_IMODE(victim.stat().st_mode) == 0o644


@pytest.mark.parametrize("rel", ["private/phone.key", "certs/phone.csr", "certs/phone.crt", "certs/phone.p12",
                                 "private/phone.p12.password"])
@pytest.mark.parametrize("dangling", [True, False])
def test_add_client_refuses_a_symlink_at_any_of_its_outputs(fast_pki, victim, rel, dangling):
    """Protection: refuse_conflicts looks at links (lexists/is_symlink), before openssl runs."""
    target = victim if not dangling else victim.parent / "created-through-link"
    (fast_pki / rel).symlink_to(target)
    index = (fast_pki / "index.txt").read_bytes()
    res = cli(fast_pki, "add-client", "phone")
    assert res.code == 2, res.err
    assert f"{fast_pki / rel} is a symbolic link" in res.err
    assert not (victim.parent / "created-through-link").exists()
    _intact(victim)
    assert (fast_pki / "index.txt").read_bytes() == index  # refused before openssl ran
    assert rel == "private/phone.key" or not os.path.lexists(fast_pki / "private/phone.key")


PLANTER = """#!/bin/sh
# plants a symlink at $PLANT (relative to the PKI, the cwd) while openssl generates the key: after mtlsctl's
# first checks, before the step that writes there
case "$1" in genpkey|genrsa) ln -s "$VICTIM" "$PLANT";; esac
exec "$REAL_OPENSSL" "$@"
"""


@pytest.mark.parametrize("rel", ["certs/phone.crt", "newcerts/1000.pem", "index.txt.new", "certs/phone.p12"])
def test_a_symlink_planted_during_the_run_is_refused_before_openssl_writes_there(fast_pki, victim, tmp_path, monkeypatch, rel):
    """Protection: Transaction.may_create / produce refuse a symlink at openssl's own -out right before it runs
    (and produce creates the file itself, O_EXCL|O_NOFOLLOW)."""
    bin_dir = tmp_path / "plantbin"
    bin_dir.mkdir()
    (bin_dir / "openssl").write_text(PLANTER)
    (bin_dir / "openssl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("REAL_OPENSSL", REAL_OPENSSL)
    monkeypatch.setenv("VICTIM", str(victim))
    monkeypatch.setenv("PLANT", rel)
    res = cli(fast_pki, "add-client", "phone")
    assert f"{fast_pki / rel} is a symbolic link" in res.err, res.err
    _intact(victim)
    assert os.path.islink(fast_pki / rel)  # the plant is still a link: nothing was written through or over it
    if rel == "certs/phone.p12":  # after the issuance: the certificate stays, export is the way on
        assert res.code == 1 and "mtlsctl export phone" in res.err
        return
    assert res.code == 2
    assert (fast_pki / "index.txt").read_text() == ""
    assert [p for p in (fast_pki / "newcerts").iterdir() if not p.is_symlink()] == []
    assert not os.path.lexists(fast_pki / "private/phone.key")


@pytest.mark.parametrize("rel", ["crl/.ca.crl.tmp", "index.txt.new", "crlnumber.new"])
def test_crl_refuses_a_symlink_at_openssls_outputs(fast_pki, victim, rel):
    (fast_pki / rel).symlink_to(victim)
    res = cli(fast_pki, "crl", "--no-reload")
    assert res.code == 2 and f"{fast_pki / rel} is a symbolic link" in res.err, res.err
    _intact(victim)
    assert not (fast_pki / JOURNAL_DIR).exists()


def test_render_out_and_the_lock_file_are_never_followed(fast_pki, victim, tmp_path):
    link = tmp_path / "site.conf"
    link.symlink_to(victim)
    res = cli(fast_pki, "nginx", "render", "--out", str(link))
    assert res.code == 2 and f"{link} is a symbolic link" in res.err, res.err
    _intact(victim)
    (fast_pki / ".mtlsctl.lock").unlink()
    (fast_pki / ".mtlsctl.lock").symlink_to(victim)
    res = cli(fast_pki, "add-client", "phone")
    assert res.code == 2 and ".mtlsctl.lock is a symbolic link" in res.err, res.err
    _intact(victim)


def test_renew_never_writes_the_password_file_through_a_symlink(fast_pki, victim):
    set_profile(fast_pki, nginx={"reload_command": ""})
    assert cli(fast_pki, "add-client", "old", "--days", "3").code == 0
    (fast_pki / "private/old.p12.password").symlink_to(victim)
    before = (fast_pki / "certs/old.p12").read_bytes()
    res = cli(fast_pki, "renew", "--json")
    assert res.code == 1 and "old.p12.password is a symbolic link" in res.err + res.out, res.err
    _intact(victim)
    assert (fast_pki / "certs/old.p12").read_bytes() == before  # the old bundle stays, with its old password
    assert not list((fast_pki / "private").glob(".p12-*")) and not list((fast_pki / "certs").glob(".*.tmp"))


def _as_nobody(fn) -> None:
    """Run fn() in a forked child as nobody (the other user of a shared directory)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            fn()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.fixture
def shared_dir():
    """A world-writable, sticky directory (like /tmp or a shared drop directory) that nobody can enter."""
    d = Path(tempfile_mkdtemp())
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def tempfile_mkdtemp() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="mtls-shared-", dir="/tmp")


def test_export_out_in_a_shared_directory_follows_no_plant(fast_pki, shared_dir, victim):
    """Protection: export writes through build_p12 (openssl in a private directory) and atomic_write (an
    unpredictable mkstemp name next to --out). The old predictable `.NAME.tmp` let another user's symlink
    receive the bundle and its chmod."""
    assert cli(fast_pki, "add-client", "phone").code == 0
    out = shared_dir / "phone.p12"
    guesses = [shared_dir / f".{out.name}.tmp", shared_dir / f".{out.name}.new", shared_dir / f"{out.name}.tmp"]
    victim_in_shared = shared_dir / "victim"
    shutil.copy(victim, victim_in_shared)
    os.chmod(victim_in_shared, 0o644)

    def plant():
        for g in guesses:
            os.symlink(victim_in_shared, g)
    _as_nobody(plant)
    res = cli(fast_pki, "export", "phone", "--out", str(out), "--json")
    assert res.code == 0, res.err
    _intact(victim_in_shared)
    st = os.lstat(out)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    password = json.loads(res.out)["password"]
    subprocess.run([REAL_OPENSSL, "pkcs12", "-in", str(out), "-noout", "-passin", "stdin"], input=password + "\n",
                   text=True, check=True, capture_output=True)
    assert sorted(p.name for p in shared_dir.iterdir()) == sorted([*(g.name for g in guesses), "phone.p12", "victim"])


def test_export_out_refuses_a_symlink_planted_at_the_target(fast_pki, shared_dir, victim):
    assert cli(fast_pki, "add-client", "phone").code == 0
    out = shared_dir / "phone.p12"
    target = shared_dir / "victim"
    shutil.copy(victim, target)
    os.chmod(target, 0o644)
    _as_nobody(lambda: os.symlink(target, out))
    for force in ([], ["--force"]):
        res = cli(fast_pki, "export", "phone", "--out", str(out), *force)
        assert res.code == 2 and f"{out} is a symbolic link" in res.err, res.err
        _intact(target)
    assert not list((fast_pki / "private").glob(".p12-*"))


def test_export_to_certs_replaces_the_bundle_with_an_unpredictable_temporary(fast_pki, monkeypatch):
    """The temporary names mtlsctl uses are mkstemp/mkdtemp names, never `.NAME.p12.tmp`."""
    assert cli(fast_pki, "add-client", "phone").code == 0
    seen: list[str] = []
    real = os.replace

    def spy(src, dst, *a, **kw):
        seen.append(os.fspath(src))
        return real(src, dst, *a, **kw)
    monkeypatch.setattr(os, "replace", spy)
    assert cli(fast_pki, "export", "phone", "--force").code == 0
    monkeypatch.undo()
    bundle_tmp = [s for s in seen if Path(s).name.startswith(".phone.p12.")]
    assert bundle_tmp and all(Path(s).name != ".phone.p12.tmp" and len(Path(s).name) == len(".phone.p12.") + 12
                              for s in bundle_tmp), seen


def test_dry_run_of_export_names_no_predictable_temporary(fast_pki):
    assert cli(fast_pki, "add-client", "phone").code == 0
    res = cli(fast_pki, "export", "phone", "--out", "/tmp/x.p12", "--dry-run")
    assert res.code == 0 and ".x.p12.tmp" not in res.out and "private/.p12-XXXXXXXX/phone.p12" in res.out, res.out


def test_atomic_write_refuses_a_link_and_uses_an_unpredictable_name(tmp_path, victim):
    link = tmp_path / "out.conf"
    link.symlink_to(victim)
    with pytest.raises(files.InputError, match="is a symbolic link"):
        files.atomic_write(link, "x")
    _intact(victim)
    plain = tmp_path / "plain.conf"
    (tmp_path / ".plain.conf.tmp").symlink_to(victim)  # the name a naive writer would use
    files.atomic_write(plain, "hello\n", 0o640)
    assert plain.read_text() == "hello\n" and stat.S_IMODE(plain.stat().st_mode) == 0o640
    _intact(victim)


def test_snapshot_modes_are_clamped_when_journaled(fast_pki):
    """A file that is setuid or group-writable on disk is journaled (and so restored) with a clamped mode."""
    odd = fast_pki / "certs/odd.pem"
    odd.write_text("x")
    os.chmod(odd, 0o4777)
    key = fast_pki / "private/odd.key"
    key.write_text("k")
    os.chmod(key, 0o644)
    with files.pki_lock(fast_pki / ".mtlsctl.lock"):
        tx = files.Transaction(fast_pki)
        with tx:
            tx.snapshot(odd, key)
            record = json.loads((fast_pki / JOURNAL_DIR / "journal.json").read_text())
            tx.checkpoint()
    assert record["snapshots"]["certs/odd.pem"]["mode"] == 0o755
    assert record["snapshots"]["private/odd.key"]["mode"] == 0o600
    assert all(not os.path.isabs(p) for p in [*record["created"], *record["snapshots"], *record["listings"]])

