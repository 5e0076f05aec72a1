"""The validated profile, built lazily and cached by content (issue 14, a fast start): the same result as
validating, and a cache that is only ever a cache — private, content-keyed, never followed, never needed."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from mtlsctl import cache, profile_file
from mtlsctl import profile as prof
from mtlsctl.errors import ProfileError
from mtlsctl.pki import resolve_settings
from mtlsctl.profile import GUIDE_SUBJECT, CaProfile, ClientsProfile, KeySpec, Profile, default_profile, load_profile

DOCS = Path(__file__).resolve().parent.parent / "docs"
PROFILES = [
    "",
    "clients: {days: 90, key: {type: ec}}\n",
    "nginx:\n  listen: 8443\n  allow: ['CN=alice', '~CN=admin-[0-9]+']\n  rate_limit: {rate: 5r/s}\n",
    (DOCS / "profile.example.yaml").read_text(),
    (DOCS / "profile.full.yaml").read_text(),
]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    where = tmp_path / "cache"
    monkeypatch.setenv("MTLSCTL_CACHE_DIR", str(where))
    monkeypatch.delenv("MTLSCTL_NO_CACHE", raising=False)
    return where


def _entries(where: Path) -> list[Path]:
    return sorted(where.glob("profile-*.json")) if where.exists() else []


def _no_validation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("validated although the cache holds this profile")

    monkeypatch.setattr(prof, "parse_profile", refuse)
    monkeypatch.setattr(prof, "_safe_yaml", refuse)


# ------------------------------------------------------------------ the same result, built lazily


def test_the_built_in_defaults_are_valid_and_equal_a_validated_profile():
    """The defaults are built without validation (model_construct): each must be what validation gives."""
    assert default_profile() == Profile.model_validate({}) == Profile()
    assert Profile.model_validate(default_profile().model_dump(mode="json")) == default_profile()
    for value, model in ((GUIDE_SUBJECT, type(GUIDE_SUBJECT)), (CaProfile.model_construct(), CaProfile),
                         (ClientsProfile.model_construct(), ClientsProfile)):
        assert model.model_validate(value.model_dump()) == value
    assert default_profile().model_dump() == Profile.model_validate({}).model_dump()


@pytest.mark.parametrize("spec,bits,curve", [({"type": "rsa"}, 2048, None), ({"type": "rsa", "bits": 3072}, 3072, None),
                                             ({"type": "ec"}, None, "P-256"), ({"type": "ec", "curve": "P-384"}, None, "P-384")])
def test_resolved_key_specs_are_valid(spec, bits, curve):
    resolved = KeySpec.model_validate(spec).resolved(2048, "P-256")
    assert (resolved.bits, resolved.curve) == (bits, curve)
    assert KeySpec.model_validate(resolved.model_dump()) == resolved


@pytest.mark.parametrize("text", PROFILES, ids=["empty", "clients", "nginx", "example", "full"])
def test_a_cached_profile_is_the_validated_one(text, tmp_path, cache_dir, monkeypatch):
    path = tmp_path / "mtls.yaml"
    path.write_text(text)
    validated = load_profile(path)
    assert validated == prof.parse_profile(yaml.safe_load(text), "x")
    assert len(_entries(cache_dir)) == 1
    _no_validation(monkeypatch)
    again = load_profile(path)
    assert again == validated and again.model_dump() == validated.model_dump()
    for section in ("ca", "clients", "crl", "renew", "nginx", "ocsp", "publish"):
        assert type(getattr(again, section)) is type(getattr(validated, section))
    assert (again.ca.key_spec, again.ca.digest, again.ca.root_digest, again.clients.key_spec) == \
           (validated.ca.key_spec, validated.ca.digest, validated.ca.root_digest, validated.clients.key_spec)
    assert again.to_yaml_dict(tmp_path) == validated.to_yaml_dict(tmp_path)


def test_resolve_settings_uses_the_cache_and_the_defaults_without_validating(tmp_path, cache_dir, monkeypatch):
    pki = tmp_path / "pki"
    pki.mkdir()
    (pki / "mtls.yaml").write_text("clients: {days: 42}\n")
    assert resolve_settings(pki, None, environ={}).profile.clients.days == 42
    _no_validation(monkeypatch)
    assert resolve_settings(pki, None, environ={}).profile.clients.days == 42
    assert resolve_settings(tmp_path / "none", None, environ={}).profile == Profile.model_validate({})


# ------------------------------------------------------------------ keyed by content and code


def test_the_key_is_the_content_not_the_path(tmp_path, cache_dir):
    path = tmp_path / "mtls.yaml"
    path.write_text("clients: {days: 90}\n")
    assert load_profile(path).clients.days == 90
    path.write_text("clients: {days: 91}\n")  # same path, same size, same second
    assert load_profile(path).clients.days == 91
    path.write_text("clients: {days: '90'}\n")  # invalid now: validated again, refused, not cached
    with pytest.raises(ProfileError):
        load_profile(path)
    assert len(_entries(cache_dir)) == 2
    other = tmp_path / "elsewhere.yaml"
    other.write_text("clients: {days: 90}\n")
    assert load_profile(other).clients.days == 90 and len(_entries(cache_dir)) == 2  # same bytes: the same entry


def test_other_validating_code_misses(tmp_path, cache_dir, monkeypatch):
    path = tmp_path / "mtls.yaml"
    path.write_text("clients: {days: 90}\n")
    load_profile(path)
    monkeypatch.setattr(profile_file, "code_key", lambda: b"another mtlsctl")
    load_profile(path)
    assert len(_entries(cache_dir)) == 2


def test_an_invalid_profile_is_never_cached(tmp_path, cache_dir):
    path = tmp_path / "mtls.yaml"
    for text in ("clients: {days: 0}\n", "nginx: {reload_command: \"a\\nb\"}\n", "unknown: 1\n", "a: [\n"):
        path.write_text(text)
        with pytest.raises(ProfileError):
            load_profile(path)
    assert _entries(cache_dir) == []


# ------------------------------------------------------------------ only ever a cache


def test_entries_are_private_and_no_temporary_file_stays(tmp_path, cache_dir):
    path = tmp_path / "mtls.yaml"
    path.write_text("clients: {days: 90}\n")
    os.umask(0o022)  # as a library caller might run: the cache stays private anyway
    load_profile(path)
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    (entry,) = _entries(cache_dir)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert sorted(p.name for p in cache_dir.iterdir()) == [entry.name]
    doc = json.loads(entry.read_text())
    assert doc["kind"] == "profile" and entry.name == f"profile-{doc['key']}.json"


def _seed(tmp_path, cache_dir, text="clients: {days: 90}\n") -> tuple[Path, Path]:
    path = tmp_path / "mtls.yaml"
    path.write_text(text)
    load_profile(path)
    (entry,) = _entries(cache_dir)
    return path, entry


def _poison(entry: Path, days: int = 7) -> None:
    doc = json.loads(entry.read_text())
    doc["value"]["clients"]["days"] = days
    entry.write_text(json.dumps(doc))


@pytest.mark.parametrize("damage", ["group-readable entry", "world-writable dir", "foreign entry", "foreign dir",
                                    "symlinked entry", "symlinked dir", "another key inside", "not json", "wrong shape",
                                    "unknown key", "too large"])
def test_an_entry_that_is_not_ours_and_private_is_a_miss(damage, tmp_path, cache_dir):
    path, entry = _seed(tmp_path, cache_dir)
    _poison(entry)  # a planted value: served only if the damaged entry were trusted
    assert load_profile(path).clients.days == 7  # the intact (planted) entry is read: the damage below is what counts
    _poison(entry)
    if damage == "group-readable entry":
        entry.chmod(0o640)
    elif damage == "world-writable dir":
        cache_dir.chmod(0o777)
    elif damage == "foreign entry":
        os.chown(entry, 65534, -1)
    elif damage == "foreign dir":
        os.chown(cache_dir, 65534, -1)
    elif damage == "symlinked entry":
        real = tmp_path / "elsewhere.json"
        entry.rename(real)
        entry.symlink_to(real)
    elif damage == "symlinked dir":
        real = tmp_path / "real-cache"
        cache_dir.rename(real)
        cache_dir.symlink_to(real)
    elif damage == "another key inside":
        doc = json.loads(entry.read_text())
        doc["key"] = "0" * 64
        entry.write_text(json.dumps(doc))
    elif damage == "not json":
        entry.write_bytes(b"\x80 not json")
    elif damage == "wrong shape":
        doc = json.loads(entry.read_text())
        doc["value"]["clients"] = ["days", 7]
        entry.write_text(json.dumps(doc))
    elif damage == "unknown key":
        doc = json.loads(entry.read_text())
        doc["value"]["clients"]["extra"] = 1
        entry.write_text(json.dumps(doc))
    elif damage == "too large":
        entry.write_text(entry.read_text() + " " * cache.ENTRY_MAX_BYTES)
    assert load_profile(path).clients.days == 90  # validated from the file again


def test_no_cache_writes_nothing(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("MTLSCTL_NO_CACHE", "1")
    path = tmp_path / "mtls.yaml"
    path.write_text("clients: {days: 90}\n")
    assert load_profile(path).clients.days == 90
    assert not cache_dir.exists()


def test_an_unwritable_cache_is_no_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MTLSCTL_CACHE_DIR", str(blocker / "cache"))  # under a regular file: cannot exist
    path = tmp_path / "mtls.yaml"
    path.write_text("clients: {days: 90}\n")
    assert load_profile(path).clients.days == 90
    assert load_profile(path).clients.days == 90


def test_old_entries_and_stale_temporary_files_are_pruned(tmp_path, cache_dir):
    path = tmp_path / "mtls.yaml"
    path.write_text("clients: {days: 1}\n")
    load_profile(path)
    stale, fresh = cache_dir / ".profile-x.json.0123.tmp", cache_dir / ".profile-y.json.4567.tmp"
    for leftover in (stale, fresh):
        leftover.write_text("{")
    os.utime(stale, (0, 0))
    for days in range(2, cache.KEEP_ENTRIES + 6):
        path.write_text(f"clients: {{days: {days}}}\n")
        load_profile(path)
    assert len(_entries(cache_dir)) == cache.KEEP_ENTRIES
    assert not stale.exists() and fresh.exists()  # a writer's file of a moment ago is left to its writer


def test_the_default_location_is_the_users_cache(monkeypatch, tmp_path):
    assert cache.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "mtlsctl"
    assert cache.cache_dir({"XDG_CACHE_HOME": "relative"}) == Path(os.path.expanduser("~")) / ".cache" / "mtlsctl"
    assert cache.cache_dir({"MTLSCTL_CACHE_DIR": str(tmp_path / "c")}) == tmp_path / "c"
    assert cache.cache_dir({"MTLSCTL_CACHE_DIR": ""}) is None
    assert cache.cache_dir({"MTLSCTL_NO_CACHE": "1", "MTLSCTL_CACHE_DIR": str(tmp_path)}) is None


# ------------------------------------------------------------------ the same cache for other derived facts


def test_derived_computes_once_per_key_and_never_stores_an_error(cache_dir):
    calls = []

    def compute(value):
        def run():
            calls.append(value)
            if value == "bad":
                raise ValueError("refused")
            return {"v": value}
        return run

    ident = (lambda x: x, lambda x: x)
    assert cache.derived("facts", (b"a",), compute("a"), *ident) == {"v": "a"}
    assert cache.derived("facts", (b"a",), compute("a"), *ident) == {"v": "a"}
    assert cache.derived("facts", (b"b",), compute("b"), *ident) == {"v": "b"}
    for _ in range(2):
        with pytest.raises(ValueError):
            cache.derived("facts", (b"bad",), compute("bad"), *ident)
    assert calls == ["a", "b", "bad", "bad"]
    # a stored value its loader refuses is a miss, computed again
    assert cache.derived("facts", (b"a",), compute("a"), lambda x: x, lambda x: x["missing"]) == {"v": "a"}
    assert calls[-1] == "a"


def test_derived_without_a_cache_always_computes(monkeypatch):
    monkeypatch.setenv("MTLSCTL_NO_CACHE", "1")
    calls = []
    for _ in range(2):
        cache.derived("facts", (b"a",), lambda: calls.append(1) or 1, lambda x: x, lambda x: x)
    assert calls == [1, 1]


def test_code_key_hashes_sources_without_importing_them():
    import subprocess
    import sys

    assert cache.code_key("mtlsctl.cache") == cache.code_key("mtlsctl.cache")
    assert cache.code_key("mtlsctl.cache") != cache.code_key("mtlsctl.validate")
    with pytest.raises(OSError):
        cache.code_key("mtlsctl_no_such_module")
    probe = ("import sys; from mtlsctl import cache; cache.code_key('cryptography', 'yaml'); "
             "print(sorted(m for m in ('cryptography', 'yaml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    assert out.strip() == "[]"  # located and hashed, not imported: a cache hit must not pay for the parser


# ------------------------------------------------------------------ the CA's and the CRL's dates, cached by content


def test_ca_and_crl_dates_come_from_the_cache_only_for_the_same_bytes(fast_pki, cache_dir, monkeypatch):
    """`list` and `renew` read the CA's notAfter and the CRL's dates on every run: parsed once per content
    (x509read._derived), the same values as parsing, and a changed file is parsed again."""
    from mtlsctl import x509read
    from tests.conftest import openssl

    pki = fast_pki
    ca, crl = pki / "ca/ca.crt", pki / "crl/ca.crl"
    fresh_ca, fresh_crl = x509read.not_after(ca), x509read.read_crl_facts(crl)
    parsed = []
    real_cert, real_crl = x509read.load_certificate, x509read.load_crl
    monkeypatch.setattr(x509read, "load_certificate", lambda *a: parsed.append("cert") or real_cert(*a))
    monkeypatch.setattr(x509read, "load_crl", lambda *a: parsed.append("crl") or real_crl(*a))
    assert x509read.not_after(ca) == fresh_ca and x509read.read_crl_facts(crl) == fresh_crl
    assert parsed == []  # both from the cache
    end = openssl("x509", "-in", str(ca), "-noout", "-enddate").stdout.strip()
    assert fresh_ca.strftime("%b %e %H:%M:%S %Y GMT").replace("  ", " ") == end.split("=", 1)[1].replace("  ", " ")
    # another CRL (one more byte of text before the PEM block is still the same CRL: same facts, parsed again)
    crl.write_bytes(b"\n" + crl.read_bytes())
    assert x509read.read_crl_facts(crl) == fresh_crl and parsed == ["crl"]
    # a damaged entry is a miss, never a value
    for entry in cache_dir.glob("cert_not_after-*.json"):
        doc = json.loads(entry.read_text())
        doc["value"] = "not a date"
        entry.write_text(json.dumps(doc))
    assert x509read.not_after(ca) == fresh_ca and parsed == ["crl", "cert"]


# ------------------------------------------------------------------ the frequent commands never build the models


@pytest.mark.parametrize("text", PROFILES, ids=["empty", "clients", "nginx", "example", "full"])
def test_facts_from_the_dump_are_the_facts_of_the_model(text, tmp_path, cache_dir, monkeypatch):
    path = tmp_path / "mtls.yaml"
    path.write_text(text)
    first = profile_file.open_profile(path)  # validated now
    assert first.loaded
    validated = first.profile
    second = profile_file.open_profile(path)  # from the cache: facts now, the model only when asked
    assert not second.loaded
    assert second.facts == first.facts == profile_file.Facts.from_profile(validated)
    assert profile_file.Facts.from_dump(validated.model_dump(mode="json")) == first.facts
    _no_validation(monkeypatch)
    assert second.profile == validated and second.loaded


def test_settings_from_the_cache_build_the_profile_only_when_asked(tmp_path, cache_dir, monkeypatch):
    pki = tmp_path / "pki"
    pki.mkdir()
    (pki / "mtls.yaml").write_text("renew: {within_days: 12, days: 200}\ncrl: {refresh_within_days: 3}\n")
    assert resolve_settings(pki, None, environ={}).facts.renew_within_days == 12
    settings = resolve_settings(pki, None, environ={})
    assert not settings.profile_loaded
    assert (settings.facts.renew_within_days, settings.facts.renew_days, settings.facts.crl_refresh_within_days) == (12, 200, 3)
    assert settings.profile.renew.within_days == 12 and settings.profile_loaded
    # the built-in defaults too
    assert resolve_settings(tmp_path / "none", None, environ={}).profile == Profile()
    again = resolve_settings(tmp_path / "none", None, environ={})
    assert not again.profile_loaded and again.facts == profile_file.Facts.from_profile(Profile())


@pytest.mark.parametrize("damage", ["a string for a number", "a bool for a number", "missing section", "not a mapping"])
def test_facts_that_are_not_a_validated_dump_are_a_miss(damage, tmp_path, cache_dir):
    path, entry = _seed(tmp_path, cache_dir, "renew: {within_days: 12}\n")
    doc = json.loads(entry.read_text())
    if damage == "a string for a number":
        doc["value"]["renew"]["within_days"] = "999"
    elif damage == "a bool for a number":
        doc["value"]["renew"]["within_days"] = True
    elif damage == "missing section":
        del doc["value"]["crl"]
    else:
        doc["value"] = ["renew"]
    entry.write_text(json.dumps(doc))
    source = profile_file.open_profile(path)
    assert source.loaded and source.facts.renew_within_days == 12  # validated from the file again


def test_list_and_renew_with_nothing_due_import_neither_pydantic_nor_cryptography(fast_pki, tmp_path):
    """The start-up target of issue 14: a second run of `list` / `renew` reads the profile's facts and the
    CA's and CRL's dates from the cache; -X importtime shows every module a run imports."""
    import subprocess
    import sys

    profile = tmp_path / "site.yaml"
    profile.write_text("renew: {within_days: 20}\nnginx: {test_command: '', reload_command: ''}\n")
    env = {**os.environ, "MTLSCTL_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("MTLSCTL_NO_CACHE", None)
    for command in (["list"], ["list", "--json"], ["renew"]):
        argv = [sys.executable, "-X", "importtime", "-m", "mtlsctl", "--pki-dir", str(fast_pki), "--profile", str(profile),
                *command]
        first = subprocess.run(argv, capture_output=True, text=True, env=env)
        second = subprocess.run(argv, capture_output=True, text=True, env=env)
        assert first.returncode == second.returncode == 0, second.stderr[-800:]
        assert first.stdout == second.stdout
        imported = {line.split("|")[-1].strip() for line in second.stderr.splitlines() if line.startswith("import time:")}
        assert "mtlsctl.cli.certificates" in imported
        assert not {m for m in imported if m.split(".")[0] in ("pydantic", "cryptography")}, command
    assert "within 20 days" in second.stdout
