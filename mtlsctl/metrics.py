"""`mtlsctl metrics`: the PKI as Prometheus text (exposition format 0.0.4) for node_exporter's textfile collector.

What it reads, so that it stays fast at thousands of certificates: index.txt (through the inventory,
lifecycle.list_certs without its per-file checks), the CA certificate(s), the CRL(s), the names in certs/ and
archive/, and renew's small state file. It never opens the certificates one by one.

- **Per certificate**: `mtlsctl_certificate_not_after_seconds{name,serial,kind,status}`; status is the
  inventory's (lifecycle.status_of: valid, expired, revoked; `list`'s "expiring" is valid here); kind is read
  from mtlsctl's own layout, not from each certificate: the OCSP signer has its fixed name (ocsp.SIGNER), and
  every server certificate mtlsctl issues or renews gets certs/NAME.fullchain.pem (archived with it to
  archive/NAME/SERIAL/ when replaced); everything else mtlsctl issues is a client.
- **The PKI**: CA and root notAfter, the CRLs' next/last update and numbers, counts by status, the OCSP
  responder's liveness where the profile configures one (one request, a few seconds at most; a failure is a
  0, not an error), and the last renew run (time, result, counts) from `<pki>/.mtlsctl.renew-last`.
- **Written whole**: `--out FILE` (and the profile's metrics.textfile, which renew, revoke and crl refresh)
  goes to an unpredictable temporary name in the same directory, fsynced, mode 644, then renamed: the
  collector never reads half a file.

Why a state file for the last renew run, not the audit log: a renew run that found nothing due changes nothing,
so the audit log (changes only) has no line for it, yet it is exactly the run an alert "renew has not run for
2 days" must see; and reading one small file stays O(1) while the audit log grows for years.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from mtlsctl.errors import InputError, MtlsError
from mtlsctl.files import MODE_PUBLIC, atomic_write, read_lock

if TYPE_CHECKING:
    from mtlsctl.lifecycle import CertEntry, RenewReport
    from mtlsctl.pki import Pki, Settings

CONTENT_TYPE = "text/plain; version=0.0.4"
RENEW_STATE = ".mtlsctl.renew-last"  # mtlsctl's state (never backed up): the last renew run
RENEW_STATE_MAX = 4096
OCSP_TIMEOUT = 3.0  # seconds for the whole liveness request (openssl ocsp's own -timeout is longer)
PREFIX = "mtlsctl_"
_METRIC_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
STATUSES = ("valid", "expired", "revoked")


# --------------------------------------------------------------------------- the exposition format


@dataclass
class Family:
    """One metric: its name, HELP and TYPE lines, and its samples (labels, value)."""

    name: str
    help: str
    type: str = "gauge"
    samples: list[tuple[tuple[tuple[str, str], ...], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> None:
        for key in labels:
            if not _LABEL_NAME_RE.fullmatch(key) or key.startswith("__"):
                raise ValueError(f"metrics: label name {key!r}")
        self.samples.append((tuple(labels.items()), value))


def escape_label_value(value: str) -> str:
    """Exposition format 0.0.4: in a label value, backslash, double quote and line feed are escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """In HELP text, backslash and line feed are escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def render(families: list[Family]) -> str:
    """The text format: for each metric its HELP and TYPE lines, then its samples; a final newline."""
    lines: list[str] = []
    for fam in families:
        if not _METRIC_NAME_RE.fullmatch(fam.name):
            raise ValueError(f"metrics: metric name {fam.name!r}")
        lines.append(f"# HELP {fam.name} {escape_help(fam.help)}")
        lines.append(f"# TYPE {fam.name} {fam.type}")
        for labels, value in fam.samples:
            text = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels)
            lines.append(f"{fam.name}{{{text}}} {format_value(value)}" if labels else f"{fam.name} {format_value(value)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the last renew run


@dataclass(frozen=True)
class RenewRun:
    """The last `renew` run, from <pki>/.mtlsctl.renew-last."""

    time: datetime
    ok: bool
    renewed: int
    failed: int

    def to_json(self) -> dict[str, object]:
        return {"time": self.time.strftime("%Y-%m-%dT%H:%M:%SZ"), "result": "ok" if self.ok else "failed",
                "renewed": self.renewed, "failed": self.failed}


def record_renew_run(pki: Pki, report: RenewReport | None, error: BaseException | None = None,
                     now: datetime | None = None) -> None:
    """Remember this renew run (under the lock, at its end): ok when nothing failed. Never raises: the
    renewals are done whatever happens to this small file."""
    when = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    failed = len(report.failed) if report is not None else 0
    ok = error is None and failed == 0
    run = RenewRun(when.replace(microsecond=0), ok, len(report.renewed) if report is not None else 0,
                   failed if error is None else max(failed, 1))
    with contextlib.suppress(OSError, InputError):
        atomic_write(pki.path(RENEW_STATE), json.dumps({"v": 1, **run.to_json()}) + "\n", MODE_PUBLIC)


@contextlib.contextmanager
def renew_run_recorded(pki: Pki, report: RenewReport) -> Iterator[None]:
    """`with renew_run_recorded(pki, report):` around renew's locked work: the run is recorded as it ends
    (failed when the block raises, or when the report has failures)."""
    try:
        yield
    except BaseException as exc:
        record_renew_run(pki, report, exc)
        raise
    record_renew_run(pki, report)


def read_renew_run(pki: Pki) -> RenewRun | None:
    """The last renew run, or None (never ran, or the file is missing, not a regular file, or not its shape)."""
    try:
        fd = os.open(pki.path(RENEW_STATE), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return None
            raw = fh.read(RENEW_STATE_MAX + 1)
        obj = json.loads(raw.decode("utf-8")) if len(raw) <= RENEW_STATE_MAX else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or set(obj) != {"v", "time", "result", "renewed", "failed"} or obj["v"] != 1:
        return None
    counts = (obj["renewed"], obj["failed"])
    if obj["result"] not in ("ok", "failed") or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 10**9
                                                        for c in counts):
        return None
    try:
        when = datetime.strptime(str(obj["time"]), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    return RenewRun(when, obj["result"] == "ok", obj["renewed"], obj["failed"])


# --------------------------------------------------------------------------- what is measured


def kinds_from_layout(pki: Pki, entries: list[CertEntry]) -> dict[str, str]:
    """serial -> client | server | ocsp, from mtlsctl's layout (names listed, no certificate opened): the OCSP
    signer by its name; a server by its certs/NAME.fullchain.pem, or for a replaced one the fullchain archived
    in archive/NAME/SERIAL/; every other certificate mtlsctl issues is a client's."""
    from mtlsctl.client import ARCHIVE
    from mtlsctl.ocsp import SIGNER

    suffix = ".fullchain.pem"
    try:
        servers = {n[: -len(suffix)] for n in os.listdir(pki.path("certs")) if n.endswith(suffix)}
    except OSError:
        servers = set()
    archived: dict[tuple[str, str], str] = {}
    archive = pki.path(ARCHIVE)
    with contextlib.suppress(OSError):
        for name in os.listdir(archive):
            with contextlib.suppress(OSError):
                for serial in os.listdir(archive / name):
                    with contextlib.suppress(OSError):
                        held = os.listdir(archive / name / serial)
                        archived[(name, serial)] = "server" if f"{name}{suffix}" in held else "client"
    out: dict[str, str] = {}
    for e in entries:
        if e.name == SIGNER:
            out[e.serial] = "ocsp"
        elif (e.name, e.serial) in archived:
            out[e.serial] = archived[(e.name, e.serial)]
        else:
            out[e.serial] = "server" if e.name in servers else "client"
    return out


def ocsp_answers(settings: Settings) -> bool:
    """One real OCSP request about the signer's own certificate (ocsp.liveness_command), stopped after OCSP_TIMEOUT
    seconds: did the responder answer? Any failure is False."""
    from mtlsctl import ocsp
    from mtlsctl.pki import ClientFiles
    from mtlsctl.runner import run_hook

    pki = settings.pki
    if not pki.path(ClientFiles(ocsp.SIGNER).crt).exists():
        return False
    try:
        res = run_hook(ocsp.liveness_command(settings).argv, {}, OCSP_TIMEOUT, cwd=pki.root)
    except (OSError, MtlsError):
        return False
    out = res.stdout + res.stderr
    return bool(ocsp._statuses(out, ClientFiles(ocsp.SIGNER).crt)) or "Responder Error:" in out


def _ts(when: datetime) -> float:
    return float(int(when.timestamp()))


@dataclass
class MetricsResult:
    """What `mtlsctl metrics` produced: the text, where it went, and a few counts for --json."""

    text: str
    out: Path | None
    certificates: int
    families: int
    ocsp_up: bool | None = None

    def to_json(self) -> dict[str, object]:
        return {"out": str(self.out) if self.out else None, "certificates": self.certificates, "metrics": self.families,
                "ocsp_up": self.ocsp_up, "bytes": len(self.text.encode())}


def collect(settings: Settings, *, now: datetime | None = None, check_ocsp: bool = True) -> tuple[list[Family], int, bool | None]:
    """The metric families (HELP, TYPE, samples), the number of certificates, and the OCSP liveness (None: no OCSP)."""
    from mtlsctl.crl import crl_info_from_file
    from mtlsctl.lifecycle import list_certs
    from mtlsctl.x509read import not_after

    pki, profile = settings.pki, settings.profile
    now = now or datetime.now(timezone.utc)
    pki.require_ca()
    with read_lock(pki.root):  # no writer meanwhile: index.txt is never read between openssl's two renames
        entries = list_certs(settings, now=now, with_files=False)
        kinds = kinds_from_layout(pki, entries)
        ca_ends: list[tuple[str, datetime | None]] = []
        for which, rel in (("ca", pki.ca_cert), *([("root", pki.root_cert)] if pki.has_chain() else [])):
            try:
                ca_ends.append((which, not_after(pki.path(rel))))
            except MtlsError:
                ca_ends.append((which, None))
        crls = []
        for which, rel in (("ca", pki.crl), *([("root", pki.root_crl)] if pki.has_chain() else [])):
            try:
                crls.append((which, crl_info_from_file(pki.path(rel)) if pki.path(rel).exists() else None))
            except (MtlsError, OSError):
                crls.append((which, None))
        renew_run = read_renew_run(pki)
    ocsp_up = ocsp_answers(settings) if check_ocsp and profile.ocsp is not None else None

    certs = Family(f"{PREFIX}certificate_not_after_seconds",
                   "notAfter of each certificate in index.txt (Unix time); status valid, expired or revoked; "
                   "kind client, server or ocsp")
    counts = dict.fromkeys(STATUSES, 0)
    expiring = 0
    for e in entries:
        status = "valid" if e.status == "expiring" else e.status
        counts[status] = counts.get(status, 0) + 1
        expiring += e.status == "expiring"
        certs.add(_ts(e.not_after), name=e.name, serial=e.serial, kind=kinds.get(e.serial, "client"), status=status)
    by_status = Family(f"{PREFIX}certificates", "Certificates in index.txt by status (valid, expired, revoked)")
    for status in STATUSES:
        by_status.add(counts[status], status=status)
    soon = Family(f"{PREFIX}certificates_expiring",
                  f"Valid certificates whose notAfter is within renew.within_days ({profile.renew.within_days} days): "
                  "what the next renew run takes")
    soon.add(expiring)
    ca_fam = Family(f"{PREFIX}ca_not_after_seconds",
                    "notAfter of the CA certificates (Unix time): ca is the issuing CA (ca/ca.crt), root the root of a "
                    "two-tier PKI; 0 when unreadable")
    for which, end in ca_ends:
        ca_fam.add(_ts(end) if end else 0, ca=which)
    next_fam = Family(f"{PREFIX}crl_next_update_seconds",
                      "nextUpdate of the CRL (Unix time): nginx rejects every client after it; 0 when missing or unreadable")
    last_fam = Family(f"{PREFIX}crl_last_update_seconds", "lastUpdate (thisUpdate) of the CRL (Unix time)")
    num_fam = Family(f"{PREFIX}crl_number", "cRLNumber of the CRL in place, as a number (list and the crlnumber file "
                     "show it in hexadecimal)")
    rev_fam = Family(f"{PREFIX}crl_revoked_entries", "Revoked certificates listed in the CRL in place")
    for which, info in crls:
        next_fam.add(_ts(info.next_update) if info else 0, crl=which)
        if info:
            last_fam.add(_ts(info.this_update), crl=which)
            if info.crl_number:
                num_fam.add(int(info.crl_number, 16), crl=which)
            rev_fam.add(info.revoked, crl=which)
    run_time = Family(f"{PREFIX}renew_last_run_timestamp_seconds",
                      "When the last `mtlsctl renew` run ended (Unix time); 0 when it never ran")
    run_ok = Family(f"{PREFIX}renew_last_run_success", "1 when the last renew run renewed everything due without failure, else 0")
    run_renewed = Family(f"{PREFIX}renew_last_run_renewed", "Certificates renewed by the last renew run")
    run_failed = Family(f"{PREFIX}renew_last_run_failed", "Certificates the last renew run failed to renew (1 when the run itself failed)")
    run_time.add(_ts(renew_run.time) if renew_run else 0)
    run_ok.add(1 if renew_run and renew_run.ok else 0)
    run_renewed.add(renew_run.renewed if renew_run else 0)
    run_failed.add(renew_run.failed if renew_run else 0)
    families = [certs, by_status, soon, ca_fam, next_fam, last_fam, num_fam, rev_fam, run_time, run_ok, run_renewed, run_failed]
    if ocsp_up is not None:
        up = Family(f"{PREFIX}ocsp_responder_up",
                    f"1 when the OCSP responder answered a request within {OCSP_TIMEOUT:g}s, else 0")
        assert profile.ocsp is not None
        up.add(1 if ocsp_up else 0, url=profile.ocsp.url)
        families.append(up)
    families = [f for f in families if f.samples]
    return families, len(entries), ocsp_up


def check_out(out: Path) -> Path:
    """--out FILE: a file name ending in .prom (node_exporter's textfile collector reads only those) in a
    directory that exists (refused otherwise, exit 2: nothing is written)."""
    if not str(out) or str(out) == ".":
        raise InputError(f"--out {str(out)!r} names no file",
                         hint="give a file name, e.g. --out /var/lib/prometheus/node-exporter/mtlsctl.prom")
    target = out.absolute()
    if target.is_dir():
        raise InputError(f"--out {target} is a directory",
                         hint="give a file name, e.g. --out /var/lib/prometheus/node-exporter/mtlsctl.prom")
    if not target.parent.is_dir():
        raise InputError(f"--out {target}: directory {target.parent} does not exist",
                         hint="create it first (node_exporter's --collector.textfile.directory)")
    if target.exists() and not target.is_file():
        raise InputError(f"--out {target} is not a regular file", hint="give a file name for the metrics")
    if target.suffix != ".prom":
        raise InputError(f"--out {target} does not end in .prom: node_exporter's textfile collector would never read it",
                         hint=f"name it e.g. {target.with_suffix('.prom').name}; to look at the metrics, run without --out")
    return target


def metrics(settings: Settings, out: Path | None = None, *, now: datetime | None = None) -> MetricsResult:
    """Collect the metrics; with `out`, write them there atomically (temporary file + rename, mode 644)."""
    target = check_out(out) if out is not None else None
    families, count, ocsp_up = collect(settings, now=now)
    text = render(families)
    if target is not None:
        atomic_write(target, text, MODE_PUBLIC)  # mkstemp in the same directory, fsync, chmod 644, rename
    return MetricsResult(text, target, count, len(families), ocsp_up)


def refresh_textfile(settings: Settings) -> Path | None:
    """The profile's metrics.textfile, rewritten (after renew, revoke, crl); None when the profile sets none."""
    if settings.profile.metrics is None or not settings.profile.metrics.textfile:
        return None
    return metrics(settings, Path(settings.profile.metrics.textfile)).out
