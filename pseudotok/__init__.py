"""The simulator's tokenizer: a deterministic pseudo-tokenizer and a fixed chat template.

A leaf package (it imports nothing of the project) because two sides need the same code, as a
real deployment's router and vLLM both load one model's tokenizer files: ``vllm_sim`` counts,
caches and hashes these tokens, and the gateway's ``tokenizer: {mode: sim}``
(``gateway.tokens``) computes the same ids to hash a request's blocks as the pod will.

Tokenizer: the UTF-8 bytes of a text are cut into consecutive 4-byte pieces; each piece is one
token (the last one may be shorter). So ``count_tokens(text) == ceil(len(text.encode()) / 4)``,
which is close to real BPE tokenizers on English text (about 4 bytes per token). A token's id is
the piece read as a little-endian unsigned integer plus ``2**32 * (4 - len(piece))`` for a short
last piece, so different texts give different ids and equal prefixes give equal ids.

``detokenize(ids)`` inverts ``tokenize`` exactly; there are no special tokens (``<|begin_of_text|>``
is text the chat template writes), so ``add_special_tokens`` changes nothing.

Because tokens are fixed byte windows, two prompts that share their first ``64 * k`` bytes share
their first ``k`` KV blocks of 16 tokens -- the property prefix caching needs. A block's content is
exactly 64 bytes of prompt, which the engine hashes directly (``prompt_bytes``).

Chat template (Llama-3 style, fixed)::

    <|begin_of_text|>
    for each message: <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>
    then:             <|start_header_id|>assistant<|end_header_id|>\\n\\n

``content`` may be a string or a list of ``{"type": "text", "text": ...}`` parts (joined). Two
conversations that share a system prompt and history therefore share a byte prefix.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

BYTES_PER_TOKEN = 4

BEGIN = "<|begin_of_text|>"
_HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"
EOT = "<|eot_id|>"


def count_tokens(text: str) -> int:
    """Number of tokens of ``text``: ceil(utf8 bytes / 4)."""
    n = len(text.encode("utf-8"))
    return (n + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN


def count_bytes_tokens(data: bytes) -> int:
    return (len(data) + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN


def tokenize(text: str) -> list[int]:
    """Token ids of ``text`` (see the module docstring for the id formula)."""
    return tokenize_bytes(text.encode("utf-8"))


def tokenize_bytes(data: bytes) -> list[int]:
    """Token ids of a prompt's bytes."""
    full = len(data) // BYTES_PER_TOKEN
    ids = list(struct.unpack(f"<{full}I", data[: full * BYTES_PER_TOKEN])) if full else []
    rest = data[full * BYTES_PER_TOKEN:]
    if rest:
        ids.append(int.from_bytes(rest, "little") + (BYTES_PER_TOKEN - len(rest)) * 2**32)
    return ids


#: one past the largest token id ``tokenize`` produces (a 1-byte last piece: 3 * 2**32 + 255)
VOCAB_SIZE = 4 * 2**32


def piece_bytes(token_id: int) -> bytes | None:
    """The bytes of one token id (the inverse of ``tokenize``); None outside the vocabulary."""
    short, value = divmod(int(token_id), 2**32)
    if not 0 <= short < BYTES_PER_TOKEN or value >= 1 << (8 * (BYTES_PER_TOKEN - short)):
        return None
    return value.to_bytes(BYTES_PER_TOKEN - short, "little")


def token_ids_to_bytes(ids: Sequence[int]) -> bytes:
    """A byte string standing for a prompt given as token ids: the bytes ``tokenize`` read them
    from; an id outside the vocabulary stands for its low 4 bytes (for hashing)."""
    out = []
    for i in ids:
        piece = piece_bytes(i)
        out.append(piece if piece is not None else int(i & 0xFFFFFFFF).to_bytes(4, "little"))
    return b"".join(out)


def detokenize(ids: Sequence[int]) -> str:
    """The text of token ids (``tokenize``'s inverse): ids outside the vocabulary are skipped,
    invalid UTF-8 becomes U+FFFD."""
    return b"".join(piece_bytes(i) or b"" for i in ids).decode("utf-8", errors="replace")


def token_strs(ids: Sequence[int]) -> list[str]:
    """Each token's own text (``/tokenize`` with ``return_token_strs``)."""
    return [(piece_bytes(i) or b"").decode("utf-8", errors="replace") for i in ids]


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Iterable):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return str(content)


def apply_chat_template(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                        continue_final_message: bool = False) -> str:
    """The prompt text for a list of chat messages (see the module docstring).

    ``continue_final_message``: the last message stays open (no ``<|eot_id|>``, no generation
    prompt), so the model continues it."""
    out = [BEGIN]
    for message in messages:
        out.append(_HEADER.format(role=message.get("role", "user")))
        out.append(_content_text(message.get("content")))
        out.append(EOT)
    if continue_final_message and messages:
        out.pop()
    elif add_generation_prompt:
        out.append(_HEADER.format(role="assistant"))
    return "".join(out)
