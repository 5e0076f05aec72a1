"""Publish: after a CRL (or chain) change, run the profile's publish.command to copy it to the nginx hosts.

One CA host, many nginx servers: the command is yours (rsync, ansible-playbook, ...); mtlsctl runs it
without a shell, with one environment variable per file (see `hook_environment` and docs/fleet.md), and
reports its exit status. The files a rendered site reads differ with the layout: one CA reads
ca/ca.crt and crl/ca.crl; a two-tier PKI reads ca/chain.pem and crl/chain.crl (nginx needs a CRL for every
CA in the chain), so a hook should copy $MTLSCTL_SITE_CA and $MTLSCTL_SITE_CRL.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

from mtlsctl.pki import Settings
from mtlsctl.runner import run_hook

# Every variable the hook gets: name -> what it holds (docs/fleet.md lists the same; tests/test_publish.py checks both).
VARIABLES = {
    "PKI_DIR": "the PKI directory on the CA host",
    "MTLSCTL_SITE_CA": "what the rendered site's ssl_client_certificate reads: ca/chain.pem (two-tier) or ca/ca.crt",
    "MTLSCTL_SITE_CRL": "what the rendered site's ssl_crl reads: crl/chain.crl (two-tier) or crl/ca.crl",
    "MTLSCTL_CA": "ca/ca.crt: the CA that signs clients (the issuing CA in a two-tier PKI)",
    "MTLSCTL_CRL": "crl/ca.crl: that CA's CRL",
    "MTLSCTL_CHAIN": "ca/chain.pem: issuing CA + root (two-tier; empty otherwise)",
    "MTLSCTL_CHAIN_CRL": "crl/chain.crl: the issuing CA's CRL + the root's (two-tier; empty otherwise)",
    "MTLSCTL_ROOT_CA": "ca/root.crt: the root (two-tier; empty otherwise)",
    "MTLSCTL_ROOT_CRL": "crl/root.crl: the root's CRL, new after `crl --root` (two-tier; empty otherwise)",
}


@dataclass(frozen=True)
class PublishOutcome:
    ran: bool
    returncode: int | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return not self.ran or self.returncode == 0

    def to_json(self) -> dict[str, object]:
        return {"ran": self.ran, "exit": self.returncode, "detail": self.detail}


def hook_environment(settings: Settings) -> dict[str, str]:
    """One absolute path per variable (VARIABLES). The two-tier ones are set to "" for one CA, so that
    nothing inherited from mtlsctl's own environment can stand in for them."""
    pki = settings.pki
    two_tier = pki.has_chain()

    def path(rel: str, wanted: bool = True) -> str:
        return str(pki.path(rel)) if wanted else ""

    return {
        "PKI_DIR": str(pki.root),
        "MTLSCTL_SITE_CA": path(pki.ca_bundle),
        "MTLSCTL_SITE_CRL": path(pki.crl_bundle),
        "MTLSCTL_CA": path(pki.ca_cert),
        "MTLSCTL_CRL": path(pki.crl),
        "MTLSCTL_CHAIN": path(pki.chain, two_tier),
        "MTLSCTL_CHAIN_CRL": path(pki.chain_crl, two_tier),
        "MTLSCTL_ROOT_CA": path(pki.root_cert, two_tier),
        "MTLSCTL_ROOT_CRL": path(pki.root_crl, two_tier),
    }


def _detail(stdout: str, stderr: str) -> str:
    """The hook's last words: the last non-empty line of stderr, else of stdout."""
    for stream in (stderr, stdout):
        lines = [line.strip() for line in stream.splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return ""


def publish(settings: Settings) -> PublishOutcome:
    conf = settings.profile.publish
    if conf is None:
        return PublishOutcome(False)
    pki = settings.pki
    env = hook_environment(settings)
    # ansible-playbook prints a failed task ("fatal: [web2]: FAILED! => ...") on stdout unless told otherwise;
    # on stderr it is the last line, which mtlsctl reports: the failing host is named (docs/fleet.md).
    if "ANSIBLE_DISPLAY_FAILED_STDERR" not in os.environ:
        env["ANSIBLE_DISPLAY_FAILED_STDERR"] = "true"
    # openssl children run with LC_ALL=C; the admin's hook gets the admin's locale, or C.UTF-8: ansible-playbook
    # refuses to start at all under LC_ALL=C ("Ansible requires the locale encoding to be UTF-8").
    env["LC_ALL"] = os.environ.get("LC_ALL") or "C.UTF-8"
    result = run_hook(shlex.split(conf.command), env, conf.timeout, cwd=pki.root)
    return PublishOutcome(True, result.returncode, _detail(result.stdout, result.stderr))
