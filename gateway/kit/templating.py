"""The sandboxed Jinja2 environment for templates and `if:` expressions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import pluggy
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TemplateProblem

#: The parts a message template may have; `<name>.txt.j2` is the one required part.
PARTS = ("subject", "txt", "html")


def make_environment(templates_dir: Path | None, pm: pluggy.PluginManager | None = None) -> jinja2.Environment:
    env = ImmutableSandboxedEnvironment(
        loader=jinja2.FileSystemLoader(str(templates_dir)) if templates_dir else None,
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default=False),
        undefined=jinja2.ChainableUndefined,
        keep_trailing_newline=False,
    )
    if pm is not None:
        pm.hook.prepare_jinja2_environment(env=env)
    return env


def compile_condition(env: jinja2.Environment, expression: str) -> Any:
    """Compile an `if:` expression; raises jinja2.TemplateSyntaxError when it is not one."""
    return env.compile_expression(expression, undefined_to_none=True)


def template_files(templates_dir: Path, name: str) -> dict[str, Path]:
    return {
        part: templates_dir / f"{name}.{part}.j2" for part in PARTS if (templates_dir / f"{name}.{part}.j2").is_file()
    }


def render_message(env: jinja2.Environment, name: str, context: dict[str, Any]) -> dict[str, str]:
    """Render every part that exists; the text part is required."""
    rendered: dict[str, str] = {}
    for part in PARTS:
        try:
            template = env.get_template(f"{name}.{part}.j2")
        except jinja2.TemplateNotFound:
            continue
        try:
            rendered[part] = template.render(context)
        except jinja2.TemplateError as exc:
            raise TemplateProblem(f"{name}.{part}.j2: {exc}") from exc
    if "txt" not in rendered:
        raise TemplateProblem(f"template {name}.txt.j2 not found")
    if "subject" in rendered:
        rendered["subject"] = " ".join(rendered["subject"].split())
    return rendered
