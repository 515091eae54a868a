"""The canonical Event: what every source produces and every rule reads."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: Canonical event types (design.md). Extend, never rename.
CANONICAL_TYPES = frozenset(
    {
        "customer.created", "customer.updated",
        "checkout.started", "checkout.updated",
        "order.placed", "order.paid", "order.fulfilled", "order.cancelled",
        "email.subscribed", "email.unsubscribed", "email.opened", "email.clicked",
        "email.bounced", "email.complained",
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
    first_name: str | None = None
    last_name: str | None = None
    locale: str | None = None
    timezone: str | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)
    #: channel ("email", "sms") -> one of CONSENT_STATES, only when the source states it.
    consent: dict[str, str] = Field(default_factory=dict)
    #: Devices to add to the contact's push subscriptions.
    push_subscriptions: list[PushRef] = Field(default_factory=list)


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
