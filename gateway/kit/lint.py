"""Templates and `if:` expressions checked before anything runs: syntax, filters, tests, names, fields.

`declic check` (and so `declic serve`) runs these on every `if:` and on every part of every template a
rule names, against the Scope of the place where it will be evaluated (see kit/context.py). A use that
the author guarded, `x is defined` or `x | default(...)`, is left alone: that is the documented way
to use a name that may be missing.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

import jinja2
from jinja2 import meta, nodes
from jinja2.parser import Parser

from .context import CONTACT_HELPERS, KNOWN_OBJECTS, Scope

#: Filters and tests through which a name may be missing without harm.
_GUARD_FILTERS = frozenset({"default", "d"})
_GUARD_TESTS = frozenset({"defined", "undefined"})


@dataclass(frozen=True)
class Finding:
    """A problem at a line of the source (from 1) and, when known, a column (from 1)."""

    line: int
    column: int | None
    message: str


def suggest(word: str, choices: Iterable[str]) -> str:
    """` (did you mean 'x'?)` when one of `choices` is close to `word`, else an empty string."""
    close = difflib.get_close_matches(word, sorted(c for c in choices if not c.startswith("_")), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_expression(env: jinja2.Environment, source: str, scope: Scope) -> list[Finding]:
    """An `if:` expression, parsed as `compile_expression` parses it."""
    try:
        parser = Parser(env, source, state="variable")
        expression = parser.parse_expression()
        if not parser.stream.eos:
            raise jinja2.TemplateSyntaxError("chunk after expression", parser.stream.current.lineno)
    except jinja2.TemplateSyntaxError as exc:
        return [Finding(1, None, f"invalid expression: {exc.message}")]
    tree = nodes.Template([nodes.Assign(nodes.Name("result", "store"), expression)], lineno=1)
    tree.set_environment(env)
    return _check(env, tree, source, scope)


def check_template(env: jinja2.Environment, source: str, scope: Scope) -> list[Finding]:
    """One template part's text."""
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        return [Finding(exc.lineno, None, f"invalid template: {exc.message}")]
    return _check(env, tree, source, scope)


def _check(env: jinja2.Environment, tree: nodes.Template, source: str, scope: Scope) -> list[Finding]:
    lines = source.splitlines() or [""]
    found: dict[str, Finding] = {}

    def add(line: int, pattern: str, message: str) -> None:
        if message not in found:
            found[message] = Finding(line, _column(lines, line, pattern), message)

    for node in tree.find_all(nodes.Filter):
        if node.name not in env.filters:
            add(node.lineno, rf"\|\s*{node.name}\b", f"unknown filter {node.name!r}{suggest(node.name, env.filters)}")
            node.name = "string"  # so that the names below can still be read
    for node in tree.find_all(nodes.Test):
        if node.name not in env.tests:
            add(node.lineno, rf"\bis\s+(not\s+)?{node.name}\b", f"unknown test {node.name!r}{suggest(node.name, env.tests)}")
            node.name = "defined"
    try:
        free = meta.find_undeclared_variables(tree)
    except jinja2.TemplateAssertionError as exc:
        add(exc.lineno, "", f"invalid template: {exc.message}")
        return sorted(found.values(), key=lambda f: (f.line, f.column or 0))
    guarded = _guarded(tree)
    known = scope.names | set(env.globals)
    unset = dict(scope.unset)
    for node in tree.find_all(nodes.Name):
        name = node.name
        if node.ctx != "load" or name not in free or name in known or name in guarded:
            continue
        why = unset.get(name)
        add(node.lineno, rf"\b{name}\b", f"{name} is not set here: {why}" if why else f"unknown name {name!r}{suggest(name, known)}")
    called = {id(call.node) for call in tree.find_all(nodes.Call)}
    for node, field in _fields(tree):
        owner = node.node.name  # type: ignore[attr-defined]
        if owner not in free or owner not in scope.names or (owner, field) in guarded:
            continue
        message = _unknown_field(owner, field, scope, id(node) in called)
        if message:
            add(node.lineno, rf"\b{owner}\s*(\.\s*|\[\s*['\"]){field}\b", message)
    return sorted(found.values(), key=lambda f: (f.line, f.column or 0))


def _unknown_field(owner: str, field: str, scope: Scope, called: bool) -> str | None:
    allowed = scope.contact_attributes() if owner == "contact" else KNOWN_OBJECTS[owner]
    if field in allowed:
        return None
    if owner == "contact" and field in CONTACT_HELPERS:
        return f"contact.{field}(...) is for steps' `if:` and templates, not a rule's own `if:`"
    helpers = [name for name in CONTACT_HELPERS if name in allowed]
    if called and owner == "contact":
        usable = ", ".join(CONTACT_HELPERS[h].usage for h in helpers) or "none in a rule's own `if:`"
        return f"contact has no helper {field}(){suggest(field, helpers)}; helpers here: {usable}"
    hint = suggest(field, allowed)
    if not hint and owner == "event":
        hint = f" (an event's data is under event.properties: event.properties.{field})"
    return f"{owner} has no field {field!r}{hint}"


def _fields(tree: nodes.Template) -> Iterable[tuple[nodes.Getattr | nodes.Getitem, str]]:
    """`contact.x`, `event['x']`: a field read straight off a known object."""
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        target = node.node
        if not (isinstance(target, nodes.Name) and target.ctx == "load" and target.name in KNOWN_OBJECTS):
            continue
        if isinstance(node, nodes.Getattr):
            yield node, node.attr
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            yield node, node.arg.value


def _guarded(tree: nodes.Template) -> set[object]:
    """Names and (object, field) pairs that the template tests with `is defined` or passes through `default`."""
    guarded: set[object] = set()
    inner = [n.node for n in tree.find_all(nodes.Test) if n.name in _GUARD_TESTS]
    inner += [n.node for n in tree.find_all(nodes.Filter) if n.name in _GUARD_FILTERS and n.node is not None]
    for node in inner:
        if isinstance(node, nodes.Name):
            guarded.add(node.name)
        elif isinstance(node, nodes.Getattr) and isinstance(node.node, nodes.Name):
            guarded.add((node.node.name, node.attr))
    return guarded


def _column(lines: list[str], line: int, pattern: str) -> int | None:
    if not pattern or not 1 <= line <= len(lines):
        return None
    match = re.search(pattern, lines[line - 1])
    if match is None:
        return None
    return _last_word_start(match) + 1


def _last_word_start(match: re.Match[str]) -> int:
    """Where the offending word starts: the last word the pattern matched (`contact.firstname` -> firstname)."""
    words = list(re.finditer(r"\w+", match.group(0)))
    return match.start() + words[-1].start() if words else match.start()
