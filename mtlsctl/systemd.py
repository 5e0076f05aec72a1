"""systemd units for the nightly work: `mtlsctl systemd install`.

Units come from the templates in systemd/ (shipped in the wheel) and name the ABSOLUTE path of the running
mtlsctl and the current PKI (--pki-dir; --profile when it lives elsewhere), so they work under systemd's
PATH and environment. The CRL refresh has a unit and timer of its own: systemd skips ExecStartPost= when
ExecStart= fails (FIELD-NOTES), so "renew, then refresh the CRL" in one unit would leave the CRL to expire
whenever one renewal fails, and an expired CRL makes nginx reject every client.

Nothing existing is overwritten without `force`; new files are created exclusively (O_EXCL, never through
a symlink), and a run that fails half-way removes what it created.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from mtlsctl.errors import InputError, StateError
from mtlsctl.files import MODE_PUBLIC, atomic_write, check_owned_dir, create_exclusive, fsync_dir, refuse_symlink
from mtlsctl.pki import PROFILE_NAME, Settings
from mtlsctl.templates import render_file

DEFAULT_DIR = Path("/etc/systemd/system")
RENEW_UNITS = ("mtlsctl-renew.service", "mtlsctl-renew.timer")
CRL_UNITS = ("mtlsctl-crl.service", "mtlsctl-crl.timer")
OCSP_UNIT = "mtlsctl-ocsp.service"
TIMERS = ("mtlsctl-renew.timer", "mtlsctl-crl.timer")

# What goes into ExecStart= unquoted: systemd reads `%` (specifiers), `$` (variables), quotes, backslashes and
# whitespace; a path with any of them is refused rather than escaped.
_SAFE_ARG = re.compile(r"[A-Za-z0-9_./+,:=@-]+")
_HOMES = ("/home", "/root", "/run/user")
_TMPS = ("/tmp", "/var/tmp")  # noqa: S108 - compared with, never written to


@dataclass(frozen=True)
class Unit:
    name: str
    text: str


@dataclass(frozen=True)
class Installed:
    path: Path
    written: bool  # False for --dry-run
    replaced: bool  # an existing file was replaced (--force)


def running_mtlsctl(argv0: str | None = None, executable: str | None = None) -> Path:
    """The absolute path of the mtlsctl that is running: sys.argv[0] resolved when it is the `mtlsctl` console
    script, else the console script next to the running Python (sys.executable)."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    executable = sys.executable if executable is None else executable
    tried = []
    if argv0:
        path = Path(argv0)
        if path.name == "mtlsctl" and "/" not in argv0:
            import shutil

            found = shutil.which(argv0)
            path = Path(found) if found else path
        path = path.resolve()
        if path.name == "mtlsctl" and path.is_file() and os.access(path, os.X_OK):
            return path
        tried.append(f"sys.argv[0] {argv0}")
    if executable:
        beside = Path(executable).parent / "mtlsctl"
        if beside.is_file() and os.access(beside, os.X_OK):
            return Path(os.path.abspath(beside))
        tried.append(str(beside))
    raise StateError(f"cannot tell where the running mtlsctl is installed (tried {', '.join(tried)})",
                     hint="run the installed console script by its path, e.g. /opt/mtlsctl/bin/mtlsctl systemd install")


def _arg(value: str, what: str) -> str:
    if not _SAFE_ARG.fullmatch(value):
        bad = sorted({c for c in value if not _SAFE_ARG.fullmatch(c)})
        raise InputError(f"{what} {value} contains {', '.join(repr(c) for c in bad)}, which a systemd unit would read as syntax",
                         hint="use a path of letters, digits and . _ - / + , : = @")
    return value


def _no_control(value: str, what: str) -> str:
    """A value rendered into a unit: a line break or other control character would end the line it is on (a
    comment, say) and start unit syntax of its own; refused, naming the character."""
    bad = sorted({c for c in value if unicodedata.category(c) in ("Cc", "Zl", "Zp")})
    if bad:
        raise InputError(f"{what} {value!r} contains {', '.join(repr(c) for c in bad)}, a control character a "
                         "systemd unit would read as a line break or syntax", hint="use a path without control characters")
    return value


def _under(path: Path, roots: tuple[str, ...]) -> bool:
    return any(path == Path(r) or Path(r) in path.parents for r in roots)


def command_prefix(settings: Settings, mtlsctl: Path, ca_passphrase_file: Path | None = None) -> list[str]:
    """`/abs/mtlsctl --pki-dir /abs/pki [--profile /abs/profile] [--ca-passphrase-file /abs/file]`."""
    pki = settings.pki.root.absolute()
    args = [_arg(str(mtlsctl), "the mtlsctl path"), "--pki-dir", _arg(str(pki), "the PKI directory")]
    source = settings.profile_source
    if source != "built-in defaults" and Path(source).absolute() != pki / PROFILE_NAME:
        args += ["--profile", _arg(str(Path(source).absolute()), "the profile")]
    if ca_passphrase_file is not None:
        args += ["--ca-passphrase-file", _arg(str(ca_passphrase_file.absolute()), "--ca-passphrase-file")]
    return args


def hardening(mtlsctl: Path, writes: list[Path], reads: list[Path]) -> str:
    """The [Service] sandboxing lines, loosened only as far as the paths the unit uses need (each said why)."""
    lines = ["UMask=0077", "NoNewPrivileges=yes"]
    if any(_under(p, _TMPS) for p in writes + reads):
        lines.append("# PrivateTmp= is off: the PKI or the profile is under /tmp or /var/tmp")
    else:
        lines.append("PrivateTmp=yes")
    if any(_under(p, _HOMES) for p in writes):
        lines.append("# ProtectHome= is off: the PKI is under a home directory")
    elif any(_under(p, _HOMES) for p in [mtlsctl, *reads]):
        lines.append("# read-only, not yes: mtlsctl (or the profile) is installed under a home directory")
        lines.append("ProtectHome=read-only")
    else:
        lines.append("ProtectHome=yes")
    return "\n".join(lines)


def render_units(settings: Settings, mtlsctl: Path, unit_dir: Path = DEFAULT_DIR,
                 ca_passphrase_file: Path | None = None) -> list[Unit]:
    """The units for this PKI: renew service + timer, CRL service + timer, and the OCSP responder when the
    profile has an ocsp: section."""
    prefix = command_prefix(settings, mtlsctl, ca_passphrase_file)
    reads = [Path(prefix[i + 1]) for i, a in enumerate(prefix) if a in ("--profile", "--ca-passphrase-file")]
    values = {"unit_dir": _no_control(str(unit_dir), "--dir"), "mtlsctl": _no_control(" ".join(prefix), "the command"),
              "hardening": hardening(mtlsctl, [settings.pki.root.absolute()], reads)}
    names = [*RENEW_UNITS, *CRL_UNITS] + ([OCSP_UNIT] if settings.profile.ocsp is not None else [])
    units = []
    for name in names:
        own = {k: v for k, v in values.items() if not (name.endswith(".timer") and k in ("mtlsctl", "hardening"))}
        if name == OCSP_UNIT:
            own["ocsp_port"] = _no_control(str(settings.profile.ocsp.port), "ocsp.port")  # type: ignore[union-attr]
        units.append(Unit(name, render_file(f"systemd/{name}.template", own)))
    return units


def passphrase_warning(settings: Settings, ca_passphrase_file: Path | None) -> str | None:
    """Units that will fail: an encrypted CA key, and no --ca-passphrase-file for them to read it from."""
    if settings.pki.ca_key_encrypted() and ca_passphrase_file is None:
        return ("private/ca.key is encrypted and no --ca-passphrase-file was given: renew and crl cannot ask for "
                "the passphrase under systemd and will fail; run `mtlsctl --ca-passphrase-file FILE systemd install --force`")
    return None


def install(units: list[Unit], unit_dir: Path, *, force: bool = False, dry_run: bool = False) -> list[Installed]:
    """Write the units into `unit_dir`. Every target is checked before anything is written: an existing unit is
    refused (all of them named, exit 2) unless `force`, which replaces it atomically. New files are created
    exclusively; if a write fails, the files this run created are removed. `dry_run` writes nothing and
    refuses nothing: it reports which targets exist."""
    _no_control(str(unit_dir), "--dir")
    if unit_dir.is_symlink():
        raise InputError(f"--dir {unit_dir} is a symbolic link (to {os.readlink(unit_dir)})",
                         hint="give the real directory; units are never written through a link")
    if not unit_dir.is_dir():
        raise InputError(f"--dir {unit_dir} is not a directory", hint="systemd reads /etc/systemd/system; or create the directory")
    # Its owner (or anyone, if it is group/other-writable) could swap a unit after we wrote it: systemd would
    # run their ExecStart= as root.
    check_owned_dir(unit_dir, "--dir", allow_root=True, allow_sticky=True)
    targets = [(unit, unit_dir / unit.name) for unit in units]
    existing = [path for _, path in targets if os.path.lexists(path)]
    if dry_run:  # shows every unit, existing ones marked (`replaced`: would be replaced with --force, refused without)
        return [Installed(path, False, os.path.lexists(path)) for _, path in targets]
    if existing and not force:
        raise InputError(f"{', '.join(str(p) for p in existing)} already exist(s); nothing was written",
                         hint="compare them with `mtlsctl systemd install --dry-run`, then add --force to replace them")
    for path in existing:
        refuse_symlink(path)
    done: list[Installed] = []
    try:
        for unit, path in targets:
            if os.path.lexists(path):
                atomic_write(path, unit.text, MODE_PUBLIC)
                done.append(Installed(path, True, True))
                continue
            fd = create_exclusive(path, MODE_PUBLIC)
            done.append(Installed(path, True, False))
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(unit.text)
                fh.flush()
                os.fchmod(fh.fileno(), MODE_PUBLIC)
                os.fsync(fh.fileno())
    except BaseException:
        for item in done:
            if not item.replaced:
                with contextlib.suppress(OSError):
                    item.path.unlink()
        raise
    fsync_dir(unit_dir)
    return done


def next_steps(units: list[Unit]) -> str:
    enable = [u.name for u in units if u.name in TIMERS or u.name == OCSP_UNIT]
    return f"systemctl daemon-reload && systemctl enable --now {' '.join(enable)}"
