"""Every error Declic raises on purpose, in one tree."""

from __future__ import annotations

from dataclasses import dataclass


class DeclicError(Exception):
    """Base of every error Declic raises on purpose."""


@dataclass(frozen=True)
class ConfigProblem:
    """One config problem where it is written: the config file, or a template it names."""

    file: str
    line: int | None
    column: int | None
    path: str
    message: str


class ConfigError(DeclicError):
    """The deployment config is invalid; `problems` holds every `file:line:col: path: message`, `found` the
    same problems as fields (for `declic check --format json`) when they were read from the files."""

    def __init__(self, problems: list[str], found: list[ConfigProblem] | None = None):
        self.problems = problems
        self.found = found or []
        super().__init__("\n".join(problems))


class RejectedRequest(DeclicError):
    """A webhook call refused before anything is stored; carries the HTTP status."""

    status = 400

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class BadRequest(RejectedRequest):
    """The call cannot be a webhook of this source (missing header, empty body)."""

    status = 400


class SignatureError(RejectedRequest):
    """The call is not signed by whom the source trusts."""

    status = 401


class MalformedPayload(DeclicError):
    """A stored call whose body is not what its topic promises; the row is marked failed."""


class RetryLater(DeclicError):
    """A provider call that normalisation needs failed for now; the call is retried with backoff."""

    def __init__(self, reason: str, after: float | None = None):
        self.reason = reason
        self.after = after
        super().__init__(reason)


class StorageUnavailable(DeclicError):
    """The database did not accept a write in time; callers answer 503."""


class TransactionConflict(StorageUnavailable):
    """PostgreSQL gave up one transaction for another's sake (a lock not granted in time, a deadlock, a
    serialisation failure): the database is there, and the same work can go through on its own. Work shared
    with other items' in one transaction (store/db.py, `together_or_alone`) runs again item by item, so that
    one contact's locked row does not fail a send's record beside it."""


class TemplateProblem(DeclicError):
    """A template is missing or fails to render."""


class InvalidAddress(DeclicError, ValueError):
    """Not an e-mail address mail can be sent to. The message is email-validator's reason: fine in a config
    error, not in a log line, as it may quote parts of the address."""
