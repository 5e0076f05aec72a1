"""What a command gets from its click context: the global options of this run, the PKI's settings, a Runner.

`main()` makes one CliState per run and hands it to click (`obj=`); the global callback fills it in; each
command reads it from its context. Nothing is kept in module globals, so two runs in one process (the tests,
gen_docs) share nothing.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mtlsctl import _click as click
from mtlsctl.cli import io

if TYPE_CHECKING:
    from mtlsctl.pki import Settings
    from mtlsctl.runner import Runner


@dataclass
class CliState:
    """The global options of one run (the callback fills them in), and the CA passphrase once it is read."""

    pki_dir: Path | None = None
    profile: Path | None = None
    debug: bool = False
    ca_passphrase_file: Path | None = None
    ca_passphrase_fd: int | None = None
    _ca_passphrase: str | None = field(default=None, repr=False)

    def ca_passphrase(self, confirm: bool = False) -> str:
        """The CA key passphrase: --ca-passphrase-file, --ca-passphrase-fd, or asked once on the terminal."""
        if self._ca_passphrase is None:
            value = io.read_passphrase(self.ca_passphrase_file, self.ca_passphrase_fd, prompt=True, confirm=confirm,
                                       what="CA key passphrase", option="--ca-passphrase-file FILE or --ca-passphrase-fd N")
            assert value is not None
            self._ca_passphrase = value
        return self._ca_passphrase


def run_state(ctx: click.Context) -> CliState:
    """This run's global options (a fresh, empty CliState when the app runs without main(), e.g. gen_docs)."""
    return ctx.find_root().ensure_object(CliState)


def load_settings(ctx: click.Context, recover: bool = True) -> Settings:
    """The PKI directory and profile, resolved from the global options (their order: docs/profile.md).
    First rolls back what a killed run left (its journal), unless `recover` is False (`mtlsctl recover`)."""
    from mtlsctl.files import recover_if_needed
    from mtlsctl.pki import resolve_settings

    opts = run_state(ctx)
    settings = resolve_settings(opts.pki_dir, opts.profile, environ={})
    if recover:
        recover_if_needed(settings.pki.root)  # a run killed mid-way left a journal: roll it back first
    return settings


def runner(ctx: click.Context | None = None, settings: Settings | None = None, signs: bool = False) -> Runner:
    """A Runner that shows progress on a terminal. For a command that signs (`signs`, with its settings and
    context), an encrypted CA key's passphrase is read and checked first (mtlsctl.ca.signing_runner)."""
    from mtlsctl.runner import Runner

    if not signs or ctx is None or settings is None:
        return Runner(io.TerminalReporter())
    from mtlsctl.ca import signing_runner

    return signing_runner(settings.pki, run_state(ctx).ca_passphrase, io.TerminalReporter())


def reading(settings: Settings) -> AbstractContextManager[None]:
    """Readers hold a shared lock on the PKI: no writer runs meanwhile (`openssl ca` replaces index.txt by two renames)."""
    from mtlsctl.files import read_lock

    return read_lock(settings.pki.root)
