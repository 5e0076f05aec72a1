"""nginx: test the configuration, then reload (nginx reads the CRL only at start or reload)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from mtlsctl.errors import ExternalCommandError
from mtlsctl.profile import NginxProfile
from mtlsctl.runner import run_argv


@dataclass(frozen=True)
class ReloadOutcome:
    reloaded: bool
    detail: str  # what happened, in words


def test_and_reload(nginx: NginxProfile) -> ReloadOutcome:
    """Run the test command; reload only when it passes.

    Raises:
        ExternalCommandError: the test failed (nothing reloaded) or the reload failed.
    """
    if not nginx.reload_command:
        return ReloadOutcome(False, "no reload: nginx.reload_command is empty in the profile")
    if nginx.test_command:
        result = run_argv(shlex.split(nginx.test_command), check=False)
        if result.returncode != 0:
            last = (result.stderr or result.stdout).strip().splitlines()
            raise ExternalCommandError(
                f"`{nginx.test_command}` failed, so nginx was not reloaded: {last[-1] if last else 'no output'}",
                hint="fix the nginx configuration, then run the reload command yourself",
            )
    run_argv(shlex.split(nginx.reload_command))
    return ReloadOutcome(True, f"ran `{nginx.reload_command}`")
