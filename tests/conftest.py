"""Shared fixtures: a CLI runner, fast EC PKIs built once per session, and openssl helpers.

Integration tests use P-256 keys (fast) except where a test checks the guide's defaults.
Results are checked with openssl itself, never by re-reading mtlsctl's own output.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import os
import pkgutil
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

import mtlsctl
from mtlsctl import cli

FAST_PROFILE = """\
ca:
  subject: {CN: Test Root CA, O: mtlsctl tests}
  key: {type: ec, curve: P-256}
  days: 800
clients:
  key: {type: ec, curve: P-256}
"""


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(args: list[str], stdin: str | None = None, monkeypatch: pytest.MonkeyPatch | None = None) -> CliResult:
    """Run mtlsctl's main() in-process, as the console script would, and capture everything.

    Each run starts without the per-run globals a previous run left (the parsed global options, the last
    publish result), and gives back what main() changes for the process (umask, SIGTERM handler, the
    "mtlsctl" logger, whose handler writes to this run's captured stderr). A run that returns still holding a
    PKI lock or an open journal is a bug: the test fails here, at the run that leaked it."""
    reset_per_run_globals()
    held_before = held_state()
    old_in, old_out, old_err = sys.stdin, sys.stdout, sys.stderr
    out, err = io.StringIO(), io.StringIO()
    with _process_state_restored():
        sys.stdin = io.StringIO(stdin) if stdin is not None else io.StringIO("")
        sys.stdout, sys.stderr = out, err
        os.umask(0o022)
        try:
            cli.main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.stdin, sys.stdout, sys.stderr = old_in, old_out, old_err
    leaked = held_state()
    assert leaked == held_before, f"mtlsctl {' '.join(map(str, args))} returned still holding {leaked} (before: {held_before})"
    return CliResult(code, out.getvalue(), err.getvalue())


# --------------------------------------------------------------------------- tools a test needs
#
# A test that needs a tool says so with `@pytest.mark.needs("nginx", "curl")` or calls `require_tool("nginx")`.
# Locally a missing tool skips the test, with the reason in pytest's summary; under CI=true (.ci/run installs
# every one of them) it is a FAILURE: a green CI run must mean the end-to-end tests ran.


def _executable(path: str) -> str | None:
    return path if os.access(path, os.X_OK) else None


def _nginx() -> str | None:
    from mtlsctl.demo import nginx_binary  # the same lookup the tests then start nginx with

    return nginx_binary()


def _ansible_playbook() -> str | None:
    beside = Path(sys.executable).parent / "ansible-playbook"  # where `pip install '.[test]'` put it
    return str(beside) if beside.is_file() else shutil.which("ansible-playbook")


TOOLS: dict[str, tuple[Callable[[], str | None], str]] = {
    # name: (how to find it, how to get it)
    "nginx": (_nginx, "Debian: apt-get install nginx; .ci/run installs it"),
    "curl": (lambda: shutil.which("curl"), "Debian: apt-get install curl; .ci/run installs it"),
    "openssl": (lambda: shutil.which("openssl"), "Debian: apt-get install openssl; .ci/run installs it"),
    "strace": (lambda: shutil.which("strace"), "Debian: apt-get install strace; .ci/run installs it"),
    "faketime": (lambda: shutil.which("faketime"), "Debian: apt-get install faketime; .ci/run installs it"),
    "shellcheck": (lambda: shutil.which("shellcheck"), "Debian: apt-get install shellcheck; .ci/run installs it"),
    "systemd-analyze": (lambda: shutil.which("systemd-analyze") or _executable("/usr/bin/systemd-analyze"),
                        "Debian: apt-get install systemd; .ci/run installs it"),
    "ansible-playbook": (_ansible_playbook, "pip install '.[test]' installs ansible-core"),
    "git": (lambda: shutil.which("git"), "Debian: apt-get install git"),
    "promtool": (lambda: shutil.which("promtool"), "Debian: apt-get install prometheus; .ci/run installs it"),
}


def in_ci() -> bool:
    """CI=true (GitHub Actions, GitLab, .ci/run's callers): a missing tool fails instead of skipping."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def find_tool(name: str) -> str | None:
    if name not in TOOLS:
        raise ValueError(f"unknown tool {name!r}: add it to tests/conftest.py TOOLS (how to find it, how to install it)")
    return TOOLS[name][0]()


def require_tool(name: str) -> str:
    """The tool's path; a missing tool skips the test locally and FAILS it under CI=true."""
    found = find_tool(name)
    if found is not None:
        return found
    message = f"{name} is not installed ({TOOLS[name][1]})"
    if in_ci():
        pytest.fail(f"{message}; under CI=true a missing tool is a failure, not a skip", pytrace=False)
    pytest.skip(message)


def pytest_configure(config: pytest.Config) -> None:
    # mtlsctl's per-user profile cache (mtlsctl/cache.py): the suite's own, never the user's ~/.cache, so a run
    # leaves nothing behind it and no entry from an earlier checkout is read. Tests of the cache set their own.
    import tempfile

    os.environ["MTLSCTL_CACHE_DIR"] = tempfile.mkdtemp(prefix="mtlsctl-test-cache-")
    os.environ.pop("MTLSCTL_NO_CACHE", None)
    config.addinivalue_line("markers", "needs(*tools): the test runs these tools (tests/conftest.py TOOLS); "
                                       "skipped when one is missing, a failure under CI=true")


def pytest_unconfigure(config: pytest.Config) -> None:
    where = os.environ.get("MTLSCTL_CACHE_DIR", "")
    if os.path.basename(where).startswith("mtlsctl-test-cache-"):
        shutil.rmtree(where, ignore_errors=True)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs"):
        for tool in mark.args:
            require_tool(tool)


# --------------------------------------------------------------------------- process state between runs
#
# In-process CLI runs share the interpreter: module globals (the CLI's parsed options and last publish result,
# files.HELD_LOCK_FDS, the held-roots and active-journal registries, open transactions), the "mtlsctl" logger's
# handlers, the SIGTERM handler main() installs, the umask. Every mtlsctl module is imported now, before any
# test runs, and its globals are recorded: after each test every global is put back as it was (rebound, or a
# set/dict/list refilled in place), whatever module it moves to. Names only, no knowledge of the CLI's layout.

_STATE_TYPES = (type(None), bool, int, float, complex, str, bytes, tuple, frozenset, set, dict, list)
_CONTAINERS = (set, dict, list)
# What main() sets per run (the CLI is being split: whichever module holds them, by name).
PER_RUN_GLOBALS = ("_OPTIONS", "_LAST_PUBLISH", "_debug", "OPTIONS", "LAST_PUBLISH")
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
LOGGER = "mtlsctl"
_PYTEST_OWN_ENV = frozenset({"PYTEST_CURRENT_TEST"})


def _import_every_mtlsctl_module() -> None:
    for info in pkgutil.walk_packages(mtlsctl.__path__, "mtlsctl.", onerror=lambda name: None):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue
        with contextlib.suppress(Exception):  # a module half-way through a refactor: its own tests will say so
            importlib.import_module(info.name)


def _mtlsctl_modules() -> dict[str, ModuleType]:
    return {name: mod for name, mod in list(sys.modules.items())
            if mod is not None and (name == "mtlsctl" or name.startswith("mtlsctl."))}


def _globals_of(mod: ModuleType) -> dict[str, tuple[object, object]]:
    """name -> (the object, a copy of its contents for a set/dict/list)."""
    out = {}
    for name, value in vars(mod).items():
        if name.startswith("__") or not isinstance(value, _STATE_TYPES):
            continue
        out[name] = (value, copy.copy(value) if isinstance(value, _CONTAINERS) else None)
    return out


_import_every_mtlsctl_module()
_BASELINE: dict[str, dict[str, tuple[object, object]]] = {name: _globals_of(mod) for name, mod in _mtlsctl_modules().items()}


def _restore_globals(only: tuple[str, ...] | None = None) -> list[str]:
    """Put every recorded global back (or only the names in `only`); returns what had changed."""
    changed = []
    for modname, mod in _mtlsctl_modules().items():
        base = _BASELINE.get(modname)
        if base is None:  # imported for the first time by this test: its state from now on is the baseline
            _BASELINE[modname] = _globals_of(mod)
            continue
        current = vars(mod)
        for name, (value, contents) in base.items():
            if only is not None and name not in only:
                continue
            now = current.get(name, _MISSING)
            if now is not value:
                setattr(mod, name, value)
                changed.append(f"{modname}.{name}")
            if isinstance(value, _CONTAINERS) and value != contents:
                if isinstance(value, list):
                    value[:] = contents  # type: ignore[index]
                else:
                    value.clear()
                    value.update(contents)  # type: ignore[attr-defined]
                changed.append(f"{modname}.{name}")
        if only is None:
            for name in [n for n, v in current.items() if n not in base and not n.startswith("__")
                         and isinstance(v, _STATE_TYPES)]:
                delattr(mod, name)  # a global created at run time
                changed.append(f"{modname}.{name}")
    return changed


_MISSING = object()


def reset_per_run_globals() -> None:
    """The globals main() sets for one run (parsed options, last publish result, --debug), as at import."""
    _restore_globals(PER_RUN_GLOBALS)


def _files_registry(name: str) -> object:
    files = sys.modules.get("mtlsctl.files")
    return getattr(files, name, None) if files is not None else None


def _lock_fds_open() -> list[str]:
    """Descriptors of this process open on a PKI lock file, whether or not a registry knows them."""
    found = []
    with contextlib.suppress(OSError):
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.endswith("/.mtlsctl.lock"):
                    found.append(f"fd {fd} -> {target}")
    return found


def held_state() -> dict[str, list[str]]:
    """Locks and journals this process holds (empty lists when none): the PKI lock descriptors
    (files.HELD_LOCK_FDS and any descriptor open on a .mtlsctl.lock), the roots it holds locked, the
    journals of its open transactions, and transactions still inside their `with` block."""
    state: dict[str, list[str]] = {}
    for key, name in (("lock_fds", "HELD_LOCK_FDS"), ("held_roots", "_HELD_ROOTS"), ("journals", "_ACTIVE_JOURNALS"),
                      ("open_transactions", "_OPEN")):
        value = _files_registry(name)
        state[key] = sorted(map(str, value)) if value else []
    state["lock_files_open"] = _lock_fds_open()
    return {k: v for k, v in state.items() if v}


@dataclass
class _Saved:
    umask: int
    handlers: dict[int, object]
    logger: tuple[list[logging.Handler], int, bool, bool, list[logging.Filter]]
    cwd: str
    environ: dict[str, str]


def _save_process_state() -> _Saved:
    umask = os.umask(0o022)
    os.umask(umask)
    log = logging.getLogger(LOGGER)
    return _Saved(umask, {s: signal.getsignal(s) for s in _SIGNALS},
                  (list(log.handlers), log.level, log.propagate, log.disabled, list(log.filters)),
                  os.getcwd(), dict(os.environ))


def _restore_process_state(saved: _Saved, *, environ: bool = True) -> None:
    os.umask(saved.umask)
    for sig, handler in saved.handlers.items():
        if signal.getsignal(sig) is not handler and handler is not None:
            signal.signal(sig, handler)  # type: ignore[arg-type]
    log = logging.getLogger(LOGGER)
    handlers, level, propagate, disabled, filters = saved.logger
    log.handlers[:] = handlers
    log.setLevel(level)
    log.propagate, log.disabled = propagate, disabled
    log.filters[:] = filters
    if os.getcwd() != saved.cwd:
        os.chdir(saved.cwd)
    if environ:
        now = {k: v for k, v in os.environ.items() if k not in _PYTEST_OWN_ENV}
        want = {k: v for k, v in saved.environ.items() if k not in _PYTEST_OWN_ENV}
        for key in now.keys() - want.keys():
            del os.environ[key]
        os.environ.update({k: v for k, v in want.items() if now.get(k) != v})


@contextlib.contextmanager
def _process_state_restored() -> Iterator[None]:
    """What main() changes for the whole process, given back after one in-process run (not the environment:
    a test's monkeypatch.setenv must outlive the run)."""
    saved = _save_process_state()
    try:
        yield
    finally:
        _restore_process_state(saved, environ=False)


def _release_leaked_locks() -> None:
    fds = _files_registry("HELD_LOCK_FDS")
    for fd in list(fds or ()):  # type: ignore[union-attr]
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").endswith("/.mtlsctl.lock"):
                os.close(fd)  # closing the descriptor releases the flock
    for name in ("HELD_LOCK_FDS", "_HELD_ROOTS", "_ACTIVE_JOURNALS", "_OPEN"):
        registry = _files_registry(name)
        if registry is not None:
            registry.clear()  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def _fresh_process_state() -> Iterator[None]:
    """Every test starts with mtlsctl's process state as at import, and must end holding no PKI lock and no
    journal (checked after the test's own fixtures, monkeypatch included, are torn down)."""
    _release_leaked_locks()
    _restore_globals()
    saved = _save_process_state()
    yield
    leaked = held_state()
    _release_leaked_locks()
    _restore_globals()
    _restore_process_state(saved)
    if leaked:
        pytest.fail(f"the test left this process holding PKI locks or journals: {leaked}", pytrace=False)


@pytest.fixture
def mtls():
    """Call the CLI: mtls(["--pki-dir", d, "init"], stdin=...) -> CliResult."""
    return run_cli


def openssl(*args: str, input: str | None = None, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENSSL_")}
    return subprocess.run(["openssl", *args], input=input, capture_output=True, text=True, cwd=cwd, env=env, check=check)


def x509_text(path: Path) -> str:
    return openssl("x509", "-in", str(path), "-noout", "-text").stdout


def tree(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under root with its mode and content (to prove nothing changed).

    The empty lock file `.mtlsctl.lock` is left out: taking the (shared) lock to read creates it, and it holds
    no data; so is `.mtlsctl.renew-last` (every renew run, a failed one too, is remembered for `metrics`). A failed
    attempt appends its "failed" line to audit.log: those lines are left out, so an "ok" line after a failure
    still shows. Everything else, the journal included, counts."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel == ".mtlsctl.lock":
            assert path.is_file() and not path.is_symlink() and path.stat().st_size == 0, "the lock file holds no data"
            continue
        if rel == ".mtlsctl.renew-last":
            continue
        if rel == "audit.log" and path.is_file() and not path.is_symlink():
            kept = [line for line in path.read_bytes().splitlines(True) if b'"result":"failed"' not in line]
            if kept:  # a log holding only "failed" lines counts as no log: a failed first change may create it
                out[rel] = (path.stat().st_mode & 0o7777, b"".join(kept))
            continue
        if path.is_dir():
            out[rel + "/"] = (path.stat().st_mode & 0o7777, b"")
        else:
            out[rel] = (path.stat().st_mode & 0o7777, path.read_bytes())
    return out


@pytest.fixture(scope="session")
def _fast_ca_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("template")
    profile = base / "profile.yaml"
    profile.write_text(FAST_PROFILE)
    pki = base / "pki"
    res = run_cli(["--pki-dir", str(pki), "--profile", str(profile), "init"])
    assert res.code == 0, res.err
    return pki


def _copy_pki(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest, symlinks=True)
    # openssl.cnf and mtls.yaml name the directory: re-point them at the copy.
    for name in ("openssl.cnf", "mtls.yaml"):
        path = dest / name
        path.write_text(path.read_text().replace(str(template), str(dest)))
    return dest


@pytest.fixture
def fast_pki(tmp_path: Path, _fast_ca_template: Path) -> Path:
    """A fresh PKI with a P-256 CA (a copy of one made once per session by `mtlsctl init`)."""
    return _copy_pki(_fast_ca_template, tmp_path / "pki")


TWO_TIER_PROFILE = """\
ca:
  subject: {CN: Test Root CA, O: mtlsctl tests}
  key: {type: ec, curve: P-256}
  days: 800
  intermediate:
    subject: {CN: Test Issuing CA, O: mtlsctl tests}
    key: {type: ec, curve: P-256}
    days: 700
clients:
  key: {type: ec, curve: P-256}
"""


@pytest.fixture(scope="session")
def _two_tier_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("template2")
    profile = base / "profile.yaml"
    profile.write_text(TWO_TIER_PROFILE)
    pki = base / "pki"
    res = run_cli(["--pki-dir", str(pki), "--profile", str(profile), "init"])
    assert res.code == 0, res.err
    return pki


@pytest.fixture(params=["single", "two-tier"])
def tiered_pki(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A fresh PKI, once single-tier (one CA) and once two-tier (root -> issuing CA): every feature in both."""
    template = request.getfixturevalue("_fast_ca_template" if request.param == "single" else "_two_tier_template")
    return _copy_pki(template, tmp_path / "pki")


def is_two_tier(pki: Path) -> bool:
    return (pki / "ca/root.crt").exists()


def set_profile(pki: Path, **changes: dict) -> None:
    """Update sections of <pki>/mtls.yaml: set_profile(pki, crl={"days": 10})."""
    import yaml

    path = pki / "mtls.yaml"
    data = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        if data.get(section) is None:
            data[section] = {}
        data[section].update(values)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture
def reload_log(fast_pki: Path, tmp_path: Path) -> Path:
    """Point the profile's nginx test/reload commands at a log file: one line per reload."""
    log = tmp_path / "reloads.log"
    set_profile(fast_pki, nginx={"test_command": "true", "reload_command": f"sh -c 'echo reload >> {log}'"})
    return log


def reloads(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def ca_status(pki: Path, serial: str) -> str:
    """What openssl itself says of a serial: Valid, Revoked, Expired..."""
    res = openssl("ca", "-config", "openssl.cnf", "-status", serial, cwd=pki, check=False)
    return (res.stdout + res.stderr).split(f"{serial}=", 1)[-1].split()[0]


def crl_text(pki: Path) -> str:
    return openssl("crl", "-in", str(pki / "crl/ca.crl"), "-noout", "-text").stdout


def verify_crl(pki: Path, crt: str) -> str:
    res = openssl("verify", "-crl_check", "-CAfile", "ca/ca.crt", "-CRLfile", "crl/ca.crl", crt, cwd=pki, check=False)
    return (res.stdout + res.stderr).strip()


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Every argv the one runner runs, in order (Runner.run wrapped): what a command really executed."""
    from mtlsctl.runner import Runner

    calls: list[tuple[str, ...]] = []
    real = Runner.run

    def run(self, cmd, cwd=None, check=True):  # type: ignore[no-untyped-def]
        calls.append(tuple(cmd.argv))
        return real(self, cmd, cwd=cwd, check=check)

    monkeypatch.setattr(Runner, "run", run)
    return calls

