"""--pki-dir > $PKI_DIR > profile pki_dir > /etc/nginx/pki; --profile > $MTLSCTL_PROFILE > <pki>/mtls.yaml > defaults."""

from __future__ import annotations

from pathlib import Path

from mtlsctl.pki import resolve_settings


def _profile(path: Path, pki_dir: str | None = None, days: int = 365) -> Path:
    text = f"clients: {{days: {days}}}\n"
    if pki_dir:
        text += f"pki_dir: {pki_dir}\n"
    path.write_text(text)
    return path


def test_defaults_are_the_guides(tmp_path):
    s = resolve_settings(None, None, environ={})
    assert s.pki.root == Path("/etc/nginx/pki")
    assert s.profile_source == "built-in defaults"
    assert s.profile.clients.days == 365 and s.profile.ca.key_spec.bits == 4096


def test_pki_dir_order(tmp_path):
    prof = _profile(tmp_path / "p.yaml", pki_dir=str(tmp_path / "from-profile"))
    assert resolve_settings(tmp_path / "cli", prof, environ={"PKI_DIR": str(tmp_path / "env")}).pki.root == tmp_path / "cli"
    assert resolve_settings(None, prof, environ={"PKI_DIR": str(tmp_path / "env")}).pki.root == tmp_path / "env"
    assert resolve_settings(None, prof, environ={}).pki.root == tmp_path / "from-profile"


def test_relative_pki_dir_in_a_profile_is_relative_to_the_profile(tmp_path):
    (tmp_path / "site").mkdir()
    prof = _profile(tmp_path / "site" / "p.yaml", pki_dir="pki")
    assert resolve_settings(None, prof, environ={}).pki.root == tmp_path / "site" / "pki"


def test_profile_order(tmp_path):
    pki = tmp_path / "pki"
    pki.mkdir()
    _profile(pki / "mtls.yaml", days=10)
    env_prof = _profile(tmp_path / "env.yaml", days=20)
    cli_prof = _profile(tmp_path / "cli.yaml", days=30)
    assert resolve_settings(pki, cli_prof, environ={"MTLSCTL_PROFILE": str(env_prof)}).profile.clients.days == 30
    assert resolve_settings(pki, None, environ={"MTLSCTL_PROFILE": str(env_prof)}).profile.clients.days == 20
    s = resolve_settings(pki, None, environ={})
    assert s.profile.clients.days == 10 and s.profile_source == str(pki / "mtls.yaml")
    assert resolve_settings(tmp_path / "other", None, environ={}).profile.clients.days == 365


def test_cli_reads_the_environment(tmp_path, mtls, monkeypatch):
    monkeypatch.setenv("PKI_DIR", str(tmp_path / "envpki"))
    monkeypatch.setenv("MTLSCTL_PROFILE", str(_profile(tmp_path / "p.yaml", days=42)))
    res = mtls(["add-client", "x", "--dry-run"])
    assert res.code == 2 and str(tmp_path / "envpki") in res.err  # no CA there yet: it looked in $PKI_DIR


def test_version(mtls):
    from mtlsctl import __version__

    res = mtls(["--version"])
    assert res.code == 0 and res.out.strip() == f"mtlsctl {__version__}"
