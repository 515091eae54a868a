"""YAML loading that remembers where each value was written and resolves ${VAR}.

The config is written by people and sometimes by tools; whatever the text, loading it ends in
data or in `YamlProblem`s with a position, never in another exception.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

Path = tuple[str | int, ...]
Mark = tuple[int, int]

KEY = "\0key"  # path suffix under which a mapping key's own position is kept

#: Deeper than any real config, and far from Python's recursion limit.
MAX_DEPTH = 50
#: Values after aliases are expanded: a few "billion laughs" aliases must not eat the memory.
MAX_VALUES = 100_000

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_MERGE = "tag:yaml.org,2002:merge"
#: What a tag wants, where PyYAML's own error says nothing useful.
_HINTS = {"!!timestamp": "not a date or a date and time", "!!binary": "not base64"}


class YamlProblem(Exception):
    def __init__(self, mark: Mark, path: Path, message: str):
        self.mark, self.path, self.message = mark, path, message
        super().__init__(message)


class YamlProblems(Exception):
    """The text is YAML, but not plain data (a bad tag, an alias that contains itself...): each with its place."""

    def __init__(self, problems: list[YamlProblem]):
        self.problems = problems
        super().__init__("; ".join(p.message for p in problems))


class _Loader(yaml.SafeLoader):
    """PyYAML composes nested nodes recursively: stop at MAX_DEPTH, before Python's own limit."""

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise YamlProblem(_at(self.peek_event().start_mark), (), f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load(text: str, env: Mapping[str, str] | None = None) -> tuple[Any, dict[Path, Mark], list[YamlProblem]]:
    """Parse YAML into plain data, a path -> (line, column) map, and the ${VAR} and duplicate-key problems.

    A path maps to where its value starts; `(*path, KEY)` maps to where its key is written.
    Raises YamlProblem when the text is not YAML, YamlProblems when it is YAML but not plain data.
    """
    env = os.environ if env is None else env
    root = _compose(text)
    marks: dict[Path, Mark] = {}
    problems: list[YamlProblem] = []
    if root is None:
        return {}, {(): (1, 1)}, problems
    builder = _Builder(env, marks, problems)
    data = builder.build(root, ())
    if builder.fatal:
        raise YamlProblems(builder.fatal + problems)
    return data, marks, problems


def _compose(text: str) -> yaml.Node | None:
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:  # a NUL or another control character: raised before parsing
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise YamlProblem(
            _position(text, exc.position), (), f"invalid YAML: character U+{code:04X} is not allowed"
        ) from None
    try:
        return loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise YamlProblem(_at(mark) if mark else (1, 1), (), f"invalid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise YamlProblem(_at(loader.get_mark()), (), f"invalid YAML: {exc}") from None
    except (ValueError, OverflowError) as exc:  # PyYAML's scanner on "\U10010000", out of Unicode
        raise YamlProblem(_at(loader.get_mark()), (), f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()


class _Builder:
    """Nodes to plain data, keeping positions; what cannot be plain data becomes a problem at its place."""

    def __init__(self, env: Mapping[str, str], marks: dict[Path, Mark], problems: list[YamlProblem]):
        self.env, self.marks, self.problems = env, marks, problems
        self.fatal: list[YamlProblem] = []
        self.values = 0
        self.constructor = yaml.SafeLoader("")
        #: The collections being built, by id: an alias met again inside itself would never end. A set, not a
        #: walk up the path at each value: an alias bomb builds 100,000 values before it is refused (0.24 -> 0.19 s).
        self.open: set[int] = set()

    def build(self, node: yaml.Node, path: Path) -> Any:
        mark = _at(node.start_mark)
        self.marks[path] = mark
        self.values += 1
        if self.values > MAX_VALUES:
            if self.values == MAX_VALUES + 1:
                self._fail(mark, path, f"more than {MAX_VALUES} values once aliases are expanded")
            return None
        if id(node) in self.open:
            return self._fail(mark, path, "an alias refers to a node that contains it")
        if len(path) > MAX_DEPTH:
            return self._fail(mark, path, f"nested deeper than {MAX_DEPTH} levels once aliases are expanded")
        if isinstance(node, yaml.ScalarNode):
            value = self._scalar(node, path)
            return substitute(value, self.env, mark, path, self.problems) if isinstance(value, str) else value
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        finally:
            self.open.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        merged: dict[Any, Any] = {}
        # Merged mappings first, so that the positions kept are those of the keys written here.
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                merged = {**self._merge(value_node, path), **merged}
        for key_node, value_node in node.value:
            where = _at(key_node.start_mark)
            if key_node.tag == _MERGE:
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                kind = "a list" if isinstance(key_node, yaml.SequenceNode) else "a mapping"
                self._fail(where, path, f"a key must be a name, not {kind}")
                continue
            key = self._scalar(key_node, path)
            if not _hashable(key):
                self._fail(where, path, f"a key must be a name, not {type(key).__name__}")
                continue
            self.marks[(*path, key, KEY)] = where
            if key in result:
                self.problems.append(YamlProblem(where, (*path, key), "duplicate key"))
            result[key] = self.build(value_node, (*path, key))
        self.marks[path] = _at(node.start_mark)  # merged mappings were built at this path too
        return {**{k: v for k, v in merged.items() if k not in result}, **result}

    def _merge(self, node: yaml.Node, path: Path) -> dict[Any, Any]:
        """`<<: *defaults` or `<<: [*a, *b]`: keys written here win, then the first mapping listed."""
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        merged: dict[Any, Any] = {}
        for source in sources:
            if not isinstance(source, yaml.MappingNode):
                self._fail(_at(source.start_mark), path, "`<<` merges a mapping or a list of mappings")
                continue
            value = self.build(source, path)
            if isinstance(value, dict):
                merged = {**value, **merged}
        return merged

    def _scalar(self, node: yaml.Node, path: Path) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as exc:
            return self._fail(_at(node.start_mark), path, f"invalid YAML: {exc.problem or exc}")
        except Exception as exc:  # a resolver's tag with a value it cannot read: `!!int abc`, `!!timestamp x`
            short = node.tag.replace("tag:yaml.org,2002:", "!!")
            hint = _HINTS.get(short, str(exc) if isinstance(exc, ValueError) else "not a value of this type")
            return self._fail(_at(node.start_mark), path, f"invalid {short} value {_short(node.value)} ({hint})")

    def _fail(self, mark: Mark, path: Path, message: str) -> None:
        self.fatal.append(YamlProblem(mark, path, message))


def _hashable(key: object) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


def _short(value: object) -> str:
    text = str(value)
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _at(mark: yaml.Mark) -> Mark:
    return (mark.line + 1, mark.column + 1)


def _position(text: str, index: int) -> Mark:
    line_start = text.rfind("\n", 0, index) + 1
    return (text.count("\n", 0, index) + 1, index - line_start + 1)


def substitute(value: str, env: Mapping[str, str], mark: Mark, path: Path, problems: list[YamlProblem]) -> str:
    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        # As in the shell: `${VAR:-default}` takes the default when VAR is unset or empty.
        if name in env and (env[name] or default is None):
            return env[name]
        if default is not None:
            return default
        problems.append(
            YamlProblem(mark, path, f"environment variable {name} is not set (or write ${{{name}:-default}})")
        )
        return ""

    return _VAR.sub(replace, value)
