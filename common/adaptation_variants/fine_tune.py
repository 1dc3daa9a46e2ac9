"""Fine-tune: every parameter the initialisation adapts, stepped on the support set (today's behaviour)."""

from __future__ import annotations

from fedmeta.common.adaptation_variants.base import Variant


class FineTune(Variant):
    name = "fine-tune"
    description = "fine-tune: gradient steps on every parameter the initialisation adapts (the default)"


__all__ = ["FineTune"]
