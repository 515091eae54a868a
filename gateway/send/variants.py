"""A/B tests: which variant of a step a contact gets, and that variant's template.

The draw is a hash of (rule, step, variant names, contact), like the holdout's
(pipeline/router.py `in_holdout`): the same contact lands in the same variant on every
retry, replay and re-entry, with no state to keep. Changing the variants' names starts a new
test (everyone is drawn again); changing only the weights would move some contacts, so the
step runner passes the variant a contact was already sent (`kept`), which wins while it is
still one of the step's variants.
"""

from __future__ import annotations

import hashlib

from ..config import RuleSpec
from ..config.settings import VariantSpec


def variant_for(rule: RuleSpec, index: int, contact_id: int, kept: str | None = None) -> VariantSpec | None:
    """The variant of `rule.steps[index]` (0-based) for this contact; None for a step without variants."""
    variants = rule.steps[index].send.variants
    if not variants:
        return None
    for variant in variants:
        if variant.name == kept:
            return variant
    names = ",".join(variant.name for variant in variants)
    digest = hashlib.sha256(f"variant:{rule.name}:{index}:{names}:{contact_id}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64 * sum(variant.weight for variant in variants)
    for variant in variants:
        point -= variant.weight
        if point < 0:
            return variant
    return variants[-1]  # float rounding at the very top of the range


def template_for(rule: RuleSpec, index: int, variant: str | None) -> str:
    """The template `rule.steps[index]` sends for this variant (its only one when it has no variants).

    Raises ValueError for a variant the step does not have.
    """
    send = rule.steps[index].send
    if send.template is not None:
        if variant is not None:
            raise ValueError(f"step {index + 1} of rule {rule.name!r} has no variants")
        return send.template
    for found in send.variants or ():
        if found.name == variant:
            return found.template
    names = ", ".join(v.name for v in send.variants or ())
    raise ValueError(f"step {index + 1} of rule {rule.name!r} has no variant {variant!r} (it has {names})")
