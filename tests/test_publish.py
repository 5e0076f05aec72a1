"""publish.command runs after every CRL change (revoke, crl, crl --root, renew), without a shell; failures are
reported. Single-tier and two-tier: the hook is handed what the rendered site reads, one variable per file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mtlsctl.nginx import render_site
from mtlsctl.pki import resolve_settings
from mtlsctl.publish import VARIABLES

from .conftest import is_two_tier, openssl, set_profile

pytestmark = pytest.mark.integration
DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_publish_runs_after_each_crl_change(tiered_pki, mtls, tmp_path):
    log = tmp_path / "published.log"
    script = tmp_path / "publish.sh"
    script.write_text(f'#!/bin/sh\necho "$1 $MTLSCTL_CRL $PKI_DIR" >> {log}\n')
    script.chmod(0o755)
    set_profile(tiered_pki, nginx={"reload_command": ""}, publish={"command": f"{script} 'fleet; rm -rf /'"})
    assert mtls(["--pki-dir", str(tiered_pki), "add-client", "a"]).code == 0
    assert not log.exists()  # issuing a client changes no CRL
    res = mtls(["--pki-dir", str(tiered_pki), "revoke", "a", "--json"])
    assert res.code == 0 and json.loads(res.out)["published"] == {"ran": True, "exit": 0, "detail": ""}
    # argv, no shell: the quoted argument arrived whole and nothing was interpreted; MTLSCTL_CRL kept its meaning
    assert log.read_text().splitlines() == [f"fleet; rm -rf / {tiered_pki}/crl/ca.crl {tiered_pki}"]
    assert mtls(["--pki-dir", str(tiered_pki), "crl"]).code == 0
    assert mtls(["--pki-dir", str(tiered_pki), "crl", "--if-due"]).code == 0  # not due: nothing published
    assert mtls(["--pki-dir", str(tiered_pki), "add-client", "b", "--days", "3"]).code == 0
    out = json.loads(mtls(["--pki-dir", str(tiered_pki), "renew", "--json"]).out)
    assert out["published"]["ran"] is True
    assert len(log.read_text().splitlines()) == 3


def test_a_failing_publish_is_exit_1_and_says_why(tiered_pki, mtls):
    set_profile(tiered_pki, nginx={"reload_command": ""},
                publish={"command": "sh -c 'echo host3 unreachable >&2; exit 3'"})
    assert mtls(["--pki-dir", str(tiered_pki), "add-client", "a"]).code == 0
    res = mtls(["--pki-dir", str(tiered_pki), "revoke", "a"])
    assert res.code == 1 and "publish command failed (exit 3): host3 unreachable" in res.err
    assert "Revoked a" in res.out  # the revocation itself stands


@pytest.fixture
def snapshot_hook(tmp_path):
    """A hook that records its environment and copies every file it is handed, as they are when it runs."""
    out = tmp_path / "hook"
    script = tmp_path / "hook.sh"
    script.write_text(f"""#!/bin/sh
set -e
n=$(ls {out} 2>/dev/null | wc -l); d={out}/$n; mkdir -p "$d"
env > "$d/env"
for v in {' '.join(VARIABLES)}; do eval "f=\\${{$v}}"; if [ -f "$f" ]; then cp "$f" "$d/$v"; fi; done
""")
    script.chmod(0o755)

    def runs() -> list[tuple[dict[str, str], Path]]:
        found = []
        for d in sorted(out.iterdir(), key=lambda p: int(p.name)):
            env = dict(line.split("=", 1) for line in (d / "env").read_text().splitlines() if "=" in line)
            found.append((env, d))
        return found
    return script, runs


def _site_reads(pki: Path) -> tuple[str, str]:
    """ssl_client_certificate and ssl_crl of the site mtlsctl renders for this PKI."""
    settings = resolve_settings(pki, None, environ={})
    site, _ = render_site(settings.pki, settings.profile.nginx)
    return (re.search(r"^\s*ssl_client_certificate (\S+);", site, re.M).group(1),  # type: ignore[union-attr]
            re.search(r"^\s*ssl_crl (\S+);", site, re.M).group(1))  # type: ignore[union-attr]


def test_the_hook_is_handed_what_the_rendered_site_reads(tiered_pki, mtls, snapshot_hook, monkeypatch):
    monkeypatch.delenv("LC_ALL", raising=False)
    monkeypatch.delenv("ANSIBLE_DISPLAY_FAILED_STDERR", raising=False)
    monkeypatch.setenv("MTLSCTL_ROOT_CRL", "/somewhere/else.crl")  # inherited: must not reach the hook as if ours
    script, runs = snapshot_hook
    set_profile(tiered_pki, nginx={"reload_command": ""}, publish={"command": str(script)})
    for name in ("gone", "kept"):
        assert mtls(["--pki-dir", str(tiered_pki), "add-client", name]).code == 0
    assert mtls(["--pki-dir", str(tiered_pki), "revoke", "gone"]).code == 0
    [(env, got)] = runs()
    two = is_two_tier(tiered_pki)
    p = lambda rel: str(tiered_pki / rel)  # noqa: E731
    assert (env["MTLSCTL_SITE_CA"], env["MTLSCTL_SITE_CRL"]) == _site_reads(tiered_pki)
    assert {k: env.get(k) for k in VARIABLES} == {
        "PKI_DIR": str(tiered_pki),
        "MTLSCTL_SITE_CA": p("ca/chain.pem" if two else "ca/ca.crt"),
        "MTLSCTL_SITE_CRL": p("crl/chain.crl" if two else "crl/ca.crl"),
        "MTLSCTL_CA": p("ca/ca.crt"),  # the old variables keep their meaning
        "MTLSCTL_CRL": p("crl/ca.crl"),
        "MTLSCTL_CHAIN": p("ca/chain.pem") if two else "",
        "MTLSCTL_CHAIN_CRL": p("crl/chain.crl") if two else "",
        "MTLSCTL_ROOT_CA": p("ca/root.crt") if two else "",
        "MTLSCTL_ROOT_CRL": p("crl/root.crl") if two else "",
    }
    # what the hook could copy when it ran is complete and current: with -crl_check_all openssl needs a CRL for
    # every CA in the chain (as nginx does), and the revocation is in it.
    def verify(name: str) -> str:
        res = openssl("verify", "-crl_check_all", "-CAfile", str(got / "MTLSCTL_SITE_CA"), "-CRLfile",
                      str(got / "MTLSCTL_SITE_CRL"), f"certs/{name}.crt", cwd=tiered_pki, check=False)
        return res.stdout + res.stderr
    assert "certificate revoked" in verify("gone")
    assert "certs/kept.crt: OK" in verify("kept")
    # a hook is the admin's command: their locale or C.UTF-8 (ansible-playbook refuses LC_ALL=C), and ansible's
    # failed tasks on stderr, whose last line mtlsctl reports
    assert env["LC_ALL"] == "C.UTF-8" and env["ANSIBLE_DISPLAY_FAILED_STDERR"] == "true"


@pytest.mark.parametrize("tiered_pki", ["two-tier"], indirect=True)
def test_crl_root_hands_over_the_new_root_crl(tiered_pki, mtls, snapshot_hook):
    script, runs = snapshot_hook
    set_profile(tiered_pki, nginx={"reload_command": ""}, publish={"command": str(script)})
    old_root = (tiered_pki / "crl/root.crl").read_text()
    res = mtls(["--pki-dir", str(tiered_pki), "crl", "--root", "--json"])
    assert res.code == 0, res.err
    assert json.loads(res.out)["published"]["exit"] == 0
    [(env, got)] = runs()
    new_root = (got / "MTLSCTL_ROOT_CRL").read_text()
    assert env["MTLSCTL_ROOT_CRL"] == str(tiered_pki / "crl/root.crl")
    assert new_root != old_root and new_root == (tiered_pki / "crl/root.crl").read_text()
    assert new_root.strip() in (got / "MTLSCTL_SITE_CRL").read_text()  # and the chain CRL the site reads holds it
    assert openssl("crl", "-in", str(got / "MTLSCTL_ROOT_CRL"), "-CAfile", "ca/root.crt", "-noout", cwd=tiered_pki,
                   check=False).returncode == 0


def test_every_variable_is_documented():
    fleet = (DOCS / "fleet.md").read_text()
    for name, what in VARIABLES.items():
        assert f"`{name}`" in fleet, f"docs/fleet.md does not document ${name} ({what})"
