"""Names that cannot be fooled: full matches only (a trailing newline is refused), and names that would land
on the PKI's own files or take the OCSP signer's role are reserved, whatever their case."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtlsctl import validate
from mtlsctl.errors import InputError
from mtlsctl.ocsp import SIGNER
from mtlsctl.pki import DIRS, Pki

from .conftest import tree

RESERVED = ["ca", "root", "chain", "ocsp-responder"]


def _variants(name: str) -> list[str]:
    return sorted({name, name.upper(), name.capitalize(), name.swapcase()[:1] + name[1:]})


def _refused(res, *needles: str) -> None:
    assert res.code == 2, (res.code, res.out, res.err)
    assert res.err.startswith("error: ") and "Traceback" not in res.err
    assert len(res.err.strip().splitlines()) <= 2, res.err  # the message, and at most a hint
    for needle in needles:
        assert needle in res.err, res.err


def test_every_file_stem_of_the_pki_and_the_ocsp_signer_is_reserved():
    """The table in validate.py is written out (pki.py imports validate): keep it in step with pki.Pki."""
    stems = set()
    for attr, value in vars(Pki).items():
        if isinstance(value, str) and "/" in value and not attr.startswith("_"):
            folder, _, filename = value.partition("/")
            assert folder in DIRS
            stems.add(filename.split(".", 1)[0].lower())
    assert stems == {"ca", "root", "chain"}
    assert stems | {SIGNER} == set(validate._RESERVED_NAMES) == set(RESERVED)


@pytest.mark.parametrize("name", [v for n in RESERVED for v in _variants(n) if v != "ocsp-responder"])
def test_reserved_names_are_refused_in_every_role(name):
    for role in (None, *validate.NAME_ROLES):
        with pytest.raises(InputError, match="is reserved: it collides with"):
            validate.client_name(name, role=role)


def test_the_ocsp_signers_name_only_for_the_signer_and_lookups():
    assert validate.client_name(SIGNER, role="ocsp") == SIGNER  # ocsp setup issues it
    assert validate.client_name(SIGNER) == SIGNER  # verify / revoke / ocsp check look it up
    for role in ("client", "server"):
        with pytest.raises(InputError, match="collides with the OCSP signer"):
            validate.client_name(SIGNER, role=role)
    with pytest.raises(ValueError):
        validate.client_name("x", role="admin")  # a caller's typo is a bug, not a silent pass


@pytest.mark.parametrize("name", ["abc\n", "abc\r\n", "\nabc", "ab\nc", "abc\x00", "abc\t", "abc "])
def test_a_name_with_a_line_break_or_control_character_is_refused_naming_it(name):
    with pytest.raises(InputError) as exc:
        validate.client_name(name)
    assert "\n" not in exc.value.message  # one line: the character is shown escaped
    bad = next(c for c in name if not (c.isalnum() or c in "._-"))
    assert repr(bad) in exc.value.message


@pytest.mark.parametrize("name", [v for n in RESERVED for v in _variants(n)])
def test_add_client_refuses_reserved_names_whatever_the_case(fast_pki, mtls, name):
    before = tree(fast_pki)
    _refused(mtls(["--pki-dir", str(fast_pki), "add-client", name]), "is reserved", "collides with")
    assert tree(fast_pki) == before


@pytest.mark.parametrize("name", ["Root", "CHAIN", "OCSP-Responder", "ocsp-responder"])
def test_add_server_refuses_reserved_names(fast_pki, mtls, name):
    before = tree(fast_pki)
    _refused(mtls(["--pki-dir", str(fast_pki), "add-server", name, "--san", "DNS:host.example"]), "is reserved")
    assert tree(fast_pki) == before


@pytest.mark.parametrize("name", ["ocsp-responder", "Ca"])
def test_sign_csr_refuses_reserved_names(fast_pki, mtls, tmp_path, name):
    from .test_sign_csr import make_csr

    csr = make_csr(tmp_path, f"/CN={name}")  # the device asks for exactly that name
    before = tree(fast_pki)
    _refused(mtls(["--pki-dir", str(fast_pki), "sign-csr", str(csr), "--name", name]), "is reserved")
    assert tree(fast_pki) == before


def test_a_names_file_with_a_reserved_name_is_refused_before_anything_is_issued(fast_pki, mtls, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("laptop\nOCSP-Responder\n")
    before = tree(fast_pki)
    _refused(mtls(["--pki-dir", str(fast_pki), "add-client", "--from-file", str(names)]), "line 2", "is reserved")
    assert tree(fast_pki) == before


@pytest.mark.parametrize("args", [
    ["add-client", "abc\n"],
    ["add-client", "--dry-run", "abc\n"],
    ["add-server", "web\n", "--san", "DNS:web.example"],
    ["export", "abc\n"],
    ["revoke", "abc\n", "--no-reload"],
    ["verify", "abc\n"],
])
def test_a_trailing_newline_is_refused_by_every_command_that_takes_a_name(fast_pki, mtls, args):
    before = tree(fast_pki)
    _refused(mtls(["--pki-dir", str(fast_pki), *args]), "'\\n'")
    assert tree(fast_pki) == before


def test_sign_csr_refuses_a_name_with_a_trailing_newline(fast_pki, mtls, tmp_path):
    from .test_sign_csr import make_csr

    csr = make_csr(tmp_path, "/CN=dev1")
    before = tree(fast_pki)
    _refused(mtls(["--pki-dir", str(fast_pki), "sign-csr", str(csr), "--name", "dev1\n"]), "'\\n'")
    assert tree(fast_pki) == before


def test_the_refusal_names_the_file_it_collides_with(fast_pki, mtls):
    res = mtls(["--pki-dir", str(fast_pki), "add-client", "Root"])
    _refused(res, "private/root.key")
    assert not (fast_pki / "private/Root.key").exists() and not Path(fast_pki / "certs/Root.crt").exists()


def test_sign_csr_refuses_a_requested_san_with_a_fragment_naming_it(fast_pki, mtls, tmp_path):
    """A CSR can carry `URI:...#frag` (escaped when it was made); its SANs are checked like --san, where
    openssl's config parser would cut the list at '#' (FIELD-NOTES)."""
    from .test_sign_csr import make_csr

    csr = make_csr(tmp_path, "/CN=dev1", "subjectAltName=URI:https://x.example/\\#frag,DNS:dev1.example")
    before = tree(fast_pki)
    _refused(mtls(["--pki-dir", str(fast_pki), "sign-csr", str(csr), "--name", "dev1"]), "'#'")
    assert tree(fast_pki) == before
