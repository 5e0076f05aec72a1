"""`mtlsctl systemd install`: units that systemd accepts (`systemd-analyze verify`), that run this mtlsctl by its
absolute path on this PKI, whose CRL refresh does not depend on renew succeeding, and that never overwrite a
unit without --force."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mtlsctl import systemd
from mtlsctl.errors import InputError, StateError
from mtlsctl.pki import Pki, Settings
from mtlsctl.profile import parse_profile

from .conftest import require_tool, set_profile

REPO = Path(__file__).resolve().parent.parent
DOCS_SYSTEMD = REPO / "docs" / "systemd"
ALL = ["mtlsctl-renew.service", "mtlsctl-renew.timer", "mtlsctl-crl.service", "mtlsctl-crl.timer"]
OCSP = {"url": "http://127.0.0.1:8889", "port": 8889}


def install(mtls, pki: Path, unit_dir: Path, *args: str):
    return mtls(["--pki-dir", str(pki), "systemd", "install", "--dir", str(unit_dir), *args])


def exec_starts(text: str) -> list[list[str]]:
    return [shlex.split(line.split("=", 1)[1]) for line in text.splitlines() if line.startswith("ExecStart")]


def directives(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


@pytest.fixture
def units(tmp_path: Path) -> Path:
    d = tmp_path / "system"
    d.mkdir()
    return d


def _systemd_analyze() -> str:
    return require_tool("systemd-analyze")


@pytest.mark.integration
def test_the_generated_units_pass_systemd_analyze_verify(tiered_pki, mtls, units):
    analyze = _systemd_analyze()
    set_profile(tiered_pki, ocsp=OCSP)
    res = install(mtls, tiered_pki, units)
    assert res.code == 0, res.err
    names = sorted(p.name for p in units.iterdir())
    assert names == sorted([*ALL, "mtlsctl-ocsp.service"])
    check = subprocess.run([analyze, "verify", *(str(units / n) for n in names)], capture_output=True, text=True)
    assert check.returncode == 0 and (check.stdout + check.stderr).strip() == "", check.stdout + check.stderr
    # and it is a real check: a unit whose ExecStart does not exist is refused
    broken = units / "mtlsctl-crl.service"
    broken.write_text(broken.read_text().replace(str(systemd.running_mtlsctl()), "/nonexistent/mtlsctl"))
    check = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True)
    assert check.returncode != 0 and "/nonexistent/mtlsctl" in check.stdout + check.stderr


@pytest.mark.integration
def test_execstart_is_the_absolute_path_of_this_mtlsctl_on_this_pki(fast_pki, mtls, units):
    assert install(mtls, fast_pki, units).code == 0
    exe = systemd.running_mtlsctl()
    commands = {}
    for name in ("mtlsctl-renew.service", "mtlsctl-crl.service"):
        [argv] = exec_starts((units / name).read_text())
        assert Path(argv[0]).is_absolute() and Path(argv[0]).is_file() and os.access(argv[0], os.X_OK), argv
        assert argv[0] == str(exe) and argv[1:3] == ["--pki-dir", str(fast_pki)]
        commands[name] = argv
    assert commands["mtlsctl-renew.service"][3:] == ["renew"]
    assert commands["mtlsctl-crl.service"][3:] == ["crl", "--if-due"]
    # the command runs as systemd runs it: a bare environment, no PATH to find mtlsctl by
    run = subprocess.run(commands["mtlsctl-crl.service"], capture_output=True, text=True,
                         env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"})
    assert run.returncode == 0, run.stderr
    assert "CRL" in run.stdout + run.stderr


@pytest.mark.integration
def test_the_crl_refresh_does_not_depend_on_renew(fast_pki, mtls, units):
    """systemd skips ExecStartPost= when ExecStart= fails (FIELD-NOTES): the CRL has its own service and timer."""
    assert install(mtls, fast_pki, units).code == 0
    renew = directives((units / "mtlsctl-renew.service").read_text())
    crl = directives((units / "mtlsctl-crl.service").read_text())
    assert not [d for d in renew if d.startswith(("ExecStartPost", "ExecStartPre", "ExecStopPost"))]
    assert [argv[3:] for argv in exec_starts("\n".join(renew))] == [["renew"]]
    assert [argv[3:] for argv in exec_starts("\n".join(crl))] == [["crl", "--if-due"]]
    # nothing ties the CRL unit to renew's success (After= only orders them)
    for key in ("Requires=", "Requisite=", "BindsTo=", "PartOf=", "OnSuccess=", "Upholds="):
        assert not [d for d in crl if d.startswith(key)], key
    timer = directives((units / "mtlsctl-crl.timer").read_text())
    assert "[Timer]" in timer and not [d for d in timer if d.startswith("Unit=")]  # starts mtlsctl-crl.service
    assert "Persistent=true" in timer and any(d.startswith("OnCalendar=") for d in timer)


@pytest.mark.integration
def test_no_overwrite_without_force(fast_pki, mtls, units, tmp_path):
    mine = units / "mtlsctl-crl.timer"
    mine.write_text("# my own timer\n")
    res = install(mtls, fast_pki, units)
    assert res.code == 2 and f"{mine} already exist" in res.err and "nothing was written" in res.err, res.err
    assert mine.read_text() == "# my own timer\n" and sorted(p.name for p in units.iterdir()) == ["mtlsctl-crl.timer"]
    res = install(mtls, fast_pki, units, "--force", "--json")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert {u["name"]: u["replaced"] for u in data["units"]} == {n: n == "mtlsctl-crl.timer" for n in ALL}
    assert "OnCalendar=" in mine.read_text() and (mine.stat().st_mode & 0o777) == 0o644
    # a symlink where a unit goes is never written through, even with --force
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (units / "mtlsctl-renew.timer").unlink()
    (units / "mtlsctl-renew.timer").symlink_to(victim)
    (units / "mtlsctl-renew.service").write_text("# mine\n")
    res = install(mtls, fast_pki, units, "--force")
    assert res.code == 2 and "symbolic link" in res.err and victim.read_text() == "keep\n", res.err
    assert (units / "mtlsctl-renew.service").read_text() == "# mine\n"  # refused before anything was written


def test_a_failed_install_removes_what_it_created(fast_pki, mtls, units, monkeypatch):
    from mtlsctl import files

    calls = []

    def flaky(path, mode):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", str(path))
        return files.create_exclusive(path, mode)

    monkeypatch.setattr(systemd, "create_exclusive", flaky)
    res = install(mtls, fast_pki, units)
    assert res.code == 1 and "No space left on device" in res.err, res.err
    assert len(calls) == 3 and list(units.iterdir()) == []


@pytest.mark.integration
def test_dry_run_writes_nothing(fast_pki, mtls, units):
    res = install(mtls, fast_pki, units, "--dry-run")
    assert res.code == 0, res.err
    assert list(units.iterdir()) == []
    assert f"ExecStart={systemd.running_mtlsctl()} --pki-dir {fast_pki} renew" in res.out
    res = install(mtls, fast_pki, units, "--dry-run", "--json")
    data = json.loads(res.out)
    assert data["dry_run"] and not any(u["written"] for u in data["units"]) and list(units.iterdir()) == []
    assert [u["name"] for u in data["units"]] == ALL and "ExecStart=" in data["units"][0]["text"]
    assert data["next"] == "systemctl daemon-reload && systemctl enable --now mtlsctl-renew.timer mtlsctl-crl.timer"
    # with a unit already there: shown and marked, still nothing written or refused
    mine = units / "mtlsctl-renew.service"
    mine.write_text("# mine\n")
    res = install(mtls, fast_pki, units, "--dry-run")
    assert res.code == 0 and f"# ---- {mine} (exists: refused without --force)" in res.out, res.out
    assert mine.read_text() == "# mine\n" and [p.name for p in units.iterdir()] == [mine.name]


@pytest.mark.integration
def test_ocsp_unit_only_with_an_ocsp_section(fast_pki, mtls, units):
    assert install(mtls, fast_pki, units).code == 0
    assert not (units / "mtlsctl-ocsp.service").exists()
    set_profile(fast_pki, ocsp=OCSP)
    res = install(mtls, fast_pki, units)  # the four exist: refused as a whole, the OCSP unit not written either
    assert res.code == 2 and not (units / "mtlsctl-ocsp.service").exists()
    other = units.parent / "other"
    other.mkdir()
    res = install(mtls, fast_pki, other)
    assert res.code == 0 and "mtlsctl-ocsp.service" in res.out
    [argv] = exec_starts((other / "mtlsctl-ocsp.service").read_text())
    assert argv[3:] == ["ocsp", "serve"] and "8889" in (other / "mtlsctl-ocsp.service").read_text()


@pytest.mark.integration
def test_refusals(tmp_path, fast_pki, mtls, units):
    res = install(mtls, tmp_path / "nopki", units)
    assert res.code == 2 and "no CA in" in res.err and list(units.iterdir()) == []
    res = install(mtls, fast_pki, tmp_path / "missing")
    assert res.code == 2 and "is not a directory" in res.err


@pytest.mark.integration
def test_a_profile_outside_the_pki_is_named_in_execstart(fast_pki, mtls, units, tmp_path):
    prof = tmp_path / "site.yaml"
    prof.write_text((fast_pki / "mtls.yaml").read_text())
    res = mtls(["--pki-dir", str(fast_pki), "--profile", str(prof), "systemd", "install", "--dir", str(units)])
    assert res.code == 0, res.err
    [argv] = exec_starts((units / "mtlsctl-renew.service").read_text())
    assert argv[1:] == ["--pki-dir", str(fast_pki), "--profile", str(prof), "renew"]


# ------------------------------------------------------------------ where the running mtlsctl is


def test_argv0_is_resolved_when_it_is_the_console_script(tmp_path):
    real = tmp_path / "venv/bin/mtlsctl"
    real.parent.mkdir(parents=True)
    real.write_text("#!/bin/sh\n")
    real.chmod(0o755)
    link = tmp_path / "mtlsctl"
    link.symlink_to(real)
    assert systemd.running_mtlsctl(str(link), "/nowhere/python3") == real
    # not the console script (python -m mtlsctl, pytest): the one next to the running Python
    assert systemd.running_mtlsctl("/x/pytest", str(tmp_path / "venv/bin/python3")) == real
    with pytest.raises(StateError) as info:
        systemd.running_mtlsctl(str(tmp_path / "venv/bin/mtlsctl.py"), str(tmp_path / "elsewhere/python3"))
    assert "cannot tell where the running mtlsctl is" in info.value.message


def test_argv0_is_used_by_the_command(fast_pki, mtls, units, tmp_path, monkeypatch):
    fake = tmp_path / "opt/bin/mtlsctl"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(fake), "systemd", "install"])
    assert install(mtls, fast_pki, units).code == 0
    assert exec_starts((units / "mtlsctl-renew.service").read_text())[0][0] == str(fake)


@pytest.mark.parametrize("root", ["/srv/pki 1", "/srv/pki%i", "/srv/$pki"])
def test_a_path_systemd_would_read_as_syntax_is_refused(root):
    settings = Settings(Pki(Path(root)), parse_profile({}, "t"), "built-in defaults")
    with pytest.raises(InputError) as info:
        systemd.render_units(settings, Path("/usr/local/bin/mtlsctl"))
    assert "would read as syntax" in info.value.message


def test_hardening_is_loosened_only_as_far_as_the_paths_need():
    assert systemd.hardening(Path("/usr/local/bin/mtlsctl"), [Path("/etc/nginx/pki")], []).splitlines() == [
        "UMask=0077", "NoNewPrivileges=yes", "PrivateTmp=yes", "ProtectHome=yes"]
    home_exe = systemd.hardening(Path("/root/.local/bin/mtlsctl"), [Path("/etc/nginx/pki")], [])
    assert "ProtectHome=read-only" in home_exe.splitlines()  # systemd could not execute it under ProtectHome=yes
    tmp_pki = systemd.hardening(Path("/usr/bin/mtlsctl"), [Path("/tmp/pki")], [])
    assert "PrivateTmp=yes" not in tmp_pki.splitlines()
    home_pki = systemd.hardening(Path("/usr/bin/mtlsctl"), [Path("/home/ca/pki")], [])
    assert not [ln for ln in home_pki.splitlines() if ln.startswith("ProtectHome=")]


# ------------------------------------------------------------------ the examples in docs/systemd/


def _examples() -> dict[str, str]:
    settings = Settings(Pki(Path("/etc/nginx/pki")), parse_profile({"ocsp": OCSP}, "example"), "built-in defaults")
    return {u.name: u.text for u in systemd.render_units(settings, Path("/usr/local/bin/mtlsctl"))}


def test_docs_systemd_holds_the_rendered_units():
    """docs/systemd/ shows what `mtlsctl systemd install` writes for /etc/nginx/pki and /usr/local/bin/mtlsctl.
    Regenerate: MTLSCTL_UPDATE_GOLDEN=1 python -m pytest tests/test_systemd.py"""
    examples = _examples()
    if os.environ.get("MTLSCTL_UPDATE_GOLDEN"):
        for name, text in examples.items():
            (DOCS_SYSTEMD / name).write_text(text)
    assert sorted(p.name for p in DOCS_SYSTEMD.iterdir()) == sorted(examples)
    for name, text in examples.items():
        assert (DOCS_SYSTEMD / name).read_text() == text, \
            f"docs/systemd/{name} is stale: MTLSCTL_UPDATE_GOLDEN=1 python -m pytest {__file__}"
