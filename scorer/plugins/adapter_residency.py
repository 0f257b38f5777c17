"""Scorer ``adapter-residency``: where the requested adapter sits on each pod, as a tier score.

Unlike ``lora-affinity`` (which only sees adapters with requests in flight), this reads the
residency that the sidecar estimates (GPU slots in LRU order, vLLM's CPU LoRA cache, the pod's
local adapter directory, loads in progress) plus the router's own optimistic belief that it has
just sent the adapter there.

Formula, first matching row (see ``scorer.view`` for tiers and slot states):

  request for the base model                      → base        (1.0)
  adapter on GPU (in gpu_adapters or running)     → gpu         (1.0)
  just dispatched there (optimistic, ≤ ttl)       → incoming    (0.9)
  being loaded by the sidecar                     → loading     (0.85)
  no slot can be had (all hold running adapters)  → saturated   (0.0)
  in vLLM's CPU LoRA cache                        → cpu         (0.7)
  on the pod's local disk                         → disk        (0.5)
  nowhere on the pod, a GPU slot is free          → free_slot   (0.4)
  nowhere on the pod, an idle adapter can go      → slot_freeable (0.3)

The defaults follow the residency scorer proposed in llm-d (GPU 1.0, CPU 0.7, free slot 0.6,
evictable 0.3, saturated 0) with a disk tier between CPU and a free slot, because a pod whose
disk already holds the adapter saves the object-store fetch.

Parameters (each in [0, 1]): base, gpu, incoming, loading, cpu, disk, free_slot, slot_freeable,
saturated — defaults as above.

YAML:
  scorers:
    - type: adapter-residency
      weight: 2
      parameters: {gpu: 1.0, cpu: 0.7, disk: 0.5, free_slot: 0.4}
"""

from __future__ import annotations

from scorer.params import Param
from scorer.plugin import Scorer
from scorer.registry import register
from scorer.context import PickContext
from scorer.view import (
    N_CODES, S_SATURATED, T_BASE, T_CPU, T_DISK, T_GPU, T_INCOMING, T_LOADING, T_REMOTE, PodView,
)

_DEFAULTS = {
    "base": 1.0, "gpu": 1.0, "incoming": 0.9, "loading": 0.85, "cpu": 0.7, "disk": 0.5,
    "free_slot": 0.4, "slot_freeable": 0.3, "saturated": 0.0,
}


@register
class AdapterResidency(Scorer):
    TYPE = "adapter-residency"
    BOUNDED = True
    PARAMS = {k: Param(v, float, min=0.0, max=1.0, doc=f"score of the {k} tier") for k, v in _DEFAULTS.items()}

    def setup(self) -> None:
        p = self.params
        table = [0.0] * N_CODES
        for code in range(N_CODES):
            tier, slot = divmod(code, 3)
            if tier == T_BASE:
                s = p["base"]
            elif tier == T_GPU:
                s = p["gpu"]
            elif tier == T_INCOMING:
                s = p["incoming"]
            elif tier == T_LOADING:
                s = p["loading"]
            elif slot == S_SATURATED:
                s = p["saturated"]
            elif tier == T_CPU:
                s = p["cpu"]
            elif tier == T_DISK:
                s = p["disk"]
            elif tier == T_REMOTE:
                s = p["free_slot"] if slot == 0 else p["slot_freeable"]
            table[code] = s
        self.table = table

    def score(self, views: list[PodView], ctx: PickContext) -> list[float]:
        t = self.table
        return [t[c] for c in ctx.codes(views)]
