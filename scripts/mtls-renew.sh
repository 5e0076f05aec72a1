#!/bin/sh
# Drop-in replacement for the guide's /usr/local/bin/mtls-renew.sh, for cron:
#   0 3 * * * /usr/local/bin/mtls-renew.sh >> /var/log/mtls-renew.log 2>&1
# Same PKI_DIR (default /etc/nginx/pki), files (certs/NAME.crt.old.YYYY-MM-DD, certs/NAME.p12) and
# exit codes (0 ok, 1 any failure). Unlike the guide's loop it revokes the old certificate only
# after the new one exists, carries on past an already-revoked file, refreshes the CRL whenever it
# is due (not only when something renewed), and reloads nginx only after `nginx -t` passes.
#
# New PKCS#12 passwords go to private/NAME.p12.password (mode 0600), not into the cron log. Set
# MTLS_SHOW_PASSWORDS=1 to print them as the guide's script did.
set -u

PKI_DIR="${PKI_DIR:-/etc/nginx/pki}"
MTLSCTL="${MTLSCTL:-mtlsctl}"

echo "Checking for expiring certificates in $PKI_DIR ..."
if [ "${MTLS_SHOW_PASSWORDS:-0}" = "1" ]; then
    "$MTLSCTL" --pki-dir "$PKI_DIR" renew --show-passwords
else
    "$MTLSCTL" --pki-dir "$PKI_DIR" renew
fi
rc=$?
[ "$rc" -eq 0 ] || exit 1
exit 0
