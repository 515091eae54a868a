"""Durable state: tables, the database handle and migrations."""

from .db import Database, StorageUnavailable
from .tables import Contact, Delivery, Enrolment, Identity, InboxCall, Job, StoredEvent

__all__ = ["Contact", "Database", "Delivery", "Enrolment", "Identity", "InboxCall", "Job",
           "StorageUnavailable", "StoredEvent"]
