"""A site's side of local differential privacy (``dp = "local"``): its reply clipped and noised before it
leaves, the noise split over the round's quorum (client-level DP, McMahan et al. 2018; the mechanism and the
accountant: ``fedmeta.common.privacy``)."""

from __future__ import annotations

import torch
from flwr.app import Context, Message

from fedmeta.client import secure_aggregation
from fedmeta.common.config import RunConfig
from fedmeta.common.privacy import add_gaussian_noise, clip_update, local_noise_split, noise_generator
from fedmeta.common.protocol import CONFIG_RECORD, SAMPLED_SITES_KEY, SECAGG_RECORD


def private_reply(message: Message, context: Context, config: RunConfig, grads: dict[str, torch.Tensor],
                  seed: int) -> dict[str, torch.Tensor]:
    """``grads`` as the site may send them: under ``dp = "local"``, clipped and noised (:func:`local_dp`) with the
    noise split over the round's quorum; otherwise as they are."""
    if config.dp != "local":
        return grads
    sampled = int(message.content.config_records[CONFIG_RECORD].get(SAMPLED_SITES_KEY, 1))
    if SECAGG_RECORD in message.content.config_records:  # never split the noise over more sites than were listed
        sampled = min(sampled, secure_aggregation.participants(message, context))
    if sampled < 1:
        raise secure_aggregation.SecAggError(f"{SAMPLED_SITES_KEY}={sampled}: a round samples at least one site")
    # Split over the round's quorum, not every listed site: any sum the server may unmask carries σ·C.
    return local_dp(grads, config, local_noise_split(config, sampled), seed)


def local_dp(grads, config: RunConfig, split: int, seed: int):
    """Local / distributed DP: the whole reply clipped to C, plus N(0, (σ·C/√q)²) so that the sum of
    any q of the round's replies carries σ·C (``fedmeta.common.privacy.local_noise_split``). Alone, one
    reply carries only σ·C/√q: the guarantee against the server needs secure aggregation, so that it sees
    only the sum."""
    if split < 1:
        raise ValueError(f"local DP split over {split} sites: a round samples at least one site.")
    clipped, _norm = clip_update(grads, config.dp_clip_norm)
    std = config.dp_noise_multiplier * config.dp_clip_norm / split**0.5
    generator = noise_generator(seed ^ 0x6C6F63616C if config.dp_seeded_noise else None)
    return add_gaussian_noise(clipped, std, generator)


__all__ = ["local_dp", "private_reply"]
