"""Locales in templates: Babel's money, number and date filters, and the chain of translations to try.

A contact's `locale` comes from its sources as they write it (`fr-CA`, `fr_CA`, `FR`): it is read
with Babel's own parser, and one Babel does not know counts as none (the deployment's `locale` is
used), so that odd data never fails a send. A locale or a value written in the template itself that
is wrong (`format_currency(x, 'EUR', locale='zz')`, a total that is not a number) fails the render
as a template problem, like any other template error: the journal says why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

import jinja2
from babel import Locale, UnknownLocaleError
from babel import dates as babel_dates
from babel import numbers as babel_numbers

#: The variables render contexts carry for the filters (and for authors): the contact's locale and time zone.
LOCALE_VARIABLE, TIMEZONE_VARIABLE = "locale", "timezone"


def parse_locale(text: object) -> Locale | None:
    """`fr-CA`, `fr_CA` or `fr` as a Babel Locale; None when it is not one Babel knows."""
    if not isinstance(text, str) or not text.strip() or len(text) > 35:
        return None
    try:
        return Locale.parse(text.strip().replace("-", "_"))
    except (ValueError, TypeError, UnknownLocaleError):
        return None


def contact_locale(given: object, default: str) -> Locale:
    """The contact's locale when Babel knows it, else the deployment's (`locale:`, validated at start-up)."""
    return parse_locale(given) or parse_locale(default) or Locale("en")


def locale_chain(given: object, default: str) -> tuple[str, ...]:
    """The translations to try, most specific first: `fr_CA` then `fr`, the untranslated template after them.

    A contact without a (known) locale is taken to speak the deployment's; one with a locale that has no
    translation gets the untranslated template, not the deployment language's translation.
    """
    locale = contact_locale(given, default)
    return tuple(dict.fromkeys((str(locale), locale.language)))


def _locale(context: jinja2.runtime.Context, given: str | None) -> Locale:
    if given is None:
        return parse_locale(context.get(LOCALE_VARIABLE)) or Locale("en")
    found = parse_locale(given)
    if found is None:
        raise ValueError(f"unknown locale {given!r}")
    return found


def _zone(context: jinja2.runtime.Context, given: str | None) -> ZoneInfo:
    return ZoneInfo(given or context.get(TIMEZONE_VARIABLE) or "UTC")


def _number(value: Any) -> Decimal | int | float:
    """Decimal stays exact; a numeric string (`"59.90"`, as many payloads send money) is read as one."""
    if isinstance(value, jinja2.Undefined):
        raise ValueError("no value to format (undefined)")
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal, str)):
        raise ValueError(f"{type(value).__name__} is not a number")
    if not isinstance(value, str):
        return value
    try:
        return Decimal(value.strip()[:100])
    except InvalidOperation:
        raise ValueError(f"{value[:40]!r} is not a number") from None


def _moment(value: Any, zone: ZoneInfo) -> datetime | date:
    """Datetimes in the contact's time zone (naive ones are UTC, as Declic stores them); ISO 8601 text is read."""
    if isinstance(value, jinja2.Undefined):
        raise ValueError("no date to format (undefined)")
    if isinstance(value, str):
        text = value.strip()
        value = date.fromisoformat(text) if len(text) == 10 else datetime.fromisoformat(text)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(zone)
    if isinstance(value, date):
        return value
    raise ValueError(f"{type(value).__name__} is not a date")


@jinja2.pass_context
def format_currency(
    context: jinja2.runtime.Context, value: Any, currency: str, format: str | None = None, locale: str | None = None
) -> str:
    """`{{ total | format_currency('EUR') }}` -> `59,90 €` for a French contact, `€59.90` for an English one."""
    return babel_numbers.format_currency(_number(value), str(currency), format=format, locale=_locale(context, locale))


@jinja2.pass_context
def format_decimal(
    context: jinja2.runtime.Context, value: Any, format: str | None = None, locale: str | None = None
) -> str:
    """`{{ 1234.5 | format_decimal }}` -> `1 234,5` in French."""
    return babel_numbers.format_decimal(_number(value), format=format, locale=_locale(context, locale))


@jinja2.pass_context
def format_date(
    context: jinja2.runtime.Context,
    value: Any,
    format: str = "medium",
    locale: str | None = None,
    timezone: str | None = None,
) -> str:
    """`{{ event.occurred_at | format_date('long') }}` -> `14 mars 2026`, the day as the contact lives it."""
    moment = _moment(value, _zone(context, timezone))
    day = moment.date() if isinstance(moment, datetime) else moment
    return babel_dates.format_date(day, format=format, locale=_locale(context, locale))


@jinja2.pass_context
def format_datetime(
    context: jinja2.runtime.Context,
    value: Any,
    format: str = "medium",
    locale: str | None = None,
    timezone: str | None = None,
) -> str:
    """`{{ event.occurred_at | format_datetime('short') }}` -> `14/03/2026 10:00` in the contact's time zone."""
    zone = _zone(context, timezone)
    moment = _moment(value, zone)
    if not isinstance(moment, datetime):
        moment = datetime(moment.year, moment.month, moment.day, tzinfo=zone)
    return babel_dates.format_datetime(moment, format=format, tzinfo=zone, locale=_locale(context, locale))


FILTERS: dict[str, Callable[..., str]] = {
    "format_currency": format_currency,
    "format_decimal": format_decimal,
    "format_date": format_date,
    "format_datetime": format_datetime,
}


def translated(env: jinja2.Environment, name: str, locales: Iterable[str]) -> str:
    """`welcome.fr_CA`, else `welcome.fr`... : the first translation whose text part exists, else `welcome`.

    A translation is chosen whole (its subject, text and HTML parts), so a missing part never mixes languages.
    Asks the loader (a file read, no compiling: this runs while a step is prepared, in its transaction).
    """
    if env.loader is None:
        return name
    for locale in locales:
        try:
            env.loader.get_source(env, f"{name}.{locale}.txt.j2")
        except jinja2.TemplateNotFound:
            continue
        return f"{name}.{locale}"
    return name
