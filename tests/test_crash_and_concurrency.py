"""Proof under crashes and concurrency (real openssl, real processes).

Crash injection: a fake `openssl` first on PATH runs the real one but SIGKILLs mtlsctl (its parent)
before or after step k; real kills at random moments. The next command rolls the journal back, and
the PKI is consistent: no orphan certificate, no lost key, a database openssl reads, and the
operation can simply be run again.

Kills inside the journal itself: a hook (`files._crash_point`, a no-op in mtlsctl) is replaced in the child
process to SIGKILL it at the n-th time a named moment comes: a journal write half done (its temporary file
written, not renamed), a journal written, a commit with the outputs fsynced but journal.json still there, a
commit done but the journal directory not yet cleaned, and every step of a rollback.

Concurrency: many add-client, revoke, crl and renew processes at once on one PKI; readers (`list`) racing
writers never see index.txt half replaced.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import _copy_pki, openssl, run_cli, set_profile

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
REAL_OPENSSL = shutil.which("openssl")

FAKE_OPENSSL = """#!/bin/sh
# crash injector: count calls; at call $KILL_AT, SIGKILL mtlsctl (our parent) before or after the real step
n=$(( $(cat "$COUNTER" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$COUNTER"
if [ "$n" = "$KILL_AT" ]; then
    if [ "$WHEN" = before ]; then kill -9 "$PPID"; exit 137; fi
    "$REAL_OPENSSL" "$@"; rc=$?
    kill -9 "$PPID"; exit $rc
fi
exec "$REAL_OPENSSL" "$@"
"""


def mtlsctl(pki: Path, *args: str, env: dict | None = None, stdin: str = "", timeout: float = 120):
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "mtlsctl", "--pki-dir", str(pki), *args], input=stdin,
                          capture_output=True, text=True, env=full, timeout=timeout)


@pytest.fixture
def injector(tmp_path):
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    fake = bin_dir / "openssl"
    fake.write_text(FAKE_OPENSSL)
    fake.chmod(0o755)

    def env(kill_at: int, when: str) -> dict:
        counter = tmp_path / f"counter-{kill_at}-{when}-{time.monotonic_ns()}"
        return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "COUNTER": str(counter), "KILL_AT": str(kill_at),
                "WHEN": when, "REAL_OPENSSL": REAL_OPENSSL}
    return env


def assert_consistent(pki: Path) -> list[str]:
    """The invariants a PKI must keep whatever happened; returns the valid names."""
    assert not (pki / ".mtlsctl.journal").exists()
    leftovers = [p.name for p in pki.rglob("*") if p.name.endswith((".new", ".tmp"))]
    assert leftovers == [], leftovers
    rows = [line.split("\t") for line in (pki / "index.txt").read_text().splitlines()]
    serials = [r[3] for r in rows]
    assert len(serials) == len(set(serials)), "duplicate serials"
    newcerts = sorted(p.stem for p in (pki / "newcerts").glob("*.pem"))
    assert newcerts == sorted(serials), f"orphans or missing: newcerts {newcerts} vs index {serials}"
    expected_next = format(int(max(serials, key=lambda s: int(s, 16)), 16) + 1, "X") if serials else "1000"
    assert (pki / "serial").read_text().strip() == expected_next.zfill(len(expected_next) + len(expected_next) % 2)
    valid = []
    for r in rows:
        if r[0] != "V":
            continue
        name = r[5].rsplit("CN=", 1)[1]
        valid.append(name)
        crt, key = pki / f"certs/{name}.crt", pki / f"private/{name}.key"
        assert crt.exists() and key.exists(), name
        serial = openssl("x509", "-in", str(crt), "-noout", "-serial").stdout.strip().split("=")[1]
        if serial != r[3]:  # an older valid row of a renewed name: its certificate is in newcerts
            continue
        cert_pub = openssl("x509", "-in", str(crt), "-noout", "-pubkey").stdout
        key_pub = openssl("pkey", "-in", str(key), "-pubout").stdout
        assert cert_pub == key_pub, f"{name}: key does not match certificate"
    for key in (pki / "private").glob("*.key"):
        name = key.stem
        if name == "ca":
            continue
        # no key without its certificate (a half-made client), unless its certificate is in the database
        assert (pki / f"certs/{name}.crt").exists() or not any(r[5].endswith(f"CN={name}") for r in rows), name
    copy = pki.parent / (pki.name + "-updatedb")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(pki, copy)
    cnf = (copy / "openssl.cnf").read_text().replace(f"= {pki}\n", f"= {copy}\n")
    (copy / "openssl.cnf").write_text(cnf)
    res = openssl("ca", "-config", "openssl.cnf", "-updatedb", cwd=copy, check=False)
    assert res.returncode == 0, res.stderr
    openssl("crl", "-in", str(pki / "crl/ca.crl"), "-noout", "-CAfile", str(pki / "ca/ca.crt"))
    return valid


ADD_CLIENT_STEPS = 5  # genpkey, req, ca, pkcs12 -export, pkcs12 -in (check)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("step", range(1, ADD_CLIENT_STEPS + 1))
def test_add_client_killed_at_each_step(fast_pki, injector, step, when):
    set_profile(fast_pki, nginx={"reload_command": ""})
    res = mtlsctl(fast_pki, "add-client", "victim", env=injector(step, when))
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr)
    follow = mtlsctl(fast_pki, "list", "--json")  # any command rolls back the interrupted run first
    assert follow.returncode == 0, follow.stderr
    valid = assert_consistent(fast_pki)
    if step <= 3:  # killed before mtlsctl confirmed the signature in index.txt: the whole run is undone
        assert "rolled back an interrupted mtlsctl run" in follow.stderr
        assert valid == [] and not list((fast_pki / "certs").glob("victim*"))
        assert not (fast_pki / "private/victim.key").exists()
        assert mtlsctl(fast_pki, "add-client", "victim").returncode == 0  # simply run it again
    else:
        # issued: key, CSR and certificate stay; a partial bundle is gone; `export` finishes the job
        assert valid == ["victim"]
        again = mtlsctl(fast_pki, "export", "victim", "--force")
        assert again.returncode == 0, again.stderr
    assert_consistent(fast_pki)


RENEW_STEPS = 5  # ca sign (reviewed CSR, private/.sign-*), revoke old, pkcs12 export, pkcs12 check, gencrl


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("step", range(1, RENEW_STEPS + 1))
def test_renew_killed_at_each_step(fast_pki, injector, step, when):
    set_profile(fast_pki, nginx={"reload_command": ""})
    assert mtlsctl(fast_pki, "add-client", "old", "--days", "3").returncode == 0
    assert mtlsctl(fast_pki, "add-client", "steady").returncode == 0
    res = mtlsctl(fast_pki, "renew", env=injector(step, when))
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stdout, res.stderr)
    assert mtlsctl(fast_pki, "list", "--json").returncode == 0
    valid = assert_consistent(fast_pki)
    assert "old" in valid and "steady" in valid  # never a name left without a valid certificate
    # the per-run signing directory (reviewed CSR + config) never survives a kill: the journal removes it
    assert not list((fast_pki / "private").glob(".sign-*"))
    # the next renew completes what is left
    again = mtlsctl(fast_pki, "renew", "--json")
    assert again.returncode == 0, again.stderr
    assert_consistent(fast_pki)
    rows = json.loads(mtlsctl(fast_pki, "list", "--json", "--status", "valid").stdout)
    assert sorted(r["name"] for r in rows) == ["old", "steady"]
    assert all(r["days_left"] > 300 for r in rows)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("step", range(1, 3))  # revoke, gencrl (the CRL is then read in Python)
def test_revoke_killed_at_each_step(fast_pki, injector, step, when):
    set_profile(fast_pki, nginx={"reload_command": ""})
    assert mtlsctl(fast_pki, "add-client", "lost").returncode == 0
    res = mtlsctl(fast_pki, "revoke", "lost", env=injector(step, when))
    assert res.returncode == -signal.SIGKILL
    assert mtlsctl(fast_pki, "list").returncode == 0
    assert_consistent(fast_pki)
    again = mtlsctl(fast_pki, "revoke", "lost")
    assert again.returncode == 0, again.stderr
    crl = openssl("crl", "-in", str(fast_pki / "crl/ca.crl"), "-noout", "-text").stdout
    assert "Serial Number: 1000" in crl  # whatever happened, the revocation ends up in the CRL


def test_real_kills_at_random_moments(fast_pki):
    set_profile(fast_pki, nginx={"reload_command": ""})
    rng = random.Random(20261127)
    for i in range(12):
        proc = subprocess.Popen([sys.executable, "-m", "mtlsctl", "--pki-dir", str(fast_pki), "add-client", f"r{i}"],
                                env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.45))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert mtlsctl(fast_pki, "list", "--json").returncode == 0
        assert_consistent(fast_pki)


def test_sigterm_rolls_back_and_says_so(fast_pki, injector, tmp_path):
    """SIGTERM (systemd stopping a unit) is handled: rolled back in-process, exit 130."""
    slow = tmp_path / "slowbin"
    slow.mkdir()
    (slow / "openssl").write_text(f'#!/bin/sh\ncase "$1" in req) sleep 5;; esac\nexec {REAL_OPENSSL} "$@"\n')
    (slow / "openssl").chmod(0o755)
    proc = subprocess.Popen([sys.executable, "-m", "mtlsctl", "--pki-dir", str(fast_pki), "add-client", "t"],
                            env={**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{slow}:{os.environ['PATH']}"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not (fast_pki / "private/t.key").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "rolled back" in err
    assert not (fast_pki / "private/t.key").exists() and not (fast_pki / ".mtlsctl.journal").exists()


def test_many_writers_at_once(fast_pki):
    """8 add-client, 2 revoke, 2 crl and a renew in parallel: all succeed, serials unique, nothing lost."""
    set_profile(fast_pki, nginx={"reload_command": ""})
    for name, days in (("r1", "365"), ("r2", "365"), ("s1", "3")):
        assert mtlsctl(fast_pki, "add-client", name, "--days", days).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "mtlsctl", "--pki-dir", str(fast_pki)]
    jobs = [[*base, "add-client", f"c{i}"] for i in range(8)]
    jobs += [[*base, "revoke", "r1"], [*base, "revoke", "r2"], [*base, "crl"], [*base, "crl"], [*base, "renew"]]
    procs = [subprocess.Popen(j, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for j in jobs]
    results = [(p.wait(timeout=240), p.stderr.read()) for p in procs]
    assert [code for code, _ in results] == [0] * len(jobs), [(j[5:], r) for j, r in zip(jobs, results, strict=True) if r[0]]
    valid = assert_consistent(fast_pki)
    assert sorted(valid) == sorted([f"c{i}" for i in range(8)] + ["s1"])
    index = (fast_pki / "index.txt").read_text()
    assert len(index.splitlines()) == 3 + 8 + 1  # three made first, eight new, one renewal
    for i in range(8):
        serial = openssl("x509", "-in", str(fast_pki / f"certs/c{i}.crt"), "-noout", "-serial").stdout.strip().split("=")[1]
        assert re.search(rf"^V\t\d+Z\t\t{serial}\tunknown\t/CN=c{i}$", index, re.M)
    crl = openssl("crl", "-in", str(fast_pki / "crl/ca.crl"), "-noout", "-text").stdout
    assert crl.count("Serial Number:") == 3  # r1, r2 and the superseded s1


# --------------------------------------------------------------------------- kills inside the journal

KILL_HOOK = """
import os, signal
from mtlsctl import files

point, nth, name = os.environ["MTLSCTL_KILL_AT"].split(":")
hits = 0


def crash_point(where, path=None):
    global hits
    if where == point and (not name or (path is not None and os.path.basename(os.fspath(path)) == name)):
        hits += 1
        if hits == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)


files._crash_point = crash_point
if point == "cleanup":  # a kill while the journal directory is being removed, after its blobs went
    def rmtree(path, *args, **kwargs):
        for entry in sorted(os.listdir(path), key=lambda n: n == "journal.json"):
            os.unlink(os.path.join(path, entry))
            if entry != "journal.json":
                os.kill(os.getpid(), signal.SIGKILL)
        os.rmdir(path)
    files.shutil.rmtree = rmtree
from mtlsctl.cli import main

main()
"""


def mtlsctl_killed_at(pki: Path, point: str, nth: int, *args: str, name: str = "", env: dict | None = None):
    """Run mtlsctl with the hook: SIGKILL at the nth `point` (for `atomic-write`, only writes of `name`)."""
    full = {**os.environ, "PYTHONPATH": str(REPO), "MTLSCTL_KILL_AT": f"{point}:{nth}:{name}", **(env or {})}
    return subprocess.run([sys.executable, "-c", KILL_HOOK, "--pki-dir", str(pki), *args], capture_output=True,
                          text=True, env=full, timeout=120)


def fresh(template: Path, tmp_path: Path, label: str) -> Path:
    pki = _copy_pki(template, tmp_path / label)
    set_profile(pki, nginx={"reload_command": ""})
    return pki


JOURNAL_POINTS = [("atomic-write", "journal.json"), ("journal-written", ""), ("commit-synced", ""), ("committed", "")]


@pytest.mark.parametrize("point,name", JOURNAL_POINTS, ids=[p for p, _ in JOURNAL_POINTS])
def test_add_client_killed_at_every_moment_of_the_journal(_fast_ca_template, tmp_path, point, name):
    """Killed while writing the journal, right after, at the commit: the next command (a reader) leaves a
    consistent PKI, never a journal it refuses; the client is either wholly absent or issued."""
    nth = 0
    while True:
        nth += 1
        pki = fresh(_fast_ca_template, tmp_path, f"pki-{nth}")
        res = mtlsctl_killed_at(pki, point, nth, "add-client", "victim", name=name)
        if res.returncode == 0:
            break
        assert res.returncode == -signal.SIGKILL, (nth, res.returncode, res.stderr)
        follow = mtlsctl(pki, "list", "--json")
        assert follow.returncode == 0 and "cannot be trusted" not in follow.stderr, (nth, follow.stderr)
        valid = assert_consistent(pki)
        if valid == []:
            assert not list((pki / "certs").glob("victim*")) and not (pki / "private/victim.key").exists()
            again = mtlsctl(pki, "add-client", "victim")
        else:
            assert valid == ["victim"], valid
            again = mtlsctl(pki, "export", "victim", "--force")
        assert again.returncode == 0, (nth, again.stderr)
        assert_consistent(pki)
        shutil.rmtree(pki)
    assert nth > 1, f"add-client never reached {point}"


@pytest.mark.parametrize("point,name", JOURNAL_POINTS, ids=[p for p, _ in JOURNAL_POINTS])
def test_revoke_killed_at_every_moment_of_the_journal(_fast_ca_template, tmp_path, point, name):
    nth = 0
    while True:
        nth += 1
        pki = fresh(_fast_ca_template, tmp_path, f"pki-{nth}")
        assert mtlsctl(pki, "add-client", "lost").returncode == 0
        res = mtlsctl_killed_at(pki, point, nth, "revoke", "lost", name=name)
        if res.returncode == 0:
            break
        assert res.returncode == -signal.SIGKILL, (nth, res.returncode, res.stderr)
        assert mtlsctl(pki, "list").returncode == 0
        assert_consistent(pki)
        again = mtlsctl(pki, "revoke", "lost")
        assert again.returncode == 0, again.stderr
        assert "Serial Number: 1000" in openssl("crl", "-in", str(pki / "crl/ca.crl"), "-noout", "-text").stdout
        shutil.rmtree(pki)
    assert nth > 1, f"revoke never reached {point}"


def test_a_commit_killed_while_cleaning_up_is_still_a_commit(fast_pki):
    """journal.json goes first (the commit point), the blobs after: a kill in between leaves a committed
    directory, never a journal.json that names a deleted snapshot (which every later command would refuse)."""
    set_profile(fast_pki, nginx={"reload_command": ""})
    res = mtlsctl_killed_at(fast_pki, "cleanup", 1, "add-client", "victim")
    assert res.returncode == -signal.SIGKILL
    follow = mtlsctl(fast_pki, "add-client", "other")
    assert follow.returncode == 0 and "cannot be trusted" not in follow.stderr, follow.stderr
    assert sorted(assert_consistent(fast_pki)) == ["other", "victim"]  # the issuance was committed
    assert mtlsctl(fast_pki, "export", "victim", "--force").returncode == 0


@pytest.mark.parametrize("point", ["recover-step", "recovered"])
def test_a_rollback_killed_half_way_is_finished_by_the_next_command(_fast_ca_template, tmp_path, injector, point):
    """The rollback is idempotent and the journal goes last: killed at any step of it, the next command
    does it again, to the end."""
    nth = 0
    while True:
        nth += 1
        pki = fresh(_fast_ca_template, tmp_path, f"pki-{nth}")
        # signed by openssl, not yet confirmed: a journal with database snapshots, created files, newcerts/
        res = mtlsctl(pki, "add-client", "victim", env=injector(3, "after"))
        assert res.returncode == -signal.SIGKILL
        assert (pki / ".mtlsctl.journal/journal.json").exists() and (pki / "newcerts/1000.pem").exists()
        killed = mtlsctl_killed_at(pki, point, nth, "list", "--json")
        if killed.returncode == 0:
            break
        assert killed.returncode == -signal.SIGKILL, (nth, killed.returncode, killed.stderr)
        follow = mtlsctl(pki, "list", "--json")
        assert follow.returncode == 0 and "rolled back an interrupted mtlsctl run" in follow.stderr, follow.stderr
        assert assert_consistent(pki) == []
        assert mtlsctl(pki, "add-client", "victim").returncode == 0
        assert assert_consistent(pki) == ["victim"]
        shutil.rmtree(pki)
    assert nth > 1, f"the rollback never reached {point}"


def test_a_kill_after_signing_serial_00FF_leaves_no_orphan(fast_pki, injector):
    """openssl names the file newcerts/FF.pem for a `serial` of 00FF: the rollback removes whatever appeared
    in newcerts/ (the listing taken before `openssl ca`), so no signed certificate is left unrevocable."""
    set_profile(fast_pki, nginx={"reload_command": ""})
    (fast_pki / "serial").write_text("00FF\n")
    res = mtlsctl(fast_pki, "add-client", "victim", env=injector(3, "after"))
    assert res.returncode == -signal.SIGKILL
    assert (fast_pki / "newcerts/FF.pem").exists()
    assert mtlsctl(fast_pki, "list").returncode == 0
    assert list((fast_pki / "newcerts").iterdir()) == [] and (fast_pki / "index.txt").read_text() == ""
    assert (fast_pki / "serial").read_text() == "00FF\n" and not (fast_pki / ".mtlsctl.journal").exists()
    again = mtlsctl(fast_pki, "add-client", "victim", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["serial"] == "FF", again.stderr
    assert assert_consistent(fast_pki) == ["victim"]


# --------------------------------------------------------------------------- readers racing writers

GAP_OPENSSL = """#!/bin/sh
# `openssl ca` replaces index.txt by two renames (index.txt -> index.txt.old, index.txt.new -> index.txt). This
# stand-in runs the real one, then opens that gap again for 0.3 s (still holding the PKI lock it inherited), so
# that a reader that does not wait for writers meets it every time.
"$REAL_OPENSSL" "$@"; rc=$?
case " $* " in *" -extensions "*)
    mv index.txt index.txt.gap && sleep 0.3 && mv index.txt.gap index.txt;;
esac
exit $rc
"""


def test_readers_racing_writers_never_see_a_half_replaced_database(fast_pki, tmp_path):
    """Protection: readers (`list`) hold a shared flock, writers an exclusive one."""
    set_profile(fast_pki, nginx={"reload_command": ""})
    bin_dir = tmp_path / "gapbin"
    bin_dir.mkdir()
    (bin_dir / "openssl").write_text(GAP_OPENSSL)
    (bin_dir / "openssl").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{bin_dir}:{os.environ['PATH']}", "REAL_OPENSSL": REAL_OPENSSL}
    base = [sys.executable, "-m", "mtlsctl", "--pki-dir", str(fast_pki)]
    names = [f"w{i}" for i in range(4)]
    jobs = [[*base, "add-client", n] for n in names]
    writers = [subprocess.Popen(j, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for j in jobs]
    reads, seen = 0, set()
    while any(w.poll() is None for w in writers):
        res = run_cli(["--pki-dir", str(fast_pki), "list", "--json"])
        assert res.code == 0, res.err  # never "no CA (index.txt missing)", never a partial read
        rows = json.loads(res.out)
        assert {r["name"] for r in rows} <= set(names)
        seen |= {r["name"] for r in rows}
        reads += 1
    codes = [(w.returncode, w.stderr.read()) for w in writers]
    assert [c for c, _ in codes] == [0] * len(jobs), codes
    assert reads >= 3 and seen, (reads, seen)
    assert sorted(assert_consistent(fast_pki)) == names
