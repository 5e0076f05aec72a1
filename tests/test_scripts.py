"""The drop-in scripts, end to end in a temporary PKI: same arguments, PKI_DIR, files, exit codes and the
lines people parse as the guide's; found under cron's PATH (`env -i PATH=/usr/bin:/bin`); and a year of
daily-ish cron runs under faketime keeps every client valid."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from .conftest import openssl, require_tool, set_profile, tree

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"

pytestmark = pytest.mark.integration


@pytest.fixture
def mtlsctl_cmd(tmp_path: Path) -> Path:
    """An `mtlsctl` executable that runs this checkout (scripts call "$MTLSCTL")."""
    wrapper = tmp_path / "bin" / "mtlsctl"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m mtlsctl \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


def run_script(name: str, *args: str, pki: Path, mtlsctl: Path, stdin: str = "", prefix: tuple[str, ...] = (),
               env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PKI_DIR": str(pki), "MTLSCTL": str(mtlsctl), **(env or {})}
    return subprocess.run([*prefix, str(SCRIPTS / name), *args], input=stdin, capture_output=True, text=True, env=full_env)


def guide_password(stdout: str, pki: Path, name: str) -> str:
    """The lines the guide's mtls-add-client.sh prints for a generated password, exactly; the password opens the bundle."""
    lines = stdout.splitlines()
    assert lines[0] == "No password provided. Generating a random one..."
    generated = [ln for ln in lines if ln.startswith("Generated Password: ")]
    export = [ln for ln in lines if "Export Password:" in ln]
    assert len(generated) == 1 and len(export) == 1, stdout
    password = generated[0].removeprefix("Generated Password: ")
    assert export[0] == f"⚠️  Export Password: {password}"  # the guide's line, byte for byte
    assert re.fullmatch(r"[A-Za-z0-9_-]{20,}", password)
    assert f" - Key: {pki}/private/{name}.key" in lines and f" - Cert: {pki}/certs/{name}.crt" in lines
    assert f" - Bundle: {pki}/certs/{name}.p12" in lines and "✅ Certificate created successfully!" in lines
    openssl("pkcs12", "-in", str(pki / f"certs/{name}.p12"), "-noout", "-passin", "stdin", input=password + "\n")
    return password


def test_scripts_are_shellcheck_clean():
    shellcheck = require_tool("shellcheck")
    res = subprocess.run([shellcheck, *map(str, SCRIPTS.glob("*.sh"))], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_add_client_script_like_the_guides(fast_pki, mtlsctl_cmd):
    usage = run_script("mtls-add-client.sh", pki=fast_pki, mtlsctl=mtlsctl_cmd)
    assert usage.returncode == 1 and usage.stdout.startswith("Usage: ") and "<client-name> [export-password]" in usage.stdout

    res = run_script("mtls-add-client.sh", "my-iphone", "securepassword", pki=fast_pki, mtlsctl=mtlsctl_cmd)
    assert res.returncode == 0, res.stderr
    assert "securepassword" not in res.stdout + res.stderr
    openssl("pkcs12", "-in", str(fast_pki / "certs/my-iphone.p12"), "-noout", "-passin", "stdin", input="securepassword\n")
    for f in ("private/my-iphone.key", "certs/my-iphone.csr", "certs/my-iphone.crt", "certs/my-iphone.p12"):
        assert (fast_pki / f).exists()

    gen = run_script("mtls-add-client.sh", "laptop", pki=fast_pki, mtlsctl=mtlsctl_cmd)
    assert gen.returncode == 0, gen.stderr
    password = guide_password(gen.stdout, fast_pki, "laptop")
    assert len(password) >= 20
    piped = run_script("mtls-add-client.sh", "tablet", "-", pki=fast_pki, mtlsctl=mtlsctl_cmd, stdin="from-stdin\n")
    assert piped.returncode == 0, piped.stderr
    openssl("pkcs12", "-in", str(fast_pki / "certs/tablet.p12"), "-noout", "-passin", "stdin", input="from-stdin\n")

    # the guide exits 1 on a bad name; so does the drop-in (mtlsctl says 2, the script maps it)
    bad = run_script("mtls-add-client.sh", "../../etc/evil", pki=fast_pki, mtlsctl=mtlsctl_cmd)
    assert bad.returncode == 1 and "not allowed" in bad.stderr
    again = run_script("mtls-add-client.sh", "my-iphone", "other", pki=fast_pki, mtlsctl=mtlsctl_cmd)
    assert again.returncode == 1 and "already has an active certificate" in again.stderr


def test_the_password_never_reaches_mtlsctls_argv(fast_pki, tmp_path):
    """The script hands the password over on stdin: record mtlsctl's argv and stdin."""
    log = tmp_path / "argv.log"
    fake = tmp_path / "fake-mtlsctl"
    fake.write_text(f"#!/bin/sh\necho \"ARGV: $*\" >> {log}\necho \"STDIN: $(cat)\" >> {log}\n")
    fake.chmod(0o755)
    res = run_script("mtls-add-client.sh", "dev", "Sup3r-secret", pki=fast_pki, mtlsctl=fake)
    assert res.returncode == 0
    text = log.read_text()
    assert f"ARGV: --pki-dir {fast_pki} add-client --json --password-stdin -- dev" in text
    assert "STDIN: Sup3r-secret" in text and "Sup3r-secret" not in text.split("STDIN")[0]


# ------------------------------------------------------------------ cron's PATH

CRON_PATH = "/usr/bin:/bin"


def _wrapper(path: Path, log: Path) -> Path:
    """An mtlsctl that runs this checkout and notes which copy ran."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho \"$0\" >> {log}\nPYTHONPATH={REPO} exec {sys.executable} -m mtlsctl \"$@\"\n")
    path.chmod(0o755)
    return path


def _install_script(name: str, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / name
    shutil.copy2(SCRIPTS / name, dest)
    dest.chmod(0o755)
    return dest


def cron_run(script: Path, *args: str, pki: Path, home: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """As cron runs it: an empty environment but PATH=/usr/bin:/bin and HOME."""
    return subprocess.run(["env", "-i", f"PATH={CRON_PATH}", f"HOME={home}", f"PKI_DIR={pki}", *extra, str(script), *args],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)


@pytest.fixture
def cron_home(tmp_path: Path) -> Path:
    for d in CRON_PATH.split(":"):
        if os.access(Path(d) / "mtlsctl", os.X_OK):
            pytest.skip(f"{d}/mtlsctl exists: cron's PATH finds it before the fallbacks under test")
    home = tmp_path / "home"
    home.mkdir()
    return home


def test_the_scripts_share_one_search_block():
    blocks = [re.search(r"# --- find mtlsctl.*?\n# -{20,}\n", (SCRIPTS / n).read_text(), re.S) for n in
              ("mtls-add-client.sh", "mtls-renew.sh")]
    assert all(blocks) and blocks[0].group(0) == blocks[1].group(0)  # type: ignore[union-attr]


def test_under_crons_path_mtlsctl_next_to_the_script_is_found(fast_pki, tmp_path, cron_home):
    log = tmp_path / "ran.log"
    bindir = tmp_path / "opt-bin"
    wrapper = _wrapper(bindir / "mtlsctl", log)
    add = _install_script("mtls-add-client.sh", bindir)
    renew = _install_script("mtls-renew.sh", bindir)
    res = cron_run(add, "phone", pki=fast_pki, home=cron_home)
    assert res.returncode == 0, res.stderr
    guide_password(res.stdout, fast_pki, "phone")
    set_profile(fast_pki, nginx={"test_command": "true", "reload_command": "true"})
    res = cron_run(renew, pki=fast_pki, home=cron_home)
    assert res.returncode == 0, res.stderr
    assert log.read_text().splitlines() == [str(wrapper)] * 2
    # and through a symbolic link (ln -s /opt/bin/mtls-renew.sh /usr/local/bin/): the link's target directory
    links = tmp_path / "links"
    links.mkdir()
    (links / "mtls-renew.sh").symlink_to(renew)
    res = cron_run(links / "mtls-renew.sh", pki=fast_pki, home=cron_home)
    assert res.returncode == 0, res.stderr
    assert log.read_text().splitlines() == [str(wrapper)] * 3


def test_under_crons_path_the_installing_pythons_scripts_dir_is_found(fast_pki, tmp_path, cron_home):
    """The copy of the script inside an installed mtlsctl (PREFIX/lib/pythonX.Y/site-packages/mtlsctl/_templates/
    scripts/) finds PREFIX/bin/mtlsctl, also when run through a link from elsewhere; nothing baked in."""
    log = tmp_path / "ran.log"
    prefix = tmp_path / "venv"
    wrapper = _wrapper(prefix / "bin/mtlsctl", log)
    inside = prefix / "lib/python3.11/site-packages/mtlsctl/_templates/scripts"
    add = _install_script("mtls-add-client.sh", inside)
    res = cron_run(add, "laptop", pki=fast_pki, home=cron_home)
    assert res.returncode == 0, res.stderr
    guide_password(res.stdout, fast_pki, "laptop")
    links = tmp_path / "usr-local-bin"
    links.mkdir()
    (links / "mtls-add-client.sh").symlink_to(add)
    res = cron_run(links / "mtls-add-client.sh", "tablet", pki=fast_pki, home=cron_home)
    assert res.returncode == 0, res.stderr
    guide_password(res.stdout, fast_pki, "tablet")
    assert log.read_text().splitlines() == [str(wrapper)] * 2
    # the same layout under dist-packages (Debian's system Python)
    deb = tmp_path / "usr-local"
    wrapper2 = _wrapper(deb / "bin/mtlsctl", log)
    renew = _install_script("mtls-renew.sh", deb / "lib/python3.11/dist-packages/mtlsctl/_templates/scripts")
    set_profile(fast_pki, nginx={"test_command": "true", "reload_command": "true"})
    assert cron_run(renew, pki=fast_pki, home=cron_home).returncode == 0
    assert log.read_text().splitlines()[-1] == str(wrapper2)


def test_under_crons_path_user_local_bin_is_found(fast_pki, tmp_path, cron_home):
    log = tmp_path / "ran.log"
    wrapper = _wrapper(cron_home / ".local/bin/mtlsctl", log)
    if os.access("/usr/local/bin/mtlsctl", os.X_OK):
        pytest.skip("/usr/local/bin/mtlsctl exists and comes first")
    renew = _install_script("mtls-renew.sh", tmp_path / "elsewhere")
    set_profile(fast_pki, nginx={"test_command": "true", "reload_command": "true"})
    res = cron_run(renew, pki=fast_pki, home=cron_home)
    assert res.returncode == 0, res.stderr
    assert log.read_text().splitlines() == [str(wrapper)]


def test_under_crons_path_without_mtlsctl_every_path_tried_is_named(fast_pki, tmp_path, cron_home):
    if os.access("/usr/local/bin/mtlsctl", os.X_OK):
        pytest.skip("/usr/local/bin/mtlsctl exists")
    before = tree(fast_pki)
    for name, args in (("mtls-renew.sh", ()), ("mtls-add-client.sh", ("phone",))):
        script = _install_script(name, tmp_path / "lonely")
        res = cron_run(script, *args, pki=fast_pki, home=cron_home)
        assert res.returncode == 1 and res.stdout == "", res.stdout
        first = res.stderr.splitlines()[0]
        assert first.startswith("error: mtlsctl not found; tried: $MTLSCTL (not set); mtlsctl on PATH (/usr/bin:/bin); ")
        for tried in (tmp_path / "lonely/mtlsctl", "/usr/local/bin/mtlsctl", cron_home / ".local/bin/mtlsctl"):
            assert f"; {tried}" in first, first
        assert "hint: set MTLSCTL=" in res.stderr
    assert tree(fast_pki) == before


def test_mtlsctl_set_but_not_executable_is_an_error_not_a_search(fast_pki, tmp_path, cron_home):
    log = tmp_path / "ran.log"
    _wrapper(tmp_path / "bin/mtlsctl", log)
    script = _install_script("mtls-renew.sh", tmp_path / "bin")
    res = cron_run(script, pki=fast_pki, home=cron_home, extra=(f"MTLSCTL={tmp_path / 'nope'}",))
    assert res.returncode == 1 and f"error: MTLSCTL={tmp_path / 'nope'} is not an executable file" in res.stderr
    assert not log.exists()  # the one next to the script was not used instead


def test_renew_script_on_a_guide_made_pki(tmp_path, mtls, mtlsctl_cmd):
    from .test_integration_foundation import test_a_pki_built_by_the_guides_own_commands_is_adopted as build

    build(tmp_path, mtls)
    pki = tmp_path / "guide"
    (pki / "mtls.yaml").write_text("nginx: {test_command: 'true', reload_command: 'true'}\nrenew: {within_days: 400}\n")
    res = run_script("mtls-renew.sh", pki=pki, mtlsctl=mtlsctl_cmd)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == f"Checking for expiring certificates in {pki}/certs..."  # the guide's line
    assert "Renewed iphone-jmrp" in res.stdout and "New Export Password" not in res.stdout
    assert "password in" in res.stdout
    shown = run_script("mtls-renew.sh", pki=pki, mtlsctl=mtlsctl_cmd, env={"MTLS_SHOW_PASSWORDS": "1"})
    assert shown.returncode == 0, shown.stderr
    # the guide's output, when asked: `grep 'New Export Password:' | sed 's/.*New Export Password: //'`
    [line] = [ln for ln in shown.stdout.splitlines() if "New Export Password:" in ln]
    new_password = re.fullmatch(r"\s*(?:🔑 )?New Export Password: (\S+)", line).group(1)  # type: ignore[union-attr]
    openssl("pkcs12", "-in", str(pki / "certs/iphone-jmrp.p12"), "-noout", "-passin", "stdin", input=new_password + "\n")


@pytest.mark.slow
def test_a_year_of_cron_runs_keeps_every_client_valid_and_the_crl_fresh(tmp_path, mtls, mtlsctl_cmd):
    """Short validities (clients 30 days, CRL 9 days) and faketime: mtls-renew.sh every 3 simulated days
    for a year; at every step every client verifies against the CA and the CRL, as nginx would check."""
    require_tool("faketime")
    prof = tmp_path / "p.yaml"
    log = tmp_path / "reloads.log"
    prof.write_text(
        "ca: {subject: {CN: Year CA}, key: {type: ec, curve: P-256}, days: 800}\n"
        "clients: {key: {type: ec, curve: P-256}, days: 30}\n"
        "crl: {days: 9, refresh_within_days: 4}\n"
        "renew: {within_days: 10, days: 30}\n"
        f"nginx: {{test_command: 'true', reload_command: \"sh -c 'echo r >> {log}'\"}}\n"
    )
    pki = tmp_path / "pki"
    assert mtls(["--pki-dir", str(pki), "--profile", str(prof), "init"]).code == 0
    clients = {"a": "30", "b": "20", "c": "12"}
    for name, days in clients.items():
        assert mtls(["--pki-dir", str(pki), "add-client", name, "--days", days]).code == 0
    start = datetime.now(timezone.utc) + timedelta(minutes=10)
    renewals = 0
    for day in range(0, 366, 3):
        when = (start + timedelta(days=day)).strftime("%Y-%m-%d %H:%M:%S")
        ft = ("faketime", "-f", f"@{when}")
        res = run_script("mtls-renew.sh", pki=pki, mtlsctl=mtlsctl_cmd, prefix=ft, env={"TZ": "UTC"})
        assert res.returncode == 0, (day, res.stdout, res.stderr)
        renewals += res.stdout.count("Renewed ")
        for name in clients:
            check = subprocess.run([*ft, "openssl", "verify", "-crl_check", "-CAfile", "ca/ca.crt", "-CRLfile",
                                    "crl/ca.crl", f"certs/{name}.crt"], cwd=pki, capture_output=True, text=True,
                                   env={**os.environ, "TZ": "UTC"})
            assert check.returncode == 0, (day, name, check.stdout, check.stderr)
    # ~12 renewals per client in a year of 30-day certificates, and the reloads that went with them
    assert renewals >= 30
    assert len(log.read_text().splitlines()) >= renewals // 3
