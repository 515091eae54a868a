"""What templates and `if:` expressions may name: the known-names table, shared by `declic check` and rendering.

The render context is built in two places: the router (`if:` when a trigger fires: `event`, `contact`)
and send/delivery.py (a step's `if:` and its template: also `rule`, `step`, `unsubscribe_url`, and
`confirm_url` for the double opt-in message). `declic check` reads the table below to reject a name
that would be undefined there; at run time the same objects are `Known` mappings, whose missing keys
are errors rather than empty text. tests/test_check_templates.py keeps the table and the code in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: `contact.<field>`, as pipeline/contacts.py loads a contact.
CONTACT_FIELDS = frozenset(
    {
        "id",
        "email",
        "phone",
        "first_name",
        "last_name",
        "locale",
        "timezone",
        "attributes",
        "consent",
        "email_status",
        "phone_status",
        "external_ids",
        "push_subscriptions",
    }
)

#: `event.<field>`, as pipeline/router.py `event_context` and pipeline/eventlog.py `load_event` build it.
#: `event.properties` is free-form: what is under it is never checked.
EVENT_FIELDS = frozenset({"id", "source", "type", "occurred_at", "correlation", "properties"})


@dataclass(frozen=True)
class Helper:
    """A method of `contact` (pipeline/contacts.py `ContactView`) that expressions may call."""

    usage: str
    #: Also in a rule's own `if:` (when the trigger fires), not only in steps' `if:` and templates.
    at_enrolment: bool = False


#: Adding a helper to ContactView is one entry here.
CONTACT_HELPERS: dict[str, Helper] = {
    "count": Helper("contact.count(EVENT, within=DURATION, where=EXPR)", at_enrolment=True),
    "has": Helper("contact.has(EVENT, within=DURATION, where=EXPR)", at_enrolment=True),
    "last": Helper("contact.last(EVENT, where=EXPR)", at_enrolment=True),
    "sent": Helper("contact.sent(rule=..., step=..., within=DURATION)", at_enrolment=True),
    "opened": Helper("contact.opened(rule=..., step=...)", at_enrolment=True),
    "clicked": Helper("contact.clicked(rule=..., step=...)", at_enrolment=True),
}

#: Objects whose every key is listed above: an attribute they lack is a mistake.
KNOWN_OBJECTS: dict[str, frozenset[str]] = {"contact": CONTACT_FIELDS, "event": EVENT_FIELDS}


class Known(dict[str, Any]):
    """A mapping whose keys are all it has (`contact`, `event`): in a template, a missing one is an error
    naming it, not empty text; what it holds (`event.properties`, `contact.attributes`) stays free-form."""

    def __init__(self, label: str, fields: dict[str, Any]):
        super().__init__(fields)
        self.label = label


@dataclass(frozen=True)
class Scope:
    """The names an expression or a template may use where it is evaluated."""

    #: Top-level names: what each is, for "did you mean".
    names: frozenset[str]
    #: Whether `contact` has its helpers here.
    helpers: bool
    #: Names that exist elsewhere but are not set here -> why (e.g. unsubscribe_url without public_url).
    unset: tuple[tuple[str, str], ...] = ()

    @classmethod
    def at_enrolment(cls) -> Scope:
        """A rule's `if:` and a scoring `if:` (pipeline/router.py)."""
        return cls(frozenset({"event", "contact"}), helpers=False)

    @classmethod
    def at_send(cls, unset: dict[str, str], extra: frozenset[str] = frozenset()) -> Scope:
        """A step's `if:` and its template (send/delivery.py); `unset` says which link is missing and why."""
        base = {"event", "contact", "rule", "step", "variant", "locale", "timezone", "unsubscribe_url"}
        names = frozenset(base - set(unset)) | extra
        return cls(names, helpers=True, unset=tuple(sorted(unset.items())))

    def contact_attributes(self) -> frozenset[str]:
        helpers = {name for name, h in CONTACT_HELPERS.items() if self.helpers or h.at_enrolment}
        return CONTACT_FIELDS | helpers
