"""The errors mtlsctl raises, each with its exit code and a hint that says what to do next.

Exit codes (documented in docs/cli.md):
  0  success
  1  an operation failed (openssl, nginx, the lock, the PKI's state, or the system: permission denied,
     disk full; said with the path); nothing half-done is left
  2  bad input (name, SAN, days, password, profile, path: also a directory given for a file or a file
     for a directory, a refusal to overwrite); nothing was written
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


# --------------------------------------------------------------------------- a change done, a later step failed
# These leave the change in place (exit 1, and the message says what is kept): there is nothing to roll back.


class ReloadFailed(MtlsError):
    """The CRL change is done and kept; publishing it or reloading nginx afterwards failed (after_change)."""


class ReplaceIncomplete(MtlsError):
    """The new certificate exists, but a later step of `replace` (bundle, revocation, CRL) failed."""


class BatchFailed(MtlsError):
    """Some items of a batch (add-client --from-file) failed; the others are done and kept."""


class RenewFailed(BatchFailed):
    """Some certificates failed to renew; the others are renewed and kept."""


class DemoFailed(MtlsError):
    """The demo's nginx outcomes differ from the guide's."""


# --------------------------------------------------------------------------- OSError, in words

# The user's path is wrong (exit 2): a directory where a file was expected, a file where a directory was...
_PATH_ERRNOS = {"ENOENT", "EISDIR", "ENOTDIR", "ENAMETOOLONG", "ELOOP", "EEXIST"}
_HINTS = {
    "EACCES": "run mtlsctl as the user that owns the PKI (often root), or fix the permissions of that path",
    "EPERM": "run mtlsctl as the user that owns the PKI (often root), or fix the permissions of that path",
    "ENOSPC": "free some disk space and run the command again; what this run wrote was rolled back",
    "EDQUOT": "free some disk space (quota) and run the command again; what this run wrote was rolled back",
    "EROFS": "the file system is read-only; remount it read-write or use another directory",
    "EISDIR": "give a file name, not a directory",
    "ENOTDIR": "a part of that path is a file, not a directory; check the path",
    "ENOENT": "check the path (does the directory exist?)",
    "ELOOP": "that path is (or goes through) a symbolic link, which mtlsctl does not follow there",
    "EEXIST": "something already exists at that path; mtlsctl does not overwrite it",
}


def _errno_name(exc: OSError) -> str:
    import errno

    return errno.errorcode.get(exc.errno or 0, "")


def os_error_lines(exc: OSError) -> list[str]:
    """An OSError the core did not turn into an MtlsError: one line with the reason and the path, and a hint.

    What the failed run had written is already rolled back by its transaction by the time this prints.
    """
    reason = exc.strerror or type(exc).__name__
    where = f": {exc.filename}" if exc.filename else ""
    if exc.filename2:
        where += f" -> {exc.filename2}"
    lines = [f"error: {reason}{where}"]
    hint = _HINTS.get(_errno_name(exc))
    if hint:
        lines.append(f"hint: {hint}")
    return lines


def os_error_exit_code(exc: OSError) -> int:
    return EXIT_BAD_INPUT if _errno_name(exc) in _PATH_ERRNOS else EXIT_FAILED

