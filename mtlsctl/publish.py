"""Publish: after a CRL (or chain) change, run the profile's publish.command to copy it to the nginx hosts.

One CA host, many nginx servers: the command is yours (rsync, ansible-playbook, ...); mtlsctl runs it
without a shell, with PKI_DIR, MTLSCTL_CRL and MTLSCTL_CA in its environment, and reports its exit status.
See docs/fleet.md.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from mtlsctl.pki import Settings
from mtlsctl.runner import run_hook


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


def publish(settings: Settings) -> PublishOutcome:
    conf = settings.profile.publish
    if conf is None:
        return PublishOutcome(False)
    pki = settings.pki
    env = {"PKI_DIR": str(pki.root), "MTLSCTL_CRL": str(pki.path(pki.crl)), "MTLSCTL_CA": str(pki.path(pki.ca_cert))}
    result = run_hook(shlex.split(conf.command), env, conf.timeout, cwd=pki.root)
    tail = (result.stderr or result.stdout).strip().splitlines()
    return PublishOutcome(True, result.returncode, tail[-1] if tail else "")
