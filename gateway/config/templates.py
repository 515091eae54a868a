"""What `declic check` reads beyond the YAML: the template files rules name, and where `if:` problems sit.

The lint itself is kit/lint.py; this module knows the config: which names a rule's templates see
(kit/context.py `Scope`) and where each template part and what it includes are on disk.
"""

from __future__ import annotations

import glob
from pathlib import Path

import jinja2
from jinja2 import nodes

from ..kit.context import Scope
from ..kit.lint import Finding, check_template
from ..kit.locales import parse_locale
from ..kit.templating import PARTS

#: A template including itself, or a chain of includes, is read once per file.
MAX_INCLUDED = 100


def unset_links(kind: str, channel: str | None, public_url_known: bool, rule: str) -> dict[str, str]:
    """The links a step's template cannot use, and why (see send/delivery.py, which sets them)."""
    why = None
    way_out = "write `{{ unsubscribe_url | default('') }}` in a template shared with marketing e-mail"
    if kind != "marketing":
        why = f"rule {rule!r} is transactional, and only marketing e-mail carries an unsubscribe link ({way_out})"
    elif channel is not None and channel != "email":
        why = f"only e-mail carries an unsubscribe link, and this step sends {channel} ({way_out})"
    elif not public_url_known:
        why = "the unsubscribe link needs `public_url:`, where it points"
    return {"unsubscribe_url": why} if why else {}


def check_parts(env: jinja2.Environment, folder: Path, name: str, scope: Scope) -> list[tuple[Path, Finding]]:
    """Every part of template `name` that exists, and every template they include, extend or import."""
    queue = [f"{name}.{part}.j2" for part in PARTS if (folder / f"{name}.{part}.j2").is_file()]
    queue += _translations(folder, name)
    seen: set[str] = set()
    found: list[tuple[Path, Finding]] = []
    while queue and len(seen) < MAX_INCLUDED:
        file = queue.pop(0)
        if file in seen:
            continue
        seen.add(file)
        path = folder / file
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeError) as exc:
            found.append((path, Finding(1, None, f"cannot read template: {exc}")))
            continue
        found += [(path, finding) for finding in check_template(env, source, scope)]
        for line, included in _included(env, source):
            if (folder / included).is_file():
                queue.append(included)
            else:
                found.append((path, Finding(line, None, f"template {included!r} not found in {folder}")))
    return found


def _translations(folder: Path, name: str) -> list[str]:
    """`welcome.fr.txt.j2`, `welcome.fr_CA.subject.j2`...: the parts of each translation (kit/locales.py
    `translated` picks one by the contact's locale), checked like the default's."""
    found = []
    for path in sorted(folder.glob(f"{glob.escape(name)}.*.j2")):
        locale, _, part = path.name[len(name) + 1 :].removesuffix(".j2").partition(".")
        if part in PARTS and parse_locale(locale) is not None:
            found.append(path.name)
    return found


def _included(env: jinja2.Environment, source: str) -> list[tuple[int, str]]:
    """`{% include 'x' %}`, `{% extends 'x' %}`, `{% import 'x' as y %}` with a written name."""
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError:
        return []  # reported by check_template
    found = []
    for kind in (nodes.Include, nodes.Extends, nodes.Import, nodes.FromImport):
        for node in tree.find_all(kind):
            name = getattr(node, "template", None)
            if isinstance(name, nodes.Const) and isinstance(name.value, str):
                found.append((node.lineno, name.value))
    return found


def expression_mark(mark: tuple[int, int], line: str, expression: str, finding: Finding) -> tuple[int, int]:
    """Where a problem of an `if:` sits in the config: the value's start, moved to the problem's column when the
    expression is written as it is read, on the value's line (plain or quoted without escapes)."""
    if finding.column is None or finding.line != 1:
        return mark
    start = mark[1] - 1 + (line[mark[1] - 1 : mark[1]] in ("'", '"'))
    before = expression.split("\n", 1)[0][: finding.column - 1]
    return (mark[0], start + finding.column) if line[start:].startswith(before) else mark
