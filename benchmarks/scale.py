#!/usr/bin/env python3
"""Scale: every cost of mtlsctl against the size of the PKI, up to a fleet of 100,000 devices (issue 16).

    python benchmarks/scale.py                    # N = 1,000 / 10,000 / 100,000, 10 % and 20 % revoked (~30 minutes on 2 cores)
    python benchmarks/scale.py --quick            # smoke mode: N = 200, 20 % revoked, one run of each (under a minute)
    python benchmarks/scale.py --sizes 1000,10000 --revoked 20 --repeat 5

How each PKI of N rows is built (the output repeats it, per PKI):

- REAL (openssl made it; the measured command reads it): the CA (`mtlsctl init`, EC P-256); a server certificate for
  the local nginx; the certificates that `renew` with 1 % due renews (one cohort per repeat, for mtlsctl and for the
  guide's loop, each with its certs/NAME.csr and private/NAME.key: renew reads and re-signs them); the certificates
  `revoke` revokes (openssl ca -revoke reads the file). All of them are signed by `openssl ca` first, while index.txt
  is small, so that building is fast; their rows are real rows.
- SYNTHETIC (only the database is read): the other rows of index.txt, in openssl's own format (status, expiry
  YYMMDDHHMMSSZ, revocation date,reason, serial hex, "unknown", DN; tab-separated), 10 % or 20 % of them revoked,
  with `serial` after the last one. `openssl ca -gencrl` over the whole database must succeed and its CRL must list
  every revoked row (checked with pyca/cryptography, printed as "openssl accepted ..."): openssl takes the rows as its
  own.
- PLACEHOLDER FILES for the synthetic rows, so that the commands see a PKI's directories as they are at that size:
  certs/NAME.crt and newcerts/SERIAL.pem are byte copies of ONE real certificate (list and doctor compare the two
  files' bytes and never parse them; the guide's loop runs `openssl x509` on them, which reads any certificate at
  the same cost); certs/NAME.csr and private/NAME.key are copies of one real CSR and key, certs/NAME.p12 a copy of
  the certificate (list only checks that these exist).

Measured per PKI, medians of --repeat runs, mtlsctl and the guide alternating where the guide has an equivalent (who
goes first alternates too), each mtlsctl command's peak memory (GNU time's %M, else wait4's max RSS) beside its
time: `list`, `list --json`, `list --json --no-files`, `list --jsonl`; `renew` with nothing due vs the guide's
mtls-renew.sh loop (benchmarks/run.py's reconstruction; only up to --guide-max-n: it runs openssl twice per
certificate, ~50 ms each); `renew` with 1 % due (a cohort of REAL certificates each run; from --due-once-n on one
run, on the PKI with the most revoked: 1,000 renewals take minutes) vs the guide's whole script (up to
--guide-max-n); `revoke` + CRL vs the guide's `openssl ca -revoke` + `openssl ca -gencrl`; `crl` vs `openssl ca
-gencrl`; one `add-client` (RSA 2048) vs the guide's four commands (--pairs alternating pairs, means); `doctor`
(stopped after --doctor-timeout); nginx `-t` and reload (until the new worker runs) with the CRL of that size, on
127.0.0.1 and a free high port, its config rendered by `mtlsctl nginx render` (as tests/test_e2e_nginx.py does),
then a curl with a revoked client must get 400; and, for the openssl floor, one `openssl ca` signing and one
`openssl ca -gencrl` by themselves.

Prints a table per PKI, the issue-16 targets MET or MISSED at N=100,000 with 20 % revoked, a markdown table for
docs/performance.md, and writes the plot (--plot, docs/performance-scale.png by default; matplotlib, a
benchmark-only extra, imported only there) and the raw figures (--save, JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from run import GUIDE_ADD, GUIDE_RENEW, GUIDE_REVOKE, mtlsctl, warm_bytecode  # noqa: E402  (the lead's side-by-side benchmark)

# The guide's mtls-renew.sh as it is (seed, "Auto-renewal script"), with its threshold and directory as parameters
# and without the nginx reload at the end (timed separately): per due certificate cp, -revoke, -gencrl, re-sign, pkcs12.
GUIDE_RENEW_DUE = r'''#!/bin/bash
set -e
PKI_DIR="${PKI_DIR:-/etc/nginx/pki}"
DAYS_BEFORE_EXPIRY="${DAYS_BEFORE_EXPIRY:-30}"
RENEW_DAYS=365
while read -r cert; do
    end_date=$(openssl x509 -enddate -noout -in "$cert" | cut -d= -f2)
    end_epoch=$(date -d "$end_date" +%s)
    now_epoch=$(date +%s)
    days_left=$(( (end_epoch - now_epoch) / 86400 ))
    CN=$(openssl x509 -subject -noout -nameopt RFC2253 -in "$cert" | \
         sed -n 's/.*CN=\([^,/]*\).*/\1/p' | sed 's/^[[:space:]]*//;s/[[:space:]]*$//')
    if [ "$days_left" -lt "$DAYS_BEFORE_EXPIRY" ]; then
        cp "$cert" "$cert.old.$(date +%F)"
        CSR="$PKI_DIR/certs/$CN.csr"
        if [ ! -f "$CSR" ]; then
            continue
        fi
        openssl ca -config $PKI_DIR/openssl.cnf -revoke "$cert" 2>/dev/null
        openssl ca -config $PKI_DIR/openssl.cnf -gencrl -out $PKI_DIR/crl/ca.crl 2>/dev/null
        openssl ca -config $PKI_DIR/openssl.cnf -extensions v3_client -days $RENEW_DAYS -batch \
            -in "$CSR" -out "$cert" 2>/dev/null
        NEW_PASS=$(openssl rand -base64 12)
        P12="$PKI_DIR/certs/$CN.p12"
        KEY="$PKI_DIR/private/$CN.key"
        if [ -f "$KEY" ]; then
            echo "$NEW_PASS" | openssl pkcs12 -export -out "$P12" -inkey "$KEY" -in "$cert" \
                -certfile $PKI_DIR/ca/ca.crt -name "$CN" -passout stdin
        fi
        echo "renewed $CN"
    else
        echo "✅ $CN: $days_left days remaining."
    fi
done < <(find "$PKI_DIR/certs" -name "*.crt" -type f)
'''

PROFILE = ("ca: {subject: {CN: Scale CA}, key: {type: ec, curve: P-256}}\n"
           "clients: {key: {type: ec, curve: P-256}}\n"
           "nginx: {test_command: '', reload_command: ''}\n")

# The measures, in table order: key -> (label, whether it is a read command for the memory target).
MEASURES: dict[str, tuple[str, bool]] = {
    "list": ("list", True),
    "list_json": ("list --json", True),
    "list_json_nofiles": ("list --json --no-files", True),
    "list_jsonl": ("list --jsonl", True),
    "renew_none": ("renew, nothing due", False),
    "renew_due": ("renew, 1 % due", False),
    "revoke": ("revoke + CRL", False),
    "crl": ("crl", False),
    "add": ("one add-client (RSA)", False),
    "doctor": ("doctor", True),
    "nginx_t": ("nginx -t", False),
    "nginx_reload": ("nginx reload", False),
    "ca_sign": ("one openssl ca signing", False),
    "ca_gencrl": ("one openssl ca -gencrl", False),
}
NAN = float("nan")
ENV: dict[str, str] = {}  # for every mtlsctl run: the benchmark's own profile cache (set in main)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- running things


@dataclass
class Run:
    seconds: float
    max_rss_kb: int
    code: int
    err: str = ""


GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, stdin: str | None = None,
        timeout: float | None = None, check: bool = True) -> Run:
    """Run one command; its wall time and its peak memory.

    The peak is GNU time's %M (the command's own maximum RSS; time itself adds ~1 ms). Without /usr/bin/time it is
    wait4's ru_maxrss, only an upper bound: Linux counts in it the RSS of the process that forked the command, here
    this benchmark (the output says which)."""
    err_file = tempfile.TemporaryFile()
    rss_file = None
    if GNU_TIME and argv[0] != GNU_TIME:
        rss_file = tempfile.NamedTemporaryFile(prefix="rss-", delete=False)
        rss_file.close()
        argv = [GNU_TIME, "-q", "-f", "%M", "-o", rss_file.name, *argv]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=err_file, env={**os.environ, **ENV, **(env or {})},
                            start_new_session=True)  # a timeout stops the whole group: GNU time, mtlsctl, its openssl
    timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL)) if timeout else None
    if timer:
        timer.start()
    if stdin is not None:
        assert proc.stdin is not None
        proc.stdin.write(stdin.encode())
        proc.stdin.close()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if timer:
        timer.cancel()
        if os.WIFSIGNALED(status):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group (GNU time was killed first)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err_file.seek(0)
    err = err_file.read().decode(errors="replace")
    err_file.close()
    max_rss_kb = usage.ru_maxrss
    if rss_file is not None:
        lines = Path(rss_file.name).read_text().split()
        os.unlink(rss_file.name)
        max_rss_kb = int(lines[-1]) if lines and lines[-1].isdigit() else max_rss_kb
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {proc.returncode}: {err.strip()[-800:]}")
    return Run(seconds, max_rss_kb, proc.returncode, err)


def quiet(argv: list[str], cwd: Path | None = None, stdin: str | None = None) -> str:
    res = subprocess.run(argv, cwd=cwd, input=stdin, capture_output=True, text=True, env={**os.environ, **ENV})
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()[-800:]}")
    return res.stdout


def med(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else NAN


def mean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.fmean(xs) if xs else NAN


def script(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.write_text(text)
    path.chmod(0o755)
    return path


# ----------------------------------------------------------------------------------------------- building a PKI


@dataclass
class Plan:
    """What a PKI of n rows holds and which of it is real."""

    n: int
    revoked_pct: int
    repeat: int
    guide: bool  # the guide's loops run at this N (and need their own cohorts)
    due: int = 0  # certificates per renew cohort (1 % of n)
    real_rows: int = 0
    synthetic_rows: int = 0
    synthetic_revoked: int = 0
    notes: list[str] = field(default_factory=list)


def cohort_days(kind: str, i: int) -> int:
    """Days of validity of renew cohort i: mtlsctl's at 40, 60, 80 ..., the guide's at 50, 70, 90 ... .
    Run i renews mtlsctl's with --within 45+20i, then the guide's with DAYS_BEFORE_EXPIRY 55+20i: each catches
    its own cohort only (the earlier ones were renewed for 365 days, the later ones end after the window)."""
    return (40 if kind == "m" else 50) + 20 * i


def new_pki(root: Path, name: str) -> Path:
    pki = root / name
    profile = root / f"{name}.profile.yaml"
    profile.write_text(PROFILE)
    quiet([*mtlsctl(), "--pki-dir", str(pki), "--profile", str(profile), "init"])
    return pki


def sign_real(pki: Path, names: list[str], days: int, with_csr: bool) -> None:
    """Real certificates signed by `openssl ca` from one shared P-256 key: certs/NAME.crt (and newcerts/), and with
    `with_csr` each its own certs/NAME.csr (CN=NAME: renew reviews and re-signs it) and private/NAME.key."""
    key = pki / "private/shared.key"
    if not key.exists():
        quiet(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key)])
        quiet(["openssl", "req", "-new", "-key", str(key), "-subj", "/CN=shared", "-out", str(pki / "shared.csr"),
               "-config", "openssl.cnf"], cwd=pki)
    for name in names:
        if with_csr:
            quiet(["openssl", "req", "-new", "-key", str(key), "-subj", f"/CN={name}", "-out", f"certs/{name}.csr",
                   "-config", "openssl.cnf"], cwd=pki)
            shutil.copyfile(key, pki / f"private/{name}.key")
            os.chmod(pki / f"private/{name}.key", 0o600)
            quiet(["openssl", "ca", "-config", "openssl.cnf", "-extensions", "v3_client_ec", "-days", str(days), "-batch",
                   "-in", f"certs/{name}.csr", "-out", f"certs/{name}.crt"], cwd=pki)
        else:
            quiet(["openssl", "ca", "-config", "openssl.cnf", "-extensions", "v3_client_ec", "-days", str(days), "-batch",
                   "-subj", f"/CN={name}", "-in", "shared.csr", "-out", f"certs/{name}.crt"], cwd=pki)


def even_hex(value: int) -> str:
    text = f"{value:X}"
    return text.zfill(len(text) + len(text) % 2)


def asn1(when: datetime) -> str:
    return when.strftime("%y%m%d%H%M%SZ") if when.year < 2050 else when.strftime("%Y%m%d%H%M%SZ")


def add_synthetic(pki: Path, count: int, revoked_pct: int, template: str) -> int:
    """Append `count` rows in openssl's format (every 100/revoked_pct-th one revoked, keyCompromise), move `serial`
    past them, and lay the placeholder files; returns the revoked rows added."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    first = int((pki / "serial").read_text().strip(), 16)
    step = round(100 / revoked_pct) if revoked_pct else 0
    crt = (pki / f"certs/{template}.crt").read_bytes()
    csr = (pki / f"certs/{template}.csr").read_bytes()
    key = (pki / f"private/{template}.key").read_bytes()
    revoked = 0

    def write(rel: str, data: bytes, mode: int = 0o644) -> None:
        fd = os.open(pki / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    with open(pki / "index.txt", "a", encoding="ascii") as index:
        for i in range(count):
            serial = even_hex(first + i)
            name = f"dev-{i:06d}"
            expiry = asn1(now + timedelta(days=100 + i % 600, seconds=i % 86400))
            if step and i % step == step - 1:
                when = asn1(now - timedelta(days=1 + i % 300, seconds=i % 3600))
                index.write(f"R\t{expiry}\t{when},keyCompromise\t{serial}\tunknown\t/CN={name}\n")
                revoked += 1
            else:
                index.write(f"V\t{expiry}\t\t{serial}\tunknown\t/CN={name}\n")
            write(f"newcerts/{serial}.pem", crt)
            write(f"certs/{name}.crt", crt)
            write(f"certs/{name}.csr", csr)
            write(f"certs/{name}.p12", crt, 0o600)
            write(f"private/{name}.key", key, 0o600)
    (pki / "serial").write_text(even_hex(first + count) + "\n")
    return revoked


def build(root: Path, n: int, revoked_pct: int, repeat: int, guide: bool, due_runs: int) -> tuple[Path, Plan]:
    plan = Plan(n, revoked_pct, repeat, guide, due=max(1, n // 100))
    t0 = time.perf_counter()
    pki = new_pki(root, f"pki-{n}-{revoked_pct}")
    quiet([*mtlsctl(), "--pki-dir", str(pki), "add-server", "localhost", "--san", "DNS:localhost", "--san", "IP:127.0.0.1"])
    real = ["localhost"]
    for i in range(due_runs):
        names = [f"due-m{i}-{k:05d}" for k in range(plan.due)]
        sign_real(pki, names, cohort_days("m", i), with_csr=True)
        real += names
        if guide:
            names = [f"due-g{i}-{k:05d}" for k in range(plan.due)]
            sign_real(pki, names, cohort_days("g", i), with_csr=True)
            real += names
    targets = [f"rv-{side}-{i}" for i in range(repeat + 1) for side in "mg"]
    sign_real(pki, targets, 365, with_csr=False)
    sign_real(pki, ["template"], 3000, with_csr=True)  # what the placeholder files copy: never due, never revoked
    real += [*targets, "template"]
    plan.real_rows = len(real)
    plan.synthetic_rows = max(0, n - plan.real_rows)
    plan.synthetic_revoked = add_synthetic(pki, plan.synthetic_rows, revoked_pct, "template")
    rows = (pki / "index.txt").read_text().count("\n")
    revoked = sum(1 for line in (pki / "index.txt").read_text().splitlines() if line.startswith("R"))
    quiet([*mtlsctl(), "--pki-dir", str(pki), "crl", "--no-reload"])
    from cryptography import x509

    listed = len(x509.load_pem_x509_crl(_pem(pki / "crl/ca.crl")))
    if listed != revoked:
        raise RuntimeError(f"the CRL lists {listed} revoked certificates, index.txt has {revoked}")
    plan.notes = [
        f"{rows} rows: {plan.real_rows} REAL (openssl ca: the nginx server certificate, {due_runs} renew cohort(s) of "
        f"{plan.due} for mtlsctl{' and as many for the guide' if guide else ''} with their CSRs and keys, "
        f"{len(targets)} revoke targets, the placeholders' template), {plan.synthetic_rows} SYNTHETIC "
        f"({plan.synthetic_revoked} revoked) with placeholder files (byte copies of one real certificate, CSR and key)",
        f"openssl accepted the synthetic database: `openssl ca -gencrl` over it lists {listed} revoked certificates "
        f"(index.txt: {revoked} R rows; read back with pyca/cryptography)",
        f"built in {time.perf_counter() - t0:.0f} s",
    ]
    return pki, plan


def _pem(path: Path) -> bytes:
    data = path.read_bytes()
    return data[data.index(b"-----BEGIN"):]


# ----------------------------------------------------------------------------------------------- nginx


class Nginx:
    """The PKI's site on a local nginx (mtlsctl.demo.LocalNginx, as the end-to-end tests run it)."""

    def __init__(self, root: Path, pki: Path) -> None:
        import yaml

        from mtlsctl.demo import LocalNginx, free_port

        self.local = LocalNginx(root / f"nginx-{pki.name}")
        self.port = free_port()
        self.pki = pki
        data = yaml.safe_load((pki / "mtls.yaml").read_text())
        data["nginx"] = {**self.local.nginx_section(pki, self.port, free_port()), "test_command": "", "reload_command": ""}
        (pki / "mtls.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        (self.local.prefix / "logs").mkdir(parents=True, exist_ok=True)
        quiet([*mtlsctl(), "--pki-dir", str(pki), "nginx", "render", "--out", str(self.local.prefix / "site.conf")])
        self.local.write((self.local.prefix / "site.conf").read_text())
        self.local.start(self.port)

    def workers(self) -> set[int]:
        master = self.local.master()
        found = set()
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    stat = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    continue
                if stat[1] == str(master) and stat[0] not in ("Z", "X"):
                    found.add(int(entry.name))
        return found

    def test(self) -> float:
        return run(self.local.argv("-t", "-q")).seconds

    def reload(self, timeout: float = 120.0) -> float:
        """From `nginx -s reload` until the old worker is gone and a new one runs (the new CRL is in effect)."""
        old = self.workers()
        start = time.perf_counter()
        run(self.local.argv("-s", "reload"))
        while time.perf_counter() - start < timeout:
            now = self.workers()
            if now and not (now & old):
                return time.perf_counter() - start
            time.sleep(0.002)
        raise RuntimeError("nginx did not reload")

    def status_of(self, client: str) -> tuple[int, str]:
        for _ in range(3):  # 0: no answer yet (a worker still starting); ask again
            code, body = self._get(client)
            if code:
                break
            time.sleep(0.5)
        return code, body

    def _get(self, client: str) -> tuple[int, str]:
        res = subprocess.run(["curl", "-s", "--max-time", "10", "-w", "\n%{http_code}", "--cacert", "ca/ca.crt",
                              "--cert", f"certs/{client}.crt", "--key", "private/shared.key",
                              f"https://127.0.0.1:{self.port}/"], cwd=self.pki, capture_output=True, text=True)
        body, _, code = res.stdout.rpartition("\n")
        return int(code or 0), body

    def stop(self) -> None:
        self.local.stop()


# ----------------------------------------------------------------------------------------------- measuring


@dataclass
class Row:
    n: int
    revoked_pct: int
    ours: dict[str, float] = field(default_factory=dict)  # median seconds
    guide: dict[str, float] = field(default_factory=dict)
    mem_mb: dict[str, float] = field(default_factory=dict)  # peak RSS of mtlsctl's command, MB
    notes: list[str] = field(default_factory=list)


def measure(root: Path, n: int, revoked_pct: int, args: argparse.Namespace) -> Row:
    guide = n <= args.guide_max_n
    # renew with 1 % due renews n/100 certificates a run (~10 min at 100,000): above --due-once-n it runs once, on the
    # PKI with the most revoked only
    due_runs = args.repeat if n < args.due_once_n else int(revoked_pct == max(int(x) for x in args.revoked.split(",")))
    say(f"N={n}, {revoked_pct} % revoked: building ...")
    pki, plan = build(root, n, revoked_pct, args.repeat, guide, due_runs)
    row = Row(n, revoked_pct, notes=list(plan.notes))
    for note in plan.notes:
        say(f"  {note}")
    m = [*mtlsctl(), "--pki-dir", str(pki)]
    env = {"PKI_DIR": str(pki)}
    scripts = {"renew": script(root, "guide-renew.sh", GUIDE_RENEW), "due": script(root, "guide-renew-due.sh", GUIDE_RENEW_DUE),
               "revoke": script(root, "guide-revoke.sh", GUIDE_REVOKE), "add": script(root, "guide-add.sh", GUIDE_ADD)}

    def ours(key: str, argv: list[str], runs: int, *, warm: bool = True, stdin: str | None = None,
             timeout: float | None = None) -> list[Run]:
        if warm:
            run(argv, stdin=stdin, timeout=timeout, check=False)
        out = [run(argv, stdin=stdin, timeout=timeout, check=False) for _ in range(runs)]
        row.ours[key] = med([r.seconds for r in out])
        row.mem_mb[key] = max(r.max_rss_kb for r in out) / 1024
        return out

    # Reads: nothing to alternate with (the guide has no inventory), warm first.
    for key, extra in (("list", []), ("list_json", ["--json"]), ("list_json_nofiles", ["--json", "--no-files"]),
                       ("list_jsonl", ["--jsonl"])):
        ours(key, [*m, "list", *extra], args.repeat)
    say("  list done")
    # renew with nothing due, alternating with the guide's loop (warm both first)
    renew = [*m, "renew", "--no-reload"]
    run(renew)  # the guide's loop is not warmed up: each run is 2 openssl starts a certificate, from a warm page cache
    mine, theirs, mem = [], [], []
    for i in range(args.repeat):
        order = ("m", "g") if i % 2 == 0 else ("g", "m")
        for side in order:
            if side == "m":
                r = run(renew)
                mine.append(r.seconds)
                mem.append(r.max_rss_kb)
            elif guide:
                theirs.append(run(["bash", str(scripts["renew"])], env=env).seconds)
    row.ours["renew_none"], row.mem_mb["renew_none"] = med(mine), max(mem) / 1024
    row.guide["renew_none"] = med(theirs)
    say("  renew (nothing due) done")
    # doctor (its database check reads every certs/*.crt against index.txt): once first; repeated only when short
    first = run([*m, "doctor"], timeout=args.doctor_timeout, check=False)
    if first.code < 0:
        row.ours["doctor"] = NAN
        row.notes.append(f"doctor stopped after {args.doctor_timeout:.0f} s (did not finish)")
        row.mem_mb["doctor"] = first.max_rss_kb / 1024
    elif first.seconds > 10:
        row.ours["doctor"], row.mem_mb["doctor"] = first.seconds, first.max_rss_kb / 1024
        row.notes.append(f"doctor ran once ({first.seconds:.0f} s)")
    else:
        ours("doctor", [*m, "doctor"], args.repeat, warm=False)
    say("  doctor done")
    # revoke + CRL vs the guide's two commands: one target each per run (warm-up pair first)
    mine, theirs, mem = [], [], []
    for i in range(args.repeat + 1):
        pair = [("m", [*m, "revoke", f"rv-m-{i}", "--no-reload"]), ("g", ["bash", str(scripts["revoke"]), f"rv-g-{i}"])]
        for side, argv in (pair if i % 2 == 0 else pair[::-1]):
            r = run(argv, env=env if side == "g" else None)
            if i > 0:
                (mine if side == "m" else theirs).append(r.seconds)
                if side == "m":
                    mem.append(r.max_rss_kb)
    row.ours["revoke"], row.guide["revoke"], row.mem_mb["revoke"] = med(mine), med(theirs), max(mem) / 1024
    # crl vs openssl ca -gencrl (the guide's CRL command)
    gencrl = ["openssl", "ca", "-config", str(pki / "openssl.cnf"), "-gencrl", "-out", str(pki / "crl/guide.crl")]
    mine, theirs, mem = [], [], []
    run([*m, "crl", "--no-reload"])
    run(gencrl)
    for i in range(args.repeat):
        pair = [("m", [*m, "crl", "--no-reload"]), ("g", gencrl)]
        for side, argv in (pair if i % 2 == 0 else pair[::-1]):
            r = run(argv)
            (mine if side == "m" else theirs).append(r.seconds)
            if side == "m":
                mem.append(r.max_rss_kb)
    row.ours["crl"], row.guide["crl"], row.mem_mb["crl"] = med(mine), med(theirs), max(mem) / 1024
    row.ours["ca_gencrl"] = med(theirs)
    say("  revoke and crl done")
    # the openssl floor: one signing by itself (index.txt re-read and rewritten by openssl each time)
    signs = [run(["openssl", "ca", "-config", "openssl.cnf", "-extensions", "v3_client_ec", "-days", "365", "-batch",
                  "-subj", f"/CN=floor-{i}", "-in", "shared.csr", "-out", f"certs/floor-{i}.crt"], cwd=pki).seconds
             for i in range(args.repeat + 1)][1:]
    row.ours["ca_sign"] = med(signs)
    # nginx -t and reload with this CRL; then a revoked client must get 400
    if not args.no_nginx:
        site = Nginx(root, pki)
        try:
            site.test()
            row.ours["nginx_t"] = med([site.test() for _ in range(args.repeat)])
            site.reload()
            row.ours["nginx_reload"] = med([site.reload() for _ in range(args.repeat)])
            code, body = site.status_of("rv-m-1")
            if code != 400 or "SSL certificate error" not in body:
                raise RuntimeError(f"nginx let a revoked client through: {code} {body[:200]}")
            code_valid, _ = site.status_of("template")
            if code_valid == 400:
                raise RuntimeError("nginx refused a valid client")
            row.notes.append(f"nginx with this CRL ({len(_pem(pki / 'crl/ca.crl'))} bytes): a revoked client gets {code}, a valid "
                             f"one {code_valid} (its certificate accepted; 502: no upstream runs behind this site)")
        finally:
            site.stop()
        say("  nginx done")
    # one add-client (RSA 2048) vs the guide's four commands, alternating pairs (RSA key generation varies a lot)
    mine, theirs, mem = [], [], []
    for i in range(args.pairs + 1):
        pair = [("m", [*m, "add-client", f"new-m{i}", "--key-type", "rsa", "--password-stdin"]),
                ("g", ["bash", str(scripts["add"]), f"new-g{i}"])]
        for side, argv in (pair if i % 2 == 0 else pair[::-1]):
            r = run(argv, env=env if side == "g" else None, stdin="bench-password\n" if side == "m" else None)
            if i > 0:
                (mine if side == "m" else theirs).append(r.seconds)
                if side == "m":
                    mem.append(r.max_rss_kb)
    row.ours["add"], row.guide["add"], row.mem_mb["add"] = mean(mine), mean(theirs), max(mem) / 1024
    say("  add-client done")
    # renew with 1 % due: cohort i each run (mtlsctl first, then the guide's script: see cohort_days)
    mine, theirs, mem = [], [], []
    for i in range(due_runs):
        r = run([*m, "renew", "--no-reload", "--within", str(cohort_days("m", i) + 5)])
        mine.append(r.seconds)
        mem.append(r.max_rss_kb)
        if guide:
            theirs.append(run(["bash", str(scripts["due"])], env={**env, "DAYS_BEFORE_EXPIRY": str(cohort_days("g", i) + 5)}).seconds)
    if due_runs:
        row.ours["renew_due"], row.guide["renew_due"], row.mem_mb["renew_due"] = med(mine), med(theirs), max(mem) / 1024
        renewed = sum(1 for line in (pki / "index.txt").read_text().splitlines() if "/CN=due-m" in line)
        expected = plan.due * due_runs * 2
        if renewed != expected:
            raise RuntimeError(f"renew with 1 % due: index.txt has {renewed} due-m rows, expected {expected}")
        row.notes.append(f"renew with 1 % due renewed {plan.due} certificates per run ({due_runs} run(s), checked in index.txt)")
    else:
        row.notes.append(f"renew with 1 % due not run here (N >= {args.due_once_n:,}: once, on the PKI with the most revoked)")
    say("  renew (1 % due) done")
    shutil.rmtree(pki)
    return row


# ----------------------------------------------------------------------------------------------- reporting


def fmt(x: float) -> str:
    if x != x:
        return "–"
    return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"


def print_rows(rows: list[Row]) -> None:
    for r in rows:
        print(f"\nN={r.n:,}, {r.revoked_pct} % revoked")
        print(f"  {'':<26} {'mtlsctl':>10} {'peak MB':>8} {'guide':>10}")
        for key, (label, _) in MEASURES.items():
            if key not in r.ours and key not in r.guide:
                continue
            mem = r.mem_mb.get(key)
            print(f"  {label:<26} {fmt(r.ours.get(key, NAN)):>10} {f'{mem:.0f}' if mem else '':>8} "
                  f"{fmt(r.guide.get(key, NAN)):>10}")
        for note in r.notes:
            print(f"  - {note}")


def markdown(rows: list[Row]) -> str:
    head = ["N (revoked)"] + [MEASURES[k][0] for k in MEASURES]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [f"{r.n:,} ({r.revoked_pct} %)"]
        for key in MEASURES:
            ours, guide, mem = r.ours.get(key, NAN), r.guide.get(key, NAN), r.mem_mb.get(key)
            cell = fmt(ours)
            if mem:
                cell += f", {mem:.0f} MB"
            if guide == guide:
                cell += f" (guide {fmt(guide)})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: list[Row]) -> list[tuple[str, bool]]:
    at = next((r for r in rows if r.n == 100_000 and r.revoked_pct == 20), None)
    if at is None:
        return []
    reads = {k: at.mem_mb[k] for k, (_, is_read) in MEASURES.items() if is_read and k in at.mem_mb}
    worst = max(reads.items(), key=lambda kv: kv[1]) if reads else ("-", NAN)
    add_ratio = at.ours["add"] / at.guide["add"]
    return [
        (f"list --json <= 2 s: {fmt(at.ours['list_json'])}", at.ours["list_json"] <= 2),
        (f"list --json --no-files (index.txt alone) <= 2 s: {fmt(at.ours['list_json_nofiles'])}",
         at.ours["list_json_nofiles"] <= 2),
        (f"renew, nothing due <= 1 s: {fmt(at.ours['renew_none'])}", at.ours["renew_none"] <= 1),
        (f"revoke + CRL <= the guide's two commands + 0.15 s: {fmt(at.ours['revoke'])} vs "
         f"{fmt(at.guide['revoke'])} + 0.15 s", at.ours["revoke"] <= at.guide["revoke"] + 0.15),
        (f"one add-client <= 1.2x the guide's four commands: {add_ratio:.2f}x", add_ratio <= 1.2),
        (f"peak memory of every read command <= 200 MB: {worst[1]:.0f} MB ({MEASURES.get(worst[0], ('-',))[0]})",
         worst[1] <= 200),
    ]


def plot(rows: list[Row], out: Path) -> None:
    """Each cost against N, log-log, mtlsctl (solid) and the guide (dashed), one panel per measure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in MEASURES if any(k in r.ours or k in r.guide for r in rows)]
    cols = 4
    fig, axes = plt.subplots((len(keys) + cols - 1) // cols, cols, figsize=(16, 3.2 * ((len(keys) + cols - 1) // cols)))
    for ax, key in zip(axes.flat, keys, strict=False):
        for pct, colour in ((10, "tab:blue"), (20, "tab:red")):
            series = sorted((r for r in rows if r.revoked_pct == pct), key=lambda r: r.n)
            for side, style in (("ours", "-"), ("guide", "--")):
                pts = [(r.n, getattr(r, side).get(key, NAN)) for r in series]
                pts = [(x, y) for x, y in pts if y == y and y > 0]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, marker="o", color=colour,
                            label=f"{'mtlsctl' if side == 'ours' else 'guide'}, {pct} % revoked")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(MEASURES[key][0], fontsize=10)
        ax.set_xlabel("rows in index.txt (N)", fontsize=8)
        ax.set_ylabel("seconds", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:
        h, lab = ax.get_legend_handles_labels()
        if len(h) > len(handles):
            handles, labels = h, lab
    fig.legend(handles, labels, loc="lower right", fontsize=9)
    fig.suptitle("mtlsctl (solid) and the guide (dashed): cost against the size of the PKI (medians)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ssl = quiet(["openssl", "version"]).strip()
    try:
        from mtlsctl.demo import nginx_binary

        ngx = subprocess.run([nginx_binary() or "nginx", "-v"], capture_output=True, text=True).stderr.strip()
    except OSError:
        ngx = "nginx: not found"
    return (f"{os.cpu_count()} cores ({cpu}), {platform.machine()}, Python {platform.python_version()}, {ssl}, {ngx}, "
            f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,100000", help="rows in index.txt (default 1000,10000,100000)")
    ap.add_argument("--revoked", default="10,20", help="percent revoked (default 10,20)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measure (medians); also the renew cohorts")
    ap.add_argument("--pairs", type=int, default=5, help="alternating add-client pairs per PKI (means)")
    ap.add_argument("--guide-max-n", type=int, default=1000,
                    help="run the guide's renew loops only up to this N (they run openssl twice per certificate)")
    ap.add_argument("--doctor-timeout", type=float, default=60.0, help="stop doctor after this many seconds")
    ap.add_argument("--due-once-n", type=int, default=100_000,
                    help="from this N on, renew with 1 %% due runs once, on the PKI with the most revoked only")
    ap.add_argument("--no-nginx", action="store_true", help="leave out nginx -t and reload")
    ap.add_argument("--plot", default=str(REPO / "docs/performance-scale.png"), help="where the PNG goes ('' for none)")
    ap.add_argument("--save", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--quick", action="store_true", help="smoke mode: N=200, 20 %% revoked, one run, one pair, no plot")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.revoked, args.repeat, args.pairs, args.guide_max_n = "200", "20", 1, 1, 200
        if args.plot == str(REPO / "docs/performance-scale.png"):
            args.plot = ""
    started = time.perf_counter()
    print(f"machine: {machine()}")
    print("peak memory: " + ("GNU time's %M (each command's own maximum RSS)" if GNU_TIME else
                             "wait4's ru_maxrss (no /usr/bin/time: an upper bound, it counts this benchmark's own RSS)"))
    warm_bytecode()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="mtlsctl-scale-") as tmp:
        root = Path(tmp)
        ENV["MTLSCTL_CACHE_DIR"] = str(root / "cache")
        for n in (int(x) for x in args.sizes.split(",")):
            for pct in (int(x) for x in args.revoked.split(",")):
                rows.append(measure(root, n, pct, args))
                if args.save:  # after each PKI: a run stopped later keeps what it measured
                    args.save.write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    print_rows(rows)
    checks = targets(rows)
    if checks:
        print("\nissue 16 targets (N=100,000, 20 % revoked):")
        for label, ok in checks:
            print(f"  {'MET   ' if ok else 'MISSED'} {label}")
    print("\nmarkdown table (docs/performance.md):\n")
    print(markdown(rows))
    if args.plot:
        plot(rows, Path(args.plot))
        print(f"\nplot: {args.plot}")
    if args.save:
        args.save.write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    wall = time.perf_counter() - started
    print(f"\n(medians of {args.repeat} run(s); add-client: means of {args.pairs} pairs; load average after: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; wall time {wall / 60:.1f} min; command: python "
          f"benchmarks/scale.py --sizes {args.sizes} --revoked {args.revoked} --repeat {args.repeat} --pairs {args.pairs} "
          f"--guide-max-n {args.guide_max_n}{' --quick' if args.quick else ''})")


if __name__ == "__main__":
    main()
