#!/bin/sh
# Drop-in replacement for the guide's /usr/local/bin/mtls-add-client.sh.
# Same arguments, usage text, PKI_DIR (default /etc/nginx/pki), files and exit codes (0 ok, 1 any
# failure). No CA logic lives here: it only calls mtlsctl, which validates the name, refuses to
# overwrite a live client, and rolls back a failed run.
#
# The password reaches mtlsctl on its standard input, never on its argv. (Given as "$2", it is
# still visible in `ps` for this script itself, as in the guide: leave it out to have a 24-character
# one generated, or pass "-" to read it from this script's standard input.)
set -u

PKI_DIR="${PKI_DIR:-/etc/nginx/pki}"
MTLSCTL="${MTLSCTL:-mtlsctl}"
CLIENT_NAME="${1:-}"
EXPORT_PASS="${2:-}"

if [ -z "$CLIENT_NAME" ]; then
    echo "Usage: $0 <client-name> [export-password]"
    exit 1
fi

if [ "$EXPORT_PASS" = "-" ]; then
    "$MTLSCTL" --pki-dir "$PKI_DIR" add-client --password-stdin -- "$CLIENT_NAME"
elif [ -n "$EXPORT_PASS" ]; then
    printf '%s\n' "$EXPORT_PASS" | "$MTLSCTL" --pki-dir "$PKI_DIR" add-client --password-stdin -- "$CLIENT_NAME"
else
    "$MTLSCTL" --pki-dir "$PKI_DIR" add-client -- "$CLIENT_NAME"
fi
rc=$?
[ "$rc" -eq 0 ] || exit 1
exit 0
