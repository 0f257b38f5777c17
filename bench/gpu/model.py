"""The benchmark model folder and PEFT adapters, built offline (standard library only).

**Model** (``write_model``): a Llama ``config.json`` for ``vllm serve --load-format dummy`` (random
weights, no weight files), 8B-shaped by default (hidden 4096, 32 layers, 32/8 heads, intermediate
14336, vocab 32000: the shape of the reference measurement), plus an offline tokenizer:

- ``tokenizer.json``: a ``tokenizers`` WordLevel model behind a ``Split`` pre-tokenizer that cuts
  the text into consecutive 4-character pieces (``[\\s\\S]{1,4}``). A prompt of ``n`` ASCII bytes is
  therefore ``ceil(n / 4)`` tokens, exactly what the simulator's pseudo-tokenizer
  (``vllm_sim.tokenizer``) and the workload generator assume, and two prompts that share their first
  ``64·k`` bytes share their first ``k`` KV blocks of 16 tokens on both. The vocabulary holds every
  4-character window the workload's text can produce (three lowercase letters and a space, in each
  of the 4 alignments: 70,304 pieces) spread over ids 3…vocab−1, so every id decodes to text; any
  other piece (digits, capitals, the template's markers) is ``<unk>``. Ids 0–2 are ``<unk>``,
  ``<s>``, ``</s>`` (special, never produced by a prompt).
- the chat template renders exactly ``vllm_sim.tokenizer.apply_chat_template`` (Llama-3 markers as
  plain text), in ``tokenizer_config.json`` and in ``chat_template.jinja`` (``--chat-template``).

**Adapters** (``write_adapter``): ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's
tensor names for all seven projections of every layer (``lora_A`` (r, in), ``lora_B`` (out, r),
float16; A a cheap constant pattern, B zeros), so the file sizes are those of real adapters of the
shape: 42 / 84 / 168 / 336 MB at rank 8 / 16 / 32 / 64 for the 8B shape.
"""

from __future__ import annotations

import itertools
import json
import shutil
import string
import struct
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from loraroute.peft import ALL_MODULES, adapter_config

PIECE_CHARS = 4
SPECIAL = ("<unk>", "<s>", "</s>")
CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
    "<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    vocab_size: int = 32000
    max_position_embeddings: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def projection(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one projection of a decoder layer."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, self.intermediate_size), "up_proj": (h, self.intermediate_size),
                "down_proj": (self.intermediate_size, h)}[module]


SHAPES = {
    "8b": ModelShape(),
    # for tests: the same structure, tiny (vocab stays large enough for every piece id)
    "tiny": ModelShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=32000, max_position_embeddings=8192),
}


# ------------------------------------------------------------------------------------ model
def model_config(shape: ModelShape) -> dict[str, object]:
    """A ``LlamaForCausalLM`` config.json (both the v4 ``rope_theta`` and v5 ``rope_parameters``)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        **{k: v for k, v in asdict(shape).items()}, "head_dim": shape.head_dim,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": 0.02,
        "pretraining_tp": 1, "tie_word_embeddings": False, "use_cache": True, "torch_dtype": "bfloat16",
        "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }


def pieces() -> list[str]:
    """Every 4-character window of text made of 3-letter words each followed by a space."""
    out = []
    for a, b, c in itertools.product(string.ascii_lowercase, repeat=3):
        out += [f"{a}{b}{c} ", f"{b}{c} {a}", f"{c} {a}{b}", f" {a}{b}{c}"]
    return out


def tokenizer_json(vocab_size: int) -> dict[str, object]:
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL)}
    span = vocab_size - len(SPECIAL)
    for k, piece in enumerate(pieces()):
        vocab[piece] = len(SPECIAL) + k % span
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, tok in enumerate(SPECIAL)],
        "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]{1,%d}" % PIECE_CHARS},
                          "behavior": "Isolated", "invert": False},
        "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }


def tokenizer_config(max_len: int) -> dict[str, object]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": False,
        "add_eos_token": False, "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, tok in enumerate(SPECIAL)},
    }


def write_model(folder: Path, shape: ModelShape) -> Path:
    """config.json, generation_config.json, tokenizer files and chat_template.jinja in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model_config(shape), indent=1))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(shape.vocab_size)))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(shape.max_position_embeddings),
                                                             indent=1))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return folder


# ------------------------------------------------------------------------------------ adapters
def _tensors(shape: ModelShape, rank: int) -> list[tuple[str, tuple[int, int]]]:
    out = []
    for layer in range(shape.num_hidden_layers):
        for module in ALL_MODULES:
            block = "self_attn" if module in _ATTN else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            fan_in, fan_out = shape.projection(module)
            out += [(f"{prefix}.lora_A.weight", (rank, fan_in)), (f"{prefix}.lora_B.weight", (fan_out, rank))]
    return out


def _header(shape: ModelShape, rank: int) -> tuple[bytes, list[tuple[str, int]]]:
    """The safetensors header (padded to 8 bytes) and (name, byte size) in file order."""
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    order = []
    offset = 0
    for name, (rows, cols) in _tensors(shape, rank):
        size = rows * cols * 2
        meta[name] = {"dtype": "F16", "shape": [rows, cols], "data_offsets": [offset, offset + size]}
        order.append((name, size))
        offset += size
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw, order


def adapter_bytes(shape: ModelShape, rank: int) -> int:
    """Size of ``adapter_model.safetensors`` for this shape and rank."""
    header, order = _header(shape, rank)
    return 8 + len(header) + sum(size for _, size in order)


_A_BLOCK = struct.pack("<4e", 0.01, -0.01, 0.005, -0.005) * 4096   # 32 KiB of small float16 values


def write_adapter(folder: Path, *, base_model: str, rank: int, shape: ModelShape) -> Path:
    """One adapter folder with all seven projections of every layer (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = adapter_config(base_model, rank, target_modules=ALL_MODULES)
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    header, order = _header(shape, rank)
    zeros = bytes(1 << 20)
    with open(folder / "adapter_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for name, size in order:
            block = _A_BLOCK if ".lora_A." in name else zeros
            left = size
            while left > 0:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
    return folder


def write_adapter_sets(roots: Sequence[Path], names_and_ranks: Iterable[tuple[str, int]], *,
                       base_model: str, shape: ModelShape) -> dict[str, int]:
    """Each adapter written once into ``roots[0]`` and copied into every other root (separate files:
    each server reads its own copy). Returns name → size of the weights file in bytes."""
    sizes: dict[str, int] = {}
    first, *rest = roots
    for name, rank in names_and_ranks:
        src = write_adapter(first / name, base_model=base_model, rank=rank, shape=shape)
        for root in rest:
            dst = root / name
            dst.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                shutil.copyfile(f, dst / f.name)
        sizes[name] = (src / "adapter_model.safetensors").stat().st_size
    return sizes
