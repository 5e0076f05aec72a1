"""add-client --from-file: many clients, keys in parallel, openssl ca one at a time; a bad list writes nothing."""

from __future__ import annotations

import json

import pytest

from .conftest import openssl, tree

pytestmark = pytest.mark.integration


def test_a_batch_is_issued_and_each_bundle_opens(fast_pki, mtls, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("# new devices\nphone-1\nphone-2\n\nsensor-3  # the lab\nsensor-4\n")
    res = mtls(["--pki-dir", str(fast_pki), "add-client", "--from-file", str(names), "--json", "--jobs", "2"])
    assert res.code == 0, res.err
    lines = [json.loads(line) for line in res.out.splitlines()]
    assert [x["name"] for x in lines] == ["phone-1", "phone-2", "sensor-3", "sensor-4"]
    assert len({x["serial"] for x in lines}) == 4
    for x in lines:
        crt = fast_pki / f"certs/{x['name']}.crt"
        assert openssl("verify", "-CAfile", "ca/ca.crt", str(crt), cwd=fast_pki).stdout.strip().endswith("OK")
        serial = openssl("x509", "-in", str(crt), "-noout", "-serial").stdout.strip().split("=")[1]
        assert serial == x["serial"]
        pw_file = x["password_file"]
        modes = {rel: (fast_pki / rel).stat().st_mode & 0o777 for rel in (
            f"private/{x['name']}.key", f"certs/{x['name']}.p12", f"private/{x['name']}.p12.password",
            f"certs/{x['name']}.crt", f"certs/{x['name']}.csr")}
        assert list(modes.values()) == [0o600, 0o600, 0o600, 0o644, 0o644], modes  # the guide's modes, bulk or not
        openssl("pkcs12", "-in", x["p12"], "-noout", "-passin", f"file:{pw_file}")
        assert x["name"] not in res.err
    assert "password" not in " ".join(x for line in lines for x in line if x != "password_file")
    assert sorted(p.name for p in (fast_pki / "private").iterdir() if p.name.startswith(".")) == []  # no work directory left


@pytest.mark.parametrize("content,needle", [
    ("ok-1\n../evil\n", "line 2"),
    ("ok-1\nok-1\n", "listed twice"),
    ("\n# nothing\n", "lists no names"),
])
def test_a_bad_list_writes_nothing(fast_pki, mtls, tmp_path, content, needle):
    names = tmp_path / "names.txt"
    names.write_text(content)
    before = tree(fast_pki)
    res = mtls(["--pki-dir", str(fast_pki), "add-client", "--from-file", str(names)])
    assert res.code == 2 and needle in res.err
    assert tree(fast_pki) == before


def test_a_conflict_anywhere_in_the_list_writes_nothing(fast_pki, mtls, tmp_path):
    assert mtls(["--pki-dir", str(fast_pki), "add-client", "taken"]).code == 0
    names = tmp_path / "names.txt"
    names.write_text("fresh-1\ntaken\nfresh-2\n")
    before = tree(fast_pki)
    res = mtls(["--pki-dir", str(fast_pki), "add-client", "--from-file", str(names)])
    assert res.code == 2 and "'taken' already has an active certificate" in res.err
    assert tree(fast_pki) == before


def test_from_file_refuses_per_client_options(fast_pki, mtls, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("a\n")
    res = mtls(["--pki-dir", str(fast_pki), "add-client", "--from-file", str(names), "--password-stdin"], stdin="x\n")
    assert res.code == 2 and "generated password" in res.err
    assert mtls(["--pki-dir", str(fast_pki), "add-client", "x", "--from-file", str(names)]).code == 2
