"""Shared fixtures: a CLI runner, fast EC PKIs built once per session, and openssl helpers.

Integration tests use P-256 keys (fast) except where a test checks the guide's defaults.
Results are checked with openssl itself, never by re-reading mtlsctl's own output.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from mtlsctl import cli

FAST_PROFILE = """\
ca:
  subject: {CN: Test Root CA, O: mtlsctl tests}
  key: {type: ec, curve: P-256}
  days: 800
clients:
  key: {type: ec, curve: P-256}
"""


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(args: list[str], stdin: str | None = None, monkeypatch: pytest.MonkeyPatch | None = None) -> CliResult:
    """Run mtlsctl's main() in-process, as the console script would, and capture everything."""
    old_in, old_out, old_err = sys.stdin, sys.stdout, sys.stderr
    sys.stdin = io.StringIO(stdin) if stdin is not None else io.StringIO("")
    out, err = io.StringIO(), io.StringIO()
    sys.stdout, sys.stderr = out, err
    old_umask = os.umask(0o022)
    try:
        try:
            cli.main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stdin, sys.stdout, sys.stderr = old_in, old_out, old_err
        os.umask(old_umask)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def mtls():
    """Call the CLI: mtls(["--pki-dir", d, "init"], stdin=...) -> CliResult."""
    return run_cli


def openssl(*args: str, input: str | None = None, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENSSL_")}
    return subprocess.run(["openssl", *args], input=input, capture_output=True, text=True, cwd=cwd, env=env, check=check)


def x509_text(path: Path) -> str:
    return openssl("x509", "-in", str(path), "-noout", "-text").stdout


def tree(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under root with its mode and content (to prove nothing changed).

    The empty lock file `.mtlsctl.lock` is left out: taking the (shared) lock to read creates it, and it holds
    no data; everything else, the journal included, counts."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel == ".mtlsctl.lock":
            assert path.is_file() and not path.is_symlink() and path.stat().st_size == 0, "the lock file holds no data"
            continue
        if path.is_dir():
            out[rel + "/"] = (path.stat().st_mode & 0o7777, b"")
        else:
            out[rel] = (path.stat().st_mode & 0o7777, path.read_bytes())
    return out


@pytest.fixture(scope="session")
def _fast_ca_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("template")
    profile = base / "profile.yaml"
    profile.write_text(FAST_PROFILE)
    pki = base / "pki"
    res = run_cli(["--pki-dir", str(pki), "--profile", str(profile), "init"])
    assert res.code == 0, res.err
    return pki


def _copy_pki(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest, symlinks=True)
    # openssl.cnf and mtls.yaml name the directory: re-point them at the copy.
    for name in ("openssl.cnf", "mtls.yaml"):
        path = dest / name
        path.write_text(path.read_text().replace(str(template), str(dest)))
    return dest


@pytest.fixture
def fast_pki(tmp_path: Path, _fast_ca_template: Path) -> Path:
    """A fresh PKI with a P-256 CA (a copy of one made once per session by `mtlsctl init`)."""
    return _copy_pki(_fast_ca_template, tmp_path / "pki")


TWO_TIER_PROFILE = """\
ca:
  subject: {CN: Test Root CA, O: mtlsctl tests}
  key: {type: ec, curve: P-256}
  days: 800
  intermediate:
    subject: {CN: Test Issuing CA, O: mtlsctl tests}
    key: {type: ec, curve: P-256}
    days: 700
clients:
  key: {type: ec, curve: P-256}
"""


@pytest.fixture(scope="session")
def _two_tier_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("template2")
    profile = base / "profile.yaml"
    profile.write_text(TWO_TIER_PROFILE)
    pki = base / "pki"
    res = run_cli(["--pki-dir", str(pki), "--profile", str(profile), "init"])
    assert res.code == 0, res.err
    return pki


@pytest.fixture(params=["single", "two-tier"])
def tiered_pki(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A fresh PKI, once single-tier (one CA) and once two-tier (root -> issuing CA): every feature in both."""
    template = request.getfixturevalue("_fast_ca_template" if request.param == "single" else "_two_tier_template")
    return _copy_pki(template, tmp_path / "pki")


def is_two_tier(pki: Path) -> bool:
    return (pki / "ca/root.crt").exists()


def set_profile(pki: Path, **changes: dict) -> None:
    """Update sections of <pki>/mtls.yaml: set_profile(pki, crl={"days": 10})."""
    import yaml

    path = pki / "mtls.yaml"
    data = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        if data.get(section) is None:
            data[section] = {}
        data[section].update(values)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture
def reload_log(fast_pki: Path, tmp_path: Path) -> Path:
    """Point the profile's nginx test/reload commands at a log file: one line per reload."""
    log = tmp_path / "reloads.log"
    set_profile(fast_pki, nginx={"test_command": "true", "reload_command": f"sh -c 'echo reload >> {log}'"})
    return log


def reloads(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def ca_status(pki: Path, serial: str) -> str:
    """What openssl itself says of a serial: Valid, Revoked, Expired..."""
    res = openssl("ca", "-config", "openssl.cnf", "-status", serial, cwd=pki, check=False)
    return (res.stdout + res.stderr).split(f"{serial}=", 1)[-1].split()[0]


def crl_text(pki: Path) -> str:
    return openssl("crl", "-in", str(pki / "crl/ca.crl"), "-noout", "-text").stdout


def verify_crl(pki: Path, crt: str) -> str:
    res = openssl("verify", "-crl_check", "-CAfile", "ca/ca.crt", "-CRLfile", "crl/ca.crl", crt, cwd=pki, check=False)
    return (res.stdout + res.stderr).strip()
