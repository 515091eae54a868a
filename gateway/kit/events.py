"""The canonical Event: what every source produces and every rule reads."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Canonical event types (design.md). Extend, never rename.
CANONICAL_TYPES = frozenset(
    {
        "customer.created", "customer.updated",
        "checkout.started", "checkout.updated",
        "order.placed", "order.paid", "order.fulfilled", "order.cancelled",
        "email.subscribed", "email.unsubscribed", "email.opened", "email.clicked",
        "email.bounced", "email.complained", "email.sent",
        "profile.updated", "ticket.ordered", "attendee.updated", "attendee.checked_in",
        "contact.created", "contact.property_changed", "deal.created", "deal.stage_changed",
        "page.viewed", "sms.delivered", "sms.failed", "sms.opted_out",
        "contact.deleted", "contact.merged", "contact.erased",
    }
)  # fmt: skip

#: Event types the core acts on itself, beyond routing:
#: `contact.erased` erases the contact's personal data (a privacy deletion request), and
#: delivery feedback (FEEDBACK_TYPES) whose `properties.provider_message_id` names a delivery.
ERASE_TYPE = "contact.erased"
FEEDBACK_TYPES = {
    "sms.delivered": "delivered", "sms.failed": "failed", "email.bounced": "bounced",
    "email.complained": "complained", "email.opened": "opened", "email.clicked": "clicked",
    "email.unsubscribed": "unsubscribed",
}  # fmt: skip

#: Consent states a contact can hold per channel.
CONSENT_STATES = ("granted", "withdrawn", "pending", "none")
ConsentState = Literal["granted", "withdrawn", "pending", "none"]
#: Events that are something the person did about their consent: a consent they carry is an action,
#: stated when the event occurred, even when the source wrote it as a bare state.
CONSENT_ACTION_TYPES = frozenset(
    {"email.subscribed", "email.unsubscribed", "email.complained", "sms.opted_out", "sms.opted_in"}
)


class ConsentStatement(BaseModel):
    """One statement of a person's consent on one channel, as its source made it.

    The contact's state per channel is the latest statement by `stated_at`, whatever order
    the webhooks arrive in; the ledger keeps every statement, applied or not.
    """

    model_config = ConfigDict(extra="forbid")

    state: ConsentState
    #: When the person stated it, as the source says (Shopify's consent_updated_at, Mailchimp's
    #: fired_at, Mandrill's ts). None: the source gives no time of its own.
    stated_at: datetime | None = None
    #: True for something the person did (an unsubscribe link, a STOP reply, a sign-up form);
    #: False for a snapshot that merely repeats a state (a profile, the customer inside an order).
    #: An action with no `stated_at` is dated by its event; a snapshot with none never overrides.
    action: bool = False
    #: What shows it, for an auditor: form id, text version shown, IP and user agent...
    evidence: dict[str, Any] = Field(default_factory=dict)


class PushRef(BaseModel):
    """A device that takes push messages: a Web Push subscription or an FCM registration token."""

    model_config = ConfigDict(extra="forbid")

    kind: str  # webpush | fcm
    address: str  # the Web Push endpoint URL, or the FCM token
    keys: dict[str, str] = Field(default_factory=dict)  # Web Push: p256dh and auth


class ContactRef(BaseModel):
    """Who an event is about, as the source knows them."""

    model_config = ConfigDict(extra="forbid")

    email: str | None = None
    #: The address the contact had before (an e-mail change): used to find them.
    previous_email: str | None = None
    phone: str | None = None
    external_ids: dict[str, str] = Field(default_factory=dict)
    #: Anonymous ids the contact had before, kind -> value (Segment's `alias`: the visitor's id from
    #: before they signed up). The contact gains each; a record that holds one and shows nothing of a
    #: person (no e-mail, phone, consent, device, nor an id of another kind) is folded into it.
    previous_ids: dict[str, str] = Field(default_factory=dict)
    first_name: str | None = None
    last_name: str | None = None
    locale: str | None = None
    timezone: str | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)
    #: channel ("email", "sms") -> what the source states, only when it states something. A bare
    #: state ("granted") is a snapshot with no time of its own: say `ConsentStatement(...)` when
    #: the source gives the time or the person acted.
    consent: dict[str, ConsentStatement] = Field(default_factory=dict)
    #: Devices to add to the contact's push subscriptions.
    push_subscriptions: list[PushRef] = Field(default_factory=list)
    #: False when the caller proved nothing about who this is (a call signed with a browser's
    #: public write key): the contact is found by these ids and may gain anonymous ids and
    #: traits, but an existing contact's e-mail, phone, devices and consent stay as they are,
    #: and a new contact's consent is granted only with evidence.
    trusted: bool = True

    @field_validator("consent", mode="before")
    @classmethod
    def _bare_states(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"state": v} if isinstance(v, str) else v for k, v in value.items()}
        return value


class Event(BaseModel):
    """One thing a customer did, in Declic's own vocabulary."""

    id: str = ""
    source: str = ""
    type: str
    occurred_at: datetime
    contact: ContactRef
    properties: dict[str, Any] = Field(default_factory=dict)
    #: Keys that tie events of one story together, e.g. ["order:1", "checkout:abc"].
    correlation: list[str] = Field(default_factory=list)
    raw_ref: int | None = None
    #: The provider's own id for this one event, when a batch may repeat it in a later call:
    #: an event whose (source, dedupe_key) was stored before is skipped (scores count it once).
    dedupe_key: str | None = None


def is_known_type(event_type: str, extra: frozenset[str] = frozenset()) -> bool:
    return event_type in CANONICAL_TYPES or event_type in extra or event_type.startswith("track.")
