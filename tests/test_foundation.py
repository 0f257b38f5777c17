"""The shared pieces every other part builds on: PodState, the memory store, the made adapters.
(The test services check themselves in their fixtures, tests/conftest.py.)"""

from __future__ import annotations

import asyncio
import json

import pytest
from safetensors import safe_open

from loraroute import peft
from podstate import MemoryStore
from scorer.model import SCHEMA_VERSION, PodState


def test_podstate_round_trips_and_tolerates_unknown_keys() -> None:
    state = PodState(pod_id="p0", url="http://127.0.0.1:1", gpu_adapters=("a", "b"), adapter_ranks={"a": 8})
    data = json.loads(state.to_json())
    data["field_from_the_future"] = 1
    again = PodState.from_dict(data)
    assert again == state
    assert isinstance(again.gpu_adapters, tuple)


def test_podstate_refuses_newer_schema() -> None:
    data = PodState(pod_id="p0", url="u").to_dict()
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ValueError, match="newer than this reader"):
        PodState.from_dict(data)


def test_podstate_heartbeat_is_not_a_change() -> None:
    a = PodState(pod_id="p0", url="u", observed_at=1.0, published_at=1.0)
    assert a.same_content(a.replace(observed_at=2.0, published_at=3.0))
    assert not a.same_content(a.replace(num_running=1))


def test_memory_store_expires_and_notifies() -> None:
    async def run() -> list[tuple[str, bool]]:
        store = MemoryStore(sweep_interval_s=0.02)
        seen: list[tuple[str, bool]] = []
        store.add_listener(lambda pod, st: seen.append((pod, st is not None)))
        await store.start()
        await store.publish(PodState(pod_id="p0", url="u"), ttl_s=0.05)
        assert set(store.view()) == {"p0"}
        await asyncio.sleep(0.2)
        assert dict(store.view()) == {}
        await store.close()
        return seen

    assert asyncio.run(run()) == [("p0", True), ("p0", False)]


def test_made_adapter_is_real_peft(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = peft.make_adapter(tmp_path / "sql", rank=16, target_modules=("q_proj", "down_proj"))
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["peft_type"] == "LORA"
    with safe_open(str(path / "adapter_model.safetensors"), "numpy") as f:
        keys = set(f.keys())
        a = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
    assert keys == set(peft.tensor_names(("q_proj", "down_proj")))
    assert a.shape == (16, 64) and b.shape == (64, 16)
