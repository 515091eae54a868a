"""Grouped transactions: work that arrives together commits together, and a bad item fails alone."""

from __future__ import annotations

import asyncio
import threading

import pytest
import sqlalchemy as sa

from declic_gateway.errors import StorageUnavailable
from declic_gateway.store import META, Database
from declic_gateway.store.db import Failed, Grouped, together_or_alone


def remember(conn: sa.Connection, key: str) -> str:
    if key == "bad":
        raise ValueError("this one is bad")
    if key == "gone":  # the database going away just then
        raise StorageUnavailable("server closed the connection unexpectedly")
    conn.execute(sa.insert(META).values(key=key, value="x"))
    return key.upper()


def stored(db: Database) -> list[str]:
    with db.engine.connect() as conn:
        return sorted(conn.execute(sa.select(META.c.key).where(META.c.key.like("k%"))).scalars())


async def test_items_arriving_together_share_one_transaction(db: Database) -> None:
    transactions = []
    sa.event.listen(db.engine, "commit", lambda conn: transactions.append(conn))
    grouped = Grouped(db, remember)

    results = await asyncio.gather(*(grouped(f"k{i}") for i in range(20)))

    assert results == [f"K{i}" for i in range(20)]
    assert stored(db) == sorted(f"k{i}" for i in range(20))
    # All twenty came before the transaction began.
    assert len(transactions) == 1


async def test_a_caller_has_its_result_once_its_transaction_commits_while_items_keep_coming(db: Database) -> None:
    """A busy worker's steps come as a stream; the first of them is not held until the stream ends."""
    grouped = Grouped(db, remember)
    first = asyncio.ensure_future(grouped("k0"))
    later = []
    # A stream for up to 10 s: the first item's transaction takes a few of the GIL's 5 ms turns (this loop never
    # lets go of it by itself), never the stream's end. A count of items as the bound failed on a slow machine.
    ends = asyncio.get_running_loop().time() + 10
    while not first.done() and asyncio.get_running_loop().time() < ends:
        later.append(asyncio.ensure_future(grouped(f"k{len(later) + 1}")))
        await asyncio.sleep(0)

    assert first.done() and first.result() == "K0"  # not held until the stream ended
    assert await asyncio.gather(*later) == [f"K{n}" for n in range(1, len(later) + 1)]


async def test_a_bad_item_fails_alone(db: Database) -> None:
    grouped = Grouped(db, remember)

    results = await asyncio.gather(grouped("k1"), grouped("k2"), grouped("bad"), grouped("k3"), return_exceptions=True)

    assert results[:2] == ["K1", "K2"] and results[3] == "K3"
    assert isinstance(results[2], ValueError)
    assert stored(db) == ["k1", "k2", "k3"]


async def test_a_failed_transaction_leaves_nothing_behind_for_the_next_on_the_database_thread(db: Database) -> None:
    """SQLite's database thread keeps its connection between transactions: what a failed one wrote at once, or
    a statement the database refused, must not reach the next one's COMMIT."""

    def half_done(conn: sa.Connection) -> None:
        conn.execute(sa.insert(META).values(key="k-half", value="x"))  # written at once, not queued
        raise ValueError("the call cannot be applied")

    def refused(conn: sa.Connection) -> None:
        conn.execute(sa.insert(META).values(key="k-refused", value="x"))
        conn.execute(sa.insert(META).values(key="k-refused", value="y"))  # the same primary key

    with pytest.raises(ValueError):
        await db.run(half_done)
    with pytest.raises(sa.exc.IntegrityError):
        await db.run(refused)
    assert await db.run(remember, "k-next") == "K-NEXT"

    assert stored(db) == ["k-next"]


async def test_a_waiter_for_the_queued_items_cancelled_leaves_them_to_commit(db: Database) -> None:
    """A stopping worker waits for the records it queued (`finish`); cancelled again while it waits, it must not
    take them down with it: a send whose record is dropped is sent again after a restart."""
    grouped = Grouped(db, remember)
    started, release = threading.Event(), threading.Event()
    holding = asyncio.ensure_future(db.run(lambda conn: (started.set(), release.wait(30))))
    await asyncio.to_thread(started.wait, 30)  # the database thread is busy: the item waits in the queue
    item = asyncio.ensure_future(grouped("k1"))
    await asyncio.sleep(0)
    finishing = asyncio.ensure_future(grouped.finish())
    await asyncio.sleep(0)
    finishing.cancel()
    item.cancel()  # its caller gone too, as a stopping worker's jobs are
    release.set()
    await holding
    await asyncio.wait_for(grouped.finish(), 10)
    assert stored(db) == ["k1"]


async def test_items_written_alone_before_the_database_went_away_keep_their_results(db: Database) -> None:
    """A bad item fails the shared transaction; the items then run alone, and the database goes away under the
    fourth. The first three keep their outcomes (two are written: told they failed, a caller would do them again,
    a send's record twice); the database's error is the outcome of the fourth and of every item after it."""
    outcomes = await together_or_alone(
        db, lambda conn, keys: [remember(conn, k) for k in keys], ["k1", "bad", "k2", "gone", "k3"]
    )
    assert outcomes[0] == "K1" and outcomes[2] == "K2"
    assert [type(o.error) if isinstance(o, Failed) else None for o in outcomes] == [
        None,
        ValueError,
        None,
        StorageUnavailable,
        StorageUnavailable,
    ]
    assert stored(db) == ["k1", "k2"]
