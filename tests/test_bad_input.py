"""Bad input is refused before anything is written: exit 2, a one-line message, no traceback."""

from __future__ import annotations

import pytest

from .conftest import tree

BAD_NAMES = ["", "../etc/passwd", "a/b", ".hidden", "a..b", "-rf", "x" * 65, "sp ace", "semi;colon", "ca", "naïve",
             "new\nline", "$(id)", "abc\n", "abc\r\n", "CA", "Root", "chain", "OCSP-Responder"]


def _assert_refused(res, *needles: str) -> None:
    assert res.code == 2, (res.code, res.out, res.err)
    assert "Traceback" not in res.err
    assert res.err.startswith("error: ")
    for needle in needles:
        assert needle in res.err, res.err


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_client_names(fast_pki, mtls, name):
    before = tree(fast_pki)
    res = mtls(["--pki-dir", str(fast_pki), "add-client", name])
    _assert_refused(res)
    assert len(res.err.strip().splitlines()) <= 2  # the message, and at most a hint
    assert tree(fast_pki) == before


@pytest.mark.parametrize("san,needle", [
    ("DNS:a,IP:1.2.3.4", "forbidden character"),
    ("DNS:-bad-.example", "not a valid DNS name"),
    ("IP:300.1.1.1", "not a valid IP address"),
    ("email:nope", "not a valid e-mail"),
    ("URI:no scheme", "forbidden character"),
    ("otherName:1.2.3;UTF8:x", "not TYPE:VALUE"),
    ("DNS", "not TYPE:VALUE"),
    ("DNS:a\"b", "forbidden character"),
    # openssl's config parser reads the -addext value: '#' would silently cut the SAN list (FIELD-NOTES)
    ("URI:https://x.example/#frag", "'#'"),
    ("URI:https://x.example/a#b,DNS:c", "'#'"),
    ("URI:https://x.example/$HOME", "'$'"),
    ("URI:https://x.example/a\\b", "'\\\\'"),
    ("URI:https://x.example/'", "\"'\""),
    ("DNS:a.example\n", "'\\n'"),
    ("email:a@b.example\n", "'\\n'"),
    ("URI:https://x.example/\n", "'\\n'"),
    ("IP:10.0.0.1\n", "'\\n'"),
    ("DNS:a.example\r", "'\\r'"),
    ("URI:https://x.example/é", "'é'"),
    ("IP:fe80::1%eth0", "zone"),
])
def test_bad_sans(fast_pki, mtls, san, needle):
    before = tree(fast_pki)
    _assert_refused(mtls(["--pki-dir", str(fast_pki), "add-client", "ok-name", "--san", san]), needle)
    assert tree(fast_pki) == before


@pytest.mark.parametrize("days", ["0", "-5", "3651", "abc", "1.5"])
def test_bad_days(fast_pki, mtls, days):
    before = tree(fast_pki)
    res = mtls(["--pki-dir", str(fast_pki), "add-client", "ok-name", "--days", days])
    assert res.code == 2 and "Traceback" not in res.err
    assert tree(fast_pki) == before


@pytest.mark.parametrize("stdin,needle", [
    ("", "is empty"),
    ("\n", "is empty"),
    ("two\nlines\n", "line break"),
    ("crlf\r\n", "carriage return"),
    ("x" * 1024, "longer than 1023"),
])
def test_bad_passwords(fast_pki, mtls, stdin, needle):
    before = tree(fast_pki)
    _assert_refused(mtls(["--pki-dir", str(fast_pki), "add-client", "ok-name", "--password-stdin"], stdin=stdin), needle)
    assert tree(fast_pki) == before


def test_password_file_and_stdin_together_and_missing_file(fast_pki, mtls, tmp_path):
    before = tree(fast_pki)
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    _assert_refused(mtls(["--pki-dir", str(fast_pki), "add-client", "a", "--password-stdin", "--password-file", str(pw)],
                         stdin="x\n"), "mutually exclusive")
    _assert_refused(mtls(["--pki-dir", str(fast_pki), "add-client", "a", "--password-file", str(tmp_path / "none")]),
                    "cannot read --password-file")
    assert tree(fast_pki) == before


def test_bad_key_type_and_p12_profile(fast_pki, mtls):
    before = tree(fast_pki)
    _assert_refused(mtls(["--pki-dir", str(fast_pki), "add-client", "a", "--key-type", "dsa"]), "rsa or ec")
    _assert_refused(mtls(["--pki-dir", str(fast_pki), "add-client", "a", "--p12", "weak"]), "compat, modern or legacy")
    assert tree(fast_pki) == before


@pytest.mark.parametrize("yaml_text,needles", [
    ("ca:\n  key: {type: rsa, bits: 1024}\n", ["ca.key.bits: 1024 is not allowed", "2048"]),
    ("ca:\n  key: {type: ec, curve: P-521}\n", ["ca.key.curve: 'P-521' is not allowed", "'P-256' or 'P-384'"]),
    ("ca:\n  key: {type: ec, bits: 2048}\n", ["ca.key", "bits is for type: rsa"]),
    ("clients:\n  days: 0\n", ["clients.days: 0 is not allowed"]),
    ("clients:\n  days: '365'\n", ["clients.days: '365' is not allowed"]),
    ("clients:\n  p12: weak\n", ["clients.p12: 'weak'", "'compat', 'modern' or 'legacy'"]),
    ("cliants: {}\n", ["cliants: unknown key; allowed: pki_dir, ca, clients"]),
    ("ca:\n  subject: {O: x}\n", ["ca.subject.CN: required and missing"]),
    ("ca:\n  subject: {CN: 'a$b'}\n", ["ca.subject.CN", "'$'"]),
    ("ca:\n  subject: {CN: x, C: Spain}\n", ["ca.subject.C", "two capital letters"]),
    ("ca:\n  subject: {CN: x, E: y}\n", ["ca.subject.E: unknown key; allowed: C, ST, L, O, OU, CN"]),
    # `listen: 443` is accepted as a port (issue 13); a boolean is still not one
    ("nginx: {listen: true}\n", ["nginx.listen: True is not allowed: input should be a valid string"]),
    ("nginx: {lisen: '443'}\n", ["nginx.lisen: unknown key; allowed: server_name, listen"]),
    ("nginx: {server_name: 'a.example; include /etc/shadow'}\n", ["nginx.server_name", "';'"]),
    ("nginx: {allow: ['CN=a\"; }']}\n", ["nginx.allow"]),
    ("nginx: {allow: ['~(unclosed']}\n", ["does not compile"]),
    ("nginx: {verify_client: optional_no_ca}\n", ["'on' or 'optional'"]),
    ("nginx: {upstream: 'http://x/ ; evil'}\n", ["nginx.upstream"]),
    ("nginx: {server_key: relative/key.pem}\n", ["absolute path"]),
    ("nginx: {session_timeout: 1 day}\n", ["nginx time"]),
    ("nginx: {rate_limit: {rate: fast}}\n", ["5r/s"]),
    ("pki_dir: '/tmp/a#b'\n", ["pki_dir", "'#'"]),
    # a trailing newline passes `^...$` with re.match: every pattern is a full match
    ("nginx: {session_timeout: \"10m\\n\"}\n", ["nginx.session_timeout", "nginx time"]),
    ("nginx: {rate_limit: {rate: \"5r/s\\n\"}}\n", ["nginx.rate_limit.rate", "5r/s"]),
    ("nginx: {listen: \"443\\n\"}\n", ["nginx.listen", "PORT"]),
    ("nginx: {upstream: \"http://127.0.0.1:8080\\n\"}\n", ["nginx.upstream", "'\\n'"]),
    ("nginx: {server_name: \"a.example\\n\"}\n", ["nginx.server_name", "'\\n'"]),
    ("nginx: {server_cert: \"/etc/ssl/a.crt\\n\"}\n", ["nginx.server_cert", "'\\n'"]),
    ("nginx: {allow: [\"CN=a\\n\"]}\n", ["nginx.allow", "'\\n'"]),
    ("nginx: {allow: [\"~CN=a-.*\\n\"]}\n", ["nginx.allow", "'\\n'"]),
    ("ocsp: {url: \"http://127.0.0.1:8889\\n\", port: 8889}\n", ["ocsp.url", "http://IP"]),
    ("ca:\n  subject: {CN: \"Lab CA\\n\"}\n", ["ca.subject.CN", "'\\n'"]),
    ("pki_dir: \"/tmp/pki\\n\"\n", ["pki_dir", "'\\n'"]),
    # '#' and the other characters nginx or openssl.cnf read as syntax, named in the message
    ("nginx: {server_name: 'a.example #x'}\n", ["nginx.server_name", "'#'"]),
    ("nginx: {server_cert: '/etc/ssl/a#b.crt'}\n", ["nginx.server_cert", "'#'"]),
    ("nginx: {access_log: '/var/log/a\\b.log'}\n", ["nginx.access_log", "'\\\\'"]),
    ("nginx: {error_log: '/var/log/${x}.log'}\n", ["nginx.error_log", "'$'", "'{'", "'}'"]),
    ("nginx: {upstream: 'http://x/#frag'}\n", ["nginx.upstream", "'#'"]),
    ("nginx: {allow: ['CN=a#b']}\n", ["nginx.allow", "'#'"]),
    ("nginx: {allow: ['~CN=a-.*#']}\n", ["nginx.allow", "'#'"]),
    ("nginx: {allow: ['~CN=a;b']}\n", ["nginx.allow", "';'"]),
    ("nginx: {allow: ['CN=a\\b']}\n", ["nginx.allow", "'\\\\'"]),
    ("nginx: {allow: ['~CN=a\\\\b']}\n", ["nginx.allow", "double backslash"]),
    ("nginx: {allow: ['~CN=a)|(CN=b']}\n", ["nginx.allow", "does not compile"]),
    ("nginx: {allow: ['~*cn=admin']}\n", ["nginx.allow", "~*"]),
    ("ca:\n  subject: {CN: 'Lab # CA'}\n", ["ca.subject.CN", "'#'"]),
    ("ca:\n  subject: {CN: x, O: 'Lab \\\\ Org'}\n", ["ca.subject.O", "'\\\\'"]),
    ("ca:\n  subject: {CN: x, OU: 'say \"hi\"'}\n", ["ca.subject.OU", "the double quote (\")", "position 5"]),
    # the issue's example: the apostrophe is named in words, with its position and why (not `"'"`)
    ("ca:\n  subject: {CN: \"Bob's CA\"}\n", ["ca.subject.CN", "the apostrophe (')", "position 4", "reads it as a quote"]),
    ("- just\n- a list\n", ["top level must be a mapping"]),
    ("ca: [\n", ["YAML syntax error at line"]),
])
def test_bad_profiles_are_refused_and_nothing_is_created(tmp_path, mtls, yaml_text, needles):
    prof = tmp_path / "profile.yaml"
    prof.write_text(yaml_text)
    res = mtls(["--pki-dir", str(tmp_path / "pki"), "--profile", str(prof), "init"])
    _assert_refused(res, *needles)
    assert not (tmp_path / "pki").exists()


def test_several_profile_problems_one_line_each(tmp_path, mtls):
    prof = tmp_path / "profile.yaml"
    prof.write_text("ca:\n  days: 0\nclients:\n  days: 99999\n  p12: x\n")
    res = mtls(["--pki-dir", str(tmp_path / "pki"), "--profile", str(prof), "init"])
    assert res.code == 2
    lines = res.err.strip().splitlines()
    assert lines[0].startswith("error: invalid profile") and len(lines) == 4
    assert any(line.strip().startswith("ca.days: 0") for line in lines)


@pytest.mark.parametrize("pki_dir", ["/tmp/with$dollar", "/tmp/with#hash", "/tmp/quote'd"])
def test_pki_dirs_that_openssl_cnf_cannot_hold_are_refused(mtls, pki_dir):
    res = mtls(["--pki-dir", pki_dir, "init"])
    _assert_refused(res, "PKI directory")


def test_missing_profile_file(tmp_path, mtls):
    _assert_refused(mtls(["--profile", str(tmp_path / "nope.yaml"), "--pki-dir", str(tmp_path / "p"), "init"]), "does not exist")


def test_partial_profile_keeps_the_defaults(tmp_path, mtls):
    prof = tmp_path / "profile.yaml"
    prof.write_text("ca:\n  key: {type: ec}\n  subject: {CN: Partial CA}\n")
    res = mtls(["--pki-dir", str(tmp_path / "pki"), "--profile", str(prof), "init", "--dry-run"])
    assert res.code == 0, res.err
    assert "ec_paramgen_curve:P-384" in res.out  # an EC CA defaults to P-384
    assert "-days 3650" in res.out


def test_unknown_option_is_exit_2_without_traceback(mtls):
    res = mtls(["add-client", "--frobnicate"])
    assert res.code == 2 and "No such option" in res.err and "Traceback" not in res.err


@pytest.mark.parametrize("args,needle", [
    (["nginx", "render", "--verify-client", "optional_no_ca"], "on or optional"),
    (["nginx", "render", "--rate-limit", "fast"], "5r/s"),
    (["nginx", "render", "--burst", "5"], "--burst needs --rate-limit"),
    (["add-server", "web", "--san", "email:a@b.example"], "DNS: or IP:"),
    (["revoke", "x", "--reason", "removeFromCRL"], "not a revocation reason"),
    (["revoke", "--serial", "xyz"], "not a hexadecimal serial"),
    (["list", "--status", "alive"], "valid, expiring, expired, revoked"),
    (["renew", "--within", "0"], "--within"),
    (["demo", "--port", "80"], "1024..65535"),
])
def test_other_commands_refuse_bad_input(fast_pki, mtls, args, needle):
    before = tree(fast_pki)
    res = mtls(["--pki-dir", str(fast_pki), *args])
    _assert_refused(res, needle)
    assert tree(fast_pki) == before
