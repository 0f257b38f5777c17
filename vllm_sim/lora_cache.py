"""vLLM's two LoRA tiers: ``max_cpu_loras`` CPU entries and ``max_loras`` GPU slots, both LRU.

Mirrors ``LRUCacheWorkerLoRAManager.add_adapter`` + ``LRUCacheLoRAModelManager.activate_adapter``
for each adapter of a batch, in batch order:

1. not in the CPU cache (or ``load_inplace``): load from disk (``disk_load_s(rank)``), evict the
   CPU cache's least recently used entry if full (which also frees its GPU slot), insert;
   otherwise touch it.
2. not in a GPU slot: evict the least recently used slot if all are taken, copy in
   (``cpu_to_gpu_s``); then touch it.

The CPU cache holds every registered adapter, including the ones in GPU slots (its size is bounded
by ``max_cpu_loras``, as in vLLM). ``apply`` returns the seconds the step stalls.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .costs import CostProfile


@dataclass(frozen=True)
class LoraRef:
    """One registered adapter: vLLM's LoRARequest (id from the frontend counter)."""

    lora_id: int
    name: str
    path: str
    rank: int


class LoraTiers:
    def __init__(self, max_loras: int, max_cpu_loras: int, profile: CostProfile) -> None:
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.profile = profile
        self.cpu: OrderedDict[int, LoraRef] = OrderedDict()
        self.gpu: OrderedDict[int, LoraRef] = OrderedDict()
        self.loads_disk = 0
        self.loads_gpu = 0
        self.fresh: set[int] = set()   # put in a GPU slot, not yet used by a step (a subset of gpu)

    def tier(self, lora_id: int) -> str:
        if lora_id in self.gpu:
            return "gpu"
        if lora_id in self.cpu:
            return "cpu"
        return "disk"

    def ensure(self, ref: LoraRef, reload: bool = False) -> float:
        """Make ``ref`` CPU- and GPU-resident; returns the stall in seconds."""
        stall = 0.0
        cpu, gpu = self.cpu, self.gpu
        if ref.lora_id not in cpu or reload:
            stall += self.profile.disk_load_s(ref.rank)
            self.loads_disk += 1
            if ref.lora_id in cpu:
                del cpu[ref.lora_id]
                gpu.pop(ref.lora_id, None)
            if len(cpu) + 1 > self.max_cpu_loras:
                old, _ = cpu.popitem(last=False)
                gpu.pop(old, None)
                self.fresh.discard(old)
            cpu[ref.lora_id] = ref
        else:
            cpu.move_to_end(ref.lora_id)
        if ref.lora_id not in gpu:
            if len(gpu) >= self.max_loras:
                self.fresh.discard(gpu.popitem(last=False)[0])
            stall += self.profile.cpu_to_gpu_s
            self.loads_gpu += 1
            gpu[ref.lora_id] = ref
            self.fresh.add(ref.lora_id)
        else:
            gpu.move_to_end(ref.lora_id)
        return stall

    def first_use(self, lora_ids: list[int] | set[int]) -> bool:
        """Whether a step with these adapters is the first to use one since it got its GPU slot
        (and mark them used)."""
        hit = bool(self.fresh.intersection(lora_ids))
        if hit:
            self.fresh.difference_update(lora_ids)
        return hit

    def apply(self, batch: list[LoraRef]) -> tuple[float, list[str]]:
        """Activate a batch's adapters (vLLM ``set_active_adapters``); (stall, names loaded)."""
        stall = 0.0
        loaded = []
        for ref in batch:
            if ref.lora_id in self.gpu:
                self.cpu.move_to_end(ref.lora_id)
                self.gpu.move_to_end(ref.lora_id)
                continue
            stall += self.ensure(ref)
            loaded.append(ref.name)
        return stall, loaded
