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


class _Findings:
    """Problems found in one source, each message once, at its first place."""

    def __init__(self, source: str):
        self.lines = source.splitlines() or [""]
        self.found: dict[str, Finding] = {}

    def add(self, line: int, pattern: str, message: str) -> None:
        if message not in self.found:
            self.found[message] = Finding(line, _column(self.lines, line, pattern), message)

    def sorted(self) -> list[Finding]:
        return sorted(self.found.values(), key=lambda f: (f.line, f.column or 0))


def _check(env: jinja2.Environment, tree: nodes.Template, source: str, scope: Scope) -> list[Finding]:
    findings = _Findings(source)
    _check_filters_and_tests(env, tree, findings)
    try:
        free = meta.find_undeclared_variables(tree)
    except jinja2.TemplateAssertionError as exc:
        findings.add(exc.lineno, "", f"invalid template: {exc.message}")
        return findings.sorted()
    guarded = _guarded(tree)
    _check_names(env, tree, scope, free, guarded, findings)
    _check_fields(tree, scope, free, guarded, findings)
    return findings.sorted()


def _check_filters_and_tests(env: jinja2.Environment, tree: nodes.Template, findings: _Findings) -> None:
    for flt in tree.find_all(nodes.Filter):
        if flt.name not in env.filters:
            message = f"unknown filter {flt.name!r}{suggest(flt.name, env.filters)}"
            findings.add(flt.lineno, rf"\|\s*{flt.name}\b", message)
            flt.name = "string"  # so that the names can still be read
    for test in tree.find_all(nodes.Test):
        if test.name not in env.tests:
            message = f"unknown test {test.name!r}{suggest(test.name, env.tests)}"
            findings.add(test.lineno, rf"\bis\s+(not\s+)?{test.name}\b", message)
            test.name = "defined"


def _check_names(
    env: jinja2.Environment,
    tree: nodes.Template,
    scope: Scope,
    free: set[str],
    guarded: set[object],
    findings: _Findings,
) -> None:
    known = scope.names | set(env.globals)
    unset = dict(scope.unset)
    for node in tree.find_all(nodes.Name):
        name = node.name
        if node.ctx != "load" or name not in free or name in known or name in guarded:
            continue
        why = unset.get(name)
        message = f"{name} is not set here: {why}" if why else f"unknown name {name!r}{suggest(name, known)}"
        findings.add(node.lineno, rf"\b{name}\b", message)


def _check_fields(
    tree: nodes.Template, scope: Scope, free: set[str], guarded: set[object], findings: _Findings
) -> None:
    called = {id(call.node) for call in tree.find_all(nodes.Call)}
    for node, owner, field in _fields(tree):
        if owner not in free or owner not in scope.names or (owner, field) in guarded:
            continue
        message = _unknown_field(owner, field, scope, id(node) in called)
        if message:
            findings.add(node.lineno, rf"\b{owner}\s*(\.\s*|\[\s*['\"]){field}\b", message)


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


def _fields(tree: nodes.Template) -> Iterable[tuple[nodes.Expr, str, str]]:
    """(node, object, field) for `contact.x`, `event['x']`: a field read straight off a known object."""
    for getattr_ in tree.find_all(nodes.Getattr):
        if _known_object(getattr_.node):
            yield getattr_, getattr_.node.name, getattr_.attr  # type: ignore[attr-defined]
    for item in tree.find_all(nodes.Getitem):
        if _known_object(item.node) and isinstance(item.arg, nodes.Const) and isinstance(item.arg.value, str):
            yield item, item.node.name, item.arg.value  # type: ignore[attr-defined]


def _known_object(node: nodes.Node) -> bool:
    return isinstance(node, nodes.Name) and node.ctx == "load" and node.name in KNOWN_OBJECTS


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
