"""`mtlsctl doctor`: check a PKI and explain each problem with how to fix it.

Reads the files, index.txt, the CA certificate and the CRLs in Python (parsed, never openssl's text);
runs openssl only for its version. Exit 0 healthy, 1 when any check warns or fails.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from mtlsctl import db
from mtlsctl.audit import AUDIT_FILE
from mtlsctl.crl import CrlInfo, crl_info_from_file, missing_revocations
from mtlsctl.errors import MtlsError
from mtlsctl.files import JOURNAL_DIR
from mtlsctl.pki import DIRS, Pki, Settings
from mtlsctl.runner import Command, Runner


@dataclass(frozen=True)
class Finding:
    check: str
    level: str  # ok | warn | error
    message: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return {"check": self.check, "level": self.level, "message": self.message, "fix": self.fix}


def _mode(path: os.PathLike[str] | str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _owner_and_mode(path: str, st: os.stat_result, in_private: bool, owner: int, out: list[Finding]) -> None:
    """The findings of one file or directory of the PKI from its lstat: another owner, a symlink inside
    private/, writable by everyone."""
    if st.st_uid != owner and st.st_uid != 0:
        out.append(Finding("owners", "error", f"{path} is owned by uid {st.st_uid}, the PKI by uid {owner}",
                           f"chown {owner} {path}"))
    if stat.S_ISLNK(st.st_mode) and in_private:
        out.append(Finding("owners", "error", f"{path} is a symlink inside private/", "replace it with the file"))
    if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o002:
        out.append(Finding("modes", "error", f"{path} is writable by everyone", f"chmod o-w {path}"))


def _paths_checked(paths: Iterable[Path], owner: int, out: list[Finding]) -> None:
    for path in paths:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        _owner_and_mode(str(path), st, path.parent.name == "private", owner, out)


def _secret_finding(rel: str, mode: int, path: str) -> Finding:
    """A private key or bundle (`rel` in the PKI, at `path`) that group or others can read."""
    return Finding("modes", "error", f"{rel} is mode {mode:o}: readable by group or others",
                   f"chmod {'400' if rel.endswith('/ca.key') else '600'} {path}")


def _secret_mode(pki: Pki, path: Path, out: list[Finding]) -> None:
    mode = _mode(path)
    if mode & 0o077:
        out.append(_secret_finding(str(path.relative_to(pki.root)), mode, str(path)))


def _is_file_at(dir_fd: int, name: str) -> bool:
    """Path.is_file of a directory's entry (follows a symbolic link); False when it cannot be stat'ed."""
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dir_fd).st_mode)
    except (OSError, ValueError):
        return False


def _flat_dir_checked(pki: Pki, sub: str, owner: int, secret: list[Finding], out: list[Finding]) -> bool:
    """The checks of the entries of the PKI's directory `sub` (certs/, private/, newcerts/: 100,000 files each
    in a fleet), from one listing and one lstat per entry relative to the open directory, with no Path objects.
    The findings are those of the walk over `rglob("*")` (each entry's owner and mode) and, for private/ and
    certs/, the secret files' modes (private/'s files, certs/*.p12), in the same order: a flat directory's
    entries are listed in the order rglob and glob list them. False (nothing added) when the directory holds a
    subdirectory (the order rglob walks a tree in differs between Python versions: the caller walks it as
    before) or cannot be listed."""
    base = str(pki.path(sub))
    try:
        dir_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    found: list[Finding] = []
    secrets: list[Finding] = []
    in_private, in_certs = sub == "private", sub == "certs"
    lstat, is_link, is_reg = os.lstat, stat.S_ISLNK, stat.S_ISREG
    try:
        with os.scandir(dir_fd) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    return False
                name = entry.name
                try:
                    st = lstat(name, dir_fd=dir_fd)
                except FileNotFoundError:
                    continue
                st_mode, uid = st.st_mode, st.st_uid
                link = is_link(st_mode)
                if ((in_private and (is_reg(st_mode) or (link and _is_file_at(dir_fd, name))))
                        or (in_certs and name.endswith(".p12"))) and st_mode & 0o077:
                    secrets.append(_secret_finding(f"{sub}/{name}", stat.S_IMODE(st_mode), f"{base}/{name}"))
                if (uid != owner and uid != 0) or (link and in_private) or (not link and st_mode & 0o002):
                    _owner_and_mode(f"{base}/{name}", st, in_private, owner, found)
    except OSError:
        return False
    finally:
        os.close(dir_fd)
    secret += secrets
    out += found
    return True


def check_modes(settings: Settings) -> list[Finding]:
    """Modes and owners of every file and directory of the PKI. Each of DIRS is listed once and each entry
    lstat'ed once (a fleet's PKI holds 500,000 files); the findings and their order are those of a walk over
    `[private/ files, certs/*.p12]` (secret files' modes), then `[root, root's files, *each of DIRS and its
    rglob("*")]` (owners, symlinks in private/, writable by everyone)."""
    pki = settings.pki
    out = []
    owner = os.lstat(pki.root).st_uid
    private = pki.path("private")
    if private.is_dir() and _mode(private) & 0o077:
        out.append(Finding("modes", "error", f"private/ is mode {_mode(private):o}; others can list the keys",
                           f"chmod 700 {private}"))
    secret: dict[str, list[Finding]] = {"private": [], "certs": []}
    walked: list[Finding] = []
    _paths_checked([pki.root, *(p for p in pki.root.iterdir() if p.is_file() and p.name != AUDIT_FILE)],  # audit.log: check_audit_log
                   owner, walked)
    for sub in DIRS:
        directory = pki.path(sub)
        if not directory.is_dir():
            continue
        _paths_checked([directory], owner, walked)
        if _flat_dir_checked(pki, sub, owner, secret.setdefault(sub, []), walked):
            continue
        # a subdirectory (or a listing that failed): walked with pathlib, exactly as it always was
        _paths_checked(directory.rglob("*"), owner, walked)
        if sub == "private":
            for path in [p for p in directory.glob("*") if p.is_file()]:
                _secret_mode(pki, path, secret[sub])
        elif sub == "certs":
            for path in directory.glob("*.p12"):
                _secret_mode(pki, path, secret[sub])
    out += secret["private"] + secret["certs"] + walked
    if not out:
        out.append(Finding("modes", "ok", "private files are readable by their owner only"))
    return out


def check_ca(settings: Settings, runner: Runner, now: datetime) -> list[Finding]:
    pki = settings.pki
    from mtlsctl.x509read import not_after

    try:
        end = not_after(pki.path(pki.ca_cert))
    except MtlsError:
        return [Finding("ca", "error", "ca/ca.crt cannot be read", "restore it from a backup")]
    from mtlsctl.lifecycle import days_left

    left = end - now
    days = days_left(end, now)
    if left <= timedelta(0):
        return [Finding("ca", "error", f"the CA certificate EXPIRED on {end:%Y-%m-%d}: nginx rejects every client",
                        "create a new CA (mtlsctl init in a new directory) and reissue the clients")]
    if left < timedelta(days=365):
        return [Finding("ca", "warn", f"the CA certificate expires on {end:%Y-%m-%d} ({days} days)",
                        "plan a new CA now: every client certificate must be reissued under it")]
    return [Finding("ca", "ok", f"the CA certificate is valid until {end:%Y-%m-%d} ({days} days)")]


def _signed_crl_info(pki: Pki, crl: str, ca: str) -> CrlInfo | None:
    """The CRL's parsed dates and counts when its signature verifies with the CA's key, else None."""
    from mtlsctl.x509read import crl_signed_by

    try:
        if not crl_signed_by(pki.path(crl), pki.path(ca)):
            return None
        return crl_info_from_file(pki.path(crl))
    except (MtlsError, OSError):
        return None


def check_crl(settings: Settings, runner: Runner, now: datetime) -> list[Finding]:
    pki = settings.pki
    if not pki.path(pki.crl).exists():
        return [Finding("crl", "error", "crl/ca.crl is missing: nginx with ssl_crl will not start", "mtlsctl crl")]
    info = _signed_crl_info(pki, pki.crl, pki.ca_cert)
    if info is None:
        return [Finding("crl", "error", "crl/ca.crl is unreadable or not signed by this CA", "mtlsctl crl")]
    out = []
    if info.next_update <= now:
        out.append(Finding("crl", "error", f"the CRL EXPIRED on {info.next_update:%Y-%m-%d %H:%M} UTC: nginx rejects EVERY client",
                           "mtlsctl crl, and schedule `mtlsctl crl --if-due` daily (docs/operations.md)"))
    elif info.next_update - now <= timedelta(days=settings.profile.crl.refresh_within_days):
        out.append(Finding("crl", "warn", f"the CRL expires on {info.next_update:%Y-%m-%d %H:%M} UTC, inside the refresh window",
                           "mtlsctl crl --if-due (is the daily timer running?)"))
    else:
        out.append(Finding("crl", "ok", f"the CRL is valid until {info.next_update:%Y-%m-%d %H:%M} UTC"))
    if info.this_update > now + timedelta(minutes=1):
        out.append(Finding("crl", "error", f"the CRL's lastUpdate {info.this_update:%Y-%m-%d %H:%M} UTC is in the future: "
                           "nginx hosts treat it as not yet valid", "check the clock, then mtlsctl crl"))
    try:
        next_number = int(pki.path(pki.crlnumber).read_text().strip(), 16)
        if info.crl_number and next_number <= int(info.crl_number, 16):
            out.append(Finding("crl", "error", f"crlnumber ({next_number:X}) is not above the CRL's number ({info.crl_number})",
                               f"write {int(info.crl_number, 16) + 1:X} to crlnumber, then mtlsctl crl"))
    except (OSError, ValueError):
        out.append(Finding("crl", "error", "crlnumber is missing or not hex", "restore it from crlnumber.old or a backup"))
    if pki.has_chain():
        root = _signed_crl_info(pki, pki.root_crl, pki.root_cert)
        if root is None:
            out.append(Finding("crl", "error", "crl/root.crl is missing, unreadable or not signed by the root",
                               "mtlsctl crl --root [--root-key FILE]"))
        else:
            if root.next_update <= now:
                out.append(Finding("crl", "error", f"the ROOT CRL expired on {root.next_update:%Y-%m-%d}: nginx rejects every client",
                                   "mtlsctl crl --root --root-key FILE"))
            elif root.next_update - now <= timedelta(days=30):
                out.append(Finding("crl", "warn", f"the root CRL expires on {root.next_update:%Y-%m-%d}",
                                   "mtlsctl crl --root --root-key FILE (the root key is needed)"))
    # by serial, not by count: a CRL may list as many entries as index.txt has R rows and still miss one of them
    missing = missing_revocations(pki)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        out.append(Finding("crl", "error", f"the CRL does not list {len(missing)} certificate(s) index.txt has revoked "
                           f"(serial {shown}): nginx still accepts them", "mtlsctl crl (then reload nginx)"))
    return out


def _names_ending(directory: Path, suffix: str) -> list[str]:
    """The names of the entries of `directory` that end in `suffix`, in the order the directory lists them
    (what `directory.glob("*" + suffix)` finds, as names, without a Path each); none when it cannot be listed."""
    try:
        with os.scandir(directory) as entries:
            return [entry.name for entry in entries if entry.name.endswith(suffix)]
    except OSError:
        return []


def _stem(name: str, suffix: str) -> str:
    """Path(name).stem of a name ending in `suffix` (".crt" alone is its own stem, as pathlib has it)."""
    return name[:-len(suffix)] if len(name) > len(suffix) else name


def check_database(settings: Settings, now: datetime | None = None) -> list[Finding]:
    """index.txt against newcerts/, certs/ and the serial file.

    At 100,000 rows: index.txt is read in one pass (scan_index: no datetimes; "active" compares time keys),
    each name's serials are gathered in a dict (certs/NAME.crt is looked up, not searched for: searching the
    rows for each file was 10^10 steps), and the files are compared relative to the PKI's open directory."""
    pki = settings.pki
    now = now or datetime.now(timezone.utc)
    now_key = db.now_key(now)
    out = []
    count = 0
    serials: set[str] = set()
    by_name: dict[str, list[str]] = {}  # CN -> the serials of its rows, in index.txt's order
    active: dict[str, list[str]] = {}  # lower-case CN -> the serials of its valid, unexpired rows
    try:
        for line in db.scan_index(pki.path(pki.index)):
            count += 1
            serials.add(line.serial)
            cn = line.cn
            if cn is None:
                continue
            by_name.setdefault(cn, []).append(line.serial)
            if cn and line.status == "V" and line.expires > now_key:  # IndexRow.is_active, on time keys
                active.setdefault(cn.lower(), []).append(line.serial)
    except MtlsError as exc:
        return [Finding("database", "error", exc.message, exc.hint or "")]
    if len(serials) != count:
        out.append(Finding("database", "error", "index.txt has duplicate serials", "restore index.txt from a backup"))
    newcerts = {_stem(name, ".pem").upper() for name in _names_ending(pki.path("newcerts"), ".pem")}
    for serial in sorted(serials - newcerts):
        out.append(Finding("database", "error", f"serial {serial} is in index.txt but newcerts/{serial}.pem is missing",
                           "restore newcerts/ from a backup"))
    for serial in sorted(newcerts - serials):
        out.append(Finding("database", "error",
                           f"newcerts/{serial}.pem is not in index.txt (an orphan certificate: it can never be revoked)",
                           f"revoke it by hand: openssl ca -config openssl.cnf -valid newcerts/{serial}.pem, then -revoke"))
    del newcerts
    try:
        next_serial = int(db.read_serial(pki.path(pki.serial)), 16)
        if serials and next_serial <= max(int(s, 16) for s in serials):
            out.append(Finding("database", "error", f"serial ({next_serial:X}) is not above the highest issued serial",
                               "write the next free serial to the serial file"))
    except MtlsError as exc:
        out.append(Finding("database", "error", exc.message, exc.hint or ""))
    del serials
    # certs/NAME.crt must be the certificate of one of NAME's rows (newcerts/SERIAL.pem), in sorted order
    dir_fd = os.open(pki.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for file in sorted(_names_ending(pki.path("certs"), ".crt")):
            held = by_name.get(_stem(file, ".crt"), ())
            if not any(db.same_certificate_at(dir_fd, f"certs/{file}", f"newcerts/{serial}.pem") for serial in held):
                out.append(Finding("database", "error", f"certs/{file} is not in this CA's database",
                                   "move it away if it is not ours; if it is, restore index.txt from a backup"))
    finally:
        os.close(dir_fd)
    del by_name
    for name, held in sorted(active.items()):
        # renewal overlaps only until the old one is revoked: more than one is unfinished work (unless the profile
        # keeps superseded certificates valid on purpose: renew.revoke_superseded false)
        if len(held) > 1 and settings.profile.renew.revoke_superseded:
            out.append(Finding("database", "warn",
                               f"{name} has {len(held)} valid certificates (serials {', '.join(held)}): an interrupted "
                               "replace or renew left the older one valid",
                               f"mtlsctl replace {name} (a lost device), or mtlsctl renew (revokes superseded ones)"))
    if pki.path(JOURNAL_DIR).exists():
        out.append(Finding("database", "error", "an interrupted run left its journal",
                           "mtlsctl recover --dry-run (what it would roll back), then mtlsctl recover"))
    if not out:
        out.append(Finding("database", "ok", f"index.txt ({count} certificates) matches newcerts/ and certs/"))
    return out


def check_config(settings: Settings) -> list[Finding]:
    pki = settings.pki
    out = []
    cnf = pki.path(pki.openssl_cnf).read_text(errors="replace")
    dirs = pki.config_dirs()
    if not dirs:
        out.append(Finding("config", "error", f"openssl.cnf's dir is (missing), not {pki.root}",
                           f"set `dir = {pki.root}` in [ CA_default ] of openssl.cnf"))
    for section, value in pki.foreign_dirs():  # every section: [ CA_default ] and, two-tier, [ root_ca ] (crl --root)
        out.append(Finding("config", "error", f"openssl.cnf's dir is {value or '(empty)'} in [ {section} ], not {pki.root}: "
                           "openssl would use another directory's files and keys (writers refuse to run)",
                           f"set `dir = {pki.root}` in [ {section} ] of openssl.cnf (the PKI was moved?)"))
    if not re.search(r"^\s*unique_subject\s*=\s*no", cnf, re.M):
        out.append(Finding("config", "warn", "openssl.cnf does not say unique_subject = no",
                           "add `unique_subject = no` to [ CA_default ] (renewal briefly holds two valid certificates of a name)"))
    attr = pki.path(pki.index_attr)
    if attr.exists() and "unique_subject = no" not in attr.read_text():
        out.append(Finding("config", "warn", "index.txt.attr says unique_subject = yes",
                           "mtlsctl renew sets it to no; or write `unique_subject = no` to index.txt.attr"))
    if not out:
        out.append(Finding("config", "ok", "openssl.cnf points at this PKI; unique_subject = no"))
    return out


def check_openssl(runner: Runner) -> list[Finding]:
    version = runner.run(Command(("openssl", "version"))).stdout.strip()
    m = re.match(r"OpenSSL (\d+)\.(\d+)\.(\d+)([a-z]?)", version)
    if not m:
        return [Finding("openssl", "warn", f"unrecognised openssl version: {version}", "use OpenSSL ≥ 1.1.1")]
    if (int(m.group(1)), int(m.group(2)), int(m.group(3))) < (1, 1, 1):
        return [Finding("openssl", "error", f"{version} is older than 1.1.1", "upgrade openssl")]
    return [Finding("openssl", "ok", version)]


def check_nginx(settings: Settings) -> list[Finding]:
    from mtlsctl.nginx import render_site

    nginx = settings.profile.nginx
    if not nginx.site_file:
        return [Finding("nginx", "ok", "nginx.site_file is not set in the profile: the rendered site is not checked")]
    from mtlsctl.nginx import check_site_files

    out = []
    problems, _ = check_site_files(settings.pki, nginx)  # the files the site really serves (render's own check)
    for problem in problems:
        out.append(Finding("nginx", "error", f"{problem.directive} {problem.path}: {problem.problem}", problem.fix))
    if not os.path.exists(nginx.site_file):
        out.append(Finding("nginx", "error", f"nginx.site_file {nginx.site_file} does not exist",
                           f"mtlsctl nginx render --out {nginx.site_file}"))
    if os.path.exists(nginx.site_file):
        text, _ = render_site(settings.pki, nginx, ocsp=settings.profile.ocsp)
        with open(nginx.site_file, encoding="utf-8", errors="replace") as fh:
            if fh.read() != text:
                out.append(Finding("nginx", "warn", f"{nginx.site_file} differs from what the profile renders now",
                                   f"mtlsctl nginx render --out {nginx.site_file} && mtlsctl nginx reload"))
    return out or [Finding("nginx", "ok", f"{nginx.site_file} is current and its files exist")]


def check_pending_reload(settings: Settings) -> list[Finding]:
    from mtlsctl.after_change import pending_reload

    why = pending_reload(settings)
    if why is None:
        return []
    return [Finding("nginx", "error", f"nginx has not loaded the current CRL: a reload failed ({why})",
                    "fix the cause, then mtlsctl nginx reload (every later revoke, crl or renew also retries it)")]


def check_audit_log(settings: Settings) -> list[Finding]:
    """<pki>/audit.log: a regular file of the PKI's owner, mode 600 (others could read who did what, or forge
    lines when they can write it), and every line well-formed (a damaged or crafted malformed one is counted)."""
    from mtlsctl.audit import read_log

    pki = settings.pki
    path = pki.path(AUDIT_FILE)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return [Finding("audit", "ok", "no audit log yet (the first change writes audit.log)")]
    if not stat.S_ISREG(st.st_mode):
        return [Finding("audit", "error", f"{path} is not a regular file (a symbolic link?): changes are not recorded",
                        f"move it away: mtlsctl creates {AUDIT_FILE} itself")]
    out = []
    owner = os.lstat(pki.root).st_uid
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != owner:
        out.append(Finding("audit", "error", f"{path} is owned by uid {st.st_uid}, the PKI by uid {owner}: its lines are "
                           "not the PKI owner's to vouch for", f"check it, then chown {owner} {path}"))
    if mode & 0o022:
        out.append(Finding("audit", "error", f"{path} is mode {mode:o}: others can write (forge) lines", f"chmod 600 {path}"))
    elif mode & 0o044:
        out.append(Finding("audit", "warn", f"{path} is mode {mode:o}: readable by group or others (who changed what)",
                           f"chmod 600 {path}"))
    try:
        problems = read_log(pki).problems
    except (MtlsError, OSError) as exc:
        problems = [getattr(exc, "message", None) or str(exc)]
    if problems:
        out.append(Finding("audit", "warn", f"{AUDIT_FILE} has {len(problems)} line(s) that are not well-formed "
                           f"(damaged or crafted; first: {problems[0]})", "mtlsctl log shows the rest; look at those lines"))
    return out or [Finding("audit", "ok", f"{AUDIT_FILE} is mode 600, the PKI owner's, every line well-formed")]


def run_doctor(settings: Settings, runner: Runner, now: datetime | None = None) -> list[Finding]:
    now = now or datetime.now(timezone.utc)
    settings.pki.require_ca()
    findings: list[Finding] = []
    findings += check_openssl(runner)
    findings += check_modes(settings)
    findings += check_ca(settings, runner, now)
    findings += check_crl(settings, runner, now)
    findings += check_database(settings, now)
    findings += check_config(settings)
    findings += check_nginx(settings)
    findings += check_pending_reload(settings)
    findings += check_audit_log(settings)
    return findings

