"""Filter ``lora-ready``: adapter requests skip pods whose engine has not served a LoRA request yet.

Formula: for an adapter request keep pod p iff ``p.lora_ready``; a base-model request keeps
every pod.

Why: an eager vLLM (``--enforce-eager``) JIT-compiles its LoRA kernels on the first LoRA
request of a fresh engine, ≈ 3.7 s on a real vLLM 0.25.1 (real-vllm-0.25.md), stalling that
request and the engine with it. The sidecar sends a warm-up LoRA request when the engine starts
and publishes ``lora_ready`` once it has completed (docs/sidecar.md); until then the pod serves
base-model requests only. Writers that do not warm pods up publish ``lora_ready: true``, so the
filter changes nothing for them.

Parameters: none.

YAML:
  filters:
    - lora-ready
"""

from __future__ import annotations

from scorer.plugin import Filter, ListMemo
from scorer.registry import register
from scorer.context import PickContext
from scorer.view import PodView


@register
class LoraReady(Filter):
    TYPE = "lora-ready"

    def setup(self) -> None:
        self._memo = ListMemo()

    def filter(self, views: list[PodView], ctx: PickContext) -> list[PodView]:
        if ctx.adapter is None:
            return views
        return self._memo.cached(views, True, self._ready, views)  # type: ignore[no-any-return]

    @staticmethod
    def _ready(views: list[PodView]) -> list[PodView]:
        kept = [v for v in views if v.state.lora_ready]
        return views if len(kept) == len(views) else kept
