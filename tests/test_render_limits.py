"""Bounded rendering: pathological templates fail their step once, for good, and never hold up
acknowledgements, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import tracemalloc
from datetime import timedelta
from decimal import Decimal

import jinja2
import pytest
from structlog.testing import capture_logs

from conftest import TEMPLATES, Deployment, Factory, fixture_bytes
from declic_gateway.errors import TemplateProblem
from declic_gateway.kit.templating import RenderLimits, make_environment, render_message
from declic_gateway.testing import SmtpCatcher

ORDER = fixture_bytes("shopify/order.json")
TEMPLATE = "order-confirmation.txt.j2"
LIMITS = "  templates: {cpu_time: 300ms, output_bytes: 65536}\n"

#: (template, what the failure says): each would run for minutes, eat gigabytes, or crash the old worker.
PATHOLOGICAL = {
    "huge loop": ("{% for i in range(10**9) %}x{% endfor %}", "Range too big"),
    "nested loops": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "more than 0.3s of CPU time",
    ),
    "nested loops over strings": (
        "{% set s = 'ab' * 30000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
        "more than 0.3s of CPU time",
    ),
    "string multiplication": ("{{ 'x' * 10**9 }}", "over the 65536 bytes output limit"),
    "huge power": ("{{ 10 ** (10 ** 9) }}", "too large a number"),
    "deep recursion via macros": (
        "{% macro down(n) %}{{ down(n + 1) }}{% endmacro %}{{ down(0) }}",
        "too deep a recursion",
    ),
    "exponential macros": (
        "{% macro two(n) %}{% if n %}{{ two(n - 1) }}{{ two(n - 1) }}{% endif %}{% endmacro %}{{ two(60) }}",
        "more than 0.3s of CPU time",
    ),
    "huge join": ("{{ range(100000)|join('x' * 60000) }}", "output limit"),
    "doubling by concatenation": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "output limit",
    ),
    "wide format": ("{{ '%0999999999d'|format(1) }}", "output limit"),
    "wide str method": ("{{ 'x'.ljust(10**9) }}", "output limit"),
    "large output": ("{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}", "output over the 65536 bytes limit"),
    "tojson on something not JSON": ("{{ range(3)|tojson }}", "TypeError"),
    # Each value under the output limit, 36 MB of them kept: what a render builds adds up.
    "values kept in a list": (
        "{% set l = range(600)|map('string')|map('center', 60000)|list %}{{ l|length }}",
        "the values this render built add up to over 32 times the 65536 bytes output limit",
    ),
}


@pytest.mark.parametrize(("source", "reason"), PATHOLOGICAL.values(), ids=PATHOLOGICAL.keys())
def test_a_pathological_template_fails_fast_with_its_reason(source: str, reason: str) -> None:
    env = make_environment(None)
    env.loader = jinja2.DictLoader({TEMPLATE: source})
    with pytest.raises(TemplateProblem, match=reason) as failure:
        render_message(env, "order-confirmation", {}, RenderLimits(cpu_time=0.3, output_bytes=65536))
    assert str(failure.value).startswith(f"{TEMPLATE}:")  # and the line, when the error has one


def test_jinjas_lorem_ipsum_is_not_there() -> None:
    """One call ran to its end whatever the budget (n=10**7: minutes of CPU and gigabytes); `declic check`
    refuses a template that names it ("unknown name 'lipsum'")."""
    env = make_environment(None)
    env.loader = jinja2.DictLoader({TEMPLATE: "{{ lipsum(n=40000) }}"})
    with pytest.raises(TemplateProblem, match="'lipsum' is undefined"):
        render_message(env, "order-confirmation", {}, RenderLimits(cpu_time=0.3, output_bytes=65536))


def test_a_render_holds_a_bounded_amount_of_text() -> None:
    """600 values of 1 MB, each under the default 1 MB output limit, kept in a list: 572 MB before."""
    env = make_environment(None)
    env.loader = jinja2.DictLoader({TEMPLATE: "{% set l = range(600)|map('string')|map('center', 10**6)|list %}"})
    tracemalloc.start()
    try:
        with pytest.raises(TemplateProblem, match="add up to over 32 times"):
            render_message(env, "order-confirmation", {})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"{peak // 2**20} MB"


def test_garbage_collection_during_a_render_is_not_charged_to_the_template() -> None:
    """A full collection runs in whichever thread allocates when it is due, and its cost grows with the
    whole process's heap (seen at 1.3 s in a busy process): an innocent template must not fail for it."""

    def collect_for_a_while(value: object) -> object:  # stands for a collection due during the render
        began = time.thread_time()
        while time.thread_time() - began < 0.3:
            gc.collect()
        return value

    env = make_environment(None)
    env.filters["collect"] = collect_for_a_while
    env.loader = jinja2.DictLoader({TEMPLATE: "{{ 'ok'|collect }}{% for i in range(3) %}{{ i }}{% endfor %}"})
    rendered = render_message(env, "order-confirmation", {}, RenderLimits(cpu_time=0.1, output_bytes=65536))
    assert rendered["txt"] == "ok012"


def test_tojson_writes_money_as_the_exact_number() -> None:
    env = make_environment(None)
    env.loader = jinja2.DictLoader({TEMPLATE: "{{ price|tojson }} {{ {'total': price, 'items': [price]}|tojson }}"})
    text = render_message(env, "order-confirmation", {"price": Decimal("59.90")})["txt"]
    assert text == '59.90 {"items": [59.90], "total": 59.90}'


async def send_order(d: Deployment) -> None:
    assert (await d.post_shopify("orders/create", ORDER)).status == 200
    await d.advance(seconds=1)


def assert_failed_once(d: Deployment, reason: str) -> None:
    [(status, stored, attempts)] = d.rows("SELECT status, reason, attempts FROM deliveries")
    assert (status, attempts) == ("failed", 1) and reason in stored and stored.startswith(TEMPLATE)
    assert d.rows("SELECT status, attempts FROM jobs WHERE kind = 'step'") == [("dead", 1)]
    [(action, journal_reason)] = d.rows(
        "SELECT action, reason FROM decisions"
        " WHERE rule = 'order-confirmation' AND action NOT IN ('enrolled', 'not_enrolled')"
    )
    assert (action, journal_reason) == ("failed", stored)


@pytest.mark.parametrize(("source", "reason"), PATHOLOGICAL.values(), ids=PATHOLOGICAL.keys())
async def test_the_step_fails_once_for_good_with_the_reason_in_the_journal(
    deploy: Factory, smtp: SmtpCatcher, source: str, reason: str
) -> None:
    d = await deploy(templates=TEMPLATES | {TEMPLATE: source}, worker=LIMITS, max_attempts=12)
    with capture_logs() as logs:
        await send_order(d)
    assert_failed_once(d, reason)
    [line] = [entry for entry in logs if reason in str(entry.get("error", "")) + str(entry.get("reason", ""))]
    assert line["log_level"] in ("info", "warning", "error")
    await d.advance(hours=3)  # nothing left to retry
    assert_failed_once(d, reason)
    assert smtp.messages == []


async def test_money_in_tojson_is_sent_not_retried(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy(templates=TEMPLATES | {TEMPLATE: "Total: {{ event.properties.total_price|tojson }}"})
    await send_order(d)
    [message] = smtp.messages
    assert "Total: 59.90" in message.get_content()
    assert d.rows("SELECT status, attempts FROM deliveries") == [("sent", 1)]


async def test_acknowledgements_are_answered_while_a_pathological_template_renders(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    """The worker renders a template that only stops at its CPU limit; webhooks posted meanwhile are
    acknowledged before it stops."""
    rules = """\
  - name: order-confirmation
    when: order.placed
    kind: transactional
    steps:
      - wait: 1h
        send: {via: email, template: order-confirmation}
"""
    endless = "{{ 'go'|started }}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    d = await deploy(rules, worker="  templates: {cpu_time: 2s}\n")
    # Written after the check, which knows no `started` filter: templates are read when a message is rendered.
    (d.path.parent / "templates" / TEMPLATE).write_text(endless)
    started = threading.Event()
    d.gateway.env.filters["started"] = lambda value: started.set() or value  # a plugin's filter would do as well
    await send_order(d)  # the step is due in an hour
    d.clock.advance(timedelta(hours=1))
    rendering = asyncio.create_task(d.gateway.worker.drain())
    assert await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)
    for number in range(5):
        reply = await d.post_shopify("orders/create", ORDER, webhook_id=f"during-{number}")
        assert reply.status == 200
        assert not rendering.done(), "acknowledged only after the render stopped"
    await rendering
    assert_failed_once(d, "more than 2s of CPU time")
    assert d.scalar("SELECT count(*) FROM inbox") == 6
    assert smtp.messages == []
