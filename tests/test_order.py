"""The order of operations, pinned on the argv that really ran (a spy around the one runner).

renew must sign the new certificate BEFORE revoking the old one (the guide revokes first, so a
failed re-sign leaves the client with no valid certificate), and regenerate the CRL once per run.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

import pytest

from .conftest import set_profile

pytestmark = pytest.mark.integration


def _shape(argv: tuple[str, ...]) -> str:
    """A readable name for a command: 'ca -revoke', 'ca -gencrl', 'pkcs12 -export'..."""
    for flag in ("-revoke", "-gencrl", "-export", "-extensions", "-noout"):
        if flag in argv:
            return f"{argv[1]} {flag}"
    return argv[1]


def test_renew_signs_then_revokes_then_one_crl_then_bundles(fast_pki, mtls, spy):
    set_profile(fast_pki, nginx={"reload_command": ""})
    for name in ("a", "b"):
        assert mtls(["--pki-dir", str(fast_pki), "add-client", name, "--days", "2"]).code == 0
    spy.clear()
    res = mtls(["--pki-dir", str(fast_pki), "renew", "--days", "30", "--json"])
    assert res.code == 0, res.err
    shapes = [_shape(a) for a in spy]
    per_client = ["ca -extensions", "ca -revoke", "pkcs12 -export", "pkcs12 -noout"]
    # the CRL is read structurally (no `openssl crl -text`), so the only CRL command is the one -gencrl
    assert shapes == per_client + per_client + ["ca -gencrl"]
    day = f"{datetime.now(timezone.utc):%Y-%m-%d}"
    # The stored CSR is re-signed as reviewed: a per-run config (openssl.cnf + copy_extensions = none) and
    # the reviewed copy of the request, both in a private temporary directory.
    work = spy[0][3].rsplit("/", 1)[0]
    assert work.startswith("private/.sign-") and spy[0][3] == f"{work}/sign.cnf"
    assert spy[0] == ("openssl", "ca", "-config", f"{work}/sign.cnf", "-name", "CA_default", "-extensions", "mtlsctl_sign",
                      "-days", "30", "-batch", "-in", f"{work}/request.csr", "-out", "certs/a.crt")
    assert not (fast_pki / work).exists()
    assert spy[1] == ("openssl", "ca", "-config", "openssl.cnf", "-revoke", f"certs/a.crt.old.{day}",
                      "-crl_reason", "superseded")
    # the new bundle is built in a private directory with an unpredictable name, then written into place
    assert spy[2][:4] == ("openssl", "pkcs12", "-export", "-out")
    assert re.fullmatch(r"private/\.p12-[A-Za-z0-9_]+/a\.p12", spy[2][4]), spy[2][4]
    assert not any(json.loads(res.out)["renewed"][0]["password_file"] in " ".join(a) for a in spy)


def test_revoke_runs_the_guides_command_with_the_reason_then_one_crl(fast_pki, mtls, spy):
    set_profile(fast_pki, nginx={"reload_command": ""})
    assert mtls(["--pki-dir", str(fast_pki), "add-client", "lost"]).code == 0
    spy.clear()
    assert mtls(["--pki-dir", str(fast_pki), "revoke", "lost", "--reason", "keyCompromise"]).code == 0
    assert spy[0] == ("openssl", "ca", "-config", "openssl.cnf", "-revoke", "certs/lost.crt", "-crl_reason", "keyCompromise")
    assert [_shape(a) for a in spy] == ["ca -revoke", "ca -gencrl"]


def test_list_json_runs_no_openssl_at_all(fast_pki, mtls, spy):
    for name in ("a", "b", "c"):
        assert mtls(["--pki-dir", str(fast_pki), "add-client", name]).code == 0
    spy.clear()
    res = mtls(["--pki-dir", str(fast_pki), "list", "--json"])
    assert res.code == 0 and len(json.loads(res.out)) == 3
    assert spy == []


def test_renew_with_nothing_due_runs_no_openssl_at_all(fast_pki, mtls, spy):
    for name in ("a", "b", "c"):
        assert mtls(["--pki-dir", str(fast_pki), "add-client", name]).code == 0
    spy.clear()
    assert mtls(["--pki-dir", str(fast_pki), "renew", "--no-reload"]).code == 0
    assert spy == []  # index.txt and the CRL are read in Python
