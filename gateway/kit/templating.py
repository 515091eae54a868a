"""The sandboxed Jinja2 environment for templates and `if:` expressions, and bounded rendering.

Why a thread with a budget rather than a subprocess: plugins add filters and globals to the
environment in this process (`prepare_jinja2_environment`), possibly as closures over their own
state, so a spawned child could not rebuild the same environment, and forking a server that runs
threads can leave the child holding locks forever. A process hop would also cost every step a
round trip and pickling. So a message is rendered in a worker thread (never on the database thread
nor the event loop) under a Budget that the sandbox enforces at every point where a template can
spend CPU or grow a value:

- every loop iteration (each `for` iterable is wrapped when the template is compiled), every call
  (macros included, so runaway or exponential recursion too) and every filter check the render
  thread's CPU time; `range()` is the sandbox's own, capped at MAX_RANGE items;
- `*`, `**`, `+` and `%` are intercepted, and the amplifiers (`join`, `center`, `indent`,
  `format`, str methods such as `ljust` or `format`) are checked *before* they run, so that
  `'x' * 10**9`, `10 ** 10**9` or a join with a huge separator never starts; values that filters,
  calls and operators return are capped at the output size, and all the text they return in one
  render at BUILT_FACTOR times it (600 values of 1 MB kept in a list took 572 MB);
- Jinja's `lipsum()` global is removed: one call ran to its end whatever its size (`n=10**7`:
  minutes of CPU and gigabytes, in one operation the budget never saw);
- the output is produced with generate() and counted chunk by chunk;
- RecursionError (deep macro recursion) and every other exception become a TemplateProblem.

The garbage collector's time is not charged: a full collection runs in whichever thread allocates
when it is due and costs in proportion to the whole process's heap (seen: 1.3 s on a busy process),
so charging it would fail an innocent template at random.

What stays unbounded: one C-level operation on already bounded inputs runs to its end before the
budget is looked at again (at most one output's size of work per operation).
"""

from __future__ import annotations

import difflib
import functools
import gc
import json
import re
import secrets
import threading
import time
import traceback
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import jinja2
import pluggy
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TemplateProblem
from . import locales
from .context import Known

#: The parts a message template may have; `<name>.txt.j2` is the one required part.
PARTS = ("subject", "txt", "html")
#: The filter every `for` iterable goes through (added at compile time, not meant for authors).
_LOOP_FILTER = "_declic_bounded_loop"
#: The filter every `~` concatenation goes through (it is not an operator the sandbox intercepts).
_SIZE_FILTER = "_declic_sized"
#: Integers past this many bits are no template's business (and 10**10**9 would take minutes).
_MAX_INT_BITS = 4096
#: str methods whose first argument is a width: checked before they run.
_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
_DIGITS = re.compile(r"\d+")
#: All the text the values of one render may add up to, as a multiple of the output limit: memory, not output.
BUILT_FACTOR = 32
_BREAKING_SPACES = re.compile("[ \\t\\r\\n\\f\\v\\x1c-\\x1e\\x85\\u2028\\u2029]+")


@dataclass(frozen=True)
class RenderLimits:
    """What one message (all its parts together) may cost."""

    cpu_time: float = 2.0
    output_bytes: int = 1024 * 1024


class RenderLimitExceeded(TemplateProblem):
    """A template went over its CPU time or output size."""


class Budget:
    """The limits of the render running in this thread; the sandbox's hooks consult it."""

    def __init__(self, limits: RenderLimits):
        self.limits = limits
        # Thread CPU time: a render that waits for the GIL while acknowledgements run is not charged.
        # Reading it is a system call (~1 µs); a thread's CPU time grows no faster than the wall
        # clock, so the wall clock (~70 ns) says when it is worth reading.
        self.deadline = time.thread_time() + limits.cpu_time
        self._next_look = time.perf_counter() + limits.cpu_time
        self.chars = 0
        self.built = 0  # characters of all the text values filters, calls and operators returned

    def forgive(self, seconds: float) -> None:
        """Give back CPU time this thread spent on something else than the template (a GC pass)."""
        self.deadline += seconds
        self._next_look += seconds

    def check(self) -> None:
        if time.perf_counter() < self._next_look:
            return
        left = self.deadline - time.thread_time()
        if left <= 0:
            raise RenderLimitExceeded(f"rendering took more than {self.limits.cpu_time:g}s of CPU time")
        self._next_look = time.perf_counter() + left

    def allow(self, size: int) -> None:
        if size > self.limits.output_bytes:
            raise RenderLimitExceeded(f"a value of {size} characters is over the {self._bytes} output limit")

    def sized(self, value: Any) -> Any:
        if isinstance(value, (str, list, tuple)):
            self.allow(len(value))
        if isinstance(value, str):
            self.built += len(value)
            if self.built > BUILT_FACTOR * self.limits.output_bytes:
                raise RenderLimitExceeded(
                    f"the values this render built add up to over {BUILT_FACTOR} times the {self._bytes} output limit"
                )
        return value

    def emitted(self, chunk: str) -> None:
        self.chars += len(chunk)
        if self.chars > self.limits.output_bytes:  # a character is at least one byte
            raise RenderLimitExceeded(f"output over the {self._bytes} limit")
        self.check()

    @property
    def _bytes(self) -> str:
        return f"{self.limits.output_bytes} bytes"


_local = threading.local()


def _budget() -> Budget | None:
    return getattr(_local, "budget", None)


def _uncharge_collections(phase: str, info: dict[str, int]) -> None:
    """gc callback: a collection that runs in a render thread is given back to its budget."""
    budget = getattr(_local, "budget", None)
    if budget is None:
        return
    if phase == "start":
        _local.gc_began = time.thread_time()
    elif (began := getattr(_local, "gc_began", None)) is not None:
        budget.forgive(time.thread_time() - began)
        _local.gc_began = None


gc.callbacks.append(_uncharge_collections)


def _bounded_loop(iterable: Iterable[Any]) -> Iterable[Any]:
    budget = _budget()
    return iterable if budget is None else _checked(budget, iterable)


def _checked(budget: Budget, iterable: Iterable[Any]) -> Iterator[Any]:
    for item in iterable:
        budget.check()
        yield item


def _sized(value: Any) -> Any:
    budget = _budget()
    return value if budget is None else budget.sized(value)


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with a Budget enforced while render_message() runs (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.filters[_LOOP_FILTER] = _bounded_loop
        self.filters[_SIZE_FILTER] = _sized
        self.policies["json.dumps_function"] = dumps_exact
        del self.globals["lipsum"]  # one call, unbounded by the budget (see the module docstring)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for node in list(tree.find_all(nodes.Node)):
            if isinstance(node, nodes.For):
                node.iter = _through(_LOOP_FILTER, node.iter)
            for field, value in node.iter_fields():
                if isinstance(value, nodes.Concat):
                    setattr(node, field, _through(_SIZE_FILTER, value))
                elif isinstance(value, list):
                    value[:] = [_through(_SIZE_FILTER, v) if isinstance(v, nodes.Concat) else v for v in value]
        return tree

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        if budget is not None:
            budget.check()
            _precheck_binop(budget, operator, left, right)
        result = super().call_binop(context, operator, left, right)
        return result if budget is None else budget.sized(result)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        if budget is None:
            return super().call(__context, __obj, *args, **kwargs)
        budget.check()
        _precheck_method(budget, __obj, args)
        return budget.sized(super().call(__context, __obj, *args, **kwargs))


def _through(name: str, node: nodes.Node) -> nodes.Expr:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


def _precheck_binop(budget: Budget, operator: str, left: Any, right: Any) -> None:
    if operator == "*":
        for sequence, times in ((left, right), (right, left)):
            if isinstance(sequence, (str, list, tuple)) and isinstance(times, int):
                budget.allow(len(sequence) * times)
    elif operator == "**" and isinstance(left, int) and isinstance(right, int):
        if abs(left) > 1 and right > 0 and abs(left).bit_length() * right > _MAX_INT_BITS:
            raise RenderLimitExceeded(f"{left} ** {right} is too large a number")
    elif operator == "%" and isinstance(left, str):
        _precheck_format(budget, left)


def _precheck_format(budget: Budget, pattern: str) -> None:
    """`'%0999999999d' % 1` would allocate its width before anything could stop it."""
    for digits in _DIGITS.findall(pattern):
        budget.allow(int(digits) if len(digits) < 12 else budget.limits.output_bytes + 1)


def _precheck_method(budget: Budget, obj: Any, args: tuple[Any, ...]) -> None:
    method = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
    owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if not isinstance(owner, str):
        return
    if name in _WIDTH_METHODS and args and isinstance(args[0], int):
        budget.allow(args[0])
    elif name in ("format", "format_map"):
        _precheck_format(budget, owner)
    elif name == "join" and args:
        _precheck_join(budget, args[0], owner)
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        budget.allow(len(owner) + (owner.count(args[0]) if args[0] else len(owner) + 1) * len(args[1]))


def _precheck_join(budget: Budget, items: Any, separator: Any) -> None:
    if isinstance(items, Collection):
        pieces = sum(len(item) if isinstance(item, str) else 1 for item in items)
        budget.allow(pieces + len(str(separator)) * max(len(items) - 1, 0))


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, key: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(key, default)


def _precheck_indent(budget: Budget, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    width = _arg(args, kwargs, 1, "width", 4)
    per_line = width if isinstance(width, int) else len(str(width))
    text = str(_arg(args, kwargs, 0, "s", ""))
    budget.allow(len(text) + (text.count("\n") + 1) * per_line)


#: Filters whose output can be far larger than their input, checked before they run.
_PRECHECKS: dict[str, Callable[[Budget, tuple[Any, ...], dict[str, Any]], None]] = {
    "join": lambda b, a, k: _precheck_join(b, _arg(a, k, 0, "value", ()), _arg(a, k, 1, "d", "")),
    "center": lambda b, a, k: b.allow(_arg(a, k, 1, "width", 80)),
    "indent": _precheck_indent,
    "format": lambda b, a, k: _precheck_format(b, str(_arg(a, k, 0, "value", ""))),
}


def _guard_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    precheck = _PRECHECKS.get(name)

    @functools.wraps(function)  # keeps jinja's pass_context / pass_environment marks
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        if budget is None:
            return function(*args, **kwargs)
        budget.check()
        if precheck is not None:
            args = _materialized(args)
            precheck(budget, _value_args(args), kwargs)
        return budget.sized(function(*args, **kwargs))

    return guarded


def _materialized(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A generator (from `map`, `select`...) made a list, so that a precheck can measure it."""
    return tuple(list(arg) if isinstance(arg, Iterator) else arg for arg in args)


def _value_args(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The filter's arguments without the context or environment jinja may pass first."""
    if args and isinstance(args[0], (jinja2.runtime.Context, jinja2.Environment, jinja2.nodes.EvalContext)):
        return args[1:]
    return args


class StrictForKnown(jinja2.ChainableUndefined):
    """Missing data inside free-form values (`event.properties.a.b`) and unknown names are empty, as before
    (`declic check` rejects the names); a field that a known object lacks (`contact.firstname`, kit/context.py)
    is an error naming it, so that a typo in a template edited after start fails the step instead of sending
    an empty greeting. `| default(...)` and `is defined` still work."""

    __slots__ = ()

    def _strict(self) -> bool:
        return isinstance(self._undefined_obj, Known)

    @property
    def _undefined_message(self) -> str:
        obj, name = self._undefined_obj, self._undefined_name
        if isinstance(obj, Known) and isinstance(name, str):
            close = difflib.get_close_matches(name, sorted(obj), n=1)
            return f"{obj.label} has no field {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
        return str(super()._undefined_message)

    def _check(self) -> None:
        if self._strict():
            self._fail_with_undefined_error()

    def __str__(self) -> str:
        self._check()
        return super().__str__()

    def __html__(self) -> str:
        self._check()
        return super().__html__()

    def __iter__(self) -> Iterator[Any]:
        self._check()
        return super().__iter__()

    def __len__(self) -> int:
        self._check()
        return super().__len__()

    def __bool__(self) -> bool:
        self._check()
        return super().__bool__()

    def __eq__(self, other: object) -> bool:
        self._check()
        return super().__eq__(other)

    def __ne__(self, other: object) -> bool:
        self._check()
        return super().__ne__(other)

    __hash__ = jinja2.ChainableUndefined.__hash__


def make_environment(templates_dir: Path | None, pm: pluggy.PluginManager | None = None) -> jinja2.Environment:
    env = BoundedEnvironment(
        loader=jinja2.FileSystemLoader(str(templates_dir)) if templates_dir else None,
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default=False),
        undefined=StrictForKnown,
        keep_trailing_newline=False,
    )
    env.filters.update(locales.FILTERS)  # before the plugins, which may replace them
    if pm is not None:
        pm.hook.prepare_jinja2_environment(env=env)
    # After the plugins, so that their filters are bounded too.
    env.filters.update(
        {name: _guard_filter(name, f) for name, f in env.filters.items() if name not in (_LOOP_FILTER, _SIZE_FILTER)}
    )
    return env


def dumps_exact(value: Any, **kwargs: Any) -> str:
    """json.dumps for `tojson`: money (Decimal) is written as the exact number it is, dates in ISO 8601."""
    nonce = secrets.token_hex(8)
    numbers: dict[str, str] = {}

    def default(obj: Any) -> Any:
        if isinstance(obj, Decimal) and obj.is_finite():
            token = f"\x00{nonce}:{len(numbers)}"
            numbers[json.dumps(token)] = str(obj)
            return token
        if isinstance(obj, (datetime, date)):
            return obj.isoformat()
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")

    text = json.dumps(value, default=default, **kwargs)
    for token, number in numbers.items():
        text = text.replace(token, number)
    return text


def compile_condition(env: jinja2.Environment, expression: str) -> Any:
    """Compile an `if:` expression; raises jinja2.TemplateSyntaxError when it is not one."""
    return env.compile_expression(expression, undefined_to_none=True)


#: What one `if:` may cost: conditions run on the database thread, so less than a message may.
CONDITION_LIMITS = RenderLimits(cpu_time=1.0, output_bytes=1024 * 1024)


def evaluate(condition: Any, context: dict[str, Any], limits: RenderLimits = CONDITION_LIMITS) -> Any:
    """The value of a compiled `if:` within `limits`: every loop, call and operator checks the CPU time,
    and so do `contact.count(where=...)` and the other history helpers (through `spend()`).

    Raises RenderLimitExceeded past the limit, or whatever the expression raises.
    """
    if _budget() is not None:  # a condition inside a condition (`where=`) shares the outer budget
        return condition(**context)
    _local.budget = Budget(limits)
    try:
        return condition(**context)
    finally:
        _local.budget = None


def spend() -> None:
    """Check the running budget, for code called from an expression that loops on its own (history helpers)."""
    budget = _budget()
    if budget is not None:
        budget.check()


def template_files(templates_dir: Path, name: str) -> dict[str, Path]:
    return {
        part: templates_dir / f"{name}.{part}.j2" for part in PARTS if (templates_dir / f"{name}.{part}.j2").is_file()
    }


def render_message(
    env: jinja2.Environment, name: str, context: dict[str, Any], limits: RenderLimits | None = None
) -> dict[str, str]:
    """Render every part that exists, the text part being required, within `limits` for the whole message.

    Any failure (a template error, a limit, RecursionError, a filter raising) is a TemplateProblem.
    Blocking and possibly slow: run it in a worker thread.
    """
    budget = Budget(limits or RenderLimits())
    _local.budget = budget
    try:
        rendered = {
            part: text for part in PARTS if (text := _render_part(env, budget, name, part, context)) is not None
        }
    finally:
        _local.budget = None
    if "txt" not in rendered:
        raise TemplateProblem(f"template {name}.txt.j2 not found")
    size = sum(len(text.encode()) for text in rendered.values())
    if size > budget.limits.output_bytes:
        raise RenderLimitExceeded(
            f"{name}: output of {size} bytes is over the {budget.limits.output_bytes} bytes limit"
        )
    if "subject" in rendered:  # one line; no-break spaces (`59,90 €`, as Babel writes it) stay
        rendered["subject"] = _BREAKING_SPACES.sub(" ", rendered["subject"]).strip(" ")
    return rendered


def _render_part(env: jinja2.Environment, budget: Budget, name: str, part: str, context: dict[str, Any]) -> str | None:
    file = f"{name}.{part}.j2"
    try:
        template = env.get_template(file)
    except jinja2.TemplateNotFound:
        return None
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateProblem(f"{file}: {exc}") from exc
    chunks: list[str] = []
    try:
        for chunk in template.generate(context):
            budget.emitted(chunk)
            chunks.append(chunk)
    except RenderLimitExceeded as exc:
        raise RenderLimitExceeded(f"{file}: {exc}") from None
    except RecursionError:
        raise TemplateProblem(f"{file}: too deep a recursion (a macro calling itself without end?)") from None
    except Exception as exc:  # a template error, a filter raising, tojson on something that is not JSON...
        raise TemplateProblem(f"{file}{_line_of(exc, template)}: {type(exc).__name__}: {exc}") from exc
    return "".join(chunks)


def _line_of(exc: Exception, template: jinja2.Template) -> str:
    """`:LINE` of the template where `exc` was raised, as jinja's rewritten traceback tells it, or nothing."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == template.filename]
    return f":{frames[-1].lineno}" if frames else ""
