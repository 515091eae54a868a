"""The Sink contract: send one rendered message and say what happened, never raise."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import Field, field_validator

from .limits import RATE_BOUNDS, SendLimiter, parse_rate
from .sources import Deployment, PluginConfig

#: The key under which a provider's message metadata names the Declic delivery (Mandrill's X-MC-Metadata):
#: the provider echoes it in its events, and feedback finds the delivery by it (`properties.delivery`).
DELIVERY_METADATA = "declic_delivery"
#: Seconds: a send holds a concurrency slot and a job's lease while it waits.
MAX_SEND_TIMEOUT = 600.0


class SinkConfig(PluginConfig):
    """Options every sink has: what it may ask of its provider at once and per period."""

    concurrency: int = Field(
        10, ge=1, le=1000, description="Sends in flight at once through this sink, per process, 1 to 1000."
    )
    rate: str | None = Field(
        None,
        description=f"At most COUNT sends per DURATION, e.g. 100/10s ({RATE_BOUNDS}), for all replicas together "
        "(COUNT may go at once after a quiet spell); default: no limit.",
    )
    timeout: float = Field(
        30.0,
        ge=0.1,
        le=MAX_SEND_TIMEOUT,
        allow_inf_nan=False,
        description=f"Seconds before a provider call counts as failed (and is retried), 0.1 to {MAX_SEND_TIMEOUT:g}.",
    )

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate(value)
        return value


class TrackSpec(PluginConfig):
    """Declic's own open and click tracking for e-mail; an unset key falls back (sink, then rule, then kind)."""

    opens: bool | None = Field(None, description="Add a 1x1 open pixel (/t/o/TOKEN) to the HTML part.")
    clicks: bool | None = Field(
        None, description="Send the HTML part's http(s) links through /t/c/TOKEN, which records the click."
    )

    def over(self, other: TrackSpec | None) -> TrackSpec:
        """These settings, with `other`'s where these say nothing."""
        if other is None:
            return self
        return TrackSpec(
            opens=other.opens if self.opens is None else self.opens,
            clicks=other.clicks if self.clicks is None else self.clicks,
        )


class EmailSinkConfig(SinkConfig):
    """Options of sinks that send e-mail."""

    track: TrackSpec | None = Field(
        None,
        description="Override the rules' tracking for mail sent through this sink, e.g. {opens: false, clicks: "
        "false} when the provider tracks on its own; unset keys keep the rule's.",
    )


class Outcome(enum.StrEnum):
    SENT = "sent"
    RETRY = "retry"
    PERMANENT = "permanent"
    ADDRESS_INVALID = "address_invalid"
    OPTED_OUT = "opted_out"


@dataclass(frozen=True)
class DeliveryResult:
    outcome: Outcome
    provider_id: str | None = None
    retry_after: float | None = None
    error: str | None = None
    #: Addresses the provider said are gone (an expired push subscription, an invalid number):
    #: the core removes or marks them on the contact, whatever the outcome.
    invalid_addresses: tuple[str, ...] = ()

    @classmethod
    def sent(cls, provider_id: str | None = None, invalid_addresses: tuple[str, ...] = ()) -> DeliveryResult:
        return cls(Outcome.SENT, provider_id=provider_id, invalid_addresses=invalid_addresses)

    @classmethod
    def retry(cls, error: str, after: float | None = None, invalid_addresses: tuple[str, ...] = ()) -> DeliveryResult:
        return cls(Outcome.RETRY, retry_after=after, error=error, invalid_addresses=invalid_addresses)

    @classmethod
    def permanent(cls, error: str, invalid_addresses: tuple[str, ...] = ()) -> DeliveryResult:
        return cls(Outcome.PERMANENT, error=error, invalid_addresses=invalid_addresses)

    @classmethod
    def combine(cls, results: list[tuple[str, DeliveryResult]]) -> DeliveryResult:
        """One outcome for a message sent to several devices; the dead ones are listed whatever the outcome.

        Sent if any device took it; address invalid if every device is gone; else retry if any
        failure was transient; else permanent.
        """
        dead = tuple(address for address, result in results if result.outcome is Outcome.ADDRESS_INVALID)
        outcomes = [result for _, result in results]
        error = "; ".join(sorted({r.error for r in outcomes if r.error}))
        sent = [r for r in outcomes if r.outcome is Outcome.SENT]
        if sent:
            return cls.sent(",".join(r.provider_id for r in sent if r.provider_id) or None, dead)
        if len(dead) == len(outcomes):
            return cls.address_invalid(error, addresses=dead)
        transient = [r for r in outcomes if r.outcome is Outcome.RETRY]
        if transient:
            after = max((r.retry_after for r in transient if r.retry_after is not None), default=None)
            return cls.retry(error, after, dead)
        return cls.permanent(error, dead)

    @classmethod
    def opted_out(cls, error: str) -> DeliveryResult:
        """The recipient told the provider to stop (Twilio 21610): consent on this channel is withdrawn."""
        return cls(Outcome.OPTED_OUT, error=error)

    @classmethod
    def address_invalid(cls, error: str, addresses: tuple[str, ...] = ()) -> DeliveryResult:
        return cls(Outcome.ADDRESS_INVALID, error=error, invalid_addresses=addresses)


@dataclass(frozen=True)
class Message:
    """A rendered message, ready for a sink."""

    to: str
    text: str
    subject: str | None = None
    html: str | None = None
    #: Stable across retries of one (rule, contact, step, occurrence): pass it on where
    #: the provider accepts one, so a retried call cannot act twice.
    idempotency_key: str = ""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SendContext:
    rule: str
    step: int
    kind: str
    contact: dict[str, Any]
    event: dict[str, Any]


class Sink:
    """A channel Declic acts through. Subclass, set `name`, `channel` and `Config`, register."""

    name: ClassVar[str]
    #: The consent channel this sink needs: "email", "sms", "push", "crm", "webhook".
    channel: ClassVar[str]
    Config: ClassVar[type[PluginConfig]] = SinkConfig

    def __init__(self, key: str, config: Any, deployment: Deployment):
        self.key = key
        self.config = config
        self.deployment = deployment
        self.limiter = SendLimiter(getattr(config, "concurrency", 10), getattr(config, "rate", None))

    def address(self, contact: dict[str, Any]) -> str | None:
        """Where this channel reaches the contact, or None when it cannot."""
        return None

    async def start(self) -> None:
        """Open connections; called once before the first send."""

    async def close(self) -> None:
        """Release connections; called once at shutdown."""

    async def send(self, message: Message, ctx: SendContext) -> DeliveryResult:
        raise NotImplementedError

    def preview(self, message: Message) -> str:
        """The message as this sink would send it, for `declic preview`: by default the recipient, the
        subject when there is one, and the text. A sink that builds its own wire form (an e-mail's headers)
        shows that instead; raises ValueError for a message it could not send."""
        head = f"To: {message.to}\n" + (f"Subject: {message.subject}\n" if message.subject is not None else "")
        return f"{head}\n{message.text}\n"
