"""Property-based hostile input: whatever a user types, mtlsctl answers 0 or 2 with one `error:` line,
never a traceback, and a refusal never writes anything."""

from __future__ import annotations

import re
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtlsctl import validate
from mtlsctl.errors import InputError, ProfileError
from mtlsctl.profile import allow_regex, parse_profile

from .conftest import run_cli, tree

pytestmark = pytest.mark.integration

NASTY = st.sampled_from(["../", "/", "..", "\n", "\r", "\x00", "$(id)", "`id`", ";", "{", "}", '"', "'", "\\", " ",
                         "-", ".", "~", "*", "%", "é", "\u202e", "CN=", ",", "=", ":", "\t", "#", "|", "CA", "root"])
TEXT = st.one_of(st.text(max_size=80), st.lists(st.one_of(NASTY, st.text(string.ascii_letters + string.digits, max_size=5)),
                                                  max_size=12).map("".join))
SAN = st.one_of(TEXT, st.tuples(st.sampled_from(["DNS", "IP", "email", "URI", "dns", "otherName", ""]), TEXT).map(":".join))
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _assert_answer(res, max_lines: int | None = 2) -> None:
    """0 or 2; on 2 an `error:` line (and a hint), or for a profile one line per problem."""
    assert res.code in (0, 2), (res.code, res.err)
    assert "Traceback" not in res.err and "internal error" not in res.err
    if res.code == 2:
        assert res.err.startswith("error: "), res.err
        if max_lines is not None:
            assert len(res.err.strip().splitlines()) <= max_lines, res.err


@FAST
@given(name=TEXT, san=st.lists(SAN, max_size=3), days=st.one_of(st.integers(-10**6, 10**6), TEXT))
def test_add_client_with_any_input(fast_pki, name, san, days):
    before = tree(fast_pki)
    args = ["--pki-dir", str(fast_pki), "add-client", "--dry-run", "--days", str(days), "--", name]
    for s in san:
        args[4:4] = ["--san", s]
    res = run_cli(args)
    _assert_answer(res)
    assert tree(fast_pki) == before


@FAST
@given(password=st.text(max_size=1100))
def test_any_password_from_stdin(fast_pki, password):
    before = tree(fast_pki)
    res = run_cli(["--pki-dir", str(fast_pki), "export", "nobody", "--password-stdin"], stdin=password)
    _assert_answer(res)
    assert res.code == 2 and tree(fast_pki) == before  # refused: either the password or the unknown name


@settings(max_examples=300, deadline=None)
@given(password=st.text(max_size=1100))
def test_password_rules(password):
    try:
        validate.password(password, source="x")
    except InputError:
        assert password == "" or any(c in password for c in "\r\n\x00") or len(password) > 1023
    else:
        assert password and len(password) <= 1023 and not any(c in password for c in "\r\n\x00")


@settings(max_examples=300, deadline=None)
@given(name=TEXT)
def test_a_name_that_passes_can_never_leave_the_pki(name):
    try:
        validate.client_name(name)
    except InputError:
        return
    assert "/" not in name and ".." not in name and not name.startswith((".", "-")) and name.isascii()
    assert name.lower() not in ("ca", "root", "chain") and 0 < len(name) <= 64
    assert re.fullmatch(r"[A-Za-z0-9._-]+", name)  # nothing after the last allowed character, not even a newline
    if name.lower() == "ocsp-responder":
        with pytest.raises(InputError):
            validate.client_name(name, role="client")


@settings(max_examples=300, deadline=None)
@given(value=SAN)
def test_a_san_that_passes_holds_nothing_openssl_config_reads_as_syntax(value):
    """The SANs are joined into one -addext value that openssl's config parser reads (`#` cuts it there)."""
    try:
        out = validate.san(value)
    except InputError:
        return
    rest = out.split(":", 1)[1]
    assert rest and rest.isascii() and rest.isprintable()
    assert not any(c in rest for c in ",#$\\\"' \t\r\n")


# DN-like text with the characters that make or break a regex, so hypothesis finds near misses
DN_TEXT = st.text(alphabet="CN=abAB.-_,O |", max_size=12)
ALLOW_ENTRY = st.one_of(DN_TEXT.map(lambda t: "CN=" + t), st.text(alphabet="CN=abAB.-|*+?()[]^$\\", max_size=12).map("~".__add__),
                        TEXT)


@settings(max_examples=500, deadline=None)
@given(entry=ALLOW_ENTRY, dn=st.one_of(DN_TEXT, DN_TEXT.map(lambda t: "CN=" + t)))
def test_an_allow_entry_admits_exactly_what_it_says(entry, dn):
    """nginx searches the rendered regex anywhere in $ssl_client_s_dn: it must anchor itself, as a whole.

    A DN entry admits that DN and nothing else (not another case, not a longer DN); `~PATTERN` admits
    exactly the DNs PATTERN matches in full (`~CN=a|CN=b` does not admit `CN=a.evil`)."""
    try:
        rendered = allow_regex(entry)
    except ValueError:
        return
    admitted = re.search(rendered, dn) is not None
    if entry.startswith("~"):
        pattern = entry[1:].removeprefix("^").removesuffix("$")
        assert admitted == (re.fullmatch(pattern, dn) is not None), (entry, rendered, dn)
    else:
        assert admitted == (dn == entry), (entry, rendered, dn)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**9, 10**9), st.floats(allow_nan=False), TEXT)
KEYS = st.sampled_from(["pki_dir", "ca", "clients", "crl", "renew", "nginx", "subject", "key", "days", "type", "bits",
                        "curve", "CN", "C", "p12", "within_days", "refresh_within_days", "allow", "listen", "server_name",
                        "upstream", "rate_limit", "rate", "burst", "test_command", "reload_command", "encrypt", "junk"])
DOCS = st.recursive(SCALARS, lambda children: st.one_of(st.lists(children, max_size=4),
                                                        st.dictionaries(KEYS, children, max_size=5)), max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(doc=st.dictionaries(KEYS, DOCS, max_size=6))
def test_any_profile_is_accepted_or_refused_cleanly(doc):
    try:
        parse_profile(doc, "fuzz")
    except ProfileError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)


@FAST
@given(doc=st.dictionaries(KEYS, DOCS, max_size=5))
def test_any_profile_file_through_the_cli(tmp_path_factory, doc):
    tmp = tmp_path_factory.mktemp("prof")
    prof = tmp / "p.yaml"
    prof.write_text(yaml.safe_dump(doc))
    res = run_cli(["--pki-dir", str(tmp / "pki"), "--profile", str(prof), "init", "--dry-run"])
    _assert_answer(res, max_lines=None)
    if res.code == 2 and res.err.startswith("error: invalid profile") and res.err.strip().endswith(":"):
        pytest.fail("a profile error without problems")
    assert not (tmp / "pki").exists()
