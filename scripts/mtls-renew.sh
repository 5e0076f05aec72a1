#!/bin/sh
# Drop-in replacement for the guide's /usr/local/bin/mtls-renew.sh, for cron:
#   0 3 * * * /usr/local/bin/mtls-renew.sh >> /var/log/mtls-renew.log 2>&1
# Same PKI_DIR (default /etc/nginx/pki), files (certs/NAME.crt.old.YYYY-MM-DD, certs/NAME.p12) and
# exit codes (0 ok, 1 any failure). Unlike the guide's loop it revokes the old certificate only
# after the new one exists, carries on past an already-revoked file, refreshes the CRL whenever it
# is due (not only when something renewed), and reloads nginx only after `nginx -t` passes.
#
# New PKCS#12 passwords go to private/NAME.p12.password (mode 0600), not into the cron log. Set
# MTLS_SHOW_PASSWORDS=1 to print them as the guide's script did ("New Export Password: ...").
set -u

PKI_DIR="${PKI_DIR:-/etc/nginx/pki}"

# --- find mtlsctl (the same block in mtls-add-client.sh and mtls-renew.sh) ---------------------------
# cron runs this with PATH=/usr/bin:/bin, where a pip-installed mtlsctl usually is not. Search order,
# the first executable file wins (nothing is written into this script at install time):
#   1. $MTLSCTL, when set: a path or a command name (not executable: an error, no further search)
#   2. mtlsctl on PATH
#   3. next to this script: as invoked, then with symbolic links resolved
#   4. the scripts directory of the Python that installed mtlsctl, when this is the copy inside the
#      installed package: PREFIX/lib/pythonX.Y/site-packages/mtlsctl/_templates/scripts -> PREFIX/bin
#   5. /usr/local/bin/mtlsctl, then ~/.local/bin/mtlsctl (pip install --user)
# Nothing found: every path tried is named on stderr, exit 1.
try_mtlsctl() {
    if [ -f "$1" ] && [ -x "$1" ]; then
        MTLSCTL=$1
        return 0
    fi
    tried="$tried; $1"
    return 1
}

find_mtlsctl() {
    if [ -n "${MTLSCTL:-}" ]; then
        found=$(command -v "$MTLSCTL" 2>/dev/null) || found=""
        if [ -n "$found" ] && [ -f "$found" ] && [ -x "$found" ]; then
            MTLSCTL=$found
            return 0
        fi
        echo "error: MTLSCTL=$MTLSCTL is not an executable file" >&2
        echo "hint: set MTLSCTL to the absolute path of mtlsctl (e.g. /opt/mtlsctl/bin/mtlsctl), or unset it" >&2
        exit 1
    fi
    found=$(command -v mtlsctl 2>/dev/null) || found=""
    if [ -n "$found" ] && [ -f "$found" ] && [ -x "$found" ]; then
        MTLSCTL=$found
        return 0
    fi
    tried="\$MTLSCTL (not set); mtlsctl on PATH ($PATH)"
    self_dir=$(dirname -- "$0")
    try_mtlsctl "$self_dir/mtlsctl" && return 0
    real=$(readlink -f -- "$0" 2>/dev/null) || real=$0
    real_dir=$(dirname -- "$real")
    if [ "$real_dir" != "$self_dir" ]; then
        try_mtlsctl "$real_dir/mtlsctl" && return 0
    fi
    case "$real_dir" in
        */lib/python*/mtlsctl/_templates/scripts)
            try_mtlsctl "${real_dir%/lib/python*}/bin/mtlsctl" && return 0 ;;
        */lib64/python*/mtlsctl/_templates/scripts)
            try_mtlsctl "${real_dir%/lib64/python*}/bin/mtlsctl" && return 0 ;;
    esac
    try_mtlsctl /usr/local/bin/mtlsctl && return 0
    if [ -n "${HOME:-}" ]; then
        try_mtlsctl "$HOME/.local/bin/mtlsctl" && return 0
    fi
    echo "error: mtlsctl not found; tried: $tried" >&2
    echo "hint: set MTLSCTL=/path/to/mtlsctl (a crontab line of its own: MTLSCTL=/opt/venv/bin/mtlsctl)," \
         "or link it: ln -s \"\$(command -v mtlsctl)\" /usr/local/bin/mtlsctl" >&2
    exit 1
}
# -------------------------------------------------------------------------------------------------------

find_mtlsctl

echo "Checking for expiring certificates in $PKI_DIR/certs..."
if [ "${MTLS_SHOW_PASSWORDS:-0}" = "1" ]; then
    "$MTLSCTL" --pki-dir "$PKI_DIR" renew --show-passwords
else
    "$MTLSCTL" --pki-dir "$PKI_DIR" renew
fi
rc=$?
[ "$rc" -eq 0 ] || exit 1
exit 0
