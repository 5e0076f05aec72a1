"""The errors mtlsctl raises, each with its exit code and a hint that says what to do next.

Exit codes (documented in docs/cli.md):
  0  success
  1  an operation failed (openssl, nginx, the lock, the PKI's state); nothing half-done is left
  2  bad input (name, SAN, days, password, profile, path, a refusal to overwrite); nothing was written
  3  internal error (a bug in mtlsctl: please report it; --debug shows the traceback)
  130 interrupted (Ctrl-C / SIGTERM); what the run had written is rolled back
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


class MtlsError(Exception):
    """Base class: a message for the user and an optional hint (what to do about it)."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def lines(self) -> list[str]:
        """The lines the CLI prints for this error (message first, then the hint)."""
        out = [f"error: {self.message}"]
        if self.hint:
            out.append(f"hint: {self.hint}")
        return out


class InputError(MtlsError):
    """Bad input from the user: refused before anything is written (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class ProfileError(InputError):
    """The YAML profile is unreadable or invalid; `problems` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            f"invalid profile {source}: " + "; ".join(problems) if len(problems) == 1
            else f"invalid profile {source} ({len(problems)} problems)",
            hint=None,
        )
        self.source = source

    def lines(self) -> list[str]:
        if len(self.problems) == 1:
            return [f"error: invalid profile {self.source}: {self.problems[0]}"]
        return [f"error: invalid profile {self.source}:"] + [f"  {p}" for p in self.problems]


class StateError(MtlsError):
    """The PKI on disk is not in the state the operation needs (missing CA, broken database)."""


class LockError(MtlsError):
    """Another mtlsctl process holds the PKI lock for longer than we were willing to wait."""


class OpenSSLError(MtlsError):
    """The openssl binary failed; carries the command (no secrets: they never are on argv)."""

    def __init__(self, command: str, returncode: int, summary: str, stderr: str = "") -> None:
        self.command = command
        self.returncode = returncode
        self.summary = summary
        self.stderr = stderr
        super().__init__(f"{command.split(' -', 1)[0]} failed (exit {returncode}): {summary}")


class ExternalCommandError(MtlsError):
    """A non-openssl program (nginx -t, systemctl reload) failed."""
