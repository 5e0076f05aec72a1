"""The one place mtlsctl runs other programs (openssl, nginx, the reload command).

Rules kept here, so no caller can forget them:
- argv lists only, never a shell;
- the child's stdin is always a pipe: a secret (an export password) travels on it, and openssl can
  never stop to prompt on the user's terminal;
- the child environment is scrubbed of OPENSSL_* and SSL_CERT_* so a stray OPENSSL_CONF cannot
  change what `-config openssl.cnf` means; LC_ALL=C so messages are parseable;
- a failure becomes an OpenSSLError / ExternalCommandError carrying the command line (which never
  holds a secret), the exit code and a one-line summary of stderr.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mtlsctl.errors import ExternalCommandError, OpenSSLError, StateError

# Lines openssl prints on success that say nothing about a failure.
_NOISE_PREFIXES = (
    "Using configuration from",
    "Check that the request matches the signature",
    "Signature ok",
    "The Subject's Distinguished Name is as follows",
    "commonName",
    "Certificate is to be certified until",
    "Write out database with",
    "Database updated",
    "Enter pass phrase",
    "Enter Export Password",
    "Verifying - Enter Export Password",
)


@dataclass(frozen=True)
class Command:
    """One external command, as a person would type it in the PKI directory.

    `secret` is written to the child's stdin (openssl reads it with `-passout stdin` /
    `-passin stdin`); it is never part of `argv` and never displayed.
    """

    argv: tuple[str, ...]
    label: str = ""
    secret: str | None = field(default=None, repr=False)
    slow: bool = False
    # Secrets handed over on pipes: the token "fd:@0" in argv becomes "fd:N" for the first, and so on.
    fd_secrets: tuple[str, ...] = field(default=(), repr=False)
    # The command loads private/ca.key: when the key is encrypted, the Runner adds `-passin fd:N`.
    uses_ca_key: bool = False

    def display(self) -> str:
        """The command line, shell-quoted; says where the password goes instead of showing it."""
        line = shlex.join(self.argv).replace("fd:@", "fd:")
        return line + "   # password on stdin" if self.secret is not None else line


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


class Reporter(Protocol):
    """Receives progress: the CLI prints it on a terminal; the core never prints."""

    def step(self, label: str) -> None: ...

    def tick(self, label: str, elapsed: float) -> None: ...


class SilentReporter:
    def step(self, label: str) -> None:
        pass

    def tick(self, label: str, elapsed: float) -> None:
        pass


def child_env() -> dict[str, str]:
    """The environment for every child: ours, less anything that redirects openssl's config or trust."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("OPENSSL_") or k.startswith("SSL_CERT_"))
    }
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env["LC_ALL"] = "C"
    return env


def summarize_stderr(stderr: str) -> str:
    """Turn openssl's stderr into one line: the reasons of its error stack, else its last words.

    OpenSSL 3 error lines look like
    `40A7...:error:0480006C:PEM routines:PEM_read_bio_ex:no start line:../pem_lib.c:763:Expecting: ...`;
    the library, reason and extra data are what a person needs.
    """
    reasons: list[str] = []
    plain: list[str] = []
    for raw in stderr.splitlines():
        line = raw.strip()
        if not line or line.startswith(_NOISE_PREFIXES):
            continue
        parts = line.split(":")
        if len(parts) >= 6 and parts[1] == "error":
            reason = parts[5].strip()
            extra = ":".join(parts[8:]).strip() if len(parts) > 8 else ""
            text = f"{reason} ({extra})" if extra else reason
            if text not in reasons:
                reasons.append(text)
        else:
            plain.append(line)
    if plain:
        # openssl's own sentence ("Already revoked", "unable to load ...") reads best; add the
        # first reason from the error stack when there is one.
        text = "; ".join(plain[-2:])
        return f"{text}: {reasons[0]}" if reasons else text
    if reasons:
        return "; ".join(reasons[:3])
    return "no message on stderr"


def _pass_fds(extra: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Descriptors the child keeps: the PKI lock (see files.HELD_LOCK_FDS) and secret pipes."""
    from mtlsctl.files import HELD_LOCK_FDS

    return tuple(sorted(HELD_LOCK_FDS)) + extra


class Runner:
    """Runs Commands with a scrubbed environment in a working directory; raises on failure."""

    def __init__(self, reporter: Reporter | None = None,
                 ca_passphrase: Callable[[Path | None], str | None] | None = None) -> None:
        self.reporter: Reporter = reporter or SilentReporter()
        # Asked, with the PKI directory, when a command loads the CA key; returns None for a plain key.
        self.ca_passphrase = ca_passphrase

    def run(self, cmd: Command, cwd: Path | None = None, check: bool = True) -> Result:
        argv, secrets = list(cmd.argv), list(cmd.fd_secrets)
        if cmd.uses_ca_key and self.ca_passphrase is not None:
            passphrase = self.ca_passphrase(cwd)
            if passphrase is not None:
                argv += ["-passin", f"fd:@{len(secrets)}"]
                secrets.append(passphrase)
        if secrets:
            return self._run_with_pipes(cmd, argv, secrets, cwd, check)
        return self._run(cmd, argv, cwd, check, ())

    def _run_with_pipes(self, cmd: Command, argv: list[str], secrets: list[str], cwd: Path | None,
                        check: bool) -> Result:
        """Each secret goes down its own pipe; argv names only the descriptor (never the secret)."""
        fds = []
        try:
            for i, secret in enumerate(secrets):
                r, w = os.pipe()
                fds.append(r)
                os.write(w, (secret + "\n").encode())
                os.close(w)
                argv = [a.replace(f"fd:@{i}", f"fd:{r}") for a in argv]
            return self._run(cmd, argv, cwd, check, tuple(fds))
        finally:
            for r in fds:
                os.close(r)

    def _run(self, cmd: Command, argv: list[str], cwd: Path | None, check: bool, extra_fds: tuple[int, ...]) -> Result:
        if cmd.label:
            self.reporter.step(cmd.label)
        stdin_text = "" if cmd.secret is None else cmd.secret + "\n"
        done = threading.Event()
        ticker = None
        if cmd.slow:
            ticker = threading.Thread(target=self._tick, args=(cmd.label, done), daemon=True)
            ticker.start()
        try:
            proc = subprocess.run(
                argv,
                cwd=str(cwd) if cwd is not None else None,
                input=stdin_text,
                capture_output=True,
                text=True,
                env=child_env(),
                check=False,
                pass_fds=_pass_fds(extra_fds),
            )
        except FileNotFoundError as exc:
            raise StateError(
                f"{cmd.argv[0]} was not found on PATH",
                hint=f"install it (Debian: apt-get install {cmd.argv[0]}) or fix PATH",
            ) from exc
        finally:
            done.set()
            if ticker is not None:
                ticker.join()
        result = Result(proc.returncode, proc.stdout or "", proc.stderr or "")
        if check and result.returncode != 0:
            raise self.failure(cmd, result)
        return result

    @staticmethod
    def failure(cmd: Command, result: Result) -> Exception:
        summary = summarize_stderr(result.stderr or result.stdout)
        if cmd.argv and cmd.argv[0] == "openssl":
            return OpenSSLError(shlex.join(cmd.argv), result.returncode, summary, result.stderr)
        return ExternalCommandError(
            f"`{shlex.join(cmd.argv)}` failed (exit {result.returncode}): {summary}"
        )

    def _tick(self, label: str, done: threading.Event) -> None:
        start = time.monotonic()
        while not done.wait(1.0):
            self.reporter.tick(label, time.monotonic() - start)


def spawn(argv: Sequence[str], cwd: Path | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a long-running helper (the demo's nginx or echo backend) in its own session."""
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(list(argv), cwd=str(cwd) if cwd else None, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]


def spawn_stream(argv: Sequence[str], stdin: Any, stdout: Any, extra_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    """Start openssl on binary pipes (backup: tar -> `openssl enc` -> file, no plaintext on disk).

    stdin/stdout: a file object or descriptor, or None for a pipe; stderr is always a pipe. The child gets
    the scrubbed environment, the PKI lock descriptors held, and `extra_fds` (a passphrase pipe, `-pass fd:N`).
    Raises MtlsError when openssl is missing.
    """
    from mtlsctl.errors import MtlsError
    from mtlsctl.files import HELD_LOCK_FDS

    try:
        return subprocess.Popen(list(argv), stdin=subprocess.PIPE if stdin is None else stdin,
                                stdout=subprocess.PIPE if stdout is None else stdout, stderr=subprocess.PIPE,
                                env=child_env(), pass_fds=(*extra_fds, *sorted(HELD_LOCK_FDS)))
    except FileNotFoundError:
        raise MtlsError(f"{argv[0]} was not found on PATH", hint="install it (Debian: apt-get install openssl)") from None


# Where administrators' programs live when cron's PATH (/usr/bin:/bin) leaves them out: Debian installs nginx in
# /usr/sbin, so the profile's default `nginx -t` would otherwise fail under cron and leave nginx on an old CRL.
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def resolve_program(name: str) -> str:
    """A bare program name as found on PATH, else in the sbin directories; a path, or a name found nowhere, as given."""
    import shutil

    if os.sep in name:
        return name
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN_DIRS))
    return found or name


def run_argv(argv: Sequence[str], cwd: Path | None = None, check: bool = True) -> Result:
    """Run a non-secret command (nginx -t, a reload command) without a shell; a bare program name missing from
    PATH is looked up in the sbin directories too (cron's PATH has none of them)."""
    argv = list(argv)
    if argv:
        argv[0] = resolve_program(argv[0])
    return Runner().run(Command(tuple(argv)), cwd=cwd, check=check)


def run_hook(argv: Sequence[str], env: dict[str, str], timeout: float, cwd: Path | None = None) -> Result:
    """Run an admin's hook (publish) without a shell, with extra environment and a time limit."""
    try:
        proc = subprocess.run(list(argv), cwd=str(cwd) if cwd else None, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, env={**child_env(), **env}, timeout=timeout, check=False)
    except FileNotFoundError:
        return Result(127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return Result(124, "", f"stopped after {timeout:.0f}s")
    return Result(proc.returncode, proc.stdout or "", proc.stderr or "")
