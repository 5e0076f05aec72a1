"""A revocation in index.txt that the CRL does not list (a run killed between `openssl ca -revoke` and `-gencrl`,
e.g. a replace): nginx would still accept the certificate. `crl --if-due`, `revoke` (already revoked) and `renew`
all see it as due and make the CRL."""

from __future__ import annotations

import json

import pytest

from .conftest import openssl, run_cli, set_profile, verify_crl

pytestmark = pytest.mark.integration


def _revoked_but_not_listed(pki) -> str:
    set_profile(pki, nginx={"reload_command": "", "test_command": ""})
    serial = json.loads(run_cli(["--pki-dir", str(pki), "add-client", "lost", "--json"]).out)["serial"]
    openssl("ca", "-config", "openssl.cnf", "-revoke", "certs/lost.crt", cwd=pki)  # killed before -gencrl
    assert verify_crl(pki, "certs/lost.crt").endswith(": OK")  # what nginx sees: still good
    return serial


@pytest.mark.parametrize("args", [["crl", "--if-due", "--no-reload"], ["revoke", "lost", "--no-reload"],
                                  ["renew", "--no-reload"]])
def test_a_revocation_missing_from_the_crl_makes_it_due(fast_pki, args):
    _revoked_but_not_listed(fast_pki)
    res = run_cli(["--pki-dir", str(fast_pki), *args])
    assert res.code == 0, res.err
    assert "certificate revoked" in verify_crl(fast_pki, "certs/lost.crt")
    again = run_cli(["--pki-dir", str(fast_pki), "crl", "--if-due", "--no-reload", "--json"])
    assert json.loads(again.out)["regenerated"] is False  # once listed, it is not due again


def test_writers_refuse_a_pki_whose_openssl_cnf_names_another_directory(fast_pki, tmp_path):
    """`cp -a orig copy` without re-pointing: a revoke or add-client on the copy would change the original."""
    import shutil

    from .conftest import tree

    set_profile(fast_pki, nginx={"reload_command": "", "test_command": ""})
    assert run_cli(["--pki-dir", str(fast_pki), "add-client", "phone"]).code == 0
    copy = tmp_path / "copy"
    shutil.copytree(fast_pki, copy, symlinks=True)
    (copy / "mtls.yaml").write_text((copy / "mtls.yaml").read_text().replace(str(fast_pki), str(copy)))
    before = tree(fast_pki)
    for args in (["revoke", "phone", "--no-reload"], ["add-client", "laptop"], ["crl", "--no-reload"]):
        res = run_cli(["--pki-dir", str(copy), *args])
        assert res.code == 1 and "openssl.cnf's dir is" in res.err and "not " + str(copy) in res.err, res.err
    assert tree(fast_pki) == before  # the original: not one byte changed


def test_a_failed_reload_is_retried_by_the_next_run_and_reported_until_then(fast_pki, tmp_path):
    """revoke under cron whose reload fails: nginx keeps the old CRL. The next `crl --if-due` (not due) must try
    the reload again, and doctor must say so meanwhile."""
    from .conftest import reloads

    log = tmp_path / "reloads.log"
    set_profile(fast_pki, nginx={"test_command": "true", "reload_command": "false"})
    assert run_cli(["--pki-dir", str(fast_pki), "add-client", "lost"]).code == 0
    res = run_cli(["--pki-dir", str(fast_pki), "revoke", "lost"])
    assert res.code == 1 and "only the nginx reload failed" in res.err
    doc = json.loads(run_cli(["--pki-dir", str(fast_pki), "doctor", "--json"]).out)
    assert any("nginx has not loaded the current CRL" in f["message"] for f in doc["findings"])
    set_profile(fast_pki, nginx={"reload_command": f"sh -c 'echo reload >> {log}'"})
    res = run_cli(["--pki-dir", str(fast_pki), "crl", "--if-due"])
    assert res.code == 0 and reloads(log) == 1, (res.out, res.err)  # not due, but the reload is retried
    doc = json.loads(run_cli(["--pki-dir", str(fast_pki), "doctor", "--json"]).out)
    assert not any("nginx has not loaded" in f["message"] for f in doc["findings"])
    assert run_cli(["--pki-dir", str(fast_pki), "crl", "--if-due"]).code == 0 and reloads(log) == 1  # once only
