"""The drop-in scripts, end to end in a temporary PKI: same arguments, PKI_DIR, files and exit codes
as the guide's; and a year of daily-ish cron runs under faketime keeps every client valid."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from .conftest import openssl

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


def test_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (.ci/run installs it)")
    res = subprocess.run(["shellcheck", *map(str, SCRIPTS.glob("*.sh"))], capture_output=True, text=True)
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
    assert gen.returncode == 0 and "Export password: " in gen.stdout
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
    assert f"ARGV: --pki-dir {fast_pki} add-client --password-stdin -- dev" in text
    assert "STDIN: Sup3r-secret" in text and "Sup3r-secret" not in text.split("STDIN")[0]


def test_renew_script_on_a_guide_made_pki(tmp_path, mtls, mtlsctl_cmd):
    from .test_integration_foundation import test_a_pki_built_by_the_guides_own_commands_is_adopted as build

    build(tmp_path, mtls)
    pki = tmp_path / "guide"
    (pki / "mtls.yaml").write_text("nginx: {test_command: 'true', reload_command: 'true'}\nrenew: {within_days: 400}\n")
    res = run_script("mtls-renew.sh", pki=pki, mtlsctl=mtlsctl_cmd)
    assert res.returncode == 0, res.stderr
    assert "Renewed iphone-jmrp" in res.stdout and "New Export Password" not in res.stdout
    assert "password in" in res.stdout
    shown = run_script("mtls-renew.sh", pki=pki, mtlsctl=mtlsctl_cmd, env={"MTLS_SHOW_PASSWORDS": "1"})
    assert shown.returncode == 0 and "New Export Password: " in shown.stdout  # the guide's output, when asked


@pytest.mark.slow
def test_a_year_of_cron_runs_keeps_every_client_valid_and_the_crl_fresh(tmp_path, mtls, mtlsctl_cmd):
    """Short validities (clients 30 days, CRL 9 days) and faketime: mtls-renew.sh every 3 simulated days
    for a year; at every step every client verifies against the CA and the CRL, as nginx would check."""
    if shutil.which("faketime") is None:
        pytest.skip("faketime is not installed (.ci/run installs it)")
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
