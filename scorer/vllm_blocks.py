"""vLLM's prefix-cache block hashes, computed on the router from a prompt's token ids.

vLLM 0.33 (``v1/core/kv_cache_utils.py``, default ``--prefix-caching-hash-algo sha256``)::

    NONE_HASH = sha256(pickle("vllm-none-hash"))                 (deterministic since 0.29)
    H_i       = sha256(pickle((H_{i-1} or NONE_HASH, tuple(tokens of block i), extra_keys)))
    extra_keys = (("lora", lora_name, lora_path),)  for an adapter (0.31+), None for the base model

pickled with protocol 5 (``pickle.HIGHEST_PROTOCOL``), one hash per *full* block of
``block_size`` tokens (16 by default); KV events publish the low 64 bits of each ``H_i`` (the
default ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``), so those are the numbers returned here. The
adapter's *path* is part of the key: a router must know the path each pod loaded the adapter from
(``lora_path``) — the events name only the adapter. Checked against a real vLLM 0.33.0 computation
in ``tests/fixtures/vllm/kv-events-0.33.0.out.txt``.

Each block costs a pickle and a SHA-256 (a few microseconds), so ``iter_block_hashes`` is lazy: a
caller that stops at the first block no pod holds pays only for the blocks it looked at.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterator, Sequence
from typing import Any

ExtraKeys = tuple[tuple[str, str, str], ...] | None


def _sha256(obj: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


NONE_HASH = _sha256("vllm-none-hash")


def lora_extra_keys(lora_name: str | None, lora_path: str | None) -> ExtraKeys:
    """The extra keys of every block of a request for ``lora_name`` (None: the base model)."""
    return None if lora_name is None else (("lora", lora_name, lora_path or ""),)


def low64(block_hash: bytes) -> int:
    """The 64-bit form KV events carry (the last 8 bytes of the 32-byte hash, big-endian)."""
    return int.from_bytes(block_hash[-8:], "big")


def next_block_hash(parent: bytes, block_tokens: Sequence[int], extra_keys: ExtraKeys) -> bytes:
    """H_i from H_{i-1} (``parent``; ``NONE_HASH`` for the first block) and block i's tokens."""
    return _sha256((parent, tuple(block_tokens), extra_keys))


def iter_block_hashes(token_ids: Sequence[int], block_size: int, extra_keys: ExtraKeys) -> Iterator[int]:
    """vLLM's hash (low 64 bits) of each full block of ``token_ids``, first block first."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    parent = NONE_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = _sha256((parent, tuple(token_ids[start:start + block_size]), extra_keys))
        yield int.from_bytes(parent[24:], "big")


def block_hashes(token_ids: Sequence[int], block_size: int, extra_keys: ExtraKeys) -> list[int]:
    """All of ``iter_block_hashes``."""
    return list(iter_block_hashes(token_ids, block_size, extra_keys))
