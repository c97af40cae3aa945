"""Deterministic seeds for every random draw, keyed by purpose.

The base network must be bit-identical whatever the number of tasks or the order in which
tensors are created, so each draw gets its own generator seeded from (seed, purpose, ...)
instead of sharing one global stream.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from any mix of ints and strings (same on every process and host)."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def generator(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded from `derive_seed(*parts)`; CPU so results match on every device."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(*parts))
    return g
