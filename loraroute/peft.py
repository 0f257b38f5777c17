"""Make tiny but real PEFT LoRA adapters: adapter_config.json + adapter_model.safetensors.

The tensors follow PEFT's naming (``base_model.model.model.layers.{i}.{self_attn|mlp}.{module}
.lora_{A|B}.weight``) with lora_A shaped (r, in) and lora_B shaped (out, r), for a toy model of
``hidden`` width and ``layers`` layers. No torch needed: numpy + safetensors. The tests, the
benchmarks and the demo use these; the sidecar and the simulator validate them as vLLM would.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}


def _shape(module: str, hidden: int) -> tuple[int, int]:
    """(in_features, out_features) of a projection in the toy model (MLP 2x wide)."""
    inter = hidden * 2
    if module in ("gate_proj", "up_proj"):
        return hidden, inter
    if module == "down_proj":
        return inter, hidden
    return hidden, hidden


def tensor_names(target_modules: Iterable[str], layers: int = 2) -> list[str]:
    names = []
    for layer in range(layers):
        for module in target_modules:
            block = "self_attn" if module in _ATTN else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            names += [f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"]
    return names


def adapter_config(
    base_model: str,
    rank: int,
    *,
    alpha: int | None = None,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    peft_type: str = "LORA",
) -> dict[str, object]:
    return {
        "base_model_name_or_path": base_model,
        "peft_type": peft_type,
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha if alpha is not None else 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(target_modules),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def make_adapter(
    directory: str | Path,
    *,
    base_model: str = "meta-llama/Llama-3.1-8B-Instruct",
    rank: int = 8,
    alpha: int | None = None,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    layers: int = 2,
    hidden: int = 64,
    seed: int = 0,
    pad_bytes: int = 0,
    config_overrides: dict[str, object] | None = None,
) -> Path:
    """Write one adapter folder and return its path.

    ``pad_bytes`` adds a ``padding`` tensor of that many bytes (for size limits and transfer
    timing); ``config_overrides`` replaces or removes (value ``None`` for key ``"-name"``) keys.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config = adapter_config(base_model, rank, alpha=alpha, target_modules=target_modules)
    for key, value in (config_overrides or {}).items():
        if key.startswith("-"):
            config.pop(key[1:], None)
        else:
            config[key] = value
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for layer in range(layers):
        for module in target_modules:
            block = "self_attn" if module in _ATTN else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            fan_in, fan_out = _shape(module, hidden)
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, fan_in), dtype=np.float32) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = np.zeros((fan_out, rank), dtype=np.float32)
    if pad_bytes > 0:
        tensors["padding"] = np.zeros(pad_bytes, dtype=np.uint8)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


def make_adapter_set(
    root: str | Path,
    names_and_ranks: Iterable[tuple[str, int]],
    *,
    base_model: str = "meta-llama/Llama-3.1-8B-Instruct",
) -> dict[str, Path]:
    """One folder per adapter under ``root`` (the layout vLLM's filesystem resolver reads)."""
    root = Path(root)
    return {
        name: make_adapter(root / name, base_model=base_model, rank=rank, seed=i)
        for i, (name, rank) in enumerate(names_and_ranks)
    }
