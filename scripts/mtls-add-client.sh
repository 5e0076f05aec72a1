#!/bin/sh
# Drop-in replacement for the guide's /usr/local/bin/mtls-add-client.sh.
# Same arguments, usage text, PKI_DIR (default /etc/nginx/pki), files and exit codes (0 ok, 1 any
# failure). No CA logic lives here: it only calls mtlsctl, which validates the name, refuses to
# overwrite a live client, and rolls back a failed run.
#
# It prints the guide's lines that people parse (" - Bundle: ...", "Generated Password: ...",
# "Export Password: ..."). A generated password is printed, as in the guide; a password you give
# is not repeated (it would land in logs; you know it).
#
# The password reaches mtlsctl on its standard input, never on its argv. (Given as "$2", it is
# still visible in `ps` for this script itself, as in the guide: leave it out to have a 24-character
# one generated, or pass "-" to read it from this script's standard input.)
set -u

PKI_DIR="${PKI_DIR:-/etc/nginx/pki}"
CLIENT_NAME="${1:-}"
EXPORT_PASS="${2:-}"

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

if [ -z "$CLIENT_NAME" ]; then
    echo "Usage: $0 <client-name> [export-password]"
    exit 1
fi
find_mtlsctl

if [ "$EXPORT_PASS" = "-" ]; then
    out=$("$MTLSCTL" --pki-dir "$PKI_DIR" add-client --json --password-stdin -- "$CLIENT_NAME")
elif [ -n "$EXPORT_PASS" ]; then
    out=$(printf '%s\n' "$EXPORT_PASS" | "$MTLSCTL" --pki-dir "$PKI_DIR" add-client --json --password-stdin -- "$CLIENT_NAME")
else
    echo "No password provided. Generating a random one..."
    out=$("$MTLSCTL" --pki-dir "$PKI_DIR" add-client --json -- "$CLIENT_NAME")
fi
rc=$?
[ "$rc" -eq 0 ] || exit 1

GENERATED=""
if [ -z "$EXPORT_PASS" ]; then
    # mtlsctl prints one JSON object (indented); a generated password is URL-safe base64: [A-Za-z0-9_-]
    GENERATED=$(printf '%s\n' "$out" | sed -n 's/^ *"password": "\([A-Za-z0-9_-]*\)",\{0,1\}$/\1/p')
    if [ -z "$GENERATED" ]; then
        echo "error: the client was issued, but its generated password could not be read from mtlsctl's output:" >&2
        printf '%s\n' "$out" >&2
        echo "hint: the password is in the output above; or make a new bundle: mtlsctl export $CLIENT_NAME --force" >&2
        exit 1
    fi
    echo "Generated Password: $GENERATED"
fi

echo "----------------------------------------"
echo "✅ Certificate created successfully!"
echo "Files:"
echo " - Key: $PKI_DIR/private/${CLIENT_NAME}.key"
echo " - Cert: $PKI_DIR/certs/${CLIENT_NAME}.crt"
echo " - Bundle: $PKI_DIR/certs/${CLIENT_NAME}.p12"
echo "----------------------------------------"
if [ -n "$GENERATED" ]; then
    echo "⚠️  Export Password: $GENERATED"
fi
echo "Transfer the .p12 file securely to the client device."
exit 0
