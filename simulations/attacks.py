"""Simulated adversarial sites for researchers (``fedmeta simulate --attack``): never in a deployment.

An adversarial site runs fedmeta's honest ClientApp and then rewrites its train reply before it
leaves — the model-poisoning attacks robust aggregation is judged against:

- ``scale[:F]``: the honest meta-gradient × F (default 1000; a boosted update, Bhagoji et al. 2019);
- ``signflip[:F]``: × −F (default 1; the gradient-ascent attack, −1000 hijacks Adam's direction);
- ``noise[:S]``: replaced by N(0, S²) per element (default S = 1), seeded by the round and the site.

The first ``attack-sites`` training partitions attack (partition ids 0..N−1: the manifest lists the
training sites first), so a run names its attackers reproducibly. The attack lives in a ClientApp
wrapper of the in-process engine, not in a run-config key, so no honest ClientApp carries a switch
that would make it lie.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Context, Message, MessageType

from fedmeta.common.protocol import CONFIG_RECORD, GRADS_RECORD, PARTITION_ID_KEY, ROUND_SEED_KEY
from fedmeta.common.records import from_array_record, to_array_record

ATTACKS = {"scale": 1000.0, "signflip": 1.0, "noise": 1.0}  # kind -> default factor


@dataclass(frozen=True)
class Attack:
    kind: str
    factor: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.factor:g}"

    def apply(self, grads: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        if self.kind == "scale":
            return {k: t * self.factor for k, t in grads.items()}
        if self.kind == "signflip":
            return {k: t * -self.factor for k, t in grads.items()}
        generator = torch.Generator().manual_seed(seed)
        return {k: (torch.randn(t.shape, generator=generator, dtype=torch.float64) * self.factor).to(t.dtype)
                for k, t in sorted(grads.items())}


def parse_attack(spec: str) -> Attack:
    """``"scale:1000"``, ``"signflip"``, ``"noise:0.1"`` → an :class:`Attack`; a clear error otherwise."""
    kind, _, factor = str(spec).strip().partition(":")
    if kind not in ATTACKS:
        raise ValueError(f"--attack {spec!r}: unknown attack {kind!r}; choose one of "
                         f"{', '.join(f'{k}[:F]' for k in ATTACKS)} (e.g. scale:1000).")
    try:
        value = float(factor) if factor else ATTACKS[kind]
    except ValueError:
        raise ValueError(f"--attack {spec!r}: {factor!r} is not a number (e.g. {kind}:{ATTACKS[kind]:g}).") from None
    if not math.isfinite(value) or (kind == "noise" and value <= 0):
        raise ValueError(f"--attack {spec!r}: the factor must be finite{' and > 0' if kind == 'noise' else ''}.")
    return Attack(kind, value)


def adversarial_client_app(attack: Attack, attackers: set[int],
                           honest: Callable[[Message, Context], Message] | None = None):
    """fedmeta's ClientApp, except that the sites of partition ids ``attackers`` send ``attack``'s reply."""
    if honest is None:  # fedmeta's own ClientApp, loaded (with the client's modules) only when no other is given
        from fedmeta.client.app import app as honest

    def client_app(message: Message, context: Context) -> Message:
        reply = honest(message, context)
        partition = context.node_config.get(PARTITION_ID_KEY)
        if (message.metadata.message_type != MessageType.TRAIN or partition not in attackers
                or reply.has_error() or GRADS_RECORD not in reply.content.array_records):
            return reply
        round_seed = int(message.content.config_records[CONFIG_RECORD][ROUND_SEED_KEY])
        seed = int(np.random.SeedSequence([round_seed, int(partition), 0xA77AC]).generate_state(1)[0])
        grads = from_array_record(reply.content.array_records[GRADS_RECORD])
        reply.content[GRADS_RECORD] = to_array_record(attack.apply(grads, seed))
        return reply

    return client_app


__all__ = ["ATTACKS", "Attack", "adversarial_client_app", "parse_attack"]
