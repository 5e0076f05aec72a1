"""publish.command runs after every CRL change (revoke, crl, renew), without a shell; failures are reported."""

from __future__ import annotations

import json

import pytest

from .conftest import set_profile

pytestmark = pytest.mark.integration


def test_publish_runs_after_each_crl_change(fast_pki, mtls, tmp_path):
    log = tmp_path / "published.log"
    script = tmp_path / "publish.sh"
    script.write_text(f'#!/bin/sh\necho "$1 $MTLSCTL_CRL $PKI_DIR" >> {log}\n')
    script.chmod(0o755)
    set_profile(fast_pki, nginx={"reload_command": ""}, publish={"command": f"{script} 'fleet; rm -rf /'"})
    assert mtls(["--pki-dir", str(fast_pki), "add-client", "a"]).code == 0
    assert not log.exists()  # issuing a client changes no CRL
    res = mtls(["--pki-dir", str(fast_pki), "revoke", "a", "--json"])
    assert res.code == 0 and json.loads(res.out)["published"] == {"ran": True, "exit": 0, "detail": ""}
    # argv, no shell: the quoted argument arrived whole and nothing was interpreted
    assert log.read_text().splitlines() == [f"fleet; rm -rf / {fast_pki}/crl/ca.crl {fast_pki}"]
    assert mtls(["--pki-dir", str(fast_pki), "crl"]).code == 0
    assert mtls(["--pki-dir", str(fast_pki), "crl", "--if-due"]).code == 0  # not due: nothing published
    assert mtls(["--pki-dir", str(fast_pki), "add-client", "b", "--days", "3"]).code == 0
    out = json.loads(mtls(["--pki-dir", str(fast_pki), "renew", "--json"]).out)
    assert out["published"]["ran"] is True
    assert len(log.read_text().splitlines()) == 3


def test_a_failing_publish_is_exit_1_and_says_why(fast_pki, mtls):
    set_profile(fast_pki, nginx={"reload_command": ""}, publish={"command": "sh -c 'echo host3 unreachable >&2; exit 3'"})
    assert mtls(["--pki-dir", str(fast_pki), "add-client", "a"]).code == 0
    res = mtls(["--pki-dir", str(fast_pki), "revoke", "a"])
    assert res.code == 1 and "publish command failed (exit 3): host3 unreachable" in res.err
    assert "Revoked a" in res.out  # the revocation itself stands
