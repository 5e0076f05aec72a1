#!/usr/bin/env python3
"""Benchmark mtlsctl against the guide's own way, side by side on the same PKI.

    python benchmarks/run.py                       # N = 200 and 1000
    python benchmarks/run.py --sizes 200 --repeat 5

For each N it builds a PKI of N valid client certificates (one shared key and CSR, `openssl ca -subj`
per certificate, so building is fast) and then times, alternating the two in one run:

- `mtlsctl renew` with nothing due, against the guide's mtls-renew.sh loop (reconstructed below from the
  guide's text: `openssl x509 -enddate`, `date -d`, `openssl x509 -subject` for every certificate);
- `mtlsctl list --json`.

It prints a table of medians and the ratio. Timings are wall-clock on this machine; see
docs/performance.md for recorded figures.
"""

from __future__ import annotations

import argparse
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

# The guide's /usr/local/bin/mtls-renew.sh, verbatim but for PKI_DIR (taken from the environment) and the
# reload step, which never runs when nothing is due.
GUIDE_RENEW = r'''#!/bin/bash
set -e
PKI_DIR="${PKI_DIR:-/etc/nginx/pki}"
DAYS_BEFORE_EXPIRY=30
RENEW_DAYS=365
RENEWED=false
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
        RENEWED=true
    else
        echo "✅ $CN: $days_left days remaining."
    fi
done < <(find "$PKI_DIR/certs" -name "*.crt" -type f)
'''


def mtlsctl_argv() -> list[str]:
    exe = shutil.which("mtlsctl")
    return [exe] if exe else [sys.executable, "-m", "mtlsctl"]


def run(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, **(env or {})})
    return time.perf_counter() - start


def build_pki(root: Path, n: int) -> Path:
    pki = root / f"pki-{n}"
    profile = root / "profile.yaml"
    profile.write_text("ca: {subject: {CN: Bench CA}, key: {type: ec, curve: P-256}}\n"
                       "clients: {key: {type: ec, curve: P-256}}\n"
                       "nginx: {test_command: '', reload_command: ''}\n")
    subprocess.run([*mtlsctl_argv(), "--pki-dir", str(pki), "--profile", str(profile), "init"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-out", "private/shared.key"], cwd=pki, check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-new", "-key", "private/shared.key", "-out", "shared.csr", "-subj", "/CN=shared",
                    "-config", "openssl.cnf"], cwd=pki, check=True, capture_output=True)
    t0 = time.perf_counter()
    for i in range(n):
        subprocess.run(["openssl", "ca", "-config", "openssl.cnf", "-extensions", "v3_client", "-days", "365",
                        "-batch", "-subj", f"/CN=client-{i:05d}", "-in", "shared.csr", "-out", f"certs/client-{i:05d}.crt"],
                       cwd=pki, check=True, capture_output=True)
    print(f"  built N={n} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return pki


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def bench(n: int, root: Path, repeat: int, guide_repeat: int) -> dict[str, float]:
    pki = build_pki(root, n)
    guide = root / "guide-renew.sh"
    guide.write_text(GUIDE_RENEW)
    guide.chmod(0o755)
    ours_renew, ours_list, theirs = [], [], []
    for i in range(max(repeat, guide_repeat)):
        if i < repeat:
            ours_renew.append(run([*mtlsctl_argv(), "--pki-dir", str(pki), "renew", "--no-reload"]))
        if i < guide_repeat:
            theirs.append(run(["bash", str(guide)], env={"PKI_DIR": str(pki)}))
        if i < repeat:
            ours_list.append(run([*mtlsctl_argv(), "--pki-dir", str(pki), "list", "--json"]))
    return {"n": n, "mtlsctl_renew": median(ours_renew), "guide_renew": median(theirs), "mtlsctl_list": median(ours_list)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="200,1000")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each mtlsctl command")
    ap.add_argument("--guide-repeat", type=int, default=3, help="runs of the guide's loop (slow: ~0.1 s per certificate)")
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{subprocess.run(['openssl', 'version'], capture_output=True, text=True).stdout.strip()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            rows.append(bench(n, Path(tmp), args.repeat, args.guide_repeat))
    print(f"\n{'N':>6} | {'guide renew loop':>16} | {'mtlsctl renew':>13} | {'ratio':>7} | {'mtlsctl list --json':>19}")
    print(f"{'-' * 6}-|-{'-' * 16}-|-{'-' * 13}-|-{'-' * 7}-|-{'-' * 19}")
    for r in rows:
        print(f"{r['n']:>6} | {r['guide_renew']:>15.2f}s | {r['mtlsctl_renew']:>12.3f}s | "
              f"{r['guide_renew'] / r['mtlsctl_renew']:>6.0f}x | {r['mtlsctl_list']:>18.3f}s")
    print(f"\n(medians; mtlsctl x{args.repeat}, guide x{args.guide_repeat}; command: python benchmarks/run.py "
          f"--sizes {args.sizes} --repeat {args.repeat} --guide-repeat {args.guide_repeat})")


if __name__ == "__main__":
    main()
