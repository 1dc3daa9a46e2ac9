"""The arithmetic secure aggregation (SecAgg+, Bell et al. 2020) shares between sites and server.

The protocol's stages live in ``fedmeta.server.secure_aggregation`` and ``fedmeta.client.secure_aggregation``,
built from Flower's primitives (``flwr.common.secure_aggregation``: ECDH key agreement with HKDF,
Shamir sharing, Fernet encryption, stochastic quantisation). What both sides must compute
identically is here, free of Flower:

- the neighbourhood graph: each site shares keys and masks only with the ``k`` sites nearest to it on
  the ring of the round's participants (SecAgg+'s sparse graph), everyone when ``k`` is 0;
- how many shares recover a secret (the Shamir threshold);
- mask expansion: a 32-byte seed becomes uniform integers modulo 2^32 through the ChaCha20 stream
  cipher of ``cryptography``. (Flower's own ``pseudo_rand_gen`` folds the seed into 32 bits for
  NumPy's Mersenne Twister: 2^32 candidate masks are within a brute-force search's reach, so fedmeta
  does not use it for masks.)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

MOD_BITS = 32
MOD_RANGE = 2**MOD_BITS  # every masked value and the sum of the quantised replies live modulo this


def neighbours(nodes: Sequence[int], node: int, k: int) -> list[int]:
    """The sites ``node`` shares with: the ``k`` nearest on the sorted ring of ``nodes`` (k/2 each side),
    every other site when ``k`` is 0 or covers them all. Symmetric: a is b's neighbour iff b is a's."""
    ring = sorted(int(n) for n in nodes)
    others = [n for n in ring if n != node]
    if k <= 0 or k >= len(others):
        return others
    i, half = ring.index(node), k // 2
    chosen = {ring[(i + d) % len(ring)] for d in range(-half, half + 1) if d}
    return sorted(chosen)


def threshold(neighbourhood: int, fraction: float) -> int:
    """Shares needed to recover a secret shared among ``neighbourhood`` sites (itself included): at
    least two, at least ``fraction`` of them, and more than half so that two disjoint groups can never
    both recover (the server must not learn both halves of one site's secrets)."""
    return min(neighbourhood, max(2, math.ceil(fraction * neighbourhood - 1e-9), neighbourhood // 2 + 1))


def expand_mask(seed: bytes, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Uniform integers in [0, 2^32) of the given shapes (int64), from a seed of any length.

    ChaCha20 keyed by SHA-256(seed) with a zero nonce: every seed is used for one round's masks
    only (keys are fresh every round), so a fixed nonce never repeats a key stream.
    """
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
    key = hashlib.sha256(seed).digest()
    stream = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor().update(bytes(4 * sum(sizes)))
    values = np.frombuffer(stream, dtype="<u4").astype(np.int64)
    out, start = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(values[start:start + size].reshape(shape))
        start += size
    return out


def levels_for(configured: int, sites: int) -> int:
    """Quantisation levels for a round of ``sites`` replies: ``configured``, or when 0 the most the
    2^32 modulus allows for their sum (at most 2^30, so one value fits Flower's int32 quantiser)."""
    if configured:
        return int(configured)
    return min(2**30, (MOD_RANGE - 1) // max(1, int(sites)))


def quantisation_bound(clip_range: float, levels: int) -> float:
    """The largest error stochastic quantisation adds to one element of one reply (values within
    ±clip_range): one quantisation step, 2·clip_range / levels. The mean of n replies errs by at most that."""
    return 2 * clip_range / levels


__all__ = ["MOD_BITS", "MOD_RANGE", "expand_mask", "levels_for", "neighbours", "quantisation_bound", "threshold"]
