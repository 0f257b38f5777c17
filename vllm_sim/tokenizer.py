"""The simulator's pseudo-tokenizer and chat template; the code lives in ``pseudotok`` (shared
with the gateway, which must tokenize a prompt exactly as the pods do)."""

from pseudotok import (  # noqa: F401  (re-exported)
    BEGIN,
    BYTES_PER_TOKEN,
    EOT,
    VOCAB_SIZE,
    apply_chat_template,
    count_bytes_tokens,
    count_tokens,
    detokenize,
    piece_bytes,
    token_ids_to_bytes,
    token_strs,
    tokenize,
    tokenize_bytes,
)
