"""The deployment config: pydantic models, YAML with positions, `file:line:col: path: message` errors."""

from .settings import (
    AdminSpec,
    Duration,
    MetricsSpec,
    PoliciesSpec,
    ReenterAfter,
    RetentionSpec,
    RuleSpec,
    ScoringSpec,
    Settings,
    StepSpec,
    TrackingSpec,
    WorkerSpec,
    load_config,
)

__all__ = [
    "AdminSpec",
    "Duration",
    "MetricsSpec",
    "PoliciesSpec",
    "ReenterAfter",
    "RetentionSpec",
    "RuleSpec",
    "ScoringSpec",
    "Settings",
    "StepSpec",
    "TrackingSpec",
    "WorkerSpec",
    "load_config",
]
