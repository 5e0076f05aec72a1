"""The fleet, proven: docs/ansible/publish-crl.yml (role mtls_publish) against two nginx "hosts" on this machine.

Each host is its own nginx (own prefix, own loopback port) serving the rendered site from its own copy of
the PKI files (web1/pki, web2/pki: per-host paths in the inventory, ansible_connection=local). The CA host is
a separate directory. One ansible-playbook run per scenario (ansible starts slowly):

- after `mtlsctl revoke` (publish.command = the playbook), BOTH hosts refuse the revoked client, a good one
  still gets 200 (single-tier and two-tier);
- a CRL file whose second CRL the root did not sign never reaches any host (checked with `openssl crl -CAfile`
  on each, not a mere parse) and the rollout stops at the first;
- a host whose nginx configuration fails stops the rollout: the second host is not touched and `revoke` exits
  1 naming the failing host.

ansible-playbook comes from the test extras (`pip install '.[test]'`): under CI=true a missing tool fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from mtlsctl.demo import LocalNginx, free_port
from mtlsctl.demo_backend import EchoHandler
from mtlsctl.nginx import render_site
from mtlsctl.pki import Pki, resolve_settings
from mtlsctl.profile import Profile
from mtlsctl.publish import publish

from .conftest import is_two_tier, openssl, require_tool, run_cli, set_profile

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
PLAYBOOK = REPO / "docs/ansible/publish-crl.yml"
HOSTS = ("web1", "web2")


def curl(pki: Path, port: int, name: str) -> int:
    ca = "ca/chain.pem" if is_two_tier(pki) else "ca/ca.crt"
    res = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "--cacert", ca,
                          "--cert", f"certs/{name}.crt", "--key", f"private/{name}.key", f"https://127.0.0.1:{port}/"],
                         cwd=pki, capture_output=True, text=True, check=False)
    return int(res.stdout or 0)


def eventually(probe, want: int, timeout: float = 5.0) -> int:  # type: ignore[no-untyped-def]
    """nginx -s reload returns before the new workers run: poll briefly."""
    deadline = time.monotonic() + timeout
    got = probe()
    while got != want and time.monotonic() < deadline:
        time.sleep(0.1)
        got = probe()
    return got


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Fleet:
    def __init__(self, ca: Path, base: Path, backend_port: int) -> None:
        self.ca = ca
        self.base = base
        self.hosts: dict[str, tuple[LocalNginx, int, Path]] = {}
        for name in HOSTS:
            local = LocalNginx(base / name)
            self.hosts[name] = (local, free_port(), base / name / "pki")
        self.backend_port = backend_port
        self.inventory = base / "hosts.ini"

    def provision(self) -> None:
        """What an admin did once per host: the PKI files the site reads, the server key, the site."""
        for local, port, dest in self.hosts.values():
            for sub in ("ca", "crl"):
                shutil.copytree(self.ca / sub, dest / sub)
            (dest / "certs").mkdir()
            (dest / "private").mkdir(mode=0o700)
            for rel in ("certs/localhost.crt", "certs/localhost.fullchain.pem", "private/localhost.key"):
                if (self.ca / rel).exists():
                    shutil.copy2(self.ca / rel, dest / rel)
            section = local.nginx_section(dest, port, self.backend_port)
            profile = Profile.model_validate({"nginx": section})
            site, _ = render_site(Pki(dest), profile.nginx)
            local.write(site)
            local.start(port)

    def stop(self) -> None:
        """SIGTERM to each master we started, then wait until it has exited (a zombie counts: this machine's
        init reaps slowly, and `nginx -s stop` would first parse a configuration a test may have broken)."""
        pids = [pid for local, _, _ in self.hosts.values() if (pid := local.master()) is not None]
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for pid in pids:
            while time.monotonic() < deadline and _running(pid):
                time.sleep(0.02)


    def write_inventory(self) -> None:
        import pwd

        user = pwd.getpwuid(os.geteuid()).pw_name
        lines = ["[nginx]"]
        for name, (local, _, dest) in self.hosts.items():
            lines.append(f"{name} mtls_pki_dest={dest} mtls_nginx_test='{local.test_command()}' "
                         f"mtls_nginx_reload='{local.reload_command()}'")
        lines += ["", "[nginx:vars]", "ansible_connection=local", f"ansible_python_interpreter={sys.executable}",
                  "ansible_become=false", "ansible_pipelining=true", f"mtls_file_owner={user}", f"mtls_file_group={os.getegid()}"]
        self.inventory.write_text("\n".join(lines) + "\n")

    def command(self, playbook: str) -> list[str]:
        return [playbook, "-i", str(self.inventory), "--forks", "2", str(PLAYBOOK)]

    def status(self, client: str) -> dict[str, int]:
        return {name: curl(self.ca, port, client) for name, (_, port, _) in self.hosts.items()}

    def site_crl(self, name: str) -> bytes:
        rel = "crl/chain.crl" if is_two_tier(self.ca) else "crl/ca.crl"
        return (self.hosts[name][2] / rel).read_bytes()


@pytest.fixture
def fleet(tiered_pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The CA host (tiered_pki: single or two-tier) with clients phone and tablet, and two nginx hosts."""
    require_tool("nginx")
    require_tool("curl")
    playbook = require_tool("ansible-playbook")
    # ansible's own state and temporary files stay in this test's directory; no ansible.cfg is read.
    (tmp_path / "ansible.cfg").write_text("")
    for var, value in {"ANSIBLE_CONFIG": str(tmp_path / "ansible.cfg"), "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
                       "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"), "ANSIBLE_REMOTE_TEMP": str(tmp_path / "ansible-rtmp"),
                       "ANSIBLE_NOCOLOR": "1", "ANSIBLE_HOST_KEY_CHECKING": "false"}.items():
        monkeypatch.setenv(var, value)
    pki = tiered_pki
    args = ["--pki-dir", str(pki)]
    assert run_cli([*args, "add-server", "localhost", "--san", "IP:127.0.0.1"]).code == 0
    for name in ("phone", "tablet"):
        assert run_cli([*args, "add-client", name]).code == 0
    backend = ThreadingHTTPServer(("127.0.0.1", free_port()), EchoHandler)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    fleet = Fleet(pki, tmp_path / "fleet", backend.server_address[1])
    try:
        fleet.provision()
        fleet.write_inventory()
        set_profile(pki, nginx={"test_command": "true", "reload_command": ""},  # the CA host runs no nginx
                    publish={"command": " ".join(fleet.command(playbook)), "timeout": 120})
        assert fleet.status("phone") == {"web1": 200, "web2": 200}
        yield fleet
    finally:
        fleet.stop()
        backend.shutdown()


def test_one_publish_makes_every_host_refuse_the_revoked_client(fleet: Fleet):
    started = time.monotonic()
    res = run_cli(["--pki-dir", str(fleet.ca), "revoke", "phone", "--json"])
    took = time.monotonic() - started
    assert res.code == 0, res.err
    assert yaml.safe_load(res.out)["published"]["exit"] == 0
    for name, (_, port, _) in fleet.hosts.items():
        assert eventually(lambda port=port: curl(fleet.ca, port, "phone"), 400) == 400, name
    assert fleet.status("tablet") == {"web1": 200, "web2": 200}
    for name in HOSTS:  # each host got exactly what the CA host's site reads
        assert fleet.site_crl(name) == (fleet.ca / ("crl/chain.crl" if is_two_tier(fleet.ca) else "crl/ca.crl")).read_bytes()
    print(f"revoke + publish to 2 hosts: {took:.1f}s")


def _foreign_crl(tmp: Path, issuer_subject: str) -> str:
    """A CRL that names `issuer_subject` as its issuer but is signed by a key that CA never had."""
    tmp.mkdir()
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "k.pem",
            "-out", "c.pem", "-subj", issuer_subject, "-days", "30", cwd=tmp)
    (tmp / "index.txt").write_text("")
    (tmp / "crlnumber").write_text("1000\n")
    (tmp / "ca.cnf").write_text("[ca]\ndefault_ca = x\n[x]\ndatabase = index.txt\ncrlnumber = crlnumber\n"
                                "default_md = sha256\ndefault_crl_days = 30\n")
    return openssl("ca", "-config", "ca.cnf", "-gencrl", "-keyfile", "k.pem", "-cert", "c.pem", cwd=tmp).stdout


@pytest.mark.parametrize("tiered_pki", ["two-tier"], indirect=True)
def test_a_crl_the_ca_did_not_sign_never_reaches_the_second_host(fleet: Fleet, tmp_path: Path):
    """crl/chain.crl with a genuine issuing-CA CRL first and a forged root CRL second: every CRL in the file is
    checked against the chain (`openssl crl -CAfile`), so it is refused on web1 and the rollout stops."""
    ca = fleet.ca
    subject = openssl("x509", "-in", "ca/root.crt", "-noout", "-subject", "-nameopt", "compat", cwd=ca).stdout
    foreign = _foreign_crl(tmp_path / "evil", subject.split("=", 1)[1].strip())
    forged = tmp_path / "forged-chain.crl"
    forged.write_text((ca / "crl/ca.crl").read_text() + foreign)
    assert openssl("crl", "-in", str(forged), "-noout", check=False).returncode == 0  # it parses: a mere parse passes it
    alone = openssl("crl", "-CAfile", "ca/chain.pem", "-noout", input=foreign, cwd=ca, check=False)
    # the root's name, another key: "verify failure" (and OpenSSL 3.0 still exits 0, so the playbook reads the words)
    assert "verify failure" in alone.stderr
    before = {name: fleet.site_crl(name) for name in HOSTS}
    env = {**os.environ, "PKI_DIR": str(ca), "MTLSCTL_SITE_CA": str(ca / "ca/chain.pem"), "MTLSCTL_SITE_CRL": str(forged),
           "ANSIBLE_DISPLAY_FAILED_STDERR": "true"}
    res = subprocess.run(fleet.command(require_tool("ansible-playbook")), env=env, cwd=ca, capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode != 0, res.stdout
    last = res.stderr.strip().splitlines()[-1]
    assert "publish stopped at host web1" in last and "CRL (ssl_crl)" in last, res.stderr
    assert "CRL 2 of 2 is not signed by a CA of" in last and "verify failure" in last, last
    assert "web2" not in res.stdout.split("PLAY RECAP", 1)[-1]  # never even contacted
    assert {name: fleet.site_crl(name) for name in HOSTS} == before  # on no host, not even as a reloaded file
    assert fleet.status("tablet") == {"web1": 200, "web2": 200}


@pytest.mark.parametrize("tiered_pki", ["single"], indirect=True)
def test_a_failing_host_stops_the_rollout_and_revoke_names_it(fleet: Fleet):
    web1, _, _ = fleet.hosts["web1"]
    site = web1.prefix / "site.conf"
    site.write_text(site.read_text() + "\nthis is not nginx;\n")  # web1's next `nginx -t` fails
    before = fleet.site_crl("web2")
    res = run_cli(["--pki-dir", str(fleet.ca), "revoke", "phone"])
    assert res.code == 1
    assert "publish command failed" in res.err and "publish stopped at host web1" in res.err, res.err
    assert "Revoked phone" in res.out  # the revocation itself stands on the CA host
    assert fleet.site_crl("web2") == before  # the rollout stopped before web2
    assert fleet.status("phone") == {"web1": 200, "web2": 200}  # neither nginx reloaded a thing
    # Repaired, the same files published again reach both: web1 reloads although its copy of the CRL did not
    # change this time (the failed run had already written it).
    site.write_text(site.read_text().replace("\nthis is not nginx;\n", "\n"))
    outcome = publish(resolve_settings(fleet.ca, None, environ={}))
    assert outcome.ok, outcome.detail
    for name, (_, port, _) in fleet.hosts.items():
        assert eventually(lambda port=port: curl(fleet.ca, port, "phone"), 400) == 400, name
    assert fleet.status("tablet") == {"web1": 200, "web2": 200}


@pytest.mark.parametrize("tiered_pki", ["single"], indirect=True)
def test_the_playbook_refuses_to_run_without_what_mtlsctl_hands_over(fleet: Fleet):
    """An older mtlsctl sets only MTLSCTL_CA/MTLSCTL_CRL (not what a two-tier site reads): stop, say why."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTLSCTL_")}
    env.update(PKI_DIR=str(fleet.ca), MTLSCTL_CA=str(fleet.ca / "ca/ca.crt"), MTLSCTL_CRL=str(fleet.ca / "crl/ca.crl"),
               ANSIBLE_DISPLAY_FAILED_STDERR="true")
    before = {name: fleet.site_crl(name) for name in HOSTS}
    res = subprocess.run(fleet.command(require_tool("ansible-playbook")), env=env, cwd=fleet.ca, capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode != 0
    assert "MTLSCTL_SITE_CA and MTLSCTL_SITE_CRL are not set" in res.stderr, res.stderr
    assert {name: fleet.site_crl(name) for name in HOSTS} == before

