"""Directories another user controls (run as root, `nobody` owning a shared directory): mtlsctl refuses to
reuse, write into or chmod through them (docs/security.md, "Directories another user controls")."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
import yaml

from mtlsctl import backup as backup_mod

from .conftest import FAST_PROFILE, _copy_pki, run_cli, tree

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user (nobody)")]

NOBODY = 65534


def _as_nobody(fn) -> None:
    """Run fn() in a forked child as nobody (the other user of a shared directory)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            fn()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _chown_nobody(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        os.lchown(p, NOBODY, NOBODY)


@pytest.fixture
def base():
    """A root-owned 755 directory in /tmp that nobody can enter (pytest's tmp_path is 700)."""
    d = Path(tempfile.mkdtemp(prefix="mtls-untrusted-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def victim(base: Path) -> Path:
    d = base / "victim"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o700)
    (d / "secret").write_text("root only\n")
    return d


def _one_error(res, *needles: str) -> None:
    assert res.code == 2, (res.code, res.out, res.err)
    assert "Traceback" not in res.err and "internal error" not in res.err, res.err
    first = res.err.splitlines()[0]
    assert first.startswith("error: ") and all(n in first for n in needles), res.err


def _victim_intact(victim: Path) -> None:
    assert stat.S_IMODE(os.lstat(victim).st_mode) == 0o700
    assert sorted(p.name for p in victim.iterdir()) == ["secret"]


# ------------------------------------------------------------------ 1. demo


@pytest.mark.parametrize("how", ["owner", "subdir", "group-writable", "file"])
def test_demo_never_reuses_a_directory_another_user_controls(fast_pki, base, monkeypatch, how):
    import mtlsctl.demo

    monkeypatch.setattr(mtlsctl.demo, "nginx_binary", lambda: None)
    demo = base / "mtls-demo"
    _copy_pki(fast_pki, demo)  # an existing demo: a CA, its profile and openssl.cnf (re-pointed at demo/)
    os.chmod(demo, 0o755)
    needle = str(demo)
    if how == "owner":
        _chown_nobody(demo)
        needle = "owned by uid 65534"
    elif how == "subdir":
        (demo / "nginx").mkdir()
        os.chown(demo / "nginx", NOBODY, NOBODY)
        needle = f"{demo / 'nginx'} is owned by uid 65534"
    elif how == "group-writable":
        os.chmod(demo, 0o775)
        needle = "group/other-writable"
    else:
        os.chown(demo / "openssl.cnf", NOBODY, NOBODY)
        needle = "openssl.cnf"
    before = tree(demo)
    res = run_cli(["demo", "--dir", str(demo)])
    _one_error(res, needle)
    assert tree(demo) == before


# ------------------------------------------------------------------ 2. init


@pytest.fixture
def fast_profile(base: Path) -> Path:
    path = base / "profile.yaml"
    path.write_text(FAST_PROFILE)
    return path


@pytest.mark.parametrize("how", ["nobody-owns-pki", "link-in-own-pki", "group-writable"])
def test_init_never_chmods_through_a_planted_link(base, victim, fast_profile, how):
    pki = base / "pki"
    pki.mkdir(mode=0o755)
    os.chmod(pki, 0o755)
    if how == "nobody-owns-pki":
        os.chown(pki, NOBODY, NOBODY)
        _as_nobody(lambda: os.symlink(victim, pki / "ca"))
        needle = "owned by uid 65534"
    elif how == "link-in-own-pki":
        os.symlink(victim, pki / "ca")
        needle = f"{pki / 'ca'} is a symbolic link"
    else:
        os.chmod(pki, 0o775)
        os.symlink(victim, pki / "ca")
        needle = "group/other-writable"
    before = tree(pki)
    res = run_cli(["--pki-dir", str(pki), "--profile", str(fast_profile), "init"])
    _one_error(res, needle)
    _victim_intact(victim)
    assert tree(pki) == before  # nothing left behind: no lock file, no directory, no journal
    assert sorted(os.listdir(pki)) == ["ca"]


# ------------------------------------------------------------------ 3. restore


@pytest.fixture
def fast_backup(fast_pki: Path, base: Path) -> Path:
    out = base / "b.tgz"
    res = run_cli(["--pki-dir", str(fast_pki), "backup", "--out", str(out)])
    assert res.code == 0, res.err
    return out


def test_restore_refuses_an_empty_target_another_user_owns(fast_backup, base):
    target = base / "restored"
    target.mkdir(mode=0o755)
    os.chown(target, NOBODY, NOBODY)
    res = run_cli(["restore", str(fast_backup), "--pki-dir", str(target)])
    _one_error(res, "owned by uid 65534")
    assert list(target.iterdir()) == []


def test_restore_refuses_a_group_writable_target(fast_backup, base):
    target = base / "restored"
    target.mkdir()
    os.chmod(target, 0o777)
    res = run_cli(["restore", str(fast_backup), "--pki-dir", str(target)])
    _one_error(res, "group/other-writable")
    assert list(target.iterdir()) == []


def test_restores_final_chmods_never_follow_a_swapped_in_link(fast_backup, base, victim, monkeypatch):
    """The race the ownership check closes, simulated: ca/ becomes a link after the files are written."""
    target = base / "restored"
    real = backup_mod._repoint

    def swap(where: Path):
        result = real(where)
        os.rename(where / "ca", base / "old-ca")
        os.symlink(victim, where / "ca")
        return result
    monkeypatch.setattr(backup_mod, "_repoint", swap)
    res = run_cli(["restore", str(fast_backup), "--pki-dir", str(target)])
    _one_error(res, f"{target / 'ca'}")
    _victim_intact(victim)


def test_restore_repoints_a_quoted_pki_dir(fast_pki, base):
    prof = fast_pki / "mtls.yaml"
    text = prof.read_text()
    assert "\npki_dir:" in "\n" + text
    prof.write_text(text.replace("pki_dir:", '"pki_dir":', 1))
    out = base / "q.tgz"
    assert run_cli(["--pki-dir", str(fast_pki), "backup", "--out", str(out)]).code == 0
    target = base / "restored"
    res = run_cli(["restore", str(out), "--pki-dir", str(target)])
    assert res.code == 0, res.err
    assert yaml.safe_load((target / "mtls.yaml").read_text())["pki_dir"] == str(target)


@pytest.mark.parametrize("text", [
    '# our site\n"pki_dir": "/old/pki"  # moved\nca: {days: 800}\n',
    "'pki_dir': '/old/pki'\nca:\n  days: 800\n",
    "pki_dir: '/old/pki'\nca:\n  days: 800\n",
    "{pki_dir: /old/pki, ca: {days: 800}}\n",
    "pki_dir: >-\n  /old/pki\nca:\n  days: 800\n",
])
def test_repoint_profile_handles_quoted_and_flow_yaml(text):
    from mtlsctl.backup import repoint_profile

    new, why = repoint_profile(text, Path("/new/pki"))
    assert why == ""
    assert yaml.safe_load(new) == {"pki_dir": "/new/pki", "ca": {"days": 800}}
    if text.startswith("# our site"):
        assert new.startswith("# our site\n")  # the line is replaced in place: other lines (comments) stay


# ------------------------------------------------------------------ 4. backup --out, systemd --dir


@pytest.fixture
def nobody_dir(base: Path) -> Path:
    d = base / "theirs"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    os.chown(d, NOBODY, NOBODY)
    return d


def test_backup_refuses_a_symlinked_out(fast_pki, base, nobody_dir):
    link = base / "usb"
    os.symlink(nobody_dir, link)
    res = run_cli(["--pki-dir", str(fast_pki), "backup", "--out", str(link)])
    _one_error(res, "symbolic link")
    assert list(nobody_dir.iterdir()) == []


def test_backup_refuses_a_directory_another_user_owns(fast_pki, nobody_dir):
    res = run_cli(["--pki-dir", str(fast_pki), "backup", "--out", str(nobody_dir / "b.tgz")])
    _one_error(res, "owned by uid 65534")
    assert list(nobody_dir.iterdir()) == []


def test_backup_refuses_a_group_writable_directory_but_not_a_sticky_one(fast_pki, base):
    loose = base / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)
    _one_error(run_cli(["--pki-dir", str(fast_pki), "backup", "--out", str(loose / "b.tgz")]), "group/other-writable")
    assert list(loose.iterdir()) == []
    os.chmod(loose, 0o1777)  # like /tmp: others cannot rename or remove our file
    res = run_cli(["--pki-dir", str(fast_pki), "backup", "--out", str(loose / "b.tgz")])
    assert res.code == 0, res.err
    assert os.lstat(loose / "b.tgz").st_uid == 0


def test_systemd_install_refuses_a_symlinked_or_foreign_dir(fast_pki, base, nobody_dir):
    link = base / "system"
    os.symlink(nobody_dir, link)
    _one_error(run_cli(["--pki-dir", str(fast_pki), "systemd", "install", "--dir", str(link)]), "symbolic link")
    _one_error(run_cli(["--pki-dir", str(fast_pki), "systemd", "install", "--dir", str(nobody_dir)]), "owned by uid 65534")
    assert list(nobody_dir.iterdir()) == []


# ------------------------------------------------------------------ 5. unit syntax through --dir


@pytest.mark.parametrize("char", ["\n", "\r", "\x0b", "\x85", "\u2028"])
def test_systemd_dir_with_a_control_character_is_refused(fast_pki, base, char):
    units = base / f"sys{char}ExecStartPre=/bin/touch /tmp/owned"
    units.mkdir(parents=True)
    res = run_cli(["--pki-dir", str(fast_pki), "systemd", "install", "--dir", str(units)])
    _one_error(res, repr(char))
    assert list(units.iterdir()) == []


# ------------------------------------------------------------------ 6. export to the PKI's own bundle via a link


def test_export_to_its_own_bundle_through_a_linked_pki_refreshes_the_password_file(fast_pki, base):
    assert run_cli(["--pki-dir", str(fast_pki), "add-client", "phone"]).code == 0
    link = base / "pki-link"
    os.symlink(fast_pki, link)
    secret = fast_pki / "private/phone.p12.password"
    secret.write_text("stale-password\n")
    os.chmod(secret, 0o600)
    res = run_cli(["--pki-dir", str(fast_pki), "export", "phone", "--force", "--json",
                   "--out", str(link / "certs/phone.p12")])
    assert res.code == 0, res.err
    assert secret.read_text() == json.loads(res.out)["password"] + "\n"
