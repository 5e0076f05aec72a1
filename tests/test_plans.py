"""Plan, then execute: for every command that changes the PKI, what `--dry-run --json` prints is exactly the
argv the real run executes (a spy around the one runner), in a single- and a two-tier PKI.

Only what cannot be known before the run is normalised: the unpredictable names of private temporary
directories (shown as XXXXXX) and the CRL's backdated dates (seconds apart).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .conftest import is_two_tier, openssl, run_cli, set_profile

pytestmark = pytest.mark.integration


def norm(argv) -> tuple[str, ...]:
    out = []
    for arg in argv:
        arg = re.sub(r"private/\.(sign|p12)-[A-Za-z0-9_]+", r"private/.\1-XXXXXX", arg)
        arg = re.sub(r"^\d{12}Z$|^\d{14}Z$", "TIME", arg)
        out.append(arg)
    return tuple(out)


def plan_then_run(pki: Path, spy: list, *args: str, stdin: str | None = None) -> tuple[dict, list]:
    """`mtlsctl ARGS --dry-run --json`, then `mtlsctl ARGS` for real; both argv lists, normalised."""
    dry = run_cli(["--pki-dir", str(pki), *args, "--dry-run", "--json"], stdin=stdin)
    assert dry.code == 0, (args, dry.out, dry.err)
    plan = json.loads(dry.out)
    assert plan["dry_run"] is True and plan["pki_dir"] == str(pki)
    spy.clear()
    real = run_cli(["--pki-dir", str(pki), *args], stdin=stdin)
    assert real.code == 0, (args, real.out, real.err)
    planned = [norm(c["argv"]) for c in plan["commands"]]
    ran = [norm(a) for a in spy if a[:2] != ("openssl", "version")]
    return plan, planned, ran


def quiet(pki: Path) -> None:
    set_profile(pki, nginx={"reload_command": "", "test_command": ""})


def test_init_plan_is_what_runs(tmp_path, spy):
    prof = tmp_path / "p.yaml"
    prof.write_text("ca: {subject: {CN: Plan CA}, key: {type: ec}}\nclients: {key: {type: ec}}\n")
    pki = tmp_path / "pki"
    dry = run_cli(["--pki-dir", str(pki), "--profile", str(prof), "init", "--dry-run", "--json"])
    assert dry.code == 0, dry.err
    plan = json.loads(dry.out)
    assert not pki.exists()
    spy.clear()
    assert run_cli(["--pki-dir", str(pki), "--profile", str(prof), "init"]).code == 0
    assert [norm(c["argv"]) for c in plan["commands"]] == [norm(a) for a in spy]


@pytest.mark.parametrize("what", ["add-client", "add-server", "export", "sign-csr", "revoke", "crl", "crl-if-due",
                                  "replace", "add-client-again"])
def test_plans_are_what_runs(tiered_pki, spy, tmp_path, what):
    pki = tiered_pki
    quiet(pki)
    args: tuple[str, ...]
    if what == "add-client":
        args = ("add-client", "phone", "--san", "email:p@example.test")
    elif what == "add-server":
        args = ("add-server", "web.example.test", "--san", "DNS:web.example.test")
    elif what == "export":
        assert run_cli(["--pki-dir", str(pki), "add-client", "phone"]).code == 0
        args = ("export", "phone", "--force", "--p12", "modern")
    elif what == "sign-csr":
        openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
                str(tmp_path / "d.key"), "-subj", "/CN=dev1", "-out", str(tmp_path / "d.csr"))
        args = ("sign-csr", str(tmp_path / "d.csr"), "--name", "dev1")
    elif what == "revoke":
        assert run_cli(["--pki-dir", str(pki), "add-client", "lost"]).code == 0
        args = ("revoke", "lost", "--reason", "keyCompromise", "--no-reload")
    elif what == "crl":
        args = ("crl", "--no-reload")
    elif what == "replace":
        assert run_cli(["--pki-dir", str(pki), "add-client", "phone"]).code == 0
        args = ("replace", "phone", "--no-reload")
    elif what == "add-client-again":  # the lost device: revoked, then issued again (old files archived)
        assert run_cli(["--pki-dir", str(pki), "add-client", "phone"]).code == 0
        assert run_cli(["--pki-dir", str(pki), "revoke", "phone", "--no-reload"]).code == 0
        args = ("add-client", "phone")
    else:
        (pki / "crl/ca.crl").unlink()  # due: no CRL at all
        args = ("crl", "--if-due", "--no-reload")
    _, planned, ran = plan_then_run(pki, spy, *args)
    assert planned and planned == ran


def test_crl_if_due_plans_nothing_when_not_due(fast_pki, spy):
    quiet(fast_pki)
    dry = run_cli(["--pki-dir", str(fast_pki), "crl", "--if-due", "--dry-run", "--json"])
    plan = json.loads(dry.out)
    assert plan["commands"] == [] and any("not due" in n for n in plan["notes"])


def test_renew_plan_is_every_step_of_every_kind(tiered_pki, spy):
    """Client (sign, revoke, bundle, read-back), server (sign, revoke), then one CRL."""
    pki = tiered_pki
    quiet(pki)
    for args in (["add-client", "phone", "--days", "3"], ["add-server", "web.example.test", "--san", "DNS:web.example.test",
                                                          "--days", "3"]):
        assert run_cli(["--pki-dir", str(pki), *args]).code == 0
    plan, planned, ran = plan_then_run(pki, spy, "renew", "--no-reload")
    assert planned == ran
    shapes = [" ".join(a[1:3]) for a in planned]
    assert shapes == ["ca -config", "ca -config", "pkcs12 -export", "pkcs12 -in",   # phone: sign, revoke old, bundle
                      "ca -config", "ca -config",                                   # server: sign, revoke old
                      "ca -config"]                                                 # the CRL, once
    assert planned[0][3].startswith("private/.sign-") and "-revoke" in planned[1] and "-gencrl" in planned[-1]


def test_crl_root_plan_is_the_roots_command(tiered_pki, spy):
    pki = tiered_pki
    quiet(pki)
    if not is_two_tier(pki):
        res = run_cli(["--pki-dir", str(pki), "crl", "--root", "--dry-run"])
        assert res.code == 2 and "no separate root" in res.err
        return
    _, planned, ran = plan_then_run(pki, spy, "crl", "--root", "--no-reload")
    assert planned == ran and "root_ca" in planned[0]


def test_only_a_servers_plan_mentions_the_chain_file(fast_pki):
    client = json.loads(run_cli(["--pki-dir", str(fast_pki), "add-client", "phone", "--dry-run", "--json"]).out)
    server = json.loads(run_cli(["--pki-dir", str(fast_pki), "add-server", "web.example.test", "--san",
                                 "DNS:web.example.test", "--dry-run", "--json"]).out)
    assert not any("fullchain" in n for n in client["notes"])
    assert any("certs/web.example.test.fullchain.pem" in n for n in server["notes"])
