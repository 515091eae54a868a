"""Property: over 10,000 random consent timelines, no marketing message goes to a contact whose
latest consent statement, among those received by then, was a withdrawal or none.

The timelines mix the shapes of statement every consent-carrying source produces: dated
actions (Mailchimp subscribe/unsubscribe, Mandrill unsubscribe, Shopify consent updates),
actions dated on arrival (a STOP reply, the unsubscribe link), dated snapshots (the customer
inside a Shopify order) and undated ones; they arrive late and out of order. They run through
the real router, scheduler and send-time checks under a fake clock (the machinery of
`declic simulate`, with a recording sink). Set DECLIC_PROPERTY_SEED to replay another draw.
"""

from __future__ import annotations

import logging
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import groupby
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog

from gateway.cli.simulate import RecordingSink, TimelineItem, run_until, timeline_source
from gateway.config import load_config
from gateway.http.app import build_gateway
from gateway.kit.clock import FakeClock
from gateway.plugins import collect, get_plugin_manager
from gateway.store import CONTACTS, DECISIONS
from gateway.store.inbox import NewCall, commit_calls
from gateway.testing import write_deployment

TIMELINES = int(os.environ.get("DECLIC_PROPERTY_TIMELINES", "10000"))
START = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)
#: Arrivals fall on whole minutes and steps on half minutes: no send shares a moment with an arrival.
STEP_WAIT = timedelta(minutes=30, seconds=30)
CONFIG = """\
public_url: https://hooks.example.com
storage: {{url: 'sqlite:///{folder}/property.db'}}
sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: 9, tls: none, sender: shop@example.com}}
policies:
  consent: {{email: required}}
rules:
  - name: cart
    when: checkout.started
    steps:
      - wait: {wait}s
        send: {{via: email, template: t}}
"""


@dataclass(frozen=True)
class Statement:
    arrives: datetime
    state: str
    stated_at: datetime | None  # None: an undated snapshot
    action: bool


def draw_timeline(rng: random.Random) -> tuple[list[Statement], list[datetime]]:
    """A few statements and one or two checkouts, arriving within four hours, in any order."""
    minutes = rng.sample(range(240), rng.randint(2, 6))
    arrivals = [START + timedelta(minutes=m) for m in minutes]
    checkouts, statements = arrivals[: rng.randint(1, 2)], []
    for arrives in arrivals[len(checkouts) :]:
        state = rng.choice(["granted", "withdrawn"])
        shape = rng.choice(["dated action", "action on arrival", "dated snapshot", "undated snapshot"])
        if shape == "action on arrival":
            statements.append(Statement(arrives, state, arrives, True))
        elif shape == "undated snapshot":
            statements.append(Statement(arrives, state, None, False))
        else:  # stated up to three hours before it arrives (a late webhook), or a stale snapshot
            stated = arrives - timedelta(seconds=rng.randint(0, 3 * 3600))
            statements.append(Statement(arrives, state, stated, shape == "dated action"))
    return statements, checkouts


def state_by(statements: list[Statement], moment: datetime) -> str:
    """The oracle: the latest dated statement received before `moment` (a withdrawal wins a tie);
    with none dated, the first undated snapshot received; with nothing received, none."""
    received = [s for s in statements if s.arrives < moment]
    dated = [s for s in received if s.stated_at is not None]
    if dated:
        latest = max(s.stated_at for s in dated if s.stated_at is not None)
        states = {s.state for s in dated if s.stated_at == latest}
        return "withdrawn" if "withdrawn" in states else states.pop()
    undated = sorted(received, key=lambda s: s.arrives)
    return undated[0].state if undated else "none"


def items_for(contact: int, statements: list[Statement], checkouts: list[datetime]) -> list[TimelineItem]:
    email = f"c{contact}@example.org"
    items = [
        TimelineItem(at=at, type="checkout.started", contact={"email": email}, correlation=f"checkout:{contact}.{n}")
        for n, at in enumerate(checkouts)
    ]
    for s in statements:
        given: dict[str, Any] = {"state": s.state, "action": s.action}
        if s.stated_at is not None:
            given["stated_at"] = s.stated_at
        items.append(
            TimelineItem(at=s.arrives, type="profile.updated", contact={"email": email, "consent": {"email": given}})
        )
    return items


@pytest.mark.slow
@pytest.mark.timeout(1500)  # some 45,000 calls and 20,000 steps: about 2 minutes on a quiet 2-core machine
async def test_no_marketing_message_after_a_withdrawal_or_without_a_statement(tmp_path: Path) -> None:
    seed = int(os.environ.get("DECLIC_PROPERTY_SEED", "20261203"))
    rng = random.Random(seed)
    timelines = {contact: draw_timeline(rng) for contact in range(TIMELINES)}
    items = sorted(
        (item for contact, (s, c) in timelines.items() for item in items_for(contact, s, c)), key=lambda i: i.at
    )
    pm = get_plugin_manager()
    path = write_deployment(
        tmp_path, CONFIG.format(folder=tmp_path, wait=int(STEP_WAIT.total_seconds())), {"t.txt.j2": "x"}
    )
    settings = load_config(path, collect(pm), pm)
    clock = FakeClock(START - timedelta(minutes=1))
    gateway = build_gateway(
        settings, pm=pm, clock=clock, role="worker", wrap_sink=RecordingSink, extra_sources=timeline_source
    )
    gateway.db.upgrade()
    saved = structlog.get_config()  # some 40,000 info lines would cost more than the run itself
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        number = 0
        for at, group in groupby(items, key=lambda item: item.at):
            await run_until(gateway, clock, at)
            calls = []
            for item in group:
                number += 1
                calls.append(NewCall("~timeline", f"item-{number}", at, {}, item.model_dump_json().encode()))
            await gateway.db.run(commit_calls, calls)
            await gateway.worker.drain()
        await run_until(gateway, clock, items[-1].at + 2 * STEP_WAIT)
        with gateway.db.engine.connect() as conn:
            joined = sa.select(CONTACTS.c.email, DECISIONS.c.at).join(CONTACTS, CONTACTS.c.id == DECISIONS.c.contact_id)
            sends = conn.execute(joined.where(DECISIONS.c.action == "send")).all()
            suppressed = len(conn.execute(joined.where(DECISIONS.c.action == "suppressed")).all())
    finally:
        structlog.configure(**saved)
        gateway.db.close()

    wrong: dict[int, list[str]] = defaultdict(list)
    for email, at in sends:
        contact = int(email.removeprefix("c").partition("@")[0])
        moment = at.replace(tzinfo=UTC) if at.tzinfo is None else at
        state = state_by(timelines[contact][0], moment)
        if state != "granted":
            wrong[contact].append(f"sent at {moment:%H:%M:%S} while the latest statement was {state}")
    assert not wrong, f"seed {seed}: {len(wrong)} contacts mailed against their will, e.g. {list(wrong.items())[:3]}"
    # Not vacuous: both outcomes occur in quantity.
    assert len(sends) > TIMELINES // 10 and suppressed > TIMELINES // 10, (len(sends), suppressed)
