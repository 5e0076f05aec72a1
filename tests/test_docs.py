"""The generated references must match the code: a command or profile key cannot go undocumented."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

from mtlsctl.profile import Profile

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _gen():
    spec = importlib.util.spec_from_file_location("gen_docs", DOCS / "gen_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_reference_is_current(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert (DOCS / "cli.md").read_text() == _gen().cli_md(), "run: python docs/gen_docs.py"


def test_profile_reference_is_current():
    assert (DOCS / "profile.md").read_text() == _gen().profile_md(), "run: python docs/gen_docs.py"


def test_profile_example_is_valid_and_equals_the_defaults():
    data = yaml.safe_load((DOCS / "profile.example.yaml").read_text())
    parsed = Profile.model_validate(data)
    assert parsed.model_dump(exclude={"pki_dir"}) == Profile().model_dump(exclude={"pki_dir"})


def test_every_profile_key_has_a_description():
    from pydantic import BaseModel

    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            assert field.description, f"profile key {prefix}{name} has no description (docs/profile.md)"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, f"{prefix}{name}.")

    walk(Profile)


def test_every_doc_page_is_linked_from_the_readme_or_the_index():
    readme = (DOCS.parent / "README.md").read_text() + (DOCS / "index.md").read_text()
    for page in DOCS.glob("*.md"):
        assert page.name in readme, f"docs/{page.name} is linked from neither README.md nor docs/index.md"


def test_the_full_example_profile_is_valid_and_uses_every_key():
    from pydantic import BaseModel

    data = yaml.safe_load((DOCS / "profile.full.yaml").read_text())
    Profile.model_validate(data)

    def walk(model, node, prefix=""):
        for name, field in model.model_fields.items():
            if name in ("bits", "curve") and ("bits" in node or "curve" in node):
                continue  # a key has one or the other
            if name == "encrypt" and prefix != "ca.key.":
                continue  # only the CA key takes it
            assert name in node, f"docs/profile.full.yaml lacks {prefix}{name}"
            ann = field.annotation
            inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
            if inner and isinstance(node[name], dict):
                walk(inner[0], node[name], f"{prefix}{name}.")

    walk(Profile, data)
