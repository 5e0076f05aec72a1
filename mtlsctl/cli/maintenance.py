"""Maintenance: doctor, recover, backup, restore, systemd install, completion."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import typer

from mtlsctl.cli import io
from mtlsctl.cli.app import JSON_HELP, PANEL_MAINTENANCE, app
from mtlsctl.cli.context import load_settings, reading, run_state, runner
from mtlsctl.errors import InputError

PASSFILE_HELP = "Read the passphrase from FILE (first line)."
PASSFD_HELP = "Read the passphrase from descriptor N (e.g. 3<pass.txt)."
UNIT_DIR = Path("/etc/systemd/system")


@app.command(rich_help_panel=PANEL_MAINTENANCE)
def doctor(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print healthy and the findings (check, level, message, fix).")] = False,
) -> None:
    """Check the PKI and explain each problem with how to fix it (exit 0 healthy, 1 problems).

    \b
    Checks: file and directory modes and owners (no private file readable by group or others), CA
    expiry (warns under a year), the CRL (expired, inside the refresh window, lastUpdate in the future,
    number sane, lists every revoked serial), index.txt against newcerts/ and certs/, openssl.cnf's dir
    and unique_subject, the openssl version, an interrupted run's journal, and with nginx.site_file set,
    that the rendered site is current and its files exist.

    \b
    Example:
      mtlsctl doctor || mail -s "PKI needs attention" root < /dev/null
    """
    from mtlsctl.doctor import run_doctor

    settings = load_settings(ctx)
    with reading(settings):
        findings = run_doctor(settings, runner())
    healthy = all(f.level == "ok" for f in findings)
    if as_json:
        io.print_json({"healthy": healthy, "findings": [f.to_json() for f in findings]})
    else:
        for f in findings:
            print(f"{f.level.upper():<5} {f.check:<8} {f.message}")
            if f.fix and f.level != "ok":
                print(f"{'':<14} fix: {f.fix}")
        print("healthy" if healthy else f"{sum(f.level != 'ok' for f in findings)} problem(s)")
    if not healthy:
        raise typer.Exit(1)


@app.command(rich_help_panel=PANEL_MAINTENANCE)
def recover(
    ctx: typer.Context,
    discard: Annotated[bool, typer.Option(
        "--discard", help="Drop the journal without rolling anything back (after a look at it).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what the journal would roll back; change nothing.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print state, reason, pid, remove, restore, new_files and action as JSON.")] = False,
) -> None:
    """Show and roll back the journal an interrupted run left; drop one mtlsctl will not act on (--discard).

    \b
    Any command rolls a sound journal back by itself. A journal that names an absolute path, `..`, a
    symbolic link, a setuid/setgid/sticky or group/other-writable mode (a private/ file above 600), or
    that is truncated or of the wrong shape, is never acted on: commands that change the PKI refuse to
    run (readers warn) until a person has looked at it here. Exit 1 while such a journal is left.

    \b
    Examples:
      mtlsctl recover --dry-run     # what it would remove and put back
      mtlsctl recover               # roll a sound journal back now
      mtlsctl recover --discard     # drop a journal mtlsctl refuses; then check: mtlsctl doctor
    """
    from mtlsctl import files

    if discard and dry_run:
        raise InputError("--discard and --dry-run exclude each other", hint="look first with --dry-run, then --discard")
    settings = load_settings(ctx, recover=False)
    root = settings.pki.root
    view, action = files.resolve_journal(root, settings.pki.lock_path, discard=discard, dry_run=dry_run)
    if as_json:
        io.print_json({**view.to_json(), "action": action})
    elif view.state == "none":
        print("no interrupted run: nothing to recover")
    else:
        head = {"sound": "an interrupted run's journal", "committed": "a committed run's leftovers",
                "damaged": "a journal mtlsctl does not trust"}[view.state]
        print(f"{head} in {view.path}" + (f" (pid {view.pid})" if view.pid is not None else ""))
        if view.reason:
            print(f"  not trusted: {view.reason}")
        verb = "names (unchecked)" if view.state == "damaged" else "removes"
        for label, items in ((f"{verb} as created", view.remove), ("puts back" if view.state != "damaged" else
                              "names as changed", view.restore), ("removes as new", view.new_files)):
            for item in items:
                print(f"  {label}: {item}")
        print({"none": "dry run: nothing changed", "cleaned": "committed leftovers removed",
               "rolled_back": "rolled back", "refused": "nothing was done",
               "discarded": "journal dropped, nothing rolled back: check the PKI with `mtlsctl doctor`"}[action])
    if action == "refused" or (view.state == "damaged" and action == "none"):
        if not as_json:
            raise files.JournalError(root, view.reason)
        raise typer.Exit(1)


@app.command(rich_help_panel=PANEL_MAINTENANCE)
def backup(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(
        "--out", metavar="FILE", help="The backup file to create (never overwritten); "
                                      "a directory: a new pki-backup-DATE-TIME.tgz[.enc] in it.")],
    passphrase_file: Annotated[Path | None, typer.Option("--passphrase-file", metavar="FILE", help=PASSFILE_HELP)] = None,
    passphrase_fd: Annotated[int | None, typer.Option("--passphrase-fd", metavar="N", help=PASSFD_HELP)] = None,
    encrypt: Annotated[bool, typer.Option("--encrypt", help="Encrypt, asking for the passphrase on the terminal.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Back up the whole PKI (CA key included) as a tar, encrypted when given a passphrase; read back before success.

    \b
    Encryption: the tar streams into openssl enc -aes-256-cbc -pbkdf2 (the passphrase on a pipe,
    never argv): no plaintext byte reaches the disk. The file is mode 600, written under a temporary
    name next to --out, read back (decrypted to a pipe) and compared, then renamed; never replaces a
    file. Taken under the lock: a consistent copy. Holds only what restore accepts: a symlink, FIFO or
    device in the PKI is refused (named); the lock and journal are left out; so is anything outside
    the PKI layout (reported). Modes are archived as restore sets them.

    \b
    Examples:
      mtlsctl backup --out /root/pki-$(date +%F).tgz.enc --passphrase-file /root/.pki-backup-pass
      mtlsctl backup --out /mnt/usb/ --encrypt
    """
    from mtlsctl.backup import backup as make_backup

    settings = load_settings(ctx)
    passphrase = io.read_passphrase(passphrase_file, passphrase_fd, prompt=encrypt, confirm=True)
    result = make_backup(settings, out, passphrase, runner())
    if as_json:
        io.print_json({"backup": str(result.path), "files": result.files, "encrypted": result.encrypted, "verified": True,
                       "note": result.note,
                       "skipped": [{"path": p, "reason": why} for p, why in result.skipped],
                       "modes": [{"path": p, "on_disk": f"{a:o}", "archived": f"{b:o}"} for p, a, b in result.normalised]})
        return
    if result.note:
        io.info(result.note)
    for p, why in result.skipped:
        io.info(f"left out: {p} ({why})")
    for p, a, b in result.normalised:
        io.info(f"mode: {p} is {a:o} in the PKI, archived as {b:o} (what restore sets)")
    print(f"Backed up {result.files} files to {result.path}, read back and checked "
          f"({'encrypted' if result.encrypted else 'NOT encrypted: it holds the CA key'})")


@app.command(rich_help_panel=PANEL_MAINTENANCE)
def restore(
    ctx: typer.Context,
    backup_file: Annotated[Path, typer.Argument(metavar="FILE", help="A file made by `mtlsctl backup`.")],
    pki_dir: Annotated[Path | None, typer.Option("--pki-dir", metavar="DIR", help="Where to restore (must not hold a PKI).")] = None,
    passphrase_file: Annotated[Path | None, typer.Option("--passphrase-file", metavar="FILE", help=PASSFILE_HELP)] = None,
    passphrase_fd: Annotated[int | None, typer.Option("--passphrase-fd", metavar="N", help=PASSFD_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result and doctor's findings as JSON.")] = False,
) -> None:
    """Restore a backup into a new PKI directory, then run doctor on it.

    \b
    Refuses a directory that is not empty, and the whole archive (nothing written) if it holds a
    link, device, FIFO, absolute name, `..` or anything outside the PKI layout. Never restores
    mtlsctl's lock or journal (skipped). Modes are clamped: no setuid/setgid/sticky, nothing
    group/other-writable, private/ 700 and its files 600, ca.key and root.key 400. Every `dir` of
    openssl.cnf and mtls.yaml's pki_dir are pointed at the new place. Each change is reported.

    \b
    Example:
      mtlsctl restore /mnt/usb/pki.tgz.enc --pki-dir /etc/nginx/pki --passphrase-file /root/.pki-backup-pass
    """
    from mtlsctl.backup import is_encrypted, restore_and_check

    target = pki_dir or run_state(ctx).pki_dir
    if target is None:
        raise InputError("restore needs --pki-dir DIR", hint="e.g. mtlsctl restore FILE --pki-dir /etc/nginx/pki")
    passphrase = io.read_passphrase(passphrase_file, passphrase_fd, prompt=is_encrypted(backup_file), confirm=False,
                                    what="passphrase for the encrypted backup")
    checked = restore_and_check(backup_file, target, passphrase, runner())
    result, findings, doctor_error = checked.restored, checked.findings, checked.doctor_error
    if as_json:
        io.print_json({"pki_dir": str(result.pki_dir), "files": result.files,
                       "clamped": [{"path": p, "archived": f"{a:o}", "restored": f"{b:o}"} for p, a, b in result.clamped],
                       "skipped": [{"member": m, "reason": why} for m, why in result.skipped],
                       "repointed": result.repointed, "warnings": result.warnings,
                       "doctor": [f.to_json() for f in findings], **({"doctor_error": doctor_error} if doctor_error else {})})
    else:
        print(f"Restored {result.files} files into {result.pki_dir}")
        for p, a, b in result.clamped:
            print(f"mode     {p}: {a:o} in the archive, restored as {b:o}")
        for m, why in result.skipped:
            print(f"skipped  {m} ({why})")
        for line in result.repointed:
            print(f"changed  {line}")
        for line in result.warnings:
            print(f"WARN     {line}")
        for f in findings:
            if f.level != "ok":
                print(f"{f.level.upper():<5} {f.check:<8} {f.message}\n{'':<14} fix: {f.fix}")
        if doctor_error:
            print(f"doctor could not run: {doctor_error}")
        else:
            print("doctor: healthy" if not [f for f in findings if f.level != "ok"] else "doctor: see above")
    if not checked.healthy:
        raise typer.Exit(1)


systemd_app = typer.Typer(help="systemd units for the nightly renew, the CRL refresh and the OCSP responder.", no_args_is_help=True)
app.add_typer(systemd_app, name="systemd", rich_help_panel=PANEL_MAINTENANCE)


@systemd_app.command("install")
def systemd_install(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Option("--dir", metavar="DIR", help="Where the units go.")] = UNIT_DIR,
    force: Annotated[bool, typer.Option("--force", help="Replace units that exist (default: refuse, nothing written).")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print dir, mtlsctl, units (name, path, written, replaced) and next as JSON.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the units and write nothing.")] = False,
) -> None:
    """Write systemd units that run this mtlsctl, by its absolute path, on this PKI.

    \b
    mtlsctl-renew.service + .timer (daily renew), mtlsctl-crl.service + .timer (crl --if-due twice a
    day, a unit of its own: systemd skips ExecStartPost= when ExecStart= fails, so the CRL is refreshed
    even when renew fails) and, with an ocsp: section in the profile, mtlsctl-ocsp.service. ExecStart=
    names the running mtlsctl and --pki-dir (and --profile, --ca-passphrase-file when given). Existing
    units are never replaced without --force; new files are created exclusively.

    \b
    Examples:
      mtlsctl systemd install --dry-run
      mtlsctl systemd install
      systemctl daemon-reload && systemctl enable --now mtlsctl-renew.timer mtlsctl-crl.timer
    """
    from mtlsctl import systemd

    settings = load_settings(ctx)
    settings.pki.require_ca()
    passphrase_file = run_state(ctx).ca_passphrase_file
    exe = systemd.running_mtlsctl()
    units = systemd.render_units(settings, exe, directory.absolute(), passphrase_file)
    warning = systemd.passphrase_warning(settings, passphrase_file)
    if warning:
        io.info(f"warning: {warning}")
    done = systemd.install(units, directory, force=force, dry_run=dry_run)
    if as_json:
        io.print_json({"dir": str(directory), "mtlsctl": str(exe), "dry_run": dry_run, "next": systemd.next_steps(units),
                       "units": [{"name": u.name, "path": str(d.path), "written": d.written, "replaced": d.replaced,
                                  **({"text": u.text} if dry_run else {})} for u, d in zip(units, done, strict=True)]})
        return
    if dry_run:
        io.info(f"# dry run: nothing is written. {len(units)} unit(s) for {directory}:")
        for unit, d in zip(units, done, strict=True):
            exists = (" (exists: --force replaces it)" if force else " (exists: refused without --force)") if d.replaced else ""
            print(f"# ---- {d.path}{exists}")
            print(unit.text, end="" if unit.text.endswith("\n") else "\n")
        return
    for d in done:
        print(f"{'replaced' if d.replaced else 'wrote'} {d.path}")
    print(f"ExecStart= runs {exe}")
    print(f"next: {systemd.next_steps(units)}")


# ------------------------------------------------------------------ shell completion

COMPLETION_SHELLS = ("bash", "zsh", "fish")


def completion_file(shell: str, environ: Mapping[str, str] = os.environ) -> Path:
    """Where `completion SHELL --install` writes: the per-user place each shell loads completions from."""
    home = Path(environ.get("HOME") or Path.home())
    if shell == "bash":  # bash-completion (2.x) loads it on demand
        data = Path(environ.get("XDG_DATA_HOME") or home / ".local/share")
        return Path(environ.get("BASH_COMPLETION_USER_DIR") or data / "bash-completion") / "completions/mtlsctl"
    if shell == "zsh":
        return Path(environ.get("ZDOTDIR") or home) / ".zfunc/_mtlsctl"
    return Path(environ.get("XDG_CONFIG_HOME") or home / ".config") / "fish/completions/mtlsctl.fish"


def completion_script(shell: str) -> str:
    """The completion script for a shell: typer's completion classes (click's machinery), _MTLSCTL_COMPLETE."""
    import typer.main
    from typer._completion_classes import completion_init

    from mtlsctl._click import get_completion_class

    completion_init()
    cls = get_completion_class(shell)
    assert cls is not None
    return cls(typer.main.get_command(app), {}, "mtlsctl", "_MTLSCTL_COMPLETE").source().strip() + "\n"


@app.command(rich_help_panel=PANEL_MAINTENANCE)
def completion(
    shell: Annotated[str, typer.Argument(metavar="bash|zsh|fish", help="The shell to complete in.")],
    install: Annotated[bool, typer.Option(
        "--install", help="Write the script where the shell loads completions instead of printing it.")] = False,
    force: Annotated[bool, typer.Option("--force", help="With --install: replace a different file already there.")] = False,
) -> None:
    """Print (or install) shell completion for bash, zsh or fish: commands, options and choice values.

    \b
    The script asks mtlsctl what to complete (click's completion, _MTLSCTL_COMPLETE), so it follows
    the installed version. --install writes one file, never replaces a different one without --force,
    and edits no rc file:
      bash  ~/.local/share/bash-completion/completions/mtlsctl (the bash-completion package loads it)
      zsh   ~/.zfunc/_mtlsctl (needs `fpath+=~/.zfunc` before `compinit` in ~/.zshrc)
      fish  ~/.config/fish/completions/mtlsctl.fish

    \b
    Examples:
      mtlsctl completion bash --install
      eval "$(mtlsctl completion bash)"       # this shell only (or that line in ~/.bashrc)
      mtlsctl completion zsh > /usr/local/share/zsh/site-functions/_mtlsctl
    """
    from mtlsctl.files import MODE_PUBLIC, atomic_write

    chosen = shell.lower()
    if chosen not in COMPLETION_SHELLS:
        raise InputError(f"shell {shell!r} is not supported", hint="use bash, zsh or fish")
    script = completion_script(chosen)
    if not install:
        sys.stdout.write(script)
        return
    target = completion_file(chosen)
    if target.is_symlink() or target.exists():
        try:
            same = not target.is_symlink() and target.read_text(encoding="utf-8") == script
        except (OSError, UnicodeDecodeError):
            same = False
        if same:
            print(f"{chosen} completion is already installed in {target}")
            return
        if not force:
            raise InputError(f"{target} already exists and differs from mtlsctl's {chosen} completion",
                             hint="look at it; --force replaces it")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, script, MODE_PUBLIC)
    print(f"{chosen} completion installed in {target}")
    if chosen == "bash":
        print("It loads in new shells when the bash-completion package is installed; otherwise add to ~/.bashrc: "
              f"source {target}")
    elif chosen == "zsh":
        print(f"Make sure ~/.zshrc has, before compinit: fpath+={target.parent}   (then: autoload -Uz compinit && compinit)")
    else:
        print("It loads in new fish shells.")
