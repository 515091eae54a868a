"""What `declic check` can see in an `if:` before anything runs: the literal arguments of the contact's
history helpers (`contact.count('page.viewed', within='7d', where="...")`, pipeline/history.py).

A `where=` that is not an expression, or a `within=` that is not a duration, would otherwise fail the
condition on every event, at run time; written as literals, they are checked here once.
"""

from __future__ import annotations

import jinja2
from jinja2 import nodes

from ..kit.context import CONTACT_HELPERS
from ..kit.durations import parse_duration
from ..kit.templating import compile_condition

#: The helpers `if:` may call on `contact`, methods of pipeline/history.py's ContactView (one table, in kit).
HELPERS = tuple(CONTACT_HELPERS)


def argument_problems(env: jinja2.Environment, expression: str) -> list[str]:
    """One message per literal `where=` or `within=` argument that is wrong; the expression itself parses."""
    problems = []
    for call in env.parse("{{ " + expression + " }}").find_all(nodes.Call):
        for keyword in call.kwargs:
            value = keyword.value
            if not isinstance(value, nodes.Const) or not isinstance(value.value, str):
                continue
            if keyword.key == "where":
                try:
                    compile_condition(env, value.value)
                except jinja2.TemplateSyntaxError as exc:
                    problems.append(f"invalid where= expression {value.value!r}: {exc.message}")
            elif keyword.key == "within":
                try:
                    parse_duration(value.value)
                except ValueError as exc:
                    problems.append(f"within=: {exc}")
    return problems
