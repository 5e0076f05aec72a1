"""After a change of what nginx reads: publish it, test and reload nginx, prime the OCSP responder.

Every command that writes the CRL (revoke, replace, crl, renew) ends with `after_crl_change`. By then its
change is done and kept (index.txt and the new CRL say so), so nothing that fails here undoes it: the result
says what happened, and `AfterChange.failure()` is the error the command exits with (1), worded for that
command ("the revocation is done and kept; only the nginx reload failed: ...").

The order matters: publish first (the other nginx hosts get the CRL even when the local reload fails), then
the local nginx test and reload (nginx reads the CRL only at reload), then the OCSP responder is asked once
(its first answer after an index change is stale; see ocsp.prime).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtlsctl.errors import MtlsError, ReloadFailed
from mtlsctl.pki import Settings
from mtlsctl.publish import PublishOutcome
from mtlsctl.runner import Runner

# What a command has completed (and keeps) by the time it reloads nginx: a failed reload does not undo it.
DONE_BEFORE_RELOAD = {
    "revoke": "the revocation is done and kept (index.txt and the new CRL list it)",
    "replace": "the replacement is done and kept (new certificate issued, old one revoked, CRL regenerated)",
    "crl": "the new CRL is written and kept",
    "renew": "the renewals and the CRL are done and kept",
}
DONE_BY_DEFAULT = "what this run changed is done and kept"

# How a reload command fails on a host (or container) without systemd.
NO_SYSTEMD = ("booted with systemd", "Failed to connect to bus", "systemctl: not found", "systemctl: command not found",
              "No such file or directory: 'systemctl'")

# Which certificate the primed responder now answers "revoked" for, by command.
_PRIMED_FOR = {"replace": "the old certificate"}


@dataclass(frozen=True)
class AfterChange:
    """What happened after a writer's change: published, reloaded, primed, and the errors (none: all went well).

    `notes` are the lines for the person at the terminal, in the order things happened.
    """

    operation: str  # the command whose change this follows: revoke, replace, crl, renew
    published: PublishOutcome = PublishOutcome(False)  # ran=False: nothing changed, or no publish.command
    reloaded: bool = False
    reload_error: str | None = None  # the nginx test or reload failed (the change stands)
    primed: bool = False
    notes: list[str] = field(default_factory=list)
    metrics: str | None = None  # the profile's metrics.textfile, rewritten (renew, revoke, crl, replace)
    metrics_error: str | None = None  # why it was not (a warning: the change and nginx are not affected)

    @property
    def errors(self) -> list[str]:
        """What went wrong here, in words (publish first, then the reload)."""
        out = []
        if not self.published.ok:
            out.append(f"the publish command failed (exit {self.published.returncode}): {self.published.detail}")
        if self.reload_error:
            out.append(self.reload_error)
        return out

    def failure(self) -> ReloadFailed | None:
        """The error the command ends with (exit 1), after it has shown its result; None when all went well."""
        if not self.published.ok:
            return ReloadFailed(f"the publish command failed (exit {self.published.returncode}): {self.published.detail}"
                                + (f"; also: {self.reload_error}" if self.reload_error else ""),
                                hint="the CRL changed here but did not reach the nginx hosts; fix it and run `mtlsctl crl`")
        if self.reload_error:
            done = DONE_BEFORE_RELOAD.get(self.operation, DONE_BY_DEFAULT)
            if any(sign in self.reload_error for sign in NO_SYSTEMD):
                hint = ("this host does not run systemd: pass --no-reload and reload nginx yourself (e.g. `nginx -s reload`), "
                        "or set nginx.reload_command in the profile (e.g. \"nginx -s reload\", or \"\" to never reload)")
            else:
                hint = "fix nginx, then run `mtlsctl nginx reload` (or pass --no-reload when nginx runs elsewhere)"
            return ReloadFailed(f"{done}; only the nginx reload failed: {self.reload_error}; nginx still uses the old CRL "
                                "until it reloads", hint=hint)
        return None

    def to_json(self) -> dict[str, object]:
        """The keys every writer's --json carries: reloaded, published {ran, exit, detail}; with metrics.textfile in
        the profile, metrics {written, error}."""
        out: dict[str, object] = {"reloaded": self.reloaded, "published": self.published.to_json()}
        if self.metrics is not None or self.metrics_error is not None:
            out["metrics"] = {"written": self.metrics, "error": self.metrics_error}
        return out


def after_crl_change(settings: Settings, operation: str, *, changed: bool, reload: bool = True,
                     prime: str | None = None, runner: Runner | None = None) -> AfterChange:
    """Publish, test and reload nginx, prime OCSP, after `operation` changed the CRL (or a certificate nginx serves).

    Args:
        settings: the PKI and its profile (publish.command, nginx.test_command/reload_command, ocsp).
        operation: the command that made the change; words the failure (DONE_BEFORE_RELOAD).
        changed: whether anything changed; when not, nothing is published or reloaded.
        reload: False for --no-reload: publish still runs, nginx is left alone.
        prime: the name whose certificate the OCSP responder is asked about once (after a revocation).
        runner: runs the priming request (no CA key involved).

    Returns:
        What happened. Never raises for a failed publish or reload: those are in `errors` and `failure()`,
        because the change itself is done and kept.
    """
    notes: list[str] = []
    published = PublishOutcome(False)
    if changed and settings.profile.publish is not None:
        from mtlsctl.publish import publish

        published = publish(settings)
        if published.ok:
            notes.append(f"published: `{settings.profile.publish.command}` exited 0")
    reloaded, reload_error = False, None
    waiting = pending_reload(settings)
    if reload and (changed or waiting):
        from mtlsctl.nginx import test_and_reload

        if waiting and not changed:
            notes.append(f"retrying the nginx reload that failed earlier ({waiting})")
        try:
            outcome = test_and_reload(settings.profile.nginx)
        except MtlsError as exc:
            reload_error = exc.message
            mark_pending_reload(settings, f"{operation}: {exc.message}")
        else:
            reloaded = outcome.reloaded
            clear_pending_reload(settings)
            if not outcome.reloaded:
                notes.append(outcome.detail)
    primed = False
    if prime is not None:
        from mtlsctl import ocsp

        primed = ocsp.prime(settings, prime, runner or Runner())
        if primed:
            notes.append(f"OCSP responder primed: its next answer for {_PRIMED_FOR.get(operation, 'this certificate')} "
                         "says revoked")
    written, metrics_error = refresh_metrics(settings, operation, notes)
    return AfterChange(operation, published, reloaded, reload_error, primed, notes, written, metrics_error)


# The writers after which the profile's metrics.textfile is rewritten (renew: every run, for its last-run metric).
METRICS_AFTER = ("renew", "revoke", "crl", "replace")


def refresh_metrics(settings: Settings, operation: str, notes: list[str]) -> tuple[str | None, str | None]:
    """Rewrite the profile's metrics.textfile after `operation` (whether or not it changed anything: the last renew
    run changes every time). (path written, error); a failure is a warning in `notes`, never the command's exit."""
    if operation not in METRICS_AFTER or not settings.facts.metrics_textfile:  # facts: no pydantic when cached
        return None, None
    from mtlsctl.metrics import refresh_textfile

    try:
        path = refresh_textfile(settings)
    except (MtlsError, OSError) as exc:
        why = exc.message if isinstance(exc, MtlsError) else f"{exc.strerror or exc}"
        notes.append(f"warning: metrics.textfile {settings.facts.metrics_textfile} was not written: {why}")
        return None, why
    notes.append(f"metrics written to {path}")
    return str(path), None


# ------------------------------------------------------------------ a reload that failed is not forgotten

PENDING_RELOAD = ".mtlsctl.reload-pending"  # mtlsctl's state (never backed up): the CRL nginx has not loaded


def pending_reload(settings: Settings) -> str | None:
    """Why nginx has not loaded the current CRL (a failed reload after a change), or None.

    A failed reload leaves nginx on the old CRL, and the next `crl --if-due` (not due) would otherwise see
    nothing to do: the marker makes every later writer, `crl --if-due` included, try the reload again, and
    `doctor` report it, until a reload succeeds.
    """
    try:
        return settings.pki.path(PENDING_RELOAD).read_text(encoding="utf-8", errors="replace")[:300].strip() or "unknown"
    except FileNotFoundError:
        return None
    except OSError:
        return "the marker is unreadable"


def mark_pending_reload(settings: Settings, reason: str) -> None:
    from datetime import datetime, timezone

    from mtlsctl.files import MODE_SECRET, atomic_write

    try:
        atomic_write(settings.pki.path(PENDING_RELOAD), f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC {reason}\n", MODE_SECRET)
    except OSError:
        pass  # the failure itself is reported by the command; the marker only helps later runs


def clear_pending_reload(settings: Settings) -> None:
    import contextlib

    with contextlib.suppress(FileNotFoundError):
        settings.pki.path(PENDING_RELOAD).unlink()

