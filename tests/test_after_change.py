"""after_change.after_crl_change: what every writer of the CRL does after its change (publish, nginx test and
reload, OCSP priming), as one core function whose result the commands render. The change itself is done and
kept by then: a failure here is reported in the result, never raised (the command exits 1 after its output)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mtlsctl.after_change import after_crl_change
from mtlsctl.errors import ReloadFailed
from mtlsctl.pki import resolve_settings


def settings_for(tmp_path: Path, **sections: dict):
    pki = tmp_path / "pki"
    pki.mkdir(exist_ok=True)
    profile = tmp_path / "site.yaml"
    profile.write_text(yaml.safe_dump(sections))
    return resolve_settings(pki, profile, environ={})


def recorder(tmp_path: Path, name: str, code: int = 0, say: str = "") -> tuple[str, Path]:
    """A command that appends its name to a log (the order things ran in) and exits `code`."""
    log = tmp_path / "ran.log"
    script = tmp_path / f"{name}.sh"
    script.write_text(f"#!/bin/sh\necho {name} >> {log}\n" + (f"echo '{say}' >&2\n" if say else "") + f"exit {code}\n")
    script.chmod(0o755)
    return str(script), log


def test_nothing_changed_nothing_runs(tmp_path):
    publish, log = recorder(tmp_path, "publish")
    test, _ = recorder(tmp_path, "test")
    settings = settings_for(tmp_path, publish={"command": publish}, nginx={"test_command": test, "reload_command": test})
    after = after_crl_change(settings, "crl", changed=False)
    assert not log.exists()
    assert after.published.to_json() == {"ran": False, "exit": None, "detail": ""}
    assert (after.reloaded, after.errors, after.failure(), after.notes) == (False, [], None, [])


def test_publish_first_then_test_then_reload(tmp_path):
    publish, log = recorder(tmp_path, "publish")
    test, _ = recorder(tmp_path, "test")
    reload, _ = recorder(tmp_path, "reload")
    settings = settings_for(tmp_path, publish={"command": publish}, nginx={"test_command": test, "reload_command": reload})
    after = after_crl_change(settings, "revoke", changed=True)
    assert log.read_text().split() == ["publish", "test", "reload"]
    assert after.reloaded and after.published.ok and after.failure() is None
    assert after.to_json() == {"reloaded": True, "published": {"ran": True, "exit": 0, "detail": ""}}
    assert after.notes[0] == f"published: `{publish}` exited 0"


def test_no_reload_still_publishes(tmp_path):
    publish, log = recorder(tmp_path, "publish")
    test, _ = recorder(tmp_path, "test")
    settings = settings_for(tmp_path, publish={"command": publish}, nginx={"test_command": test, "reload_command": test})
    after = after_crl_change(settings, "crl", changed=True, reload=False)
    assert log.read_text().split() == ["publish"] and not after.reloaded and after.failure() is None


@pytest.mark.parametrize("operation,done", [
    ("revoke", "the revocation is done and kept"),
    ("replace", "the replacement is done and kept"),
    ("crl", "the new CRL is written and kept"),
    ("renew", "the renewals and the CRL are done and kept"),
    ("something-else", "what this run changed is done and kept"),
])
def test_a_failed_reload_is_reported_not_raised_and_says_what_stands(tmp_path, operation, done):
    ok, _ = recorder(tmp_path, "test")
    bad, _ = recorder(tmp_path, "reload", code=1, say="reload refused")
    settings = settings_for(tmp_path, nginx={"test_command": ok, "reload_command": bad})
    after = after_crl_change(settings, operation, changed=True)  # returns: the change stands
    assert not after.reloaded and after.reload_error and after.errors == [after.reload_error]
    failure = after.failure()
    assert isinstance(failure, ReloadFailed) and failure.exit_code == 1
    assert failure.message.startswith(done) and "; only the nginx reload failed: " in failure.message
    assert "reload refused" in failure.message
    assert "nginx still uses the old CRL" in failure.message and "mtlsctl nginx reload" in (failure.hint or "")


def test_a_failed_publish_comes_first_and_names_the_reload_too(tmp_path):
    publish, log = recorder(tmp_path, "publish", code=3, say="host3 unreachable")
    bad, _ = recorder(tmp_path, "reload", code=1)
    settings = settings_for(tmp_path, publish={"command": publish}, nginx={"test_command": "", "reload_command": bad})
    after = after_crl_change(settings, "revoke", changed=True)
    assert log.read_text().split() == ["publish", "reload"]  # a failed publish does not stop the local reload
    failure = after.failure()
    assert failure is not None
    assert failure.message.startswith("the publish command failed (exit 3): host3 unreachable; also: ")
    assert "did not reach the nginx hosts" in (failure.hint or "")
    assert len(after.errors) == 2


def test_no_reload_command_is_a_note_not_an_error(tmp_path):
    settings = settings_for(tmp_path, nginx={"test_command": "", "reload_command": ""})
    after = after_crl_change(settings, "crl", changed=True)
    assert not after.reloaded and after.failure() is None
    assert after.notes == ["no reload: nginx.reload_command is empty in the profile"]


def test_without_a_responder_nothing_is_primed(tmp_path):
    settings = settings_for(tmp_path, nginx={"test_command": "", "reload_command": ""})
    assert after_crl_change(settings, "revoke", changed=True, prime="alice").primed is False
