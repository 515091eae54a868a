"""YAML loading that remembers where each value was written and resolves ${VAR}."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

Path = tuple[str | int, ...]
Mark = tuple[int, int]

KEY = "\0key"  # path suffix under which a mapping key's own position is kept

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class YamlProblem(Exception):
    def __init__(self, mark: Mark, path: Path, message: str):
        self.mark, self.path, self.message = mark, path, message
        super().__init__(message)


def load(text: str, env: Mapping[str, str] | None = None) -> tuple[Any, dict[Path, Mark], list[YamlProblem]]:
    """Parse YAML into plain data, a path -> (line, column) map, and the ${VAR} problems.

    A path maps to where its value starts; `(*path, KEY)` maps to where its key is written.
    """
    env = os.environ if env is None else env
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise YamlProblem(where, (), f"invalid YAML: {exc.problem or exc}") from None
    finally:
        loader.dispose()
    marks: dict[Path, Mark] = {}
    problems: list[YamlProblem] = []
    if root is None:
        return {}, {(): (1, 1)}, problems

    def build(node: yaml.Node, path: Path) -> Any:
        marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = loader.construct_object(key_node, deep=True)
                where = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                marks[(*path, key, KEY)] = where
                if key in result:
                    problems.append(YamlProblem(where, (*path, key), "duplicate key"))
                result[key] = build(value_node, (*path, key))
            return result
        if isinstance(node, yaml.SequenceNode):
            return [build(item, (*path, i)) for i, item in enumerate(node.value)]
        value = loader.construct_object(node, deep=True)
        return substitute(value, env, marks[path], path, problems) if isinstance(value, str) else value

    return build(root, ()), marks, problems


def substitute(value: str, env: Mapping[str, str], mark: Mark, path: Path, problems: list[YamlProblem]) -> str:
    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append(
            YamlProblem(mark, path, f"environment variable {name} is not set (or write ${{{name}:-default}})")
        )
        return ""

    return _VAR.sub(replace, value)
