"""Every profile the documentation shows is one the tool accepts: each fenced ```yaml block in README.md and
docs/*.md that is a profile, and docs/profile*.yaml, goes through the real parser (load_profile / parse_profile).

A yaml block is a profile when its top-level keys are profile keys. A block that mixes profile keys with others
fails (a typo must not make an example silently "not a profile"); blocks with none (an Ansible playbook) are
not profiles and are listed, so a new kind of block is a visible decision.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mtlsctl.profile import Profile, load_profile, parse_profile

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
FENCE = re.compile(r"^```(ya?ml)[^\n]*\n(.*?)^```", re.M | re.S | re.I)

# Fenced yaml blocks in the docs that are deliberately not profiles: (page, first line).
NOT_PROFILES: set[tuple[str, str]] = {
    ("docs/operations.md", "groups:"),  # Prometheus alert rules (tests/test_metrics.py runs promtool on them)
}


def yaml_blocks() -> list[tuple[str, int, str]]:
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            out.append((str(page.relative_to(ROOT)), line, match.group(2)))
    return out


BLOCKS = yaml_blocks()


def test_the_docs_have_yaml_examples_to_check():
    pages = {page for page, _, _ in BLOCKS}
    # the pages that show profiles today; a page losing all its examples is a change worth a look
    assert {"docs/profile.md", "docs/intermediate.md", "docs/ocsp.md", "docs/fleet.md"} <= pages, pages


@pytest.mark.parametrize("page,line,block", BLOCKS, ids=[f"{p}:{n}" for p, n, _ in BLOCKS])
def test_every_yaml_example_in_the_docs_is_a_valid_profile(page, line, block, tmp_path):
    data = yaml.safe_load(block)
    first = block.strip().splitlines()[0] if block.strip() else ""
    keys = set(data) if isinstance(data, dict) else set()
    known = keys & set(Profile.model_fields)
    if not known:
        assert (page, first) in NOT_PROFILES, f"{page}:{line}: a yaml block that is not a profile: {first!r}"
        return
    assert keys <= set(Profile.model_fields), f"{page}:{line}: not profile keys: {sorted(keys - set(Profile.model_fields))}"
    parse_profile(data, f"{page}:{line}")
    # and through the file loader, as `--profile FILE` reads it (duplicate keys, size, YAML errors)
    path = tmp_path / "example.yaml"
    path.write_text(block, encoding="utf-8")
    load_profile(path)


@pytest.mark.parametrize("name", sorted(p.name for p in DOCS.glob("profile*.yaml")))
def test_the_example_profile_files_load(name):
    load_profile(DOCS / name)


def _gen():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_docs", DOCS / "gen_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen


@pytest.mark.parametrize("source", ["docs/profile.md", "docs/gen_docs.py"])
def test_profile_reference_shows_no_placeholder_and_no_refused_key(source):
    text = (DOCS / "profile.md").read_text(encoding="utf-8") if source.endswith(".md") else _gen().profile_md()
    assert "PydanticUndefined" not in text
    assert "`clients.key.encrypt`" not in text and "`ca.intermediate.key.encrypt`" not in text
    assert "`ca.key.encrypt`" in text
    assert "| `nginx.allow` | `[]`" in text  # a default_factory shows its value


def test_the_docs_say_what_the_tool_does():
    nginx = (DOCS / "nginx.md").read_text(encoding="utf-8")
    assert "a later" not in nginx.lower() and "ocsp.md" in nginx  # OCSP is here, not "a later version"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("pip install '.[test]' && python -m pytest")
    paragraph = readme[start:readme.index("## A short tour")]
    assert "9–10 minutes" in paragraph and ".ci/run" in paragraph  # what .ci/run measured (563 s, 2026-11-27)
    for tool in ("nginx", "curl", "strace", "faketime", "shellcheck", "ansible-core", "systemd-analyze", "promtool"):
        assert f"`{tool}`" in paragraph, tool


def test_the_keys_the_reference_leaves_out_are_refused_by_the_parser():
    """docs/gen_docs.py leaves out keys a section refuses; each must really be refused (else it is undocumented)."""
    from mtlsctl.errors import ProfileError

    gen = _gen()
    base = {"ca": {"subject": {"CN": "Root"}, "days": 3650, "intermediate": {"subject": {"CN": "Issuing"}}}}
    assert gen.REFUSED_KEYS, "nothing left out"
    for key in gen.REFUSED_KEYS:
        data = yaml.safe_load(yaml.safe_dump(base))
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node.setdefault("type", "rsa")
        node[leaf] = True
        with pytest.raises(ProfileError) as err:
            parse_profile(data, "probe")
        assert key.rsplit(".", 1)[0] in str(err.value.problems), (key, err.value.problems)
        assert f"`{key}`" not in (DOCS / "profile.md").read_text(encoding="utf-8")
    parse_profile(yaml.safe_load(yaml.safe_dump(base)) | {"ca": {**base["ca"], "key": {"type": "rsa", "encrypt": True}}}, "probe")
