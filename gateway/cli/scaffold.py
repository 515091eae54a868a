"""`declic plugins new NAME --kind source|sink`: a plugin project whose tests pass as generated.

The files come from `plugin_template/` (string.Template: `$name`, `$module`, `$Class`...), so
that what a plugin author starts from is readable as it will be written.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path
from string import Template

from ..plugins import DISTRIBUTION

TEMPLATES = Path(__file__).parent / "plugin_template"
#: A plugin's name is what a config's `plugin:` says and part of its module name.
NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


class ScaffoldError(Exception):
    """The project cannot be written as asked."""


def files_for(name: str, kind: str) -> dict[str, str]:
    """The project's files, relative path -> text."""
    if not NAME.fullmatch(name):
        raise ScaffoldError(f"{name!r}: a plugin name is lower-case letters, digits and _, starting with a letter")
    module = f"declic_{name}"
    title = "".join(part.capitalize() for part in name.split("_"))
    usage = (
        f"sources:\n  {name}:\n    plugin: {name}\n    secret: ${{{name.upper()}_SECRET}}"
        if kind == "source"
        else f"sinks:\n  {name}:\n    plugin: {name}\n    api_key: ${{{name.upper()}_API_KEY}}"
    )
    values = {
        "name": name,
        "NAME": name.upper(),
        "module": module,
        "dist": f"declic-{name.replace('_', '-')}",
        "Title": title,
        "Class": title,
        "kind": kind,
        "declic_dist": DISTRIBUTION,
        "requirement": _requirement(),
        "testing_requirement": _requirement("[testing]"),
        "usage": usage,
    }
    layout = {
        "pyproject.toml": "pyproject.toml.tmpl",
        "README.md": "README.md.tmpl",
        f"{module}/__init__.py": f"{kind}.py.tmpl",
        "tests/conftest.py": "conftest.py.tmpl",
        f"tests/test_{name}.py": f"test_{kind}.py.tmpl",
    }
    return {
        path: Template((TEMPLATES / template).read_text(encoding="utf-8")).substitute(values)
        for path, template in layout.items()
    }


def write(name: str, kind: str, into: Path) -> Path:
    """Write the project into `into`/declic-NAME; refuse to write over anything."""
    files = files_for(name, kind)
    root = into / f"declic-{name.replace('_', '-')}"
    if root.exists():
        raise ScaffoldError(f"{root} already exists; nothing written")
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def _requirement(extras: str = "") -> str:
    """Declic at the installed minor version or later: the hooks a plugin is written against."""
    try:
        major, minor = metadata.version(DISTRIBUTION).split(".")[:2]
    except (metadata.PackageNotFoundError, ValueError):
        return DISTRIBUTION + extras
    return f"{DISTRIBUTION}{extras}>={major}.{minor}"
