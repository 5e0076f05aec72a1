"""The command line: each command parses its arguments, calls one core function, and shows the result.

No openssl, no PKI policy and no module-level state live here (docs/design.md, "Layers"). The package reads
as the table of contents of `mtlsctl --help`:

    app.py           the Typer app, the global options, main(): the one error boundary and the exit codes
    context.py       one run's global options (CliState, passed as the click context's obj), settings, Runner
    io.py            secrets in (password, passphrase); results out (text, JSON, dry-run plans, after a CRL change)
    ca.py            CA:            init, ca-passphrase change, root export-offline
    certificates.py  Certificates:  add-client, add-server, export, replace, sign-csr, list, verify, renew
    delivery.py      Certificates:  deliver
    revocation.py    Revocation:    revoke, crl
    ocsp.py          Revocation:    ocsp setup, ocsp serve, ocsp check
    nginx.py         nginx:         demo, nginx render, nginx check, nginx reload
    maintenance.py   Maintenance:   doctor, recover, backup, restore, systemd install, completion
    monitoring.py    Maintenance:   metrics, log

Importing a command module registers its commands on `app`, in the order `--help` lists them.
"""

from mtlsctl.cli.app import CHOICES, app, build_command, global_options, hoist_global_options, main, reflow_help
from mtlsctl.cli.context import CliState

# The command groups, in --help order: each registers its commands on `app` when imported.
# isort: off
from mtlsctl.cli import ca, certificates, delivery, revocation, ocsp, nginx, maintenance, monitoring
# isort: on
from mtlsctl.cli.maintenance import completion_file, completion_script

reflow_help(app)

__all__ = ["CHOICES", "CliState", "app", "build_command", "completion_file", "completion_script", "global_options",
           "hoist_global_options", "main", "ca", "certificates", "delivery", "maintenance", "monitoring", "nginx", "ocsp", "revocation"]
