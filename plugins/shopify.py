"""Shopify webhooks: HMAC-SHA256 over the raw body; customers, checkouts, orders and consent."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web
from pydantic import Field, SecretStr

from declic_gateway import (
    BadRequest,
    ConsentStatement,
    ContactRef,
    Event,
    MalformedPayload,
    PluginConfig,
    RawCall,
    SignatureError,
    Source,
    hookimpl,
)

#: Shopify consent states -> Declic consent states.
CONSENT = {
    "subscribed": "granted",
    "unsubscribed": "withdrawn",
    "redacted": "withdrawn",
    "not_subscribed": "none",
    "pending": "pending",
}


class ShopifyConfig(PluginConfig):
    secret: SecretStr = Field(description="The app's client secret, or the key shown under Settings > Notifications.")
    previous_secret: SecretStr | None = Field(
        None, description="The old secret, accepted too while a rotation takes effect (up to an hour)."
    )


def _header(headers: Any, name: str) -> str | None:
    """Shopify's `X-Shopify-*` headers, or the `shopify-*` spelling of the Events preview."""
    return headers.get(f"X-Shopify-{name}") or headers.get(f"shopify-{name}")


class Shopify(Source):
    name = "shopify"
    Config = ShopifyConfig

    async def verify(self, request: web.Request, body: bytes) -> None:
        given = _header(request.headers, "Hmac-Sha256")
        if not given:
            raise SignatureError("missing X-Shopify-Hmac-Sha256 header")
        try:
            digest = base64.b64decode(given.strip(), validate=True)
        except binascii.Error:
            raise SignatureError("X-Shopify-Hmac-Sha256 is not base64") from None
        secrets = [s for s in (self.config.secret, self.config.previous_secret) if s is not None]
        expected = [hmac.new(s.get_secret_value().encode(), body, hashlib.sha256).digest() for s in secrets]
        if not any([hmac.compare_digest(digest, e) for e in expected]):
            raise SignatureError("X-Shopify-Hmac-Sha256 does not match the body (check the webhook secret)")
        for required in ("Topic", "Webhook-Id", "Shop-Domain"):
            if not _header(request.headers, required):
                raise BadRequest(f"missing X-Shopify-{required} header")
        if not body:
            raise BadRequest("empty body")

    def dedupe_key(self, request: web.Request, body: bytes) -> str:
        return f"{_header(request.headers, 'Shop-Domain')}:{_header(request.headers, 'Webhook-Id')}"

    def normalize(self, raw: RawCall) -> list[Event]:
        topic = raw.header("X-Shopify-Topic", "shopify-topic") or ""
        handler = TOPICS.get(topic)
        if handler is None:
            return []  # a topic no rule can use: acknowledged and kept, nothing to route
        try:
            body = json.loads(raw.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MalformedPayload(f"{topic}: body is not JSON ({exc})") from None
        if not isinstance(body, dict):
            raise MalformedPayload(f"{topic}: expected a JSON object, got {type(body).__name__}")
        try:
            return handler(topic, body, raw)
        except (KeyError, TypeError, ValueError, InvalidOperation) as exc:
            raise MalformedPayload(f"{topic}: {type(exc).__name__}: {exc}") from None


def _when(body: dict[str, Any], raw: RawCall, *keys: str) -> datetime:
    for key in keys:
        if body.get(key):
            return datetime.fromisoformat(body[key])
    return raw.received_at


def _statement(given: dict[str, Any], action: bool) -> ConsentStatement:
    """Shopify's consent object: its state, when it was last changed, and how (single or confirmed opt-in)."""
    stated = given.get("consent_updated_at")
    evidence = {k: given[k] for k in ("opt_in_level", "collected_from", "consent_collected_from") if given.get(k)}
    return ConsentStatement(
        state=CONSENT[given["state"]],
        stated_at=datetime.fromisoformat(stated) if stated else None,
        action=action,
        evidence=evidence,
    )


def _money(value: Any) -> Decimal | None:
    return None if value in (None, "") else Decimal(str(value))


def _contact(customer: dict[str, Any], order: dict[str, Any]) -> ContactRef:
    """The buyer: the customer object first, then what a checkout or order says at top level."""
    consent = {}
    for channel, key in (("email", "email_marketing_consent"), ("sms", "sms_marketing_consent")):
        given = customer.get(key) or {}
        if given.get("state") in CONSENT:
            # A snapshot of the customer: it counts only if Shopify dates it after what we hold.
            consent[channel] = _statement(given, action=False)
    return ContactRef(
        email=customer.get("email") or order.get("email") or order.get("contact_email") or None,
        phone=customer.get("phone") or order.get("phone") or order.get("sms_marketing_phone") or None,
        first_name=customer.get("first_name"),
        last_name=customer.get("last_name"),
        locale=order.get("customer_locale") or customer.get("locale"),
        external_ids={"shopify": str(customer["id"])} if customer.get("id") else {},
        consent=consent,
    )


def _lines(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "title": item.get("title"),
            "quantity": item.get("quantity"),
            "price": _money(item.get("price")),
            "sku": item.get("sku"),
            "product_id": item.get("product_id"),
            "variant_id": item.get("variant_id"),
        }
        for item in body.get("line_items") or []
    ]


def customer_event(topic: str, body: dict[str, Any], raw: RawCall) -> list[Event]:
    kind = "customer.created" if topic == "customers/create" else "customer.updated"
    return [
        Event(
            type=kind,
            occurred_at=_when(body, raw, "updated_at", "created_at"),
            contact=_contact(body, {}),
            correlation=[f"customer:{body['id']}"],
            properties={
                "customer_id": body["id"],
                "orders_count": body.get("orders_count"),
                "total_spent": _money(body.get("total_spent")),
                "currency": body.get("currency"),
                "tags": body.get("tags"),
                "state": body.get("state"),
            },
        )
    ]


def checkout_event(topic: str, body: dict[str, Any], raw: RawCall) -> list[Event]:
    kind = "checkout.started" if topic == "checkouts/create" else "checkout.updated"
    return [
        Event(
            type=kind,
            occurred_at=_when(body, raw, "updated_at", "created_at"),
            contact=_contact(body.get("customer") or {}, body),
            correlation=[f"checkout:{body['token']}"],
            properties={
                "token": body["token"],
                "total_price": _money(body.get("total_price")),
                "subtotal_price": _money(body.get("subtotal_price")),
                "currency": body.get("currency"),
                "recovery_url": body.get("abandoned_checkout_url"),
                "completed_at": body.get("completed_at"),
                "line_items": _lines(body),
            },
        )
    ]


ORDER_TYPES = {
    "orders/create": "order.placed",
    "orders/paid": "order.paid",
    "orders/fulfilled": "order.fulfilled",
    "orders/cancelled": "order.cancelled",
}


def order_event(topic: str, body: dict[str, Any], raw: RawCall) -> list[Event]:
    correlation = [f"order:{body['id']}"]
    if body.get("checkout_token"):
        correlation.append(f"checkout:{body['checkout_token']}")  # ends the checkout's cart reminders
    when = {"orders/cancelled": ("cancelled_at",), "orders/create": ("created_at",)}.get(topic, ("updated_at",))
    return [
        Event(
            type=ORDER_TYPES[topic],
            occurred_at=_when(body, raw, *when, "updated_at"),
            contact=_contact(body.get("customer") or {}, body),
            correlation=correlation,
            properties={
                "order_id": body["id"],
                "name": body.get("name"),
                "order_number": body.get("order_number"),
                "total_price": _money(body.get("total_price")),
                "subtotal_price": _money(body.get("subtotal_price")),
                "currency": body.get("currency"),
                "financial_status": body.get("financial_status"),
                "fulfillment_status": body.get("fulfillment_status"),
                "cancel_reason": body.get("cancel_reason"),
                "order_status_url": body.get("order_status_url"),
                "checkout_token": body.get("checkout_token"),
                "line_items": _lines(body),
            },
        )
    ]


def consent_event(topic: str, body: dict[str, Any], raw: RawCall) -> list[Event]:
    """`customers/marketing_consent/update` carries SMS consent; the email topic carries email consent."""
    channel, key = ("email", "email_marketing_consent") if "email" in topic else ("sms", "sms_marketing_consent")
    state = CONSENT.get((body.get(key) or {}).get("state"))
    if state is None:
        raise MalformedPayload(f"{topic}: no {key}.state in the body")
    customer_id = body.get("customer_id") or body["id"]
    kind = {
        ("email", "granted"): "email.subscribed",
        ("email", "withdrawn"): "email.unsubscribed",
        ("sms", "withdrawn"): "sms.opted_out",
    }.get((channel, state), "profile.updated")
    contact = ContactRef(
        email=body.get("email_address"),
        phone=body.get("phone"),
        external_ids={"shopify": str(customer_id)},
        consent={channel: _statement(body[key], action=True)},  # Shopify tells us of a change
    )
    return [
        Event(
            type=kind,
            occurred_at=_when(body[key], raw, "consent_updated_at"),
            contact=contact,
            correlation=[f"customer:{customer_id}"],
            properties={"channel": channel, "consent": state},
        )
    ]


TOPICS: dict[str, Callable[[str, dict[str, Any], RawCall], list[Event]]] = {
    "customers/create": customer_event,
    "customers/update": customer_event,
    "checkouts/create": checkout_event,
    "checkouts/update": checkout_event,
    **dict.fromkeys(ORDER_TYPES, order_event),
    "customers/marketing_consent/update": consent_event,
    "customers_email_marketing_consent/update": consent_event,
}


@hookimpl
def register_sources(register: Callable[[type[Source]], None]) -> None:
    register(Shopify)
