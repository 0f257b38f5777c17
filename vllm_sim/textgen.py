"""Deterministic generated text.

Each request gets a pseudo-random generator seeded with ``xxh3_64(f"{seed}:{model}:{prompt}")`` (the
pod's ``--seed``, the adapter or base name, the prompt bytes), so the same request on the same
seed always gets the same answer. Each output token is one word from a fixed vocabulary with a
leading space (about 4-6 bytes, in line with the tokenizer's 4 bytes per token).

Length: with ``max_tokens`` the model never emits EOS on its own and stops at ``max_tokens``
(``finish_reason="length"``) unless a stop string matches first; without ``max_tokens`` it emits
EOS after a deterministic 16-256 tokens (``finish_reason="stop"``).
"""

from __future__ import annotations

import xxhash

WORDS = tuple(
    (
        "the of and to in is that for it as was with be by on not he this are or his from at which "
        "but have an they you were her she there been one all we their has would when if so no "
        "will more can who out do up said what about into than them only other new some time could "
        "these two may first then any like well such our over also after did many most made way "
        "where before must through back years much your good could how each well people state "
        "select name from table where order group count value data model query result system "
        "user adapter token cache block prefix request route server engine batch load memory"
    ).split()
)
PIECES = tuple(" " + w for w in WORDS)


_MASK = (1 << 64) - 1
_MUL = 6364136223846793005
_INC = 1442695040888963407
_N = len(PIECES)


class TextGen:
    """Yields the output pieces of one request (a 64-bit LCG seeded as above; cheap per token)."""

    __slots__ = ("_state", "natural_len")

    def __init__(self, seed: int, model: str, prompt: bytes) -> None:
        self._state = xxhash.xxh3_64_intdigest(prompt, seed=xxhash.xxh3_64_intdigest(f"{seed}:{model}".encode()))
        self.natural_len = 16 + (self._next() % 241)

    def _next(self) -> int:
        self._state = (self._state * _MUL + _INC) & _MASK
        return self._state >> 33

    def next_piece(self) -> str:
        return PIECES[self._next() % _N]
