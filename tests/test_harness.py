"""The test harness itself (tests/conftest.py): a missing tool fails under CI=true, and in-process CLI runs share no
process state (module globals, PKI locks and journals, the logger, the SIGTERM handler, the umask)."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mtlsctl import files

from . import conftest
from .conftest import TOOLS, held_state, require_tool, run_cli

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- tools


@pytest.fixture
def no_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATH on which nothing is found."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def outcome(tool: str) -> tuple[str, str]:
    """What require_tool(tool) does: ("failed" | "skipped" | "found", message). A skip is caught here, not let
    through: a skip escaping a test would mark it skipped, which is the very thing under test."""
    try:
        found = require_tool(tool)
    except pytest.fail.Exception as exc:
        return "failed", str(exc)
    except pytest.skip.Exception as exc:
        return "skipped", str(exc)
    return "found", found


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
def test_a_missing_tool_is_a_failure_under_ci(no_tools, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    what, message = outcome("curl")
    assert what == "failed", (what, message)
    assert re.match(r"curl is not installed .*; under CI=true a missing tool is a failure, not a skip", message), message


@pytest.mark.parametrize("ci", [None, "", "false"])
def test_a_missing_tool_is_a_skip_with_its_reason_locally(no_tools, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    what, message = outcome("shellcheck")
    assert what == "skipped", (what, message)
    assert message.startswith("shellcheck is not installed (Debian: apt-get install shellcheck"), message


def test_a_tool_that_is_there_is_returned(monkeypatch):
    monkeypatch.setenv("CI", "true")
    what, found = outcome("openssl")
    assert what == "found" and Path(found).name == "openssl"


def test_an_unknown_tool_is_a_mistake_in_the_test():
    with pytest.raises(ValueError, match="unknown tool 'nmap'"):
        require_tool("nmap")


def test_every_tool_ci_installs_is_one_the_helper_knows():
    """.ci/run installs what the end-to-end tests need; each of those is a tool the helper checks."""
    installed = set(re.findall(r"command -v (\S+) ", (REPO / ".ci/run").read_text()))
    assert installed, "no `command -v TOOL` in .ci/run"
    assert installed <= set(TOOLS), installed - set(TOOLS)
    assert {"nginx", "curl", "strace", "faketime", "shellcheck", "systemd-analyze", "ansible-playbook", "openssl"} <= set(TOOLS)


def test_no_test_skips_for_a_missing_tool_by_itself():
    """Every test that needs a tool goes through require_tool / @pytest.mark.needs: a skip written by hand would
    be green under CI when the tool is missing."""
    offenders = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"skipif\(.*(which|binary|access)\(|skip\(.*not installed", line):
                offenders.append(f"{path.name}:{lineno}: {line.strip()}")
    assert offenders == []


PROBE = '''
import pytest
from mtlsctl import files


@pytest.mark.needs("curl")
def test_needs_curl():
    pass


KEPT = []


def test_leaves_the_lock_held(tmp_path):
    (tmp_path / "index.txt").write_text("")
    KEPT.append(files.pki_lock(tmp_path / ".mtlsctl.lock"))
    KEPT[-1].__enter__()  # never left: the harness must say so
'''


def _probe(tmp_path: Path, test: str, env: dict[str, str]) -> str:
    """Run one test of PROBE in a child pytest with tests/conftest.py as a plugin; its summary line."""
    probe = tmp_path / "probe" / "test_probe.py"
    probe.parent.mkdir(exist_ok=True)
    probe.write_text(PROBE)
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-o", "addopts=",
                          "--rootdir", str(probe.parent), "-q", f"{probe}::{test}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    return res.stdout.strip().splitlines()[-1]


def test_the_needs_marker_skips_locally_and_fails_under_ci(tmp_path, no_tools):
    empty = os.environ["PATH"]
    base = {k: v for k, v in os.environ.items() if k != "CI"}
    assert "1 skipped" in _probe(tmp_path, "test_needs_curl", {**base, "PATH": empty})
    summary = _probe(tmp_path, "test_needs_curl", {**base, "PATH": empty, "CI": "true"})
    assert "1 error" in summary and "skipped" not in summary, summary


def test_a_test_that_leaves_a_lock_held_fails(tmp_path):
    summary = _probe(tmp_path, "test_leaves_the_lock_held", dict(os.environ))
    assert "1 passed, 1 error" in summary, summary  # the test body passed; the harness's teardown failed it


# --------------------------------------------------------------------------- process state


def test_a_run_gives_back_the_umask_the_sigterm_handler_and_the_logger(fast_pki):
    log = logging.getLogger("mtlsctl")
    before = (os.umask(0o027), signal.getsignal(signal.SIGTERM), list(log.handlers), log.propagate)
    try:
        res = run_cli(["--pki-dir", str(fast_pki), "list"])
        assert res.code == 0, res.err
        now = os.umask(0o022)
        os.umask(now)
        assert now == 0o027  # main() sets 077 for its run; the test's own umask is back
        assert (signal.getsignal(signal.SIGTERM), list(log.handlers), log.propagate) == before[1:]
    finally:
        os.umask(before[0])


def test_a_run_that_returns_holding_a_lock_is_caught_at_that_run(fast_pki, monkeypatch):
    kept = []

    def leaky_main(args):
        kept.append(files.pki_lock(fast_pki / ".mtlsctl.lock"))
        kept[-1].__enter__()  # never left (kept referenced: a collected generator would release it)
        raise SystemExit(0)

    monkeypatch.setattr(conftest.cli, "main", leaky_main)
    with pytest.raises(AssertionError, match="returned still holding"):
        run_cli(["list"])
    assert held_state()["lock_fds"]
    kept[-1].__exit__(None, None, None)
    assert held_state() == {}


def test_globals_are_put_back_as_at_import():
    """Rebound scalars, refilled containers and globals created at run time: all as before."""
    umask, held = files.PRIVATE_UMASK, files.HELD_LOCK_FDS
    files.PRIVATE_UMASK = 0o022
    files.HELD_ROOTS_EXTRA = {"x"}  # a global created at run time
    files._HELD_ROOTS[Path("/nowhere")] = "exclusive"
    changed = conftest._restore_globals()
    assert {"mtlsctl.files.PRIVATE_UMASK", "mtlsctl.files.HELD_ROOTS_EXTRA", "mtlsctl.files._HELD_ROOTS"} <= set(changed)
    assert files.PRIVATE_UMASK == umask and files.HELD_LOCK_FDS is held and files._HELD_ROOTS == {}
    assert not hasattr(files, "HELD_ROOTS_EXTRA")

