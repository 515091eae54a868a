"""Durable state: tables, the database handle and migrations."""

from .db import Database, StorageUnavailable
from .tables import (
    CONTACTS,
    DELIVERIES,
    ENROLMENTS,
    EVENTS,
    IDENTITIES,
    INBOX,
    JOBS,
    Contact,
    Delivery,
    Enrolment,
    Identity,
    InboxCall,
    Job,
    StoredEvent,
)

__all__ = [
    "CONTACTS",
    "DELIVERIES",
    "ENROLMENTS",
    "EVENTS",
    "IDENTITIES",
    "INBOX",
    "JOBS",
    "Contact",
    "Database",
    "Delivery",
    "Enrolment",
    "Identity",
    "InboxCall",
    "Job",
    "StorageUnavailable",
    "StoredEvent",
]
