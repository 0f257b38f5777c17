"""Estimate which LoRA adapters a vLLM pod holds on GPU and in CPU memory.

vLLM does not say (``lora_requests_info`` lists adapters with requests in flight, not resident
ones), so this mirrors vLLM's two LRU caches (``LRUCacheWorkerLoRAManager``) from observations:

- CPU tier: capacity ``max_cpu_loras`` (vLLM's default: ``max_loras``). Every adapter used or
  loaded is registered here; adding one to a full tier evicts the least recently used entry
  (and its GPU slot, if it had one).
- GPU tier: capacity ``max_loras``, a subset of the CPU tier. Activating one into a full tier
  evicts the least recently used slot; the adapter stays in the CPU tier.

Observations and what they mean (each is a "use": register in CPU, then activate on GPU, both
moved to most recently used):

- ``observe_load(name)``: ``/v1/load_lora_adapter`` succeeded (vLLM's ``add_lora`` registers
  and activates), or a name newly appeared in ``/v1/models`` (the filesystem resolver loaded it).
- ``observe_running(names)``: names in ``lora_requests_info``. These have requests in flight;
  running requests must hold a GPU slot. Since vLLM 0.11 the list also includes adapters whose
  requests only wait (deferred), so when it names more adapters than ``max_loras`` only
  ``max_loras`` of them are taken as running: with ``crowded="arrival"`` (default) the first ones
  in list order — the list is in order of arrival and vLLM admits waiting requests first come,
  first served, so the adapters in flight longest hold the slots; with ``crowded="resident"`` the
  ones already estimated on GPU, then the rest in list order.
- ``observe_unload(name)``: vLLM forgets the name but keeps the weights cached until evicted;
  the entry becomes an anonymous "ghost" that still occupies capacity and ages out normally.
- ``observe_exact(gpu, cpu)``: the server exposes residency (``vllm:lora_adapter_loaded``);
  the tiers are replaced by the truth and ``source`` becomes ``"exact"``.

All methods are O(tiers) with tiers of a few dozen entries; no I/O.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Sequence

_GHOST = "\x00ghost:"


class ResidencyEstimator:
    """Two LRU tiers mirroring vLLM. ``gpu`` / ``cpu`` are ordered least recently used first."""

    #: how to pick the GPU holders when more adapters are in flight than slots (see observe_running)
    CROWDED_POLICIES = ("arrival", "resident")

    def __init__(self, max_loras: int = 1, max_cpu_loras: int | None = None, *, crowded: str = "arrival") -> None:
        if crowded not in self.CROWDED_POLICIES:
            raise ValueError(f"crowded must be one of {self.CROWDED_POLICIES}, not {crowded!r}")
        self.crowded = crowded
        self._gpu: OrderedDict[str, None] = OrderedDict()
        self._cpu: OrderedDict[str, None] = OrderedDict()
        self._ghosts = itertools.count()
        self.source: str = "estimated"
        self.max_loras = max(1, max_loras)
        self.max_cpu_loras = max(self.max_loras, max_cpu_loras or self.max_loras)

    # --- configuration ----------------------------------------------------------------------
    def set_limits(self, max_loras: int, max_cpu_loras: int | None = None) -> None:
        """Change capacities (e.g. ``max_lora`` learned from ``lora_requests_info``)."""
        self.max_loras = max(1, max_loras)
        self.max_cpu_loras = max(self.max_loras, max_cpu_loras or self.max_cpu_loras)
        while len(self._gpu) > self.max_loras:
            self._gpu.popitem(last=False)
        while len(self._cpu) > self.max_cpu_loras:
            self._evict_cpu()

    def reset(self) -> None:
        """Forget everything (the vLLM process restarted)."""
        self._gpu.clear()
        self._cpu.clear()
        self.source = "estimated"

    # --- observations ---------------------------------------------------------------------
    def observe_load(self, name: str) -> None:
        """An adapter was loaded (registered and activated) or used."""
        self._register(name)
        self._activate(name)

    def observe_running(self, names: Sequence[str]) -> None:
        """Adapters with requests in flight, as ``lora_requests_info`` lists them."""
        names = [n for n in dict.fromkeys(names) if n]
        if not names:
            return
        if len(names) <= self.max_loras:
            for name in names:
                self.observe_load(name)
            return
        if self.crowded == "arrival":
            chosen = names[: self.max_loras]
        else:
            resident = [n for n in names if n in self._gpu]
            others = [n for n in names if n not in self._gpu]
            chosen = resident + others[: max(0, self.max_loras - len(resident))]
        for name in chosen:
            self.observe_load(name)

    def observe_unload(self, name: str) -> None:
        """vLLM forgot the name; its cache entries stay as ghosts until evicted."""
        ghost = f"{_GHOST}{next(self._ghosts)}:{name}"
        for tier in (self._cpu, self._gpu):
            if name in tier:
                items = [(ghost if k == name else k) for k in tier]
                tier.clear()
                tier.update((k, None) for k in items)

    def observe_exact(self, gpu: Iterable[str], cpu: Iterable[str]) -> None:
        """Replace both tiers by what the server reports (``cpu`` may or may not include ``gpu``)."""
        gpu_list = list(dict.fromkeys(gpu))
        cpu_list = [n for n in dict.fromkeys(cpu) if n not in gpu_list]
        self._gpu = OrderedDict((n, None) for n in gpu_list)
        self._cpu = OrderedDict((n, None) for n in cpu_list + gpu_list)
        self.source = "exact"

    # --- results ------------------------------------------------------------------------------
    @property
    def gpu(self) -> tuple[str, ...]:
        """Adapters estimated in a GPU slot, least recently used first."""
        return tuple(k for k in self._gpu if not k.startswith(_GHOST))

    @property
    def cpu(self) -> tuple[str, ...]:
        """Adapters estimated in CPU memory but not on GPU, least recently used first."""
        return tuple(k for k in self._cpu if k not in self._gpu and not k.startswith(_GHOST))

    @property
    def cpu_all(self) -> tuple[str, ...]:
        """vLLM's whole CPU tier (includes the GPU ones), least recently used first."""
        return tuple(k for k in self._cpu if not k.startswith(_GHOST))

    # --- internals ------------------------------------------------------------------------------
    def _register(self, name: str) -> None:
        if name in self._cpu:
            self._cpu.move_to_end(name)
            return
        while len(self._cpu) >= self.max_cpu_loras:
            self._evict_cpu()
        self._cpu[name] = None

    def _evict_cpu(self) -> None:
        victim, _ = self._cpu.popitem(last=False)
        self._gpu.pop(victim, None)

    def _activate(self, name: str) -> None:
        if name in self._gpu:
            self._gpu.move_to_end(name)
            return
        while len(self._gpu) >= self.max_loras:
            self._gpu.popitem(last=False)
        self._gpu[name] = None
