"""The guide's openssl commands, built as argv lists to run in the PKI directory.

Every builder returns a runner.Command whose argv is what a person would type in the PKI directory
(relative paths, as in the guide), so `--dry-run` can print it and the tests can pin it.
Passwords are never on argv: they travel on stdin (`-passout stdin` / `-passin stdin`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mtlsctl.pki import Pki
from mtlsctl.runner import Command
from mtlsctl.templates import render_file

if TYPE_CHECKING:  # annotations only: importing the profile's models means importing pydantic (start-up)
    from mtlsctl.profile import KeySpec, Profile

CNF = "openssl.cnf"

# PKCS#12 profiles (FIELD-NOTES: PKCS#12).
P12_FLAGS: dict[str, tuple[str, ...]] = {
    # read by curl, NSS, Python and the older macOS/iOS/Android/Windows importers, no legacy provider
    "compat": ("-keypbe", "PBE-SHA1-3DES", "-certpbe", "PBE-SHA1-3DES", "-macalg", "sha1"),
    # OpenSSL 3's default (PBES2/AES-256/SHA-256): the guide's exact command
    "modern": (),
    # RC2-40: only for very old importers; OpenSSL 3 clients (curl) cannot read it
    "legacy": ("-legacy",),
}


_SECTION_RE = re.compile(r"\s*\[\s*([^\]\s]+)\s*\]\s*")
_ENTRY_RE = re.compile(r"\s*([A-Za-z0-9_.;-]+)\s*=\s*(.*?)\s*")


def cnf_sections(text: str) -> dict[str, list[tuple[str, str]]]:
    """The sections of an openssl.cnf and their `name = value` lines (comments dropped), in order.

    Only for openssl.cnf itself (ours or the guide's), never for openssl's output.
    """
    sections: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        head = _SECTION_RE.fullmatch(line)
        if head:
            current = head.group(1)
            sections.setdefault(current, [])
            continue
        entry = _ENTRY_RE.fullmatch(line)
        if entry:
            sections[current].append((entry.group(1), entry.group(2)))
    return sections


def render_openssl_cnf(profile: Profile, pki: Pki) -> str:
    """openssl.cnf for this PKI, from openssl.cnf.template and the profile."""
    ca = profile.ca
    subject = "\n".join(f"{attr:<19} = {value}" for attr, value in ca.subject.fields())
    inter = ca.intermediate
    inter_subject = ("\n".join(f"{attr:<19} = {value}" for attr, value in inter.subject.fields()) if inter
                     else "CN                  = (no intermediate: profile ca.intermediate is not set)")
    return render_file(
        "openssl.cnf.template",
        {
            "pki_dir": str(pki.root),
            "client_days": str(profile.clients.days),
            "crl_days": str(profile.crl.days),
            "digest": ca.digest,
            "ca_bits": str(ca.key_spec.bits or 4096),
            "ca_subject": subject,
            "intermediate_subject": inter_subject,
            "intermediate_days": str(inter.days if inter else ca.days),
            "root_crl_days": str(inter.root_crl_days if inter else profile.crl.days),
            "root_digest": ca.root_digest,
            "client_aia": (f"# OCSP responder (profile ocsp.url)\nauthorityInfoAccess     = OCSP;URI:{profile.ocsp.url}"
                           if profile.ocsp else "# no OCSP responder (profile ocsp: not set)"),
        },
    )


def genkey(out: str, key: KeySpec, label: str = "", passphrase: str | None = None) -> Command:
    """`openssl genrsa -out KEY BITS` (the guide) or `openssl genpkey` for an EC key.

    With a passphrase (ca.key.encrypt) the key is written AES-256 encrypted; the passphrase goes down a
    pipe (`-passout fd:N`), never on argv.
    """
    if key.type == "rsa":
        enc = ("-aes256", "-passout", "fd:@0") if passphrase is not None else ()
        argv: tuple[str, ...] = ("openssl", "genrsa", *enc, "-out", out, str(key.bits))
    else:
        enc = ("-aes-256-cbc", "-pass", "fd:@0") if passphrase is not None else ()
        argv = ("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", f"ec_paramgen_curve:{key.curve}", *enc, "-out", out)
    slow = key.type == "rsa" and (key.bits or 0) >= 4096
    return Command(argv, label=label or f"generating {key.describe()} key {out}", slow=slow,
                   fd_secrets=(passphrase,) if passphrase is not None else ())


def ca_selfsign(days: int) -> Command:
    """The guide's CA certificate: `openssl req -new -x509 ... -extensions v3_ca`."""
    return Command(
        ("openssl", "req", "-new", "-x509", "-days", str(days), "-key", Pki.ca_key, "-out", Pki.ca_cert,
         "-config", CNF, "-extensions", "v3_ca"),
        label=f"self-signing the CA certificate {Pki.ca_cert} ({days} days)",
        uses_ca_key=True,
    )


def client_csr(key: str, csr: str, name: str, sans: Sequence[str] = ()) -> Command:
    """The guide's CSR (`openssl req -new -key ... -out ... -subj /CN=NAME`), with -config explicit.

    SANs go in with -addext; `copy_extensions = copy` carries them into the certificate.
    """
    argv: tuple[str, ...] = ("openssl", "req", "-new", "-key", key, "-out", csr, "-subj", f"/CN={name}", "-config", CNF)
    if sans:
        argv += ("-addext", "subjectAltName=" + ",".join(sans))
    return Command(argv, label=f"creating the CSR {csr}")


def ca_sign(csr: str, crt: str, days: int, extensions: str = "v3_client") -> Command:
    """The guide's signing: `openssl ca -config openssl.cnf -extensions v3_client -days N -batch ...`."""
    return Command(
        ("openssl", "ca", "-config", CNF, "-extensions", extensions, "-days", str(days), "-batch",
         "-in", csr, "-out", crt),
        label=f"signing {crt} with the CA ({days} days)",
        uses_ca_key=True,
    )


def pkcs12_export(name: str, key: str, crt: str, out: str, password: str | None, profile: str,
                  certfile: str = Pki.ca_cert) -> Command:
    """The guide's bundle: `openssl pkcs12 -export ... -certfile ca/ca.crt -name NAME -passout stdin`
    (`ca/chain.pem` with an intermediate CA, so the device gets the whole chain)."""
    return Command(
        ("openssl", "pkcs12", "-export", "-out", out, "-inkey", key, "-in", crt, "-certfile", certfile,
         "-name", name, "-passout", "stdin", *P12_FLAGS[profile]),
        label=f"exporting {out} ({profile} PKCS#12)",
        secret=password if password is not None else "",
    )


def pkcs12_check(p12: str, password: str | None, profile: str) -> Command:
    """Read a bundle back with its password (MAC and decryption), so a bad bundle never ships."""
    legacy = ("-legacy",) if profile == "legacy" else ()
    return Command(
        ("openssl", "pkcs12", "-in", p12, "-noout", "-passin", "stdin", *legacy),
        label=f"checking {p12} opens with its password",
        secret=password if password is not None else "",
    )


def gencrl(out: str = Pki.crl) -> Command:
    """The guide's CRL: `openssl ca -config openssl.cnf -gencrl -out crl/ca.crl`."""
    return Command(("openssl", "ca", "-config", CNF, "-gencrl", "-out", out), label=f"generating the CRL {out}",
                   uses_ca_key=True)


# --------------------------------------------------------------- two-tier PKI (ca.intermediate)


def root_selfsign(days: int) -> Command:
    return Command(
        ("openssl", "req", "-new", "-x509", "-days", str(days), "-key", Pki.root_key, "-out", Pki.root_cert,
         "-config", CNF, "-extensions", "v3_root"),
        label=f"self-signing the root certificate {Pki.root_cert} ({days} days)", uses_ca_key=True)


def intermediate_csr() -> Command:
    return Command(("openssl", "req", "-new", "-key", Pki.ca_key, "-out", "ca/ca.csr", "-config", CNF,
                    "-section", "req_intermediate"), label="creating the issuing CA's request ca/ca.csr", uses_ca_key=True)


def intermediate_sign(days: int) -> Command:
    return Command(("openssl", "ca", "-config", CNF, "-name", "root_ca", "-extensions", "v3_intermediate", "-days", str(days),
                    "-notext", "-batch", "-in", "ca/ca.csr", "-out", Pki.ca_cert),
                   label=f"signing the issuing CA {Pki.ca_cert} with the root ({days} days)", uses_ca_key=True)
