#!/usr/bin/env python3
"""Benchmark mtlsctl against the guide's own way, side by side on the same PKI, alternating.

    python benchmarks/run.py                      # N = 200, 1000, 5000 (about 10 minutes on 2 cores)
    python benchmarks/run.py --sizes 200 --quick  # a smoke run

For each N it builds a PKI of N valid client certificates (one shared key and CSR, `openssl ca -subj`
per certificate, so building is fast) and measures:

- `mtlsctl renew` with nothing due vs the guide's mtls-renew.sh loop (reconstructed below from the guide's
  text: `openssl x509 -enddate`, `date -d`, `openssl x509 -subject` per certificate); the guide's loop is
  skipped above --guide-max-n (it costs ~40 ms per certificate);
- `mtlsctl list` (the table, with the CA and CRL lines) and `mtlsctl list --json`;
- `mtlsctl revoke` (with its CRL) vs the guide's `openssl ca -revoke` + `openssl ca -gencrl`, with 1,000
  certificates already revoked (at N >= 1000);
- how the cost of one `openssl ca` signing grows with the size of index.txt.

Once: `mtlsctl --help` and `--version`; one `add-client` (RSA 2048) vs the guide's four commands, in at least
15 alternating pairs (who goes first alternates too); and 50 RSA-2048 clients with `add-client --from-file` in
parallel (--jobs = cores) vs one at a time (--jobs 1).

Like an installed mtlsctl, every run starts warm: the package is byte-compiled first (a checkout run with
PYTHONDONTWRITEBYTECODE=1 would otherwise compile mtlsctl's modules on every start), the profile cache
(mtlsctl/cache.py) lives in the benchmark's own directory, and each measured command runs once untimed
first, the guide's commands too (page cache, cache entry). Prints tables of medians (add-client: means and
medians), the issue-14 targets met or missed, and the versions that decide start-up. docs/performance.md
records a run.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.metadata
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

GUIDE_RENEW = r'''#!/bin/bash
set -e
PKI_DIR="${PKI_DIR:-/etc/nginx/pki}"
DAYS_BEFORE_EXPIRY=30
echo "Checking for expiring certificates in $PKI_DIR/certs..."
while read -r cert; do
    end_date=$(openssl x509 -enddate -noout -in "$cert" | cut -d= -f2)
    end_epoch=$(date -d "$end_date" +%s)
    now_epoch=$(date +%s)
    days_left=$(( (end_epoch - now_epoch) / 86400 ))
    CN=$(openssl x509 -subject -noout -nameopt RFC2253 -in "$cert" | \
         sed -n 's/.*CN=\([^,/]*\).*/\1/p' | sed 's/^[[:space:]]*//;s/[[:space:]]*$//')
    if [ "$days_left" -lt "$DAYS_BEFORE_EXPIRY" ]; then
        echo "would renew $CN"
    else
        echo "✅ $CN: $days_left days remaining."
    fi
done < <(find "$PKI_DIR/certs" -name "*.crt" -type f)
'''

# The guide's four commands for one client (mtls-add-client.sh without its echo lines).
GUIDE_ADD = r'''#!/bin/bash
set -e
cd "$PKI_DIR"
CLIENT_NAME=$1
openssl genrsa -out private/${CLIENT_NAME}.key 2048 2>/dev/null
openssl req -new -key private/${CLIENT_NAME}.key -out certs/${CLIENT_NAME}.csr -subj "/CN=${CLIENT_NAME}"
openssl ca -config openssl.cnf -extensions v3_client -days 365 -batch -in certs/${CLIENT_NAME}.csr -out certs/${CLIENT_NAME}.crt 2>/dev/null
echo "guide-password" | openssl pkcs12 -export -out certs/${CLIENT_NAME}.p12 -inkey private/${CLIENT_NAME}.key \
    -in certs/${CLIENT_NAME}.crt -certfile ca/ca.crt -name "${CLIENT_NAME}" -passout stdin
'''

GUIDE_REVOKE = r'''#!/bin/bash
set -e
cd "$PKI_DIR"
openssl ca -config openssl.cnf -revoke "certs/$1.crt" 2>/dev/null
openssl ca -config openssl.cnf -gencrl -out crl/ca.crl 2>/dev/null
'''


def mtlsctl() -> list[str]:
    """The mtlsctl installed with the Python that runs this benchmark (not another one on PATH)."""
    exe = Path(sys.executable).parent / "mtlsctl"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "mtlsctl"]


ENV: dict[str, str] = {}  # for every mtlsctl run: the benchmark's own profile cache (set in main)


def timed(argv: list[str], env: dict[str, str] | None = None, stdin: str | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, input=stdin, text=True,
                   env={**os.environ, **ENV, **(env or {})})
    return time.perf_counter() - start


def mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def script(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def new_pki(root: Path, name: str) -> Path:
    pki = root / name
    profile = root / "profile.yaml"
    profile.write_text("ca: {subject: {CN: Bench CA}, key: {type: ec, curve: P-256}}\n"
                       "clients: {key: {type: ec, curve: P-256}}\nnginx: {test_command: '', reload_command: ''}\n")
    subprocess.run([*mtlsctl(), "--pki-dir", str(pki), "--profile", str(profile), "init"], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, **ENV})
    return pki


def fill(pki: Path, n: int, prefix: str = "client") -> list[float]:
    """Sign n certificates the fast way; return the time of each `openssl ca` signing."""
    if not (pki / "shared.csr").exists():
        subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-out", "private/shared.key"], cwd=pki, check=True, capture_output=True)
        subprocess.run(["openssl", "req", "-new", "-key", "private/shared.key", "-out", "shared.csr", "-subj", "/CN=shared",
                        "-config", "openssl.cnf"], cwd=pki, check=True, capture_output=True)
    times = []
    for i in range(n):
        t = time.perf_counter()
        subprocess.run(["openssl", "ca", "-config", "openssl.cnf", "-extensions", "v3_client", "-days", "365", "-batch",
                        "-subj", f"/CN={prefix}-{i:05d}", "-in", "shared.csr", "-out", f"certs/{prefix}-{i:05d}.crt"],
                       cwd=pki, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def bench_n(root: Path, n: int, repeat: int, guide_max_n: int) -> dict:
    pki = new_pki(root, f"pki-{n}")
    t0 = time.perf_counter()
    sign_times = fill(pki, n)
    print(f"  built N={n} in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    guide = script(root, "guide-renew.sh", GUIDE_RENEW)
    ours_renew, ours_list, ours_json, theirs = [], [], [], []
    guide_runs = repeat if n <= guide_max_n else 0
    if n > 200:
        guide_runs = min(guide_runs, 3)
    renew = [*mtlsctl(), "--pki-dir", str(pki), "renew", "--no-reload"]
    listing = [*mtlsctl(), "--pki-dir", str(pki), "list"]
    for argv in (renew, listing, [*listing, "--json"]):  # warm-up, untimed
        timed(argv)
    if guide_runs:
        timed(["bash", str(guide)], env={"PKI_DIR": str(pki)})
    for i in range(max(repeat, guide_runs)):
        if i < repeat:
            ours_renew.append(timed(renew))
        if i < guide_runs:
            theirs.append(timed(["bash", str(guide)], env={"PKI_DIR": str(pki)}))
        if i < repeat:
            ours_list.append(timed(listing))
            ours_json.append(timed([*listing, "--json"]))
    row = {"n": n, "renew": med(ours_renew), "guide": med(theirs), "list": med(ours_list), "json": med(ours_json),
           "sign": med(sign_times[-20:])}
    if n >= 1000:  # revoke + CRL with 1,000 revoked certificates
        for i in range(1000):
            subprocess.run(["openssl", "ca", "-config", "openssl.cnf", "-revoke", f"certs/client-{i:05d}.crt"],
                           cwd=pki, check=True, capture_output=True)
        fill(pki, 2 * repeat, prefix="rv")
        grev = script(root, "guide-revoke.sh", GUIDE_REVOKE)
        ours, guide_t = [], []
        for i in range(repeat):
            ours.append(timed([*mtlsctl(), "--pki-dir", str(pki), "revoke", f"rv-{2 * i:05d}", "--no-reload"]))
            guide_t.append(timed(["bash", str(grev), f"rv-{2 * i + 1:05d}"], env={"PKI_DIR": str(pki)}))
        row["revoke"], row["guide_revoke"] = med(ours), med(guide_t)
    shutil.rmtree(pki)
    return row


def bench_once(root: Path, repeat: int, batch: int, pairs: int) -> dict:
    timed([*mtlsctl(), "--help"])
    out = {"help": med([timed([*mtlsctl(), "--help"]) for _ in range(repeat)]),
           "version": med([timed([*mtlsctl(), "--version"]) for _ in range(repeat)])}
    pki = new_pki(root, "pki-add")
    gadd = script(root, "guide-add.sh", GUIDE_ADD)

    def ours(name: str) -> float:
        return timed([*mtlsctl(), "--pki-dir", str(pki), "add-client", name, "--key-type", "rsa", "--password-stdin"],
                     stdin="bench-password\n")

    def theirs(name: str) -> float:
        return timed(["bash", str(gadd), name], env={"PKI_DIR": str(pki)})

    ours("warm-m")  # warm-up, untimed
    theirs("warm-g")
    mine, guide = [], []
    for i in range(pairs):  # RSA key generation time varies a lot from key to key: many pairs, means
        if i % 2:
            guide.append(theirs(f"g{i}"))
            mine.append(ours(f"m{i}"))
        else:
            mine.append(ours(f"m{i}"))
            guide.append(theirs(f"g{i}"))
    out["add"], out["guide_add"], out["pairs"] = mean(mine), mean(guide), pairs
    out["add_med"], out["guide_add_med"] = med(mine), med(guide)
    names = root / "names.txt"
    seq, par = [], []
    for r in range(2):
        for jobs, bucket in ((1, seq), (os.cpu_count() or 2, par)):
            names.write_text("".join(f"b{r}-{jobs}-{i}\n" for i in range(batch)))
            bucket.append(timed([*mtlsctl(), "--pki-dir", str(pki), "add-client", "--from-file", str(names),
                                 "--key-type", "rsa", "--jobs", str(jobs)]))
    out["batch_seq"], out["batch_par"], out["batch"] = med(seq), med(par), batch
    return out


def versions() -> str:
    found = []
    for dist in ("typer", "click", "pydantic", "PyYAML", "cryptography"):
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{dist} -")
    return ", ".join(found)


def warm_bytecode() -> None:
    """Byte-compile mtlsctl as `pip install` does for an installed copy (a checkout may run without writing it)."""
    import mtlsctl

    for path in mtlsctl.__path__:
        compileall.compile_dir(path, quiet=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="200,1000,5000")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--guide-max-n", type=int, default=1000, help="skip the guide's renew loop above this N")
    ap.add_argument("--batch", type=int, default=50, help="clients in the --from-file run")
    ap.add_argument("--pairs", type=int, default=15, help="alternating add-client pairs (at least 15 for issue 14)")
    ap.add_argument("--quick", action="store_true", help="fewer runs, a batch of 10, 6 pairs")
    args = ap.parse_args()
    if args.quick:
        args.repeat, args.batch, args.pairs = 2, 10, 6
    ssl = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {ssl}")
    print(f"versions: {versions()}; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    warm_bytecode()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ENV["MTLSCTL_CACHE_DIR"] = str(root / "cache")
        once = bench_once(root, args.repeat, args.batch, args.pairs)
        rows = [bench_n(root, int(n), args.repeat, args.guide_max_n) for n in args.sizes.split(",")]
    print(f"\n{'N':>5} | {'guide renew loop':>16} | {'mtlsctl renew':>13} | {'ratio':>6} | {'list':>7} | {'list --json':>11} | "
          f"{'mtlsctl revoke+CRL':>18} | {'guide revoke+CRL':>16} | {'one openssl ca':>14}")
    print("-" * 130)
    for r in rows:
        guide = f"{r['guide']:.2f}s" if r["guide"] == r["guide"] else "(skipped)"
        ratio = f"{r['guide'] / r['renew']:.0f}x" if r["guide"] == r["guide"] else "-"
        rev = f"{r['revoke']:.3f}s" if "revoke" in r else "-"
        grev = f"{r['guide_revoke']:.3f}s" if "guide_revoke" in r else "-"
        print(f"{r['n']:>5} | {guide:>16} | {r['renew']:>12.3f}s | {ratio:>6} | {r['list']:>6.3f}s | {r['json']:>10.3f}s | "
              f"{rev:>18} | {grev:>16} | {r['sign'] * 1000:>11.1f} ms")
    print(f"\nmtlsctl --help: {once['help']:.3f}s; mtlsctl --version: {once['version']:.3f}s")
    add_ratio = once["add"] / once["guide_add"]
    print(f"one client, RSA 2048, {once['pairs']} alternating pairs: mtlsctl add-client mean {once['add']:.3f}s "
          f"(median {once['add_med']:.3f}s) vs the guide's four commands mean {once['guide_add']:.3f}s "
          f"(median {once['guide_add_med']:.3f}s): ratio of means {add_ratio:.2f}")
    print(f"{once['batch']} RSA-2048 clients --from-file: --jobs 1 {once['batch_seq']:.2f}s, --jobs {os.cpu_count()} "
          f"{once['batch_par']:.2f}s (speed-up {once['batch_seq'] / once['batch_par']:.2f}x)")
    at200 = next((r for r in rows if r["n"] == 200), None)
    if at200 is not None:
        print("\nissue 14 targets (N=200):")
        ratio200 = at200["guide"] / at200["renew"]
        for label, ok in (
            (f"list <= 0.150 s: {at200['list']:.3f} s", at200["list"] <= 0.150),
            (f"list --json <= 0.150 s: {at200['json']:.3f} s", at200["json"] <= 0.150),
            (f"renew, nothing due <= 0.150 s: {at200['renew']:.3f} s", at200["renew"] <= 0.150),
            (f"renew >= 60x faster than the guide's loop: {ratio200:.0f}x", ratio200 >= 60),
            (f"add-client <= 1.2x the guide's four commands (means of {once['pairs']} pairs): {add_ratio:.2f}", add_ratio <= 1.2),
        ):
            print(f"  {'met   ' if ok else 'MISSED'} {label}")
    print(f"(medians of {args.repeat} runs; load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"command: python benchmarks/run.py --sizes {args.sizes} --repeat {args.repeat} --pairs {args.pairs})")


if __name__ == "__main__":
    main()
