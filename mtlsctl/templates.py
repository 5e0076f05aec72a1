"""Templates: found inside the wheel (mtlsctl/_templates/) or, in a source checkout, at the top.

Placeholders are `{{name}}`: they cannot collide with openssl's `$var`/`${var}` or nginx's `$var`.
A placeholder without a value, or a value without a placeholder, is an error (a typo never renders
silently).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from mtlsctl import __version__
from mtlsctl.errors import StateError

_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_][a-z0-9_]*)\s*\}\}")
_PACKAGE = Path(__file__).resolve().parent


def template_path(rel: str) -> Path:
    """Locate a template: the wheel's copy first, then the source checkout's top level."""
    for base in (_PACKAGE / "_templates", _PACKAGE.parent):
        candidate = base / rel
        if candidate.is_file():
            return candidate
    raise StateError(f"template {rel} is missing from the mtlsctl installation", hint="reinstall mtlsctl (pip install .)")


def render(text: str, values: Mapping[str, str], name: str) -> str:
    """Replace every {{placeholder}}; `version` is always available."""
    values = {"version": __version__, **values}
    used = set(_PLACEHOLDER.findall(text))
    missing = used - values.keys()
    if missing:
        raise StateError(f"template {name} needs values for: {', '.join(sorted(missing))}")
    unused = values.keys() - used - {"version"}
    if unused:
        raise StateError(f"template {name} has no placeholder for: {', '.join(sorted(unused))}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def render_file(rel: str, values: Mapping[str, str]) -> str:
    return render(template_path(rel).read_text(encoding="utf-8"), values, rel)
